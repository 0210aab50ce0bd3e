"""The guided loop (docs/maths.md D1-D7): pairing, invariances, read-only observers, bad input."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline
from torch import nn

from gradcheck.guidance import ClassifierGuidance, cosine, flat_norm
from gradcheck.models import make_scheduler, make_unet
from gradcheck.numerics import NetworkCalls
from gradcheck.recorder import StepRecorder
from gradcheck.sampler import GuidanceConfig, GuidanceStep, ddpm_step, sample_configs, sample_guided
from gradcheck.utils import GradcheckError, sample_generators


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


@pytest.mark.parametrize("x0_estimate", [False, True])
def test_batch_size_does_not_change_samples(unet, clf, x0_estimate):
    """One generator per sample gives the same noise whatever the batch, and networks evaluated
    in fixed pieces of 4 rows (NetworkCalls) round every row the same way: batch sizes 2 and 8 give
    bit-identical samples, vectors and per-step numbers."""
    sched = make_scheduler()
    net = NetworkCalls(rows=4)
    for guidance in (None, ClassifierGuidance(clf, x0_estimate=x0_estimate)):
        seen: dict[int, list[GuidanceStep]] = {2: [], 8: []}
        whole = sample_guided(unet, sched, guidance, gens(range(8)), stabilizer="adam",
                              steps=STEPS, net=net, observers=[collect(seen[8])])
        parts = torch.cat([
            sample_guided(unet, sched, guidance, gens(range(i, i + 2)), stabilizer="adam",
                          steps=STEPS, sample_indices=range(i, i + 2), net=net,
                          observers=[collect(seen[2])])
            for i in range(0, 8, 2)
        ])
        assert torch.equal(parts, whole)
        last_8 = seen[8][-1].grad_applied
        last_2 = torch.cat([s.grad_applied for s in seen[2] if s.step == STEPS - 1])
        assert torch.equal(last_2, last_8)


def test_whole_batch_evaluation_agrees_to_rounding(unet, clf):
    """Without fixed pieces (rows=None) a CPU GEMM with 2 rows rounds differently from one with
    8 (the time embedding alone differs by ~1e-7): samples agree to rounding only."""
    sched = make_scheduler()
    guidance = ClassifierGuidance(clf)
    whole = sample_guided(unet, sched, guidance, gens(range(8)), stabilizer="adam", steps=STEPS)
    parts = torch.cat([
        sample_guided(unet, sched, guidance, gens(range(i, i + 2)), stabilizer="adam",
                      steps=STEPS, sample_indices=range(i, i + 2))
        for i in range(0, 8, 2)
    ])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-4)


def test_lanes_equal_separate_runs_bit_for_bit(unet, clf):
    """The sweep's batched configurations: lanes sharing seeds, UNet calls and classifier
    passes give exactly the samples and per-step records of running each lane alone."""
    sched = make_scheduler()
    net = NetworkCalls(rows=4)
    xt, x0 = ClassifierGuidance(clf), ClassifierGuidance(clf, x0_estimate=True)
    configs = [
        dict(guidance=xt, stabilizer="none", scale=1.0, target=0),
        dict(guidance=xt, stabilizer="adam", scale=2.0, target=1),
        dict(guidance=x0, stabilizer="none", scale=1.0, target=2),
        dict(guidance=x0, stabilizer="adam", scale=0.5, target=3, normalize=False),
        dict(guidance=None, scale=0.0),
    ]
    alone, together = [], []
    for cfg in configs:
        rec = StepRecorder("r", 3, STEPS, record_vectors="all")
        x = sample_guided(unet, sched, cfg["guidance"], gens(range(3)), steps=STEPS, net=net,
                          observers=[rec], **{k: v for k, v in cfg.items() if k != "guidance"})
        alone.append((x, rec))
    lanes = []
    for cfg in configs:
        rec = StepRecorder("r", 3, STEPS, record_vectors="all")
        together.append(rec)
        lanes.append(GuidanceConfig(observers=[rec], **cfg))
    xs = sample_configs(unet, sched, lanes, gens(range(3)), steps=STEPS, net=net)
    for (x_alone, rec_alone), x_lane, rec_lane in zip(alone, xs, together, strict=True):
        assert torch.equal(x_alone, x_lane)
        pd.testing.assert_frame_equal(rec_alone.frame(), rec_lane.frame())
        for key, v in rec_alone.vectors().items():
            assert torch.equal(v, rec_lane.vectors()[key])


def test_ddpm_step_is_the_scheduler_step_with_given_noise(unet):
    sched = make_scheduler()
    sched.set_timesteps(7)
    x = torch.randn(3, 3, 32, 32)
    eps = torch.randn(3, 3, 32, 32)
    for t in sched.timesteps.tolist():
        ref = sched.step(eps, t, x, generator=gens(range(3))).prev_sample
        noise = torch.stack([torch.randn(3, 32, 32, generator=g) for g in gens(range(3))])
        assert torch.equal(ddpm_step(sched, eps, t, x, noise if t > 0 else None), ref)


@pytest.mark.parametrize(("dtype", "tolerance"), [("bf16", 0.02), ("fp16", 0.005)])
def test_16_bit_unet_stays_within_its_stated_tolerance(unet, clf, dtype, tolerance):
    """bf16 or float16 autocast on the UNet only (NetworkCalls.unet_dtype): each eps is within 2%
    (bf16) or 0.5% (float16) of float32, relative L2; the guidance maths stay float32/float64.
    Chains amplify such differences (see the README's Performance section), so 16-bit runs are
    compared with fp32 on metrics, not pixels."""
    sched = make_scheduler()
    guidance = ClassifierGuidance(clf, x0_estimate=True)
    seen: dict[str, list[GuidanceStep]] = {"fp32": [], dtype: []}
    for name in seen:
        x = sample_guided(unet, sched, guidance, gens(range(4)), stabilizer="adam", steps=STEPS,
                          net=NetworkCalls(rows=4, unet_dtype=name),
                          observers=[collect(seen[name])])
        assert torch.isfinite(x).all()
    first32, first16 = seen["fp32"][0], seen[dtype][0]
    assert torch.equal(first32.x_t, first16.x_t)  # same x_T
    assert not torch.equal(first32.eps, first16.eps)  # the 16-bit UNet really ran
    assert (first16.eps - first32.eps).norm() / first32.eps.norm() < tolerance
    assert all(s.eps.dtype == s.grad_applied.dtype == torch.float32 for s in seen[dtype])
    assert all(s.grad_raw.dtype == torch.float64 for s in seen[dtype])
    assert all(s.cos_prev_raw.dtype == torch.float64 for s in seen[dtype])


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


class CertainClassifier(nn.Module):
    """Class 1 at a margin of 2000 + mean(x): grad log p(1 | x) = e^-2000 / D, below float64's
    range, in the direction of all ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(x.shape[0], 4)
        z[:, 1] = 2000 + x.mean(dim=(1, 2, 3))
        return z


def test_a_gradient_below_float64s_range_still_guides_by_its_direction(unet):
    """Plain guidance (S = none) applies g_t's direction where g_t itself reads 0: D5 is
    scale-free. ADAM's memory needs g_t's size, which float64 cannot hold: there it vanishes."""
    sched, source = make_scheduler(), ClassifierGuidance(CertainClassifier().eval())
    kw = dict(target=1, scale=1.0, steps=STEPS)
    seen: list[GuidanceStep] = []
    x = sample_guided(unet, sched, source, gens(range(2)), observers=[seen.append], **kw)
    assert all((s.grad_raw == 0).all() and not s.vanished.any() for s in seen)
    for s in seen:
        ones = torch.ones_like(s.grad_direction)
        assert (cosine(s.grad_direction, ones) > 1 - 1e-6).all()
        assert (cosine(s.grad_applied, ones) > 1 - 1e-6).all()
        torch.testing.assert_close(flat_norm(s.grad_applied), flat_norm(s.score), rtol=1e-5, atol=0)
    assert all((s.cos_prev_raw > 1 - 1e-6).all() for s in seen[1:])
    assert not torch.equal(x, sample_guided(unet, sched, None, gens(range(2)), steps=STEPS))
    from gradcheck.sampler import sample_reference

    assert torch.equal(x, sample_reference(unet, make_scheduler(), source, gens(range(2)), **kw))
    adam: list[GuidanceStep] = []
    sample_guided(unet, sched, source, gens(range(2)), stabilizer="adam", observers=[adam.append],
                  **kw)
    assert all(s.vanished.all() for s in adam)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a GPU")
def test_step_loop_never_waits_for_the_gpu():
    """From the end of step 0 to the last step, nothing in the loop or the recorder syncs the
    host with the GPU (torch.cuda.set_sync_debug_mode raises on any sync)."""
    torch.manual_seed(0)
    unet = make_unet("tiny").cuda().eval().requires_grad_(False)
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(8 * 16 * 16, 4)).cuda().eval().requires_grad_(False)
    steps = 5

    def strict(step: GuidanceStep) -> None:
        if step.step == 0:
            torch.cuda.set_sync_debug_mode("error")
        if step.step == steps - 1:
            torch.cuda.set_sync_debug_mode(0)

    recorders = [StepRecorder(f"r{i}", 2, steps, record_vectors="subset") for i in range(3)]
    lanes = [GuidanceConfig(guidance=ClassifierGuidance(clf), stabilizer="adam",
                            observers=[recorders[0]]),
             GuidanceConfig(guidance=ClassifierGuidance(clf, x0_estimate=True), target=2,
                            observers=[recorders[1]]),
             GuidanceConfig(observers=[recorders[2], strict])]
    try:
        xs = sample_configs(unet, make_scheduler(), lanes, gens(range(2)), steps=steps,
                          net=NetworkCalls(rows=2))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(x).all() for x in xs)
    assert all(len(r.frame()) == 2 * steps for r in recorders)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_unet_gives_the_same_samples(unet, clf):
    """`--compile` (runner: torch.compile of the sampling UNet) through the x0-estimate, where
    the gradient runs back through the compiled UNet: the samples agree with eager ones within
    float32 reordering (measured: mean 1e-7 and at most about 1e-4 after 4 steps)."""
    sched = make_scheduler()
    guidance = ClassifierGuidance(clf, x0_estimate=True)
    kwargs = dict(steps=4, net=NetworkCalls(rows=4), stabilizer="adam")
    eager = sample_guided(unet, sched, guidance, gens(range(4)), **kwargs)
    compiled = sample_guided(torch.compile(unet), sched, guidance, gens(range(4)), **kwargs)
    diff = (compiled - eager).abs()
    assert diff.mean().item() < 1e-5 and diff.max().item() < 1e-3


@pytest.mark.parametrize(("x0_estimate", "stabilizer", "normalize_to"),
                         [(False, "none", "score"), (True, "adam", "score"),
                          (False, "ema", "eps"), (None, "none", "score")])
def test_reference_loop_is_bit_identical_to_the_fast_path(unet, clf, x0_estimate, stabilizer,
                                                          normalize_to):
    """sample_reference (D1-D7 in one page) and sample_guided (lanes, row pieces, observers)
    compute the same samples, bit for bit, in float32; and the D7 it reports matches."""
    from gradcheck.sampler import sample_reference

    source = None if x0_estimate is None else ClassifierGuidance(clf, x0_estimate=x0_estimate)
    kw = dict(target=1, scale=1.5, stabilizer=stabilizer, normalize_to=normalize_to, steps=STEPS)
    seen: list[GuidanceStep] = []
    fast = sample_guided(unet, make_scheduler(), source, gens(range(3)), observers=[seen.append],
                         **kw)
    reported: list[dict] = []
    ref = sample_reference(unet, make_scheduler(), source, gens(range(3)),
                           callback=reported.append, **kw)
    assert torch.equal(fast, ref)
    assert [r["t"] for r in reported] == [s.t for s in seen]
    for r, s in zip(reported[1:], seen[1:], strict=True):
        assert torch.equal(r["gtilde"], s.grad_applied)
        torch.testing.assert_close(r["cos_prev"], s.cos_prev_applied, equal_nan=True)
