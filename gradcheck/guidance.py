"""Guidance maths as small functions (docs/maths.md D1, D2, D3, D5, D7) and gradient sources.

A *gradient source* answers one question per sampling step: given x_t and t, what are
eps_theta(x_t, t) and the raw guidance gradient g_t = grad_{x_t} log p(y | x_in) (D3)? Whether
the classifier sees x_t or the x0-estimate (D2) is a property of the source, not a flag of the
sampler (k-diffusion style: guidance wraps the model function). The source also runs the UNet,
because with the x0-estimate the gradient flows through it; the same eps then drives the DDPM
step, so no UNet call is spent twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradcheck.models import classifier_log_probs
from gradcheck.numerics import NetworkCalls
from gradcheck.oracle import EmpiricalOracle
from gradcheck.utils import GradcheckError, check_choice

EpsFn = Callable[[torch.Tensor], torch.Tensor]
"""x_t (B, 3, H, W) -> eps_theta(x_t, t) (B, 3, H, W) at the current step's t."""


# ---- D1, D2, D5, D7 -------------------------------------------------------------------------


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) for broadcasting against images."""
    return v.view(-1, 1, 1, 1)


def _scalar(abar: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """abar_t in ``like``'s dtype. A Python float or a 0-d CPU tensor stays on the host, where
    PyTorch passes it to the kernels as a scalar: no host-to-device copy, no sync per step."""
    return torch.as_tensor(abar, dtype=like.dtype)


def score_from_eps(eps: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """D1: score_theta(x_t) = -eps_theta(x_t, t) / sqrt(1 - abar_t); (B, 3, H, W)."""
    return -eps / (1 - _scalar(abar, eps)).sqrt()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """D2 (GradCheck Eq. 3): x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); unclipped."""
    a = _scalar(abar, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def _pow2_peak(v: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, 1): per row the power of two at or below its largest |entry|; 1 where the
    row is 0 or not finite."""
    peak = v.abs().amax(dim=1, keepdim=True)
    ok = torch.isfinite(peak) & (peak > 0)
    return torch.where(ok, torch.exp2(torch.floor(torch.log2(torch.where(ok, peak, 1.0)))), 1.0)


def flat_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm: (B, ...) -> (B,), in v's dtype.

    Each row is scaled by a power of two to a largest entry in [1, 2) first, and the norm
    scaled back: bit-identical to ``norm()`` wherever no square under- or overflows, and right
    for float64 entries below 1e-154 (docs/maths.md D5).
    """
    v = v.flatten(1)
    k = _pow2_peak(v)
    return (v / k).norm(dim=1) * k[:, 0]


def normalize_guidance(
    h: torch.Tensor, score: torch.Tensor, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """D5 (GradCheck Eq. 2): gtilde = ||score|| h / ||h|| per sample, or gtilde = h.

    h, score (B, 3, H, W) -> (gtilde (B, 3, H, W) in score's dtype, vanished (B,) bool), in
    float64 inside. Only where h is exactly 0 or not finite is gtilde = 0 and the sample
    flagged: no NaN reaches a sample, and a tiny but exact h keeps its direction (no absolute
    threshold: docs/maths.md D5).
    """
    h_norm = flat_norm(h.double())
    vanished = ~torch.isfinite(h_norm) | (h_norm == 0)
    if normalize:
        factor = flat_norm(score.double()) / torch.where(vanished, torch.ones_like(h_norm), h_norm)
    else:
        factor = torch.ones_like(h_norm)
    # where(), not a product: 0 * inf would be NaN for a non-finite h.
    gtilde = torch.where(_per_sample(vanished), 0.0, h.double() * _per_sample(factor))
    return gtilde.to(score.dtype), vanished


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity (D7) of (B, ...) tensors -> (B,) float64.

    NaN where either vector is zero (the angle is undefined), never a made-up 0 or 1.
    """
    a64, b64 = a.flatten(1).double(), b.flatten(1).double()
    a64, b64 = a64 / _pow2_peak(a64), b64 / _pow2_peak(b64)  # scale-free; see flat_norm
    denom = a64.norm(dim=1) * b64.norm(dim=1)
    dot = (a64 * b64).sum(dim=1)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), float("nan"))


# ---- D3: gradient sources ---------------------------------------------------------------------


@dataclass(frozen=True)
class GradientOutput:
    """What a gradient source returns for one step (all tensors detached).

    The raw gradient g_t = grad_{x_t} log p(y | x_in) (D3) comes as ``direction`` times
    2**``log2_scale`` per sample: past a margin of about 745 g_t is below float64's range and
    :attr:`grad` reads 0, while its direction, all that D5 and the cosines need, stays exact.
    """

    eps: torch.Tensor  # (B, 3, H, W) eps_theta(x_t, t)
    direction: torch.Tensor  # (B, 3, H, W) float64: g_t / 2**log2_scale, of order 1
    log2_scale: torch.Tensor  # (B,) float64
    log_probs: torch.Tensor  # (B, C) log p(. | x_in), the input the gradient came from
    log_probs_x0: torch.Tensor  # (B, C) log p(. | x0_hat) (t = 0 for time-aware models)

    @property
    def grad(self) -> torch.Tensor:
        """(B, 3, H, W) float64: g_t itself (:func:`unscale`)."""
        return unscale(self.direction, self.log2_scale)


class GuidanceSource:
    """Base class: ``source(eps_fn, x_t, t, abar, y, net, eps) -> GradientOutput`` (D3).

    ``eps_fn`` maps a piece of x_t to eps_theta (one UNet call of ``net.rows`` rows, float32);
    ``eps`` is eps_theta(x_t, t) when the sampler already has it (sources with
    ``x0_estimate=False`` never differentiate through the UNet, so the sampler evaluates it for
    all of them at once).
    """

    x0_estimate: bool = False

    def __call__(
        self, eps_fn: EpsFn, x_t: torch.Tensor, t: int, abar: torch.Tensor | float,
        y: torch.Tensor, net: NetworkCalls = NetworkCalls(), eps: torch.Tensor | None = None,
    ) -> GradientOutput:
        """x_t (B, 3, H, W), t, abar_t, y (B,) -> eps, g_t and log-probabilities."""
        raise NotImplementedError


LOG_PROBS = ("stable", "log-softmax")
"""How D3 differentiates log p(y | x): ``stable`` (:func:`target_log_prob`, exact at any
margin) or ``log-softmax`` (autograd through log_softmax, which in float32 drops the target
logit's term once p(y | x) rounds to 1; the runs made before the stable form existed)."""


def target_log_prob(log_probs: torch.Tensor, y: torch.Tensor, form: str = "stable"
                    ) -> torch.Tensor:
    """(B, C) log-probabilities (or logits), (B,) labels -> (B,) log p(y | x), the objective D3
    differentiates (docs/maths.md D3).

    ``stable``: ``-softplus(logsumexp_{j != y} z_j - z_y)``, whose gradient w.r.t. the logits,
    ``sigmoid(L) (e_y - softmax_{j != y}(z))``, is exact at any margin. ``log-softmax``: autograd
    through log_softmax, whose target term is 0 once p_y rounds to 1 (kept for comparison).
    """
    if form == "log-softmax":
        return picked(log_probs, y)
    z = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))
    others = z.scatter(1, y[:, None], float("-inf"))
    return -F.softplus(torch.logsumexp(others, dim=1) - picked(z, y))


def logit_cotangent(log_probs: torch.Tensor, y: torch.Tensor, form: str = "stable"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """d log p(y | x) / d log_probs per sample, scaled to a largest entry in [1, 2) -> (scaled
    cotangent (B, C) in log_probs' dtype, log2 of the scale (B,) float64: an integer).

    The networks' backward passes run on this cotangent of order 1 (no float32 subnormals), the
    true gradient being ``2**log2_scale`` times theirs (:func:`unscale`; docs/maths.md D3).
    Past a margin of about 708, where the float64 cotangent leaves the normal range, the stable
    form's comes from its closed form in the log domain, exact at any margin; elsewhere it is
    autograd's, bit for bit. The log2 scale is 0 where the cotangent is 0 (``log-softmax``) or
    not finite.
    """
    z = log_probs.detach().double().requires_grad_(True)
    with torch.enable_grad():
        (v,) = torch.autograd.grad(target_log_prob(z, y, form).sum(), z)
    z, peak = z.detach(), _pow2_peak(v)
    v, log2_scale = v / peak, torch.log2(peak[:, 0])
    if form == "stable":  # computed always (B x C numbers), selected without a host sync
        others = z.scatter(1, y[:, None], float("-inf"))
        log2_s = F.logsigmoid(torch.logsumexp(others, dim=1) - picked(z, y)) / math.log(2)
        exponent = torch.floor(log2_s)
        direction = F.one_hot(y, z.shape[1]).double() - torch.softmax(others, dim=1)
        closed = direction * torch.exp2(log2_s - exponent)[:, None]
        tiny = (peak[:, 0] < torch.finfo(v.dtype).tiny) | (v.abs().amax(dim=1) == 0)
        tiny &= torch.isfinite(exponent) & torch.isfinite(closed).all(dim=1)
        v = torch.where(tiny[:, None], closed, v)
        log2_scale = torch.where(tiny, exponent, log2_scale)
    return v.to(log_probs.dtype), log2_scale


def unscale(g: torch.Tensor, log2_scale: torch.Tensor) -> torch.Tensor:
    """(B, ...) gradient of a scaled cotangent, (B,) log2 of its scale -> the true gradient in
    float64 (float32 loses it past a margin of about 100), 0 below float64's range (a margin of
    about 745), where its direction ``g`` still guides (:class:`GradientOutput`)."""
    shape = [-1, *[1] * (g.dim() - 1)]
    e = log2_scale.double()
    low = e.clamp(min=-1022)  # 2**e is itself 0 below 2**-1074: two exact steps
    return g.double() * torch.exp2(low).reshape(shape) * torch.exp2(e - low).reshape(shape)


def log_prob_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | int,
    form: str = "stable",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, 3, H, W), labels y (B,), t -> (direction (B, 3, H, W) float64, log2 scale (B,),
    log p(. | x) (B, C)), detached: grad_x log p(y | x) = direction 2**log2_scale
    (:func:`unscale`), D3 on x_t for a classifier or the oracle's exact D8 (its autograd backward
    is the closed form); ``form`` as in :func:`target_log_prob`, the backward as in
    :func:`logit_cotangent`."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        lp = classifier_log_probs(model, x, t)
        v, log2_scale = logit_cotangent(lp, y, form)
        (g,) = torch.autograd.grad(lp, x, grad_outputs=v)
    return g.double(), log2_scale, lp.detach()


def picked(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C), (B,) -> (B,) log p(y_i | x_i) (a gather: no host sync for bounds checks)."""
    return log_probs.gather(1, y[:, None])[:, 0]


class ClassifierGuidance(GuidanceSource):
    """D3 with a differentiable classifier (or the empirical oracle, D8).

    ``x0_estimate=False``: x_in = x_t, time-aware classifiers get t.
    ``x0_estimate=True``: x_in = x0_hat (D2), time-aware classifiers get t = 0, and the gradient
    w.r.t. x_t flows through the UNet (GradCheck §2.1).
    """

    def __init__(self, classifier: nn.Module, x0_estimate: bool = False,
                 log_prob: str = "stable") -> None:
        if classifier.training:
            raise GradcheckError("the guiding classifier must be in eval() mode (D3)")
        if x0_estimate and isinstance(classifier, EmpiricalOracle):
            raise GradcheckError(
                "the oracle is exact on x_t itself (D8); --x0-estimate does not apply to it"
            )
        check_choice("log_prob", log_prob, LOG_PROBS)
        self.classifier = classifier
        self.x0_estimate = x0_estimate
        self.log_prob = log_prob

    def __call__(
        self, eps_fn: EpsFn, x_t: torch.Tensor, t: int, abar: torch.Tensor | float,
        y: torch.Tensor, net: NetworkCalls = NetworkCalls(), eps: torch.Tensor | None = None,
    ) -> GradientOutput:
        """x_t (B, 3, H, W), t, abar_t, y (B,) -> eps, g_t and log-probabilities.

        Each piece of ``net.rows`` rows is differentiated on its own: samples are independent
        in eval mode, so the gradient of the piece's summed log-probabilities is per sample, and
        only one piece's graph is alive at a time.
        """
        clf = self.classifier

        def x0_piece(x: torch.Tensor, yy: torch.Tensor):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                e = eps_fn(x)
                x0 = x0_from_eps(x, e, abar)
                lp = classifier_log_probs(clf, x0, 0)
                v, log2_scale = logit_cotangent(lp, yy, self.log_prob)
                if not net.scaled_backward:
                    (g,) = torch.autograd.grad(lp, x, grad_outputs=v)
                    return e.detach(), g.double(), log2_scale, lp.detach()
                # float16 UNet: its backward would underflow for small gradients (robust
                # classifiers) and overflow for large ones. The vector-Jacobian product is
                # linear, so each sample's gradient w.r.t. x0_hat enters it scaled by a power
                # of two to a largest entry in [1, 2) and the result is scaled back, all on the
                # device (GradScaler's idea, per sample).
                (u,) = torch.autograd.grad(lp, x0, grad_outputs=v)
                k = _per_sample(_pow2_peak(u.flatten(1)))
                (g,) = torch.autograd.grad(x0, x, grad_outputs=u / k)
            return e.detach(), g.double() * k.double(), log2_scale, lp.detach()

        if self.x0_estimate:
            eps, direction, log2_scale, log_probs = net.map(x0_piece, x_t, y)
            return GradientOutput(eps, direction, log2_scale, log_probs, log_probs_x0=log_probs)
        if eps is None:
            with torch.no_grad():
                eps = net.map(eps_fn, x_t)
        direction, log2_scale, log_probs = net.map(
            lambda x, yy: log_prob_gradient(clf, x, yy, t, self.log_prob), x_t, y)
        with torch.no_grad():
            log_probs_x0 = net.map(lambda x: classifier_log_probs(clf, x, 0),
                                   x0_from_eps(x_t, eps, abar))
        return GradientOutput(eps, direction, log2_scale, log_probs, log_probs_x0)
