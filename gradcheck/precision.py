"""How much reduced precision changes the guidance gradients, measured on any machine
(``gradcheck precision``; README, "Precision").

:func:`emulate_tf32` makes convolutions and linear layers round their operands to TF32 whenever
PyTorch's TF32 flags for them are on, so the switches of
:meth:`gradcheck.numerics.NetworkCalls.numerics` act on a CPU too (attention's matmuls excepted).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gradcheck.guidance import ClassifierGuidance, cosine, flat_norm
from gradcheck.models import check_image_size
from gradcheck.numerics import NetworkCalls, d2_gain
from gradcheck.paths import default_data_root
from gradcheck.utils import (
    GradcheckError,
    check_choice,
    check_positive,
    check_seed,
    from_uint8,
    randn_per_sample,
    sample_generators,
)

TF32_DROPPED_BITS = 13
"""float32 keeps 23 explicit mantissa bits, TF32 keeps 10: the lowest 13 are rounded away."""

MODES = ("fp64", "tf32", "bf16", "fp16", "auto", "cpu-auto")
"""Precisions :func:`gradient_agreement` compares with float32 (see ``gradcheck precision``)."""


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (ties to even, assumed to be the GPU's), still float32;
    same shape. Inf and NaN pass through; values beyond the largest TF32 number round to inf."""
    if x.dtype != torch.float32:
        raise GradcheckError(f"round_tf32 takes float32 tensors, got {x.dtype}")
    bits = x.view(torch.int32)
    lsb = (bits >> TF32_DROPPED_BITS) & 1
    half = (1 << (TF32_DROPPED_BITS - 1)) - 1
    rounded = (bits + half + lsb) & ~((1 << TF32_DROPPED_BITS) - 1)
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x)


class _RoundGradTF32(torch.autograd.Function):
    """Identity forward; rounds the incoming gradient to TF32 (the backward GEMM's operand)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return round_tf32(grad)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """round_tf32 in the forward pass, identity gradient (the rounding is the GEMM's)."""
    return x + (round_tf32(x.detach()) - x).detach()


def _tf32_on(kind: str) -> bool:
    """Whether PyTorch would use TF32 for float32 ``kind`` ("conv" | "matmul") on a GPU now."""
    flag = (torch.backends.cudnn.conv.fp32_precision if kind == "conv"
            else torch.backends.cuda.matmul.fp32_precision)
    return flag == "tf32"


def _tf32_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: recompute a float32 conv / linear layer in TF32 when TF32 is on for it."""
    (x,) = args
    kind = "conv" if isinstance(module, nn.Conv2d) else "matmul"
    if output.dtype != torch.float32 or not _tf32_on(kind):
        return None
    w = _ste_round(module.weight)
    if isinstance(module, nn.Conv2d):
        out = module._conv_forward(_ste_round(x), w, module.bias)
    else:
        out = F.linear(_ste_round(x), w, module.bias)
    return _RoundGradTF32.apply(out)


@contextmanager
def emulate_tf32(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the convolutions and linear layers of ``modules`` compute as TF32 would
    whenever PyTorch's TF32 flags are on for them (a second evaluation; weights unchanged)."""
    handles = [m.register_forward_hook(_tf32_hook) for module in modules
               for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _check_modes(modes: Sequence[str]) -> None:
    if not modes:
        raise GradcheckError(f"name at least one precision mode ({', '.join(MODES)})")
    for mode in modes:
        check_choice("precision mode", mode, MODES)


def _check_timesteps(timesteps: Sequence[int], num_train_timesteps: int | None = None) -> None:
    """Raise unless ``timesteps`` are given, distinct and in 0..num_train_timesteps - 1."""
    if not timesteps:
        raise GradcheckError("name at least one timestep")
    if len(set(timesteps)) != len(timesteps):
        raise GradcheckError(f"timesteps repeat: {', '.join(map(str, timesteps))}")
    top = num_train_timesteps
    bad = [t for t in timesteps if t < 0 or (top is not None and t >= top)]
    if bad:
        raise GradcheckError(f"timestep {bad[0]} is outside 0-{top - 1}" if top is not None
                             else f"timestep {bad[0]} is negative")


def _noised(images: torch.Tensor, abar: float, seed: int, t: int) -> torch.Tensor:
    """x_t = sqrt(abar) x_0 + sqrt(1 - abar) noise, float32; noise depends on (seed, t, i)."""
    gens = sample_generators(seed * 1000 + t, range(images.shape[0]))
    noise = randn_per_sample(tuple(images.shape[1:]), gens, images.device)
    return math.sqrt(abar) * images + math.sqrt(1 - abar) * noise


def _gradient(mode: str, unet: nn.Module, clf: nn.Module, x_t: torch.Tensor, t: int,
              abar: float, y: torch.Tensor, x0_estimate: bool) -> torch.Tensor:
    """g_t (D3) under one mode, with the call settings the sampler would use at this t (fp64:
    float64 models given, x_t converted)."""
    device = x_t.device
    # The GPU's settings on any device: TF32 is emulated on a CPU, float16 runs for real.
    if mode == "cpu-auto":
        call = NetworkCalls.for_precision("auto", cuda=False)
    else:
        call = NetworkCalls.for_precision("fp32" if mode == "fp64" else mode, cuda=True)
    call = call.at(abar, x0_estimate)
    t_dev = torch.full((), t, dtype=torch.long, device=device)
    if mode == "fp64":
        x_t = x_t.double()

    def eps_fn(x_in: torch.Tensor) -> torch.Tensor:
        with call.unet_autocast(device):
            return unet(x_in, t_dev).sample.to(x_in.dtype)

    emulation = emulate_tf32(unet, clf) if device.type != "cuda" and call.tf32 else nullcontext()
    with emulation, call.numerics():
        source = ClassifierGuidance(clf, x0_estimate)
        return source(eps_fn, x_t, t, abar, y, net=call).grad  # float64


def gradient_agreement(
    unet: nn.Module, classifiers: dict[str, nn.Module], alphas_cumprod: torch.Tensor,
    images: torch.Tensor, target: int, timesteps: Sequence[int], modes: Sequence[str] = MODES,
    x0_estimate: bool = True, seed: int = 0, progress: bool = False,
) -> pd.DataFrame:
    """Each mode's guidance gradient against float32's, on noised ``images`` (N, 3, H, W): per
    (classifier, t, mode) the min and mean over images of the cosine to it and of
    ||g_mode - g_fp32|| / ||g_fp32||. ``auto`` is the GPU's, ``cpu-auto`` the CPU's; fp64 runs
    everything in float64 (the check on float32 itself)."""
    _check_modes(modes)
    _check_timesteps(timesteps, len(alphas_cumprod))
    y = torch.full((images.shape[0],), target, dtype=torch.long, device=images.device)
    models = {name: {"fp32": (unet, clf)} for name, clf in classifiers.items()}
    if "fp64" in modes:
        unet64 = copy.deepcopy(unet).double()
        for name, clf in classifiers.items():
            models[name]["fp64"] = (unet64, copy.deepcopy(clf).double())
    rows = []
    bar = tqdm(total=len(timesteps) * len(classifiers), desc="precision (t, classifier)",
               disable=not progress)
    for t in timesteps:
        abar = float(alphas_cumprod[t])
        x_t = _noised(images, abar, seed, t)
        for name, clf in classifiers.items():
            bar.set_postfix_str(f"{name}, t={t}")
            ref = _gradient("fp32", unet, clf, x_t, t, abar, y, x0_estimate)
            for mode in modes:
                u, c = models[name].get(mode, models[name]["fp32"])
                g = _gradient(mode, u, c, x_t, t, abar, y, x0_estimate)
                cos = cosine(g, ref)
                rel = flat_norm(g - ref) / flat_norm(ref)
                rows.append({"classifier": name, "t": t, "gain": d2_gain(abar), "mode": mode,
                             "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                             "rel_err_max": float(rel.max()), "rel_err_mean": float(rel.mean())})
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def measure_precision(
    ddpm: str | None = None, classifiers: Sequence[str] = ("nonrobust", "robust"),
    data_root: str | None = None, timesteps: Sequence[int] = (999, 900, 800, 700, 500, 100),
    num_samples: int = 4, target: str | int = "baseball", modes: Sequence[str] = MODES,
    x0_estimate: bool = True, device: str = "auto", seed: int = 0, progress: bool = False,
) -> pd.DataFrame:
    """:func:`gradient_agreement` on models given as in ``gradcheck run`` and the first
    ``num_samples`` test images of ``data_root``."""
    from gradcheck.config import RunConfig
    from gradcheck.data.sportballs import load_split
    from gradcheck.paths import default_ddpm
    from gradcheck.runner import _frozen, _load_classifier, _load_ddpm, parse_target
    from gradcheck.utils import resolve_device

    _check_modes(modes)
    _check_timesteps(timesteps)
    check_positive("num_samples", num_samples)
    check_seed(seed)
    if not classifiers:
        raise GradcheckError("name at least one classifier")
    if "oracle" in classifiers:
        raise GradcheckError("classifier 'oracle' has no network to run in another precision "
                             "(its gradient is exact on x_t, D8); choose nonrobust, robust, "
                             "adversarial or a classifier folder")
    y = parse_target(target)
    dev = resolve_device(device)
    unet, scheduler = _load_ddpm(ddpm or str(default_ddpm()))
    _check_timesteps(timesteps, len(scheduler.alphas_cumprod))
    models = {}
    for name in classifiers:
        model, config = _load_classifier(RunConfig(classifier=name), dev)
        check_image_size(config, unet.config.sample_size, f"classifier {name}", "the DDPM makes")
        models[name] = _frozen(model)
    data_root = data_root or str(default_data_root())
    images, _ = load_split(data_root, "test")
    if num_samples > len(images):
        raise GradcheckError(f"num_samples {num_samples} is more than the {len(images)} test "
                             f"images of {data_root}")
    size = unet.config.sample_size
    if images.shape[1] != size:
        raise GradcheckError(f"the test images of {data_root} are {images.shape[1]}x"
                             f"{images.shape[2]} but the DDPM makes {size}x{size}")
    x0 = from_uint8(torch.from_numpy(np.array(images[:num_samples])).permute(0, 3, 1, 2))
    return gradient_agreement(_frozen(unet.to(dev)), models, scheduler.alphas_cumprod,
                              x0.to(dev), y, timesteps, modes, x0_estimate, seed, progress)


def format_agreement(table: pd.DataFrame) -> str:
    """The terminal table: one row per (classifier, t), the minimum cosine per mode."""
    table = table.assign(gain=table["gain"].round(1))
    wide = table.pivot_table(index=["classifier", "t", "gain"], columns="mode",
                             values="cos_min", aggfunc="min", sort=False)
    wide = wide[[m for m in MODES if m in wide.columns]].sort_index(
        level=["classifier", "t"], ascending=[True, False])
    return ("minimum cosine to the float32 gradient (1 = identical direction)\n"
            + wide.to_string(float_format=lambda v: f"{v:.4f}"))
