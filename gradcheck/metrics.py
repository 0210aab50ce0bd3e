"""Class-conditional sample quality and accuracy with uncertainty: FID, KID and
precision/recall by torch-fidelity on the judge's or Inception-v3's features, nothing downloaded
(protocol and why: docs/metrics.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kernel_poly,
    kid_features_to_metric,
)
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from gradcheck import CLASS_NAMES
from gradcheck.config import MetricsConfig
from gradcheck.models import (
    GUIDING_KINDS,
    check_image_size,
    classifier_features,
    classify,
    load_classifier,
)
from gradcheck.paths import default_classifier, default_data_root
from gradcheck.utils import (
    GradcheckError,
    atomic_output_file,
    check_choice,
    check_positive,
    check_seed,
    from_uint8,
    load_json,
    resolve_device,
    run_metadata,
    strict_json,
    write_parquet,
)

JUDGE_EXTRACTOR = "sportballs-judge-shufflenet"
INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's own name for FID's Inception-v3
EXTRACTORS = ("auto", "judge", "inception")
JUDGE_ARCH = "shufflenet_v2_x1_0"

INCEPTION_ENV = "GRADCHECK_INCEPTION_WEIGHTS"
# The standard FID Inception-v3 file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_SIZE = 95_628_359

PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkäänniemi et al. 2019; torch-fidelity default)
KID_SUBSETS = 100  # torch-fidelity default

RUN_IDENTITY_FIELDS = (
    "run_id", "classifier", "x0_estimate", "stabilizer", "normalize", "scale", "target", "seed",
    "steps", "num_samples", "wall_time_s", "batched_runs", "batched_wall_time_s", "hardware",
    "mean_cos_prev_raw", "mean_cos_prev_applied",
)
RECOMPUTE_OPTIONS = ("judge", "data_root", *(f.name for f in dataclasses.fields(MetricsConfig)))


# ---- Feature extractors -------------------------------------------------------------------------


class JudgeFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: the judge's penultimate features (B, 1024), images not resized;
    the judge given loaded (``judge=``) or as its folder (``feature_extractor_weights_path=``)."""

    def __init__(self, name: str, features_list: Sequence[str],
                 feature_extractor_weights_path: str | Path | None = None,
                 judge: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(name, list(features_list))
        if judge is None:
            if feature_extractor_weights_path is None:
                raise GradcheckError(f"{name} needs a judge model or its classifier folder")
            judge, _ = load_classifier(feature_extractor_weights_path)
        self.judge = judge
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("1024",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "1024"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: uint8 (B, 3, H, W) -> ((B, 1024) float32,), the judge's input convention [-1, 1]."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise GradcheckError(f"expected uint8 images (B, 3, H, W), got {x.dtype} "
                                 f"{tuple(x.shape)}")
        return (classifier_features(self.judge, from_uint8(x)).float(),)


if JUDGE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # module reloads must not re-register
    register_feature_extractor(JUDGE_EXTRACTOR, JudgeFeatureExtractor)


def resolve_inception_weights(path: str | Path | None) -> Path | None:
    """The Inception weights to use: ``path``, else $GRADCHECK_INCEPTION_WEIGHTS, else None."""
    path = path or os.environ.get(INCEPTION_ENV) or None
    return None if path is None else Path(path)


def verify_inception_weights(path: str | Path) -> Path:
    """Return ``path`` if it is the standard FID Inception file (size and SHA-256), else raise:
    torch-fidelity unpickles it, so any other file is refused before torch opens it."""
    path = Path(path)
    if not path.is_file():
        raise GradcheckError(f"Inception weights {path} not found (from --inception-weights or "
                             f"{INCEPTION_ENV})")
    size = path.stat().st_size
    digest = hashlib.sha256()
    if size == INCEPTION_SIZE:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    if size != INCEPTION_SIZE or digest.hexdigest() != INCEPTION_SHA256:
        raise GradcheckError(
            f"refusing Inception weights {path}: not the standard FID file "
            f"pt_inception-2015-12-05-6726825d.pth ({INCEPTION_SIZE} bytes, SHA-256 "
            f"{INCEPTION_SHA256}); torch-fidelity unpickles it, so no other file is loaded")
    return path


def make_extractor(
    extractor: str, judge: nn.Module, inception_weights: str | Path | None, device: torch.device,
) -> tuple[FeatureExtractorBase, str, str | None]:
    """(feature extractor on ``device``, its name, verified Inception SHA-256 or None); ``auto``
    picks Inception-v3 when weights are named (option or environment), else the judge."""
    check_choice("extractor", extractor, EXTRACTORS)
    weights = resolve_inception_weights(inception_weights)
    if extractor == "inception" and weights is None:
        raise GradcheckError("--extractor inception needs the FID Inception weights: pass "
                             f"--inception-weights PATH or set {INCEPTION_ENV} (nothing is "
                             "downloaded)")
    if extractor == "judge" or (extractor == "auto" and weights is None):
        fe = create_feature_extractor(
            JUDGE_EXTRACTOR, ["1024"], cuda=False, judge=judge, verbose=False
        )
        return fe.to(device), JUDGE_EXTRACTOR, None
    weights = verify_inception_weights(weights)
    fe = create_feature_extractor(
        INCEPTION_EXTRACTOR, ["2048"], cuda=False, feature_extractor_weights_path=str(weights),
        verbose=False,
    )
    return fe.to(device), INCEPTION_EXTRACTOR, INCEPTION_SHA256


@torch.inference_mode()
def extract_features(
    images: np.ndarray, extractor: FeatureExtractorBase, batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> features (N, D) float64 on the CPU, batch-independent."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[i : i + batch_size]))  # copy: may be a memmap
        batch = batch.permute(0, 3, 1, 2).to(device)
        out.append(extractor(batch)[0].double().cpu())
    return torch.cat(out)


# ---- Metrics on features (torch-fidelity), and their intervals ----------------------------------


def features_to_fid(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """Fréchet distance of two feature sets (N1, D), (N2, D) via torch-fidelity."""
    stats_1 = fid_features_to_statistics(features_1.double().cpu())
    stats_2 = fid_features_to_statistics(features_2.double().cpu())
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def features_to_kid(
    features_1: torch.Tensor, features_2: torch.Tensor, subset_size: int,
    subsets: int = KID_SUBSETS, seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) of KID over ``subsets`` random subsets of ``subset_size`` (torch-fidelity); the
    std is NaN when both subsets are whole sets (docs/metrics.md, "Interval details")."""
    out = kid_features_to_metric(
        features_1.double().cpu(), features_2.double().cpu(), kid_subsets=subsets,
        kid_subset_size=subset_size, rng_seed=seed, verbose=False,
    )
    whole = subset_size == len(features_1) == len(features_2)
    return float(out[KEY_METRIC_KID_MEAN]), math.nan if whole else float(out[KEY_METRIC_KID_STD])


def features_to_precision_recall(
    generated: torch.Tensor, real: torch.Tensor, neighborhood: int = PRC_NEIGHBORHOOD
) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds (torch-fidelity, full distance matrix)."""
    out = prc_features_to_metric(
        generated.double().cpu(), real.double().cpu(), prc_neighborhood=neighborhood,
        save_cpu_ram=False, verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def proportion_interval(correct: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Exact Clopper-Pearson interval of the share of True in a bool vector (N,) (metrics.md)."""
    from scipy.stats import binomtest  # scipy comes with scikit-learn

    correct = np.asarray(correct, dtype=bool)
    if len(correct) == 0:
        return math.nan, math.nan
    ci = binomtest(int(correct.sum()), len(correct)).proportion_ci(level, method="exact")
    return float(ci.low), float(ci.high)


def _mmd2_unbiased_resampled(
    k_11: np.ndarray, k_22: np.ndarray, k_12: np.ndarray, i: np.ndarray, j: np.ndarray
) -> float:
    """Unbiased MMD² of resampled index sets without pairs repeating a sample (docs/metrics.md)."""
    within_1 = k_11[np.ix_(i, i)][i[:, None] != i[None, :]]
    within_2 = k_22[np.ix_(j, j)][j[:, None] != j[None, :]]
    if within_1.size == 0 or within_2.size == 0:
        return math.nan
    return float(within_1.mean() + within_2.mean() - 2 * k_12[np.ix_(i, j)].mean())


def bootstrap_kid(
    features_1: torch.Tensor, features_2: torch.Tensor, n_bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% two-sample bootstrap interval of KID (full-set unbiased MMD², cubic kernel)."""
    f1, f2 = features_1.double().cpu().numpy(), features_2.double().cpu().numpy()
    if len(f1) < 2 or len(f2) < 2:
        return math.nan, math.nan
    k_11, k_22, k_12 = kernel_poly(f1, f1), kernel_poly(f2, f2), kernel_poly(f1, f2)
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased_resampled(
            k_11, k_22, k_12, rng.integers(0, len(f1), len(f1)), rng.integers(0, len(f2), len(f2))
        )
        for _ in range(n_bootstrap)
    ]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def seed_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% Student-t interval of the mean over runs that differ only in seed;
    one value gives (value, nan, nan), a NaN among them NaN bounds."""
    from scipy.stats import t as student_t  # scipy comes with scikit-learn

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise GradcheckError("seed_interval needs at least one value")
    mean = float(v.mean())
    if v.size < 2 or not np.isfinite(v).all():
        return mean, math.nan, math.nan
    half = float(student_t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


# ---- The paper protocol -------------------------------------------------------------------------


REFERENCE_SPLIT = "test"  # not the paper's training images (why: docs/metrics.md)


def reference_images(
    data_root: str | Path, target: int, n_reference: int = 64, reference_seed: int = 0
) -> np.ndarray:
    """``n_reference`` seeded held-out images (n, H, W, 3) uint8 of class ``target``."""
    from gradcheck.data.sportballs import load_split

    images, labels = load_split(data_root, REFERENCE_SPLIT)
    pool = np.flatnonzero(np.asarray(labels) == target)
    if len(pool) < n_reference:
        raise GradcheckError(f"n_reference {n_reference} exceeds the {len(pool)} {REFERENCE_SPLIT} "
                             f"images of class {target} ({CLASS_NAMES[target]}) in {data_root}")
    # Sorted after drawing: the set, not its order, is what the seed fixes; memmap reads in order.
    chosen = np.sort(np.random.default_rng(reference_seed).choice(pool, n_reference, replace=False))
    return np.asarray(images[chosen])


@torch.inference_mode()
def classifier_correct(
    model: nn.Module, images: np.ndarray, target: int, batch_size: int = 64
) -> np.ndarray:
    """Whether ``model`` (t = 0) assigns each uint8 image (N, H, W, 3) to ``target``: bool (N,)."""
    pred, _ = classify(model, torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2),
                       batch_size)
    return (pred == target).numpy()


def _check_images(samples: np.ndarray) -> None:
    if not isinstance(samples, np.ndarray) or samples.dtype != np.uint8 or samples.ndim != 4 \
            or samples.shape[-1] != 3 or len(samples) == 0:
        shape = getattr(samples, "shape", None)
        dtype = getattr(samples, "dtype", type(samples).__name__)
        raise GradcheckError(f"samples must be a non-empty uint8 array (N, H, W, 3), got {dtype} "
                             f"{shape}")


def load_judge(
    judge: str | Path | None, device: torch.device, image_size: int | None = None
) -> tuple[nn.Module, Path]:
    """The judge from its folder (default the shipped one), checked against ``image_size``."""
    folder = Path(judge) if judge is not None else default_classifier("judge")
    if not (folder / "model.safetensors").is_file():
        raise GradcheckError(f"judge checkpoint not found in {folder}; pass --judge FOLDER or "
                             "train one with `gradcheck train-classifier --kind judge`")
    model, config = load_classifier(folder, device)
    if config.get("arch") != JUDGE_ARCH:
        raise GradcheckError(f"judge {folder} is a {config.get('arch')}; the judge must be a "
                             f"{JUDGE_ARCH}, an architecture that never guides")
    if image_size is not None:
        check_image_size(config, image_size, f"judge {folder}", "the samples are")
    return model, folder


def _notes(extractor: str, n: int, m: int, dim: int, kid_subset: int) -> str:
    parts = [f"{extractor} features (dim {dim}), N={n} samples vs {m} references"]
    if min(n, m) - 1 < dim:
        parts.append(f"FID at N={n} is rank-deficient (covariance rank <= {min(n, m) - 1} < "
                     f"{dim}) and biased upward; compare FID only at equal N and extractor")
    parts.append(f"KID (subset {kid_subset}) is unbiased; kid_ci is a two-sample bootstrap")
    if extractor == JUDGE_EXTRACTOR:
        parts.append("judge features are not Inception features: not comparable with published "
                     "FIDs")
    if n < PRC_NEIGHBORHOOD + 1 or m < PRC_NEIGHBORHOOD + 1:
        parts.append(f"precision/recall need more than {PRC_NEIGHBORHOOD} images per set: NaN")
    return "; ".join(parts)


def evaluate_samples(
    samples: np.ndarray, target: int, *, guiding: tuple[nn.Module, dict] | None,
    judge: str | Path | None, data_root: str | Path, n_reference: int = 64,
    reference_seed: int = 0, extractor: str = "auto", inception_weights: str | Path | None = None,
    device: str = "auto", batch_size: int = 64, kid_subset_size: int | None = None,
    n_bootstrap: int = 1000, bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """All docs/metrics.md metrics of uint8 samples (N, H, W, 3) of class ``target``: a flat dict.
    ``guiding`` is the (model, config) that guided, None for the oracle (accuracy_guiding NaN)."""
    start = time.perf_counter()
    _check_images(samples)
    check_choice("target", target, range(len(CLASS_NAMES)))
    check_positive("batch_size", batch_size)
    check_positive("n_bootstrap", n_bootstrap)
    check_seed(reference_seed, "reference_seed")
    check_seed(bootstrap_seed, "bootstrap_seed")
    if n_reference < 2:
        raise GradcheckError(f"n_reference must be >= 2, got {n_reference}")
    n = len(samples)
    subset = min(n, n_reference) if kid_subset_size is None else kid_subset_size
    if n >= 2 and not 2 <= subset <= min(n, n_reference):
        raise GradcheckError(f"kid_subset_size {subset} must lie in 2..{min(n, n_reference)} "
                             f"(N={n} samples, {n_reference} references)")
    dev = resolve_device(device)
    judge_model, judge_folder = load_judge(judge, dev, samples.shape[1])
    fe, fe_name, inception_sha = make_extractor(extractor, judge_model, inception_weights, dev)

    reference = reference_images(data_root, target, n_reference, reference_seed)
    if reference.shape[1:] != samples.shape[1:]:
        raise GradcheckError(f"samples are {samples.shape[1:3]} images but the data set in "
                             f"{data_root} has {reference.shape[1:3]}")
    f_gen = extract_features(samples, fe, batch_size, dev)
    f_ref = extract_features(reference, fe, batch_size, dev)

    nan = math.nan
    fid = features_to_fid(f_gen, f_ref) if n >= 2 else nan
    kid_mean, kid_std = features_to_kid(f_gen, f_ref, subset) if n >= 2 else (nan, nan)
    kid_low, kid_high = bootstrap_kid(f_gen, f_ref, n_bootstrap, bootstrap_seed)
    prc_ok = min(n, n_reference) > PRC_NEIGHBORHOOD
    precision, recall = features_to_precision_recall(f_gen, f_ref) if prc_ok else (nan, nan)

    judge_correct = classifier_correct(judge_model, samples, target, batch_size)
    acc_judge = float(judge_correct.mean())
    judge_low, judge_high = proportion_interval(judge_correct)
    if guiding is None:
        acc_guiding, guiding_low, guiding_high = nan, nan, nan
    else:
        guiding_correct = classifier_correct(guiding[0], samples, target, batch_size)
        acc_guiding = float(guiding_correct.mean())
        guiding_low, guiding_high = proportion_interval(guiding_correct)

    return {
        "target": int(target), "target_name": CLASS_NAMES[target], "n_samples": n,
        "n_reference": int(n_reference), "reference_seed": int(reference_seed),
        "reference_split": REFERENCE_SPLIT, "extractor": fe_name,
        "feature_dim": int(f_gen.shape[1]), "inception_weights_sha256": inception_sha,
        "fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": int(subset),
        "kid_subsets": KID_SUBSETS, "kid_ci_low": kid_low, "kid_ci_high": kid_high,
        "precision": precision, "recall": recall, "prc_neighborhood": PRC_NEIGHBORHOOD,
        "accuracy_guiding": acc_guiding, "accuracy_guiding_ci_low": guiding_low,
        "accuracy_guiding_ci_high": guiding_high,
        "accuracy_judge": acc_judge, "accuracy_judge_ci_low": judge_low,
        "accuracy_judge_ci_high": judge_high, "accuracy_interval": "exact Clopper-Pearson 95%",
        "n_bootstrap": int(n_bootstrap), "bootstrap_seed": int(bootstrap_seed),
        "judge": str(judge_folder), "metrics_device": str(dev),
        "metrics_time_s": time.perf_counter() - start,
        "torch_fidelity": torch_fidelity.__version__,
        "notes": _notes(fe_name, n, n_reference, int(f_gen.shape[1]), subset),
    }


# ---- Run folders --------------------------------------------------------------------------------


def write_metrics(run_folder: str | Path, row: dict[str, Any]) -> None:
    """Write ``metrics.json`` and a one-row ``metrics.parquet`` atomically."""
    folder = Path(run_folder)
    text = strict_json(row)
    with atomic_output_file(folder / "metrics.json", overwrite=True) as tmp:
        tmp.write_text(text)
    write_parquet(pd.DataFrame([row]), folder / "metrics.parquet",
                  run_metadata(torch.device(row.get("metrics_device", "cpu"))))


def _guiding_classifier(
    name: str | None, device: torch.device, checkpoints: str | None = None
) -> tuple[nn.Module, dict] | None:
    """The classifier that guided a run; a kind is looked up in the set the run recorded."""
    if name is None or name == "oracle":
        return None
    folder = default_classifier(name, checkpoints) if name in GUIDING_KINDS else Path(name)
    return load_classifier(folder, device)


def recompute_run_metrics(run_folder: str | Path, **overrides: Any) -> dict[str, Any]:
    """Recompute a run's metrics from config.json and samples.npy, rewrite its metrics files and
    return the new row; ``overrides``: :data:`RECOMPUTE_OPTIONS` (default: as recorded)."""
    folder = Path(run_folder)
    unknown = sorted(set(overrides) - set(RECOMPUTE_OPTIONS))
    if unknown:
        raise GradcheckError(f"unknown metrics option(s) {', '.join(unknown)}; choose from: "
                             f"{', '.join(RECOMPUTE_OPTIONS)}")
    config = load_json(folder / "config.json")
    if not (folder / "samples.npy").is_file():
        raise GradcheckError(f"missing {folder / 'samples.npy'}; is {folder} a run folder?")
    samples = np.load(folder / "samples.npy", allow_pickle=False)
    old = load_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}

    options: dict[str, Any] = {
        "judge": config.get("judge"),
        "data_root": config.get("data_root") or default_data_root(),
        **{k: old[k] for k in ("n_reference", "reference_seed") if k in old},
        **{k: v for k, v in overrides.items() if v is not None},
    }
    device = resolve_device(options.get("device", "auto"))
    recorded_set = (config.get("run_metadata") or {}).get("checkpoints")
    guiding = _guiding_classifier(config.get("classifier"), device, recorded_set)
    row = evaluate_samples(samples, int(config["target"]), guiding=guiding, **options)

    identity = {k: config[k] for k in RUN_IDENTITY_FIELDS if k in config}
    identity.setdefault("run_id", config.get("run_id", folder.name))
    # Old keys other than the metrics (e.g. the sampler's own summaries) are kept as they were.
    merged = {**identity, **old, **row}
    write_metrics(folder, merged)
    return merged
