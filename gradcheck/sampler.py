"""The guided DDPM loop (docs/maths.md D1-D7).

:func:`sample_reference` is the loop to read: one configuration, D1-D7 top to bottom in one
page. :func:`sample_guided` computes the same samples bit for bit (tested) with what a study
needs on top: configurations ("lanes") sharing seeds, noise and UNet calls
(:func:`sample_configs`), fixed row pieces so that no batch size changes a sample
(:class:`~gradcheck.numerics.NetworkCalls`), no wait for the GPU, and observers that receive a
frozen :class:`GuidanceStep` of detached copies each step, so they cannot change a sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

from gradcheck import CLASS_NAMES
from gradcheck.guidance import (
    EpsFn,
    GuidanceSource,
    cosine,
    flat_norm,
    normalize_guidance,
    score_from_eps,
    x0_from_eps,
)
from gradcheck.numerics import NetworkCalls
from gradcheck.stabilizers import Stabilizer, make_stabilizer
from gradcheck.utils import GradcheckError, check_choice, randn_per_sample

NORMALIZE_TO = ("score", "eps")
"""D5's reference norm: the score's (docs/maths.md D5, GradCheck Eq. 2) or eps_theta's (Augustin et
al.'s code, ``_renormalize_gradient``); they differ by 1 / sqrt(1 - abar_t)."""
NULL_SEED_SALT = 0x5EED_0F_A11  # the null-baseline generators' seeds: the sample's, salted
VARIANCE_TYPES = ("fixed_small", "fixed_large")
"""Scheduler variance types whose ``_get_variance`` is sigma_t^2 itself (D6 needs sigma_t^2)."""


@dataclass(frozen=True)
class GuidanceStep:
    """What happened at one sampling step, for observers. Tensors are detached copies on the
    sampling device, (B, ...), except ``sample`` (on the CPU); reading them on the host is the
    observer's choice (and, on a GPU, a sync)."""

    step: int  # k = 0 .. num_steps - 1
    num_steps: int
    t: int  # DDPM timestep
    abar: float  # abar_t
    sigma2: float  # sigma_t^2 of the (respaced) step, D6
    scale: float  # s, D6
    target: int
    x0_estimate: bool  # whether the classifier saw x0_hat (D2) instead of x_t
    guided: bool  # whether a gradient source guided this lane (False: log_probs are NaN)
    sample: torch.Tensor  # (B,) int64 global sample indices
    x_t: torch.Tensor  # (B, 3, H, W)
    eps: torch.Tensor  # eps_theta(x_t, t)
    score: torch.Tensor  # D1
    x0_hat: torch.Tensor  # D2
    grad_raw: torch.Tensor  # g_t, D3 (zeros without guidance), float64
    grad_direction: torch.Tensor  # g_t / 2**e per sample, exact where g_t underflows (D3)
    grad_stabilized: torch.Tensor  # h_t, D4, float64
    grad_applied: torch.Tensor  # gtilde_t, D5
    vanished: torch.Tensor  # (B,) bool, D5
    cos_prev_raw: torch.Tensor  # (B,) float64, D7; NaN at step 0
    cos_prev_applied: torch.Tensor  # (B,) float64, D7; NaN at step 0
    cos_prev_null: torch.Tensor  # (B,) float64, D7': the same stabiliser on random gradients
    x_norm_ratio: torch.Tensor  # (B,) float64: ||x_t|| over its expected norm (NaN: unknown)
    log_probs: torch.Tensor  # (B, C) log p(. | x_in); NaN without guidance
    log_probs_x0: torch.Tensor  # (B, C) log p(. | x0_hat); NaN without guidance
    x_prev: torch.Tensor  # x_{t-1}, the step's result


Observer = Callable[[GuidanceStep], None]


def d5_input(stabilize: Stabilizer, h: torch.Tensor, direction: torch.Tensor,
             normalize: bool) -> torch.Tensor:
    """What D5 rescales: h_t, or S(g_t's direction) where S is scale-free and D5 is on.

    D5 is scale-free, so a scale-free S (``none``: h = g) gives the same gtilde from g's
    direction, bit for bit wherever g is in float64's normal range, and the right one where g
    itself underflows to 0 (margins past about 745: guidance.logit_cotangent)."""
    if normalize and getattr(stabilize, "scale_free", False):
        return stabilize(direction)
    return h


def _frozen_copy(v: torch.Tensor) -> torch.Tensor:
    return v.detach().clone()


def check_scale(scale: float) -> None:
    """D6's s: a finite number >= 0 (0 = unguided with the same noise)."""
    if not math.isfinite(scale) or scale < 0:
        raise GradcheckError(f"scale must be a finite number >= 0, got {scale}")


def check_sampling_args(
    scheduler: DDPMScheduler, steps: int, scale: float, target: int
) -> None:
    """Raise a GradcheckError on arguments the loop cannot honour."""
    n_train = scheduler.config.num_train_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= n_train:
        raise GradcheckError(f"steps must be an integer in 1..{n_train} (T), got {steps}")
    check_scale(scale)
    if not 0 <= target < len(CLASS_NAMES):
        raise GradcheckError(f"target must be in 0..{len(CLASS_NAMES) - 1}, got {target}")
    if scheduler.config.variance_type not in VARIANCE_TYPES:
        raise GradcheckError(
            f"scheduler variance_type {scheduler.config.variance_type!r} is not supported; "
            f"use one of: {', '.join(VARIANCE_TYPES)}"
        )
    if scheduler.config.thresholding:
        raise GradcheckError("scheduler thresholding is not supported (D6 uses the clipped "
                             "x0 of DDPM); set thresholding=False")
    if scheduler.config.prediction_type != "epsilon":
        raise GradcheckError(
            f"the DDPM must predict epsilon (D1), got {scheduler.config.prediction_type!r}"
        )


@dataclass(frozen=True)
class GuidanceConfig:
    """One guidance configuration of a sampling call: what a ``gradcheck run`` varies. Lanes
    sampled together share x_T and every step's noise: paired as separate runs of a seed."""

    guidance: GuidanceSource | None = None  # None: unguided (g = 0)
    target: int = 0
    scale: float = 1.0
    normalize: bool = True
    stabilizer: str | Callable[[], Stabilizer] = "none"
    observers: Sequence[Observer] = ()
    # D4': a named stabiliser's betas follow diffusion time (beta ** (T // steps)); False
    # counts sampler steps, as the paper's 1,000-step chains did (identical at steps = T).
    diffusion_time: bool = True
    normalize_to: str = "score"  # D5's reference norm: score (docs/maths.md) | eps (Augustin)


def ddpm_step(
    scheduler: DDPMScheduler, eps: torch.Tensor, t: int, x_t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The unguided ancestral step x_t -> x_{t-1} of ``DDPMScheduler.step`` (epsilon prediction,
    clipped x0, fixed variance) with the noise given instead of drawn, so that lanes sharing a
    seed share the draw. The same float32 operations in the same order: bit-identical to
    ``scheduler.step(eps, t, x_t, generator=...)`` fed the same noise (tested)."""
    prev_t = scheduler.previous_timestep(t)
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0 = (x_t - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    xt_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    mean = x0_coeff * x0 + xt_coeff * x_t
    if t > 0:
        return mean + (scheduler._get_variance(t) ** 0.5) * noise
    return mean + 0


def sample_reference(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    guidance: GuidanceSource | None,
    generators: Sequence[torch.Generator],
    *, target: int = 0, scale: float = 1.0, normalize: bool = True, normalize_to: str = "score",
    stabilizer: str = "none", diffusion_time: bool = True, steps: int = 1000,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """The guided loop to read: one configuration, the whole batch, D1-D7 of docs/maths.md top
    to bottom -> x_0 (B, 3, H, W). :func:`sample_guided` computes exactly this (tested
    bit-identical in float32) and adds what a study needs: configurations sharing UNet calls,
    fixed row pieces, the precision policy, and observers that record every step."""
    check_sampling_args(scheduler, steps, scale, target)
    check_choice("normalize_to", normalize_to, NORMALIZE_TO)
    scheduler.set_timesteps(steps)
    T, device, size = scheduler.config.num_train_timesteps, unet.device, unet.config.sample_size
    stabilize = make_stabilizer(stabilizer, T // steps if diffusion_time else 1.0)
    y = torch.full((len(generators),), target, dtype=torch.long, device=device)
    x = randn_per_sample((unet.config.in_channels, size, size), generators, device)  # x_T
    gtilde_prev = None
    for t in scheduler.timesteps.tolist():
        abar = scheduler.alphas_cumprod[t]
        t_dev = torch.full((), t, dtype=torch.long, device=device)

        def eps_fn(x_in: torch.Tensor, t_dev: torch.Tensor = t_dev) -> torch.Tensor:
            return unet(x_in, t_dev).sample.float()

        # D2-D3: eps_theta(x_t, t) and g_t = grad log p(y | x_in), x_in = x_t or x0_hat.
        if guidance is None:
            with torch.no_grad():
                eps, g = eps_fn(x), torch.zeros_like(x, dtype=torch.float64)
            direction = g
        else:
            out = guidance(eps_fn, x, t, abar, y)
            eps, g, direction = out.eps, out.grad, out.direction
        score = score_from_eps(eps, abar)  # D1
        h = stabilize(g)  # D4 (D4': betas in diffusion time)
        reference = score if normalize_to == "score" else eps
        gtilde, _ = normalize_guidance(d5_input(stabilize, h, direction, normalize), reference,
                                       normalize)  # D5
        noise = randn_per_sample(x.shape[1:], generators, device) if t > 0 else None
        sigma2 = float(scheduler._get_variance(t))
        with torch.no_grad():  # D6: the unguided step with the same noise, plus s sigma^2 gtilde
            x = ddpm_step(scheduler, eps, t, x, noise) + (scale * sigma2) * gtilde
        if callback is not None:  # D7: stability, the cosine to the previous step's vector
            cos_prev = None if gtilde_prev is None else cosine(gtilde, gtilde_prev)
            callback({"t": t, "g": g, "gtilde": gtilde, "cos_prev": cos_prev})
        gtilde_prev = gtilde
    return x


def _host_noise(shape: tuple[int, ...], gens: Sequence[torch.Generator],
                device: torch.device) -> torch.Tensor:
    """One normal draw per generator, on its (CPU) generator, copied to ``device`` without a
    sync: the host buffer is pinned and the copy asynchronous (the caching host allocator keeps
    the buffer until the copy has run)."""
    if device.type != "cuda" or any(g.device.type != "cpu" for g in gens):
        return randn_per_sample(shape, gens, device)
    buf = torch.empty((len(gens), *shape), pin_memory=True)
    for i, g in enumerate(gens):
        torch.randn(shape, generator=g, out=buf[i])
    return buf.to(device, non_blocking=True)


def sample_guided(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    guidance: GuidanceSource | None,
    generators: Sequence[torch.Generator],
    *, target: int = 0, scale: float = 1.0, normalize: bool = True,
    stabilizer: str | Callable[[], Stabilizer] = "none", steps: int = 1000,
    sample_indices: Sequence[int] | None = None, observers: Sequence[Observer] = (),
    net: NetworkCalls = NetworkCalls(), diffusion_time: bool = True, normalize_to: str = "score",
    data_second_moment: float | None = None,
) -> torch.Tensor:
    """Classifier-guided DDPM sampling of one batch -> x_0 (B, 3, H, W), unclamped.

    One generator per sample draws x_T and every step's noise (EDM's per-sample seeding), so a
    sample does not depend on its batch, and runs sharing the generators' seeds are paired:
    ``scale=0`` gives exactly the unguided sample. ``guidance=None`` samples unguided (g = 0).
    ``steps`` < T respaces the chain with ``scheduler.set_timesteps``. ``net`` says how the
    networks are evaluated (fixed row pieces, precision): see :class:`NetworkCalls`.
    """
    lane = GuidanceConfig(guidance=guidance, target=target, scale=scale, normalize=normalize,
                          stabilizer=stabilizer, observers=observers,
                          diffusion_time=diffusion_time, normalize_to=normalize_to)
    return sample_configs(unet, scheduler, [lane], generators, steps=steps,
                          sample_indices=sample_indices, net=net,
                          data_second_moment=data_second_moment)[0]


def sample_configs(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    lanes: Sequence[GuidanceConfig],
    generators: Sequence[torch.Generator],
    *, steps: int = 1000, sample_indices: Sequence[int] | None = None,
    net: NetworkCalls = NetworkCalls(), data_second_moment: float | None = None,
) -> list[torch.Tensor]:
    """:func:`sample_guided` for several lanes over the same samples -> one x_0 per lane.

    The lanes' batches are stacked (lane-major, L x B rows). With ``net.rows`` set, every
    network call has that many rows, so each lane's samples are bit-identical to sampling the
    lane alone; the gain is fewer, fuller calls: one UNet pass for all lanes that need no
    gradient through it, one classifier pass per gradient source.

    ``data_second_moment`` (mean of x_0^2 over the data's pixels) gives the ``x_norm_ratio``
    of every step: ||x_t|| / sqrt(D (abar_t m2 + 1 - abar_t)), 1 on the DDPM's own marginal.
    """
    with net.numerics():
        return _sample_configs(unet, scheduler, lanes, generators, steps, sample_indices, net,
                               data_second_moment)


def _sample_configs(
    unet: UNet2DModel, scheduler: DDPMScheduler, lanes: Sequence[GuidanceConfig],
    generators: Sequence[torch.Generator], steps: int, sample_indices: Sequence[int] | None,
    net: NetworkCalls, data_second_moment: float | None,
) -> list[torch.Tensor]:
    """:func:`sample_configs` under its numerics settings: the loop, numbered by D1-D7."""
    for lane in lanes:
        check_sampling_args(scheduler, steps, lane.scale, lane.target)
        check_choice("normalize_to", lane.normalize_to, NORMALIZE_TO)
    if not lanes:
        raise GradcheckError("need at least one lane (guidance configuration)")
    b = len(generators)
    if b == 0:
        raise GradcheckError("need at least one generator (one per sample)")
    indices = list(range(b)) if sample_indices is None else list(sample_indices)
    if len(indices) != b:
        raise GradcheckError(f"got {b} generators but {len(indices)} sample indices")
    if net.rows is not None and net.rows < 1:
        raise GradcheckError(f"net rows must be >= 1, got {net.rows}")
    device = unet.device
    n_lanes, n_classes = len(lanes), len(CLASS_NAMES)
    c, size = unet.config.in_channels, unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    lane_rows = [slice(i * b, (i + 1) * b) for i in range(n_lanes)]
    y = torch.cat([torch.full((b,), lane.target, dtype=torch.long, device=device)
                   for lane in lanes])
    sample_ids = torch.as_tensor(indices, dtype=torch.long)
    time_scale = scheduler.config.num_train_timesteps // steps  # the respaced gap in t

    def fresh_stabilizer(lane: GuidanceConfig) -> Stabilizer:
        if not isinstance(lane.stabilizer, str):
            return lane.stabilizer()
        return make_stabilizer(lane.stabilizer, time_scale if lane.diffusion_time else 1.0)

    stabs = [fresh_stabilizer(lane) for lane in lanes]
    # D7': each lane's stabiliser also runs on isotropic Gaussian gradients of the raw
    # gradients' norms, from per-sample generators of their own (the samples' streams are
    # untouched): the cos_prev that the stabiliser's memory alone produces.
    null_stabs = [fresh_stabilizer(lane) for lane in lanes]
    null_gens = [torch.Generator(g.device).manual_seed((g.initial_seed() ^ NULL_SEED_SALT)
                                                        % (2**63 - 1)) for g in generators]
    null_prev: list[torch.Tensor | None] = [None] * n_lanes
    d_pixels = c * size[0] * size[1]
    # Lanes that need no gradient through the UNet get eps from one shared no-grad pass; lanes
    # sharing a gradient source get their gradients from one pass of it.
    shared = [i for i, lane in enumerate(lanes)
              if lane.guidance is None or not lane.guidance.x0_estimate]
    sources: dict[int, list[int]] = {}
    for i, lane in enumerate(lanes):
        if lane.guidance is not None:
            sources.setdefault(id(lane.guidance), []).append(i)
    scheduler.set_timesteps(steps)
    gens = list(generators)
    nan = float("nan")

    def rows_of(v: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
        """The rows of the lanes ``members`` (in lane order), stacked."""
        return v if len(members) == n_lanes else torch.cat([v[lane_rows[i]] for i in members])

    def place(full: torch.Tensor, part: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
        """The inverse of rows_of: ``part`` into the lanes' rows of ``full`` (no copy when
        ``members`` are all the lanes)."""
        if len(members) == n_lanes:
            return part
        for j, i in enumerate(members):
            full[lane_rows[i]] = part[j * b:(j + 1) * b]
        return full


    # 0. x_T ~ N(0, I), drawn per sample and shared by the lanes.
    x = randn_per_sample((c, *size), gens, device).repeat(n_lanes, 1, 1, 1)
    g_prev: list[torch.Tensor | None] = [None] * n_lanes
    gtilde_prev: list[torch.Tensor | None] = [None] * n_lanes
    for k, t in enumerate(scheduler.timesteps.tolist()):
        abar = scheduler.alphas_cumprod[t]  # a 0-d CPU tensor: a kernel scalar, never a sync
        # t as a device tensor made by a fill: an int would reach the UNet by a host copy.
        t_dev = torch.full((), t, dtype=torch.long, device=device)

        def eps_fn_for(call: NetworkCalls, t_dev: torch.Tensor = t_dev) -> EpsFn:
            def eps_fn(x_in: torch.Tensor) -> torch.Tensor:
                with call.unet_autocast(device):
                    return unet(x_in, t_dev).sample.float()
            return eps_fn

        # 1. eps_theta(x_t, t) and the raw gradient g_t = grad_{x_t} log p(y | x_in) (D3); the
        #    source decides whether x_in is x_t or x0_hat (D2, gradient through the UNet, in
        #    float32 where D2 amplifies rounding: NetworkCalls.at).
        eps = torch.empty_like(x)
        g = torch.zeros_like(x, dtype=torch.float64)  # guidance.unscale: no float32 underflow
        direction = torch.zeros_like(g)  # g's, exact where g underflows float64 (GradientOutput)
        log_probs = torch.full((n_lanes * b, n_classes), nan, device=device)
        log_probs_x0 = torch.full_like(log_probs, nan)
        if shared:
            with torch.no_grad():
                eps = place(eps, net.map(eps_fn_for(net), rows_of(x, shared)), shared)
        for members in sources.values():
            source = lanes[members[0]].guidance
            call = net.at(abar, through_unet=source.x0_estimate)
            # The run's own settings are already in force (sample_configs); switch only for auto.
            with call.numerics() if call is not net else nullcontext():
                out = source(eps_fn_for(call), rows_of(x, members), t, abar, rows_of(y, members),
                             net=call, eps=None if source.x0_estimate else rows_of(eps, members))
            eps = place(eps, out.eps, members)
            g = place(g, out.grad, members)
            direction = place(direction, out.direction, members)
            log_probs = place(log_probs, out.log_probs, members)
            log_probs_x0 = place(log_probs_x0, out.log_probs_x0, members)

        # 2. The DDPM score (D1) and the x0-estimate (D2), from the same eps.
        score = score_from_eps(eps, abar)
        x0_hat = x0_from_eps(x, eps, abar)
        if data_second_moment is None:
            x_norm_ratio = torch.full((n_lanes * b,), nan, dtype=torch.float64, device=device)
        else:
            expected = math.sqrt(d_pixels * (float(abar) * data_second_moment + 1 - float(abar)))
            x_norm_ratio = flat_norm(x).double() / expected

        # 3.-4. Per lane: stabiliser h_t = S(g_t) (D4), per-sample state fresh for this call;
        #    normalisation gtilde_t = ||score|| h / ||h|| (D5), vanished gradients give 0.
        hs, gtildes, vanished = [], [], []
        for i, lane in enumerate(lanes):
            h = stabs[i](g[lane_rows[i]])
            reference = score if lane.normalize_to == "score" else eps
            gt, van = normalize_guidance(
                d5_input(stabs[i], h, direction[lane_rows[i]], lane.normalize),
                reference[lane_rows[i]], lane.normalize)
            hs.append(h)
            gtildes.append(gt)
            vanished.append(van)

        # 5. Guided step (D6): the scheduler's unguided step with each sample's own noise draw
        #    (shared by the lanes), then the mean shift s sigma_t^2 gtilde_t (Dhariwal & Nichol
        #    Alg. 1).
        noise = _host_noise((c, *size), gens, device) if t > 0 else None
        sigma2 = float(scheduler._get_variance(t))
        with torch.no_grad():
            x_prev = ddpm_step(scheduler, eps, t, x,
                               noise.repeat(n_lanes, 1, 1, 1) if noise is not None else None)
        x_prev = torch.cat([x_prev[lane_rows[i]] + (lane.scale * sigma2) * gtildes[i]
                            for i, lane in enumerate(lanes)])

        # 6.-7. Per lane: stability (D7), the cosine to the previous sampling step, raw and
        #    applied; then the step's report to the lane's observers (copies: they cannot
        #    change a sample). Nothing here waits for the device.
        z = _host_noise((c, *size), null_gens, device)  # D7', one draw shared by lanes
        for i, lane in enumerate(lanes):
            rows, gi, di = lane_rows[i], g[lane_rows[i]], direction[lane_rows[i]]
            if g_prev[i] is None:
                cos_prev_raw = cos_prev_applied = torch.full((b,), nan, dtype=torch.float64,
                                                             device=device)
            else:
                cos_prev_raw = cosine(di, g_prev[i])  # g's direction: scale-free
                cos_prev_applied = cosine(gtildes[i], gtilde_prev[i])
            g_prev[i], gtilde_prev[i] = di, gtildes[i]
            # D7' (D5 rescales each sample by a positive number: the cosine is h's). The random
            # gradients get g's norm, or its direction's where the stabiliser is scale-free.
            norm = flat_norm(di if getattr(null_stabs[i], "scale_free", False) else gi)
            h_null = null_stabs[i](z * (norm / flat_norm(z)).view(-1, 1, 1, 1))
            cos_prev_null = (torch.full((b,), nan, dtype=torch.float64, device=device)
                             if null_prev[i] is None else cosine(h_null, null_prev[i]))
            null_prev[i] = h_null
            if lane.observers:
                report = GuidanceStep(
                    step=k, num_steps=steps, t=t, abar=float(abar), sigma2=sigma2,
                    scale=lane.scale, target=lane.target,
                    x0_estimate=bool(getattr(lane.guidance, "x0_estimate", False)),
                    guided=lane.guidance is not None, sample=sample_ids.clone(),
                    x_t=_frozen_copy(x[rows]), eps=_frozen_copy(eps[rows]),
                    score=_frozen_copy(score[rows]), x0_hat=_frozen_copy(x0_hat[rows]),
                    grad_raw=_frozen_copy(gi), grad_direction=_frozen_copy(di),
                    grad_stabilized=_frozen_copy(hs[i]),
                    grad_applied=_frozen_copy(gtildes[i]), vanished=_frozen_copy(vanished[i]),
                    cos_prev_raw=cos_prev_raw.clone(), cos_prev_applied=cos_prev_applied.clone(),
                    cos_prev_null=cos_prev_null, x_norm_ratio=x_norm_ratio[rows].clone(),
                    log_probs=_frozen_copy(log_probs[rows]),
                    log_probs_x0=_frozen_copy(log_probs_x0[rows]),
                    x_prev=_frozen_copy(x_prev[rows]),
                )
                for observe in lane.observers:
                    observe(report)
        x = x_prev.detach()
    return [x[rows] for rows in lane_rows]

