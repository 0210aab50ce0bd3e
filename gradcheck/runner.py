"""`gradcheck run`: resolve a RunConfig, load the models, sample, and write the run folder
(docs/formats.md) atomically: an error or Ctrl-C leaves nothing behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from tqdm.auto import tqdm

from gradcheck import CLASS_NAMES
from gradcheck import columns as col
from gradcheck.config import RunConfig, config_to_dict
from gradcheck.guidance import LOG_PROBS, ClassifierGuidance
from gradcheck.models import GUIDING_KINDS, check_image_size, load_classifier, load_ddpm
from gradcheck.numerics import NetworkCalls
from gradcheck.paths import (
    PAPER_SET,
    checkpoint_set_image_size,
    checkpoint_set_name,
    data_root_for,
    default_classifier,
    default_data_root,
    default_ddpm,
)
from gradcheck.recorder import RECORD_VECTORS, StepRecorder, expected_vector_bytes
from gradcheck.sampler import (
    NORMALIZE_TO,
    GuidanceConfig,
    Observer,
    check_sampling_args,
    check_scale,
    sample_configs,
)
from gradcheck.stabilizers import check_stabilizer
from gradcheck.utils import (
    GradcheckError,
    atomic_output_dir,
    check_choice,
    check_folder_name,
    check_seed,
    from_uint8,
    resolve_device,
    run_metadata,
    sample_generators,
    save_image_grid,
    save_json,
    to_uint8,
)

log = logging.getLogger(__name__)

SAMPLES_PER_ROW = 8
"""Samples per row of a run's samples.png (records read their samples back from it)."""

CLASSIFIER_CHOICES = (*GUIDING_KINDS, "oracle")
PROTOCOLS = ("auto", "paper", "reduced")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "auto")
SHARED_FIELDS = ("num_samples", "batch_size", "steps", "seed", "device", "ddpm", "judge",
                 "data_root", "precision", "net_batch", "compile")
"""Fields that configurations sampled together (:func:`run_many`) must share."""
NOT_HASHED = ("batch_size", "protocol")
"""Fields that never change a run's results (the sizes they resolve to are hashed). net_batch
stays hashed: a different row count may round differently (numerics.NetworkCalls)."""
RESULTS_VERSION = 4
"""Hashed into every run id; raised when the code changes what every run computes, so that no
run made before is resumed as if made now. 2: D5 flags only an exactly-zero or non-finite h
(runs before it discarded ||h|| < 1e-12), and D3's backward passes run on a cotangent scaled
per sample (guidance.logit_cotangent). 3: g_t, the stabiliser and D5 run in float64
(guidance.unscale), where version 2 rounded gradients past a margin of about 100 to 0, and norms
and cosines are exact for float64's tiny gradients (guidance.flat_norm). 4: past a margin of
about 708 D3's cotangent comes from its log-domain closed form, and plain guidance applies g_t's
direction where g_t is below float64's range (sampler.d5_input): version 3 left such steps
unguided (the oracle's, at low t) and lost digits of the cotangent at margins of 708-745."""
PAPER_SIZE = (64, 1000)  # GradCheck §3.4: 64 samples, T = 1000 steps
CPU_SIZE = (8, 1000)  # auto without a GPU: the paper's full chain, fewer samples (minutes)
REDUCED_SIZE = (8, 50)  # opt-in only: a respaced chain, for trying the tool, not for numbers


# ---- config resolution ------------------------------------------------------------------------


def parse_target(value: str | int) -> int:
    """A class name (baseball, ...) or index 0-3 -> the class index."""
    text = str(value).strip().lower()
    if text in CLASS_NAMES:
        return CLASS_NAMES.index(text)
    if text.isdigit() and int(text) < len(CLASS_NAMES):
        return int(text)
    raise GradcheckError(f"unknown target {value!r}; choose one of: {', '.join(CLASS_NAMES)} "
                         f"or 0-{len(CLASS_NAMES) - 1}")


def validate_config(cfg: RunConfig) -> None:
    """Raise a GradcheckError for any field the run cannot honour (before loading anything)."""
    _classifier_folder(cfg.classifier)
    check_stabilizer(cfg.stabilizer)
    check_seed(cfg.seed)
    if isinstance(cfg.target, str):
        parse_target(cfg.target)
    elif isinstance(cfg.target, bool) or not isinstance(cfg.target, int):
        raise GradcheckError(f"target must be a class name or index, got {cfg.target!r}")
    elif not 0 <= cfg.target < len(CLASS_NAMES):
        raise GradcheckError(f"unknown target {cfg.target}; choose 0-{len(CLASS_NAMES) - 1} "
                             f"({', '.join(CLASS_NAMES)})")
    check_scale(cfg.scale)
    for name in ("num_samples", "batch_size", "steps"):
        value = getattr(cfg, name)
        if value is None and name != "batch_size":
            continue  # the protocol's (resolve_config)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GradcheckError(f"{name} must be an integer >= 1, got {value!r}")
    check_choice("record_vectors", cfg.record_vectors, RECORD_VECTORS)
    check_choice("protocol", cfg.protocol, PROTOCOLS)
    if cfg.precision is not None:
        check_choice("precision", cfg.precision, PRECISIONS)
    check_choice("normalize_to", cfg.normalize_to, NORMALIZE_TO)
    check_choice("log_prob", cfg.log_prob, LOG_PROBS)
    if not isinstance(cfg.diffusion_time, bool):
        raise GradcheckError(f"diffusion_time must be True or False, got {cfg.diffusion_time!r}")
    if cfg.net_batch is not None and (isinstance(cfg.net_batch, bool)
                                      or not isinstance(cfg.net_batch, int) or cfg.net_batch < 1):
        raise GradcheckError(f"net_batch must be an integer >= 1, got {cfg.net_batch!r}")
    if cfg.classifier == "oracle" and cfg.x0_estimate:
        raise GradcheckError("--x0-estimate does not apply to --classifier oracle: the oracle's "
                             "gradient is exact on x_t itself (D8)")


def resolve_config(cfg: RunConfig) -> RunConfig:
    """The config a run actually uses: sizes (``paper`` 64 x 1000, ``reduced`` 8 x 50, ``auto``
    the sizes given, else 64 x 1000 on a GPU and :data:`CPU_SIZE` without), precision and net
    batch filled in, a class name as ``target`` turned into its index."""
    validate_config(cfg)
    if isinstance(cfg.target, str):
        cfg = dataclasses.replace(cfg, target=parse_target(cfg.target))
    gpu = resolve_device(cfg.device).type == "cuda"
    if cfg.protocol == "paper":
        sizes = PAPER_SIZE
    elif cfg.protocol == "reduced":
        sizes = REDUCED_SIZE
    else:
        default = PAPER_SIZE if gpu else CPU_SIZE
        sizes = (cfg.num_samples or default[0], cfg.steps or default[1])
    precision = cfg.precision or ("fp32" if gpu else "auto")
    if precision == "tf32" and not gpu:
        raise GradcheckError("precision tf32 needs a CUDA device; use fp32, bf16, fp16 or auto")
    # 64 rows per call suit GPU and CPU (numerics.NetworkCalls); a CPU pads no further than N.
    net_batch = cfg.net_batch or (64 if gpu else min(64, sizes[0]))
    return dataclasses.replace(cfg, num_samples=sizes[0], steps=sizes[1], precision=precision,
                               net_batch=net_batch)


def shared_key(cfg: RunConfig) -> tuple:
    """What configurations must share to be sampled together (:func:`run_many`)."""
    cfg = resolve_config(cfg)
    return tuple(getattr(cfg, f) for f in SHARED_FIELDS)


def _hash_view(cfg: RunConfig) -> dict[str, Any]:
    """The config as hashed into run ids: shipped checkpoint paths by role, not by location."""
    d = config_to_dict(cfg)
    for field in NOT_HASHED:
        d.pop(field)
    d["results_version"] = RESULTS_VERSION
    # D4' in diffusion time changes nothing without a stabiliser's memory or respacing.
    if cfg.steps == PAPER_SIZE[1] or cfg.stabilizer == "none":
        d.pop("diffusion_time")
    name = checkpoint_set_name()
    shipped = "<shipped {}>" if name == PAPER_SET else f"<shipped {Path(name).name} {{}}>"
    if d["ddpm"] == str(default_ddpm()):
        d["ddpm"] = shipped.format("ddpm")
    if d["judge"] == str(default_classifier("judge")):
        d["judge"] = shipped.format("judge")
    if d["data_root"] == str(default_data_root()):  # GRADCHECK_DATA moves it, same data set
        d["data_root"] = data_root_for(checkpoint_set_image_size())
    return d


def default_run_id(cfg: RunConfig) -> str:
    """A readable, deterministic run id: ``nonrobust-x0-adam-s1-t0-n64-k1000-seed0-<hash8>``."""
    cfg = resolve_config(cfg)
    if cfg.classifier in CLASSIFIER_CHOICES:
        clf = cfg.classifier
    else:
        clf = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(cfg.classifier).name or "classifier")
    parts = [clf, "x0" if cfg.x0_estimate else "xt", cfg.stabilizer]
    if not cfg.normalize:
        parts.append("nonorm")
    elif cfg.normalize_to != "score":
        parts.append(f"norm{cfg.normalize_to}")
    if not cfg.diffusion_time and cfg.stabilizer != "none":
        parts.append("steptime")
    parts += [f"s{cfg.scale:g}", f"t{cfg.target}", f"n{cfg.num_samples}", f"k{cfg.steps}",
              f"seed{cfg.seed}"]
    digest = hashlib.sha256(json.dumps(_hash_view(cfg), sort_keys=True).encode()).hexdigest()
    return "-".join([*parts, digest[:8]])


# ---- models ------------------------------------------------------------------------------------


def _classifier_folder(classifier: str) -> Path | None:
    """The folder of a guiding classifier name or path; None for the oracle."""
    if classifier == "oracle":
        return None
    if classifier in GUIDING_KINDS:
        return default_classifier(classifier)
    folder = Path(classifier)
    if folder.is_dir():
        return folder
    raise GradcheckError(f"unknown classifier {classifier!r}; choose one of: "
                         f"{', '.join(CLASSIFIER_CHOICES)}, or pass a classifier folder "
                         "(config.json + model.safetensors)")


def _check_not_the_judge(cfg: RunConfig, config: dict[str, Any]) -> None:
    """Refuse guidance by a judge (kind 'judge', or the run's own judge folder; docs/metrics.md)."""
    folder = _classifier_folder(cfg.classifier)
    if config.get("kind") == "judge":
        raise GradcheckError(f"classifier {str(folder)!r} is a judge (kind 'judge'), which grades "
                             "samples and never guides; choose one of: "
                             f"{', '.join(CLASSIFIER_CHOICES)}, or another classifier folder")
    if Path(cfg.judge).is_dir() and folder.resolve() == Path(cfg.judge).resolve():
        raise GradcheckError(f"classifier {str(folder)!r} is also the run's judge; the judge "
                             "must be independent of the guiding classifier (pass another --judge)")


def _check_ddpm_folder(folder: str) -> None:
    if folder == str(default_ddpm()) and not Path(folder).is_dir():
        raise GradcheckError(
            f"the shipped reference DDPM is missing at {folder}; it comes with the repository's "
            "checkpoints (set GRADCHECK_CHECKPOINTS if they live elsewhere), or train one with "
            "`gradcheck train-ddpm` and pass --ddpm FOLDER")


def _ddpm_configs(folder: str) -> tuple[dict[str, Any], DDPMScheduler]:
    """(UNet config, scheduler) of a DDPM folder from its JSON files alone: no weights read."""
    _check_ddpm_folder(folder)
    unet_config = Path(folder) / "unet" / "config.json"
    if not (Path(folder) / "model_index.json").is_file() or not unet_config.is_file():
        load_ddpm(folder)  # raises its own clear error for a folder that is not a pipeline
    try:
        return (UNet2DModel.load_config(unet_config.parent),
                DDPMScheduler.from_pretrained(Path(folder) / "scheduler"))
    except (OSError, ValueError) as e:
        raise GradcheckError(f"cannot load DDPM from {folder}: {str(e).splitlines()[0]}") from None


def _load_ddpm(folder: str) -> tuple[UNet2DModel, DDPMScheduler]:
    _check_ddpm_folder(folder)
    return load_ddpm(folder)


def _load_classifier(cfg: RunConfig, device: torch.device) -> tuple[nn.Module, dict]:
    folder = _classifier_folder(cfg.classifier)
    if cfg.classifier in GUIDING_KINDS and not folder.is_dir():
        raise GradcheckError(
            f"the shipped {cfg.classifier} classifier is missing at {folder}; it comes with the "
            "repository's checkpoints (set GRADCHECK_CHECKPOINTS if they live elsewhere), or train "
            f"one with `gradcheck train-classifier --kind {cfg.classifier}` and pass its folder "
            "as --classifier")
    return load_classifier(folder, device)


def _dataset_exists(data_root: str) -> bool:
    from gradcheck.oracle import oracle_available

    return oracle_available(data_root)


def _load_oracle(cfg: RunConfig, scheduler: DDPMScheduler, device: torch.device) -> nn.Module:
    from gradcheck.oracle import EmpiricalOracle

    oracle = EmpiricalOracle.from_data_root(cfg.data_root, scheduler.alphas_cumprod, device)
    return oracle.eval()


def data_second_moment(data_root: str, n: int = 4096) -> float | None:
    """Mean of x_0^2 over the pixels of the first ``n`` training images in [-1, 1] (the
    x_norm_ratio reference: E||x_t||^2 = D (abar_t m2 + 1 - abar_t)); None without data."""
    from gradcheck.data.sportballs import load_split

    if not _dataset_exists(data_root):
        return None
    images, _ = load_split(data_root, "train")
    x = from_uint8(torch.from_numpy(np.array(images[:n])))
    return float(x.square().mean())


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_metrics(cfg: RunConfig, image_size: int) -> bool:
    """Whether metrics will be computed; fails now if the judge or the data set is unfit."""
    if not cfg.metrics:
        return False
    from gradcheck.metrics import load_judge, reference_images

    try:
        load_judge(cfg.judge, torch.device("cpu"), image_size)
        reference_images(cfg.data_root, cfg.target)
    except GradcheckError as e:
        raise GradcheckError(f"{e} (or pass --no-metrics to skip metrics)") from None
    return True


# ---- the run -----------------------------------------------------------------------------------


def run(
    cfg: RunConfig, out: Path = Path("runs"), name: str | None = None, overwrite: bool = False,
    progress: bool = True, observers: Sequence[Observer] = (),
) -> Path:
    """Sample with guidance as ``cfg`` says and write the run folder ``out/<run id>``; return it.

    ``observers`` see every :class:`~gradcheck.sampler.GuidanceStep` besides the recorder.
    """
    return run_many([cfg], out=out, names=[name], overwrite=overwrite, progress=progress,
                    observers=observers)[0]


def run_many(
    cfgs: Sequence[RunConfig], out: Path = Path("runs"), names: Sequence[str | None] | None = None,
    overwrite: bool = False, progress: bool = True, observers: Sequence[Observer] = (),
) -> list[Path]:
    """Several runs that share :data:`SHARED_FIELDS`, sampled together as lanes of one
    :func:`~gradcheck.sampler.sample_configs` call (shared x_T, noise and unguided UNet calls).
    Each run folder equals what :func:`run` writes alone but for ``wall_time_s``, the run's share
    of ``batched_wall_time_s``; folders are written atomically."""
    if not cfgs:
        raise GradcheckError("run_many needs at least one run config")
    names = list(names) if names is not None else [None] * len(cfgs)
    if len(names) != len(cfgs):
        raise GradcheckError(f"got {len(cfgs)} configs but {len(names)} names")
    requested = list(cfgs)
    cfgs = [resolve_config(c) for c in cfgs]
    shared = {f: getattr(cfgs[0], f) for f in SHARED_FIELDS}
    for c in cfgs[1:]:
        differ = [f for f in SHARED_FIELDS if getattr(c, f) != shared[f]]
        if differ:
            raise GradcheckError(f"runs sampled together must share {', '.join(differ)}")
    base = cfgs[0]
    device = resolve_device(base.device)
    if (base.num_samples, base.steps) != (requested[0].num_samples, requested[0].steps):
        log.warning(
            "%s protocol: %d samples x %d sampling steps (--protocol paper gives 64 x 1000; "
            "--num-samples / --steps choose)",
            "no GPU" if requested[0].protocol == "auto" else requested[0].protocol,
            base.num_samples, base.steps,
        )
    run_ids = [n if n is not None else default_run_id(c) for c, n in zip(cfgs, names, strict=True)]
    for run_id in run_ids:
        check_folder_name("run name", run_id)
    if len(set(run_ids)) != len(run_ids):
        raise GradcheckError("runs sampled together need distinct run folder names")
    finals = [Path(out) / run_id for run_id in run_ids]
    for final in finals:
        if final.exists() and not overwrite:
            raise GradcheckError(f"{final} already exists; pass --overwrite to replace it")
    # Fail now, not after sampling, if the folders cannot be written; create nothing yet.
    existing = Path(out)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise GradcheckError(f"cannot write runs to {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GradcheckError(f"cannot write to {out}: {existing} is not writable")

    # Check all that needs no DDPM weights first: configs, classifiers, judge, data set.
    unet_config, scheduler = _ddpm_configs(base.ddpm)
    for c in cfgs:
        check_sampling_args(scheduler, c.steps, c.scale, c.target)
    image_size = int(unet_config["sample_size"])
    models: dict[str, tuple[nn.Module, dict]] = {}  # guiding model and config, by name
    for c in cfgs:
        if c.classifier not in models and c.classifier != "oracle":
            model, model_config = _load_classifier(c, device)
            _check_not_the_judge(c, model_config)
            check_image_size(model_config, image_size, f"classifier {c.classifier}",
                             "the DDPM makes")
            models[c.classifier] = (_frozen(model), model_config)
    checked: dict[tuple, bool] = {}  # judge and reference images: read once, not per run
    for c in cfgs:
        key = (c.metrics, c.judge, c.data_root, c.target)
        if key not in checked:
            checked[key] = _check_metrics(c, image_size)
    with_metrics = [checked[(c.metrics, c.judge, c.data_root, c.target)] for c in cfgs]

    unet, _ = _load_ddpm(base.ddpm)
    net = NetworkCalls.for_precision(base.precision, rows=base.net_batch,
                                     cuda=device.type == "cuda")
    unet = _frozen(unet.to(device))
    sampling_unet = torch.compile(unet) if base.compile else unet
    sources: dict[tuple[str, bool, str], ClassifierGuidance] = {}
    oracle = None
    for c in cfgs:
        if c.classifier == "oracle" and c.classifier not in models:
            oracle = _load_oracle(c, scheduler, device)
            models[c.classifier] = (oracle, {"kind": "oracle"})
        key = (c.classifier, c.x0_estimate, c.log_prob)
        if key not in sources:
            sources[key] = ClassifierGuidance(models[c.classifier][0], x0_estimate=c.x0_estimate,
                                              log_prob=c.log_prob)
    with_oracle = []  # per config: "all", "subset" or None
    for c in cfgs:
        wanted = {True: "all", False: None}.get(c.cos_oracle)
        if c.cos_oracle is None and _dataset_exists(c.data_root):
            # The oracle reads the training set per gradient: hours on a CPU at every step.
            wanted = "all" if device.type == "cuda" else "subset"
            if wanted == "subset":
                log.info("cos_oracle at the vector subset's samples and steps (every sample and "
                         "step on a GPU; --cos-oracle forces that)")
        elif c.cos_oracle is None:
            log.info("cos_oracle is off: no data set at %s for the oracle", c.data_root)
        with_oracle.append(wanted)
    if any(with_oracle) and oracle is None:
        oracle = _load_oracle(base, scheduler, device)

    image_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    size = sum(expected_vector_bytes(c.record_vectors, c.num_samples, c.steps, image_shape)
               for c in cfgs)
    if size:
        (log.warning if size > 1e9 else log.info)(
            "vectors.safetensors: %.1f MB expected in all (held in memory until written)",
            size / 1e6)
    configs = [{**config_to_dict(c), "results_version": RESULTS_VERSION, "run_id": run_id}
               for c, run_id in zip(cfgs, run_ids, strict=True)]
    meta = run_metadata(device)
    recorders = [StepRecorder(run_id, c.num_samples, c.steps, c.record_vectors,
                              oracle=oracle if wanted else None, oracle_subset=wanted == "subset")
                 for c, run_id, wanted in zip(cfgs, run_ids, with_oracle, strict=True)]
    n_batches = math.ceil(base.num_samples / base.batch_size)
    m2 = data_second_moment(base.data_root)  # x_norm_ratio's reference (NaN without data)

    desc = run_ids[0] if len(cfgs) == 1 else f"{len(cfgs)} runs, seed {base.seed}"
    bar = tqdm(total=n_batches * base.steps, unit="step", desc=desc, disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    images: list[list[torch.Tensor]] = [[] for _ in cfgs]
    try:
        for first in range(0, base.num_samples, base.batch_size):
            indices = list(range(first, min(first + base.batch_size, base.num_samples)))
            lanes = [
                GuidanceConfig(
                    guidance=sources[(c.classifier, c.x0_estimate, c.log_prob)], target=c.target,
                    scale=c.scale, normalize=c.normalize, stabilizer=c.stabilizer,
                    diffusion_time=c.diffusion_time, normalize_to=c.normalize_to,
                    observers=(rec, *observers) + ((lambda _: bar.update(1),) if i == 0
                                                   else ()))
                for i, (c, rec) in enumerate(zip(cfgs, recorders, strict=True))
            ]
            xs = sample_configs(sampling_unet, scheduler, lanes,
                                sample_generators(base.seed, indices), steps=base.steps,
                                sample_indices=indices, net=net, data_second_moment=m2)
            for store, x in zip(images, xs, strict=True):
                store.append(to_uint8(x).permute(0, 2, 3, 1))
    finally:
        bar.close()
    wall_time = time.perf_counter() - start
    # One by one: an error in one run's metrics keeps the runs before it.
    for i, c in enumerate(cfgs):
        with atomic_output_dir(finals[i], overwrite=overwrite) as tmp:
            _write_run(tmp, c, configs[i], meta, recorders[i], torch.cat(images[i]).numpy(),
                       wall_time, len(cfgs),
                       guiding=None if c.classifier == "oracle" else models[c.classifier],
                       with_metrics=with_metrics[i], device=device)
    return finals


def _write_run(
    tmp: Path, cfg: RunConfig, config: dict[str, Any], meta: dict[str, Any],
    recorder: StepRecorder, samples: np.ndarray, wall_time: float, batched_runs: int,
    guiding: tuple[nn.Module, dict] | None, with_metrics: bool, device: torch.device,
) -> None:
    """Write one run folder's files (docs/formats.md) into its temporary folder."""
    save_json(tmp / "config.json", {**config, "run_metadata": meta})
    np.save(tmp / "samples.npy", samples)
    save_image_grid(torch.from_numpy(samples).permute(0, 3, 1, 2), tmp / "samples.png",
                    nrow=SAMPLES_PER_ROW)
    recorder.write_steps(tmp / "steps.parquet", config)
    recorder.write_vectors(tmp / "vectors.safetensors", {"config": json.dumps(config)})

    steps = recorder.frame()
    vanished = int(steps[col.GRAD_VANISHED].sum())
    if vanished:
        log.warning("%s: %d of %d (sample, step) gradients vanished (grad_vanished; no guidance "
                    "applied there)", config["run_id"], vanished, len(steps))
    row = {
        "run_id": config["run_id"],
        **{k: config[k] for k in ("classifier", "x0_estimate", "stabilizer", "normalize",
                                  "normalize_to", "diffusion_time", "log_prob", "scale", "target",
                                  "seed", "steps", "num_samples")},
        # Runs sampled together share one wall time: each records its share, so sums add up.
        "wall_time_s": wall_time / batched_runs, "batched_runs": batched_runs,
        "batched_wall_time_s": wall_time,
        "image_size": int(samples.shape[1]),  # the report marks sizes other than the paper's
        "hardware": meta["hardware"],
        "mean_cos_prev_raw": _nanmean(steps[col.COS_PREV_RAW]),
        "mean_cos_prev_applied": _nanmean(steps[col.COS_PREV_APPLIED]),
        "mean_cos_prev_null": _nanmean(steps[col.COS_PREV_NULL]),  # D7': the stabiliser alone
        "mean_cos_oracle": _nanmean(steps[col.COS_ORACLE]),  # D8, over the rows that have it
        "n_cos_oracle": int(steps[col.COS_ORACLE].notna().sum()),
        "max_x_norm_ratio": float(steps[col.X_NORM_RATIO].max()),
        "grad_vanished_frac": vanished / max(len(steps), 1),
    }
    if with_metrics:
        from gradcheck.metrics import evaluate_samples

        row.update(evaluate_samples(samples, cfg.target, guiding=guiding, judge=cfg.judge,
                                    data_root=cfg.data_root, device=str(device)))
    save_json(tmp / "metrics.json", row)
    pd.DataFrame([row]).to_parquet(tmp / "metrics.parquet", index=False)


def _nanmean(values: pd.Series) -> float:
    v = values.to_numpy(dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


# ---- the closing summary -------------------------------------------------------------------------


def _fmt(row: dict[str, Any], key: str, spec: str = ".3g", pct: bool = False) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if pct:
        lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        ci = f" [{lo:.1%}, {hi:.1%}]" if isinstance(lo, float) and isinstance(hi, float) and \
            math.isfinite(lo) and math.isfinite(hi) else ""
        return f"{v:.1%}{ci}"
    return format(v, spec)


def summary_table(row: dict[str, Any]) -> str:
    """The closing summary of a run from its metrics.json row, one quantity per line."""
    target = row.get("target")
    lines = [
        ("run", str(row.get("run_id"))),
        ("guidance", f"{row.get('classifier')}, x0-estimate {row.get('x0_estimate')}, "
                     f"stabilizer {row.get('stabilizer')}, normalize {row.get('normalize')}, "
                     f"scale {row.get('scale')}"),
        ("target", f"{target} ({CLASS_NAMES[target]})" if isinstance(target, int) else "n/a"),
        ("samples", f"{row.get('num_samples')} x {row.get('steps')} steps, seed {row.get('seed')}, "
                    f"{_fmt(row, 'wall_time_s', '.1f')} s on {row.get('hardware')}"),
    ]
    if "accuracy_judge" in row:
        lines += [
            ("accuracy guiding", _fmt(row, "accuracy_guiding", pct=True)),
            ("accuracy judge", _fmt(row, "accuracy_judge", pct=True)),
            ("FID", f"{_fmt(row, 'fid')}  ({row.get('extractor')} features, "
                    f"N={row.get('n_samples')} vs {row.get('n_reference')})"),
            ("KID", f"{_fmt(row, 'kid_mean')} [{_fmt(row, 'kid_ci_low')}, "
                    f"{_fmt(row, 'kid_ci_high')}]  (95% bootstrap; same features and N)"),
        ]
    else:
        lines.append(("metrics", "not computed (--no-metrics)"))
    lines += [
        ("mean cos_prev raw", _fmt(row, "mean_cos_prev_raw", ".3f")),
        ("mean cos_prev applied", f"{_fmt(row, 'mean_cos_prev_applied', '.3f')}  (null "
                                  f"baseline, the stabiliser on random gradients: "
                                  f"{_fmt(row, 'mean_cos_prev_null', '.3f')})"),
        ("mean cos_oracle", f"{_fmt(row, 'mean_cos_oracle', '.3f')}  (over "
                            f"{row.get('n_cos_oracle', 0)} (sample, step) pairs; 0 = unrelated "
                            "to the exact gradient)"),
        ("max ||x_t|| / expected", _fmt(row, "max_x_norm_ratio", ".2f")),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
