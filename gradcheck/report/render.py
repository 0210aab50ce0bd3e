"""``gradcheck report``: read run folders (and PAG, survey, classifier outputs), build tables and
figures (tables.py, figures.py) and write the report atomically (the only module here that
touches files): report.md, a self-contained report.html, figures/ and tables/ (docs/formats.md).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import gradcheck
from gradcheck.report import figures as F
from gradcheck.report import tables as T
from gradcheck.report.paper import PAPER_CLASSIFIER_ACCURACY, PAPER_PROTOCOL
from gradcheck.utils import GradcheckError, atomic_output_dir, load_json, read_image_grid

RECORD_STEPS = "step_stats.parquet"  # a compact record's per-step summaries (tables.step_stats)
RECORD_SAMPLES = "samples_head.npy"  # first samples of records written before samples.png sufficed

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
"""The checkout the package runs from: records name paths inside it relative to it."""

STAGES = "stages.csv"  # a study's log of its stages (scripts/study32.sh); the report lists it

SEARCH_DEPTH = 3  # how deep find_inputs looks below each given folder


# ---- Finding and reading inputs -----------------------------------------------------------------


@dataclass
class Inputs:
    """What a report is built from; every list but ``runs`` may be empty."""

    runs: list[Path] = field(default_factory=list)
    pag: list[Path] = field(default_factory=list)  # pag.parquet files (`gradcheck pag`)
    surveys: list[Path] = field(default_factory=list)  # `survey analyze` output folders
    accuracy: list[Path] = field(default_factory=list)  # classifiers' accuracy_by_t.parquet
    stages: list[Path] = field(default_factory=list)  # stages.csv: how a study was run


def is_run(folder: Path) -> bool:
    """Is ``folder`` a finished run folder, or a compact record of one (:func:`write_records`)?"""
    return (folder / "config.json").is_file() and (
        (folder / "steps.parquet").is_file() or (folder / RECORD_STEPS).is_file())


def find_inputs(paths: Sequence[str | Path]) -> Inputs:
    """Run folders, PAG tables, survey analyses and accuracy tables at or below ``paths``."""
    found = Inputs()

    def visit(p: Path, depth: int) -> None:
        if p.is_file():
            if p.name == "pag.parquet":
                found.pag.append(p)
            elif p.name == "accuracy_by_t.parquet":
                found.accuracy.append(p)
            elif p.name == STAGES:
                found.stages.append(p)
            return
        if is_run(p):
            found.runs.append(p)
            return
        if (p / "survey_split.parquet").is_file():
            found.surveys.append(p)
        if depth < SEARCH_DEPTH:
            for child in sorted(p.iterdir()):
                if not child.name.startswith("."):
                    visit(child, depth + 1)

    for p in map(Path, paths):
        if not p.exists():
            raise GradcheckError(f"{p} does not exist; give run folders or folders holding them")
        visit(p, 0)
    for name in ("runs", "pag", "surveys", "accuracy", "stages"):
        unique = {p.resolve(): p for p in getattr(found, name)}
        setattr(found, name, sorted(unique.values()))
    return found


def read_run(folder: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """(run table row, per-step statistics) of one run folder."""
    config = load_json(folder / "config.json")
    metrics = load_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    run_id = str(metrics.get("run_id") or config.get("run_id") or folder.name)
    if (folder / "steps.parquet").is_file():
        stats = T.step_stats(_steps(folder))
    else:  # a compact record: the summaries themselves
        stats = pd.read_parquet(folder / RECORD_STEPS).astype({"mean": float, "std": float})
    stats.insert(0, "run_id", run_id)
    return T.run_row(run_id, folder, config, metrics, stats), stats


def _steps(folder: Path) -> pd.DataFrame:
    schema = pq.read_schema(folder / "steps.parquet")
    cols = [c for c in ("step", "t", *T.STEP_QUANTITIES) if c in schema.names]
    return pd.read_parquet(folder / "steps.parquet", columns=cols)


def write_records(runs: Sequence[Path], out: str | Path, overwrite: bool = False) -> list[Path]:
    """A compact record of each run folder under ``out/<run id>/``, enough to render the report
    again: config.json, metrics.json, samples.png and :data:`RECORD_STEPS` (float32)."""
    written = []
    for folder in runs:
        folder = Path(folder)
        if not (folder / "steps.parquet").is_file():
            raise GradcheckError(f"{folder} is not a run folder (no steps.parquet)")
        final = Path(out) / folder.name
        with atomic_output_dir(final, overwrite=overwrite) as tmp:
            for name in ("config.json", "metrics.json"):  # paths inside the repository as
                if (folder / name).is_file():           # relative ones: records travel
                    text = (folder / name).read_text(encoding="utf-8")
                    (tmp / name).write_text(text.replace(f"{_REPO_ROOT}{os.sep}", ""),
                                            encoding="utf-8")
            if (folder / "samples.png").is_file():
                shutil.copy2(folder / "samples.png", tmp / "samples.png")
            stats = T.step_stats(_steps(folder)).astype({"mean": "float32", "std": "float32"})
            stats.to_parquet(tmp / RECORD_STEPS, index=False, compression="zstd")
        written.append(final)
    return written


def load_runs(folders: Sequence[Path], progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(run table, step statistics of all runs) of run folders; see tables.RUN_COLUMNS."""
    rows, stats = [], []
    for folder in tqdm(folders, desc="read runs", disable=not progress, leave=False):
        row, s = read_run(folder)
        rows.append(row)
        stats.append(s)
    runs = T.runs_frame(rows)
    if runs["run_id"].duplicated().any():
        dup = runs.loc[runs["run_id"].duplicated(), "run_id"].iloc[0]
        raise GradcheckError(f"run id {dup} appears in two folders; give each run once")
    stats_df = pd.concat(stats, ignore_index=True).merge(
        runs[["run_id", "config", "label"]], on="run_id")
    return runs, stats_df


def _accuracy_files(runs: pd.DataFrame, inputs: Inputs) -> list[Path]:
    """accuracy_by_t.parquet files of the classifiers the runs used, plus any found in inputs."""
    from gradcheck.paths import default_classifier

    files = list(inputs.accuracy)
    for c in runs["classifier"].unique():
        folder = Path(c) if ("/" in c or "\\" in c) else default_classifier(c)
        if (folder / "accuracy_by_t.parquet").is_file():
            files.append(folder / "accuracy_by_t.parquet")
    return sorted({f.resolve() for f in files})


def read_accuracy(files: Sequence[Path]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Concatenated accuracy_by_t tables with a ``classifier`` column, and each folder's config."""
    frames, configs = [], []
    for f in files:
        df = pd.read_parquet(f)
        config = load_json(f.parent / "config.json") if (f.parent / "config.json").is_file() \
            else {}
        name = str(config.get("kind") or (df["kind"].iloc[0] if "kind" in df and len(df)
                                          else f.parent.name))
        frames.append(df.assign(classifier=name))
        configs.append({"classifier": name, **config})
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), configs


def read_pag(files: Sequence[Path]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Concatenated pag.parquet tables and each file's metadata (config, versions, hardware)."""
    frames, metas = [], []
    for f in files:
        table = pq.read_table(f)
        frames.append(table.to_pandas())
        raw = (table.schema.metadata or {}).get(b"gradcheck")
        metas.append(json.loads(raw) if raw else {})
    return pd.concat(frames, ignore_index=True), metas


def read_survey(folder: Path) -> dict[str, pd.DataFrame]:
    """The tables `gradcheck survey analyze` wrote to ``folder``."""
    from gradcheck.survey import RESULT_TABLES

    return {k: pd.read_parquet(folder / f"survey_{k}.parquet") for k in RESULT_TABLES
            if (folder / f"survey_{k}.parquet").is_file()}


# ---- The report as data: sections of blocks -----------------------------------------------------


@dataclass
class Block:
    """One piece of a section: text (light markdown), note, table, figure or findings."""

    kind: str
    text: str = ""
    name: str = ""
    table: pd.DataFrame | None = None  # what is shown
    data: pd.DataFrame | None = None  # what goes to tables/<name>.csv
    figure: Figure | None = None


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def add_table(self, name: str, shown: pd.DataFrame, data: pd.DataFrame | None = None,
                  caption: str = "") -> None:
        self.blocks.append(Block("table", caption, name, shown, shown if data is None else data))

    def add_figure(self, name: str, figure: Figure, caption: str) -> None:
        self.blocks.append(Block("figure", caption, name, figure=figure))


def _samples(path: str, n: int = 16) -> np.ndarray:
    """The first ``n`` samples (n, H, W, 3) uint8 of a run folder or record."""
    from gradcheck.runner import SAMPLES_PER_ROW

    folder = Path(path)
    for name in ("samples.npy", RECORD_SAMPLES):
        if (folder / name).is_file():
            return np.asarray(np.load(folder / name, mmap_mode="r", allow_pickle=False)[:n])
    from PIL import Image

    count = int(T.lookup(load_json(folder / "config.json"), "num_samples"))
    width = Image.open(folder / "samples.png").size[0]  # per image: size + a 2-pixel gutter
    size = (width - 2) // min(count, SAMPLES_PER_ROW) - 2
    return read_image_grid(folder / "samples.png", min(n, count), size, SAMPLES_PER_ROW)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


@dataclass
class _Data:
    """Everything the sections are built from."""

    inputs: Inputs
    runs: pd.DataFrame  # tables.RUN_COLUMNS + config, label
    pooled: pd.DataFrame  # step statistics pooled over seeds, by config and label
    protocol: dict[str, Any]  # the Table 1 protocol
    proto_runs: pd.DataFrame  # the runs measured under it


def _overview(d: _Data) -> Section:
    sec = Section("Overview")
    configs = [load_json(Path(p) / "config.json") for p in d.runs["path"]]
    versions = sorted({str(T.lookup(c, "gradcheck") or "?") for c in configs})
    commits = sorted({str(T.lookup(c, "git_commit"))[:10] for c in configs
                      if T.lookup(c, "git_commit")})
    sec.text(f"{len(d.runs)} runs in {d.runs['config'].nunique()} configurations. "
             f"{T.provenance(d.runs)}.")
    sec.text(f"gradcheck {', '.join(versions)}"
             + (f", git commit {', '.join(commits)}" if commits else "")
             + f"; report by gradcheck {gradcheck.__version__}.")
    return sec


def _stages(d: _Data) -> Section:
    """The hardware, command and wall time of every stage that made the runs (stages.csv)."""
    sec = Section("How these runs were made")
    if not d.inputs.stages:
        sec.note("No stages.csv among the inputs: each run's hardware and wall time are in the "
                 "run index below.")
        return sec
    stages = pd.concat([pd.read_csv(f) for f in d.inputs.stages], ignore_index=True)
    shown = stages.assign(wall=[f"{w / 60:.1f} min" for w in stages["wall_s"]])[
        ["stage", "command", "started_utc", "wall", "cpu", "cores", "result"]]
    total = stages["wall_s"].sum() / 3600
    sec.text(f"{len(stages)} stages, {total:.1f} h of wall time in all, on "
             + "; ".join(f"{c} ({n} cores)" for c, n in
                         stages[["cpu", "cores"]].drop_duplicates().itertuples(index=False))
             + ". Stages that found every run already recorded are not listed.")
    sec.add_table("stages", shown, stages)
    return sec


def _table1(d: _Data) -> Section:
    sec = Section("Table 1: our runs beside GradCheck (Vaeth 2024)")
    p = d.protocol
    norm = "normalised (D5)" if p["normalize"] else "unnormalised"
    sec.text(f"Our protocol: s = {p['scale']:g}, {norm}, target {p['target']}, {p['steps']} "
             f"sampling steps, N = {p['num_samples']} samples per run. "
             f"{T.provenance(d.proto_runs)}.")
    sec.text(f"Paper: {PAPER_PROTOCOL}.")
    sec.text("Ours: mean and [95% t-interval] over seeds; a configuration with one seed shows "
             "its run's own 95% interval (exact binomial for accuracies, bootstrap for KID; none "
             "for FID). Differences are ours - paper. "
             "FID at N = 64 is rank-deficient and biased (docs/metrics.md): compare at equal N, "
             "read KID beside it. Accuracy 'guiding' is the paper's number (the classifier grades "
             "its own guidance); the judge is an independent classifier.")
    extractors = set(d.proto_runs["extractor"].dropna())
    if extractors and not any("inception" in str(e) for e in extractors):
        sec.note(f"Our FIDs use {', '.join(sorted(extractors))} features, the paper's "
                 "Inception-v3: compare orderings and differences between rows, not absolute "
                 "values.")
    if d.proto_runs["fid"].isna().all():
        sec.note("These runs have no metrics (made with --no-metrics): only cos_prev is ours; "
                 "`gradcheck metrics RUN` adds them.")
    t1 = T.table1(d.runs, d.protocol)
    differ = sorted({v for v in t1.loc[t1["in_paper"], "protocol_vs_paper"] if v})
    if differ:
        sec.note("\u2020 These rows were measured under another protocol than the paper's "
                 f"(1,000 steps, N = 64, 64x64, s = 1): {'; '.join(differ)}. Their differences to "
                 "the paper's numbers are not like-for-like comparisons.")
    sec.add_table("table1", T.format_table1(t1), t1)
    return sec


def _findings(d: _Data) -> Section:
    sec = Section("Findings")
    sec.text("Each claim is tested on the runs at the Table 1 protocol with the rule stated. "
             "Accuracy is the judge's when every run has it, else the guiding classifier's.")
    found = T.findings(d.runs, d.pooled, d.protocol)
    sec.blocks.append(Block("findings", name="findings", table=found, data=found))
    return sec


def _stability(d: _Data) -> Section:
    """cos_prev over t: plain guidance per classifier, then each one's configurations."""
    sec = Section("Gradient stability: cos_prev over t (D7)")
    pr = d.proto_runs
    plain = pr[~pr["x0_estimate"] & (pr["stabilizer"] == "none")]
    if plain["classifier"].nunique() >= 2:
        sec.add_figure("cos_prev_baseline", F.cos_prev_figure(
            d.pooled[d.pooled["config"].isin(plain["config"])],
            "cos_prev over t: plain guidance by classifier (paper Figure 1)",
            T.provenance(plain)),
            "Plain guidance (no x0-estimate, no stabiliser) of each classifier. Mean over samples "
            "(all seeds pooled) with a +-1 std band, as in GradCheck Figure 1.")
    paper_fig = {"nonrobust": "Figure 2", "robust": "Figures 3 and 6"}
    for c in sorted(pr["classifier"].unique()):
        r = pr[pr["classifier"] == c]
        if r["config"].nunique() < 2:
            continue
        ref = f" (paper {paper_fig[c]})" if c in paper_fig else ""
        name = T.classifier_name(c)
        sec.add_figure(f"cos_prev_{_slug(Path(c).name)}", F.cos_prev_figure(
            d.pooled[d.pooled["config"].isin(r["config"])],
            f"cos_prev over t: {name} guidance{ref}", T.provenance(r)),
            f"Every configuration of the {name} classifier at the Table 1 protocol: left the "
            "applied vector (what the paper plots), right the raw gradient.")
    if not sec.blocks:
        sec.note("Fewer than two configurations at the Table 1 protocol: no comparison figure.")
    return sec


def _norms(d: _Data) -> Section:
    sec = Section("Guidance norms and alignment with the score over t")
    sec.add_figure("norms", F.norms_figure(
        d.pooled[d.pooled["config"].isin(d.proto_runs["config"])],
        "Guidance norms and cos(applied, score) over t", T.provenance(d.proto_runs)),
        "Norms of the raw gradient, the applied vector and the score (D1), and the cosine of "
        "the applied vector with the score; mean +- std over samples.")
    return sec


def _sample_grids(d: _Data) -> Section:
    sec = Section("Samples per configuration (paper Figures 7-8)")
    for c in sorted(d.proto_runs["classifier"].unique()):
        r = d.proto_runs[d.proto_runs["classifier"] == c].sort_values(["label", "seed"])
        first = r.groupby("label", sort=True).head(1)
        images = {f"{row.label} (seed {row.seed})": _samples(row.path)
                  for row in first.itertuples()}
        name = T.classifier_name(c)
        sec.add_figure(f"samples_{_slug(Path(c).name)}", F.samples_figure(
            images, f"Samples: {name} guidance", T.provenance(first)),
            f"First 16 samples of the lowest seed of each {name} configuration (all samples: "
            "samples.png in each run folder).")
    return sec


def _scales(d: _Data) -> Section:
    sec = Section("Guidance scale sweep (GradCheck App. C.1, Kawar et al. Table 5)")
    curves = T.scale_curves(d.runs)
    if len(curves) == 0:
        sec.note("No configuration was run at two or more scales "
                 "(`gradcheck sweep --grid scales`).")
        return sec
    keys = [k for k in T.CONFIG_KEYS if k != "scale"]
    in_curves = d.runs.merge(curves[keys].drop_duplicates(), on=keys)
    sec.add_figure("scale_sweep", F.scale_figure(
        curves, "FID and accuracy vs guidance scale", T.provenance(in_curves)),
        "Mean and 95% t-interval over seeds at each scale.")
    shown = curves[["curve", "scale", "n_seeds"]].copy()
    for m, pct, digits in (("fid", False, 2), ("kid_mean", False, 4),
                           ("accuracy_guiding", True, 1), ("accuracy_judge", True, 1),
                           ("mean_cos_prev_applied", False, 3)):
        shown[m] = [T.fmt_interval(a, lo, hi, pct, digits) for a, lo, hi in
                    curves[[m, f"{m}_ci_low", f"{m}_ci_high"]].itertuples(index=False, name=None)]
    sec.add_table("scale_sweep", shown, curves)
    best = []
    for r in T.best_scales(curves).to_dict("records"):
        m = "accuracy_judge" if pd.notna(r["accuracy_judge"]) else "accuracy_guiding"
        acc = T.fmt_interval(r[m], r[f"{m}_ci_low"], r[f"{m}_ci_high"], percent=True)
        best.append(f"{r['curve']} s = {r['scale']:g} ({acc}, FID {r['fid']:.1f})")
    same = {k: v for k, v in d.protocol.items() if k != "scale"}  # e.g. no --normalize-to eps
    rank = T.scale_ranking(T.at_protocol(curves, same))
    text = ("Best scale of each configuration by judge accuracy (ties: lower FID): "
            f"{'; '.join(best)}.")
    if len(rank):
        text += (f" Mean judge accuracy over the {int(rank['n_curves'].iloc[0])} configurations "
                 f"run at all {len(rank)} scales under Table 1's protocol: " + ", ".join(
                     f"s = {r.scale:g}: {100 * r.accuracy:.1f}%"
                     for r in rank.sort_values("scale").itertuples())
                 + f"; highest at s = {rank['scale'].iloc[0]:g}.")
    if d.protocol:
        text += f" Table 1 here is at s = {d.protocol['scale']:g}."
    sec.text(text)
    # Sample grids only for sweeps (3+ scales): a configuration at two scales (Table 1 at the
    # study's scale and at the paper's) shows its Table 1 samples under "Samples per
    # configuration"; every run's samples.png stays in its record.
    for name, r in in_curves.assign(curve=T.method_names(in_curves)).groupby("curve"):
        first = r.sort_values(["scale", "seed"]).groupby("scale").head(1)
        if len(first) < 3:
            continue
        images = {f"s = {row.scale:g} (seed {row.seed})": _samples(row.path)
                  for row in first.itertuples()}
        sec.add_figure(f"samples_scales_{_slug(name)}", F.samples_figure(
            images, f"Samples vs guidance scale: {name}", T.provenance(first)),
            f"First 16 samples of the lowest seed at each scale: {name}.")
    return sec


def _classifiers(d: _Data) -> Section:
    sec = Section("Classifier accuracy vs t")
    acc, configs = read_accuracy(_accuracy_files(d.runs, d.inputs))
    if not {"t", "accuracy"} <= set(acc.columns):
        sec.note("No accuracy_by_t.parquet found next to the runs' classifiers "
                 "(`gradcheck train-classifier` writes it).")
        return sec
    by_t = acc[acc["t"].notna()]
    if "attack" in by_t.columns:
        by_t = by_t[by_t["attack"].fillna("none") == "none"]
    n = sorted(set(by_t["n"].dropna().astype(int))) if "n" in by_t else []
    hardware = sorted({str(h) for c in configs if (h := T.lookup(c, "hardware")) is not None})
    wall = [float(w) for c in configs if (w := T.lookup(c, "train_wall_s")) is not None]
    seeds = sorted({str(s) for c in configs if (s := T.lookup(c, "eval_seed")) is not None})
    footer = (f"N = {', '.join(map(str, n)) or '?'} validation images per t; evaluation seeds "
              f"{', '.join(seeds) or 'not recorded'}; extractor: not applicable; hardware "
              f"{'; '.join(hardware) or 'not recorded'}; training time "
              + (f"{sum(wall):.0f} s" if wall else "not recorded"))
    sec.add_figure("accuracy_by_t", F.accuracy_by_t_figure(
        by_t, "Classifier accuracy on noised validation images vs t", footer),
        "Inputs: x_t (the noisy latent) and x0_hat (the DDPM's x0-estimate of it, D2) where "
        "evaluated. Dotted line: chance (25%).")
    sec.add_table("accuracy_by_t", T.accuracy_pivot(by_t), by_t.reset_index(drop=True),
                  caption="Accuracy (fraction) by noise level t, classifier and input.")
    ours = [{"classifier": c["classifier"], "input": inp,
             "accuracy": float(v) if (v := T.lookup(c, key)) is not None else math.nan}
            for c in configs for inp, key in (("clean", "clean_val_accuracy"),
                                              ("noisy latents", "noisy_val_accuracy"))]
    cmp = pd.DataFrame(ours).merge(PAPER_CLASSIFIER_ACCURACY, how="left",
                                   on=["classifier", "input"])
    cmp["diff"] = cmp["accuracy"] - cmp["paper_accuracy"]
    sec.add_table("classifier_accuracy", cmp,
                  caption="Validation accuracy, ours beside GradCheck §3.3 (fractions).")
    return sec


def _gradient_quality(d: _Data) -> Section:
    sec = Section("Gradient quality: oracle and PAG (D8, D9)")
    ora = d.pooled[(d.pooled["quantity"] == "cos_oracle")
                   & d.pooled["config"].isin(d.proto_runs["config"])]
    if len(ora):
        with_ora = d.proto_runs[d.proto_runs["config"].isin(ora["config"])]
        sec.add_figure("cos_oracle", F.oracle_figure(
            ora, "Alignment with the exact guidance gradient over t", T.provenance(with_ora)),
            "cos(applied vector, exact gradient of the empirical posterior, D8); "
            f"N = {int(ora['n'].max())} samples per configuration at each of "
            f"{ora['t'].nunique()} t (by default a CPU run computes it for its first 8 samples "
            "at every 10th step).")
    else:
        sec.note("No run recorded cos_oracle (runs made with --no-cos-oracle or without the "
                 "training set).")
    if not d.inputs.pag:
        sec.note("No pag.parquet found (`gradcheck pag` writes report/pag/).")
        return sec
    pag, metas = read_pag(d.inputs.pag)
    if not {"classifier", "t", "pag_score_mean", "n_images"} <= set(pag.columns):
        sec.note(f"pag.parquet lacks the columns classifier, t, pag_score_mean, n_images: "
                 f"{sorted(pag.columns)}")
        return sec
    by_t = F.pag_by_t(pag)
    seeds = sorted({str(T.lookup(m, "seed")) for m in metas})
    hardware = sorted({str(T.lookup(m, "hardware")) for m in metas})
    footer = (f"N = {int(by_t['n_images'].max())} images per classifier and t; seeds "
              f"{', '.join(seeds)}; extractor: not applicable; {'; '.join(hardware)}; wall "
              "time not recorded by `gradcheck pag`")
    sec.add_figure("pag", F.pag_figure(pag, "PAG score vs t per classifier", footer),
                   "Gradient energy inside the ball over outside (D9): the median over each "
                   "class's images, averaged over classes (log axis; 1 = no preference for the "
                   "object). The table gives the mean beside it: at small t a few images with "
                   "almost no energy off the ball dominate the oracle's mean.")
    sec.add_table("pag", by_t, pag)
    return sec


def _survey(d: _Data) -> Section:
    if not d.inputs.surveys:
        sec = Section("Pairwise preference survey")
        sec.note("No survey analysis found (`gradcheck survey analyze` writes survey/analysis/).")
        return sec
    sec = Section("Pairwise preference survey (Kawar et al. Table 2)")
    for folder in d.inputs.surveys:
        res = read_survey(folder)
        s = res["split"].iloc[0]
        sec.text(f"Survey `{s['survey_id']}`: A = `{s['run_a']}`, B = `{s['run_b']}`, "
                 f"{s['n_raters']} raters, {s['n_votes']} votes on {s['n_pairs_rated']} of "
                 f"{s['n_pairs']} pairs; votes A {s['share_a']:.1%}, B {s['share_b']:.1%}, "
                 f"same {s['share_same']:.1%}.")
        sec.add_table(f"survey_{_slug(s['survey_id'])}", res["table"],
                      caption="Share of pairs where A, B or neither is preferred, by threshold.")
        if "tests" in res:
            sec.add_table(f"survey_tests_{_slug(s['survey_id'])}", res["tests"],
                          caption="Exact two-sided binomial tests of A vs B.")
    return sec


def _run_index(d: _Data) -> Section:
    sec = Section("All runs")
    cols = ["run_id", "label", "seed", "fid", "kid_mean", "accuracy_guiding", "accuracy_judge",
            "mean_cos_prev_applied", "mean_cos_oracle", "n_cos_oracle", "grad_vanished_frac",
            "extractor", "hardware", "wall_time_s"]
    sec.add_table("runs", d.runs[cols], d.runs,
                  caption="grad_vanished_frac: the share of (sample, step) pairs whose gradient "
                  "was exactly 0 or not finite, so that no guidance was applied there (D5).")
    return sec


SECTIONS = (_overview, _stages, _table1, _findings, _stability, _norms, _sample_grids, _scales,
            _classifiers, _gradient_quality, _survey, _run_index)
"""The report's sections in order; optional ones leave a one-line note when inputs are missing."""


def build_report(inputs: Inputs, progress: bool = True,
                 scale: float | None = None) -> list[Section]:
    """All sections of the report, tables and figures in memory (nothing is written); ``scale``:
    Table 1's guidance scale (default: :func:`~gradcheck.report.tables.table1_protocol`'s)."""
    if not inputs.runs:
        raise GradcheckError("no run folders found; a run folder holds config.json and "
                             "steps.parquet (make runs with `gradcheck run` or `gradcheck sweep`)")
    runs, stats = load_runs(inputs.runs, progress)
    protocol = T.table1_protocol(runs, scale)
    data = _Data(inputs, runs, T.pool_step_stats(stats, ["config", "label"]), protocol,
                 T.at_protocol(runs, protocol))
    return [make(data) for make in SECTIONS]


# ---- Writing ------------------------------------------------------------------------------------


def _inline_html(text: str) -> str:
    """Escape, then the two markdown marks the report uses: `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    """Floats rounded for display."""
    return df.apply(lambda c: c.map(lambda v: f"{v:.4g}" if isinstance(v, float)
                                    and not math.isnan(v) else ("-" if isinstance(v, float)
                                                               else v)))


PNG_DPI = 80
PNG_COLOURS = 256
"""Figure PNGs are 256-colour previews, so that report.html stays small; the PDFs are exact."""


def _png_bytes(fig: Figure) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    image = Image.open(buf).convert("RGB").quantize(PNG_COLOURS, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return out.getvalue()


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
.note { color: #666; font-style: italic; }
.verdict-holds { color: #17672d; font-weight: bold; }
.verdict-does-not-hold { color: #a01818; font-weight: bold; }
.verdict-inconclusive { color: #8a5a00; font-weight: bold; }
.verdict-not-testable-with-these-runs { color: #777; font-weight: bold; }
figcaption { font-size: 0.85em; color: #444; }
code { background: #f5f5f5; padding: 0 2px; }
"""


def write_report(sections: Sequence[Section], folder: Path) -> None:
    """Write report.md, report.html, figures/ and tables/ into ``folder`` (a temporary one)."""
    (folder / "figures").mkdir()
    (folder / "tables").mkdir()
    md = ["# gradcheck report", ""]
    doc = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           "<title>gradcheck report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>gradcheck report</h1>"]
    for sec in sections:
        md += [f"## {sec.title}", ""]
        doc.append(f"<h2>{html.escape(sec.title)}</h2>")
        for b in sec.blocks:
            if b.kind in ("text", "note"):
                md += [b.text if b.kind == "text" else f"*{b.text}*", ""]
                attr = ' class="note"' if b.kind == "note" else ""
                doc.append(f"<p{attr}>{_inline_html(b.text)}</p>")
            elif b.kind == "table":
                assert b.table is not None and b.data is not None
                b.data.to_csv(folder / "tables" / f"{b.name}.csv", index=False)
                if b.text:
                    md += [b.text, ""]
                    doc.append(f"<p>{_inline_html(b.text)}</p>")
                md += [T.to_markdown(b.table), "", f"(tables/{b.name}.csv)", ""]
                doc.append(_shown(b.table).to_html(index=False, escape=True, border=0))
            elif b.kind == "figure":
                assert b.figure is not None
                png = _png_bytes(b.figure)
                (folder / "figures" / f"{b.name}.png").write_bytes(png)
                # The layout is settled by the PNG; freezing it halves the cost of the PDF.
                b.figure.set_layout_engine("none")
                b.figure.savefig(folder / "figures" / f"{b.name}.pdf",
                                 metadata={"CreationDate": None})
                md += [f"![{b.name}](figures/{b.name}.png)", "", b.text,
                       f"([PDF](figures/{b.name}.pdf))", ""]
                uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                doc.append(f"<figure><img alt=\"{html.escape(b.name)}\" src=\"{uri}\">"
                           f"<figcaption>{_inline_html(b.text)}</figcaption></figure>")
            elif b.kind == "findings":
                assert b.table is not None
                b.table.to_csv(folder / "tables" / "findings.csv", index=False)
                doc.append("<ol>")
                for r in b.table.itertuples():
                    md += [f"**Finding {r.finding}** ({r.source}): {r.claim}", "",
                           f"- Verdict: **{r.verdict}**", f"- Test: {r.test}",
                           f"- Numbers: {r.evidence}"]
                    md += [f"- At this scale: {r.scale_note}", ""] if r.scale_note else [""]
                    doc.append(
                        f"<li><p><b>Finding {html.escape(r.finding)}</b> "
                        f"({html.escape(r.source)}): {_inline_html(r.claim)}</p><ul>"
                        f"<li>Verdict: <span class=\"verdict-{_slug(r.verdict)}\">"
                        f"{html.escape(r.verdict)}</span></li>"
                        f"<li>Test: {_inline_html(r.test)}</li>"
                        f"<li>Numbers: {_inline_html(r.evidence)}</li>"
                        + (f"<li>At this scale: {_inline_html(r.scale_note)}</li>"
                           if r.scale_note else "") + "</ul></li>")
                doc.append("</ol>")
    doc.append("</body></html>")
    (folder / "report.md").write_text("\n".join(md), encoding="utf-8")
    (folder / "report.html").write_text("\n".join(doc) + "\n", encoding="utf-8")


REPORT_ENTRIES = ("report.md", "report.html", "figures", "tables", "inputs.json")
"""What the report writes into ``out``; anything else there is carried over."""


def default_extras(out: str | Path) -> list[Path]:
    """The default outputs of `gradcheck pag` and `survey analyze` that exist."""
    return [p for p in (Path(out) / "pag", Path("survey") / "analysis") if p.is_dir()]


def render_report(
    runs: Sequence[str | Path] = ("runs",), out: str | Path = "report", overwrite: bool = False,
    progress: bool = True, scale: float | None = None,
) -> Path:
    """Build the report of the runs (and extras) at or below ``runs`` and write it to ``out``."""
    from gradcheck.utils import check_output

    out = check_output(out, overwrite, folder=True)
    inputs = find_inputs([*runs, *default_extras(out)])
    for r in inputs.runs:  # records beside the report (out/records) are kept; its own parts not
        if out.resolve() in r.resolve().parents and \
                r.resolve().relative_to(out.resolve()).parts[0] in REPORT_ENTRIES:
            raise GradcheckError(f"run {r} lies inside the output folder {out}'s report files; "
                                 "choose another --out")
    sections = build_report(inputs, progress, scale)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if out.is_dir():
            for child in out.iterdir():
                if child.name not in REPORT_ENTRIES and not child.name.startswith("."):
                    copy = shutil.copytree if child.is_dir() else shutil.copy2
                    copy(child, tmp / child.name)
        write_report(sections, tmp)
        (tmp / "inputs.json").write_text(json.dumps(
            {k: [str(p) for p in getattr(inputs, k)] for k in ("runs", "pag", "surveys",
                                                              "accuracy")}, indent=2) + "\n")
    return out
