"""`gradcheck bench --quick`: every section runs on a CPU and reports sane numbers (no timing
thresholds: speed targets live in the bench itself, not in tests)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gradcheck.bench import (
    RECORDER_MODES,
    SAMPLING_MODES,
    UNET_LAYOUTS,
    UNET_PASSES,
    device_peak_tflops,
)
from gradcheck.cli import main
from gradcheck.utils import load_json


def test_quick_bench_reports_every_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", "--repeats", "1", "--json", str(out)])
    assert e.value.code == 0
    captured = capsys.readouterr()
    assert "no GPU: the quick bench" in captured.err  # the default without a GPU
    text = captured.out
    assert "diffusers DDPMPipeline, batch 4" in text and "identical samples: True" in text
    r = load_json(out)
    assert r["quick"] and r["precision"] == "fp32" and r["peak_tflops"] is None
    assert r["dataset"]["images_per_s"] > 0 and r["training"]["eager_images_per_s"] > 0
    rows = r["sampling"]
    assert len(rows) == 2 * len(SAMPLING_MODES) * len(RECORDER_MODES)
    assert {(x["mode"], x["recorder"]) for x in rows} == {
        (m, rec) for m in SAMPLING_MODES for rec in RECORDER_MODES}
    for x in rows:
        assert x["steps_per_s"] > 0 and x["tflops"] > 0 and math.isfinite(x["recorder_overhead"])
    # the x0-estimate differentiates through the UNet: more FLOPs per step than unguided
    flops = {x["mode"]: x["tflops"] / x["steps_per_s"] for x in rows
             if x["batch"] == 4 and x["recorder"] == "off"}
    assert flops["guided-x0"] > 2 * flops["unguided"]
    assert all(p["gradcheck_unguided_ratio"] > 0 for p in r["pipeline"])
    # the UNet alone: on a CPU fp32 only, no autotuning; both layouts and passes per batch
    assert len(r["unet"]) == 2 * len(UNET_LAYOUTS) * len(UNET_PASSES)
    assert {x["precision"] for x in r["unet"]} == {"fp32"}
    assert all(x["images_per_s"] > 0 and not x["cudnn_benchmark"] for x in r["unet"])
    assert r["fid"]["seconds"] > 0
    mini = r["table1_mini"]
    assert mini["configurations"] == 8 and mini["identical_samples"] is True


def test_bench_runs_only_the_sections_asked_and_reports_each_measurement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--sections",
              "sampling,unet", "--batches", "2", "--steps", "2", "--recorders", "subset,subset",
              "--json", str(out)])
    assert e.value.code == 0
    err = capsys.readouterr().err
    r = load_json(out)
    assert r["sections"] == ["unet", "sampling"]  # in the bench's own order
    assert not {"dataset", "training", "pipeline", "fid", "table1_mini"} & set(r)
    assert r["sizes"]["batches"] == [2] and r["sizes"]["sampling_steps"] == 2
    # "off" is always measured: the overhead's baseline
    assert [(x["mode"], x["recorder"]) for x in r["sampling"]] == [
        (m, rec) for m in SAMPLING_MODES for rec in ("off", "subset")]
    # each measurement is printed as soon as it is taken
    assert err.count("... UNet forward") == len(r["unet"])
    assert err.count("  guided-x0  ") == 2 and err.count("steps/s") == 1  # header first
    # FLOPs are counted per pass: the backward to the input costs about another forward (torch
    # 2.14 counts 2.0x on the tiny UNet; earlier versions counted its attention backward higher)
    per_call = {(x["layout"], x["pass"]): x["tflops"] * x["ms"] for x in r["unet"]}
    for layout in UNET_LAYOUTS:
        assert 1.9 < per_call[(layout, "forward+grad")] / per_call[(layout, "forward")] < 3


def test_bench_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    for args, msg in ((["--precision", "fp8"], "unknown precision 'fp8'"),
                      (["--precision", "tf32"], "precision tf32 needs a CUDA device"),
                      (["--repeats", "0"], "repeats must be >= 1, got 0"),
                      (["--sections", "unet,warp"], "unknown bench section 'warp'"),
                      (["--sections", ","], "nothing to measure"),
                      (["--batches", "0,8"], "batches must be distinct positive integers, got "
                                             "[0, 8]"),
                      (["--batches", "8,8"], "got [8, 8]"),
                      (["--batches", "a"], "--batches 'a' is not a comma-separated list"),
                      (["--steps", "0"], "steps must be >= 1, got 0"),
                      (["--recorders", "some"], "unknown recorder setting 'some'"),
                      (["--json", str(tmp_path)], "is a folder; give a file path"),
                      (["--json", str(existing)], "already exists; pass --overwrite")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--quick", "--device", "cpu", *args])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    assert existing.read_text() == "{}"


def test_peak_table_is_cpu_free():
    import torch

    assert device_peak_tflops(torch.device("cpu")) is None


def test_table1_cpu_is_opt_in_and_names_its_data_set(tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]):
    """table1-cpu takes minutes: never in the default bench, and without the 32x32 data set it
    stops at once with the command that makes it."""
    from gradcheck.bench import DEFAULT_SECTIONS, SECTIONS

    assert "table1-cpu" in SECTIONS and "table1-cpu" not in DEFAULT_SECTIONS
    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", "sportballs32-v1")
    monkeypatch.setenv("GRADCHECK_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", "--sections", "table1-cpu"])
    assert e.value.code == 2
    assert "gradcheck make-dataset --image-size 32" in capsys.readouterr().err
