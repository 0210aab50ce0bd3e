"""The guided DDPM loop (DESIGN.md D1-D7). It emits one read-only GuidanceStep per step.

:func:`sample_guided` is a plain function, like k-diffusion's samplers: everything it does is in
the loop below, numbered by the equations of DESIGN.md §3. Observers (the recorder, a progress
bar) receive a frozen :class:`GuidanceStep` of detached copies, so they can never change a sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

from gradcheck import CLASS_NAMES
from gradcheck.guidance import (
    GuidanceSource,
    cosine,
    normalize_guidance,
    score_from_eps,
    x0_from_eps,
)
from gradcheck.stabilizers import Stabilizer, make_stabilizer
from gradcheck.utils import GradcheckError, randn_per_sample

VARIANCE_TYPES = ("fixed_small", "fixed_large")
"""Scheduler variance types whose ``_get_variance`` is sigma_t^2 itself (D6 needs sigma_t^2)."""


@dataclass(frozen=True)
class GuidanceStep:
    """What happened at one sampling step, for observers. Tensors are detached copies: (B, ...)."""

    step: int  # k = 0 .. num_steps - 1
    num_steps: int
    t: int  # DDPM timestep
    abar: float  # abar_t
    sigma2: float  # sigma_t^2 of the (respaced) step, D6
    scale: float  # s, D6
    target: int
    x0_estimate: bool  # whether the classifier saw x0_hat (D2) instead of x_t
    sample: torch.Tensor  # (B,) int64 global sample indices
    x_t: torch.Tensor  # (B, 3, H, W)
    eps: torch.Tensor  # eps_theta(x_t, t)
    score: torch.Tensor  # D1
    x0_hat: torch.Tensor  # D2
    grad_raw: torch.Tensor  # g_t, D3 (zeros without guidance)
    grad_stabilized: torch.Tensor  # h_t, D4
    grad_applied: torch.Tensor  # gtilde_t, D5
    vanished: torch.Tensor  # (B,) bool, D5
    cos_prev_raw: torch.Tensor  # (B,) float64, D7; NaN at step 0
    cos_prev_applied: torch.Tensor  # (B,) float64, D7; NaN at step 0
    log_probs: torch.Tensor  # (B, C) log p(. | x_in); NaN without guidance
    log_probs_x0: torch.Tensor  # (B, C) log p(. | x0_hat); NaN without guidance
    x_prev: torch.Tensor  # x_{t-1}, the step's result


Observer = Callable[[GuidanceStep], None]


def _frozen_copy(v: torch.Tensor) -> torch.Tensor:
    return v.detach().clone()


def check_sampling_args(
    scheduler: DDPMScheduler, steps: int, scale: float, target: int
) -> None:
    """Raise a GradcheckError on arguments the loop cannot honour."""
    n_train = scheduler.config.num_train_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= n_train:
        raise GradcheckError(f"steps must be an integer in 1..{n_train} (T), got {steps}")
    if not math.isfinite(scale) or scale < 0:
        raise GradcheckError(f"scale must be a finite number >= 0, got {scale}")
    if not 0 <= target < len(CLASS_NAMES):
        raise GradcheckError(f"target must be in 0..{len(CLASS_NAMES) - 1}, got {target}")
    if scheduler.config.variance_type not in VARIANCE_TYPES:
        raise GradcheckError(
            f"scheduler variance_type {scheduler.config.variance_type!r} is not supported; "
            f"use one of: {', '.join(VARIANCE_TYPES)}"
        )
    if scheduler.config.prediction_type != "epsilon":
        raise GradcheckError(
            f"the DDPM must predict epsilon (D1), got {scheduler.config.prediction_type!r}"
        )


def sample_guided(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    guidance: GuidanceSource | None,
    generators: Sequence[torch.Generator],
    *,
    target: int = 0,
    scale: float = 1.0,
    normalize: bool = True,
    stabilizer: str | Callable[[], Stabilizer] = "none",
    steps: int = 1000,
    sample_indices: Sequence[int] | None = None,
    observers: Sequence[Observer] = (),
) -> torch.Tensor:
    """Classifier-guided DDPM sampling of one batch -> x_0 (B, 3, H, W), unclamped.

    One generator per sample draws x_T and every step's noise (EDM's per-sample seeding), so a
    sample does not depend on its batch, and runs sharing the generators' seeds are paired:
    ``scale=0`` gives exactly the unguided sample. ``guidance=None`` samples unguided (g = 0).
    ``steps`` < T respaces the chain with ``scheduler.set_timesteps``.
    """
    check_sampling_args(scheduler, steps, scale, target)
    b = len(generators)
    if b == 0:
        raise GradcheckError("need at least one generator (one per sample)")
    indices = list(range(b)) if sample_indices is None else list(sample_indices)
    if len(indices) != b:
        raise GradcheckError(f"got {b} generators but {len(indices)} sample indices")
    device = unet.device
    n_classes = len(CLASS_NAMES)
    c, size = unet.config.in_channels, unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    y = torch.full((b,), target, dtype=torch.long, device=device)
    sample_ids = torch.as_tensor(indices, dtype=torch.long)
    stab = make_stabilizer(stabilizer) if isinstance(stabilizer, str) else stabilizer()
    scheduler.set_timesteps(steps)
    gens = list(generators)
    nan = float("nan")

    # 0. x_T ~ N(0, I), drawn per sample.
    x = randn_per_sample((c, *size), gens, device)
    g_prev = gtilde_prev = None
    for k, t in enumerate(scheduler.timesteps.tolist()):
        abar_cpu = scheduler.alphas_cumprod[t]  # read on the host: no device sync per step
        abar = abar_cpu.to(device=device, dtype=x.dtype)

        def eps_fn(x_in: torch.Tensor, t: int = t) -> torch.Tensor:
            return unet(x_in, t).sample

        # 1. eps_theta(x_t, t) and the raw gradient g_t = grad_{x_t} log p(y | x_in) (D3); the
        #    source decides whether x_in is x_t or x0_hat (D2, gradient through the UNet).
        if guidance is None:
            with torch.no_grad():
                eps = eps_fn(x)
            g = torch.zeros_like(x)
            log_probs = log_probs_x0 = torch.full((b, n_classes), nan, device=device)
        else:
            out = guidance(eps_fn, x, t, abar, y)
            eps, g, log_probs, log_probs_x0 = out.eps, out.grad, out.log_probs, out.log_probs_x0

        # 2. The DDPM score (D1) and the x0-estimate (D2), from the same eps.
        score = score_from_eps(eps, abar)
        x0_hat = x0_from_eps(x, eps, abar)

        # 3. Stabiliser h_t = S(g_t) (D4), per-sample state, fresh for this call.
        h = stab(g)

        # 4. Normalisation gtilde_t = ||score|| h / ||h|| (D5); vanished gradients give 0.
        gtilde, vanished = normalize_guidance(h, score, normalize)

        # 5. Guided step (D6): the scheduler's unguided step with each sample's own noise draw,
        #    then the mean shift s sigma_t^2 gtilde_t (Dhariwal & Nichol Alg. 1).
        with torch.no_grad():
            x_prev = scheduler.step(eps, t, x, generator=gens).prev_sample
        sigma2 = float(scheduler._get_variance(t))
        x_prev = x_prev + (scale * sigma2) * gtilde

        # 6. Stability (D7): cosine to the previous sampling step, raw and applied.
        if g_prev is None:
            cos_prev_raw = cos_prev_applied = torch.full((b,), nan, dtype=torch.float64)
        else:
            cos_prev_raw, cos_prev_applied = cosine(g, g_prev), cosine(gtilde, gtilde_prev)
        g_prev, gtilde_prev = g, gtilde

        # 7. Report the step to the observers (copies: they cannot change the sample).
        if observers:
            report = GuidanceStep(
                step=k, num_steps=steps, t=t, abar=float(abar_cpu), sigma2=sigma2, scale=scale,
                target=target, x0_estimate=bool(getattr(guidance, "x0_estimate", False)),
                sample=sample_ids.clone(), x_t=_frozen_copy(x), eps=_frozen_copy(eps),
                score=_frozen_copy(score), x0_hat=_frozen_copy(x0_hat), grad_raw=_frozen_copy(g),
                grad_stabilized=_frozen_copy(h), grad_applied=_frozen_copy(gtilde),
                vanished=_frozen_copy(vanished).cpu(), cos_prev_raw=cos_prev_raw.cpu(),
                cos_prev_applied=cos_prev_applied.cpu(), log_probs=_frozen_copy(log_probs),
                log_probs_x0=_frozen_copy(log_probs_x0), x_prev=_frozen_copy(x_prev),
            )
            for observe in observers:
                observe(report)
        x = x_prev.detach()
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """x_0 in [-1, 1] (B, 3, H, W) -> uint8 images (B, H, W, 3) on the CPU."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(
        0, 2, 3, 1
    ).cpu()
