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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradcheck.models import TimeConditionedClassifier
from gradcheck.oracle import EmpiricalOracle
from gradcheck.utils import GradcheckError, check_choice

VANISHED_NORM = 1e-12
"""D5: an ||h_t|| below this means the gradient vanished; gtilde_t = 0 and the step is flagged."""

AUTO_FP32_GAIN = 12.0
"""``precision="auto"``: x0-estimate gradients run in true float32 where D2's gain exceeds this
(t >= 700 for the linear schedule, whose gain is 12.02 at t = 700 and 11.94 at t = 699), a
float16 UNet and TF32 elsewhere. Emulated TF32 and float16 turn the non-robust gradient to
cosines of 0.22-0.93 and 0.28-0.88 at t = 800-999; below t = 700 auto keeps >= 0.98, in two
draws of 4 images (NetEval's table)."""

UNET_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast dtypes of UNet calls (:class:`NetEval`); fp32 = no autocast."""

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


def d2_gain(abar: torch.Tensor | float) -> float:
    """D2's amplification of an error in eps into x0_hat: sqrt(1 - abar_t) / sqrt(abar_t)
    (157 at t = 999, 26 at t = 800, 12 at t = 700, 3.4 at t = 500 for the linear schedule)."""
    a = float(abar)
    return math.sqrt((1 - a) / a)


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


@contextmanager
def _fp32_precision(tf32: bool) -> Iterator[None]:
    """TF32 on or off through ``fp32_precision`` (CUDA matmuls, cuDNN convolutions); restored."""
    value = "tf32" if tf32 else "ieee"
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = value
    try:
        yield
    finally:
        for b, old in zip(backends, saved, strict=True):
            b.fp32_precision = old


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
    terms nearly cancel and rounding in the UNet is amplified by D2's gain sqrt((1 - abar) /
    abar) (:func:`d2_gain`: 157 at t = 999, 26 at t = 800, 12 at t = 700), and a non-robust
    classifier turns a slightly different x0_hat into a different gradient. Minimum cosine of
    x0-estimate gradients to the float32 ones on the shipped models, 4 noised test images
    (``gradcheck precision``, CPU, TF32 emulated by
    :func:`gradcheck.precision.emulate_tf32`):

    ==========================  ======  ======  ======  ======  ======  ======  ======
    precision, classifier       t=999   900     800     700     500     300     100
    ==========================  ======  ======  ======  ======  ======  ======  ======
    float64, non-robust         0.9993  0.9946  1.0000  1.0000  1.0000  1.0000  1.0000
    TF32, non-robust            0.22    0.84    0.93    0.995   0.991   0.996   0.997
    TF32, robust                1.0000  0.993   0.9999  0.9999  1.0000  0.9997  0.9991
    bf16 UNet, non-robust       0.01    0.18    0.02    0.74    0.87    0.92    0.98
    bf16 UNet, robust           -0.67   0.66    0.995   0.995   0.997   0.9997  0.9999
    fp16 UNet, non-robust       0.28    0.56    0.88    0.992   0.984   0.994   0.995
    fp16 UNet, robust           0.9992  0.88    0.9999  0.9998  1.0000  0.9997  0.9991
    auto, non-robust            1       1       1       1       0.984   0.992   0.994
    auto, robust                1       1       1       1       1.0000  0.9997  0.9991
    ==========================  ======  ======  ======  ======  ======  ======  ======

    Minima over 4 images move with the draw: another draw gave TF32 0.54 at t = 999 and
    0.95-0.99 at t <= 700, float16 0.92 at t = 700 and auto 0.98-0.99 below (non-robust).
    float16 is real on the CPU, whose autocast also keeps GroupNorm outputs in float16 (CUDA's
    makes them float32): if anything, pessimistic. The TF32 emulation agrees with real TF32 on
    an H100 (README).

    So ``tf32``, ``bf16`` and ``fp16`` are opt-in speed settings, fit for unguided and
    x_t-guided sampling (whose gradient never passes through the UNet) but not for measuring
    x0-estimate gradients at high noise. float16 keeps 3 more mantissa bits than bf16: below
    the gain it does as well as TF32 at the tensor cores' 16-bit rate, once each sample's
    gradient is rescaled before the UNet's backward pass (:attr:`scaled_backward`; unscaled, the
    robust classifier's small gradients underflow: cosine 0.51 at t = 700). ``precision="auto"``
    (:meth:`for_precision`) is the middle way: a float16 UNet and TF32 elsewhere, except calls
    that differentiate through the UNet at steps with a gain above :data:`AUTO_FP32_GAIN`
    (t >= 700, 30% of the steps, ~21% of Table 1's FLOPs), which run in true float32
    (:meth:`at`). What remains below the gain is the non-robust classifier's own sensitivity
    (cosine >= 0.95 in both draws), small next to the step-to-step change the study measures
    (mean cos_prev of its raw gradients ~0.03). Whole chains are compared on metrics, not
    pixels: the non-robust x0-estimate + ADAM chain is chaotic (UNet weights moved by +-1 ulp
    give unrelated samples; judge accuracy and mean cos_prev stay put, README). On a CPU,
    TF32 does not exist, float16 is slower than float32, and auto is float32. The guidance
    maths (norms, cosines, stabiliser moments, the DDPM step) are always float32/float64; the
    oracle is float64.
    """

    rows: int | None = None
    unet_dtype: str = "fp32"  # autocast of UNet calls: fp32 (none) | bf16 | fp16 (UNET_DTYPES)
    tf32: bool = False
    # Calls that differentiate through the UNet (the x0-estimate) at steps whose D2 gain exceeds
    # this run in true float32 (TF32 and autocast off); None = never.
    fp32_above_gain: float | None = None

    def __post_init__(self) -> None:
        check_choice("UNet dtype", self.unet_dtype, tuple(UNET_DTYPES))

    @classmethod
    def for_precision(cls, precision: str, rows: int | None = None, *, cuda: bool) -> NetEval:
        """The settings of a ``--precision`` value: fp32 | tf32 | bf16 | fp16 | auto.

        ``cuda=False`` (a CPU run): ``auto`` is plain float32, since TF32 does not exist there
        and a CPU runs float16 slower than float32. ``gradcheck precision`` keeps the GPU
        settings on a CPU, to measure them (TF32 emulated, float16 real).
        """
        settings = {"fp32": {}, "tf32": {"tf32": True}, "bf16": {"unet_dtype": "bf16"},
                    "fp16": {"unet_dtype": "fp16"},
                    "auto": {"unet_dtype": "fp16", "tf32": True,
                             "fp32_above_gain": AUTO_FP32_GAIN}}
        check_choice("precision", precision, tuple(settings))
        if precision == "auto" and not cuda:
            return cls(rows=rows)
        return cls(rows=rows, **settings[precision])

    def at(self, abar: torch.Tensor | float, through_unet: bool) -> NetEval:
        """The settings for one call at abar_t: true float32 for a gradient through the UNet
        where D2's gain exceeds ``fp32_above_gain``, these settings otherwise."""
        if (through_unet and self.fp32_above_gain is not None
                and d2_gain(abar) > self.fp32_above_gain):
            return replace(self, unet_dtype="fp32", tf32=False, fp32_above_gain=None)
        return self

    def unet_autocast(self, device: torch.device):
        """The autocast context for UNet calls."""
        dtype = UNET_DTYPES[self.unet_dtype]
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    @property
    def scaled_backward(self) -> bool:
        """Whether gradients through the UNet are rescaled per sample before its backward pass
        (float16, whose range is narrow: :class:`ClassifierGuidance`)."""
        return self.unet_dtype == "fp16"

    @contextmanager
    def numerics(self) -> Iterator[None]:
        """TF32 on or off for CUDA matmuls and convolutions while sampling; restored after.

        Through the ``allow_tf32`` flags, unless the program has used PyTorch's newer
        ``fp32_precision`` settings, which PyTorch refuses to mix with them: then through those.
        """
        try:
            matmul = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32  # noqa: B018 (raises once fp32_precision was set)
        except RuntimeError:
            with _fp32_precision(self.tf32):
                yield
            return
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
                x0 = x0_from_eps(x, e, abar)
                lp = classifier_log_probs(clf, x0, 0)
                if not net.scaled_backward:
                    (g,) = torch.autograd.grad(picked(lp, yy).sum(), x)
                    return e.detach(), g, lp.detach()
                # float16 UNet: its backward would underflow for small gradients (robust
                # classifiers) and overflow for large ones. The vector-Jacobian product is
                # linear, so each sample's gradient w.r.t. x0_hat enters it scaled to a largest
                # entry of 1 and the result is scaled back, all on the device (GradScaler's
                # idea, per sample).
                (v,) = torch.autograd.grad(picked(lp, yy).sum(), x0)
                peak = v.flatten(1).abs().amax(dim=1)
                k = _per_sample(torch.where(torch.isfinite(peak) & (peak > 0), peak,
                                            torch.ones_like(peak)))
                (g,) = torch.autograd.grad(x0, x, grad_outputs=v / k)
            return e.detach(), g * k, lp.detach()

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
