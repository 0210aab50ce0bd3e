"""utils: atomic outputs, folder names and seeds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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


def test_json_files_are_strict_json(tmp_path):
    """NaN and infinities are null: jq, JavaScript and strict parsers read every file."""
    import json

    from gradcheck.utils import save_json

    save_json(tmp_path / "m.json", {"precision": float("nan"), "x": [1.0, float("inf")],
                                    "n": np.float64("nan"), "ok": 0.5})
    data = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert data == {"precision": None, "x": [1.0, None], "n": None, "ok": 0.5}


def test_check_positive_refuses_nan_and_infinity():
    from gradcheck.utils import check_positive

    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(GradcheckError, match="lr must be > 0"):
            check_positive("lr", bad)
    check_positive("lr", 0.0, allow_zero=True)


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    """kill -9 leaves .<name>.tmp-<owner>-<pid>-<hex>; the next output in the folder removes it,
    but never one whose process is alive or whose owner (host, boot, PID namespace) is another."""
    import subprocess

    from gradcheck.utils import _owner_tag, atomic_output_dir

    me = _owner_tag()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f".run1.tmp-{me}-{gone.pid}-0123abcd"
    live = tmp_path / f".run2.tmp-{me}-{os.getpid()}-0123abcd"
    other = tmp_path / f".run3.tmp-0000000000-{gone.pid}-0123abcd"
    for p in (dead, live, other):
        (p / "part").mkdir(parents=True)
    with atomic_output_dir(tmp_path / "run4") as tmp:
        (tmp / "done").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "run4"])


def test_failed_output_leaves_no_parent_folders_behind(tmp_path):
    from gradcheck.utils import atomic_output_dir

    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "a" / "b" / "c"):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
