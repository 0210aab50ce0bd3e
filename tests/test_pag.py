"""PAG score (D9), gradient maps, targeted PGD and `gradcheck pag` on tiny data and models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gradcheck import CLASS_NAMES
from gradcheck.cli import main
from gradcheck.guidance import flat_norm, log_prob_gradient
from gradcheck.models import classifier_config, make_classifier, make_scheduler, save_classifier
from gradcheck.oracle import EmpiricalOracle
from gradcheck.pag import (
    PAG_COLUMNS,
    PGD_COLUMNS,
    gradient_maps,
    kawar_equivalent_eps,
    pag_scores,
    pag_table,
    select_images,
)
from gradcheck.report.figures import minmax_normalize, pag_by_t
from gradcheck.utils import GradcheckError

ABAR = make_scheduler().alphas_cumprod


@pytest.fixture(scope="module")
def val_masks(tiny_data: Path) -> np.ndarray:
    """Ball discs (32, 32, 32) of the tiny validation split."""
    from gradcheck.data.sportballs import ball_masks, load_factors

    factors = load_factors(tiny_data)
    return ball_masks(factors[factors["split"] == "val"].sort_values("index"), 32)


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A random-init plain classifier and a time-conditioned one, saved as classifier folders."""
    root = tmp_path_factory.mktemp("classifiers")
    out = []
    for name, tc in (("plain", False), ("timecond", True)):
        torch.manual_seed(0)
        model = make_classifier("mobilenet_v3_small", time_conditioned=tc)
        save_classifier(model, root / name, classifier_config(name, "mobilenet_v3_small", tc))
        out.append(root / name)
    return out


def test_eps_keeps_kawars_per_pixel_rms():
    assert kawar_equivalent_eps((3, 128, 128)) == pytest.approx(100.0)
    assert kawar_equivalent_eps((3, 64, 64)) == pytest.approx(50.0)
    assert kawar_equivalent_eps((3, 32, 32)) == pytest.approx(25.0)


def test_pag_score_prefers_gradients_on_the_disc(val_masks):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(32, 3, 32, 32, generator=g)
    on_disc = noise * torch.where(torch.from_numpy(val_masks)[:, None], 5.0, 1.0)
    uniform = pag_scores(noise, val_masks)
    focused = pag_scores(on_disc, val_masks)
    assert uniform.shape == focused.shape == (32,)
    assert np.all(focused > uniform)
    assert np.median(uniform) == pytest.approx(1.0, abs=0.2)
    assert np.median(focused) == pytest.approx(25.0, rel=0.2)  # energy ratio 5^2
    # Scale-free, and undefined (NaN) for a zero gradient.
    np.testing.assert_allclose(pag_scores(7 * noise, val_masks), uniform, rtol=1e-6)
    assert np.isnan(pag_scores(torch.zeros(1, 3, 32, 32), val_masks[:1])).all()
    with pytest.raises(GradcheckError, match="masks"):
        pag_scores(noise, val_masks[:3])


def test_pag_table_summarises_per_class_and_t():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    scores = np.array([[1.0, 3.0, 2.0, np.nan, 5.0, 5.0, 1.0, 1.0],
                       [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    table = pag_table("m", scores, labels, (0, 500))
    assert list(table.columns) == list(PAG_COLUMNS)
    assert len(table) == 8
    row = table[(table["t"] == 0) & (table["class_name"] == "baseball")].iloc[0]
    assert row["pag_score_mean"] == pytest.approx(2.0)
    assert row["pag_score_std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert row["pag_score_median"] == pytest.approx(2.0)
    nan_row = table[(table["t"] == 0) & (table["label"] == 1)].iloc[0]
    assert (nan_row["n_images"], nan_row["n_undefined"]) == (1, 1)


def test_pag_by_t_weights_classes_by_images_and_keeps_the_median_robust():
    # One image with almost no energy off the ball (score 1e30) swamps its class's mean, not
    # the median; classes are averaged weighted by their defined images.
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([[1.0, 1.0, 1e30, 2.0, 2.0, np.nan]])
    by_t = pag_by_t(pag_table("m", scores, labels, (0,))).iloc[0]
    assert by_t["n_images"] == 5
    assert by_t["pag_score_median"] == pytest.approx((3 * 1.0 + 2 * 2.0) / 5)
    assert by_t["pag_score_mean"] == pytest.approx(1e30 / 5)


def test_minmax_normalize_per_map():
    g = np.stack([np.linspace(-3, 5, 3 * 4 * 4).reshape(3, 4, 4), np.full((3, 4, 4), 2.0)])
    out = minmax_normalize(g)
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert np.all(out[1] == 0.5)


def test_select_images_is_seeded_and_balanced():
    labels = np.arange(40) % 4
    a = select_images(labels, 3, seed=1)
    assert a.tolist() == select_images(labels, 3, seed=1).tolist()
    assert a.tolist() != select_images(labels, 3, seed=2).tolist()
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 3]


def test_gradients_reach_t_and_ignore_batch_size(classifier_dirs):
    from gradcheck.models import load_classifier

    model, _ = load_classifier(classifier_dirs[1], "cpu")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(5, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    g0, g500 = log_prob_gradient(model, x0, y, 0)[0], log_prob_gradient(model, x0, y, 500)[0]
    assert (g0 - g500).norm() > 1e-3 * g0.norm()  # same x, other t: the network saw t
    a = gradient_maps(model, x0, y, noise, (0, 250), ABAR, batch_size=2)
    b = gradient_maps(model, x0, y, noise, (0, 250), ABAR, batch_size=64)
    assert a.shape == (2, 5, 3, 32, 32)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_oracle_maps_are_its_exact_gradient(tiny_data, val_masks):
    from gradcheck.data.sportballs import load_tensors

    oracle = EmpiricalOracle.from_data_root(tiny_data, ABAR, device="cpu")
    x0, y = load_tensors(tiny_data, "val")
    noise = torch.randn(x0[:4].shape, generator=torch.Generator().manual_seed(0))
    maps = gradient_maps(oracle, x0[:4], y[:4], noise, (250, 0), ABAR)
    x_t = ABAR[250].sqrt() * x0[:4] + (1 - ABAR[250]).sqrt() * noise
    exact = oracle.grad_log_prob(x_t, 250, y[:4]).double()
    # Each image's gradient up to a power of two: the same map and D9 score.
    power = (flat_norm(maps[0]) / flat_norm(exact)).log2()
    torch.testing.assert_close(power, power.round(), rtol=0, atol=1e-5)
    torch.testing.assert_close(maps[0] / power.round().exp2().view(-1, 1, 1, 1), exact)
    # At t = 0 the oracle is certain: its gradient is below float64's range, its map is not.
    assert (flat_norm(oracle.grad_log_prob(x0[:4], 0, y[:4], torch.float64)) == 0).any()
    assert np.isfinite(pag_scores(maps[1], val_masks[:4])).all()


def test_pag_command_writes_tables_and_figures(tiny_data, classifier_dirs, tmp_path):
    out = tmp_path / "pag"
    args = ["pag", "--classifiers", ",".join(map(str, classifier_dirs)), "--data-root",
            str(tiny_data), "--out", str(out), "--num-images", "2", "--device", "cpu",
            "--timesteps", "0,250,750", "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0

    table = pd.read_parquet(out / "pag.parquet")
    assert list(table.columns) == list(PAG_COLUMNS)
    # Both classifiers and the oracle (the tiny train split exists), 4 classes, 3 t.
    assert set(table["classifier"]) == {"plain", "timecond", "oracle"}
    assert len(table) == 3 * 4 * 3
    assert set(table["class_name"]) == set(CLASS_NAMES)
    assert set(table["t"]) == {0, 250, 750}
    assert (table["n_images"] + table["n_undefined"] == 2).all()
    random_init = table[table["classifier"] != "oracle"]
    assert np.isfinite(random_init["pag_score_mean"]).all() and (random_init["n_images"] == 2).all()

    pgd = pd.read_parquet(out / "pgd.parquet")
    assert list(pgd.columns) == list(PGD_COLUMNS)
    assert len(pgd) == 3 * 4 * 4  # sources x source images (one per class) x targets
    meta = json.loads((out / "config.json").read_text())
    assert meta["pgd_eps"] == pytest.approx(25.0)  # 32x32 images: Kawar's per-pixel RMS
    assert (pgd["l2"] <= meta["pgd_eps"] + 1e-3).all()
    # At t = 0 the oracle is a nearest-neighbour classifier: eps = 25 reaches every target.
    assert (pgd.loc[pgd["classifier"] == "oracle", "prob_target"] > 0.99).all()
    assert json.loads(pq_meta(out / "pag.parquet"))["config"]["num_images"] == 2

    for stem in ("gradient_maps", "pgd_targeted", "pag_score"):
        assert (out / f"{stem}.pdf").stat().st_size > 1000
        with Image.open(out / f"{stem}.png") as im:
            assert min(im.size) > 200

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2


def pq_meta(path: Path) -> str:
    import pyarrow.parquet as pq

    return pq.read_schema(path).metadata[b"gradcheck"].decode()


def test_missing_default_classifier_names_its_folder(tiny_data, tmp_path, monkeypatch, capsys):

    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as exit_:
        main(["pag", "--classifiers", "robust", "--data-root", str(tiny_data), "--out",
              str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: classifier 'robust'" in err and str(tmp_path / "none") in err
    assert not (tmp_path / "out").exists()


def test_bad_options_give_clear_errors(tiny_data, classifier_dirs, tmp_path, capsys):
    base = ["pag", "--classifiers", str(classifier_dirs[0]), "--data-root", str(tiny_data),
            "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    for extra, message in ((["--timesteps", "0,x"], "comma-separated list of integers"),
                           (["--timesteps", "1000"], "0..999"),
                           (["--num-images", "0"], "num_images must be > 0"),
                           (["--num-images", "1000"], "num_images 1000 is more than the "),
                           (["--seed", "-1"], "seed must be an integer in 0.."),
                           (["--classifiers", "oracle"], "use --oracle")):
        with pytest.raises(SystemExit) as exit_:
            main(base + extra)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_explicit_oracle_without_train_split_is_refused(tiny_data, classifier_dirs, tmp_path,
                                                        capsys):
    import shutil

    root = tmp_path / "val_only"
    shutil.copytree(tiny_data, root)
    (root / "train_images.npy").unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["pag", "--classifiers", str(classifier_dirs[0]), "--data-root", str(root),
              "--oracle", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"])
    assert exit_.value.code == 2
    assert "--oracle needs the train split" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
