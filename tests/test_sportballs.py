"""SportBalls generator, writer and reader (gradcheck/data/sportballs.py; docs/formats.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler
from typer.testing import CliRunner

from gradcheck import CLASS_NAMES
from gradcheck.data import sportballs as sb
from gradcheck.data.sportballs import (
    SPLITS,
    SportBalls,
    ball_masks,
    factor_ranges,
    generate_dataset,
    load_factors,
    load_split,
    load_tensors,
    render_images,
)
from gradcheck.utils import GradcheckError

TINY = dict(n_train=64, n_val=32, n_test=32, seed=0, image_size=32)

# The tiny set's SHA-256 on the machine that wrote the generator. Byte-identical output on any
# machine is the contract: a change here means a new GENERATOR_VERSION, not a new pin.
TINY_SHA256 = {
    "train_images.npy": "5e691ebe4119d9485d6e8ba64399e3927a0355e15f45abce86353f834b2c2112",
    "val_images.npy": "afde9873c1bd61664f8615bc899effa4bb4a93b75674c3ea7425d41c3aa1604c",
    "test_images.npy": "4a382caf19d2fd7a9d2e8e19ea503e040febeac248161894a2b972394c73141f",
}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---- determinism ------------------------------------------------------------------------------
def test_same_seed_gives_identical_files(tiny_data: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, progress=False, **TINY)
    assert _siblings(again) == _siblings(tiny_data)
    for name in _siblings(tiny_data):
        assert (again / name).read_bytes() == (tiny_data / name).read_bytes(), name


def test_streamed_npy_equals_np_save(tiny_data: Path, tmp_path: Path) -> None:
    images, _ = load_split(tiny_data, "train")
    np.save(tmp_path / "ref.npy", np.asarray(images))
    assert (tmp_path / "ref.npy").read_bytes() == (tiny_data / "train_images.npy").read_bytes()


def test_checksums_match_pin_and_dataset_json(tiny_data: Path) -> None:
    meta = json.loads((tiny_data / "dataset.json").read_text())
    assert meta["generator_version"] == sb.GENERATOR_VERSION
    assert meta["parameters"] == {**TINY, "png": False}
    for split in SPLITS:
        for name, digest in meta["splits"][split]["sha256"].items():
            assert hashlib.sha256((tiny_data / name).read_bytes()).hexdigest() == digest
            if name in TINY_SHA256:
                assert digest == TINY_SHA256[name], name


def test_other_seed_gives_other_images(tmp_path: Path, tiny_data: Path) -> None:
    generate_dataset(tmp_path / "s1", progress=False, **{**TINY, "seed": 1})
    a, _ = load_split(tiny_data, "train")
    b, _ = load_split(tmp_path / "s1", "train")
    assert not np.array_equal(a, b)


def test_bytes_do_not_depend_on_threads_or_chunks(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sb, "THREADS", 3)
    monkeypatch.setattr(sb, "CHUNK", 7)
    generate_dataset(tmp_path / "threads", progress=False, **TINY)
    for split in SPLITS:
        name = f"{split}_images.npy"
        assert (tmp_path / "threads" / name).read_bytes() == (tiny_data / name).read_bytes()


def test_image_does_not_depend_on_its_batch() -> None:
    f = pd.DataFrame(
        {"center_x": [30.0, 25.5, 40.2], "center_y": [33.3, 21.0, 42.9],
         "diameter": [24.0, 31.7, 40.0], "rotation_deg": [0.0, 123.4, 359.9]}
    )
    labels = [0, 2, 3]
    batch = render_images(labels, f.center_x, f.center_y, f.diameter, f.rotation_deg)
    for i in range(3):
        alone = render_images(
            labels[i : i + 1], f.center_x[i : i + 1], f.center_y[i : i + 1],
            f.diameter[i : i + 1], f.rotation_deg[i : i + 1],
        )
        np.testing.assert_array_equal(alone[0], batch[i])


def test_cos_sin_polynomial_is_accurate() -> None:
    deg = np.linspace(-720, 720, 10001)
    c, s = sb.cos_sin_deg(deg)
    np.testing.assert_allclose(c, np.cos(np.deg2rad(deg)), atol=2e-15)
    np.testing.assert_allclose(s, np.sin(np.deg2rad(deg)), atol=2e-15)


# ---- splits and labels ------------------------------------------------------------------------
def test_splits_disjoint_and_every_image_unique(tiny_data: Path) -> None:
    keys = {}
    for split in SPLITS:
        images, _ = load_split(tiny_data, split)
        for i, image in enumerate(images):
            key = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
            assert key not in keys, f"{split}[{i}] equals {keys[key]}"
            keys[key] = (split, i)
    assert len(keys) == 64 + 32 + 32


def test_duplicates_are_redrawn() -> None:
    """Force every image of a split to collide; each is re-drawn until unique."""
    n = 12
    labels = np.arange(n) % 4
    factors = {k: np.full(n, v) for k, v in
               dict(diameter=14.0, center_x=16.0, center_y=16.0, rotation_deg=10.0).items()}
    seen = {sb._image_key(render_images([0], [16.0], [16.0], [14.0], [10.0], 32)[0])}
    redraw = [np.random.default_rng(i) for i in range(4)]
    chunks: list[np.ndarray] = []
    n_redrawn = sb._render_unique(labels, factors, redraw, 32, chunks.append, seen)
    out = np.concatenate(chunks)
    assert n_redrawn >= n - 3  # one per class may stay, except class 0 which was already seen
    assert len({sb._image_key(im) for im in out}) == n
    assert len(seen) == n + 1
    again = render_images(labels, *(factors[k] for k in sb._RENDER_ORDER), image_size=32)
    np.testing.assert_array_equal(out, again)  # the factor table describes the redrawn images


def test_classes_balanced(tiny_data: Path) -> None:
    for split, n in zip(SPLITS, (64, 32, 32), strict=True):
        _, labels = load_split(tiny_data, split)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(labels, minlength=4), [n // 4] * 4)
    counts = np.bincount(sb._balanced_labels(np.random.default_rng(0), 7), minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 7


# ---- factors ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many_factors(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Factor table of a larger set (8,000 train / 8,000 test) for the leakage checks."""
    root = tmp_path_factory.mktemp("many") / "sb"
    generate_dataset(root, n_train=8000, n_val=4, n_test=8000, image_size=32, progress=False)
    return load_factors(root)


def _factor_accuracy(factors: pd.DataFrame, columns: list[str]) -> float:
    train, test = factors[factors.split == "train"], factors[factors.split == "test"]
    # Quadratic logistic regression: sees shifts and spreads of any factor or pair of factors.
    clf = make_pipeline(StandardScaler(), PolynomialFeatures(2), LogisticRegression(max_iter=500))
    clf.fit(train[columns].to_numpy(), train.label.to_numpy())
    return float((clf.predict(test[columns].to_numpy()) == test.label.to_numpy()).mean())


def test_factors_do_not_predict_the_class(many_factors: pd.DataFrame) -> None:
    acc = _factor_accuracy(many_factors, list(sb.FACTOR_NAMES))
    assert abs(acc - 0.25) < 0.02, acc


def test_factor_leak_would_be_caught(many_factors: pd.DataFrame) -> None:
    """The check above has power: a 1-pixel class-dependent diameter shift is detected."""
    leaky = many_factors.assign(diameter=many_factors.diameter + many_factors.label * 1.0)
    assert _factor_accuracy(leaky, list(sb.FACTOR_NAMES)) > 0.3


def test_factors_independent_and_in_range(many_factors: pd.DataFrame) -> None:
    corr = many_factors[list(sb.FACTOR_NAMES)].corr().to_numpy()
    assert np.abs(corr - np.eye(4)).max() < 0.04
    for name, (lo, hi) in factor_ranges(32).items():
        col = many_factors[name]
        assert col.min() >= lo and col.max() <= hi, name
        assert col.min() < lo + 0.01 * (hi - lo) and col.max() > hi - 0.01 * (hi - lo), name
    assert many_factors.rotation_deg.max() < 360.0
    for cls in range(4):  # per class, the same distribution (means within 5 standard errors)
        sub = many_factors[many_factors.label == cls]
        for name in sb.FACTOR_NAMES:
            se = many_factors[name].std() / np.sqrt(len(sub))
            assert abs(sub[name].mean() - many_factors[name].mean()) < 5 * se, (cls, name)


# ---- geometry ---------------------------------------------------------------------------------
def _check_geometry(images: np.ndarray, factors: pd.DataFrame, size: int) -> None:
    masks = ball_masks(factors, size)
    assert (images[~masks] == 255).all(), "background must be exactly white"
    assert not masks[:, 0].any() and not masks[:, -1].any(), "ball touches the canvas edge"
    assert not masks[:, :, 0].any() and not masks[:, :, -1].any()
    # Every pixel well inside the disc is ball, not background.
    inner = ball_masks(factors.assign(diameter=factors.diameter - 2 * sb.RIM - 2.0), size)
    assert (images[inner] != 255).any(axis=-1).all()


def test_balls_inside_canvas_background_white(tiny_data: Path) -> None:
    factors = load_factors(tiny_data)
    for split in SPLITS:
        images, _ = load_split(tiny_data, split)
        rows = factors[factors.split == split].sort_values("index")
        _check_geometry(np.asarray(images), rows, 32)


def test_extreme_factors_at_64() -> None:
    """Largest and smallest balls at the corners of the centre range, at many rotations."""
    r = factor_ranges(64)
    grid = [
        (c, cx, cy, d, rot)
        for c in range(4)
        for cx in r["center_x"]
        for cy in r["center_y"]
        for d in r["diameter"]
        for rot in (0.0, 45.0, 137.0, 359.99)
    ]
    f = pd.DataFrame(grid, columns=["label", "center_x", "center_y", "diameter", "rotation_deg"])
    images = render_images(f.label, f.center_x, f.center_y, f.diameter, f.rotation_deg, 64)
    assert images.shape == (len(f), 64, 64, 3) and images.dtype == np.uint8
    _check_geometry(images, f, 64)


def test_class_changes_pattern_not_silhouette() -> None:
    f = pd.DataFrame({"center_x": [31.0] * 4, "center_y": [29.5] * 4, "diameter": [36.0] * 4,
                      "rotation_deg": [70.0] * 4})
    images = render_images([0, 1, 2, 3], f.center_x, f.center_y, f.diameter, f.rotation_deg)
    ball = (images != 255).any(-1)
    assert (ball == ball[0]).all()  # the same disc for every class
    inner = ball_masks(f.assign(diameter=f.diameter - 6.0), 64)[0]  # inside the outline
    r, g, b = (images[:, inner, c].astype(int) for c in range(3))  # each (4, pixels)
    share = {
        "red": ((r > 170) & (g < 90) & (b < 90)).mean(1),
        "orange": ((r > 200) & (g > 90) & (g < 150) & (b < 80)).mean(1),
        "black": ((r < 70) & (g < 70) & (b < 70)).mean(1),
        "yellow": ((r > 200) & (g > 170) & (b < 100)).mean(1),
        "blue": ((b > 150) & (r < 80)).mean(1),
    }
    baseball, basketball, soccer, volleyball = range(4)
    assert share["red"][baseball] > 0.05 and share["black"][baseball] < 0.01
    assert share["orange"][basketball] > 0.6 and share["black"][basketball] > 0.05
    assert share["black"][soccer] > 0.15 and share["red"][soccer] == share["orange"][soccer] == 0
    assert share["yellow"][volleyball] > 0.1 and share["blue"][volleyball] > 0.1
    for colour in ("yellow", "blue"):
        assert share[colour][[baseball, basketball, soccer]].max() == 0


def test_render_rejects_balls_outside_canvas() -> None:
    with pytest.raises(GradcheckError, match="inside the 64x64 canvas"):
        render_images([0], [10.0], [32.0], [30.0], [0.0])
    with pytest.raises(GradcheckError, match="labels"):
        render_images([4], [32.0], [32.0], [30.0], [0.0])


# ---- files and readers ------------------------------------------------------------------------
def test_files_and_readers(tiny_data: Path) -> None:
    images, labels = load_split(tiny_data, "train")
    assert isinstance(images, np.memmap) and images.shape == (64, 32, 32, 3)
    x, y = load_tensors(tiny_data, "val")
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() == 1.0
    val_images, val_labels = load_split(tiny_data, "val")
    np.testing.assert_allclose(
        x[5].permute(1, 2, 0).numpy(), val_images[5] / 127.5 - 1.0, atol=1e-6
    )
    np.testing.assert_array_equal(y.numpy(), val_labels)
    factors = load_factors(tiny_data)
    assert list(factors.columns) == [
        "split", "index", "label", "class_name", "center_x", "center_y", "diameter",
        "rotation_deg",
    ]
    assert (factors.class_name == np.array(CLASS_NAMES)[factors.label]).all()
    for in_memory in (False, True):
        ds = SportBalls(tiny_data, "test", in_memory=in_memory)
        xi, yi = ds[3]
        assert len(ds) == 32 and xi.shape == (3, 32, 32) and isinstance(yi, int)
        np.testing.assert_array_equal(ds.factors.label.to_numpy(), ds.labels)
        torch.testing.assert_close(xi, load_tensors(tiny_data, "test")[0][3])
    assert (tiny_data / "preview.png").stat().st_size > 1000


def test_readers_explain_missing_data(tmp_path: Path) -> None:
    with pytest.raises(GradcheckError, match="gradcheck make-dataset"):
        load_split(tmp_path, "train")
    with pytest.raises(GradcheckError, match="split"):
        load_split(tmp_path, "training")


# ---- command line -----------------------------------------------------------------------------
def test_cli_writes_data_and_png_tree(tmp_path: Path) -> None:
    from PIL import Image

    from gradcheck.cli import app

    root = tmp_path / "sb"
    args = ["make-dataset", "--root", str(root), "--n-train", "8", "--n-val", "4",
            "--n-test", "4", "--image-size", "16", "--seed", "3", "--png"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 16 images" in result.output and "images/s" in result.output
    images, labels = load_split(root, "val")
    for i in range(4):
        path = root / "png" / "val" / CLASS_NAMES[labels[i]] / f"{i:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[i])
    assert len(list((root / "png").rglob("*.png"))) == 16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-train", "0"], "n_train must be >= 4 (one image per class), got 0"),
        (["--n-val=-5"], "n_val must be >= 4 (one image per class), got -5"),
        (["--n-test", "3"], "n_test must be >= 4"),
        (["--image-size", "8"], "image_size must lie in 16..512 pixels, got 8"),
        (["--image-size", "100000"], "image_size must lie in 16..512 pixels, got 100000"),
        (["--n-train", "1000000000000"], "the data set needs 1.14e+07 GiB but"),
    ],
)
def test_cli_rejects_bad_sizes(tmp_path: Path, extra: list[str], message: str) -> None:
    from gradcheck.cli import app

    result = CliRunner().invoke(app, ["make-dataset", "--root", str(tmp_path / "sb"), *extra])
    assert result.exit_code != 0
    assert isinstance(result.exception, GradcheckError)
    assert message in str(result.exception)
    assert _siblings(tmp_path) == []


def test_cli_refuses_existing_and_unwritable_roots(tiny_data: Path, tmp_path: Path) -> None:
    from gradcheck.cli import app

    before = {p: p.read_bytes() for p in tiny_data.iterdir()}
    parent_before = _siblings(tiny_data.parent)
    result = CliRunner().invoke(app, ["make-dataset", "--root", str(tiny_data)])
    assert isinstance(result.exception, GradcheckError)
    assert "--overwrite" in str(result.exception)
    assert {p: p.read_bytes() for p in tiny_data.iterdir()} == before
    assert _siblings(tiny_data.parent) == parent_before

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["make-dataset", "--root", str(blocker / "sb")])
    assert isinstance(result.exception, GradcheckError)
    assert "cannot write" in str(result.exception)
    assert _siblings(tmp_path) == ["file"]


def test_main_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gradcheck.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["make-dataset", "--root", str(tmp_path / "sb"), "--n-train", "-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: n_train must be >= 4 (one image per class), got -3"]
    assert _siblings(tmp_path) == []


def test_dataset_card_is_kept(tmp_path: Path) -> None:
    """The committed card in the default root neither blocks generation nor gets lost."""
    root = tmp_path / "sb"
    root.mkdir()
    (root / "README.md").write_text("card")
    small = dict(n_train=4, n_val=4, n_test=4, image_size=16, progress=False)
    generate_dataset(root, **small)
    assert (root / "README.md").read_text() == "card" and (root / "dataset.json").is_file()
    with pytest.raises(GradcheckError, match="--overwrite"):
        generate_dataset(root, **small)
    generate_dataset(root, overwrite=True, seed=5, **small)
    assert (root / "README.md").read_text() == "card"
    assert json.loads((root / "dataset.json").read_text())["parameters"]["seed"] == 5
    assert _siblings(tmp_path) == ["sb"]


def test_interrupt_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def interrupted(*args: object, **kwargs: object) -> int:
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(sb, "_render_unique", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "sb", progress=False, **TINY)
    assert calls and _siblings(tmp_path) == []
