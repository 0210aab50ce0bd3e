"""The guided loop (DESIGN.md D1-D7): pairing, invariances, read-only observers, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from torch import nn

from gradcheck.guidance import ClassifierGuidance, cosine, flat_norm
from gradcheck.models import make_scheduler, make_unet
from gradcheck.recorder import StepRecorder
from gradcheck.sampler import GuidanceStep, sample_guided, to_uint8
from gradcheck.utils import GradcheckError, sample_generators


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return make_unet("tiny").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def clf() -> nn.Module:
    """A tiny conv net with well-conditioned gradients (random MobileNets barely have any)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.Tanh(), nn.Conv2d(8, 8, 3, 2, 1), nn.Tanh(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    ).eval().requires_grad_(False)


class ConstantClassifier(nn.Module):
    """Logits that do not depend on the input: g_t = 0 exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 4) + 0.0 * x.sum(dim=(1, 2, 3))[:, None]


def gens(indices, seed: int = 0) -> list[torch.Generator]:
    return sample_generators(seed, list(indices))


def collect(steps: list[GuidanceStep]):
    return steps.append


STEPS = 6


def test_scale_zero_is_exactly_the_unguided_ddpm_sample(unet, clf):
    sched = make_scheduler()
    guided0 = sample_guided(unet, sched, ClassifierGuidance(clf, x0_estimate=True), gens(range(3)),
                            scale=0.0, stabilizer="adam", steps=STEPS)
    unguided = sample_guided(unet, sched, None, gens(range(3)), steps=STEPS)
    assert torch.equal(guided0, unguided)
    # Independent reference: plain diffusers DDPMPipeline with the same per-sample generators.
    pipe = DDPMPipeline(unet=unet, scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=3, generator=gens(range(3)), num_inference_steps=STEPS,
               output_type="np").images
    ours = (unguided / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, ref)
    # and guidance does change the sample
    guided = sample_guided(unet, sched, ClassifierGuidance(clf), gens(range(3)), scale=1.0,
                           steps=STEPS)
    assert not torch.allclose(guided, unguided, atol=1e-3)


def test_d6_shift_is_s_sigma2_gtilde_with_shared_noise(unet, clf):
    """Runs sharing generators are paired: at the first step they differ by s sigma_t^2 gtilde."""
    sched = make_scheduler()
    first: dict[float, GuidanceStep] = {}
    for s in (0.0, 2.5):
        sample_guided(unet, sched, ClassifierGuidance(clf), gens(range(2)), scale=s, steps=STEPS,
                      observers=[lambda st, s=s: first.setdefault(s, st)])
    a, b = first[0.0], first[2.5]
    assert a.t == b.t == 830 and a.sigma2 == pytest.approx(float(sched._get_variance(830)))
    assert torch.equal(a.x_t, b.x_t)
    torch.testing.assert_close(b.x_prev - a.x_prev, 2.5 * a.sigma2 * a.grad_applied,
                               rtol=1e-5, atol=1e-6)


def test_respaced_timesteps_and_per_step_fields(unet, clf):
    seen: list[GuidanceStep] = []
    sample_guided(unet, make_scheduler(), ClassifierGuidance(clf), gens(range(2)), steps=STEPS,
                  stabilizer="adam", observers=[collect(seen)])
    assert [s.t for s in seen] == [830, 664, 498, 332, 166, 0]  # leading spacing, 1000 // 6
    assert [s.step for s in seen] == list(range(STEPS))
    for k, s in enumerate(seen):
        # D5: ||gtilde|| = ||score|| per sample
        torch.testing.assert_close(flat_norm(s.grad_applied), flat_norm(s.score), rtol=1e-5,
                                   atol=0)
        assert not s.vanished.any()
        # D7: cos_prev against the previous sampling step, raw and applied
        if k == 0:
            assert torch.isnan(s.cos_prev_raw).all() and torch.isnan(s.cos_prev_applied).all()
        else:
            assert torch.equal(s.cos_prev_raw, cosine(s.grad_raw, seen[k - 1].grad_raw))
            assert torch.equal(s.cos_prev_applied,
                               cosine(s.grad_applied, seen[k - 1].grad_applied))
        assert torch.equal(s.sample, torch.tensor([0, 1]))


def test_observers_cannot_change_samples(unet, clf):
    sched = make_scheduler()
    guidance = ClassifierGuidance(clf, x0_estimate=True)
    plain = sample_guided(unet, sched, guidance, gens(range(2)), stabilizer="adam", steps=STEPS)

    def vandal(step: GuidanceStep) -> None:
        for f in dataclasses.fields(step):
            v = getattr(step, f.name)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.add_(1.0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            step.scale = 100.0

    recorder = StepRecorder("r", 2, STEPS, record_vectors="all")
    observed = sample_guided(unet, sched, guidance, gens(range(2)), stabilizer="adam",
                             steps=STEPS, observers=[recorder, vandal])
    assert torch.equal(plain, observed)
    assert len(recorder.frame()) == 2 * STEPS


def test_batch_size_does_not_change_samples(unet, clf):
    """One generator per sample: same noise whatever the batch. CPU GEMMs round differently at
    different batch sizes (the UNet's time embedding alone differs by ~1e-7), so floats agree to
    rounding, and a uint8 value sitting on a rounding boundary may move by one level."""
    sched = make_scheduler()
    for guidance in (None, ClassifierGuidance(clf)):
        whole = sample_guided(unet, sched, guidance, gens(range(8)), stabilizer="adam",
                              steps=STEPS)
        parts = torch.cat([
            sample_guided(unet, sched, guidance, gens(range(i, i + 2)), stabilizer="adam",
                          steps=STEPS, sample_indices=range(i, i + 2))
            for i in range(0, 8, 2)
        ])
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-4)
        diff = (to_uint8(parts).int() - to_uint8(whole).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_same_generators_give_identical_samples_and_fresh_state(unet, clf):
    sched = make_scheduler()
    guidance = ClassifierGuidance(clf)
    runs = [sample_guided(unet, sched, guidance, gens(range(2), seed=5), stabilizer=st,
                          steps=STEPS) for st in ("adam", "adam", "ema", "ema")]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])
    assert not torch.equal(runs[0], runs[2])
    other_seed = sample_guided(unet, sched, guidance, gens(range(2), seed=6), steps=STEPS)
    assert not torch.allclose(other_seed, runs[0], atol=1e-2)


def test_zero_gradient_sets_grad_vanished_without_nan(unet):
    sched = make_scheduler()
    seen: list[GuidanceStep] = []
    x = sample_guided(unet, sched, ClassifierGuidance(ConstantClassifier().eval()), gens(range(2)),
                      stabilizer="adam", steps=STEPS, observers=[collect(seen)])
    assert torch.isfinite(x).all()
    assert all(s.vanished.all() for s in seen)
    assert all(torch.equal(s.grad_applied, torch.zeros_like(s.grad_applied)) for s in seen)
    # nothing applied: the unguided sample
    assert torch.equal(x, sample_guided(unet, sched, None, gens(range(2)), steps=STEPS))
    recorder = StepRecorder("z", 2, STEPS)
    for s in seen:
        recorder(s)
    df = recorder.frame()
    assert df["grad_vanished"].all()
    assert (df["grad_norm_applied"] == 0).all() and df["score_norm"].notna().all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(steps=1001), r"steps must be an integer in 1\.\.1000"),
        (dict(steps=0), r"steps must be an integer in 1\.\.1000"),
        (dict(scale=-0.5), r"scale must be a finite number >= 0, got -0\.5"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(target=4), r"target must be in 0\.\.3, got 4"),
        (dict(stabilizer="lion"), "unknown stabilizer 'lion'; choose one of: none, adam"),
    ],
)
def test_bad_arguments_raise_clear_errors(unet, clf, kwargs, message):
    with pytest.raises(GradcheckError, match=message):
        sample_guided(unet, make_scheduler(), ClassifierGuidance(clf), gens(range(1)),
                      **{"steps": 2, **kwargs})
