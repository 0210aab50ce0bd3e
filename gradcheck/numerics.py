"""How the sampler calls its networks: the precision policy and fixed row pieces
(:class:`NetworkCalls`). ``gradcheck precision`` (precision.py) measures what each setting does
to the gradients.
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
(t >= 700 for the linear schedule: 12.02 at t = 700, 11.94 at t = 699), a float16 UNet and
TF32 elsewhere (README, "Precision")."""

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

    Every call is padded to ``rows`` rows (the last piece repeats its last row): a different
    input shape may pick a different kernel (CPU GEMMs with 2 and 8 rows differ by ~1e-7), so
    fixed shapes make samples bit-identical across batch sizes, let configurations share calls
    and give ``torch.compile`` one shape. ``rows=None`` evaluates a whole batch in one call.

    The default is true float32 (TF32 off on a GPU): through the x0-estimate, D2's gain
    (:func:`d2_gain`) amplifies UNet rounding into the gradient. ``tf32``, ``bf16`` and ``fp16``
    are opt-in speed settings, fit for unguided and x_t-guided sampling; ``auto``
    (:meth:`for_precision`) keeps true float32 where the gain is high (:meth:`at`). float16
    rescales each sample's gradient before the UNet's backward (:attr:`scaled_backward`). The
    guidance maths are always float32/float64; the oracle is float64. Measured cosines per
    precision: README, "Precision"; CPU speeds and the CPU ``auto``: docs/performance.md.
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
        ``cuda=False``: ``auto`` runs the UNet in bf16 where no gradient passes through it and every
        x0-estimate call in true float32 (``fp32_above_gain=0``) on CPUs with native bf16
        (:func:`cpu_has_native_bf16`), plain float32 elsewhere (docs/performance.md)."""
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
        """TF32 on or off for CUDA matmuls and convolutions while sampling; restored after. Through
        the ``allow_tf32`` flags, unless the program has used PyTorch's newer ``fp32_precision``
        settings, which PyTorch refuses to mix with them: then through those."""
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
        ``fn`` returns a tensor or a tuple of tensors, each row depending only on the same row of
        the inputs (true of every network here in eval mode)."""
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
