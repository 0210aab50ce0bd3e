"""Stabilisers (docs/maths.md D4): torch.optim equivalence, bias correction, fresh state."""

from __future__ import annotations

import pytest
import torch

from gradcheck.stabilizers import STABILIZERS, make_stabilizer
from gradcheck.utils import GradcheckError


def _gradients(n: int = 25, shape: tuple[int, ...] = (3, 2, 4, 4)) -> list[torch.Tensor]:
    """A seeded gradient sequence whose scale drifts over four orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** (k / 6 - 2)
            for k in range(n)]


def _optim_directions(opt_cls: type, grads: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    """h_k = -(p_k - p_{k-1}) of a torch optimiser with lr = 1, fed grad = g_k.

    The parameter is reset to 0 before every step (Adam/RMSprop state does not depend on it),
    so the step is read exactly, without cancellation against a growing parameter.
    """
    p = torch.zeros_like(grads[0], requires_grad=True)
    opt = opt_cls([p], lr=1.0, **kw)
    out = []
    for g in grads:
        with torch.no_grad():
            p.zero_()
        p.grad = g.clone()
        opt.step()
        out.append(-p.detach().clone())
    return out


def test_adam_equals_torch_optim_adam_direction():
    grads = _gradients()
    expected = _optim_directions(torch.optim.Adam, grads, betas=(0.9, 0.999), eps=1e-8)
    adam = make_stabilizer("adam")
    for k, (g, ref) in enumerate(zip(grads, expected, strict=True)):
        torch.testing.assert_close(adam(g), ref, rtol=1e-12, atol=0, msg=f"step {k + 1}")


def test_rmsprop_equals_torch_optim_rmsprop_direction():
    grads = _gradients()
    expected = _optim_directions(torch.optim.RMSprop, grads, alpha=0.99, eps=1e-8)
    rms = make_stabilizer("rmsprop")
    for g, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(rms(g), ref, rtol=1e-12, atol=0)


def test_bias_correction_makes_constant_gradients_pass_through():
    g = torch.tensor([[0.5, -2.0, 3e-3]], dtype=torch.float64)
    ema, adam, nobias = (make_stabilizer(n) for n in ("ema", "adam", "adam-nobias"))
    for k in range(1, 6):
        # Bias-corrected moments of a constant sequence are the sequence itself from step 1 on.
        torch.testing.assert_close(ema(g), g, rtol=1e-12, atol=0)
        torch.testing.assert_close(adam(g), g / (g.abs() + 1e-8), rtol=1e-12, atol=0)
        m, v = (1 - 0.9**k) * g, (1 - 0.999**k) * g * g
        torch.testing.assert_close(nobias(g), m / (v.sqrt() + 1e-8), rtol=1e-12, atol=0)


def test_none_is_identity():
    g = torch.randn(2, 3)
    assert torch.equal(make_stabilizer("none")(g), g)


@pytest.mark.parametrize("name", sorted(STABILIZERS))
def test_state_is_per_sample(name: str):
    """Running a batch equals running each sample on its own: no state crosses samples."""
    grads = _gradients(8, shape=(4, 3, 2, 2))
    batch = make_stabilizer(name)
    singles = [make_stabilizer(name) for _ in range(4)]
    for g in grads:
        h = batch(g)
        for i, s in enumerate(singles):
            torch.testing.assert_close(h[i : i + 1], s(g[i : i + 1]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(STABILIZERS))
def test_fresh_state_and_no_aliasing(name: str):
    grads = _gradients(5, shape=(2, 3))
    first = make_stabilizer(name)
    out1 = [first(g).clone() for g in grads]
    # A second stabiliser starts from scratch, whatever the first one went through.
    second = make_stabilizer(name)
    for g, ref in zip(grads, out1, strict=True):
        h = second(g.clone())
        assert torch.equal(h, ref)
        h.mul_(1e6)  # a caller scribbling on h must not reach the state
    third = make_stabilizer(name)
    for g in grads:
        last = third(g)
    assert torch.equal(last, out1[-1])


def test_shape_change_is_an_error():
    adam = make_stabilizer("adam")
    adam(torch.ones(2, 3))
    with pytest.raises(GradcheckError, match="fresh stabiliser per batch"):
        adam(torch.ones(4, 3))


def test_unknown_stabilizer_lists_known_names():
    with pytest.raises(GradcheckError, match="unknown stabilizer 'adamw'.*none, adam, ema"):
        make_stabilizer("adamw")
