"""Metrics: torch-fidelity FID/KID/PR on judge features, accuracies, intervals, run folders."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import linalg

from gradcheck import metrics
from gradcheck.config import MetricsConfig
from gradcheck.metrics import (
    JUDGE_EXTRACTOR,
    evaluate_samples,
    features_to_fid,
    features_to_kid,
    proportion_interval,
    recompute_run_metrics,
    seed_interval,
)
from gradcheck.models import (
    classifier_config,
    classifier_logits,
    make_classifier,
    save_classifier,
)
from gradcheck.utils import GradcheckError


def _calibrated(model: torch.nn.Module, tiny_data: Path) -> torch.nn.Module:
    """Random weights with BatchNorm statistics measured on the tiny data set: at initialisation
    (running mean 0, variance 1) eval-mode features shrink to ~1e-6 and every metric is trivial."""
    from gradcheck.data.sportballs import load_tensors

    x, _ = load_tensors(tiny_data, "train")
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in x.split(16):
            classifier_logits(model, batch, 0)
    return model.eval()


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A random-init judge (shufflenet_v2_x1_0) saved as a classifier folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("judge") / "judge"
    save_classifier(_calibrated(make_classifier("shufflenet_v2_x1_0"), tiny_data), folder,
                    classifier_config("judge", "shufflenet_v2_x1_0"))
    return folder


@pytest.fixture(scope="module")
def guiding_folder(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A random-init time-conditioned guiding classifier (it must get t = 0 on final samples)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("guiding") / "robust"
    model = _calibrated(make_classifier("mobilenet_v3_small", time_conditioned=True), tiny_data)
    save_classifier(model, folder,
                    classifier_config("robust", "mobilenet_v3_small", time_conditioned=True))
    return folder


def _samples(tiny_data: Path, n: int = 10) -> np.ndarray:
    """Stand-in 'generated' images: validation images (any class) at the data set's size."""
    from gradcheck.data.sportballs import load_split

    images, _ = load_split(tiny_data, "val")
    return np.asarray(images[:n])


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 0.7 + shift


# ---- FID / KID against references ------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 256])  # full-rank and rank-deficient (N = 64 < D) covariances
def test_fid_of_features_against_themselves_is_zero(d: int) -> None:
    f = _features(64, d, seed=0).relu()  # non-negative like post-ReLU penultimate features
    assert abs(features_to_fid(f, f)) < 1e-3


def test_fid_matches_scipy_frechet_distance() -> None:
    f1, f2 = _features(64, 16, seed=1), _features(64, 16, seed=2, shift=0.3)
    mu1, mu2 = f1.numpy().mean(0), f2.numpy().mean(0)
    s1, s2 = np.cov(f1.numpy(), rowvar=False), np.cov(f2.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert features_to_fid(f1, f2) == pytest.approx(expected, rel=1e-4)


def test_kid_bootstrap_statistic_equals_torch_fidelity_kid_without_resampling() -> None:
    from torch_fidelity.metric_kid import kernel_poly

    f1, f2 = _features(20, 8, seed=3), _features(20, 8, seed=4, shift=0.2)
    kid, kid_std = features_to_kid(f1, f2, subset_size=20)
    a, b = f1.numpy(), f2.numpy()
    ident = np.arange(20)
    mmd = metrics._mmd2_unbiased_resampled(
        kernel_poly(a, a), kernel_poly(b, b), kernel_poly(a, b), ident, ident
    )
    assert mmd == pytest.approx(kid, rel=1e-10)
    # Subsets = both whole sets: every subset agrees, so no std (NaN, not a misleading 0).
    assert math.isnan(kid_std)
    assert features_to_kid(f1, f2, subset_size=10)[1] > 0


def test_kid_bootstrap_interval_is_seeded_and_brackets_the_estimate() -> None:
    f1, f2 = _features(32, 8, seed=5), _features(32, 8, seed=6, shift=0.5)
    kid, _ = features_to_kid(f1, f2, subset_size=32)
    low, high = metrics.bootstrap_kid(f1, f2, n_bootstrap=300, seed=0)
    assert low < kid < high
    assert (low, high) == metrics.bootstrap_kid(f1, f2, n_bootstrap=300, seed=0)


# ---- intervals ----------------------------------------------------------------------------------


def test_seed_interval_against_hand_computed_values() -> None:
    # mean 2.5, s = sqrt(5/3) = 1.290994, t(0.975, 3) = 3.182446: half width 2.054260
    mean, low, high = seed_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert low == pytest.approx(2.5 - 2.054260, abs=1e-5)
    assert high == pytest.approx(2.5 + 2.054260, abs=1e-5)
    # two values 10, 12: s = sqrt(2), t(0.975, 1) = 12.706205, half width 12.706205
    assert seed_interval([10.0, 12.0]) == pytest.approx((11.0, 11 - 12.706205, 11 + 12.706205))
    single = seed_interval([0.7])
    assert single[0] == 0.7 and math.isnan(single[1]) and math.isnan(single[2])
    assert math.isnan(seed_interval([0.5, math.nan, 0.7])[1])
    with pytest.raises(GradcheckError, match="at least one value"):
        seed_interval([])


def test_accuracy_interval_is_exact_and_never_degenerate() -> None:
    # Clopper-Pearson: 0 of 8 is [0, 36.9%], 64 of 64 is [94.4%, 100%] (a percentile
    # bootstrap gave [0, 0] and [1, 1], as if a share of 8 samples were known exactly).
    low, high = proportion_interval(np.zeros(8, bool))
    assert low == 0.0 and high == pytest.approx(0.3694, abs=1e-4)
    low, high = proportion_interval(np.ones(64, bool))
    assert low == pytest.approx(0.9440, abs=1e-4) and high == 1.0
    correct = np.arange(64) % 4 != 0  # 75% correct
    low, high = proportion_interval(correct)
    assert 0.6 < low < 0.75 < high < 0.86
    assert all(math.isnan(v) for v in proportion_interval(np.zeros(0, bool)))


# ---- Inception weights: verified, never downloaded ---------------------------------------------


def test_wrong_inception_file_is_refused_before_unpickling(
    tmp_path: Path, judge_folder: Path, monkeypatch: pytest.MonkeyPatch, tiny_data: Path
) -> None:
    fake = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    fake.write_bytes(b"not the FID weights")

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must never see an unverified file")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(GradcheckError, match="refusing Inception weights .*SHA-256"):
        metrics.verify_inception_weights(fake)
    # the environment variable is checked too, and "auto" does not silently fall back
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(fake))
    with pytest.raises(GradcheckError, match="refusing Inception weights"):
        evaluate_samples(_samples(tiny_data, 4), 0, guiding=None, judge=judge_folder,
                         data_root=tiny_data, n_reference=4, device="cpu")


def test_inception_extractor_without_weights_says_how_to_give_them(
    judge_folder: Path, monkeypatch: pytest.MonkeyPatch, tiny_data: Path
) -> None:
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    with pytest.raises(GradcheckError, match="--inception-weights PATH or set "
                       "GRADCHECK_INCEPTION_WEIGHTS"):
        evaluate_samples(_samples(tiny_data, 4), 0, guiding=None, judge=judge_folder,
                         data_root=tiny_data, n_reference=4, extractor="inception", device="cpu")


def test_verified_inception_file_is_loaded_from_its_path_and_nothing_downloads(
    tmp_path: Path, judge_folder: Path, monkeypatch: pytest.MonkeyPatch, tiny_data: Path
) -> None:
    import hashlib

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    # Random Inception weights stand in for the real file (not shipped, never downloaded).
    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: None)
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                      feature_extractor_weights_path="x").state_dict()
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in for the FID weights")
    loaded = []
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(metrics, "INCEPTION_SHA256", digest)
    monkeypatch.setattr(metrics, "INCEPTION_SIZE", weights.stat().st_size)
    monkeypatch.setattr(inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch, "load", lambda path, **kw: loaded.append(path) or state)
    monkeypatch.setattr(metrics, "features_to_fid", lambda f1, f2: 0.0)  # skip a 2048^3 eigvals
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(weights))

    out = evaluate_samples(_samples(tiny_data, 4), 0, guiding=None, judge=judge_folder,
                           data_root=tiny_data, n_reference=4, device="cpu", n_bootstrap=20)
    assert loaded == [str(weights)]
    assert (out["extractor"], out["feature_dim"]) == ("inception-v3-compat", 2048)
    assert out["inception_weights_sha256"] == metrics.INCEPTION_SHA256
    assert "Inception features" not in out["notes"] and "N=4" in out["notes"]


# ---- evaluate_samples ---------------------------------------------------------------------------


def test_missing_judge_is_a_clear_error(tmp_path: Path, tiny_data: Path) -> None:
    missing = tmp_path / "no-judge"
    with pytest.raises(GradcheckError, match=f"{missing}.*train-classifier --kind judge"):
        evaluate_samples(_samples(tiny_data, 4), 0, guiding=None, judge=missing,
                         data_root=tiny_data, n_reference=4, device="cpu")


def test_evaluate_samples_records_extractor_and_n_and_ignores_batch_size(
    judge_folder: Path, guiding_folder: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradcheck.models import load_classifier

    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    guiding = load_classifier(guiding_folder)
    samples = _samples(tiny_data, 10)
    common = dict(guiding=guiding, judge=judge_folder, data_root=tiny_data, n_reference=8,
                  reference_seed=3, device="cpu", n_bootstrap=200)
    a = evaluate_samples(samples, 0, batch_size=64, **common)
    # the oracle has no network: no guiding accuracy; everything else as with a guiding classifier
    b = evaluate_samples(samples, 0, batch_size=3, **{**common, "guiding": None})
    assert math.isnan(b["accuracy_guiding"]) and math.isnan(b["accuracy_guiding_ci_low"])

    assert a["extractor"] == JUDGE_EXTRACTOR and a["feature_dim"] == 1024
    assert (a["n_samples"], a["n_reference"], a["reference_seed"]) == (10, 8, 3)
    assert a["kid_subset_size"] == 8  # min(N, n_reference): never above N
    assert "N=10" in a["notes"] and JUDGE_EXTRACTOR in a["notes"]
    for key in ("fid", "kid_mean", "precision", "recall", "accuracy_guiding", "accuracy_judge"):
        assert math.isfinite(a[key]), key
    assert a["fid"] > 0.01 and a["kid_ci_low"] < a["kid_mean"] < a["kid_ci_high"]  # not degenerate
    assert 0 <= a["accuracy_judge_ci_low"] <= a["accuracy_judge"] <= a["accuracy_judge_ci_high"]
    for key, value in a.items():
        if key == "metrics_time_s" or key.startswith("accuracy_guiding"):
            continue
        if isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
        else:
            assert b[key] == value, key
    json.dumps(a)  # flat and JSON-able


def test_fid_of_samples_equal_to_their_references_is_zero(
    judge_folder: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    reference = metrics.reference_images(tiny_data, 1, n_reference=8, reference_seed=0)
    out = evaluate_samples(reference, 1, guiding=None, judge=judge_folder, data_root=tiny_data,
                           n_reference=8, reference_seed=0, device="cpu", n_bootstrap=50)
    assert abs(out["fid"]) < 1e-3
    assert out["precision"] == 1.0 and out["recall"] == 1.0


def test_registered_extractor_gives_the_same_kid_through_torch_fidelity(
    judge_folder: Path, tiny_data: Path
) -> None:
    import torch_fidelity

    from gradcheck.models import load_classifier

    samples = _samples(tiny_data, 8)
    reference = metrics.reference_images(tiny_data, 0, n_reference=8, reference_seed=0)
    judge, _ = load_classifier(judge_folder)
    fe, name, _ = metrics.make_extractor("judge", judge, None, torch.device("cpu"))
    ours, _ = features_to_kid(metrics.extract_features(samples, fe),
                              metrics.extract_features(reference, fe), subset_size=8)

    def dataset(images: np.ndarray) -> torch.utils.data.Dataset:
        class Images(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(images)

            def __getitem__(self, i: int) -> torch.Tensor:
                return torch.from_numpy(np.array(images[i])).permute(2, 0, 1).contiguous()

        return Images()

    # torch-fidelity's own pipeline, loading the judge by folder through the registry
    theirs = torch_fidelity.calculate_metrics(
        input1=dataset(samples), input2=dataset(reference), feature_extractor=name,
        feature_extractor_weights_path=str(judge_folder), kid=True, kid_subset_size=8,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    assert name == JUDGE_EXTRACTOR
    assert theirs["kernel_inception_distance_mean"] == pytest.approx(ours, rel=1e-4, abs=1e-7)


def test_kid_subset_size_above_n_is_refused(judge_folder: Path, tiny_data: Path) -> None:
    with pytest.raises(GradcheckError, match="kid_subset_size 9 must lie in 2..6"):
        evaluate_samples(_samples(tiny_data, 6), 0, guiding=None, judge=judge_folder,
                         data_root=tiny_data, n_reference=8, kid_subset_size=9, device="cpu")


def test_bad_seeds_and_a_judge_of_another_image_size_are_refused(
    judge_folder: Path, tiny_data: Path, tmp_path: Path
) -> None:
    samples = _samples(tiny_data, 6)
    for kw, message in ((dict(reference_seed=-1), "reference_seed must be an integer in 0.."),
                        (dict(bootstrap_seed=-2), "bootstrap_seed must be an integer in 0..")):
        with pytest.raises(GradcheckError, match=message):
            evaluate_samples(samples, 0, guiding=None, judge=judge_folder, data_root=tiny_data,
                             n_reference=8, device="cpu", **kw)
    other = tmp_path / "judge64"
    shutil.copytree(judge_folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "image_size": 64}))
    with pytest.raises(GradcheckError, match="was trained on 64x64 images but the samples are "
                                             "32x32"):
        evaluate_samples(samples, 0, guiding=None, judge=other, data_root=tiny_data,
                         n_reference=8, device="cpu")


def test_config_defaults_match_evaluate_samples_defaults() -> None:
    params = inspect.signature(evaluate_samples).parameters
    for f in dataclasses.fields(MetricsConfig):
        assert params[f.name].default == f.default, f.name


# ---- run folders and the command line ----------------------------------------------------------


def test_recompute_run_metrics_keeps_identity_and_writes_both_files(
    tmp_path: Path, judge_folder: Path, guiding_folder: Path, tiny_data: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradcheck.cli import main

    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    # FID itself is tested above; here a marker value shows it reaches both files (and saves
    # two 1024x1024 eigendecompositions)
    monkeypatch.setattr(metrics, "features_to_fid", lambda f1, f2: 42.0)
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "samples.npy", _samples(tiny_data, 8))
    config = {"classifier": str(guiding_folder), "target": 0, "judge": str(judge_folder),
              "data_root": str(tiny_data), "seed": 5, "steps": 10, "scale": 2.0,
              "num_samples": 8, "device": "cpu"}
    (run / "config.json").write_text(json.dumps(config))
    old = {"run_id": "abc123", "classifier": "robust", "wall_time_s": 12.5,
           "mean_cos_prev_raw": 0.25, "n_reference": 6, "reference_seed": 2, "fid": -1.0}
    (run / "metrics.json").write_text(json.dumps(old))

    row = recompute_run_metrics(run, device="cpu", n_bootstrap=50)
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved) == set(row) and saved["fid"] == row["fid"]
    assert (saved["run_id"], saved["classifier"], saved["wall_time_s"]) == ("abc123", "robust",
                                                                            12.5)
    assert (saved["mean_cos_prev_raw"], saved["seed"], saved["scale"]) == (0.25, 5, 2.0)
    assert (saved["n_reference"], saved["reference_seed"]) == (6, 2)  # protocol kept
    assert saved["fid"] == 42.0 and saved["extractor"] == JUDGE_EXTRACTOR
    assert 0 <= saved["accuracy_guiding"] <= 1  # the run's classifier folder was loaded
    table = pd.read_parquet(run / "metrics.parquet")
    assert len(table) == 1 and table["fid"].iloc[0] == 42.0
    assert table["kid_mean"].iloc[0] == pytest.approx(row["kid_mean"])
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "metrics.json", "metrics.parquet", "samples.npy"]  # no temp files left

    with pytest.raises(SystemExit) as exit_info:
        main(["metrics", str(run), "--device", "cpu", "--n-reference", "8", "--n-bootstrap", "50"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"extractor         {JUDGE_EXTRACTOR}" in out and "8 samples vs 8 references" in out
    assert json.loads((run / "metrics.json").read_text())["n_reference"] == 8

    with pytest.raises(GradcheckError, match="unknown metrics option"):
        recompute_run_metrics(run, scale=3.0)
