"""How the sampler calls its networks: the precision policy and fixed row pieces.

:class:`NetworkCalls` says, for one sampling call, how many rows each network call gets (every
call padded to that many, so samples do not depend on their batch) and at which precision the
UNet runs, per step where the policy depends on D2's gain. The guidance maths never depend on
it: norms, cosines, stabiliser moments and the DDPM step are float32/float64 whatever it says.
``gradcheck precision`` (precision.py) measures what each setting does to the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from gradcheck.utils import check_choice

AUTO_FP32_GAIN = 12.0
"""``precision="auto"``: x0-estimate gradients run in true float32 where D2's gain exceeds this
(t >= 700 for the linear schedule, whose gain is 12.02 at t = 700 and 11.94 at t = 699), a
float16 UNet and TF32 elsewhere. Emulated TF32 and float16 turn the non-robust gradient to
cosines of 0.22-0.93 and 0.28-0.88 at t = 800-999; below t = 700 auto keeps >= 0.98, in two
draws of 4 images (NetworkCalls's table)."""

UNET_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast dtypes of UNet calls (:class:`NetworkCalls`); fp32 = no autocast."""

def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 bf16 or AMX): there bf16 autocast ran the
    small32 UNet's forward 2.1x as fast as float32; elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, f, lambda: False)())
               for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def d2_gain(abar: torch.Tensor | float) -> float:
    """D2's amplification of an error in eps into x0_hat: sqrt(1 - abar_t) / sqrt(abar_t)
    (157 at t = 999, 26 at t = 800, 12 at t = 700, 3.4 at t = 500 for the linear schedule)."""
    a = float(abar)
    return math.sqrt((1 - a) / a)




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
class NetworkCalls:
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
    give unrelated samples; judge accuracy and mean cos_prev stay put, README). The guidance
    maths (norms, cosines, stabiliser moments, the DDPM step) are always float32/float64; the
    oracle is float64.

    On a CPU, TF32 does not exist and float16 is slower than float32. What the small32 UNet
    does on the 2-core CPU with AVX-512 bf16/AMX (images/s, 2 threads, median of 5; pieces of
    64 rows unless said; ``x0 grad`` = forward + backward to the input + the classifier, the
    x0-estimate's work):

    ================================  =======  ========  ======================
    setting                           forward  x0 grad   note
    ================================  =======  ========  ======================
    float32, NCHW                     274      131       16 rows: 229, 88
    float32, channels-last            335      139
    bf16 autocast, channels-last      595      145       backward barely gains
    compiled float32 / bf16, CL       391/857  132/161   25-60 s per graph
    ================================  =======  ========  ======================

    So the CPU's ``auto`` (:meth:`for_precision`) runs bf16 for UNet calls that no gradient
    passes through (unguided and x_t-guided configurations, whose gradient is the classifier's
    alone: exact for the x_t the chain reached) and true float32 for every x0-estimate call,
    bit-identical to ``fp32`` there: bf16 would gain 4% and turn the gradients (``gradcheck
    precision``: cosine 0.13 at t = 999, 0.93 at t = 100; docs/performance.md). The runner
    gives it 64-row pieces (:func:`gradcheck.runner.resolve_config`). Not adopted:
    channels-last (+3% bf16 forward and +6% x0 grad under these settings, and a float32 path
    that no longer matches ``fp32`` bit for bit) and ``torch.compile`` (pays only on the
    forward, costs a minute of compiling per graph), which stays opt-in.
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
    def for_precision(cls, precision: str, rows: int | None = None, *, cuda: bool) -> NetworkCalls:
        """The settings of a ``--precision`` value: fp32 | tf32 | bf16 | fp16 | auto.

        ``cuda=False`` (a CPU run): ``auto`` runs the UNet in bf16 autocast where no gradient
        passes through it (unguided and x_t-guided configurations: the gradient is the
        classifier's alone, in float32, so it is exact for the x_t the chain reached) and every
        x0-estimate call in true float32 (``fp32_above_gain=0``), on CPUs with native bf16
        (:func:`cpu_has_native_bf16`); plain float32 elsewhere. TF32 does not exist on a CPU and
        float16 runs slower than float32 there. ``gradcheck precision`` measures the GPU settings
        on a CPU too (TF32 emulated, float16 real) and ``cpu-auto`` for this one.
        """
        settings = {"fp32": {}, "tf32": {"tf32": True}, "bf16": {"unet_dtype": "bf16"},
                    "fp16": {"unet_dtype": "fp16"},
                    "auto": {"unet_dtype": "fp16", "tf32": True,
                             "fp32_above_gain": AUTO_FP32_GAIN}}
        check_choice("precision", precision, tuple(settings))
        if precision == "auto" and not cuda:
            if not cpu_has_native_bf16():
                return cls(rows=rows)
            return cls(rows=rows, unet_dtype="bf16", fp32_above_gain=0.0)
        return cls(rows=rows, **settings[precision])

    def at(self, abar: torch.Tensor | float, through_unet: bool) -> NetworkCalls:
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
