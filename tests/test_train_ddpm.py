"""train_ddpm.py and eval_ddpm.py: learning, bitwise resume, exports diffusers loads, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from gradcheck import CLASS_NAMES
from gradcheck.cli import app, main
from gradcheck.config import EvalDDPMConfig, TrainDDPMConfig
from gradcheck.eval_ddpm import border_means, evaluate_ddpm, mean_colour_slope, sample_images
from gradcheck.models import (
    load_ddpm,
    make_classifier,
    make_scheduler,
    make_unet,
    save_classifier,
)
from gradcheck.train_ddpm import (
    WeightAverage,
    export_ddpm,
    lr_at,
    min_snr_weights,
    multiscale_error,
    train_ddpm,
)
from gradcheck.utils import GradcheckError

MiB = 2**20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster (no spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run(data: Path, out: Path, **kw) -> dict:
    """A tiny CPU run: no intermediate grids or checkpoints, a 1-step grid at the end."""
    args = dict(data_root=str(data), out=str(out), name="t", preset="tiny", batch_size=8,
                lr=3e-3, warmup_steps=10, log_every=5, sample_every=0, sample_steps=1,
                checkpoint_every=0, fp16_export=False, progress=False, device="cpu",
                mixed_precision="no")  # float32: the same arithmetic on every CPU
    return train_ddpm(**{**args, **kw})


def read_log(out: Path, name: str = "t") -> pd.DataFrame:
    return pd.read_parquet(out / name / "ddpm" / "train_log.parquet")


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export after 100 steps on 8 images (the overfitting run)."""
    out = tmp_path_factory.mktemp("ckpt")
    tiny_run(tiny_data, out, max_images=8, max_steps=100, fp16_export=True)
    return out


# ---- recipe pieces --------------------------------------------------------------------------


def test_lr_warmup_and_ema_warmup():
    assert lr_at(0, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(9, 1e-3, 10) == lr_at(500, 1e-3, 10) == 1e-3
    assert lr_at(0, 1e-3, 0) == 1e-3
    ema = WeightAverage(torch.nn.Linear(2, 2), decay=0.9995)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**6) == 0.9995
    assert WeightAverage(torch.nn.Linear(2, 2), 0.99, warmup=False).decay_at(0) == 0.99


def test_ema_update_is_a_lerp():
    model = torch.nn.Linear(3, 1)
    ema = WeightAverage(model, decay=0.9, warmup=False)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)
    torch.testing.assert_close(ema.model.weight, 0.9 * before + 0.1 * model.weight)


def test_min_snr_weights():
    abar = torch.tensor([0.999, 5 / 6, 0.5, 0.01])  # SNR 999, 5, 1, ~0.0101
    w = min_snr_weights(abar, 5.0)
    torch.testing.assert_close(w, torch.tensor([5 / 999, 1.0, 1.0, 1.0]))
    assert torch.equal(min_snr_weights(abar, 0.0), torch.ones(4))


def test_multiscale_error_scores_white_noise_one_per_scale():
    assert multiscale_error(torch.ones(1, 1, 8, 8)).item() == pytest.approx((64 + 16 + 4 + 1) / 4)
    noise = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert multiscale_error(noise).mean().item() == pytest.approx(1.0, rel=0.1)


# ---- training -------------------------------------------------------------------------------


def test_overfits_eight_images(trained: Path):
    log = read_log(trained)
    assert log["step"].tolist() == list(range(100))
    first, last = log["loss"][:10].mean(), log["loss"][-20:].mean()
    assert first / last >= 5, (first, last)
    assert log["mse"][:10].mean() / log["mse"][-20:].mean() >= 5
    assert (log["lr"][10:] == 3e-3).all() and log["lr"][0] == pytest.approx(3e-4)
    info = json.loads((trained / "t" / "ddpm" / "train_config.json").read_text())
    assert info["step"] == 100 and info["images_seen"] == 800
    assert (trained / "t" / "train_state" / "ddpm" / "samples" / "step_0000100.png").is_file()


def test_resume_is_bitwise_identical(tiny_data: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_run(tiny_data, a, max_steps=12)
    first = tiny_run(tiny_data, b, max_steps=6)
    assert first["step"] == 6
    again = tiny_run(tiny_data, b, max_steps=12, resume=True)
    assert again["steps_this_call"] == 6
    log_a, log_b = read_log(a), read_log(b)
    assert log_b["step"].tolist() == list(range(12))
    for col in ("loss", "mse", "grad_norm", "lr"):
        assert np.array_equal(log_a[col].to_numpy(), log_b[col].to_numpy()), col
    for f in ("model", "ema", "optimizer"):
        ta = load_file(a / "t" / "train_state" / "ddpm" / "checkpoint" / f"{f}.safetensors")
        tb = load_file(b / "t" / "train_state" / "ddpm" / "checkpoint" / f"{f}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    state = json.loads((b / "t" / "train_state" / "ddpm" / "checkpoint" / "state.json").read_text())
    assert [s["mode"] for s in state["sittings"]] == ["new", "resume"]


def test_max_minutes_ends_with_a_clean_checkpoint(tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    import gradcheck.train_ddpm as module

    clock = iter(range(10**6))  # a fake clock: every reading is one second later
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    s = tiny_run(tiny_data, tmp_path, max_minutes=0.25, max_steps=1000)
    assert 0 < s["step"] < 20
    state = json.loads((tmp_path / "t" / "train_state" / "ddpm" / "checkpoint" / "state.json")
                       .read_text())
    assert state["step"] == s["step"] == len(read_log(tmp_path))
    assert (tmp_path / "t" / "ddpm" / "model_index.json").is_file()


def test_export_loads_in_plain_diffusers_and_holds_the_ema(trained: Path):
    folder = trained / "t" / "ddpm"
    pipe = DDPMPipeline.from_pretrained(folder, use_safetensors=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    # fp16 export of the EMA weights of the train state (not of the raw model).
    ema = load_file(trained / "t" / "train_state" / "ddpm" / "checkpoint" / "ema.safetensors")
    raw = load_file(trained / "t" / "train_state" / "ddpm" / "checkpoint" / "model.safetensors")
    unet, _ = load_ddpm(folder)
    exported = unet.state_dict()
    assert all(torch.equal(exported[k], ema[k].half().float()) for k in ema)
    assert any(not torch.equal(exported[k], raw[k].half().float()) for k in raw)


def test_fp16_sharded_export_round_trip(tmp_path: Path):
    unet = make_unet("tiny")
    export_ddpm(unet, tmp_path / "tiny", fp16=True, max_shard_size=40_000)
    shards = sorted((tmp_path / "tiny" / "unet").glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "tiny" / "unet").glob("*.index.json")
    for shard in shards:
        tensors = load_file(shard)
        assert all(t.dtype == torch.float16 for t in tensors.values())
        assert sum(t.numel() * 2 for t in tensors.values()) <= 40_000
    loaded = DDPMPipeline.from_pretrained(tmp_path / "tiny", use_safetensors=True).unet
    want = unet.state_dict()
    assert all(torch.equal(v.float(), want[k].half().float())
               for k, v in loaded.state_dict().items())


def test_paper_export_shards_stay_below_16_mib(tmp_path: Path):
    export_ddpm(make_unet("paper"), tmp_path / "paper", fp16=True)
    files = [p for p in (tmp_path / "paper").rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 16 * MiB
    assert len([p for p in files if p.suffix == ".safetensors"]) >= 3
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    unet, _ = load_ddpm(tmp_path / "paper")
    assert sum(p.numel() for p in unet.parameters()) == 22_411_843


def test_init_from_starts_model_and_ema_from_the_export(trained: Path, tiny_data: Path):
    src = trained / "t" / "ddpm"
    # A vanishing learning rate: whatever the EMA decay, the new export must equal the source.
    s = tiny_run(tiny_data, trained, name="init", init_from=str(src), max_steps=103, lr=1e-20,
                 fp16_export=True)
    assert s["steps_this_call"] == 3 and s["step"] == 103
    log = read_log(trained, "init")
    assert log["step"].tolist() == list(range(103))
    assert log["lr"].iloc[100] / 1e-20 == pytest.approx(0.1)  # the warm-up starts again
    new = load_ddpm(trained / "init" / "ddpm")[0].state_dict()
    old = load_ddpm(src)[0].state_dict()
    assert all(torch.equal(new[k], old[k]) for k in old)
    info = json.loads((trained / "init" / "ddpm" / "train_config.json").read_text())
    assert [x["mode"] for x in info["sittings"]] == ["new", "init_from"]


# ---- errors ---------------------------------------------------------------------------------


def test_bad_inputs_give_one_line_errors(tiny_data: Path, trained: Path, tmp_path: Path):
    cases = [
        (dict(data_root=str(tmp_path / "nope"), max_steps=1), "not found"),
        (dict(preset="paper", max_steps=1), "expects 64x64"),
        (dict(), "--max-minutes"),
        (dict(max_steps=1, preset="huge"), "unknown UNet preset"),
        (dict(max_steps=1, resume=True, name="missing"), "nothing to resume"),
        (dict(max_steps=1, resume=True, init_from="x"), "only one"),
        (dict(max_steps=1, init_from=str(tmp_path)), "not a DDPM pipeline folder"),
        (dict(max_steps=1, batch_size=0), "batch_size must be > 0"),
        (dict(max_steps=1, mixed_precision="fp8"), "unknown mixed_precision"),
        (dict(max_steps=1, lr=float("nan")), "lr must be > 0, got nan"),
        (dict(max_steps=1, seed=-1), "seed must be an integer in 0..4294967295, got -1"),
        (dict(max_steps=1, name="../escape"), "name '../escape' must be a plain folder name"),
        (dict(max_steps=1, name=""), "must be a plain folder name"),
    ]
    for kw, msg in cases:
        with pytest.raises(GradcheckError, match=msg) as e:
            tiny_run(tiny_data, tmp_path / "out", **kw)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(GradcheckError, match="already exists; pass --resume"):
        tiny_run(tiny_data, trained, max_steps=1)
    with pytest.raises(GradcheckError, match="is at step 100, already at --max-steps 50"):
        tiny_run(tiny_data, trained, max_steps=50, resume=True)


def test_pickled_or_corrupted_checkpoints_are_refused(tiny_data: Path, tmp_path: Path):
    tiny_run(tiny_data, tmp_path, max_steps=2)
    ckpt = tmp_path / "t" / "train_state" / "ddpm" / "checkpoint"
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GradcheckError, match="cannot read .*model.safetensors"):
        tiny_run(tiny_data, tmp_path, max_steps=4, resume=True)
    (ckpt / "extra.pt").write_bytes(b"")
    with pytest.raises(GradcheckError, match="refusing pickle"):
        tiny_run(tiny_data, tmp_path, max_steps=4, resume=True)
    export = tmp_path / "t" / "ddpm"
    (export / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(GradcheckError, match="refusing pickle"):
        tiny_run(tiny_data, tmp_path, name="u", max_steps=4, init_from=str(export))


def test_init_from_a_different_preset_is_refused(trained: Path, tiny_data: Path):
    with pytest.raises(GradcheckError, match="has sample_size=32 but preset 'paper' has 64"):
        tiny_run(tiny_data, trained, name="p", preset="paper", max_steps=1,
                 init_from=str(trained / "t" / "ddpm"))


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as e:
        main(["train-ddpm", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path),
              "--max-steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data set") and "\n" not in err


def test_data_root_follows_gradcheck_data(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GRADCHECK_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit) as e:
        main(["train-ddpm", "--out", str(tmp_path), "--max-steps", "1"])
    assert e.value.code == 2
    assert str(tmp_path / "elsewhere") in capsys.readouterr().err


@pytest.mark.parametrize(("command", "cls"), [("train-ddpm", TrainDDPMConfig),
                                              ("eval-ddpm", EvalDDPMConfig)])
def test_cli_options_match_config_fields(command: str, cls: type):
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    defaults = {p.name: p.default for p in cmd.params}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert defaults.keys() == fields.keys()
    for name, f in fields.items():
        if f.default is dataclasses.MISSING:  # a computed default; the CLI's None means it
            assert defaults[name] in (None, f.default_factory()), name
        else:
            assert defaults[name] == f.default, name


# ---- evaluation -----------------------------------------------------------------------------


def test_border_means():
    images = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    images[1, :, 0, :] = 0  # one of the four 8-pixel sides of a 28-pixel ring is black
    torch.testing.assert_close(border_means(images), torch.tensor([1.0, 20 / 28]))


class Echo(torch.nn.Module):
    """A stand-in UNet whose epsilon is ``gain * x_t + shift``."""

    def __init__(self, gain: float, shift: float = 0.0) -> None:
        super().__init__()
        self.gain, self.shift = gain, shift
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(sample_size=8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.gain * x + self.shift)


def test_mean_colour_slope():
    sched = make_scheduler()
    assert mean_colour_slope(Echo(1.0), sched) == pytest.approx(1.0)
    assert mean_colour_slope(Echo(0.5, shift=0.3), sched) == pytest.approx(0.5)
    assert mean_colour_slope(Echo(0.0, shift=0.3), sched) == pytest.approx(0.0)


def test_samples_do_not_depend_on_batch_size(trained: Path):
    """In float32; bf16 kernels may round differently per batch shape (eval.json records it)."""
    unet, scheduler = load_ddpm(trained / "t" / "ddpm")
    a = sample_images(unet, scheduler, 5, steps=3, seed=1, batch_size=5, mixed_precision="no")
    b = sample_images(unet, scheduler, 5, steps=3, seed=1, batch_size=2, mixed_precision="no")
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1
    assert not torch.equal(a[0], a[1])


def test_eval_ddpm_writes_summary_rows_and_grid(trained: Path, tiny_data: Path, tmp_path: Path):
    judge_dir = tmp_path / "judge"
    torch.manual_seed(0)
    judge = make_classifier("shufflenet_v2_x1_0")
    save_classifier(judge, judge_dir, {"arch": "shufflenet_v2_x1_0", "kind": "judge"})
    s = evaluate_ddpm(folder=str(trained / "t" / "ddpm"), num_samples=6, steps=2, batch_size=4,
                      judge=str(judge_dir), data_root=str(tiny_data), device="cpu",
                      out=str(tmp_path / "eval"), progress=False)
    rows = pd.read_parquet(tmp_path / "eval" / "eval.parquet")
    assert len(rows) == 6 and rows["sample"].tolist() == list(range(6))
    assert s["white_border_share"] == rows["white_border"].mean()
    assert np.isfinite(s["mean_colour_slope"])
    assert (rows["white_border"] == (rows["border_mean"] >= 0.95)).all()
    assert set(rows["class_name"]) <= set(CLASS_NAMES)
    assert sum(s["class_share"].values()) == pytest.approx(1.0)
    assert s["confident_share"] == (rows["max_prob"] >= 0.9).mean()
    # Every share has its exact interval, inside [0, 1] and around the share.
    for key in ("white_border_share", "confident_share"):
        low, high = s[f"{key}_ci"]
        assert 0 <= low <= s[key] <= high <= 1 and high - low > 0.2
    for c in CLASS_NAMES:
        low, high = s["class_share_ci"][c]
        assert 0 <= low <= s["class_share"][c] <= high <= 1
    assert s["sampling_autocast"] in ("bf16", "float32")
    assert np.isfinite(s["fid"]) and s["n_reference"] == 32
    assert s["extractor"] == "sportballs-judge-shufflenet"
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["config"]["num_samples"] == 6 and saved["fid"] == s["fid"]
    assert (tmp_path / "eval" / "samples.png").is_file()
    with pytest.raises(GradcheckError, match="already exists"):
        evaluate_ddpm(folder=str(trained / "t" / "ddpm"), num_samples=1, steps=1,
                      out=str(tmp_path / "eval"), device="cpu", progress=False)


def test_eval_ddpm_without_judge_says_why_fid_is_missing(trained: Path, tmp_path: Path):
    s = evaluate_ddpm(folder=str(trained / "t" / "ddpm"), num_samples=2, steps=1, device="cpu",
                      out=str(tmp_path / "e"), progress=False)
    assert "class_share" not in s and "fid" not in s and "judge" in s["fid_skipped"]
    with pytest.raises(GradcheckError, match="steps must lie in 1..1000"):
        evaluate_ddpm(folder=str(trained / "t" / "ddpm"), steps=0, device="cpu")


def test_auto_precision_on_a_cpu_is_measured_printed_and_recorded(tiny_data: Path,
                                                                   tmp_path: Path, capsys):
    """--mixed-precision auto times bf16 against float32 on this CPU, says which it took and
    why, and records it in train_config.json; a resume keeps that arithmetic."""
    from gradcheck.train_ddpm import CPU_BF16_MIN_SPEEDUP

    tiny_run(tiny_data, tmp_path, max_steps=2, mixed_precision="auto")
    said = capsys.readouterr().out
    assert "train-ddpm on the CPU:" in said and "images/s" in said
    cfg = json.loads((tmp_path / "t" / "ddpm" / "train_config.json").read_text())
    choice = cfg["sittings"][0]["precision"]
    rates = choice["cpu_images_per_s"]
    want = "bf16" if rates["bf16"] >= CPU_BF16_MIN_SPEEDUP * rates["float32"] else "float32"
    assert choice["autocast"] == want and choice["autocast"] in said
    tiny_run(tiny_data, tmp_path, max_steps=3, mixed_precision="auto", resume=True)
    assert "train-ddpm on the CPU:" not in capsys.readouterr().out
    cfg = json.loads((tmp_path / "t" / "ddpm" / "train_config.json").read_text())
    assert cfg["sittings"][1]["precision"] == choice


def test_forced_precision_is_recorded(tiny_data: Path, tmp_path: Path):
    tiny_run(tiny_data, tmp_path, max_steps=1, mixed_precision="bf16")
    cfg = json.loads((tmp_path / "t" / "ddpm" / "train_config.json").read_text())
    assert cfg["sittings"][0]["precision"]["autocast"] == "bf16"
