"""Train the unconditional DDPM (docs/scales.md): accelerate, bf16, EMA, resume, fp16 export.

Layout for ``--out OUT --name NAME``::

    OUT/NAME/ddpm/                          diffusers pipeline folder of the EMA weights, plus
                                            train_config.json, train_log.parquet, samples.png
    OUT/NAME/train_state/ddpm/checkpoint/   resume state, git-ignored: state.json and
                                            model/ema/optimizer/rng .safetensors, train_log.parquet
    OUT/NAME/train_state/ddpm/samples/      a grid of EMA samples every --sample-every steps

The recipe and why: docs/scales.md, "The recipe". The hot loop keeps the whole data set on the
device as uint8 and draws batches by index (no DataLoader).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMPipeline, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from gradcheck.config import TrainDDPMConfig, config_to_dict
from gradcheck.eval_ddpm import MIXED_PRECISION, sample_images
from gradcheck.models import UNET_PRESETS, load_ddpm, make_scheduler, make_unet
from gradcheck.utils import (
    GradcheckError,
    atomic_output_dir,
    check_choice,
    check_fields,
    check_folder_name,
    check_positive,
    check_seed,
    from_uint8,
    load_json,
    refuse_pickle,
    resolve_device,
    run_metadata,
    save_image_grid,
    save_json,
)

EXPORT_SHARD_BYTES = 15 * 2**20  # tensor bytes per shard; + the JSON header stays < 16 MiB
GRID_SAMPLES = 16
STATE_FORMAT = 1
LOG_COLUMNS = ("step", "loss", "mse", "grad_norm", "lr", "images_per_s")
MULTISCALE_SIZES = (1, 2, 4, 8)  # pooled sizes: the per-channel mean (1) up to 8 x 8 cells
CPU_BF16_MIN_SPEEDUP = 1.2  # auto on a CPU: bf16 only where it trains this much faster


# ---- Recipe pieces (pure functions of the step) -------------------------------------------------


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up from lr / warmup_steps to ``lr``, then constant (the EMA averages)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def multiscale_error(
    err: torch.Tensor, scales: tuple[int, ...] = MULTISCALE_SIZES
) -> torch.Tensor:
    """Low-frequency squared error (B,) of err (B, C, H, W): the mean over ``scales`` s of the
    error average-pooled to s x s, times the pixels per cell, so white noise scores 1 at every
    scale (Hoogeboom et al. 2023, simple diffusion, multiscale loss)."""
    h, w = err.shape[-2:]
    terms = [F.adaptive_avg_pool2d(err, s).square().mean(dim=(1, 2, 3)) * (h * w / s**2)
             for s in scales]
    return torch.stack(terms).mean(dim=0)


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights (T,) for epsilon prediction, min(SNR_t, gamma) / SNR_t with
    SNR_t = abar_t / (1 - abar_t) (Hang et al. 2023); gamma = 0 gives the simple loss (all 1)."""
    abar = alphas_cumprod.double()
    if gamma <= 0:
        return torch.ones_like(abar, dtype=torch.float32)
    snr = abar / (1 - abar)
    return (snr.clamp(max=gamma) / snr).float()


class WeightAverage:
    """Exponential moving average of a UNet's float32 weights: what is sampled and exported."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self._params = list(self.model.parameters())

    def decay_at(self, step: int) -> float:
        """min(decay, (1 + step) / (10 + step)) with warm-up: averages over ~10% of the steps."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema <- decay * ema + (1 - decay) * model, in one fused pass over all tensors."""
        torch._foreach_lerp_(self._params, [p.detach() for p in model.parameters()],
                             1 - self.decay_at(step))


# ---- Data and the hot loop ----------------------------------------------------------------------


def load_train_images(
    data_root: str | Path, preset: str, max_images: int | None = None
) -> torch.Tensor:
    """The training split as uint8 (N, 3, H, W) on the CPU, checked against the preset's size."""
    root = Path(data_root)
    if not root.is_dir():
        raise GradcheckError(f"data set {root} not found; create it with `gradcheck make-dataset` "
                             "or pass --data-root")
    from gradcheck.data.sportballs import load_split

    images, _ = load_split(root, "train")
    if max_images is not None:
        images = images[:max_images]
    size = UNET_PRESETS[preset]["sample_size"]
    if images.shape[1:3] != (size, size):
        sizes = ", ".join(f"{k}: {v['sample_size']}" for k, v in UNET_PRESETS.items())
        raise GradcheckError(f"data set {root} has {images.shape[1]}x{images.shape[2]} images but "
                             f"UNet preset {preset!r} expects {size}x{size}; pick a matching "
                             f"--preset ({sizes}) or data set")
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()  # a copy


def _place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On the GPU when the uint8 set takes under a quarter of free memory, else pinned CPU."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.nbytes < free / 4:
        return images.to(device)
    return images.pin_memory()


def speed_flags(device: torch.device) -> None:
    """TF32 for the float32 parts and cuDNN autotuning (fixed shapes): free speed on GPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def make_optimizer(
    model: nn.Module, cfg: TrainDDPMConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel updates all 432 tensors of the paper UNet in one launch."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, fused=device.type == "cuda")


class TrainStep:
    """One optimiser step on the (weighted) epsilon-prediction loss of docs/maths.md. All randomness
    (batch indices, flips, timesteps, noise) comes from one generator on the device, so a run is
    reproducible from its seed and resumable from the generator's state."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
        alphas_cumprod: torch.Tensor, loss_weights: torch.Tensor, multiscale_weight: float,
        generator: torch.Generator, batch_size: int, hflip: bool, grad_clip: float, bf16: bool,
        channels_last: bool,
    ) -> None:
        self.device = generator.device
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.images = images  # uint8 (N, 3, H, W), on the device when it fits
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.abar = alphas_cumprod.to(self.device, torch.float32)
        self.weights = loss_weights.to(self.device, torch.float32)
        self.multiscale_weight = multiscale_weight
        self.batch_size, self.hflip, self.bf16 = batch_size, hflip, bf16
        self.grad_clip = grad_clip if grad_clip > 0 else math.inf  # inf: measure, never clip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def draw_batch(self) -> torch.Tensor:
        """A batch (B, 3, H, W) in [-1, 1], drawn with replacement, optionally mirrored."""
        g, dev = self.generator, self.device
        idx = torch.randint(len(self.images), (self.batch_size,), generator=g, device=dev)
        x0 = from_uint8(self.images[idx.to(self.images.device)].to(dev, non_blocking=True))
        if self.hflip:
            flip = torch.rand(self.batch_size, generator=g, device=dev) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        return x0

    def __call__(self, lr: float) -> torch.Tensor:
        """Take one step at learning rate ``lr`` -> (3,) [loss, mse, grad_norm], not synced."""
        g, dev = self.generator, self.device
        x0 = self.draw_batch()
        t = torch.randint(len(self.abar), (self.batch_size,), generator=g, device=dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        abar = self.abar[t].view(-1, 1, 1, 1)
        # q(x_t | x_0) of DDPM: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (docs/maths.md).
        x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).contiguous(
            memory_format=self.memory_format)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            eps = self.model(x_t, t).sample
        err = eps.float() - noise
        mse = err.square().mean(dim=(1, 2, 3))  # (B,)
        per_sample = mse
        if self.multiscale_weight > 0:
            # A positive-definite reweighting of the error: the minimiser is still E[eps | x_t],
            # so D1 holds, but colour offsets are no longer a 1/(H W) sliver of the loss.
            per_sample = mse + self.multiscale_weight * multiscale_error(err)
        loss = (self.weights[t] * per_sample).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP (accelerate launch) all-reduces the gradients here
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return torch.stack([loss.detach(), mse.mean().detach(), grad_norm.detach()])


# ---- Export and train state (safetensors for tensors, JSON for the rest; never pickle) ----------


def export_ddpm(
    unet: UNet2DModel, folder: str | Path, fp16: bool = True,
    max_shard_size: int = EXPORT_SHARD_BYTES, overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a diffusers pipeline folder (``unet`` + the docs/maths.md scheduler) that plain
    ``DDPMPipeline.from_pretrained(folder, use_safetensors=True)`` loads; safetensors shards of at
    most ``max_shard_size`` tensor bytes. ``extra(tmp)`` may add files before the atomic rename."""
    check_positive("max_shard_size", max_shard_size)
    out = UNet2DModel.from_config(unet.config)
    out.load_state_dict({k: v.detach().float().cpu() for k, v in unet.state_dict().items()})
    if fp16:
        out = out.half()
    with atomic_output_dir(folder, overwrite) as tmp:
        DDPMPipeline(unet=out, scheduler=make_scheduler()).save_pretrained(
            tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if extra is not None:
            extra(tmp)
    return Path(folder)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors, contiguous on the CPU (channels_last weights are not contiguous)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    refuse_pickle(path)
    if not path.is_file():
        raise GradcheckError(f"missing {path}; the train state is incomplete, start without "
                             "--resume (or with --init-from the exported folder)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GradcheckError(f"cannot read {path}: {msg}") from None


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise GradcheckError(f"{source} does not match the UNet preset: {msg}") from None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors ``{param_index}.{name}`` (exp_avg, exp_avg_sq, step)."""
    return {f"{i}.{name}": v.detach().cpu().contiguous()
            for i, s in optimizer.state_dict()["state"].items() for name, v in s.items()}


def _load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], source: Path
) -> None:
    """Restore AdamW moments and step counts; hyperparameters come from this call's config."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if sorted(state) != list(range(len(params))) or any(
            state[i]["exp_avg"].shape != p.shape for i, p in enumerate(params)):
        raise GradcheckError(f"{source} does not match the UNet preset's parameters")
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: (tensors, JSON). The loop uses only ``generator``; the global
    torch, CUDA, numpy and Python states are saved too so that nothing else can drift."""
    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if generator.device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(generator.device)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    py = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(cached)],
                     "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(
    generator: torch.Generator, tensors: dict[str, torch.Tensor], js: dict[str, Any]
) -> None:
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and generator.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["torch_cuda"], generator.device)
    name, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))


def _log_frame(rows: list[dict[str, float]], prior: pd.DataFrame | None) -> pd.DataFrame:
    new = pd.DataFrame(rows, columns=list(LOG_COLUMNS)).astype({"step": "int64"})
    if prior is None or prior.empty:
        return new
    return pd.concat([prior, new], ignore_index=True) if rows else prior


def _read_log(path: Path, before_step: int) -> pd.DataFrame:
    """The rows of a train_log.parquet before ``before_step`` (later ones are redone)."""
    try:
        log = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise GradcheckError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    return log[log["step"] < before_step].reset_index(drop=True)


def _load_checkpoint(folder: Path) -> dict[str, Any]:
    """Everything ``--resume`` needs from a checkpoint folder, or a one-line GradcheckError."""
    if folder.is_dir():
        for p in folder.rglob("*"):
            refuse_pickle(p)
    state = load_json(folder / "state.json")
    if state.get("format") != STATE_FORMAT:
        raise GradcheckError(f"{folder / 'state.json'} has format {state.get('format')!r}; this "
                             f"gradcheck reads format {STATE_FORMAT}")
    return {"state": state,
            **{k: _load_safetensors(folder / f"{k}.safetensors")
               for k in ("model", "ema", "optimizer", "rng")},
            "log": _read_log(folder / "train_log.parquet", state["step"])}


def _load_init(folder: str | Path, preset: str) -> dict[str, Any]:
    """Weights (float32) of an exported pipeline folder, and its step and log when gradcheck
    wrote it, for ``--init-from``."""
    folder = Path(folder)
    unet, _ = load_ddpm(folder)
    for key, want in UNET_PRESETS[preset].items():
        have = unet.config.get(key)
        if (list(have) if isinstance(have, (list, tuple)) else have) != (
                list(want) if isinstance(want, tuple) else want):
            raise GradcheckError(f"--init-from {folder}: its UNet has {key}={have!r} but preset "
                                 f"{preset!r} has {want!r}; pass the matching --preset")
    info = load_json(folder / "train_config.json") if (folder / "train_config.json").is_file() \
        else {}
    step = int(info.get("step", 0))
    log_path = folder / "train_log.parquet"
    return {"model": _cpu_state(unet), "step": step, "sittings": info.get("sittings", []),
            "train_seconds": float(info.get("train_seconds", 0.0)),
            "images_seen": int(info.get("images_seen", 0)),
            "log": _read_log(log_path, step) if log_path.is_file() else None}


# ---- The training command -----------------------------------------------------------------------


def _check_config(cfg: TrainDDPMConfig) -> None:
    check_choice("UNet preset", cfg.preset, list(UNET_PRESETS))
    check_choice("mixed_precision", cfg.mixed_precision, MIXED_PRECISION)
    check_seed(cfg.seed)
    check_folder_name("checkpoint set name", cfg.name)
    check_fields(cfg, "batch_size", "lr", "log_every", "sample_steps", "ema_decay")
    check_fields(cfg, "warmup_steps", "weight_decay", "grad_clip", "min_snr_gamma",
                 "multiscale_weight", "sample_every", "checkpoint_every", allow_zero=True)
    check_fields(cfg, "max_minutes", "max_steps", "max_images")
    if cfg.max_minutes is None and cfg.max_steps is None:
        raise GradcheckError("give --max-minutes (wall-clock budget) or --max-steps (or both)")
    if not 0 < cfg.ema_decay < 1:
        raise GradcheckError(f"ema_decay must lie in (0, 1), got {cfg.ema_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise GradcheckError(f"{name} must lie in [0, 1), got {getattr(cfg, name)}")
    if cfg.resume and cfg.init_from is not None:
        raise GradcheckError("--resume continues a train state, --init-from starts from exported "
                             "weights: pass only one")


def _accelerator(device: str) -> Any:
    """An accelerate Accelerator: the device, and DDP when started by ``accelerate launch``.
    Its mixed precision stays "no" (process-wide state): :class:`TrainStep` autocasts itself."""
    from accelerate import Accelerator

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        torch.cuda.set_device(dev)
    try:
        return Accelerator(cpu=dev.type == "cpu", mixed_precision="no")
    except ValueError as e:
        raise GradcheckError(f"accelerate: {str(e).splitlines()[0]}") from None


def choose_autocast(
    mixed_precision: str, device: torch.device, preset: str, batch_size: int,
    channels_last: bool, say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Resolve ``--mixed-precision`` to bf16 autocast or float32 -> {"autocast": ..., ...}. ``auto``
    is bf16 on a GPU. On a CPU it times a few real training steps of the preset both ways (on random
    images, the run's state untouched) and takes bf16 only where it is :data:`CPU_BF16_MIN_SPEEDUP`
    times faster (CPUs without native bf16 emulate it slowly)."""
    if mixed_precision != "auto" or device.type != "cpu":
        autocast = "float32" if mixed_precision == "no" else "bf16"
        return {"autocast": autocast, "reason": f"--mixed-precision {mixed_precision}"}
    from gradcheck.bench import benchmark_training

    rates: dict[str, list[float]] = {"no": [], "bf16": []}
    with torch.random.fork_rng(devices=[]):  # the run's own random stream stays untouched
        for _ in range(2):
            for mode in rates:
                r = benchmark_training(preset, batch_size, steps=3, mixed_precision=mode,
                                       channels_last=channels_last, warmup=1,
                                       device=str(device))
                rates[mode].append(r["images_per_s"])
    fp32, bf16 = max(rates["no"]), max(rates["bf16"])
    autocast = "bf16" if bf16 >= CPU_BF16_MIN_SPEEDUP * fp32 else "float32"
    choice = {"autocast": autocast, "cpu_images_per_s": {"float32": fp32, "bf16": bf16},
              "reason": f"measured: bf16 {bf16:.0f} vs float32 {fp32:.0f} images/s "
                        f"({bf16 / fp32:.2f}x; bf16 needs >= {CPU_BF16_MIN_SPEEDUP}x)"}
    say(f"train-ddpm on the CPU: {autocast} ({choice['reason']})")
    return choice


def train_ddpm(config: TrainDDPMConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Train (or continue) the DDPM of ``out/name`` -> summary dict (steps, paths, speed)."""
    cfg = dataclasses.replace(config or TrainDDPMConfig(), **overrides)
    _check_config(cfg)
    call_start = time.monotonic()
    run_dir = Path(cfg.out) / cfg.name
    export_dir, state_dir = run_dir / "ddpm", run_dir / "train_state" / "ddpm"
    ckpt_dir = state_dir / "checkpoint"
    if cfg.resume and not (ckpt_dir / "state.json").is_file():
        raise GradcheckError(f"nothing to resume: no train state in {ckpt_dir} (start a new run, "
                             "or use --init-from with an exported folder)")
    if not cfg.resume and not cfg.overwrite:
        for p in (export_dir, state_dir):
            if p.exists():
                raise GradcheckError(f"{p} already exists; pass --resume to continue it or "
                                     "--overwrite to start again")

    ckpt = _load_checkpoint(ckpt_dir) if cfg.resume else None
    if ckpt is not None and cfg.max_steps is not None and ckpt["state"]["step"] >= cfg.max_steps:
        raise GradcheckError(f"the train state in {ckpt_dir} is at step {ckpt['state']['step']}, "
                             f"already at --max-steps {cfg.max_steps}; raise --max-steps to "
                             "continue")
    init = _load_init(cfg.init_from, cfg.preset) if cfg.init_from is not None else None
    images = load_train_images(cfg.data_root, cfg.preset, cfg.max_images)

    accelerator = _accelerator(cfg.device)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.batch_size % world:
        raise GradcheckError(f"batch_size {cfg.batch_size} must be divisible by the "
                             f"{world} processes")
    speed_flags(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    torch.manual_seed(cfg.seed)
    unet = make_unet(cfg.preset)
    step, opt_start, sittings, prior_log, train_seconds, prior_images = 0, 0, [], None, 0.0, 0
    if ckpt is not None:
        st = ckpt["state"]
        if st["num_processes"] != world:
            raise GradcheckError(f"the train state was written by {st['num_processes']} "
                                 f"processes; resume with the same number, not {world}")
        _load_weights(unet, ckpt["model"], ckpt_dir / "model.safetensors")
        step, opt_start = st["step"], st["opt_start_step"]
        sittings, prior_log, train_seconds = st["sittings"], ckpt["log"], st["train_seconds"]
        prior_images = st["images_seen"]
    elif init is not None:
        _load_weights(unet, init["model"], Path(cfg.init_from))
        step = opt_start = init["step"]  # the step count goes on; the warm-up starts again
        sittings, prior_log, train_seconds = init["sittings"], init["log"], init["train_seconds"]
        prior_images = init["images_seen"]
    unet.to(device, memory_format=memory_format).train()
    ema = WeightAverage(unet, cfg.ema_decay, cfg.ema_warmup)
    optimizer = make_optimizer(unet, cfg, device)
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + rank)
    if ckpt is not None:
        _load_weights(ema.model, ckpt["ema"], ckpt_dir / "ema.safetensors")
        _load_optimizer(optimizer, ckpt["optimizer"], ckpt_dir / "optimizer.safetensors")
        prefix = f"rank{rank}."
        try:
            _set_rng_state(generator, {k[len(prefix):]: v for k, v in ckpt["rng"].items()
                                       if k.startswith(prefix)}, ckpt["state"]["rng"][rank])
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError):
            written = ckpt["state"]["sittings"][-1]["metadata"]["device"]
            raise GradcheckError(f"the RNG state in {ckpt_dir} (written on {written}) does not fit "
                                 f"{device}; resume on the same kind of device, or start with "
                                 "--init-from the export") from None
    if not cfg.resume and cfg.overwrite and main:
        shutil.rmtree(state_dir, ignore_errors=True)  # a new run: no stale grids or state

    last = ckpt["state"]["sittings"][-1] if ckpt is not None else {}
    if cfg.mixed_precision == "auto" and "precision" in last:
        precision = last["precision"]  # resume with auto: the arithmetic it measured before
    else:
        precision = choose_autocast(cfg.mixed_precision, device, cfg.preset,
                                    cfg.batch_size // world, cfg.channels_last,
                                    say=print if main else lambda _: None)
    model = accelerator.prepare_model(unet)  # DDP wrapper under `accelerate launch`
    if cfg.compile:
        model = torch.compile(model)
    scheduler = make_scheduler()
    images = _place_images(images, device)
    train_step = TrainStep(
        model, optimizer, images, scheduler.alphas_cumprod,
        min_snr_weights(scheduler.alphas_cumprod, cfg.min_snr_gamma), cfg.multiscale_weight,
        generator, cfg.batch_size // world, cfg.hflip, cfg.grad_clip,
        precision["autocast"] == "bf16", cfg.channels_last,
    )
    sitting = {
        "mode": "resume" if cfg.resume else "init_from" if cfg.init_from else "new",
        "init_from": cfg.init_from, "start_step": step, "end_step": step, "seconds": 0.0,
        "config": config_to_dict(cfg), "metadata": run_metadata(device), "precision": precision,
    }
    rows: list[dict[str, float]] = []
    last_grid: torch.Tensor | None = None
    start_step = saved_step = grid_step = step
    prior_seconds = train_seconds

    def images_seen() -> int:
        return prior_images + (step - start_step) * cfg.batch_size

    def save_samples() -> None:
        nonlocal last_grid, grid_step
        grid_step = step
        if not main:
            return
        last_grid = sample_images(ema.model, scheduler, GRID_SAMPLES, cfg.sample_steps,
                                  cfg.seed, GRID_SAMPLES, "bf16" if device.type == "cuda" else "no")
        (state_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image_grid(last_grid, state_dir / "samples" / f"step_{step:07d}.png")

    def save_checkpoint() -> None:
        from accelerate.utils import gather_object

        nonlocal saved_step
        saved_step = step
        rng = gather_object([_rng_state(generator)])  # collective: every process takes part
        if main:
            log = _log_frame(rows, prior_log)
            sitting.update(end_step=step, seconds=train_seconds - prior_seconds)
            all_sittings = [*sittings, sitting]
            state = {
                "format": STATE_FORMAT, "step": step, "opt_start_step": opt_start,
                "images_seen": images_seen(), "train_seconds": train_seconds,
                "num_processes": world, "rng": [js for _, js in rng], "sittings": all_sittings,
            }
            with atomic_output_dir(ckpt_dir, overwrite=True) as tmp:
                save_file(_cpu_state(unet), tmp / "model.safetensors")
                save_file(_cpu_state(ema.model), tmp / "ema.safetensors")
                save_file(_optimizer_tensors(optimizer), tmp / "optimizer.safetensors")
                save_file({f"rank{r}.{k}": v.contiguous() for r, (t, _) in enumerate(rng)
                           for k, v in t.items()}, tmp / "rng.safetensors")
                log.to_parquet(tmp / "train_log.parquet", index=False)
                save_json(tmp / "state.json", state)

            def extra(folder: Path) -> None:
                save_json(folder / "train_config.json", {
                    k: state[k] for k in ("step", "images_seen", "train_seconds", "sittings")})
                log.to_parquet(folder / "train_log.parquet", index=False)
                if last_grid is not None:
                    save_image_grid(last_grid, folder / "samples.png")

            export_ddpm(ema.model, export_dir, cfg.fp16_export, overwrite=True, extra=extra)
        accelerator.wait_for_everyone()

    def out_of_time() -> bool:
        # The final grid + save must fit too: keep back what the last periodic one took.
        late = cfg.max_minutes is not None and (
            time.monotonic() - call_start + save_seconds >= cfg.max_minutes * 60)
        if world == 1:
            return late
        from accelerate.utils import broadcast  # one decision for all processes

        return bool(broadcast(torch.tensor([float(late)], device=device)).item())

    pending: list[torch.Tensor] = []
    lrs: list[float] = []
    save_seconds = 0.0
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train-ddpm {cfg.name}", unit="it",
               disable=not (cfg.progress and main), dynamic_ncols=True)
    tick = time.monotonic()

    def flush() -> None:
        nonlocal tick, train_seconds
        if not pending:
            return
        now = time.monotonic()
        stats = torch.stack(pending)
        if world > 1:
            stats = accelerator.reduce(stats, "mean")
        rate = len(pending) * cfg.batch_size / max(now - tick, 1e-9)
        first = step - len(pending)
        for i, ((loss, mse, gnorm), lr) in enumerate(zip(stats.tolist(), lrs, strict=True)):
            rows.append({"step": first + i, "loss": loss, "mse": mse, "grad_norm": gnorm,
                         "lr": lr, "images_per_s": rate})
        train_seconds += now - tick
        bar.update(len(pending))
        bar.set_postfix(loss=f"{np.mean([r['loss'] for r in rows[-len(pending):]]):.4f}",
                        img_s=f"{rate:.0f}")
        if cfg.max_minutes is not None:
            left = cfg.max_minutes * 60 - (now - call_start)
            total = step + max(0, int(left * rate / cfg.batch_size))
            bar.total = min(total, cfg.max_steps or total)
            bar.refresh()
        pending.clear()
        lrs.clear()
        tick = time.monotonic()

    while cfg.max_steps is None or step < cfg.max_steps:
        # Several processes must stop together: they decide at log steps, by broadcast.
        if (world == 1 or step % cfg.log_every == 0) and out_of_time():
            break
        lr = lr_at(step - opt_start, cfg.lr, cfg.warmup_steps)
        pending.append(train_step(lr))
        lrs.append(lr)
        ema.update(unet, step)
        step += 1
        grid_now = cfg.sample_every > 0 and step % cfg.sample_every == 0
        ckpt_now = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
        if step % cfg.log_every == 0 or grid_now or ckpt_now:
            flush()
        if grid_now:
            save_samples()
        if ckpt_now:
            save_checkpoint()
            save_seconds = time.monotonic() - tick  # grid and save, flushed at tick
        if grid_now or ckpt_now:
            tick = time.monotonic()  # images/s measures training, not grids and saving
    flush()
    bar.close()
    if step > saved_step:  # the clean end: a final grid, train state and export
        if grid_step != step:
            save_samples()
        save_checkpoint()
    return {
        "step": step, "steps_this_call": step - start_step, "images_seen": images_seen(),
        "loss": float(np.mean([r["loss"] for r in rows[-cfg.log_every:]])) if rows else math.nan,
        "images_per_s": (step - start_step) * cfg.batch_size / (train_seconds - prior_seconds)
        if rows else math.nan,
        "minutes": (time.monotonic() - call_start) / 60, "export": str(export_dir),
        "train_state": str(state_dir), "device": str(device), "num_processes": world,
        "main_process": main,
    }
