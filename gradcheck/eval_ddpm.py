"""Unconditional sample quality of a DDPM folder: white borders, judge classes, FID/KID, and the
mean-colour slope that diagnoses tinted backgrounds (see :func:`mean_colour_slope`).

``evaluate_ddpm`` writes ``eval.json`` (summary, config, versions), ``eval.parquet`` (one row
per sample) and ``samples.png`` (the first 64 samples) into ``--out`` (default ``FOLDER/eval/``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from gradcheck import CLASS_NAMES
from gradcheck.config import EvalDDPMConfig, config_to_dict
from gradcheck.data.sportballs import load_split
from gradcheck.models import check_image_size, classify, load_classifier, load_ddpm
from gradcheck.numerics import cpu_has_native_bf16
from gradcheck.utils import (
    GradcheckError,
    atomic_output_dir,
    check_choice,
    check_fields,
    check_positive,
    check_seed,
    randn_per_sample,
    resolve_device,
    run_metadata,
    sample_generators,
    save_image_grid,
    save_json,
    to_uint8,
)

WHITE_BORDER = 0.95  # mean of the 1-pixel outer border in [0, 1] at or above this: white
CONFIDENT = 0.9  # the judge's max probability at or above this: a confident sample
GRID_SAMPLES = 64
MIXED_PRECISION = ("auto", "bf16", "no")


def sampling_bf16(mixed_precision: str, device: torch.device) -> bool:
    """Whether unguided sampling runs the UNet in bf16 autocast: ``auto`` on a GPU and on a CPU
    with native bf16 (:func:`~gradcheck.numerics.cpu_has_native_bf16`); ``bf16`` always; ``no``
    never."""
    check_choice("mixed_precision", mixed_precision, MIXED_PRECISION)
    if mixed_precision != "auto":
        return mixed_precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


@torch.no_grad()
def sample_images(
    unet: UNet2DModel, scheduler: DDPMScheduler, num_samples: int, steps: int = 1000,
    seed: int = 0, batch_size: int = 250, mixed_precision: str = "auto", progress: bool = False,
) -> torch.Tensor:
    """Unconditional DDPM samples as uint8 (N, 3, H, W) on the CPU; sample i uses only (seed, i).
    ``steps`` < T respaces the chain through ``DDPMScheduler.set_timesteps`` (docs/maths.md)."""
    check_positive("num_samples", num_samples)
    check_positive("batch_size", batch_size)
    T = scheduler.config.num_train_timesteps
    if not 1 <= steps <= T:
        raise GradcheckError(f"steps must lie in 1..{T}, got {steps}")
    device = next(unet.parameters()).device
    sched = DDPMScheduler.from_config(scheduler.config)  # set_timesteps mutates: keep ours private
    sched.set_timesteps(steps, device=device)
    bf16 = sampling_bf16(mixed_precision, device)
    size = unet.config.sample_size
    was_training = unet.training
    unet.eval()
    out = []
    bar = tqdm(total=math.ceil(num_samples / batch_size) * steps, desc="sampling",
               disable=not progress, unit="step")
    for start in range(0, num_samples, batch_size):
        gens = sample_generators(seed, range(start, min(start + batch_size, num_samples)), device)
        x = randn_per_sample((3, size, size), gens, device)
        for t in sched.timesteps:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                eps = unet(x, t).sample
            # One generator per sample again, so the step noise is batch-independent too.
            x = sched.step(eps.float(), t, x, generator=gens).prev_sample
            bar.update()
        out.append(to_uint8(x))
    bar.close()
    unet.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def mean_colour_slope(
    unet: UNet2DModel, scheduler: DDPMScheduler, num_samples: int = 256, seed: int = 0,
    mixed_precision: str = "auto",
) -> float:
    """Least-squares slope of eps_theta's per-channel image mean on that of pure-noise inputs at
    t = T - 1, where E[eps | x_t] is about x_t / sqrt(1 - abar_t): 1 when the model removes the
    noise's mean colour, 0 when it ignores it (its samples keep random background tints)."""
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    x = randn_per_sample((3, size, size), sample_generators(seed, range(num_samples), device),
                         device)
    t = torch.full((num_samples,), scheduler.config.num_train_timesteps - 1, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16,
                        enabled=sampling_bf16(mixed_precision, device)):
        eps = unet(x, t).sample.float()
    m_in, m_out = x.mean(dim=(2, 3)).flatten(), eps.mean(dim=(2, 3)).flatten()
    m_in, m_out = m_in - m_in.mean(), m_out - m_out.mean()
    return float((m_in * m_out).sum() / m_in.square().sum())


def border_means(images: torch.Tensor) -> torch.Tensor:
    """Mean of the 1-pixel outer border in [0, 1], over pixels and channels: uint8 (N, 3, H, W) ->
    (N,)."""
    x = images.float() / 255
    mask = torch.ones(x.shape[-2:], dtype=torch.bool)
    mask[1:-1, 1:-1] = False
    return x[..., mask].mean(dim=(1, 2))


def _fid_kid(
    samples: torch.Tensor, judge: torch.nn.Module | None, cfg: EvalDDPMConfig,
    device: torch.device,
) -> dict[str, Any]:
    """FID/KID of the samples against the whole test split via gradcheck.metrics, or the reason
    they were not computed (under ``fid_skipped``)."""
    from gradcheck import metrics

    if judge is None and metrics.resolve_inception_weights(None) is None:
        return {"fid_skipped": "no feature extractor: pass --judge (judge features) or set "
                               f"{metrics.INCEPTION_ENV}"}
    root = Path(cfg.data_root)
    try:
        reference, _ = load_split(root, "test")
    except (GradcheckError, OSError) as e:
        return {"fid_skipped": f"no test split in {root}: {e}"}
    reference = np.asarray(reference)
    gen = samples.permute(0, 2, 3, 1).numpy()
    if reference.shape[1:] != gen.shape[1:]:
        return {"fid_skipped": f"test images are {reference.shape[1:3]}, samples "
                               f"{gen.shape[1:3]}"}
    fe, fe_name, sha = metrics.make_extractor("auto", judge, None, device)
    f_gen = metrics.extract_features(gen, fe, cfg.batch_size, device)
    f_ref = metrics.extract_features(reference, fe, cfg.batch_size, device)
    n, m = len(f_gen), len(f_ref)
    subset = min(1000, n, m)  # torch-fidelity's default subset size, capped by the set sizes
    kid_mean, kid_std = metrics.features_to_kid(f_gen, f_ref, subset, seed=cfg.seed)
    return {"fid": metrics.features_to_fid(f_gen, f_ref), "kid_mean": kid_mean,
            "kid_std": kid_std, "kid_subset_size": subset, "extractor": fe_name,
            "feature_dim": int(f_gen.shape[1]), "inception_weights_sha256": sha,
            "n_reference": m, "reference": f"{root} test split (all {m} images)"}


def evaluate_ddpm(config: EvalDDPMConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Sample a DDPM folder and measure white borders, judge classes and FID/KID -> summary."""
    cfg = dataclasses.replace(config or EvalDDPMConfig(), **overrides)
    check_fields(cfg, "num_samples", "batch_size")
    check_seed(cfg.seed)
    sampling_bf16(cfg.mixed_precision, torch.device("cpu"))  # checks the choice
    device = resolve_device(cfg.device)
    unet, scheduler = load_ddpm(cfg.folder)
    judge = None
    if cfg.judge is not None:
        judge, judge_config = load_classifier(cfg.judge, device)
        check_image_size(judge_config, unet.config.sample_size, f"judge {cfg.judge}",
                         "the DDPM makes")
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.folder) / "eval"

    from gradcheck.metrics import proportion_interval

    with atomic_output_dir(out, cfg.overwrite) as tmp:
        start = time.perf_counter()
        samples = sample_images(unet.to(device), scheduler, cfg.num_samples, cfg.steps, cfg.seed,
                                cfg.batch_size, cfg.mixed_precision, cfg.progress)
        sampling_s = time.perf_counter() - start

        border = border_means(samples)
        rows = pd.DataFrame({
            "sample": np.arange(cfg.num_samples, dtype=np.int64),
            "border_mean": border.numpy().astype(np.float64),
            "white_border": (border >= WHITE_BORDER).numpy(),
        })
        summary: dict[str, Any] = {
            "num_samples": cfg.num_samples, "steps": cfg.steps,
            "sampling_autocast": "bf16" if sampling_bf16(cfg.mixed_precision, device)
            else "float32",
            "white_border_share": float(rows["white_border"].mean()),
            "white_border_share_ci": list(proportion_interval(rows["white_border"])),
            "border_mean": float(rows["border_mean"].mean()),
            "mean_colour_slope": mean_colour_slope(unet, scheduler, seed=cfg.seed,
                                                   mixed_precision=cfg.mixed_precision),
            "sampling_s": sampling_s,
        }
        if judge is not None:
            pred, maxp = classify(judge, samples, cfg.batch_size)
            rows["pred_class"] = pred.numpy().astype(np.int64)
            rows["class_name"] = [CLASS_NAMES[i] for i in pred.tolist()]
            rows["max_prob"] = maxp.numpy().astype(np.float64)
            rows["confident"] = rows["max_prob"] >= CONFIDENT
            share = np.bincount(rows["pred_class"], minlength=len(CLASS_NAMES)) / len(rows)
            nonzero = share[share > 0]
            summary.update({
                "class_share": dict(zip(CLASS_NAMES, map(float, share), strict=True)),
                "class_share_ci": {c: list(proportion_interval(rows["pred_class"] == i))
                                   for i, c in enumerate(CLASS_NAMES)},
                # 1 = every class equally often, 0 = one class only (docs/scales.md's notes).
                "class_entropy": float(-(nonzero * np.log(nonzero)).sum() / np.log(len(share))),
                "confident_share": float(rows["confident"].mean()),
                "confident_share_ci": list(proportion_interval(rows["confident"])),
                "mean_max_prob": float(rows["max_prob"].mean()),
            })
        summary.update(_fid_kid(samples, judge, cfg, device))

        rows.to_parquet(tmp / "eval.parquet", index=False)
        save_image_grid(samples[:GRID_SAMPLES], tmp / "samples.png")
        save_json(tmp / "eval.json", {**summary, "config": config_to_dict(cfg),
                                      "metadata": run_metadata(device)})
    return {**summary, "out": str(out)}
