"""PGD: eps-ball and box constraints, best iterate, early stopping, eval mode, time input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck.attacks import pgd
from gradcheck.models import TimeConditionedClassifier
from gradcheck.utils import GradcheckError


def small_cnn(in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 4),
    )


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l2", 2.0), ("linf", 0.03), ("linf", 0.3)])
def test_pgd_stays_in_eps_ball_and_box(norm: str, eps: float) -> None:
    model = small_cnn().eval()
    x, y = batch()
    adv = pgd(model, x, y, eps=eps, step_size=eps / 2, steps=10, norm=norm, early_stop=False,
              clamp=(-1.0, 1.0))
    d = (adv - x).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
    assert size.max().item() <= eps * (1 + 1e-5)
    assert size.max().item() > 0.5 * eps  # the attack actually moved
    assert adv.min().item() >= -1.0 and adv.max().item() <= 1.0


def test_pgd_without_clamp_may_leave_the_box_but_not_the_ball() -> None:
    model = small_cnn().eval()
    x, y = batch()
    x = x * 3  # noisy latents are unbounded
    adv = pgd(model, x, y, eps=1.0, step_size=0.3, steps=7, early_stop=False)
    assert (adv - x).flatten(1).norm(dim=1).max().item() <= 1.0 + 1e-5


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_best_loss_non_decreasing_over_steps_and_above_clean(norm: str) -> None:
    model = small_cnn().eval()
    x, y = batch()
    eps = 1.0 if norm == "l2" else 0.1
    losses = [ce(model, x, y)]
    for steps in range(1, 8):
        adv = pgd(model, x, y, eps=eps, step_size=eps / 3, steps=steps, norm=norm,
                  early_stop=False)
        losses.append(ce(model, adv, y))
    for before, after in zip(losses, losses[1:], strict=False):
        assert torch.all(after >= before - 1e-5)
    assert (losses[-1] - losses[0]).mean().item() > 0.01  # the loss really rose


def test_early_stop_returns_misclassified_and_skips_already_wrong() -> None:
    model = small_cnn().eval()
    x, y = batch(64)
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    adv = pgd(model, x, y, eps=3.0, step_size=0.5, steps=20)
    assert torch.equal(adv[wrong], x[wrong])  # already misclassified: untouched
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert fooled.float().mean().item() > 0.9
    # Early stopping ends at the first success, so successes lie no farther out than without it.
    full = pgd(model, x, y, eps=3.0, step_size=0.5, steps=20, early_stop=False)
    both = fooled & ~wrong
    assert ((adv - x)[both].flatten(1).norm(dim=1)
            <= (full - x)[both].flatten(1).norm(dim=1) + 1e-5).all()


def test_targeted_pgd_reaches_target() -> None:
    model = small_cnn().eval()
    x, _ = batch(32)
    target = torch.full((32,), 2)
    adv = pgd(model, x, target, eps=10.0, step_size=1.0, steps=30, targeted=True)
    with torch.no_grad():
        hit = model(adv).argmax(1) == target
    assert hit.float().mean().item() > 0.9


def test_accuracy_under_attack_does_not_rise_with_eps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    x, _ = batch(128)
    with torch.no_grad():
        y = model(x).argmax(1)  # 100% clean accuracy
    accs = []
    for eps in (0.0, 0.1, 0.25, 0.5, 1.0, 2.0):
        adv = pgd(model, x, y, eps=eps, step_size=2.5 * eps / 10, steps=10)
        with torch.no_grad():
            accs.append((model(adv).argmax(1) == y).float().mean().item())
    assert accs[0] == 1.0
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False))
    assert accs[-1] < 0.5


def test_pgd_runs_in_eval_mode_and_restores_mode() -> None:
    model = small_cnn().train()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x, y = batch()
    pgd(model, x, y, eps=1.0, step_size=0.3, steps=5, early_stop=False)
    assert model.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]  # a train-mode forward would count
    assert all(p.grad is None for p in model.parameters())


def test_time_conditioned_pgd_is_per_sample() -> None:
    """Per-sample t follows its sample through early stopping: batch == one sample at a time."""
    model = TimeConditionedClassifier(small_cnn(in_channels=4)).eval()
    x, y = batch(8)
    t = torch.arange(8) * 120
    adv = pgd(model, x, y, eps=1.0, step_size=0.3, steps=5, t=t)
    for i in range(8):
        one = pgd(model, x[i:i + 1], y[i:i + 1], eps=1.0, step_size=0.3, steps=5, t=t[i:i + 1])
        assert torch.allclose(one, adv[i:i + 1], atol=1e-5)


def test_pgd_zero_eps_or_steps_returns_input() -> None:
    model = small_cnn().eval()
    x, y = batch()
    assert torch.equal(pgd(model, x, y, eps=0.0, step_size=0.1, steps=5), x)
    assert torch.equal(pgd(model, x, y, eps=1.0, step_size=0.1, steps=0), x)


def test_pgd_rejects_bad_arguments() -> None:
    model = small_cnn().eval()
    x, y = batch()
    with pytest.raises(GradcheckError, match="unknown PGD norm 'l1'; choose one of: l2, linf"):
        pgd(model, x, y, eps=1.0, step_size=0.1, steps=3, norm="l1")
    with pytest.raises(GradcheckError, match="PGD eps must be >= 0"):
        pgd(model, x, y, eps=-1.0, step_size=0.1, steps=3)
    with pytest.raises(GradcheckError, match="16 inputs but 3 labels"):
        pgd(model, x, y[:3], eps=1.0, step_size=0.1, steps=3)
