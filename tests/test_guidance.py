"""Guidance maths (docs/maths.md D1, D2, D3, D5, D7) and the classifier gradient source."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from gradcheck.guidance import (
    ClassifierGuidance,
    classifier_log_probs,
    cosine,
    flat_norm,
    normalize_guidance,
    score_from_eps,
    x0_from_eps,
)
from gradcheck.models import make_classifier, make_unet
from gradcheck.oracle import EmpiricalOracle
from gradcheck.utils import GradcheckError


def small_classifier(seed: int = 0) -> nn.Module:
    """A tiny conv net with well-conditioned gradients, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.Tanh(), nn.Conv2d(8, 8, 3, 2, 1), nn.Tanh(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    ).eval()


def test_score_and_x0_estimate_match_ddpm_definitions():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          clip_sample=False)
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    t = 400
    abar = sched.alphas_cumprod[t]
    torch.testing.assert_close(score_from_eps(eps, abar), -eps / (1 - abar).sqrt())
    # D2 is the scheduler's own predicted x0 (formula 15 of Ho et al.) before any clipping.
    ref = sched.step(eps, t, x, return_dict=True).pred_original_sample
    torch.testing.assert_close(x0_from_eps(x, eps, abar), ref)
    # and inverts the forward process exactly for the true noise
    x0 = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    torch.testing.assert_close(x0_from_eps(xt, eps, abar), x0, rtol=1e-5, atol=1e-5)


def test_normalization_gives_score_norm_and_keeps_direction():
    gen = torch.Generator().manual_seed(1)
    scales = torch.tensor([1e-6, 1.0, 1e3, 5.0]).view(-1, 1, 1, 1)
    h = torch.randn(4, 3, 8, 8, generator=gen) * scales
    score = torch.randn(4, 3, 8, 8, generator=gen) * 7
    gtilde, vanished = normalize_guidance(h, score)
    assert not vanished.any()
    torch.testing.assert_close(gtilde.flatten(1).norm(dim=1), score.flatten(1).norm(dim=1))
    torch.testing.assert_close(cosine(gtilde, h), torch.ones(4, dtype=torch.float64))
    plain, vanished = normalize_guidance(h, score, normalize=False)
    assert torch.equal(plain, h) and not vanished.any()


def test_vanished_gradient_is_flagged_and_zeroed_without_nan():
    score = torch.randn(3, 3, 4, 4)
    h = torch.randn(3, 3, 4, 4)
    h[0] = 0.0
    h[1, 0, 0, 0] = float("nan")
    h[2, 0, 0, 0] = float("inf")
    for normalize in (True, False):
        gtilde, vanished = normalize_guidance(h, score, normalize)
        assert vanished.tolist() == [True, True, True]
        assert torch.equal(gtilde, torch.zeros_like(h))


def test_tiny_exact_gradient_keeps_its_direction_and_the_score_norm():
    """D5 is scale-free: an ||h|| of 1e-13 (D3's stable form at a confident margin) or of a few
    float32 subnormals is rescaled like any other, never discarded or overflowed to inf."""
    score = torch.randn(3, 3, 4, 4) * 100
    direction = torch.randn(3, 3, 4, 4)
    h = direction.clone()
    h[0] *= 1e-13 / h[0].norm()
    h[1] *= 1e-36 / h[1].norm()
    h[2] = 0.0
    h[2, 0, 0, 0] = 1.4e-45  # the smallest float32 subnormal
    gtilde, vanished = normalize_guidance(h, score)
    assert not vanished.any() and torch.isfinite(gtilde).all()
    assert torch.allclose(flat_norm(gtilde), flat_norm(score), rtol=1e-6)
    assert torch.allclose(cosine(gtilde[:2], direction[:2]), torch.ones(2, dtype=torch.float64))
    assert torch.isclose(gtilde[2, 0, 0, 0], flat_norm(score[2:])[0], rtol=1e-6)


def test_norms_and_cosines_of_tiny_gradients_are_exact_and_others_bit_identical():
    """A certain classifier's float64 gradient has entries below 1e-154, whose squares leave
    float64's normal range: the plain norm read 0 or too small, and D5 then scaled gtilde to up
    to 7x the score's norm. flat_norm and cosine scale each row by a power of two first, which
    changes no bit where nothing under- or overflows."""
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        v = torch.randn(5, 3, 8, 8, generator=gen, dtype=dtype) * torch.tensor(
            [1e-3, 1.0, 7.5, 300.0, 1e-15], dtype=dtype).view(-1, 1, 1, 1)
        assert torch.equal(flat_norm(v), v.flatten(1).norm(dim=1))
        w = torch.randn_like(v)
        a, b = v.flatten(1).double(), w.flatten(1).double()
        assert torch.equal(cosine(v, w), (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
    unit = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    for tiny in (1e-170, 1e-200, 1e-300):
        h = unit * tiny
        assert h.flatten(1).norm(dim=1).min() < 0.5 * tiny * unit.flatten(1).norm(dim=1).min()
        torch.testing.assert_close(flat_norm(h) / tiny, flat_norm(unit), rtol=1e-6, atol=0)
        torch.testing.assert_close(cosine(h, unit), torch.ones(2, dtype=torch.float64))
        score = torch.randn(2, 3, 8, 8, generator=gen)
        gtilde, vanished = normalize_guidance(h, score)
        assert not vanished.any()
        torch.testing.assert_close(flat_norm(gtilde), flat_norm(score))


def test_cosine_values_and_undefined_angles():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [1.0, 0.0], [-1.0, 0.0]])
    c = cosine(a, b)
    assert c.dtype == torch.float64
    assert c[0] == 0 and c[3] == -1
    assert c[1].item() == pytest.approx(1.0, abs=1e-15)
    assert torch.isnan(c[2])  # the zero vector has no direction


def test_classifier_gradient_on_xt_is_grad_log_softmax():
    clf = small_classifier()
    unet_calls = []

    def eps_fn(x: torch.Tensor) -> torch.Tensor:
        unet_calls.append(x.requires_grad)
        return 0.5 * x

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 2, 3])
    out = ClassifierGuidance(clf)(eps_fn, x, 500, torch.tensor(0.3), y)
    xr = x.clone().requires_grad_(True)
    lp = torch.log_softmax(clf(xr), dim=1)
    (ref,) = torch.autograd.grad(lp[torch.arange(3), y].sum(), xr)
    assert out.grad.dtype == torch.float64  # guidance.unscale: no float32 underflow
    torch.testing.assert_close(out.grad, ref.double())
    torch.testing.assert_close(out.log_probs, lp.detach())
    torch.testing.assert_close(out.eps, 0.5 * x)
    x0 = x0_from_eps(x, 0.5 * x, torch.tensor(0.3))
    torch.testing.assert_close(out.log_probs_x0, torch.log_softmax(clf(x0), dim=1).detach())
    assert unet_calls == [False]  # without D2 no graph through the UNet
    assert not out.grad.requires_grad and not out.eps.requires_grad


def test_x0_estimate_gradient_flows_through_the_unet():
    clf = small_classifier()
    torch.manual_seed(0)
    unet = make_unet("tiny").eval()
    t, abar = 700, torch.tensor(0.05)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    y = torch.tensor([1, 1])
    out = ClassifierGuidance(clf, x0_estimate=True)(lambda v: unet(v, t).sample, x, t, abar, y)
    xr = x.clone().requires_grad_(True)
    eps = unet(xr, t).sample
    x0 = (xr - (1 - abar).sqrt() * eps) / abar.sqrt()
    lp = torch.log_softmax(clf(x0), dim=1)
    (ref,) = torch.autograd.grad(lp[:, 1].sum(), xr)
    torch.testing.assert_close(out.grad, ref.double())
    # The Jacobian of the UNet matters: ignoring it (d x0 / d x_t = 1 / sqrt(abar)) differs.
    x0d = x0.detach().requires_grad_(True)
    (g0,) = torch.autograd.grad(torch.log_softmax(clf(x0d), 1)[:, 1].sum(), x0d)
    assert not torch.allclose(out.grad, (g0 / abar.sqrt()).double(), rtol=1e-2)
    assert torch.equal(out.log_probs, out.log_probs_x0)


def test_time_conditioned_classifier_gets_t_or_zero():
    torch.manual_seed(0)
    clf = make_classifier(time_conditioned=True).eval()
    seen: list[int] = []
    clf.register_forward_pre_hook(lambda m, args: seen.append(int(torch.as_tensor(args[1]))))
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, dtype=torch.long)
    ClassifierGuidance(clf)(lambda v: 0 * v, x, 640, torch.tensor(0.2), y)
    assert seen == [640, 0]  # x_t with its t; the x0-estimate diagnostic with t = 0
    seen.clear()
    ClassifierGuidance(clf, x0_estimate=True)(lambda v: 0 * v, x, 640, torch.tensor(0.2), y)
    assert seen == [0]


def test_guiding_classifier_must_be_in_eval_mode():
    with pytest.raises(GradcheckError, match="eval"):
        ClassifierGuidance(small_classifier().train())


def test_oracle_is_a_time_aware_classifier_and_refuses_x0_estimate():
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(12, 3, 8, 8, generator=gen) * 2 - 1
    labels = torch.arange(12) % 4
    abar = torch.linspace(0.999, 0.01, 1000)
    oracle = EmpiricalOracle(images, labels, abar).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    y = torch.tensor([0, 3])
    lp = classifier_log_probs(oracle, x, 300)
    torch.testing.assert_close(lp, oracle.log_prob(x, 300))
    out = ClassifierGuidance(oracle)(lambda v: 0 * v, x, 300, abar[300], y)
    torch.testing.assert_close(out.grad, oracle.grad_log_prob(x, 300, y).double(), rtol=1e-4,
                               atol=1e-6)
    with pytest.raises(GradcheckError, match="x0-estimate"):
        ClassifierGuidance(oracle, x0_estimate=True)


def test_d3_is_exact_where_the_classifier_is_certain_and_log_softmax_is_not():
    """Past a margin of about 16.6, p(y|x) rounds to 1 in float32 and log_softmax's backward
    drops the target logit's term; the stable form keeps the float64 gradient's direction."""
    from gradcheck.guidance import target_log_prob

    z = torch.tensor([[25.0, 3.0, 1.0, -2.0], [40.0, 0.0, 39.0, 0.0], [1.0, 2.0, 0.5, 0.0]])
    y = torch.tensor([0, 0, 0])
    exact = torch.autograd.functional.jacobian(
        lambda v: torch.log_softmax(v, 1)[torch.arange(3), y].sum(), z.double())
    grads = {}
    for form in ("stable", "log-softmax"):
        v = z.clone().requires_grad_(True)
        value = target_log_prob(torch.log_softmax(v, 1), y, form)
        (grads[form],) = torch.autograd.grad(value.sum(), v)
        if form == "stable":  # the value too: -3.2e-10 at margin 22, where log_softmax reads 0
            torch.testing.assert_close(value.double(), torch.log_softmax(z.double(), 1)[:, 0],
                                       rtol=1e-5, atol=1e-15)
    torch.testing.assert_close(grads["stable"].double(), exact, rtol=1e-5, atol=0)
    assert grads["log-softmax"][0, 0] == 0  # the target's term is gone at margin 22
    assert cosine(grads["log-softmax"][:1], exact[:1].float()).item() < 0.7  # half is gone
    torch.testing.assert_close(grads["log-softmax"][2], grads["stable"][2])  # uncertain: equal


def test_guidance_through_a_saturated_classifier_keeps_its_direction():
    """A classifier made certain (its logits scaled to a margin of 25) still gives the float64
    gradient's direction on x_t; log-softmax's does not."""
    clf = small_classifier()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        z = clf(x)
    y = z.argmax(1)
    top2 = z.topk(2, dim=1).values
    for i in range(4):  # margins of 25: p(y|x) rounds to 1 in float32, not in float64
        sharp = nn.Sequential(clf, _Scale(25.0 / float(top2[i, 0] - top2[i, 1]))).eval()
        xi, yi = x[i:i + 1], y[i:i + 1]
        xr = xi.double().requires_grad_(True)
        (ref,) = torch.autograd.grad(torch.log_softmax(sharp.double()(xr), 1)[0, yi].sum(), xr)
        sharp.float()
        out = {f: ClassifierGuidance(sharp, log_prob=f)(lambda v: 0 * v, xi, 500,
                                                          torch.tensor(0.3), yi)
               for f in ("stable", "log-softmax")}
        assert cosine(out["stable"].grad, ref.float()).item() > 0.999
        assert cosine(out["log-softmax"].grad, ref.float()).item() < 0.9  # measured 0.65-0.73
    with pytest.raises(GradcheckError, match="log_prob"):
        ClassifierGuidance(clf, log_prob="exact")


def test_the_networks_backward_sees_a_cotangent_of_order_one():
    """At a margin of 95 the cotangent of the logits is ~1e-41, a float32 subnormal: it enters
    the classifier's backward scaled to a largest entry in [1, 2) (a power of two) and the result
    is scaled back into float64, exact where float32 would round the gradient to a subnormal
    (margin 95) or to 0 (margin 150, ||g|| ~ 1e-65), so D5 still applies its direction."""
    from gradcheck.guidance import logit_cotangent

    clf = small_classifier()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = clf(x)
    y, top2 = z.argmax(1), z.topk(2, dim=1).values
    for margin in (150.0, 95.0, 60.0):
        sharp = nn.Sequential(clf, _Scale(margin / float(top2[0, 0] - top2[0, 1]))).eval()
        seen: list[torch.Tensor] = []
        sharp[1].register_full_backward_hook(lambda m, gin, gout, seen=seen: seen.append(gout[0]))
        out = ClassifierGuidance(sharp)(lambda v: 0 * v, x, 500, torch.tensor(0.3), y)
        assert 1 <= float(seen[0].abs().max()) < 2
        xr = x.double().requires_grad_(True)  # float64 and D3's stable form: log_softmax's
        zr = sharp.double()(xr)  # backward drops 1 - p_y = 1e-26 even in float64
        margin_r = torch.logsumexp(zr.scatter(1, y[:, None], float("-inf")), 1) - zr[0, y]
        (ref,) = torch.autograd.grad(-torch.nn.functional.softplus(margin_r).sum(), xr)
        sharp.float()
        assert 0 < float(ref.norm()) < 1e-20
        assert out.grad.dtype == torch.float64
        torch.testing.assert_close(out.grad, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max()))
        score = torch.randn_like(x)
        gtilde, vanished = normalize_guidance(out.grad, score)
        assert not vanished.any()
        assert cosine(gtilde, ref).item() > 0.9999
        torch.testing.assert_close(flat_norm(gtilde), flat_norm(score))
    v, log2_scale = logit_cotangent(torch.log_softmax(z * 50, 1), y)
    assert torch.equal(log2_scale, log2_scale.round())  # powers of two


class _Scale(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.k * v


def test_the_cotangent_past_float64s_range_comes_from_its_closed_form():
    """Past a margin of about 745, sigmoid(-margin) is 0 in float64 and autograd's cotangent with
    it; the log-domain closed form keeps direction and log2 scale. In float64's normal range the
    result is autograd's, bit for bit."""
    from gradcheck.guidance import logit_cotangent, target_log_prob, unscale

    y = torch.tensor([1, 0])
    for margin in (5.0, 100.0, 700.0, 720.0, 800.0, 3000.0):
        z = torch.tensor([[-margin, 0.0, -margin - 1, -margin - 3],
                          [0.0, -margin - 0.5, -margin, -margin - 2]], dtype=torch.float64)
        v, log2_scale = logit_cotangent(z, y)
        assert torch.equal(log2_scale, log2_scale.round())
        assert (v.abs().amax(1) >= 1).all() and (v.abs().amax(1) < 2).all()
        others = z.scatter(1, y[:, None], float("-inf"))
        log_s = -torch.nn.functional.softplus(z.gather(1, y[:, None])[:, 0]
                                               - torch.logsumexp(others, 1))  # log sigmoid(L)
        expected = torch.nn.functional.one_hot(y, 4).double() - torch.softmax(others, 1)
        torch.testing.assert_close(v / v.abs().amax(1, keepdim=True), expected, rtol=1e-13,
                                   atol=1e-14)
        torch.testing.assert_close(log2_scale + torch.log2(v.abs().amax(1)),
                                   log_s / torch.log(torch.tensor(2.0, dtype=torch.float64)),
                                   rtol=1e-14, atol=1e-12)
        zz = z.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(target_log_prob(zz, y).sum(), zz)
        if margin < 700:  # normal range: autograd's numbers exactly
            assert torch.equal(unscale(v, log2_scale), auto)
        if margin > 750:  # autograd's is 0 here; the direction is not
            assert (auto == 0).all() and (unscale(v, log2_scale) == 0).all()
            assert (log2_scale < -1074).all()


def test_oracle_guidance_keeps_its_direction_where_its_gradient_underflows():
    """At small t the empirical posterior's margin reaches thousands: g_t = grad log q(y | x_t)
    is below float64's range (grad reads 0), but its direction is exact (D8's pairwise form,
    sum_{c != y} q_c (mu_y - mu_c), normalised in the log domain), and D5 applies it."""
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(16, 3, 8, 8, generator=gen) * 2 - 1
    labels = torch.arange(16) % 4
    abar = torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64)
    oracle = EmpiricalOracle(images, labels, abar).eval()
    t = 2
    x = (abar[t].sqrt() * images[[1, 6]] + (1 - abar[t]).sqrt() * torch.randn(
        2, 3, 8, 8, generator=gen, dtype=torch.float64)).float()
    y = labels[[1, 6]]  # the nearest images' classes: q(y | x_t) = 1 - e^(-margin)
    out = ClassifierGuidance(oracle)(lambda v: 0 * v, x, t, abar[t], y)
    log_q, coef, means = oracle._moments(oracle._flat(x), oracle._abar(t, x))
    others = log_q.scatter(1, y[:, None], float("-inf"))
    assert (log_q.gather(1, y[:, None])[:, 0] - others.max(1).values > 1000).all()
    assert (out.grad == 0).all()  # the true gradient: below 4.9e-324
    w = torch.softmax(others, dim=1)  # q_c / sum_{c != y} q_c
    mu_y = means[torch.arange(2), y]
    ref = (coef[:, None] * (w[..., None] * (mu_y[:, None] - means)).sum(1)).reshape(x.shape)
    assert (cosine(out.direction, ref) > 1 - 1e-6).all()
    score = torch.randn_like(x)
    gtilde, vanished = normalize_guidance(out.direction, score)
    assert not vanished.any()
    torch.testing.assert_close(flat_norm(gtilde), flat_norm(score))
