"""Reduced precision: TF32 rounding, its emulation, the ``auto`` policy, ``gradcheck precision``."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck import numerics
from gradcheck.cli import main
from gradcheck.guidance import ClassifierGuidance
from gradcheck.models import make_scheduler
from gradcheck.numerics import AUTO_FP32_GAIN, NetworkCalls, d2_gain
from gradcheck.precision import emulate_tf32, gradient_agreement, round_tf32
from gradcheck.sampler import GuidanceConfig, sample_configs, sample_guided
from gradcheck.utils import GradcheckError, sample_generators

STEPS = 6  # respaced t = 830, 664, 498, 332, 166, 0: D2 gains ~33, ~9.3, ~3.4, ...


def low_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) & ((1 << 13) - 1)


def test_round_tf32_keeps_10_mantissa_bits_rounding_to_nearest_even():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e3
    r = round_tf32(x)
    assert (low_bits(r) == 0).all()
    assert ((r - x).abs() <= x.abs() * 2.0**-11).all()  # half a TF32 ulp
    exact = torch.tensor([1.0, -0.75, 1 + 2.0**-10, 3.0 * 2**100])
    assert torch.equal(round_tf32(exact), exact)
    # Halfway cases go to the even neighbour; just above halfway goes up.
    ties = torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-20])
    assert torch.equal(round_tf32(ties), torch.tensor([1.0, 1 + 2.0**-9, 1 + 2.0**-10]))
    assert torch.equal(round_tf32(-ties), -round_tf32(ties))  # symmetric
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = round_tf32(special)
    assert torch.equal(out[:2], special[:2]) and out[2].isnan()
    # Beyond the largest TF32 number: inf; the largest TF32 number itself stays.
    big = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    assert torch.equal(round_tf32(big), torch.tensor([float("inf"), -float("inf")]))
    largest = torch.tensor([0x7F7FE000], dtype=torch.int32).view(torch.float32)
    assert torch.equal(round_tf32(largest), largest)
    # Subnormals round like everything else; the largest one becomes the smallest normal.
    sub = torch.tensor([0x1000, 0x3000, 0x7FFFFF], dtype=torch.int32).view(torch.float32)
    expected = torch.tensor([0, 0x4000, 0x800000], dtype=torch.int32).view(torch.float32)
    assert torch.equal(round_tf32(sub), expected)
    with pytest.raises(GradcheckError, match="round_tf32 takes float32 tensors, got "
                       "torch.float64"):
        round_tf32(torch.zeros(2, dtype=torch.float64))


def test_emulation_follows_the_tf32_flags_and_leaves_weights_alone():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(16, 5)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 16)
    weights = [p.clone() for p in (*conv.parameters(), *lin.parameters())]
    with emulate_tf32(conv, lin):
        with NetworkCalls(tf32=False).numerics():
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
            assert torch.equal(lin(v), F.linear(v, lin.weight, lin.bias))
        with NetworkCalls(tf32=True).numerics():
            conv_tf32, lin_tf32 = conv(x), lin(v)
    ref_conv = F.conv2d(round_tf32(x), round_tf32(conv.weight), conv.bias, padding=1)
    assert torch.equal(conv_tf32, ref_conv)
    assert torch.equal(lin_tf32, F.linear(round_tf32(v), round_tf32(lin.weight), lin.bias))
    rel = (conv_tf32 - conv(x)).norm() / conv(x).norm()
    assert 1e-5 < rel < 1e-3
    assert all(torch.equal(a, b) for a, b in
               zip(weights, (*conv.parameters(), *lin.parameters()), strict=True))
    # Outside the block the layers are plain float32 again, whatever the flags say.
    with NetworkCalls(tf32=True).numerics():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_emulated_backward_rounds_the_incoming_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    gout = torch.randn(2, 4, 8, 8)
    with emulate_tf32(conv), NetworkCalls(tf32=True).numerics():
        (g,) = torch.autograd.grad((conv(x) * gout).sum(), x)
    w = round_tf32(conv.weight)
    ref = torch.nn.grad.conv2d_input(x.shape, w, round_tf32(gout), padding=1)
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-6)


def test_precisions_and_the_auto_policy():
    assert NetworkCalls.for_precision("fp32", rows=8, cuda=True) == NetworkCalls(rows=8)
    assert NetworkCalls.for_precision("tf32", cuda=True) == NetworkCalls(tf32=True)
    assert NetworkCalls.for_precision("bf16", cuda=True) == NetworkCalls(unet_dtype="bf16")
    assert NetworkCalls.for_precision("fp16", cuda=True) == NetworkCalls(unet_dtype="fp16")
    auto = NetworkCalls.for_precision("auto", rows=4, cuda=True)
    assert auto == NetworkCalls(rows=4, unet_dtype="fp16", tf32=True,
                                fp32_above_gain=AUTO_FP32_GAIN)
    abar = make_scheduler().alphas_cumprod
    assert d2_gain(abar[999]) > 150 and 3 < d2_gain(abar[500]) < 4
    # Through the UNet at high noise: true float32; below the gain, and never through it:
    # float16 UNet and TF32.
    assert auto.at(abar[999], through_unet=True) == NetworkCalls(rows=4)
    assert auto.at(abar[500], through_unet=True) is auto
    assert auto.at(abar[999], through_unet=False) is auto
    assert NetworkCalls(tf32=True).at(abar[999], through_unet=True) == NetworkCalls(tf32=True)
    with pytest.raises(GradcheckError, match="unknown precision 'fp8'; choose one of: fp32, tf32, "
                       "bf16, fp16, auto"):
        NetworkCalls.for_precision("fp8", cuda=True)
    with pytest.raises(GradcheckError, match="unknown UNet dtype 'fp8'"):
        NetworkCalls(unet_dtype="fp8")


def test_cpu_auto_is_bf16_without_gradient_and_float32_through_the_unet(unet, clf, monkeypatch):
    """On a CPU with native bf16, ``auto`` runs the UNet in bf16 only where no gradient passes
    through it: x0-estimate lanes are bit-identical to float32 (as claimed), x_t-guided and
    unguided lanes move by < 0.01 on average and < 0.5 at worst (in [-1, 1]; a random tiny UNet)
    over the chain; without native bf16 it is plain float32."""
    abar = make_scheduler().alphas_cumprod
    monkeypatch.setattr(numerics, "cpu_has_native_bf16", lambda: False)
    assert NetworkCalls.for_precision("auto", rows=4, cuda=False) == NetworkCalls(rows=4)
    monkeypatch.setattr(numerics, "cpu_has_native_bf16", lambda: True)
    cpu_auto = NetworkCalls.for_precision("auto", rows=4, cuda=False)
    assert cpu_auto == NetworkCalls(rows=4, unet_dtype="bf16", fp32_above_gain=0.0)
    for t in (999, 500, 1):  # through the UNet: float32 at every t; otherwise bf16
        assert cpu_auto.at(abar[t], through_unet=True) == NetworkCalls(rows=4)
        assert cpu_auto.at(abar[t], through_unet=False) is cpu_auto
    sched = make_scheduler()
    lanes = [GuidanceConfig(guidance=ClassifierGuidance(clf, x0_estimate=True), stabilizer="adam"),
             GuidanceConfig(guidance=ClassifierGuidance(clf), stabilizer="adam"),
             GuidanceConfig(guidance=None, scale=0.0)]

    def sample(net: NetworkCalls) -> list[torch.Tensor]:
        return sample_configs(unet, sched, lanes, sample_generators(0, range(3)), steps=STEPS,
                              net=net)

    fp32, fast = sample(NetworkCalls(rows=4)), sample(cpu_auto)
    assert torch.equal(fast[0], fp32[0])
    for a, b in zip(fast[1:], fp32[1:], strict=True):
        diff = (a - b).abs()
        assert 0 < diff.mean() < 0.01 and diff.max() < 0.5


def test_auto_keeps_x0_gradients_exact_where_told_and_only_there(unet, clf):
    """With bf16 as the reduced precision (any 16-bit UNet shows the policy), the x0-estimate
    lane is bit-identical to the float32 lane when every step is above the gain, to the bf16
    lane when none is, and lies in between otherwise; the unguided lane always runs reduced."""
    sched = make_scheduler()
    x0 = ClassifierGuidance(clf, x0_estimate=True)

    def both(net: NetworkCalls) -> list[torch.Tensor]:
        lanes = [GuidanceConfig(guidance=x0, stabilizer="adam"),
                 GuidanceConfig(guidance=None, scale=0.0)]
        return sample_configs(unet, sched, lanes, sample_generators(0, range(3)), steps=STEPS,
                              net=net)

    fp32, bf16 = both(NetworkCalls(rows=4)), both(NetworkCalls(rows=4, unet_dtype="bf16"))
    assert not torch.equal(fp32[0], bf16[0])
    exact = both(NetworkCalls(rows=4, unet_dtype="bf16", fp32_above_gain=0.0))
    never = both(NetworkCalls(rows=4, unet_dtype="bf16", fp32_above_gain=float("inf")))
    mixed = both(NetworkCalls(rows=4, unet_dtype="bf16", fp32_above_gain=12.0))
    assert torch.equal(exact[0], fp32[0]) and torch.equal(never[0], bf16[0])
    assert not torch.equal(mixed[0], fp32[0]) and not torch.equal(mixed[0], bf16[0])
    assert all(torch.equal(run[1], bf16[1]) for run in (exact, never, mixed))


def test_emulated_auto_stays_within_tolerance_of_float32(unet, clf):
    """The optimised path against the plain one. With the GPU's settings (TF32 emulated, a real
    float16 UNet), ``auto`` moves samples by < 1e-3 on average and < 0.1 at worst (in [-1, 1]),
    guided on x_t or through the x0-estimate; plain TF32 through the x0-estimate changes
    samples outright (rounding amplified by D2), which is why ``auto`` keeps those steps in
    float32."""
    sched = make_scheduler()
    worst = {}
    for name, guidance in (("unguided", None), ("x_t", ClassifierGuidance(clf)),
                           ("x0", ClassifierGuidance(clf, x0_estimate=True))):
        for precision in ("fp32", "auto", "tf32"):
            with emulate_tf32(unet, clf):
                worst[name, precision] = sample_guided(
                    unet, sched, guidance, sample_generators(0, range(3)), steps=STEPS,
                    stabilizer="none" if guidance is None else "adam", diffusion_time=False,
                    net=NetworkCalls.for_precision(precision, rows=4, cuda=True))
        for precision in ("auto", "tf32"):
            diff = (worst[name, precision] - worst[name, "fp32"]).abs()
            worst[name, precision] = diff.max().item()
            if precision == "auto" or name != "x0":
                assert 0 < diff.mean() < 1e-3 and diff.max() < 0.1, (name, precision)
    assert worst["x0", "tf32"] > 0.3


class _Shrunk(nn.Module):
    """A classifier whose logits for sample i are multiplied by ``factors[i]``: the same
    gradient directions, magnitudes ``factors[i]`` times as large (a robust classifier's are
    small)."""

    def __init__(self, model: nn.Module, factors: list[float]) -> None:
        super().__init__()
        self.model, self.factors = model, torch.tensor(factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factors[:, None]


class _Unscaled(NetworkCalls):
    @property
    def scaled_backward(self) -> bool:
        return False


def test_float16_gradients_are_rescaled_per_sample_so_small_ones_survive(unet, clf):
    """float16's backward through the UNet underflows for small gradients: rescaled per sample
    (NetworkCalls.scaled_backward) each sample's x0-estimate gradient stays within 1% of float32's
    whatever its magnitude, next to samples of other magnitudes, and a zero gradient stays
    exactly zero; unscaled, a 1e-5 smaller gradient is off by 20% or more."""
    sched = make_scheduler()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    t, abar = 500, sched.alphas_cumprod[500]
    t_dev = torch.tensor(t)
    model = _Shrunk(clf, [1.0, 1e-5, 0.0, 1e3]).eval()

    def grad(net: NetworkCalls) -> torch.Tensor:
        def eps_fn(x_in: torch.Tensor) -> torch.Tensor:
            with net.unet_autocast(x_in.device):
                return unet(x_in, t_dev).sample.float()

        return ClassifierGuidance(model, x0_estimate=True)(eps_fn, x, t, abar, y, net=net).grad

    ref, fp16 = grad(NetworkCalls(rows=4)), grad(NetworkCalls(rows=4, unet_dtype="fp16"))
    rel_err = (fp16 - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert torch.isfinite(fp16).all()
    assert (rel_err[[0, 1, 3]] < 0.01).all(), rel_err
    assert (ref[2] == 0).all() and (fp16[2] == 0).all()
    unscaled = grad(_Unscaled(rows=4, unet_dtype="fp16"))
    assert ((unscaled[1] - ref[1]).norm() / ref[1].norm()).item() > 0.2


def test_float16_samples_do_not_depend_on_the_batch(unet, clf):
    """Fixed row pieces make a float16 run batch-independent too, rescaling included."""
    sched = make_scheduler()
    guidance = ClassifierGuidance(clf, x0_estimate=True)
    net = NetworkCalls.for_precision("fp16", rows=4, cuda=True)

    def sample(indices: list[int]) -> torch.Tensor:
        return sample_guided(unet, sched, guidance, sample_generators(0, indices), steps=STEPS,
                             stabilizer="adam", sample_indices=indices, net=net)

    together = sample([0, 1, 2])
    assert torch.isfinite(together).all()
    assert torch.equal(together, torch.cat([sample([0]), sample([1, 2])]))


def test_auto_gradient_is_exact_above_the_gain(unet, clf):
    sched = make_scheduler()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    table = gradient_agreement(unet, {"clf": clf}, sched.alphas_cumprod, images, 0,
                               (999, 500), modes=("tf32", "fp16", "auto"))
    table = table.set_index(["t", "mode"])
    assert table.loc[(999, "auto"), "rel_err_max"] == 0.0
    assert table.loc[(999, "tf32"), "rel_err_max"] > 0.0
    # Below the gain: a float16 UNet and TF32, not exact but within the tables' tolerances.
    assert table.loc[(500, "auto"), "rel_err_max"] > 0.0
    assert min(table.loc[(500, m), "cos_min"] for m in ("auto", "tf32", "fp16")) > 0.99


def test_precision_command_writes_the_table(tiny_checkpoints, tiny_data, tmp_path, capsys):
    out = tmp_path / "precision.parquet"
    args = ["precision", "--ddpm", str(tiny_checkpoints / "ddpm"), "--classifiers",
            str(tiny_checkpoints / "classifiers" / "nonrobust"), "--data-root", str(tiny_data),
            "--device", "cpu", "--timesteps", "999,100", "--num-samples", "2", "--modes",
            "fp64,tf32,auto",
            "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "minimum cosine to the float32 gradient" in printed and "auto" in printed
    table = pd.read_parquet(out)
    assert len(table) == 2 * 3
    assert set(table["mode"]) == {"fp64", "tf32", "auto"}
    assert (table.loc[table["mode"] == "fp64", "cos_min"] > 0.999).all()
    assert table.loc[(table["mode"] == "auto") & (table["t"] == 999), "rel_err_max"].item() == 0
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--timesteps", "99x"], "is not a comma-separated list of integers"),
    (["--timesteps", "1000"], "timestep 1000 is outside 0-999"),
    (["--timesteps", "999,999"], "timesteps repeat: 999, 999"),
    (["--modes", "fp8"], "unknown precision mode 'fp8'; choose one of: fp64, tf32, bf16, fp16, "
                          "auto"),
    (["--num-samples", "0"], "num_samples must be > 0, got 0"),
    (["--num-samples", "33"], "num_samples 33 is more than the 32 test images"),
    (["--target", "golf"], "unknown target 'golf'"),
    (["--timesteps", ""], "name at least one timestep"),
    (["--modes", ""], "name at least one precision mode"),
    (["--seed", "-1"], "seed must be an integer in 0..4294967295, got -1"),
    (["--classifiers", "oracle"], "classifier 'oracle' has no network to run in another "
                                  "precision"),
])
def test_precision_command_rejects_bad_input(tiny_checkpoints, tiny_data, extra, message,
                                             capsys):
    with pytest.raises(SystemExit) as exc:
        main(["precision", "--ddpm", str(tiny_checkpoints / "ddpm"), "--classifiers",
              str(tiny_checkpoints / "classifiers" / "nonrobust"), "--data-root",
              str(tiny_data), "--device", "cpu", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_numerics_also_works_with_the_fp32_precision_api():
    """Once a program sets torch's fp32_precision settings, reading allow_tf32 raises; numerics
    then switches TF32 through those settings and restores them. (A subprocess: the global
    state would leak into other tests.)"""
    code = (
        "import torch\n"
        "from gradcheck.numerics import NetworkCalls\n"
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "with NetworkCalls(tf32=True).numerics():\n"
        "    assert torch.backends.cudnn.conv.fp32_precision == 'tf32'\n"
        "    assert torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
        "    with NetworkCalls().at(0.5, True).numerics():\n"
        "        assert torch.backends.cudnn.conv.fp32_precision == 'ieee'\n"
        "    assert torch.backends.cudnn.conv.fp32_precision == 'tf32'\n"
        "assert torch.backends.cudnn.conv.fp32_precision == 'ieee'\n"
        "assert torch.backends.cuda.matmul.fp32_precision == 'ieee'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
