"""Sweeps: grids, run ids, skipping finished runs, resuming after a kill, shards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from gradcheck import runner
from gradcheck.cli import main
from gradcheck.config import RunConfig, SweepConfig
from gradcheck.report.paper import PAPER_TABLE1
from gradcheck.stabilizers import STABILIZERS
from gradcheck.sweep import (
    SCALE_GRIDS,
    SCALES,
    grid_configs,
    parse_shard,
    run_sweep,
    shard,
    shard_from_env,
)
from gradcheck.utils import GradcheckError


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints: Path) -> Path:
    return tiny_checkpoints


@pytest.fixture(autouse=True)
def _shipped_tiny(checkpoints: Path, monkeypatch: pytest.MonkeyPatch):
    """The tiny checkpoints stand in for the shipped ones; one thread keeps CPU runs quick on a
    busy 2-core machine."""
    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", str(checkpoints))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_ARRAY_TASK_ID",
                "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _base(checkpoints: Path, data: Path) -> RunConfig:
    return RunConfig(num_samples=2, batch_size=2, steps=10, device="cpu",
                     ddpm=str(checkpoints / "ddpm"), judge=str(checkpoints / "classifiers/judge"),
                     data_root=str(data), metrics=False, cos_oracle=False, record_vectors="none")


# ---- grids --------------------------------------------------------------------------------------


def test_table1_grid_is_the_papers_eight_configurations_per_seed_seeds_outermost() -> None:
    base = RunConfig(num_samples=5, steps=7, scale=2.5)
    cfgs = grid_configs("table1", 2, base)
    assert len(cfgs) == 16
    assert [c.seed for c in cfgs] == [0] * 8 + [1] * 8
    paper = set(PAPER_TABLE1[["classifier", "x0_estimate", "stabilizer"]].itertuples(
        index=False, name=None))
    for seed in (0, 1):
        got = {(c.classifier, c.x0_estimate, c.stabilizer) for c in cfgs if c.seed == seed}
        assert got == paper
    assert all((c.num_samples, c.steps, c.scale) == (5, 7, 2.5) for c in cfgs)


def test_other_grids() -> None:
    base = RunConfig()
    scales = grid_configs("scales", 1, base)
    assert sorted({c.scale for c in scales}) == sorted(SCALES)
    assert {c.classifier for c in scales} == {"nonrobust", "robust", "adversarial"}
    assert len(scales) == 18 and not any(c.x0_estimate for c in scales)
    stab = grid_configs("stabilizers", [3, 5], base)
    assert [c.stabilizer for c in stab] == list(STABILIZERS) * 2
    assert {(c.classifier, c.x0_estimate) for c in stab} == {("nonrobust", True)}
    assert {c.seed for c in stab} == {3, 5}
    clf = grid_configs("classifiers", 1, base)
    assert [c.classifier for c in clf] == ["nonrobust", "robust", "adversarial", "oracle"]
    x0 = grid_configs("scales-x0", 1, base)
    assert len(x0) == 12 and {(c.classifier, c.x0_estimate, c.stabilizer) for c in x0} == {
        ("nonrobust", True, "adam"), ("robust", True, "adam")}
    norm = grid_configs("d5-norm", 1, base)
    assert sorted({(c.normalize_to, c.scale) for c in norm}) == sorted(
        (n, s) for n in ("score", "eps") for s in SCALES)


def test_grids_share_the_runs_they_have_in_common() -> None:
    """A run two grids both hold has one id, so the second sweep skips it: the classifiers
    grid's plain runs are Table 1's, scales-x0 at s = 1 is Table 1's x0 + ADAM, and d5-norm's
    score runs are the scales grid's."""
    ids = {g: {runner.default_run_id(c) for c in grid_configs(g, 1, RunConfig(device="cpu"))}
           for g in ("table1", "scales", "scales-x0", "d5-norm", "classifiers")}
    assert len(ids["classifiers"] & ids["table1"]) == 2
    assert len(ids["scales-x0"] & ids["table1"]) == 2
    assert len(ids["d5-norm"] & ids["scales"]) == 6 and len(ids["d5-norm"]) == 12


def test_bad_grid_and_seeds_are_clear_errors() -> None:
    with pytest.raises(GradcheckError, match="unknown grid 'table2'.*table1, scales"):
        grid_configs("table2", 1, RunConfig())
    with pytest.raises(GradcheckError, match="seeds must be >= 1"):
        grid_configs("table1", 0, RunConfig())


# ---- shards -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 20])
def test_shards_partition_the_ordered_runs(n: int) -> None:
    cfgs = grid_configs("table1", 3, RunConfig())
    parts = [shard(cfgs, i, n) for i in range(n)]
    flat = [c for p in parts for c in p]
    assert sorted(flat, key=cfgs.index) == cfgs  # every run once, none twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_parse_shard() -> None:
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "0/0", "1", "a/b"):
        with pytest.raises(GradcheckError, match="shard"):
            parse_shard(bad)


def test_shard_from_launcher_environment() -> None:
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}) == (2, 4)
    assert shard_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (1, 2)
    # A 1-based SLURM array 1-3 and an array with a step: 0-based shard indices.
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert shard_from_env(slurm) == (2, 3)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3",
                           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}) == (2, 3)
    # Array tasks of 2 processes each: task-major shard index.
    assert shard_from_env({**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == (5, 6)
    with pytest.raises(GradcheckError, match="pass --shard"):
        shard_from_env({"RANK": "3", "WORLD_SIZE": "2"})


def test_each_launched_process_runs_its_own_shard(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    ran: list[RunConfig] = []
    monkeypatch.setattr(runner, "run_many", lambda cfgs, **kw: ran.extend(cfgs))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    base = RunConfig(device="cpu", num_samples=2, steps=10)
    sweep = SweepConfig(grid="table1", seeds=2, batch_configs=False)
    result = run_sweep(sweep, base, out=tmp_path, progress=False)
    assert result.shard == (1, 3)
    assert ran == shard(grid_configs("table1", 2, base), 1, 3)
    assert list(result.ran) == [runner.default_run_id(c) for c in ran]


def test_batched_shards_take_whole_seeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With --batch-configs (the default) a shard never splits one seed's configurations, which
    are sampled together: --seeds 5 --shard k/5 runs seed k's eight Table 1 runs."""
    calls: list[list[RunConfig]] = []
    monkeypatch.setattr(runner, "run_many", lambda cfgs, **kw: calls.append(list(cfgs)))
    base = RunConfig(device="cpu", num_samples=2, steps=10)
    everything = grid_configs("table1", 5, base)
    for k in range(5):
        calls.clear()
        result = run_sweep(SweepConfig(grid="table1", seeds=5, shard=f"{k}/5"), base,
                           out=tmp_path, progress=False)
        assert len(calls) == 1 and calls[0] == [c for c in everything if c.seed == k]
        assert len(result.planned) == 8
    # More shards than seeds (a launcher's 3 ranks, 2 seeds): single runs, so none sits idle,
    # each shard's runs of one seed still sampled together.
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    calls.clear()
    result = run_sweep(SweepConfig(grid="table1", seeds=2), base, out=tmp_path, progress=False)
    two = grid_configs("table1", 2, base)
    assert calls == [[two[2], two[5]], [two[8], two[11], two[14]]]
    assert len(result.planned) == 5
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # Three shards over five seeds: seeds 0, 3 | 1, 4 | 2, one call per seed.
    calls.clear()
    run_sweep(SweepConfig(grid="table1", seeds=5, shard="0/3"), base, out=tmp_path,
              progress=False)
    assert [[c.seed for c in call] for call in calls] == [[0] * 8, [3] * 8]


# ---- real tiny sweeps ---------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("batch_configs", [True, False])
def test_table1_sweep_gives_8_runs_survives_a_kill_and_redoes_none(
    checkpoints: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], batch_configs: bool,
) -> None:
    out = tmp_path / "runs"
    base = _base(checkpoints, tiny_data)
    expected = {runner.default_run_id(c) for c in grid_configs("table1", 2, base)}
    assert len(expected) == 16
    real_run_many = runner.run_many
    calls: list[list[str]] = []

    class Killed(Exception):
        pass

    def kill_in_step_5(step) -> None:
        if step.step == 5:
            raise Killed

    # Batched, a call samples one seed's 8 configurations: the 2nd call (seed 1) dies halfway.
    # One by one, the 4th run dies halfway.
    doomed = 2 if batch_configs else 4

    def run_then_kill(cfgs: list[RunConfig], **kw):
        calls.append(kw["names"])
        assert len(cfgs) == (8 if batch_configs else 1)
        if len(calls) == doomed:
            return real_run_many(cfgs, observers=(kill_in_step_5,), **kw)
        return real_run_many(cfgs, **kw)

    monkeypatch.setattr(runner, "run_many", run_then_kill)
    with pytest.raises(Killed):
        run_sweep(SweepConfig(grid="table1", seeds=2, batch_configs=batch_configs), base,
                  out=out, progress=False)
    finished = sorted(p.name for p in out.iterdir())
    # the killed call left nothing, not even a temp folder
    assert finished == sorted(name for names in calls[:doomed - 1] for name in names)
    before = {name: _files(out / name) for name in finished}

    def counting_run_many(cfgs: list[RunConfig], **kw):
        calls.append(kw["names"])
        return real_run_many(cfgs, **kw)

    monkeypatch.setattr(runner, "run_many", counting_run_many)
    calls.clear()
    args = ["sweep", "--grid", "table1", "--seeds", "2", "--out", str(out), "--num-samples", "2",
            "--batch-size", "2", "--steps", "10", "--device", "cpu", "--ddpm",
            base.ddpm, "--judge", base.judge, "--data-root", base.data_root, "--no-metrics",
            "--no-oracle", "--record-vectors", "none", "--no-progress",
            "--batch-configs" if batch_configs else "--no-batch-configs"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    n_done = len(finished)
    assert f"16 runs, {16 - n_done} run now, {n_done} already finished" in capsys.readouterr().out
    ran_now = [name for names in calls for name in names]
    assert len(ran_now) == 16 - n_done and not set(ran_now) & set(finished)
    assert {p.name for p in out.iterdir()} == expected
    assert {name: _files(out / name) for name in finished} == before  # untouched
    for name in expected:
        assert {"config.json", "samples.npy", "steps.parquet", "metrics.json"} <= set(
            _files(out / name))

    calls.clear()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0 and calls == []
    assert "16 runs, 0 run now, 16 already finished" in capsys.readouterr().out


def test_sweep_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for args, msg in (
        (["sweep", "--grid", "scales", "--scale", "2"], "scales grid sets the scale"),
        (["sweep", "--grid", "d5-norm", "--scale", "2"], "d5-norm grid sets the scale"),
        (["sweep", "--grid", "nope"], "unknown grid 'nope'"),
        (["sweep", "--shard", "2/2", "--device", "cpu"], "shard '2/2' needs 0 <= i < n"),
        (["sweep", "--target", "golf"], "unknown target 'golf'"),
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_sweep_target_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[RunConfig] = []
    monkeypatch.setattr(runner, "run_many", lambda cfgs, **kw: seen.extend(cfgs))
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--grid", "classifiers", "--seeds", "1", "--target", "soccer",
              "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    assert e.value.code == 0 and {c.target for c in seen} == {2}


def test_base_config_fields_reach_every_run() -> None:
    base = dataclasses.replace(RunConfig(), steps=17, normalize=False, target=2)
    for grid in ("table1", "scales", "stabilizers", "classifiers"):
        assert all((c.steps, c.normalize, c.target) == (17, False, 2)
                   for c in grid_configs(grid, 1, base))


def test_sweep_killed_with_sigkill_resumes_to_the_uninterrupted_result(
    checkpoints: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """Fault injection: kill -9 at a few points of a sweep (mid-run, and as run folders appear),
    resume each time; the end state is exactly the uninterrupted sweep's run folders,
    byte-identical samples and steps, and no temporary folder is left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = Path(sys.executable).parent / "gradcheck"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADCHECK_CHECKPOINTS": str(checkpoints)}

    def sweep(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [str(script), "sweep", "--grid", "table1", "--seeds", "1", "--no-batch-configs",
             "--num-samples", "2", "--steps", "20", "--device", "cpu", "--data-root",
             str(tiny_data), "--no-metrics", "--no-cos-oracle", "--record-vectors", "none",
             "--out", str(out), "--no-progress"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finished(out: Path) -> list[str]:
        return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) \
            if out.exists() else []

    reference = tmp_path / "reference"
    assert sweep(reference).wait(timeout=600) == 0
    out = tmp_path / "killed"
    for kill_at in (1, 5):  # kill once this many run folders exist (mid-way through the next)
        proc = sweep(out)
        deadline = time.monotonic() + 300
        while len(finished(out)) < kill_at and proc.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # A kill during a folder's writing leaves its temporary sibling: plant one of a dead process.
    from gradcheck.utils import _owner_tag

    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / f".some-run.tmp-{_owner_tag()}-{gone.pid}-0123abcd" / "half").mkdir(parents=True)
    assert sweep(out).wait(timeout=600) == 0
    assert finished(out) == finished(reference) and len(finished(out)) == 8
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for name in finished(reference):
        for f in ("samples.npy", "steps.parquet"):
            assert (out / name / f).read_bytes() == (reference / name / f).read_bytes(), (name, f)


def test_sweep_with_records_resumes_on_a_new_machine_from_the_records_alone(
    checkpoints: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs are not kept across machines, records are: a sweep given --records writes one per
    finished run, and a sweep with no run folders but the same records runs nothing again."""
    from gradcheck.report import render_report

    base = _base(checkpoints, tiny_data)
    records = tmp_path / "records"
    cfg = SweepConfig(grid="table1", seeds=1, records=str(records))
    first = run_sweep(cfg, base, out=tmp_path / "machine1", progress=False)
    assert len(first.ran) == 8 and sorted(p.name for p in records.iterdir()) == sorted(first.ran)
    for name in first.ran:
        assert {"config.json", "step_stats.parquet", "samples.png"} <= {
            p.name for p in (records / name).iterdir()}
        assert not (records / name / "steps.parquet").exists()  # compact: no step columns
    calls: list[list[RunConfig]] = []
    real_run_many = runner.run_many

    def counting_run_many(cfgs: list[RunConfig], **kw):
        calls.append(cfgs)
        return real_run_many(cfgs, **kw)

    monkeypatch.setattr(runner, "run_many", counting_run_many)
    again = run_sweep(cfg, base, out=tmp_path / "machine2", progress=False)
    assert calls == [] and again.ran == () and sorted(again.skipped) == sorted(first.ran)
    # and a second seed runs only the new seed's configurations
    more = run_sweep(dataclasses.replace(cfg, seeds=2), base, out=tmp_path / "machine2",
                     progress=False)
    assert [c.seed for group in calls for c in group] == [1] * 8 and len(more.skipped) == 8
    # runs finished before records were asked for are recorded when the sweep meets them
    late = tmp_path / "late-records"
    run_sweep(dataclasses.replace(cfg, records=str(late)), base, out=tmp_path / "machine1",
              progress=False)
    assert sorted(p.name for p in late.iterdir()) == sorted(first.ran)
    # the report renders from the records alone
    report = render_report([str(records)], out=tmp_path / "report", progress=False)
    assert (report / "report.md").is_file()


def test_runs_made_before_the_current_results_version_are_never_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ids made before D5's zero-only vanishing (with either D3 form) are not reproduced by any
    config now, and D3's two forms have different ids."""
    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", "sportballs32-v1")
    before = {  # seed 0 of the table1 sweep on the 32x32 set: log-softmax D3, then stable D3
        "robust-xt-none-s1-t0-n64-k1000-seed0-f502f318",
        "robust-x0-adam-s1-t0-n64-k1000-seed0-367f80a4",
        "nonrobust-x0-adam-s1-t0-n64-k1000-seed0-aa044755",
        "nonrobust-xt-none-s1-t0-n64-k1000-seed0-15fb475b",
        "robust-xt-none-s1-t0-n64-k1000-seed0-b14b1a6a",
        "robust-x0-adam-s1-t0-n64-k1000-seed0-bee8f082",
        "nonrobust-x0-adam-s1-t0-n64-k1000-seed0-0b189b0d",
        "nonrobust-xt-none-s1-t0-n64-k1000-seed0-79db076b",
    }
    old = {runner.default_run_id(c) for c in grid_configs(
        "table1", 1, RunConfig(log_prob="log-softmax"))}
    new = {runner.default_run_id(c) for c in grid_configs("table1", 1, RunConfig())}
    assert len(before) == 8 and not before & (old | new)
    assert not new & old and len(new) == len(old) == 8
    monkeypatch.setattr(runner, "RESULTS_VERSION", runner.RESULTS_VERSION + 1)
    assert not new & {runner.default_run_id(c) for c in grid_configs("table1", 1, RunConfig())}


def test_committed_study_records_are_found_by_the_sweeps_that_made_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference study resumes from reports/sportballs32/records: every record's run id must
    be one that `scripts/study32.sh` computes today, or the sweep would run it again."""
    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", "sportballs32-v1")
    records = Path(__file__).parents[1] / "reports" / "sportballs32" / "records"
    recorded = {json.loads(p.read_text())["run_id"] for p in records.glob("*/config.json")}
    assert len(recorded) >= 8  # at least Table 1's seed 0
    # Table 1 and the classifier grid run at the scale `study32.sh` passes (--scale), one of
    # the scale grids' scales.
    computed = {runner.default_run_id(c) for grid in SCALE_GRIDS
                for c in grid_configs(grid, 5, RunConfig())}
    computed |= {runner.default_run_id(c) for grid in ("table1", "classifiers") for s in SCALES
                 for c in grid_configs(grid, 5, RunConfig(scale=s))}
    assert recorded <= computed, sorted(recorded - computed)

