"""Guidance maths as small functions (DESIGN.md D1, D2, D3, D5, D7) and gradient sources.

A *gradient source* answers one question per sampling step: given x_t and t, what are
eps_theta(x_t, t) and the raw guidance gradient g_t = grad_{x_t} log p(y | x_in) (D3)? Whether
the classifier sees x_t or the x0-estimate (D2) is a property of the source, not a flag of the
sampler (k-diffusion style: guidance wraps the model function). The source also runs the UNet,
because with the x0-estimate the gradient flows through it; the same eps then drives the DDPM
step, so no UNet call is spent twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradcheck.models import TimeConditionedClassifier
from gradcheck.oracle import EmpiricalOracle
from gradcheck.utils import GradcheckError

VANISHED_NORM = 1e-12
"""D5: an ||h_t|| below this means the gradient vanished; gtilde_t = 0 and the step is flagged."""

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


def flat_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm: (B, ...) -> (B,)."""
    return v.flatten(1).norm(dim=1)


def normalize_guidance(
    h: torch.Tensor, score: torch.Tensor, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """D5 (GradCheck Eq. 2): gtilde = ||score|| h / ||h|| per sample, or gtilde = h.

    h, score (B, 3, H, W) -> (gtilde (B, 3, H, W), vanished (B,) bool). Where ||h|| < 1e-12 or
    is not finite, gtilde = 0 and the sample is flagged: no NaN ever reaches a sample.
    """
    h_norm = flat_norm(h)
    vanished = ~(torch.isfinite(h_norm) & (h_norm >= VANISHED_NORM))
    if normalize:
        factor = flat_norm(score) / torch.where(vanished, torch.ones_like(h_norm), h_norm)
    else:
        factor = torch.ones_like(h_norm)
    factor = torch.where(vanished, torch.zeros_like(factor), factor)
    # where(), not a product: 0 * inf would be NaN for a non-finite h.
    gtilde = torch.where(_per_sample(vanished), torch.zeros_like(h), h * _per_sample(factor))
    return gtilde, vanished


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity (D7) of (B, ...) tensors -> (B,) float64.

    NaN where either vector is zero (the angle is undefined), never a made-up 0 or 1.
    """
    a64, b64 = a.flatten(1).double(), b.flatten(1).double()
    denom = a64.norm(dim=1) * b64.norm(dim=1)
    dot = (a64 * b64).sum(dim=1)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), float("nan"))


# ---- how networks are evaluated ----------------------------------------------------------------


def _pad_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    """(m, ...) -> (rows, ...) by repeating the last row (real, in-distribution values)."""
    m = v.shape[0]
    return v if m == rows else torch.cat([v, v[-1:].expand(rows - m, *v.shape[1:])])


@dataclass(frozen=True)
class NetEval:
    """How the sampler runs its networks: in pieces of exactly ``rows`` rows, at a precision.

    Fixed shapes make a sample independent of its batch: a GEMM or convolution rounds each row
    the same way for a given input shape, whatever the other rows hold, but a different shape
    may pick a different kernel (CPU GEMMs with 2 and 8 rows differ by ~1e-7). Padding every call
    to ``rows`` rows (the last piece repeats its last row) makes batch sizes 2 and 8 give
    bit-identical samples, lets configurations share calls without changing a bit (the sweep's
    batched configurations), and gives ``torch.compile`` one shape. ``rows=None`` evaluates a
    whole batch in one call.

    Precision. The default is true float32: on a GPU, TF32 is switched off for the sampling call
    (PyTorch lets cuDNN use it by default). This matters here. Through the x0-estimate (D2) the
    gradient is ``(I - sqrt(1 - abar) J_eps)^T grad log p / sqrt(abar)``: at high noise the two
    terms nearly cancel and 1 / sqrt(abar) is ~57 at t = 900, so rounding in the UNet is
    amplified, and a non-robust classifier turns a slightly different x0_hat into a different
    gradient. Measured on the shipped models (CPU, 4 samples; minimum cosine of x0-estimate
    gradients to the float32 ones):

    ==============================  =================  =============  ============
    precision                       t = 999 / 900      t = 700 / 500  t = 100
    ==============================  =================  =============  ============
    float64 (reference check)       0.99997 / 0.99998  0.99996 / 1.0  -
    TF32, emulated (non-robust)     0.69 / 0.91        0.998 / 0.998  0.999
    TF32, emulated (robust)         0.999 / 0.999      1.000 / 1.000  0.999
    bf16 UNet (non-robust)          - / 0.69           - / 0.91       0.98
    bf16 UNet (robust)              - / -0.96          - / 0.99       0.995
    ==============================  =================  =============  ============

    (TF32 emulated by rounding the inputs, weights and output gradients of every convolution
    and linear layer to TF32's 10-bit mantissa.) ``unet_bf16`` (bf16 autocast on the UNet) and
    ``tf32`` are therefore opt-in speed settings, fit for unguided and x_t-guided sampling
    (whose gradient never passes through the UNet) but not for measuring x0-estimate gradients.
    The classifiers, the oracle and the guidance maths (norms, cosines, stabiliser moments, the
    DDPM step) always run in float32/float64.
    """

    rows: int | None = None
    unet_bf16: bool = False
    tf32: bool = False

    def unet_autocast(self, device: torch.device):
        """The autocast context for UNet calls."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.unet_bf16)

    @contextmanager
    def numerics(self) -> Iterator[None]:
        """TF32 on or off for CUDA matmuls and convolutions while sampling; restored after."""
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        try:
            with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                            benchmark=torch.backends.cudnn.benchmark,
                                            deterministic=torch.backends.cudnn.deterministic,
                                            allow_tf32=self.tf32):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul

    def map(self, fn: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        """``fn(*pieces)`` over row pieces of ``inputs`` (same length N) -> outputs of N rows.

        ``fn`` returns a tensor or a tuple of tensors, each row depending only on the same row
        of the inputs (true of every network here in eval mode).
        """
        n = inputs[0].shape[0]
        rows = self.rows or n
        outs = []
        for start in range(0, n, rows):
            m = min(rows, n - start)
            out = fn(*(_pad_rows(v[start:start + rows], rows) for v in inputs))
            outs.append(tuple(o[:m] for o in out) if isinstance(out, tuple) else out[:m])
        if len(outs) == 1:
            return outs[0]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
        return torch.cat(outs)


# ---- D3: gradient sources ---------------------------------------------------------------------


@dataclass(frozen=True)
class GradientOutput:
    """What a gradient source returns for one step (all tensors detached)."""

    eps: torch.Tensor  # (B, 3, H, W) eps_theta(x_t, t)
    grad: torch.Tensor  # (B, 3, H, W) g_t = grad_{x_t} log p(y | x_in)  (D3)
    log_probs: torch.Tensor  # (B, C) log p(. | x_in), the input the gradient came from
    log_probs_x0: torch.Tensor  # (B, C) log p(. | x0_hat) (t = 0 for time-aware models)


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
        y: torch.Tensor, net: NetEval = NetEval(), eps: torch.Tensor | None = None,
    ) -> GradientOutput:
        """x_t (B, 3, H, W), t, abar_t, y (B,) -> eps, g_t and log-probabilities."""
        raise NotImplementedError


def classifier_log_probs(model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C) log-probabilities; ``t`` reaches only time-aware models.

    Time-aware: a :class:`TimeConditionedClassifier` or the empirical oracle (D8), whose output
    is already normalised, so log_softmax leaves it unchanged.
    """
    if isinstance(model, (TimeConditionedClassifier, EmpiricalOracle)):
        logits = model(x, t)
    else:
        logits = model(x)
    return F.log_softmax(logits.float(), dim=1)


def picked(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C), (B,) -> (B,) log p(y_i | x_i) (a gather: no host sync for bounds checks)."""
    return log_probs.gather(1, y[:, None])[:, 0]


class ClassifierGuidance(GuidanceSource):
    """D3 with a differentiable classifier (or the empirical oracle, D8).

    ``x0_estimate=False``: x_in = x_t, time-aware classifiers get t.
    ``x0_estimate=True``: x_in = x0_hat (D2), time-aware classifiers get t = 0, and the gradient
    w.r.t. x_t flows through the UNet (GradCheck §2.1).
    """

    def __init__(self, classifier: nn.Module, x0_estimate: bool = False) -> None:
        if classifier.training:
            raise GradcheckError("the guiding classifier must be in eval() mode (D3)")
        if x0_estimate and isinstance(classifier, EmpiricalOracle):
            raise GradcheckError(
                "the oracle is exact on x_t itself (D8); --x0-estimate does not apply to it"
            )
        self.classifier = classifier
        self.x0_estimate = x0_estimate

    def __call__(
        self, eps_fn: EpsFn, x_t: torch.Tensor, t: int, abar: torch.Tensor | float,
        y: torch.Tensor, net: NetEval = NetEval(), eps: torch.Tensor | None = None,
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
                lp = classifier_log_probs(clf, x0_from_eps(x, e, abar), 0)
                (g,) = torch.autograd.grad(picked(lp, yy).sum(), x)
            return e.detach(), g, lp.detach()

        def xt_piece(x: torch.Tensor, yy: torch.Tensor):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                lp = classifier_log_probs(clf, x, t)
                (g,) = torch.autograd.grad(picked(lp, yy).sum(), x)
            return g, lp.detach()

        if self.x0_estimate:
            eps, grad, log_probs = net.map(x0_piece, x_t, y)
            return GradientOutput(eps=eps, grad=grad, log_probs=log_probs, log_probs_x0=log_probs)
        if eps is None:
            with torch.no_grad():
                eps = net.map(eps_fn, x_t)
        grad, log_probs = net.map(xt_piece, x_t, y)
        with torch.no_grad():
            log_probs_x0 = net.map(lambda x: classifier_log_probs(clf, x, 0),
                                   x0_from_eps(x_t, eps, abar))
        return GradientOutput(eps=eps, grad=grad, log_probs=log_probs, log_probs_x0=log_probs_x0)
