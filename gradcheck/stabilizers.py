"""Gradient stabilisers h_t = S(g_t) (docs/maths.md D4, GradCheck Eq. 4) behind one interface.

A stabiliser is a small stateful callable: ``h = stabilizer(g)`` with ``g`` of shape (B, ...).
Its state (moment estimates, step count) is elementwise, so every sample has its own state. The
sampler builds a fresh stabiliser with :func:`make_stabilizer` at the start of every sampling call,
so state never crosses sampling runs, batches or samples. Updates are out of place: a returned
``h`` never aliases the state, and the state never aliases a caller's tensor.

Time constants count diffusion time, not sampler steps (docs/maths.md D4'): with ``steps`` < T
respaced steps every beta becomes ``beta ** (T // steps)`` (``time_scale``, the gap in t between
diffusers' "leading" respaced steps), so the memory spans the same share of the chain as at T
steps. Counted in sampler steps, ADAM's
beta1 = 0.9 remembers 20% of a 50-step chain instead of 1%, and its momentum carried x_t to
8.5x its expected norm in a Gaussian toy (1.24x in diffusion time). At steps = T nothing changes.

The optimiser analogy (GradCheck §2.2): guidance ascends log p(y | x), so h is the direction an
optimiser with learning rate 1 would *descend* on the gradient -g, i.e. ``-(p_new - p_old)`` of
``torch.optim`` fed with ``grad = g``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch

from gradcheck.utils import GradcheckError, check_choice


class Stabilizer(Protocol):
    """h_t = S(g_t): (B, ...) -> (B, ...), called once per sampling step."""

    def __call__(self, g: torch.Tensor) -> torch.Tensor: ...


class Identity:
    """``none``: h = g."""

    scale_free = True
    """S(c g) = c S(g) for every c > 0 and no memory: the sampler may hand it g's direction
    where g underflows (sampler.d5_input). Stabilisers without the attribute are not."""

    def __init__(self, time_scale: float = 1.0) -> None:
        pass  # no memory, nothing to rescale

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """g (B, ...) -> g."""
        return g


class _Stateful:
    """Shared bookkeeping: the step count k and a fixed state shape."""

    def __init__(self) -> None:
        self.k = 0
        self.shape: torch.Size | None = None

    def _advance(self, g: torch.Tensor) -> bool:
        """Count a step; True on the first call (state must be created)."""
        if self.shape is not None and g.shape != self.shape:
            raise GradcheckError(
                f"stabiliser state has shape {tuple(self.shape)}, got a gradient of shape "
                f"{tuple(g.shape)}; build a fresh stabiliser per batch"
            )
        first = self.shape is None
        self.shape = g.shape
        self.k += 1
        return first


class Adam(_Stateful):
    """``adam`` (D4, Kingma & Ba 2015 with lr = 1); ``adam-nobias`` drops the bias correction.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    h = (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)   (torch.optim.Adam's step direction)
    """

    def __init__(
        self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
        bias_correction: bool = True, time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # Defaults: Kingma & Ba's, as GradCheck §2.2 uses ("default parameters"), per T-step.
        self.beta1, self.beta2, self.eps = beta1**time_scale, beta2**time_scale, eps
        self.bias_correction = bias_correction
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """g (B, ...) -> h (B, ...)."""
        if self._advance(g):
            self.m = torch.zeros_like(g)
            self.v = torch.zeros_like(g)
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        self.v = self.beta2 * self.v + (1 - self.beta2) * g * g
        if not self.bias_correction:
            return self.m / (self.v.sqrt() + self.eps)
        m_hat = self.m / (1 - self.beta1**self.k)
        # As torch.optim.Adam: sqrt(v) / sqrt(1 - b2^k), then + eps.
        return m_hat / (self.v.sqrt() / (1 - self.beta2**self.k) ** 0.5 + self.eps)


class Momentum(_Stateful):
    """``ema``: momentum as a bias-corrected exponential moving average of g.

    m = b m + (1 - b) g;  h = m / (1 - b^k)   (the Adam first moment alone)
    """

    def __init__(self, beta: float = 0.9, time_scale: float = 1.0) -> None:
        super().__init__()
        self.beta = beta**time_scale  # Adam's beta1, so ema isolates Adam's first-moment half
        self.m: torch.Tensor | None = None

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """g (B, ...) -> h (B, ...)."""
        if self._advance(g):
            self.m = torch.zeros_like(g)
        self.m = self.beta * self.m + (1 - self.beta) * g
        return self.m / (1 - self.beta**self.k)


class RMSProp(_Stateful):
    """``rmsprop`` (Tieleman & Hinton 2012), as torch.optim.RMSprop's step direction with lr = 1.

    v = a v + (1 - a) g^2;  h = g / (sqrt(v) + eps)   (no bias correction, like torch)
    """

    def __init__(self, alpha: float = 0.99, eps: float = 1e-8, time_scale: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.eps = alpha**time_scale, eps  # torch.optim.RMSprop defaults, per T-step
        self.v: torch.Tensor | None = None

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """g (B, ...) -> h (B, ...)."""
        if self._advance(g):
            self.v = torch.zeros_like(g)
        self.v = self.alpha * self.v + (1 - self.alpha) * g * g
        return g / (self.v.sqrt() + self.eps)


STABILIZERS: dict[str, Callable[..., Stabilizer]] = {
    "none": Identity,
    "adam": Adam,
    "ema": Momentum,
    "rmsprop": RMSProp,
    "adam-nobias": partial(Adam, bias_correction=False),
}
"""Stabiliser registry: name -> constructor of a fresh, stateless-at-start stabiliser."""


def check_stabilizer(name: str) -> None:
    """Raise a GradcheckError unless ``name`` is in :data:`STABILIZERS`."""
    check_choice("stabilizer", name, list(STABILIZERS))


def make_stabilizer(name: str, time_scale: float = 1.0) -> Stabilizer:
    """A fresh stabiliser (empty state) of a registered name; ``time_scale`` = T // steps."""
    check_stabilizer(name)
    return STABILIZERS[name](time_scale=time_scale)
