"""The report: Table 1 beside the paper, the findings' verdicts, figures, a self-contained HTML."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradcheck.cli import main
from gradcheck.config import RunConfig, SweepConfig
from gradcheck.metrics import seed_interval
from gradcheck.report import build_report, find_inputs, render_report
from gradcheck.report import tables as T
from gradcheck.report.figures import scale_figure
from gradcheck.report.paper import PAPER_TABLE1, VERDICTS
from gradcheck.sweep import run_sweep
from gradcheck.utils import GradcheckError

PAPER = list(PAPER_TABLE1.itertuples(index=False, name=None))


# ---- synthetic run tables (pure functions) ------------------------------------------------------


def _row(classifier: str, x0: bool, stab: str, seed: int, fid: float, acc: float,
         cos: float = 0.5, scale: float = 1.0, num_samples: int = 64) -> dict:
    return {
        "run_id": f"{classifier}-{x0}-{stab}-s{scale}-n{num_samples}-seed{seed}", "path": "",
        "seed": seed, "classifier": classifier, "x0_estimate": x0, "stabilizer": stab,
        "normalize": True, "scale": scale, "target": 0, "steps": 1000,
        "num_samples": num_samples, "fid": fid, "kid_mean": fid / 1000, "kid_std": 0.0,
        "precision": 0.5, "recall": 0.5, "accuracy_guiding": acc, "accuracy_judge": acc,
        "mean_cos_prev_raw": cos, "mean_cos_prev_applied": cos, "extractor": "judge-x",
        "n_samples": num_samples, "n_reference": 64, "hardware": "Test GPU", "wall_time_s": 2.0,
    }


def _paper_runs(seeds: int = 3, noise: float = 0.5, fid_shift: float = 0.0) -> list[dict]:
    """Runs whose metrics scatter around the paper's Table 1 (robust cos 0.9, non-robust 0.05)."""
    rows = []
    for c, x0, s, fid, acc in PAPER:
        for seed in range(seeds):
            jitter = noise * (seed - (seeds - 1) / 2)
            rows.append(_row(c, x0, s, seed, fid + fid_shift + jitter, acc + jitter / 100,
                             cos=0.9 if c == "robust" else 0.05))
    return rows


def test_table1_puts_the_papers_values_beside_ours_with_differences() -> None:
    rows = [r for r in _paper_runs(fid_shift=2.0)
            if not (r["classifier"] == "robust" and r["x0_estimate"] and r["stabilizer"] == "none")]
    rows += [_row("oracle", False, "none", s, 10.0 + s, 1.0) for s in range(2)]
    t1 = T.table1(T.runs_frame(rows))
    assert len(t1) == 9 and t1["in_paper"].sum() == 8
    assert list(zip(t1["classifier"][:8], t1["x0_estimate"][:8], t1["stabilizer"][:8],
                    strict=True)) == [p[:3] for p in PAPER]  # paper order first
    missing = t1[(t1["classifier"] == "robust") & t1["x0_estimate"] & (t1["stabilizer"] == "none")]
    assert missing["n_seeds"].item() == 0 and math.isnan(missing["fid"].item())
    assert missing["paper_fid"].item() == pytest.approx(38.053)
    full = t1[t1["in_paper"] & (t1["n_seeds"] == 3)]
    assert np.allclose(full["fid_diff"], 2.0) and np.allclose(full["accuracy_guiding_diff"], 0)
    r = t1[(t1["classifier"] == "nonrobust") & ~t1["x0_estimate"] & (t1["stabilizer"] == "none")]
    mean, low, high = seed_interval([126.026 + 2, 126.526 + 2, 127.026 + 2])
    assert r["fid"].item() == pytest.approx(mean)
    assert (r["fid_ci_low"].item(), r["fid_ci_high"].item()) == pytest.approx((low, high))
    oracle = t1.iloc[-1]
    assert oracle["classifier"] == "oracle" and math.isnan(oracle["paper_fid"])
    shown = T.format_table1(t1)
    assert shown.loc[4, "FID (paper)"] == "126.53" and shown.loc[4, "FID diff"] == "+2.00"
    assert shown.loc[1, "FID"] == "-" and shown.loc[1, "seeds"] == "no runs"
    assert shown.loc[4, "protocol vs paper"] == "same"


def test_rows_of_another_protocol_are_marked_beside_the_paper() -> None:
    rows = [dict(r, steps=50, num_samples=8, image_size=32, scale=0.5) for r in _paper_runs()]
    t1 = T.table1(T.runs_frame(rows))
    shown = T.format_table1(t1)
    assert (t1.loc[t1["in_paper"], "protocol_vs_paper"] == "50 steps; N = 8; 32x32; s = 0.5").all()
    assert shown.loc[0, "configuration"].endswith("\u2020")
    assert shown.loc[0, "FID diff"].endswith("\u2020")
    assert shown.loc[0, "protocol vs paper"] == "\u2020 50 steps; N = 8; 32x32; s = 0.5"


def test_accuracy_intervals_over_seeds_stay_within_zero_and_one() -> None:
    rows = [_row("robust", False, "none", s, 30.0, acc) for s, acc in enumerate((1.0, 0.9))]
    t1 = T.table1(T.runs_frame(rows))
    r = t1[t1["n_seeds"] == 2].iloc[0]
    assert r["accuracy_guiding_ci_high"] == 1.0 and r["accuracy_guiding_ci_low"] >= 0.0
    assert r["fid_ci_low"] == r["fid_ci_high"] == 30.0


def test_table1_protocol_is_the_one_covering_most_paper_configurations() -> None:
    rows = _paper_runs(seeds=1)
    rows += [_row("robust", False, "none", 0, 50.0, 0.5, scale=s) for s in (2.0, 4.0)]
    rows += [_row("robust", False, "none", 0, 99.0, 0.5, num_samples=8)]
    runs = T.runs_frame(rows)
    proto = T.table1_protocol(runs)
    assert {k: proto[k] for k in ("scale", "normalize", "target", "steps", "num_samples",
                                  "normalize_to", "diffusion_time")} == {
        "scale": 1.0, "normalize": True, "target": 0, "steps": 1000, "num_samples": 64,
        "normalize_to": "score", "diffusion_time": True}
    t1 = T.table1(runs)
    assert t1.loc[0, "fid"] == pytest.approx(26.641)  # not the scale-2, scale-4 or N=8 runs


def _verdicts(rows: list[dict]) -> dict[str, str]:
    f = T.findings(T.runs_frame(rows))
    assert set(f["verdict"]) <= set(VERDICTS)
    return dict(zip(f["finding"], f["verdict"], strict=True))


def test_findings_hold_on_runs_that_reproduce_the_paper() -> None:
    v = _verdicts(_paper_runs())
    assert v == {"1": "holds", "2": "holds", "3": "holds", "4": "holds",
                 "K": "not testable with these runs"}


def test_findings_do_not_hold_when_the_runs_say_otherwise() -> None:
    rows = _paper_runs()
    for r in rows:
        if r["classifier"] == "nonrobust" and r["x0_estimate"] and r["stabilizer"] == "none":
            r["fid"] += 40.0  # x0-estimate now hurts the non-robust classifier
        if r["classifier"] == "nonrobust" and not r["x0_estimate"]:
            r["mean_cos_prev_applied"] = 0.7  # and non-robust gradients are far from orthogonal
    v = _verdicts(rows)
    assert v["1"] == "does not hold" and v["2"] == "does not hold"
    assert v["4"] == "holds"


def test_a_difference_whose_interval_includes_zero_is_inconclusive() -> None:
    rows = _paper_runs()
    # robust + x0 + adam: worse on average but one seed better -> interval covers 0.
    for r in rows:
        if r["classifier"] == "robust" and r["x0_estimate"] and r["stabilizer"] == "adam":
            r["fid"] = 26.641 + [30.0, -10.0, 1.0][r["seed"]]
    assert _verdicts(rows)["4"] == "inconclusive"
    # A single seed has no interval: every comparison is inconclusive, its direction reported;
    # the levels of finding 1 (means over 64 samples x 1,000 steps) are decided by the values.
    f = T.findings(T.runs_frame([r for r in _paper_runs() if r["seed"] == 0])).set_index(
        "finding")
    assert f.loc[["2", "3", "4"], "verdict"].tolist() == ["inconclusive"] * 3
    assert "no interval, 1 seed" in f.loc["2", "evidence"]
    assert f.loc["1", "verdict"] == "holds"


def test_an_interval_on_the_wrong_side_of_zero_does_not_hold() -> None:
    rows = _paper_runs()
    for r in rows:  # robust + x0 + adam clearly better than robust: over-regularisation refuted
        if r["classifier"] == "robust" and r["x0_estimate"] and r["stabilizer"] == "adam":
            r["fid"], r["accuracy_guiding"] = 20.0 + r["seed"], 0.99
            r["accuracy_judge"] = 0.99
    assert _verdicts(rows)["4"] == "does not hold"


def test_findings_say_what_the_cpu_scale_may_change_only_at_the_cpu_scale() -> None:
    paper = T.findings(T.runs_frame(_paper_runs()))
    assert (paper["scale_note"] == "").all()
    cpu = T.findings(T.runs_frame([dict(r, image_size=32) for r in _paper_runs()]))
    assert (cpu["scale_note"].str.len() > 40).all()


def test_findings_say_what_is_missing_when_they_cannot_be_tested() -> None:
    rows = [r for r in _paper_runs() if r["classifier"] == "nonrobust"]
    for r in rows:
        r["fid"] = r["accuracy_guiding"] = r["accuracy_judge"] = math.nan
    f = T.findings(T.runs_frame(rows)).set_index("finding")
    assert f.loc["1", "verdict"] == "not testable with these runs"
    assert "no runs of: robust" in f.loc["1", "evidence"]
    assert f.loc["2", "verdict"] == "not testable with these runs"
    assert "no metrics" in f.loc["2", "evidence"]


def test_scale_curves_and_the_kawar_finding() -> None:
    rows = []
    for s in (0.5, 1.0, 2.0):
        for seed in range(2):
            rows.append(_row("nonrobust", False, "none", seed, 100 + s + seed, 0.2, scale=s))
            rows.append(_row("adversarial", False, "none", seed, 40 + s + seed, 0.9, scale=s))
    curves = T.scale_curves(T.runs_frame(rows))
    assert len(curves) == 6 and set(curves["n_seeds"]) == {2}
    adv = curves[curves["classifier"] == "adversarial"].set_index("scale")
    assert adv.loc[2.0, "fid"] == pytest.approx(42.5)
    # paired by seed: adversarial 60 points lower at every scale (the same in both seeds)
    assert _verdicts(rows)["K"] == "holds"
    rows[-1]["fid"] = 500.0  # adversarial at s = 2, seed 1: now worse than vanilla there
    f = T.findings(T.runs_frame(rows)).set_index("finding")
    assert f.loc["K", "verdict"] == "inconclusive"
    assert "lower on average at 2/3 scales, with its interval below 0 at 2/3" in f.loc[
        "K", "evidence"]
    for r in rows:
        if r["classifier"] == "adversarial" and r["scale"] == 2.0:
            r["fid"] = 300.0 + r["seed"]  # worse in both seeds: the claim is refuted there
    assert _verdicts(rows)["K"] == "does not hold"
    fig = scale_figure(curves, "t", "N = 64")
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log"


def test_table1_takes_the_scale_asked_for_even_with_fewer_runs() -> None:
    rows = _paper_runs(seeds=3) + [dict(r, scale=0.5) for r in _paper_runs(seeds=1)]
    runs = T.runs_frame(rows)
    assert T.table1_protocol(runs)["scale"] == 1.0  # more runs
    protocol = T.table1_protocol(runs, scale=0.5)
    t1 = T.table1(runs, protocol)
    assert protocol["scale"] == 0.5 and set(t1.loc[t1["in_paper"], "n_seeds"]) == {1}
    assert (t1.loc[t1["in_paper"], "protocol_vs_paper"] == "s = 0.5").all()
    with pytest.raises(GradcheckError, match=r"no runs at scale 2; the runs' scales: 0.5, 1"):
        T.table1_protocol(runs, scale=2.0)


def test_best_scale_is_the_most_accurate_then_the_lowest_fid() -> None:
    rows = [_row("robust", False, "none", 0, fid, acc, scale=s)
            for s, fid, acc in ((0.5, 30.0, 1.0), (1.0, 600.0, 0.0), (2.0, 20.0, 1.0))]
    rows += [_row("nonrobust", False, "none", 0, 500.0, acc, scale=s)
             for s, acc in ((0.5, 0.3), (1.0, 0.5))]
    rows[-1]["accuracy_judge"] = float("nan")  # no judge: the guiding classifier's 0.5 counts
    curves = T.scale_curves(T.runs_frame(rows))
    best = T.best_scales(curves).set_index("classifier")
    assert best.loc["robust", "scale"] == 2.0  # tied at 100%: the lower FID
    assert best.loc["nonrobust", "scale"] == 1.0
    # Ranking scales: only curves run at every scale count (non-robust lacks s = 2).
    rank = T.scale_ranking(curves)
    assert rank["scale"].tolist() == [2.0, 0.5, 1.0] and set(rank["n_curves"]) == {1}


def test_pooled_step_statistics_equal_those_of_all_samples_together() -> None:
    rng = np.random.default_rng(0)

    def steps(n: int) -> pd.DataFrame:
        return pd.DataFrame({"step": np.repeat([0, 1], n), "t": np.repeat([999, 500], n),
                             "cos_prev_applied": rng.normal(size=2 * n)})

    a, b = steps(3), steps(5)
    parts = pd.concat([T.step_stats(a).assign(run="a"), T.step_stats(b).assign(run="b")])
    pooled = T.pool_step_stats(parts.assign(cfg="x"), ["cfg"]).sort_values("step")
    direct = T.step_stats(pd.concat([a, b])).sort_values("step")
    assert np.allclose(pooled["mean"], direct["mean"]) and np.allclose(pooled["std"], direct["std"])
    assert list(pooled["n"]) == [8, 8]


def test_labels_and_provenance() -> None:
    rows = [_row("nonrobust", True, "adam", 0, 1, 1), _row("robust", False, "none", 1, 1, 1),
            _row("robust", False, "none", 2, 1, 1, scale=2.0)]
    runs = T.runs_frame(rows)
    assert set(runs["label"]) == {"non-robust + x0 + adam (s=1)", "robust (s=1)", "robust (s=2)"}
    text = T.provenance(runs)
    for part in ("N = 64", "seeds 0-2 (3)", "extractor judge-x", "Test GPU", "wall time 6 s"):
        assert part in text


# ---- a report from real tiny runs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path,
              tiny_checkpoints: Path):
    """A table1 sweep of tiny random models (1 seed, 2 samples, 10 steps) whose metrics.json
    hold the paper's accuracies and the paper's FID + 1, as `gradcheck metrics` would write them;
    an accuracy_by_t.parquet beside the robust classifier; checkpoints shipped in their place."""
    root = tmp_path_factory.mktemp("report")
    ck = Path(shutil.copytree(tiny_checkpoints, root / "ckpt"))
    pd.DataFrame([{"kind": "robust", "input": inp, "t": t, "attack": "none", "eps": 0.0, "n": 32,
                   "accuracy": 1 - t / 1500, "prob_target": 0.5, "loss": 1.0}
                  for t in range(0, 1000, 50) for inp in ("x_t", "x0_hat")]).to_parquet(
        ck / "classifiers" / "robust" / "accuracy_by_t.parquet")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADCHECK_CHECKPOINTS", str(ck))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = RunConfig(num_samples=2, batch_size=2, steps=10, device="cpu", ddpm=str(ck / "ddpm"),
                     judge=str(ck / "classifiers/judge"), data_root=str(tiny_data), metrics=False,
                     cos_oracle=False, record_vectors="none")
    run_sweep(SweepConfig(grid="table1", seeds=1), base, out=root / "runs", progress=False)
    paper = {p[:3]: p[3:] for p in PAPER}
    for folder in (root / "runs").iterdir():
        m = json.loads((folder / "metrics.json").read_text())
        fid, acc = paper[(m["classifier"], m["x0_estimate"], m["stabilizer"])]
        m.update(fid=fid + 1.0, kid_mean=0.01, accuracy_guiding=acc, accuracy_judge=acc,
                 extractor="sportballs-judge-shufflenet", n_samples=2, n_reference=64)
        (folder / "metrics.json").write_text(json.dumps(m))
    yield root
    torch.set_num_threads(threads)
    mp.undo()


def test_report_renders_table1_paper_values_findings_and_a_self_contained_html(
    tiny_runs: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from gradcheck.pag import pag_table

    out = tiny_runs / "reports"
    # `gradcheck pag` writes into report/pag by default: the report must use it and keep it.
    (out / "pag").mkdir(parents=True)
    pag_table("robust", np.full((2, 4), 2.0), np.arange(4), (0, 500)).to_parquet(
        out / "pag" / "pag.parquet")
    with pytest.raises(SystemExit) as e:
        main(["report", str(tiny_runs / "runs"), "--out", str(out), "--no-progress"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", str(tiny_runs / "runs"), "--out", str(out), "--overwrite",
              "--no-progress"])
    assert e.value.code == 0
    assert (out / "pag" / "pag.parquet").is_file()

    t1 = pd.read_csv(out / "tables" / "table1.csv")
    assert len(t1) == 8 and t1["in_paper"].all() and (t1["n_seeds"] == 1).all()
    assert np.allclose(t1["fid_diff"], 1.0) and np.allclose(t1["accuracy_guiding_diff"], 0.0)
    md = (out / "report.md").read_text()
    # 10 steps, N = 2, 32x32: every row is marked as measured under another protocol.
    assert "## Table 1" in md
    assert "| non-robust + x0 + adam \u2020 | 1 | 25.35 | 24.35 | +1.00 \u2020 |" in md
    assert "another protocol than the paper's" in md and "10 steps; N = 2; 32x32" in md

    found = pd.read_csv(out / "tables" / "findings.csv", dtype=str).set_index("finding")
    assert list(found.index) == ["1", "2", "3", "4", "K"]
    # one seed: comparisons are inconclusive; finding 1's levels are decided by the values
    assert found.loc[["2", "3", "4"], "verdict"].tolist() == ["inconclusive"] * 3
    assert found.loc["1", "verdict"] in ("holds", "does not hold", "inconclusive")
    runs = pd.read_csv(out / "tables" / "runs.csv")
    robust = runs[(runs["classifier"] == "robust") & ~runs["x0_estimate"]
                  & (runs["stabilizer"] == "none")]
    assert f"robust {robust['mean_cos_prev_applied'].item():.3f}" in found.loc["1", "evidence"]
    assert found.loc["K", "verdict"] == "not testable with these runs"
    for key in ("1", "2", "3", "4", "K"):
        assert f"**Finding {key}**" in md

    html = (out / "report.html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", html)
    assert not re.search(r"<link|<script|<iframe|@import|url\(", html, re.I)
    pngs = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert sorted(p.stem for p in (out / "figures").glob("*.pdf")) == pngs
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert {"cos_prev_baseline", "cos_prev_robust", "cos_prev_nonrobust", "norms",
            "samples_robust", "accuracy_by_t", "pag"} <= set(pngs)
    assert "126.53" in html and "inconclusive" in html


def _with_scale_sweep(runs: Path, into: Path) -> Path:
    """The tiny runs plus copies of the plain robust and non-robust runs relabelled as scales
    0.5 and 2 (config and metrics edited), as a scale sweep would add them."""
    shutil.copytree(runs, into)
    for folder in sorted(runs.iterdir()):
        config = json.loads((folder / "config.json").read_text())
        if config["x0_estimate"] or config["stabilizer"] != "none":
            continue
        for scale in (0.5, 2.0):
            copy = into / f"{folder.name}-s{scale}"
            shutil.copytree(folder, copy)
            for name in ("config.json", "metrics.json"):
                d = json.loads((copy / name).read_text())
                d.update(scale=scale, run_id=copy.name)
                if name == "metrics.json":
                    d["fid"] += scale
                (copy / name).write_text(json.dumps(d))
    return into


def test_every_figure_states_n_seeds_extractor_hardware_and_time(
    tiny_runs: Path, tmp_path: Path
) -> None:
    runs = _with_scale_sweep(tiny_runs / "runs", tmp_path / "runs")
    sections = build_report(find_inputs([runs]), progress=False)
    tables = {b.name: b.data for s in sections for b in s.blocks if b.kind == "table"}
    figures = {b.name: b.figure for s in sections for b in s.blocks if b.kind == "figure"}
    curves = tables["scale_sweep"]
    assert len(curves) == 6 and set(curves["curve"]) == {"robust", "non-robust"}
    assert curves.set_index(["curve", "scale"]).loc[("robust", 2.0), "fid"] == pytest.approx(
        26.641 + 1 + 2)
    t1 = tables["table1"]
    assert (t1["scale"] == 1.0).all() and t1["n_seeds"].max() == 1  # the protocol's runs only
    assert {"cos_prev_baseline", "cos_prev_robust", "cos_prev_nonrobust", "norms",
            "samples_robust", "samples_nonrobust", "scale_sweep", "samples_scales_robust",
            "samples_scales_non-robust", "accuracy_by_t"} <= set(figures)
    for name, fig in figures.items():
        footer = fig._supxlabel.get_text().replace("\n", " ")
        for part in ("N = ", "seeds", "extractor", "time"):
            assert part in footer, (name, footer)
        # The footer lies inside the figure: nothing of it is clipped.
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        box, page = fig._supxlabel.get_window_extent(renderer), fig.bbox
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, (name, box, page)
    run_footer = figures["norms"]._supxlabel.get_text().replace("\n", " ")
    assert "N = 2 samples per run; seeds 0 (1); extractor sportballs-judge-shufflenet" in run_footer
    assert "wall time" in run_footer and "CPU" in run_footer


def test_report_without_runs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GradcheckError, match="no run folders found"):
        render_report([tmp_path], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_long_footer_is_wrapped_inside_a_one_panel_figure() -> None:
    """A single sample grid is 3 inches wide: its provenance footer wraps to fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gradcheck.report.figures import samples_figure

    footer = "; ".join(f"provenance item {i} with a long description" for i in range(12))
    fig = samples_figure({"robust": np.zeros((4, 8, 8, 3), np.uint8)}, "samples", footer)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig._supxlabel.get_window_extent(canvas.get_renderer())
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)


def test_report_renders_the_same_tables_from_compact_records(tiny_runs: Path,
                                                             tmp_path: Path) -> None:
    """Compact records (config, metrics, per-step summaries, first samples) survive a change of
    machine; the report made from them has the same tables as the one made from run folders."""
    records = tmp_path / "records"
    main_args = ["report", str(tiny_runs / "runs"), "--records", str(records), "--out",
                 str(tmp_path / "from_runs"), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(main_args)
    assert e.value.code == 0
    assert sorted(p.name for p in records.iterdir()) == sorted(
        p.name for p in (tiny_runs / "runs").iterdir())
    one = next(records.iterdir())
    assert {p.name for p in one.iterdir()} == {"config.json", "metrics.json", "samples.png",
                                               "step_stats.parquet"}
    # the samples come back from samples.png exactly
    from gradcheck.report.render import _samples

    run = tiny_runs / "runs" / one.name
    assert np.array_equal(_samples(str(one), 16), np.load(run / "samples.npy")[:16])
    size = sum(p.stat().st_size for p in records.rglob("*") if p.is_file())
    full = sum(p.stat().st_size for p in (tiny_runs / "runs").rglob("*") if p.is_file())
    assert size < full
    render_report([records], out=tmp_path / "from_records", progress=False)
    for table in ("table1.csv", "findings.csv", "runs.csv"):
        a = pd.read_csv(tmp_path / "from_runs" / "tables" / table).drop(columns="path",
                                                                        errors="ignore")
        b = pd.read_csv(tmp_path / "from_records" / "tables" / table).drop(columns="path",
                                                                           errors="ignore")
        pd.testing.assert_frame_equal(a, b)


def test_a_studys_stages_appear_with_hardware_command_and_wall_time(
    tiny_runs: Path, tmp_path: Path
) -> None:
    stages = tmp_path / "study" / "stages.csv"
    stages.parent.mkdir()
    pd.DataFrame([{"stage": "table1 seed 0", "command": "gradcheck sweep --grid table1",
                   "started_utc": "2026-12-05T12:22:00Z", "wall_s": 3300, "cpu": "Test CPU",
                   "cores": 2, "result": "8 run now"}]).to_csv(stages, index=False)
    out = render_report([tiny_runs / "runs", stages.parent], out=tmp_path / "r", progress=False)
    md = (out / "report.md").read_text()
    assert "## How these runs were made" in md
    assert "| table1 seed 0 | gradcheck sweep --grid table1 |" in md and "55.0 min" in md
    assert "0.9 h of wall time in all, on Test CPU (2 cores)" in md


def test_runs_of_other_settings_are_never_pooled_into_one_row() -> None:
    """The same configuration with D5 scaled to eps (or at another image size) is another
    configuration: Table 1 keeps to one protocol and its intervals count only those runs."""
    rows = _paper_runs(seeds=3)
    rows += [dict(r, normalize_to="eps", run_id=r["run_id"] + "-eps") for r in _paper_runs(2)]
    rows += [dict(r, image_size=32, run_id=r["run_id"] + "-32") for r in _paper_runs(2)]
    runs = T.runs_frame(rows)
    assert runs["config"].nunique() == 24
    t1 = T.table1(runs)
    assert (t1.loc[t1["in_paper"], "n_seeds"] == 3).all()


def test_report_with_its_default_out_works_in_a_checkout(tiny_runs: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    """A checkout holds the committed reports/; `gradcheck report RUNS` with no --out writes
    report/ beside it instead of asking for --overwrite."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "README.md").write_text("committed")
    with pytest.raises(SystemExit) as e:
        main(["report", str(tiny_runs / "runs"), "--no-progress"])
    assert e.value.code == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert (tmp_path / "reports" / "README.md").read_text() == "committed"
