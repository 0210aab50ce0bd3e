"""Projected gradient descent (Madry et al. 2018) in L2 and Linf with per-sample early stopping.

Used for adversarial training (Kawar et al. 2023 §4.2: untargeted L2 PGD on noisy latents, stopped
per sample as soon as it fools the model), for robustness evaluation, and (targeted, large eps)
for perceptually aligned gradient figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradcheck.models import classifier_logits
from gradcheck.utils import GradcheckError, check_choice, check_positive

NORMS = ("l2", "linf")
_TINY = 1e-12  # guards the L2 normalisations against an all-zero gradient or perturbation


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm (B,) of v (B, ...), broadcastable back as (B, 1, ..., 1)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def _objective(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | int | None,
    targeted: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective (B,), success (B,) bool): the attacker maximises the objective.

    Untargeted: objective = cross-entropy of the true class y, success = prediction != y.
    Targeted: objective = -cross-entropy of the target y, success = prediction == y.
    """
    logits = classifier_logits(model, x, t).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    pred = logits.argmax(dim=1)
    if targeted:
        return -ce, pred == y
    return ce, pred != y


def _subset_t(t: torch.Tensor | int | None, idx: torch.Tensor) -> torch.Tensor | int | None:
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.numel() > 1:
        return t[idx]
    return t


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "l2",
    targeted: bool = False,
    early_stop: bool = True,
    t: torch.Tensor | int | None = None,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """PGD attack: x (B, C, H, W), y (B,) int64 labels (targets if ``targeted``) -> x_adv like x.

    Every iterate is projected onto the eps-ball around x in the chosen norm (and, with ``clamp``,
    onto the box [lo, hi]; use (-1, 1) for images, None for noisy latents x_t, which are
    unbounded; x itself must lie in the box). Each step moves by ``step_size`` along the
    normalised gradient (L2) or its sign (Linf). ``t`` (scalar or (B,)) reaches time-conditioned
    classifiers only.

    Per sample the attack returns its best iterate: the one of highest objective (cross-entropy of
    y untargeted, minus cross-entropy of the target when targeted), starting from x itself. With
    ``early_stop`` a sample stops as soon as it succeeds (misclassified; or classified as the
    target) and returns that successful iterate; a sample already successful at x is returned
    unchanged. The model runs in eval mode (its previous mode is restored afterwards); its
    parameter gradients are left untouched.
    """
    check_choice("PGD norm", norm, NORMS)
    check_positive("PGD eps", eps, allow_zero=True)
    check_positive("PGD step_size", step_size, allow_zero=True)
    check_positive("PGD steps", steps, allow_zero=True)
    if x.shape[0] != y.shape[0]:
        raise GradcheckError(f"PGD got {x.shape[0]} inputs but {y.shape[0]} labels")

    was_training = model.training
    model.eval()
    try:
        x0 = x.detach()
        delta = torch.zeros_like(x0)
        with torch.no_grad():
            best_obj, success = _objective(model, x0, y, t, targeted)
        best = x0.clone()
        active = ~success if early_stop else torch.ones_like(success)
        for _ in range(steps):
            if eps == 0 or step_size == 0 or not bool(active.any()):
                break
            idx = active.nonzero().squeeze(1)
            t_idx = _subset_t(t, idx)
            d = delta[idx].requires_grad_(True)
            obj, _ = _objective(model, x0[idx] + d, y[idx], t_idx, targeted)
            (grad,) = torch.autograd.grad(obj.sum(), d)
            with torch.no_grad():
                if norm == "l2":
                    d = d + step_size * grad / (_flat_norm(grad) + _TINY)
                    d = d * torch.clamp(eps / (_flat_norm(d) + _TINY), max=1.0)
                else:
                    d = (d + step_size * grad.sign()).clamp(-eps, eps)
                if clamp is not None:
                    # Clamping towards x (inside the box) shrinks every coordinate of d, so the
                    # iterate stays inside the eps-ball.
                    d = (x0[idx] + d).clamp(*clamp) - x0[idx]
                delta[idx] = d
                obj, succ = _objective(model, x0[idx] + d, y[idx], t_idx, targeted)
                better = obj > best_obj[idx]
                if early_stop:
                    better = better | succ
                    active[idx] = ~succ
                upd = idx[better]
                best[upd] = x0[upd] + d[better]
                best_obj[upd] = obj[better]
        return best
    finally:
        model.train(was_training)
