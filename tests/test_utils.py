"""utils: atomic outputs, folder names and seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradcheck.utils import GradcheckError, atomic_output_dir, check_folder_name, check_seed


def test_atomic_output_dir_replaces_a_file_only_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(GradcheckError, match="out already exists as a file; pass --overwrite"):
        with atomic_output_dir(target):
            pass
    assert target.read_text() == "not a folder"
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-* left behind


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a\\b"])
def test_folder_names_must_be_plain(name: str) -> None:
    with pytest.raises(GradcheckError, match="must be a plain folder name"):
        check_folder_name("checkpoint set name", name)


def test_seeds_are_non_negative_integers() -> None:
    check_seed(0)
    check_seed(2**32 - 1)
    for bad in (-1, 2**32, 1.5, True, "3"):
        with pytest.raises(GradcheckError, match=r"seed must be an integer in 0\.\.4294967295"):
            check_seed(bad)
