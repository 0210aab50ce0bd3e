"""Training of the guiding classifiers and the judge, and their per-timestep evaluation.

Kinds (issue 4):

- ``nonrobust``: clean images (GradCheck: 99.2% validation accuracy).
- ``robust``: GradCheck's meaning: noisy latents ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
  (Ho et al. forward process, computed by ``DDPMScheduler.add_noise``), t uniform over the DDPM's
  timesteps; the network gets no t unless ``time_conditioned``.
- ``adversarial``: Kawar et al. 2023 Eq. 5: noisy latents as above, then untargeted L2 PGD
  (eps 0.5, step 0.083, at most 7 steps, per-sample early stopping); with ``time_conditioned``
  the network also receives t.
- ``judge``: ShuffleNetV2 on clean images with flips and small translations; never guides.

Outputs in ``out/name/classifiers/kind/``: ``config.json``, ``model.safetensors``,
``train_log.parquet`` (one row per epoch) and ``accuracy_by_t.parquet`` (see :func:`evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from tqdm.auto import tqdm

from gradcheck.attacks import pgd
from gradcheck.config import TrainClassifierConfig, config_to_dict
from gradcheck.models import (
    CLASSIFIER_KINDS,
    check_image_size,
    classifier_config,
    classifier_logits,
    load_classifier,
    load_ddpm,
    make_classifier,
    make_scheduler,
    save_classifier,
)
from gradcheck.paths import default_data_root
from gradcheck.utils import (
    GradcheckError,
    atomic_output_dir,
    atomic_output_file,
    check_choice,
    check_fields,
    check_folder_name,
    check_positive,
    check_seed,
    load_json,
    resolve_device,
    run_metadata,
    save_json,
    write_parquet,
)

NOISY_KINDS = ("robust", "adversarial")
EVAL_TIMESTEPS = tuple(range(0, 1000, 50))  # issue 4: t in {0, 50, ..., 950}
BN_IMAGES = 4096  # training inputs per BatchNorm re-estimate before each validation
MAX_SHIFT = 4  # judge augmentation: translations of up to 4 px (1/16 of a 64 px image)
ACCURACY_COLUMNS = ("kind", "input", "t", "attack", "eps", "n", "accuracy", "prob_target", "loss")


def arch_for(kind: str) -> str:
    """The architecture of a classifier kind: the judge differs from the guiding classifiers."""
    return "shufflenet_v2_x1_0" if kind == "judge" else "mobilenet_v3_small"


def _check_ddpm_size(unet: UNet2DModel | None, size: int, data_root: str | Path) -> None:
    """The x0-estimate (D2) rows run the DDPM on the data set's images: same size needed."""
    if unet is not None and unet.config.sample_size != size:
        s = unet.config.sample_size
        raise GradcheckError(f"the DDPM makes {s}x{s} images but {data_root} has {size}x{size}")


def _check_config(cfg: TrainClassifierConfig) -> None:
    check_choice("classifier kind", cfg.kind, CLASSIFIER_KINDS)
    check_seed(cfg.seed)
    check_folder_name("checkpoint set name", cfg.name)
    if cfg.time_conditioned and cfg.kind not in NOISY_KINDS:
        raise GradcheckError("--time-conditioned needs noisy training (kind robust or "
                             f"adversarial), not kind {cfg.kind!r}")
    check_fields(cfg, "epochs", "batch_size", "lr", "patience", "eval_samples")
    check_fields(cfg, "weight_decay", "attack_eps", "attack_step_size", "attack_steps",
                 "eval_pgd_steps", allow_zero=True)
    check_fields(cfg, "max_minutes")
    for e in cfg.eval_pgd_eps:
        check_positive("eval_pgd_eps", e, allow_zero=True)
    if cfg.kind == "adversarial":  # an attack of 0 steps or radius 0 trains a plain classifier
        check_fields(cfg, "attack_eps", "attack_step_size", "attack_steps")


# ---- DDPM pieces: the noise schedule (training) and the UNet (D2 evaluation) --------------------


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def load_noise_schedule(ddpm: str | Path | None, kind: str) -> tuple[DDPMScheduler, str]:
    """(scheduler, source): the DDPM folder's scheduler config; docs/maths.md for clean kinds.
    Only ``scheduler/scheduler_config.json`` is read: the DDPM may still be training."""
    if ddpm is None:
        if kind in NOISY_KINDS:
            raise GradcheckError(f"kind {kind!r} trains on the DDPM's noisy latents and needs "
                                 "--ddpm FOLDER (a DDPM folder with scheduler/"
                                 "scheduler_config.json)")
        return make_scheduler(), "docs/maths.md (gradcheck.models.make_scheduler)"
    config = Path(ddpm) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise GradcheckError(f"--ddpm {ddpm} has no scheduler/scheduler_config.json; pass a DDPM "
                             "folder (`gradcheck train-ddpm` writes one)")
    try:
        scheduler = DDPMScheduler.from_pretrained(ddpm, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise GradcheckError(f"cannot read {config}: {str(e).splitlines()[0]}") from None
    return scheduler, str(config)


def ddpm_unet_available(ddpm: str | Path | None) -> bool:
    """Whether a DDPM folder holds a trained UNet (needed for the x0-estimate evaluation)."""
    if ddpm is None:
        return False
    folder = Path(ddpm)
    return (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()


@torch.no_grad()
def x0_estimate(
    unet: UNet2DModel, scheduler: DDPMScheduler, x_t: torch.Tensor, t: int, amp: bool = True
) -> torch.Tensor:
    """D2: x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t); x_t (B, 3, H, W).
    The UNet runs under bf16 autocast on CUDA when ``amp``."""
    abar = scheduler.alphas_cumprod[t].item()
    with _autocast(x_t.device, amp):
        eps = unet(x_t, t).sample.float()
    return (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


# ---- Batches ------------------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Judge augmentation: random horizontal/vertical flips and translations of up to MAX_SHIFT
    pixels (edge pixels replicated); x (B, C, H, W) -> (B, C, H, W)."""
    b, _, h, w = x.shape
    dev = x.device
    flips = torch.rand(b, 2, generator=generator, device=dev) < 0.5
    x = torch.where(flips[:, 0].view(b, 1, 1, 1), x.flip(3), x)
    x = torch.where(flips[:, 1].view(b, 1, 1, 1), x.flip(2), x)
    pad = F.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    shift = torch.randint(0, 2 * MAX_SHIFT + 1, (b, 2), generator=generator, device=dev)
    rows = (torch.arange(h, device=dev) + shift[:, :1]).view(b, 1, h, 1)
    cols = (torch.arange(w, device=dev) + shift[:, 1:]).view(b, 1, 1, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
    return pad[bi, ci, rows, cols]


def training_input(
    kind: str, x0: torch.Tensor, generator: torch.Generator, scheduler: DDPMScheduler
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A kind's training input before any attack: x0 (B, 3, H, W) -> (x, t (B,) or None). Judge:
    augmented clean images. Robust and adversarial: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    with t uniform over the schedule. Nonrobust: x0 itself."""
    if kind == "judge":
        return augment(x0, generator), None
    if kind in NOISY_KINDS:
        b, dev = x0.shape[0], x0.device
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        return scheduler.add_noise(x0, noise, t), t
    return x0, None


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]], amp: bool = True
) -> None:
    """Precise BatchNorm statistics: re-estimate running mean and variance as plain averages
    over ``batches`` of (x (B, C, H, W), t or None) with the current weights (MobileNetV3's
    momentum 0.01 leaves them hundreds of steps behind the weights)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for x, t in batches:
        with _autocast(x.device, amp):
            classifier_logits(model, x, t)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def fixed_noise(n: int, shape: tuple[int, ...], seed: int, num_timesteps: int):
    """Evaluation noise (n, *shape) and uniform timesteps (n,), drawn on the CPU from ``seed``
    so every device and batch size sees the same noisy validation set."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    t = torch.randint(0, num_timesteps, (n,), generator=g)
    return noise, t


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | int | None = None,
    batch_size: int = 512, amp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correct (N,) bool, prob_target (N,), loss (N,)) of a classifier in eval mode on x (N, ...).
    ``t`` (scalar or (N,)) reaches time-conditioned classifiers only."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        tb = t[i:i + batch_size] if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        with _autocast(x.device, amp):
            logits = classifier_logits(model, x[i:i + batch_size], tb).float()
        yb = y[i:i + batch_size]
        loss = F.cross_entropy(logits, yb, reduction="none")
        out.append((logits.argmax(1) == yb, torch.exp(-loss), loss))
    model.train(was_training)
    return tuple(torch.cat(c) for c in zip(*out, strict=True))


# ---- Evaluation: accuracy_by_t.parquet ----------------------------------------------------------


def evaluate(
    model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, scheduler: DDPMScheduler,
    unet: UNet2DModel | None = None, kind: str = "", eval_samples: int = 1000,
    eval_pgd_eps: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0), eval_pgd_steps: int = 20,
    batch_size: int = 256, seed: int = 0, amp: bool = True, progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-timestep accuracy table and summary numbers of a classifier on x_val (N, 3, H, W).

    Rows (columns ``ACCURACY_COLUMNS``):
    ``input="clean"`` (t missing) without attack and under L2 PGD at each ``eval_pgd_eps``
    (clean images, clamped to [-1, 1], step 2.5 * eps / steps, early stopping);
    ``input="x_t"`` at t in EVAL_TIMESTEPS, fixed noise per image (the same eps_i at every t);
    ``input="x0_hat"`` the D2 x0-estimate of the same x_t from ``unet`` (when given).
    Time-conditioned classifiers get t for x_t and 0 for clean images and x0-estimates (D3).
    The summary's ``clean_val_accuracy`` and ``noisy_val_accuracy`` (t uniform over the schedule)
    use all of x_val; the table uses its first ``eval_samples`` images.
    """
    dev = x_val.device
    num_t = scheduler.config.num_train_timesteps
    noise_all, t_all = fixed_noise(x_val.shape[0], tuple(x_val.shape[1:]), seed, num_t)
    noise_all, t_all = noise_all.to(dev), t_all.to(dev)
    n = min(eval_samples, x_val.shape[0])
    x, y, noise = x_val[:n], y_val[:n], noise_all[:n]
    rows = []

    def add(input_: str, t: int | None, correct, prob, loss, attack="none", eps=0.0) -> None:
        rows.append(dict(kind=kind, input=input_, t=t, attack=attack, eps=float(eps),
                         n=int(correct.numel()), accuracy=correct.float().mean().item(),
                         prob_target=prob.mean().item(), loss=loss.mean().item()))

    clean_all = predict(model, x_val, y_val, 0, batch_size, amp)
    noisy_x = scheduler.add_noise(x_val, noise_all, t_all)
    noisy_all = predict(model, noisy_x, y_val, t_all, batch_size, amp)
    add("clean", None, *(c[:n] for c in clean_all))

    steps = len(EVAL_TIMESTEPS) * (2 if unet is not None else 1) + len(eval_pgd_eps)
    bar = tqdm(total=steps, desc=f"evaluate {kind}", disable=not progress, leave=False)
    for t in EVAL_TIMESTEPS:
        x_t = scheduler.add_noise(x, noise, torch.full((n,), t, device=dev))
        add("x_t", t, *predict(model, x_t, y, t, batch_size, amp))
        bar.update()
        if unet is not None:
            x0 = torch.cat([x0_estimate(unet, scheduler, x_t[i:i + batch_size], t, amp)
                            for i in range(0, n, batch_size)])
            add("x0_hat", t, *predict(model, x0, y, 0, batch_size, amp))
            bar.update()
    pgd_accuracy = {}
    for eps in eval_pgd_eps:
        adv = torch.cat([
            pgd(model, x[i:i + batch_size], y[i:i + batch_size], eps=eps,
                step_size=2.5 * eps / max(eval_pgd_steps, 1), steps=eval_pgd_steps, norm="l2",
                t=0, clamp=(-1.0, 1.0))
            for i in range(0, n, batch_size)
        ])
        res = predict(model, adv, y, 0, batch_size, amp)
        add("clean", None, *res, attack="pgd_l2", eps=eps)
        pgd_accuracy[str(eps)] = rows[-1]["accuracy"]
        bar.update()
    bar.close()

    table = pd.DataFrame(rows, columns=list(ACCURACY_COLUMNS))
    table["t"] = table["t"].astype("Int64")
    summary = {
        "clean_val_accuracy": clean_all[0].float().mean().item(),
        "noisy_val_accuracy": noisy_all[0].float().mean().item(),
        "val_images": int(x_val.shape[0]),
        "pgd_l2_accuracy": pgd_accuracy,
        "pgd_eval": {"images": n, "steps": eval_pgd_steps, "step_size": "2.5 * eps / steps",
                     "clamp": [-1.0, 1.0], "early_stop": True},
        "x0_hat_evaluated": unet is not None,
        "eval_seed": seed,
    }
    return table, summary


# ---- Training -----------------------------------------------------------------------------------


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine from 1 to 0.1."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def train_classifier(cfg: TrainClassifierConfig | None = None, **overrides: Any) -> Path:
    """Train one classifier kind and write its folder; returns ``out/name/classifiers/kind``.
    Keyword overrides equal the fields of :class:`TrainClassifierConfig` (and the CLI options). The
    weights of the best validation epoch are kept: clean accuracy for nonrobust and judge, accuracy
    on the fixed noisy validation set (t uniform) for robust and adversarial."""
    from gradcheck.data.sportballs import load_tensors

    cfg = dataclasses.replace(cfg or TrainClassifierConfig(), **overrides)
    _check_config(cfg)
    device = resolve_device(cfg.device)
    scheduler, schedule_source = load_noise_schedule(cfg.ddpm, cfg.kind)
    unet = load_ddpm(cfg.ddpm)[0].to(device) if ddpm_unet_available(cfg.ddpm) else None
    final = Path(cfg.out) / cfg.name / "classifiers" / cfg.kind
    arch = arch_for(cfg.kind)
    noisy = cfg.kind in NOISY_KINDS
    num_t = scheduler.config.num_train_timesteps

    with atomic_output_dir(final, cfg.overwrite) as tmp:
        start = time.monotonic()
        x_train, y_train = load_tensors(cfg.data_root, "train", device)
        x_val, y_val = load_tensors(cfg.data_root, "val", device)
        _check_ddpm_size(unet, x_train.shape[-1], cfg.data_root)
        torch.manual_seed(cfg.seed)
        model = make_classifier(arch, cfg.time_conditioned).to(device)
        for m in model.modules():
            # Faster than torchvision's 0.01 (see recalibrate_batchnorm): the adversarial kind
            # attacks the eval-mode model during training. Not in the state dict.
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_train = x_train.shape[0]
        bs = min(cfg.batch_size, n_train)
        steps_per_epoch = n_train // bs  # drop the ragged last batch: BatchNorm needs > 1 sample
        total = steps_per_epoch * cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total))
        val_noise, val_t = fixed_noise(x_val.shape[0], tuple(x_val.shape[1:]), cfg.seed + 1, num_t)
        x_val_noisy = scheduler.add_noise(x_val, val_noise.to(device), val_t.to(device))
        val_t = val_t.to(device)
        del val_noise

        log, best_acc, best_state, best_epoch, stale, global_step = [], -1.0, None, 0, 0, 0
        deadline = start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        bar = tqdm(total=total, desc=f"train {cfg.kind}", disable=not cfg.progress)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            t0 = time.monotonic()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen, out_of_time = 0, False
            perm = torch.randperm(n_train, generator=gen, device=device)
            for i in range(steps_per_epoch):
                idx = perm[i * bs:(i + 1) * bs]
                y = y_train[idx]
                x, t = training_input(cfg.kind, x_train[idx], gen, scheduler)
                t_in = t if cfg.time_conditioned else None
                with _autocast(device, cfg.amp):
                    if cfg.kind == "adversarial":
                        # Kawar et al. Eq. 5: attack x_t inside the L2 ball, no clamp (x_t is
                        # unbounded), early stop per sample so noisy samples are not overwhelmed.
                        x = pgd(model, x, y, eps=cfg.attack_eps, step_size=cfg.attack_step_size,
                                steps=cfg.attack_steps, norm="l2", t=t_in)
                    logits = classifier_logits(model, x, t_in).float()
                    loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * bs
                correct += (logits.detach().argmax(1) == y).sum()
                seen += bs
                global_step += 1
                bar.update()
                if i % 20 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}",
                                    best=f"{max(best_acc, 0):.4f}")
                if time.monotonic() > deadline:
                    out_of_time = True
                    break
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels run asynchronously: time them all
            train_s = time.monotonic() - t0
            bn_batches = []
            for i in range(min(steps_per_epoch, math.ceil(BN_IMAGES / bs))):
                x, t = training_input(cfg.kind, x_train[perm[i * bs:(i + 1) * bs]], gen, scheduler)
                bn_batches.append((x, t if cfg.time_conditioned else None))
            recalibrate_batchnorm(model, bn_batches, cfg.amp)
            del bn_batches
            clean_acc = predict(model, x_val, y_val, 0, cfg.batch_size, cfg.amp)[0]
            noisy_acc = predict(model, x_val_noisy, y_val, val_t, cfg.batch_size, cfg.amp)[0]
            clean_acc, noisy_acc = clean_acc.float().mean().item(), noisy_acc.float().mean().item()
            val_acc = noisy_acc if noisy else clean_acc
            log.append(dict(
                epoch=epoch, steps=global_step, lr=sched.get_last_lr()[0],
                train_loss=(loss_sum / max(seen, 1)).item(),
                train_accuracy=(correct / max(seen, 1)).item(), val_accuracy=val_acc,
                val_clean_accuracy=clean_acc, val_noisy_accuracy=noisy_acc,
                images_per_s=seen / max(train_s, 1e-9), wall_s=time.monotonic() - start,
            ))
            if val_acc > best_acc:
                best_acc, best_epoch, stale = val_acc, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            if out_of_time or stale >= cfg.patience:
                break
        bar.close()
        train_wall = time.monotonic() - start

        # Evaluate the weights exactly as they will be loaded (fp16-rounded when shipped).
        save_dtype = torch.float16 if cfg.fp16 else None
        if save_dtype is not None:
            best_state = {k: v.to(save_dtype).to(v.dtype) if v.is_floating_point() else v
                          for k, v in best_state.items()}
        model.load_state_dict(best_state)
        model.eval()
        table, summary = evaluate(
            model, x_val, y_val, scheduler, unet, kind=cfg.kind, eval_samples=cfg.eval_samples,
            eval_pgd_eps=cfg.eval_pgd_eps, eval_pgd_steps=cfg.eval_pgd_steps,
            batch_size=cfg.batch_size, seed=cfg.seed, amp=cfg.amp, progress=cfg.progress,
        )
        config = classifier_config(
            cfg.kind, arch, cfg.time_conditioned, image_size=int(x_train.shape[-1]),
            train_images=n_train, noise_schedule_source=schedule_source,
            noise_schedule=dict(scheduler.config),
            attack=(dict(norm="l2", eps=cfg.attack_eps, step_size=cfg.attack_step_size,
                         steps=cfg.attack_steps, early_stop=True, clamp=None)
                    if cfg.kind == "adversarial" else None),
            best_epoch=best_epoch, epochs_trained=len(log), best_val_accuracy=best_acc,
            early_stopping_metric="val_noisy_accuracy" if noisy else "val_clean_accuracy",
            train_wall_s=train_wall, weights_dtype="float16" if cfg.fp16 else "float32",
            **summary, train_config=config_to_dict(cfg), **run_metadata(device),
        )
        save_classifier(model, tmp, config, dtype=save_dtype)
        pd.DataFrame(log).to_parquet(tmp / "train_log.parquet", index=False)
        write_parquet(table, tmp / "accuracy_by_t.parquet", config)
    return final


def evaluate_classifier(
    folder: str | Path, data_root: str | Path | None = None, ddpm: str | Path | None = None,
    eval_samples: int = 1000, eval_pgd_eps: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
    eval_pgd_steps: int = 20, batch_size: int = 256, seed: int = 0, device: str = "auto",
    amp: bool = True, progress: bool = True,
) -> pd.DataFrame:
    """Re-evaluate a classifier folder (e.g. once its DDPM exists, for the x0_hat rows) on the
    validation split of ``data_root`` (default: :func:`paths.default_data_root`). Rewrites
    ``accuracy_by_t.parquet`` and the summary numbers in ``config.json``; the noise schedule comes
    from ``ddpm`` when given, else from the one recorded in config.json."""
    from gradcheck.data.sportballs import load_tensors

    check_positive("eval_samples", eval_samples)
    dev = resolve_device(device)
    folder = Path(folder)
    model, config = load_classifier(folder, dev)
    if ddpm is not None:
        scheduler, source = load_noise_schedule(ddpm, config["kind"])
    elif config.get("noise_schedule"):
        scheduler = DDPMScheduler.from_config(config["noise_schedule"])
        source = config.get("noise_schedule_source", "config.json")
    else:
        scheduler, source = load_noise_schedule(None, "nonrobust")
    unet = load_ddpm(ddpm)[0].to(dev) if ddpm_unet_available(ddpm) else None
    data_root = data_root or default_data_root()
    x_val, y_val = load_tensors(data_root, "val", dev)
    _check_ddpm_size(unet, x_val.shape[-1], data_root)
    check_image_size(config, x_val.shape[-1], f"classifier {folder}", f"{data_root} has")
    table, summary = evaluate(
        model, x_val, y_val, scheduler, unet, kind=config["kind"], eval_samples=eval_samples,
        eval_pgd_eps=tuple(eval_pgd_eps), eval_pgd_steps=eval_pgd_steps, batch_size=batch_size,
        seed=seed, amp=amp, progress=progress,
    )
    config.update(summary, noise_schedule_source=source, evaluated_with=run_metadata(dev))
    write_parquet(table, folder / "accuracy_by_t.parquet", config)
    with atomic_output_file(folder / "config.json", overwrite=True) as tmp:
        save_json(tmp, config)
    return table


def read_accuracy_table(folder: str | Path) -> pd.DataFrame:
    """accuracy_by_t.parquet of a classifier folder (its config JSON is in ``attrs``)."""
    path = Path(folder) / "accuracy_by_t.parquet"
    if not path.is_file():
        raise GradcheckError(f"missing {path}; run `gradcheck eval-classifier {folder}`")
    table = pq.read_table(path)
    df = table.to_pandas()
    meta = (table.schema.metadata or {}).get(b"gradcheck")
    df.attrs["config"] = json.loads(meta) if meta else load_json(Path(folder) / "config.json")
    return df
