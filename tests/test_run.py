"""`gradcheck run`: the run folder (docs/formats.md), reproducibility, errors, the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image
from safetensors.torch import load_file

import gradcheck.numerics
import gradcheck.paths
import gradcheck.runner
from gradcheck import columns as col
from gradcheck.cli import main
from gradcheck.config import RunConfig
from gradcheck.guidance import cosine
from gradcheck.models import (
    classifier_config,
    make_classifier,
    make_scheduler,
    make_unet,
    save_classifier,
)
from gradcheck.recorder import expected_vector_bytes, read_steps_config
from gradcheck.runner import default_run_id, parse_target, resolve_config, run, summary_table
from gradcheck.utils import GradcheckError, load_json


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny DDPM pipeline folder, a random MobileNet guiding classifier and a random judge."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    DDPMPipeline(make_unet("tiny"), make_scheduler()).save_pretrained(root / "ddpm")
    save_classifier(make_classifier(), root / "clf",
                    classifier_config("nonrobust", "mobilenet_v3_small"))
    save_classifier(make_classifier("shufflenet_v2_x1_0"), root / "judge",
                    classifier_config("judge", "shufflenet_v2_x1_0"))
    return root


def tiny_cfg(ckpt: Path, data: Path | str = "nowhere", **kw) -> RunConfig:
    base = dict(classifier=str(ckpt / "clf"), ddpm=str(ckpt / "ddpm"), judge=str(ckpt / "judge"),
                data_root=str(data), num_samples=3, batch_size=2, steps=5, device="cpu",
                metrics=False, cos_oracle=False, record_vectors="none")
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(ckpt: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One run with everything recorded: x0-estimate + adam, cos_oracle on, vectors 'all'."""
    cfg = tiny_cfg(ckpt, tiny_data, x0_estimate=True, stabilizer="adam", cos_oracle=True,
                   record_vectors="all", target=2)
    out = tmp_path_factory.mktemp("runs")
    return cfg, run(cfg, out=out, progress=False)


def test_run_folder_has_every_file_and_column(full_run):
    cfg, folder = full_run
    assert folder.name == default_run_id(cfg)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "metrics.json", "metrics.parquet", "samples.npy", "samples.png",
        "steps.parquet", "vectors.safetensors"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]

    config = load_json(folder / "config.json")
    assert config["run_id"] == folder.name and config["stabilizer"] == "adam"
    assert {"git_commit", "torch", "diffusers", "device", "hardware"} <= set(config["run_metadata"])

    samples = np.load(folder / "samples.npy")
    assert samples.dtype == np.uint8 and samples.shape == (3, 32, 32, 3)
    assert Image.open(folder / "samples.png").size == (3 * 34 + 2, 36)  # 8 per row, 2 px gaps

    table = pq.read_table(folder / "steps.parquet")
    assert tuple(table.column_names) == col.STEP_COLUMNS
    assert str(table.schema.field(col.SAMPLE).type) == "int32"
    assert str(table.schema.field(col.GRAD_VANISHED).type) == "bool"
    assert read_steps_config(folder / "steps.parquet")["run_id"] == folder.name
    df = table.to_pandas()
    assert len(df) == 3 * 5 and df[col.SAMPLE].tolist() == [s for s in range(3) for _ in range(5)]
    assert (df[col.TARGET] == 2).all() and (df[col.RUN_ID] == folder.name).all()
    first = df[col.STEP] == 0
    assert df.loc[first, [col.COS_PREV_RAW, col.COS_PREV_APPLIED]].isna().all().all()
    assert df.loc[~first, col.COS_PREV_APPLIED].notna().all()
    assert df[col.COS_ORACLE].notna().all()  # --cos-oracle on
    assert df[col.ABAR].is_monotonic_increasing is False  # per sample, t runs 999 -> 0
    assert df.groupby(col.SAMPLE)[col.T].apply(lambda t: t.is_monotonic_decreasing).all()
    # D5 per row: ||gtilde|| = ||score|| wherever the gradient did not vanish
    ok = ~df[col.GRAD_VANISHED]
    np.testing.assert_allclose(df.loc[ok, col.GRAD_NORM_APPLIED], df.loc[ok, col.SCORE_NORM],
                               rtol=1e-4)

    metrics = load_json(folder / "metrics.json")
    for key in ("run_id", "classifier", "x0_estimate", "stabilizer", "normalize", "scale",
                "target", "seed", "steps", "num_samples", "wall_time_s", "hardware"):
        assert metrics[key] == config.get(key, metrics[key])
    assert metrics["mean_cos_prev_applied"] == pytest.approx(df[col.COS_PREV_APPLIED].mean())
    row = pd.read_parquet(folder / "metrics.parquet")
    assert len(row) == 1 and row["run_id"][0] == folder.name
    assert "mean cos_prev applied" in summary_table(metrics)


def test_cos_prev_recomputed_from_vectors_equals_steps_parquet(full_run):
    _, folder = full_run
    vec = load_file(folder / "vectors.safetensors")
    df = pd.read_parquet(folder / "steps.parquet").set_index([col.SAMPLE, col.STEP])
    assert vec[col.VEC_GRAD_RAW].shape == (3, 5, 3, 32, 32)
    assert vec[col.VEC_GRAD_APPLIED].dtype == torch.float32
    assert vec[col.VEC_STEP].tolist() == list(range(5))
    for i, s in enumerate(vec[col.VEC_SAMPLE].tolist()):
        for k in range(1, 5):
            for key, column in ((col.VEC_GRAD_RAW, col.COS_PREV_RAW),
                                (col.VEC_GRAD_APPLIED, col.COS_PREV_APPLIED)):
                v = vec[key][i]
                assert cosine(v[k : k + 1], v[k - 1 : k]).item() == df.loc[(s, k), column]
        np.testing.assert_allclose(
            vec[col.VEC_GRAD_APPLIED][i].flatten(1).norm(dim=1).numpy(),
            df.loc[s, col.GRAD_NORM_APPLIED].to_numpy(), rtol=1e-6)


def test_same_seed_gives_identical_samples_and_steps(ckpt, full_run, tmp_path):
    cfg, folder = full_run
    again = run(cfg, out=tmp_path, progress=False)
    assert again.name == folder.name
    assert (again / "samples.npy").read_bytes() == (folder / "samples.npy").read_bytes()
    assert (again / "steps.parquet").read_bytes() == (folder / "steps.parquet").read_bytes()
    other = run(dataclasses.replace(cfg, seed=1), out=tmp_path, progress=False)
    assert other.name != folder.name
    assert not np.array_equal(np.load(other / "samples.npy"), np.load(folder / "samples.npy"))


def test_scale_zero_runs_are_the_same_unguided_samples(ckpt, tmp_path):
    # float32 throughout: the CPU's auto runs x_t configurations' UNet in bf16 and x0-estimate
    # ones in float32, so their unguided chains differ there by bf16 rounding.
    a = run(tiny_cfg(ckpt, scale=0.0, x0_estimate=True, stabilizer="adam", precision="fp32"),
            out=tmp_path, progress=False)
    b = run(tiny_cfg(ckpt, scale=0.0, stabilizer="ema", normalize=False, precision="fp32"),
            out=tmp_path, progress=False)
    c = run(tiny_cfg(ckpt, scale=1.0, precision="fp32"), out=tmp_path, progress=False)
    assert np.array_equal(np.load(a / "samples.npy"), np.load(b / "samples.npy"))
    assert not np.array_equal(np.load(a / "samples.npy"), np.load(c / "samples.npy"))


def test_subset_vectors_are_8_samples_every_10th_step(ckpt, tmp_path):
    cfg = tiny_cfg(ckpt, num_samples=9, batch_size=4, steps=12, record_vectors="subset")
    folder = run(cfg, out=tmp_path, progress=False)
    vec = load_file(folder / "vectors.safetensors")
    assert vec[col.VEC_SAMPLE].tolist() == list(range(8))
    assert vec[col.VEC_STEP].tolist() == [0, 10, 11]  # every 10th step, and the last one
    assert vec[col.VEC_X0_HAT].shape == (8, 3, 3, 32, 32)
    assert vec[col.VEC_X0_HAT].dtype == torch.float16
    # g_t stays float64 (a confident classifier's is below float32's range); gtilde_t has the
    # score's norm.
    assert vec[col.VEC_GRAD_RAW].dtype == torch.float64
    assert vec[col.VEC_GRAD_APPLIED].dtype == torch.float32
    df = pd.read_parquet(folder / "steps.parquet").set_index([col.SAMPLE, col.STEP])
    for i, s in enumerate(vec[col.VEC_SAMPLE].tolist()):
        np.testing.assert_allclose(
            vec[col.VEC_GRAD_RAW][i].flatten(1).norm(dim=1).numpy(),
            df.loc[s, col.GRAD_NORM_RAW].to_numpy()[[0, 10, 11]], rtol=1e-6)
    ts = pd.read_parquet(folder / "steps.parquet").query("sample == 0")[col.T].to_numpy()
    assert vec[col.VEC_T].tolist() == ts[[0, 10, 11]].tolist()
    data_bytes = sum(vec[k].numel() * vec[k].element_size()
                     for k in (col.VEC_GRAD_RAW, col.VEC_GRAD_APPLIED, col.VEC_X0_HAT))
    assert data_bytes == expected_vector_bytes("subset", 9, 12, (3, 32, 32))


def test_cos_oracle_on_a_cpu_defaults_to_the_vector_subset(ckpt, tiny_data, tmp_path, full_run):
    """cos_oracle=None on a CPU: the first 8 samples at every 10th step and the last, with the
    values an every-step run gives there (the recorder never changes a sample)."""
    cfg, _ = full_run
    # batches of 3: samples 6, 7 and 8 share one, of which only 6 and 7 are in the subset
    sub_cfg = dataclasses.replace(cfg, cos_oracle=None, num_samples=10, steps=12, batch_size=3)
    folder = run(sub_cfg, out=tmp_path, progress=False)
    df = pd.read_parquet(folder / "steps.parquet")
    want = (df[col.SAMPLE] < 8) & df[col.STEP].isin([0, 10, 11])
    assert df[col.COS_ORACLE].notna().tolist() == want.tolist()
    metrics = load_json(folder / "metrics.json")
    assert metrics["n_cos_oracle"] == 8 * 3
    assert metrics["mean_cos_oracle"] == pytest.approx(df[col.COS_ORACLE].mean())
    assert "over 24 (sample, step) pairs" in summary_table(metrics)
    every = pd.read_parquet(run(dataclasses.replace(sub_cfg, cos_oracle=True), out=tmp_path,
                                progress=False) / "steps.parquet")
    assert every[col.COS_ORACLE].notna().all()
    # fewer rows through the oracle's float64 matmuls may round differently
    np.testing.assert_allclose(df.loc[want, col.COS_ORACLE], every.loc[want, col.COS_ORACLE],
                               rtol=1e-9, atol=1e-12)


def test_oracle_guidance_and_cos_oracle(ckpt, tiny_data, tmp_path):
    folder = run(tiny_cfg(ckpt, tiny_data, classifier="oracle", cos_oracle=True, num_samples=2,
                          steps=3), out=tmp_path, progress=False)
    df = pd.read_parquet(folder / "steps.parquet")
    assert folder.name.startswith("oracle-xt-none-s1-t0-n2-k3-seed0-")
    # Guided by the oracle itself, without a stabiliser: the applied vector is the oracle's.
    ok = ~df[col.GRAD_VANISHED]
    np.testing.assert_allclose(df.loc[ok, col.COS_ORACLE], 1.0, atol=1e-5)
    with pytest.raises(GradcheckError, match="x0-estimate"):
        run(tiny_cfg(ckpt, tiny_data, classifier="oracle", x0_estimate=True), out=tmp_path)


def test_default_run_id_is_readable_and_deterministic(ckpt):
    cfg = tiny_cfg(ckpt, x0_estimate=True, stabilizer="adam", scale=2.5, target=1)
    rid = default_run_id(cfg)
    assert re.fullmatch(r"clf-x0-adam-s2\.5-t1-n3-k5-seed0-[0-9a-f]{8}", rid)
    assert default_run_id(dataclasses.replace(cfg)) == rid
    assert default_run_id(dataclasses.replace(cfg, normalize=False)).startswith(
        "clf-x0-adam-nonorm-")
    # Results do not depend on the batch size, so neither do run ids; they do on the seed and
    # on the network's row count (another GEMM shape may round differently).
    assert default_run_id(dataclasses.replace(cfg, batch_size=1)) == rid
    assert default_run_id(dataclasses.replace(cfg, net_batch=2)) != rid
    assert default_run_id(dataclasses.replace(cfg, seed=1)) != rid
    assert default_run_id(dataclasses.replace(cfg, normalize_to="eps")).startswith(
        "clf-x0-adam-normeps-")
    assert default_run_id(dataclasses.replace(cfg, diffusion_time=False)).startswith(
        "clf-x0-adam-steptime-")
    # Settings that cannot change results leave ids alone: D4' at T steps or without memory.
    full = dataclasses.replace(cfg, steps=1000)
    assert default_run_id(dataclasses.replace(full, diffusion_time=False)).split("-")[-1] == \
        default_run_id(full).split("-")[-1]
    assert default_run_id(RunConfig(device="cpu")).startswith("nonrobust-xt-none-s1-t0-n8-k1000-")


def test_protocol_resolution():
    assert (resolve_config(RunConfig(device="cpu")).num_samples,
            resolve_config(RunConfig(device="cpu")).steps) == (8, 1000)  # no GPU: 8 samples
    paper = resolve_config(RunConfig(device="cpu", protocol="paper", steps=10))
    assert (paper.num_samples, paper.steps) == (64, 1000)
    reduced = resolve_config(RunConfig(device="cpu", protocol="reduced", num_samples=100))
    assert (reduced.num_samples, reduced.steps) == (8, 50)
    mine = resolve_config(RunConfig(device="cpu", num_samples=16, steps=1000))
    assert (mine.num_samples, mine.steps) == (16, 1000)


def test_precision_and_net_batch_resolution():
    cpu = resolve_config(RunConfig(device="cpu"))
    assert (cpu.precision, cpu.num_samples, cpu.net_batch) == ("auto", 8, 8)
    many = resolve_config(RunConfig(device="cpu", num_samples=200))
    assert many.net_batch == 64  # pieces of 64 rows, never more rows than samples
    mine = resolve_config(RunConfig(device="cpu", precision="bf16", net_batch=3))
    assert (mine.precision, mine.net_batch) == ("bf16", 3)


def test_batch_size_does_not_change_run_files(ckpt, tmp_path):
    cfg = tiny_cfg(ckpt, x0_estimate=True, stabilizer="adam", num_samples=4,
                   record_vectors="all")
    a = run(dataclasses.replace(cfg, batch_size=1), out=tmp_path, name="b1", progress=False)
    b = run(dataclasses.replace(cfg, batch_size=4), out=tmp_path, name="b4", progress=False)
    assert np.array_equal(np.load(a / "samples.npy"), np.load(b / "samples.npy"))
    steps_a, steps_b = (pd.read_parquet(f / "steps.parquet") for f in (a, b))
    pd.testing.assert_frame_equal(steps_a.drop(columns="run_id"), steps_b.drop(columns="run_id"))
    va, vb = load_file(a / "vectors.safetensors"), load_file(b / "vectors.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_auto_precision_on_a_cpu(ckpt, tmp_path, monkeypatch):
    """On a CPU with native bf16, --precision auto (the CPU default) gives fp32's files for an
    x0-estimate run (every call through the UNet in float32) and bf16-UNet samples, within
    rounding of float32's, for an x_t-guided run."""
    monkeypatch.setattr(gradcheck.numerics, "cpu_has_native_bf16", lambda: True)
    for x0, same in ((True, True), (False, False)):
        cfg = tiny_cfg(ckpt, x0_estimate=x0, stabilizer="adam")
        a = run(dataclasses.replace(cfg, precision="fp32"), out=tmp_path, name=f"fp32-{x0}",
                progress=False)
        b = run(cfg, out=tmp_path, name=f"auto-{x0}", progress=False)
        assert load_json(b / "config.json")["precision"] == "auto"
        sa, sb = np.load(a / "samples.npy"), np.load(b / "samples.npy")
        assert np.array_equal(sa, sb) == same
        assert np.abs(sa.astype(int) - sb.astype(int)).mean() < 2  # uint8 levels
        if same:
            steps_a, steps_b = (pd.read_parquet(f / "steps.parquet") for f in (a, b))
            pd.testing.assert_frame_equal(steps_a.drop(columns="run_id"),
                                          steps_b.drop(columns="run_id"))


def test_run_many_writes_what_separate_runs_write(ckpt, tmp_path):
    """The sweep's batched configurations: one sampling call, the same run folders."""
    cfgs = [tiny_cfg(ckpt, record_vectors="all"),
            tiny_cfg(ckpt, x0_estimate=True, stabilizer="adam", target=3, record_vectors="all"),
            tiny_cfg(ckpt, scale=0.0, normalize=False, record_vectors="subset")]
    together = gradcheck.runner.run_many(cfgs, out=tmp_path / "together", progress=False)
    alone = [run(c, out=tmp_path / "alone", progress=False) for c in cfgs]
    for t, a in zip(together, alone, strict=True):
        assert t.name == a.name
        assert np.array_equal(np.load(t / "samples.npy"), np.load(a / "samples.npy"))
        pd.testing.assert_frame_equal(pd.read_parquet(t / "steps.parquet"),
                                      pd.read_parquet(a / "steps.parquet"))
        vt, va = load_file(t / "vectors.safetensors"), load_file(a / "vectors.safetensors")
        assert vt.keys() == va.keys() and all(torch.equal(vt[k], va[k]) for k in vt)
        mt, ma = load_json(t / "metrics.json"), load_json(a / "metrics.json")
        assert (mt["batched_runs"], ma["batched_runs"]) == (3, 1)
        assert mt["wall_time_s"] == pytest.approx(mt["batched_wall_time_s"] / 3)
        timing = ("wall_time_s", "batched_runs", "batched_wall_time_s")
        assert {k: v for k, v in mt.items() if k not in timing} == \
            {k: v for k, v in ma.items() if k not in timing}


def test_run_many_needs_shared_settings_and_leaves_nothing(ckpt, tmp_path):
    cfgs = [tiny_cfg(ckpt), tiny_cfg(ckpt, seed=1, x0_estimate=True)]
    with pytest.raises(GradcheckError, match="runs sampled together must share seed"):
        gradcheck.runner.run_many(cfgs, out=tmp_path, progress=False)
    with pytest.raises(GradcheckError, match="distinct run folder names"):
        gradcheck.runner.run_many([tiny_cfg(ckpt), tiny_cfg(ckpt)], out=tmp_path,
                                  progress=False)
    assert _no_run_folder(tmp_path)


def test_parse_target():
    assert [parse_target(v) for v in ("baseball", "Soccer", "3", 1)] == [0, 2, 3, 1]
    with pytest.raises(GradcheckError, match="unknown target 'tennis'; choose one of: baseball"):
        parse_target("tennis")
    with pytest.raises(GradcheckError, match="unknown target '4'"):
        parse_target("4")


def test_config_takes_class_names(ckpt):
    """The Python API takes names as the CLI does; the run id does not depend on the spelling."""
    named, indexed = tiny_cfg(ckpt, target="Soccer"), tiny_cfg(ckpt, target=2)
    assert resolve_config(named).target == 2
    assert default_run_id(named) == default_run_id(indexed)
    with pytest.raises(GradcheckError, match="unknown target 'tennis'"):
        resolve_config(tiny_cfg(ckpt, target="tennis"))


def _no_run_folder(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(classifier="resnet"),
         "unknown classifier 'resnet'; choose one of: nonrobust, robust, adversarial, oracle"),
        (dict(stabilizer="lion"), "unknown stabilizer 'lion'; choose one of: none, adam, ema"),
        (dict(target=7), r"unknown target 7; choose 0-3"),
        (dict(steps=1001), r"steps must be an integer in 1\.\.1000 \(T\), got 1001"),
        (dict(scale=-1.0), r"scale must be a finite number >= 0, got -1\.0"),
        (dict(num_samples=0), "num_samples must be an integer >= 1, got 0"),
        (dict(record_vectors="some"), "unknown record_vectors 'some'"),
        (dict(protocol="quick"), "unknown protocol 'quick'"),
        (dict(precision="fp8"),
         "unknown precision 'fp8'; choose one of: fp32, tf32, bf16, fp16, auto"),
        (dict(precision="tf32"),
         "precision tf32 needs a CUDA device; use fp32, bf16, fp16 or auto"),
        (dict(net_batch=0), "net_batch must be an integer >= 1, got 0"),
        (dict(ddpm="no/such/ddpm"), "no/such/ddpm is not a DDPM pipeline folder"),
        (dict(metrics=True), "judge checkpoint not found in .*missing-judge.*--no-metrics"),
    ],
)
def test_bad_input_gives_clear_error_and_no_folder(ckpt, tmp_path, kwargs, message):
    if kwargs.get("metrics"):
        kwargs = {**kwargs, "judge": str(tmp_path / "missing-judge")}
    out = tmp_path / "runs"
    with pytest.raises(GradcheckError, match=message):
        run(tiny_cfg(ckpt, **kwargs), out=out, progress=False)
    assert _no_run_folder(out)


def test_the_judge_never_guides(ckpt, tmp_path):
    """docs/metrics.md: the judge is independent of the guiding classifier."""
    out = tmp_path / "runs"
    judge = str(ckpt / "judge")
    with pytest.raises(GradcheckError, match=r"is a judge \(kind 'judge'\), which grades "):
        run(tiny_cfg(ckpt, classifier=judge, metrics=False), out=out, progress=False)
    clf = str(ckpt / "clf")
    with pytest.raises(GradcheckError, match="is also the run's judge"):
        run(tiny_cfg(ckpt, classifier=clf, judge=clf), out=out, progress=False)
    assert _no_run_folder(out)


def test_a_classifier_of_another_image_size_is_refused(ckpt, tmp_path):
    clf = tmp_path / "clf64"
    save_classifier(make_classifier(), clf,
                    classifier_config("nonrobust", "mobilenet_v3_small", image_size=64))
    assert "3x64x64" in json.loads((clf / "config.json").read_text())["input"]
    with pytest.raises(GradcheckError, match=f"classifier {clf} was trained on 64x64 images but "
                                             "the DDPM makes 32x32"):
        run(tiny_cfg(ckpt, classifier=str(clf)), out=tmp_path / "runs", progress=False)
    assert _no_run_folder(tmp_path / "runs")
    clf16 = tmp_path / "clf16"
    save_classifier(make_classifier(), clf16,
                    classifier_config("nonrobust", "mobilenet_v3_small", image_size=16))
    assert "3x16x16" in json.loads((clf16 / "config.json").read_text())["input"]


def test_a_judge_of_another_image_size_is_refused_before_sampling(ckpt, tiny_data, tmp_path):
    judge = tmp_path / "judge64"
    save_classifier(make_classifier("shufflenet_v2_x1_0"), judge,
                    classifier_config("judge", "shufflenet_v2_x1_0", image_size=64))
    steps = []
    with pytest.raises(GradcheckError, match="was trained on 64x64 images but the samples are "
                                             "32x32 .or pass --no-metrics"):
        run(tiny_cfg(ckpt, tiny_data, judge=str(judge), metrics=True), out=tmp_path / "runs",
            progress=False, observers=[steps.append])
    assert steps == [] and not (tmp_path / "runs").exists()


def test_run_ids_do_not_depend_on_where_gradcheck_data_puts_the_data(monkeypatch):
    monkeypatch.delenv("GRADCHECK_DATA", raising=False)
    here = default_run_id(RunConfig(device="cpu"))
    monkeypatch.setenv("GRADCHECK_DATA", "/mnt/elsewhere/sportballs")
    moved = RunConfig(device="cpu")
    assert moved.data_root == "/mnt/elsewhere/sportballs"
    assert default_run_id(moved) == here
    assert default_run_id(dataclasses.replace(moved, data_root="other")) != here


def test_missing_shipped_checkpoints_name_the_folder(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", str(tmp_path / "sportballs-v1"))
    out = tmp_path / "runs"
    cfg = RunConfig(device="cpu", metrics=False, num_samples=1, steps=2)
    with pytest.raises(GradcheckError, match=r"shipped reference DDPM is missing at .*"
                       r"sportballs-v1/ddpm.*gradcheck train-ddpm"):
        run(cfg, out=out, progress=False)
    with pytest.raises(GradcheckError, match=r"shipped robust classifier is missing at .*"
                       r"classifiers/robust.*train-classifier --kind robust"):
        run(dataclasses.replace(cfg, classifier="robust", ddpm=str(ckpt / "ddpm")), out=out)
    assert _no_run_folder(out)


def test_existing_folder_needs_overwrite(ckpt, tmp_path):
    cfg = tiny_cfg(ckpt, num_samples=1, steps=2)
    folder = run(cfg, out=tmp_path, name="mine", progress=False)
    (folder / "marker").write_text("old")
    with pytest.raises(GradcheckError, match="mine already exists; pass --overwrite"):
        run(cfg, out=tmp_path, name="mine", progress=False)
    assert (folder / "marker").exists()
    run(cfg, out=tmp_path, name="mine", overwrite=True, progress=False)
    assert not (folder / "marker").exists() and (folder / "steps.parquet").exists()
    with pytest.raises(GradcheckError, match="plain folder name"):
        run(cfg, out=tmp_path, name="../escape")


def test_ctrl_c_mid_run_leaves_no_partial_folder(ckpt, tmp_path):
    def interrupt(step) -> None:
        if step.step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(ckpt), out=out, progress=False, observers=[interrupt])
    assert not out.exists()  # neither the run folder nor its temporary sibling, nor runs/


def _console_script() -> str:
    """The installed ``gradcheck`` entry point beside this interpreter (what a user types)."""
    import shutil
    import sys

    script = Path(sys.executable).parent / "gradcheck"
    return str(script) if script.is_file() else shutil.which("gradcheck")


def test_ctrl_c_through_the_console_script_says_so(ckpt, tmp_path):
    """SIGINT mid-run: exit 130, the one-line message, and no run folder or temporary left."""
    import signal
    import subprocess
    import time

    out = tmp_path / "runs"
    args = [_console_script(), "run", "--classifier", str(ckpt / "clf"), "--ddpm",
            str(ckpt / "ddpm"), "--judge", str(ckpt / "judge"), "--data-root", "nowhere",
            "--num-samples", "2", "--steps", "1000", "--device", "cpu", "--no-metrics",
            "--no-cos-oracle", "--record-vectors", "none", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args[:-1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Wait for the progress bar (stderr) to show sampling steps, then press Ctrl-C.
    seen = b""
    os.set_blocking(proc.stderr.fileno(), False)
    deadline = time.monotonic() + 120
    while b"/1000" not in seen and time.monotonic() < deadline:
        assert proc.poll() is None, seen.decode()
        seen += proc.stderr.read() or b""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    os.set_blocking(proc.stderr.fileno(), True)
    rest = proc.communicate(timeout=60)[1]
    err = (seen + rest).decode()
    assert proc.returncode == 130
    assert "error: interrupted by SIGINT; partial outputs were removed" in err
    assert "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_run(ckpt, tmp_path, capsys):
    args = ["run", "--classifier", str(ckpt / "clf"), "--ddpm", str(ckpt / "ddpm"),
            "--x0-estimate", "--target", "soccer", "--num-samples", "2",
            "--steps", "3", "--device", "cpu", "--no-metrics", "--no-progress",
            "--record-vectors", "none", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--adam", "--precision", "bf16", "--net-batch", "4"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "mean cos_prev applied" in printed and "metrics" in printed
    (folder,) = tmp_path.iterdir()
    config = load_json(folder / "config.json")
    assert (config["stabilizer"], config["target"], config["x0_estimate"]) == ("adam", 2, True)
    assert (config["precision"], config["net_batch"], config["compile"]) == ("bf16", 4, False)
    assert not (folder / "vectors.safetensors").exists()

    for extra, message in ((["--adam", "--stabilizer", "ema"], "--adam conflicts"),
                           (["--target", "tennis"], "unknown target 'tennis'"),
                           (["--stabilizer", "sgd"], "unknown stabilizer 'sgd'"),
                           (["--precision", "half"], "unknown precision 'half'"),
                           (["--net-batch", "0"], "net_batch must be an integer >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--name", "x", *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_explicit_paper_sizes_are_not_reduced(tmp_path, monkeypatch, capsys):
    seen: list[RunConfig] = []

    def fake_run(cfg: RunConfig, **kw) -> Path:
        seen.append(resolve_config(cfg))
        (tmp_path / "metrics.json").write_text(json.dumps({"run_id": "fake", "target": 0}))
        return tmp_path

    monkeypatch.setattr(gradcheck.runner, "run", fake_run)
    for extra in ([], ["--steps", "20"], ["--num-samples", "64"], ["--protocol", "paper"]):
        with pytest.raises(SystemExit):
            main(["run", "--device", "cpu", *extra])
    # Each size not given is the device's default (8 x 1000 on a CPU); given ones are kept.
    assert [(c.num_samples, c.steps) for c in seen] == [(8, 1000), (8, 20), (64, 1000),
                                                        (64, 1000)]
    # The Python API resolves the same way: an explicit RunConfig keeps its sizes.
    explicit = resolve_config(RunConfig(num_samples=64, steps=1000, device="cpu"))
    assert (explicit.num_samples, explicit.steps) == (64, 1000)


def test_metrics_are_computed_and_summarised(ckpt, tmp_path):
    from gradcheck.data.sportballs import generate_dataset

    data = tmp_path / "data"
    # 64 held-out (test) images of the target class are the FID reference.
    generate_dataset(data, n_train=16, n_val=8, n_test=260, image_size=32, progress=False)
    folder = run(tiny_cfg(ckpt, data, metrics=True, num_samples=4, steps=2), out=tmp_path / "r",
                 progress=False)
    metrics = load_json(folder / "metrics.json")
    assert metrics["n_samples"] == 4 and metrics["n_reference"] == 64
    assert metrics["reference_split"] == "test"
    # Exact intervals: never degenerate, never outside [0, 1], even for 0 or 4 of 4 correct.
    for m in ("accuracy_judge", "accuracy_guiding"):
        low, high = metrics[f"{m}_ci_low"], metrics[f"{m}_ci_high"]
        assert 0 <= low <= metrics[m] <= high <= 1 and high - low > 0.3
    assert np.isfinite(metrics["fid"]) and metrics["extractor"]
    # Strict JSON: no bare NaN (precision/recall are undefined at N = 4, stored as null).
    json.loads((folder / "metrics.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert -1 <= metrics["mean_cos_prev_null"] <= 1 and metrics["max_x_norm_ratio"] > 0
    table = summary_table(metrics)
    assert "accuracy judge" in table and f"N={metrics['n_samples']}" in table
    assert "null baseline" in table


def test_arguments_are_checked_before_the_ddpm_weights_load(ckpt, tmp_path, monkeypatch):
    """--steps beyond T, a broken classifier and a missing judge fail at once, from the DDPM's
    JSON configs alone: the weights (up to a minute to load) are never read."""
    import gradcheck.runner as runner_module

    def no_weights(*args, **kwargs):
        raise AssertionError("the DDPM weights were loaded before the arguments were checked")

    monkeypatch.setattr(runner_module, "load_ddpm", no_weights)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt / "clf" / "config.json").read_text())
    weights = (ckpt / "clf" / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:100])  # a truncated file
    for kwargs, message in ((dict(steps=5000), "steps must be an integer in 1..1000"),
                            (dict(classifier=str(broken)), "model.safetensors"),
                            (dict(metrics=True, judge=str(tmp_path / "nojudge")), "nojudge")):
        with pytest.raises(GradcheckError, match=message):
            run(tiny_cfg(ckpt, **kwargs), out=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
