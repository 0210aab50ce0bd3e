"""The exact oracle gradient (D8) against a direct float64 computation with autograd."""

from __future__ import annotations

import pytest
import torch

from gradcheck.models import make_scheduler
from gradcheck.oracle import EmpiricalOracle, oracle_available
from gradcheck.utils import GradcheckError

ABAR = make_scheduler().alphas_cumprod
TIMESTEPS = (0, 20, 100, 250, 600, 999)


@pytest.fixture(scope="module")
def train_set() -> tuple[torch.Tensor, torch.Tensor]:
    """40 random 3x8x8 images in [-1, 1] with every class, float32 like the data set."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1
    y = torch.arange(40) % 4
    return x, y


def direct_log_q(x_t: torch.Tensor, t: int, images: torch.Tensor, labels: torch.Tensor):
    """log q(c | x_t) (B, C) straight from D8 in float64: full distances, one log-sum-exp."""
    a = ABAR.double()[t]
    xi = images.double().flatten(1)
    d = (x_t.flatten(1)[:, None] - a.sqrt() * xi[None]).square().sum(-1)
    logits = -d / (2 * (1 - a))
    per_class = torch.stack(
        [torch.logsumexp(logits.masked_fill(labels[None] != c, float("-inf")), 1)
         for c in range(4)], dim=1)
    return per_class - torch.logsumexp(logits, dim=1, keepdim=True)


def noisy(images: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = ABAR.double()[t]
    return a.sqrt() * images.double() + (1 - a).sqrt() * torch.randn(
        images.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("t", TIMESTEPS)
def test_gradient_equals_autograd_of_direct_log_q(train_set, t):
    images, labels = train_set
    oracle = EmpiricalOracle(images, labels, ABAR, chunk_size=7)
    # Half the queries near training images, half between them.
    x_t = torch.cat([noisy(images[:4], t, 1), noisy((images[4:8] + images[8:12]) / 2, t, 2)])
    y = torch.tensor([1, 2, 3, 0, 0, 1, 2, 3])
    x_ref = x_t.clone().requires_grad_(True)
    log_q = direct_log_q(x_ref, t, images, labels)
    (g_ref,) = torch.autograd.grad(log_q[torch.arange(8), y].sum(), x_ref)

    g = oracle.grad_log_prob(x_t, t, y)
    assert g.dtype == torch.float64
    scale = g_ref.abs().max().clamp_min(1.0)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(oracle.log_prob(x_t, t), log_q.detach(), rtol=1e-6, atol=1e-6)


def test_gradient_stays_exact_where_the_posterior_rounds_to_one(train_set):
    """Near a training image at moderate t, q(y | x_t) is 1 in float64 and E[x | y] - E[x] cancels
    to 0; the oracle keeps the tiny exact gradient, checked against autograd of D3's stable form
    -softplus(logsumexp_{c != y} l_c - l_y) on the direct per-class log-sum-exps l."""
    images, labels = train_set
    oracle = EmpiricalOracle(images, labels, ABAR, chunk_size=7)
    t = 200  # q(other | x_t) ~ 1e-35: below float64's 1 - q resolution, above its underflow
    x_t = noisy(images[:4], t, 6)
    y = labels[:4]
    assert torch.equal(oracle.log_prob(x_t, t).exp()[torch.arange(4), y], torch.ones(4,
                                                                                 dtype=torch.float64))
    x_ref = x_t.clone().requires_grad_(True)
    per_class = direct_log_q(x_ref, t, images, labels)  # shift-invariant in D3's stable form
    others = per_class.masked_fill(torch.nn.functional.one_hot(y, 4).bool(), float("-inf"))
    margin = torch.logsumexp(others, 1) - per_class[torch.arange(4), y]
    (g_ref,) = torch.autograd.grad(-torch.nn.functional.softplus(margin).sum(), x_ref)
    g = oracle.grad_log_prob(x_t, t, y)
    assert (g.flatten(1).norm(dim=1) > 0).all()
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6 * float(g_ref.abs().max()))


def test_posterior_is_not_degenerate_at_large_t(train_set):
    """The gradient test above must cover t where several classes carry weight."""
    images, labels = train_set
    q = EmpiricalOracle(images, labels, ABAR).log_prob(noisy(images[:8], 600, 3), 600).exp()
    assert float(q.min()) > 0.01
    torch.testing.assert_close(q.sum(1), torch.ones(8, dtype=torch.float64))


def test_log_prob_is_a_differentiable_classifier(train_set):
    """oracle(x, t) as logits: log_softmax keeps it, and autograd gives the closed form."""
    images, labels = train_set
    oracle = EmpiricalOracle(images, labels, ABAR, chunk_size=5)
    x_t = noisy(images[:6], 250, 4).float()
    y = torch.tensor([3, 2, 1, 0, 3, 2])
    x = x_t.clone().requires_grad_(True)
    logits = oracle(x, 250)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(torch.log_softmax(logits, 1), logits, rtol=0, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (g,) = torch.autograd.grad(-loss, x)
    expected = oracle.grad_log_prob(x_t, 250, y)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_chunked_equals_unchunked(train_set):
    images, labels = train_set
    x_t = noisy(images[:5], 100, 5)
    y = torch.tensor([0, 1, 2, 3, 0])
    whole = EmpiricalOracle(images, labels, ABAR, chunk_size=10_000)
    for chunk_size in (1, 3, 16):
        part = EmpiricalOracle(images, labels, ABAR, chunk_size=chunk_size)
        for method, args in (("log_prob", ()), ("grad_log_prob", (y,)), ("weights", ())):
            torch.testing.assert_close(getattr(part, method)(x_t, 100, *args),
                                       getattr(whole, method)(x_t, 100, *args),
                                       rtol=1e-12, atol=1e-12)


def test_small_t_posterior_picks_the_nearest_training_image(train_set):
    images, labels = train_set
    oracle = EmpiricalOracle(images, labels, ABAR, chunk_size=6)
    # Noisy training images at t = 0 (abar = 0.9999) and unseen images: perturbed training images.
    g = torch.Generator().manual_seed(6)
    queries = torch.cat([noisy(images[10:14], 0, 7),
                         images[20:24].double() + 0.2 * torch.randn(4, 3, 8, 8, generator=g,
                                                                    dtype=torch.float64)])
    a = ABAR.double()[0]
    dist = (queries.flatten(1)[:, None] - a.sqrt() * images.double().flatten(1)[None]).norm(dim=2)
    nearest = dist.argmin(1)
    assert nearest[:4].tolist() == [10, 11, 12, 13]
    w = oracle.weights(queries, 0)
    assert w.shape == (8, 40)
    assert w.argmax(1).tolist() == nearest.tolist()
    assert float(w.max(1).values.min()) > 0.99
    assert oracle.log_prob(queries, 0).argmax(1).tolist() == labels[nearest].tolist()


def test_per_sample_timesteps_equal_separate_calls(train_set):
    images, labels = train_set
    oracle = EmpiricalOracle(images, labels, ABAR)
    ts = torch.tensor([0, 100, 500, 999])
    x_t = torch.cat([noisy(images[i:i + 1], int(t), i) for i, t in enumerate(ts)])
    y = torch.tensor([2, 3, 0, 1])
    batched = oracle.grad_log_prob(x_t, ts, y)
    for i, t in enumerate(ts.tolist()):
        single = oracle.grad_log_prob(x_t[i:i + 1], t, y[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single)


def test_bad_input_gives_clear_errors(train_set):
    images, labels = train_set
    oracle = EmpiricalOracle(images, labels, ABAR)
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(GradcheckError, match="0..999"):
        oracle.log_prob(x, 1000)
    with pytest.raises(GradcheckError, match="oracle images are"):
        oracle.log_prob(torch.zeros(2, 3, 4, 4), 10)
    with pytest.raises(GradcheckError, match="2 images but 3 labels"):
        oracle.grad_log_prob(x, 10, torch.tensor([0, 1, 2]))
    with pytest.raises(GradcheckError, match="labels must lie in"):
        EmpiricalOracle(images, labels + 1, ABAR)
    no_soccer = EmpiricalOracle(images[labels != 2], labels[labels != 2], ABAR)
    assert torch.isneginf(no_soccer.log_prob(x, 10)[:, 2]).all()
    with pytest.raises(GradcheckError, match="no image of class soccer"):
        no_soccer.grad_log_prob(x, 10, torch.tensor([2, 0]))


def test_from_data_root(tiny_data, tmp_path):
    from gradcheck.data.sportballs import load_tensors

    oracle = EmpiricalOracle.from_data_root(tiny_data, ABAR, device="cpu")
    x, y = load_tensors(tiny_data, "train")
    assert oracle.num_train == x.shape[0] == 64
    # A training image at t = 0 is classified as its own label.
    assert oracle.log_prob(x[:8], 0).argmax(1).tolist() == y[:8].tolist()
    assert oracle_available(tiny_data)
    assert not oracle_available(tmp_path / "missing")
    with pytest.raises(GradcheckError, match="make-dataset"):
        EmpiricalOracle.from_data_root(tmp_path / "missing", ABAR, device="cpu")
