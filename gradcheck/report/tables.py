"""Report tables: pure functions from the run table (``RUN_COLUMNS``) and step statistics
(:func:`step_stats`) to table DataFrames; intervals are over seeds (docs/metrics.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradcheck.metrics import seed_interval
from gradcheck.report.paper import FINDINGS, PAPER_TABLE1, TABLE1_KEYS
from gradcheck.utils import GradcheckError

CONFIG_KEYS = (
    "classifier", "x0_estimate", "stabilizer", "normalize", "scale", "target", "steps",
    "num_samples", "normalize_to", "diffusion_time", "log_prob", "image_size", "results_version",
)
"""Run-config fields that make a configuration: runs equal in these differ only by seed."""

PROTOCOL_KEYS = ("scale", "normalize", "target", "steps", "num_samples", "normalize_to",
                 "diffusion_time", "log_prob", "image_size", "results_version")
"""Fields shared by all rows of one Table 1 (the measurement protocol)."""
VARIANT_DEFAULTS = {"normalize_to": "score", "diffusion_time": True, "log_prob": "log-softmax",
                    "results_version": 1}
"""Settings added after the first runs: runs that predate them had these values."""

RUN_INTERVALS = {"accuracy_guiding": "accuracy_guiding_ci", "accuracy_judge": "accuracy_judge_ci",
                 "kid_mean": "kid_ci"}
"""Metrics whose single run carries its own 95% interval (shown for one seed)."""

METRIC_COLUMNS = (
    "fid", "kid_mean", "kid_std", "precision", "recall", "accuracy_guiding", "accuracy_judge",
    "mean_cos_prev_raw", "mean_cos_prev_applied", "mean_cos_prev_null", "max_x_norm_ratio",
    "grad_vanished_frac", "mean_cos_oracle", "n_cos_oracle",
    *(f"{p}_{end}" for p in RUN_INTERVALS.values() for end in ("low", "high")),
)
"""Per-run numbers from metrics.json (NaN when a run has no metrics)."""

RUN_COLUMNS = (
    "run_id", "path", "seed", *CONFIG_KEYS, *METRIC_COLUMNS, "extractor", "n_samples",
    "n_reference", "reference_split", "hardware", "wall_time_s",
)
PAPER_PROTOCOL_SIZES = {"steps": 1000, "num_samples": 64, "image_size": 64, "scale": 1.0}
"""GradCheck's protocol (sizes and s): rows measured otherwise are marked wherever they meet its
numbers."""

STEP_QUANTITIES = (
    "cos_prev_raw", "cos_prev_applied", "cos_raw_applied", "cos_score", "cos_oracle",
    "grad_norm_raw", "grad_norm_applied", "score_norm", "log_prob_target", "prob_target_x0",
    "cos_prev_null", "x_norm_ratio",
)
"""steps.parquet columns summarised over samples at every step (docs/formats.md)."""

TABLE1_METRICS = (
    "fid", "kid_mean", "accuracy_guiding", "accuracy_judge", "mean_cos_prev_applied",
    "mean_cos_prev_raw", "mean_cos_prev_null",
)
PROPORTIONS = ("accuracy_guiding", "accuracy_judge")
"""Metrics that are shares: their intervals over seeds are clipped to [0, 1]."""


# ---- Statistics ---------------------------------------------------------------------------------


def interval(values: Iterable[float], proportion: bool = False) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval over seeds of the finite values (all NaN when none
    is), clipped to [0, 1] for a ``proportion``."""
    x = [float(v) for v in values if v is not None and np.isfinite(v)]
    mean, low, high = seed_interval(x) if x else (math.nan, math.nan, math.nan)
    if proportion and np.isfinite(low):
        low, high = max(low, 0.0), min(high, 1.0)
    return mean, low, high


def metric_interval(runs: pd.DataFrame, metric: str) -> tuple[float, float, float]:
    """(mean, low, high) of ``metric`` over one configuration's seeds (:data:`RUN_INTERVALS`)."""
    have = runs[runs[metric].notna()] if metric in runs else runs.iloc[:0]
    own = RUN_INTERVALS.get(metric)
    if len(have) == 1 and own and f"{own}_low" in have:
        r = have.iloc[0]
        return float(r[metric]), float(r[f"{own}_low"]), float(r[f"{own}_high"])
    return interval(have[metric] if len(have) else [], metric in PROPORTIONS)


def step_stats(steps: pd.DataFrame) -> pd.DataFrame:
    """steps.parquet rows (sample x step) -> per (step, t, quantity): n, mean, std over samples
    (ddof 0, so that :func:`pool_step_stats` merges runs exactly)."""
    present = [q for q in STEP_QUANTITIES if q in steps.columns]
    long = steps.melt(id_vars=["step", "t"], value_vars=present, var_name="quantity").dropna(
        subset=["value"]
    )
    g = long.groupby(["step", "t", "quantity"])["value"]
    return pd.DataFrame({"n": g.count(), "mean": g.mean(), "std": g.std(ddof=0)}).reset_index()


def pool_step_stats(stats: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Merge the :func:`step_stats` of several runs (plus ``by`` columns) into one per step."""
    keys = [*by, "step", "t", "quantity"]
    s = stats.assign(_sum=stats["n"] * stats["mean"],
                     _sq=stats["n"] * (stats["std"] ** 2 + stats["mean"] ** 2))
    g = s.groupby(keys, dropna=False)[["n", "_sum", "_sq"]].sum().reset_index()
    g["mean"] = g["_sum"] / g["n"]
    g["std"] = np.sqrt(np.maximum(g["_sq"] / g["n"] - g["mean"] ** 2, 0.0))
    return g.drop(columns=["_sum", "_sq"])


# ---- Runs and configurations --------------------------------------------------------------------


def lookup(d: dict[str, Any], key: str) -> Any:
    """A value at the top level of ``d`` or one level down (metadata blocks); None if absent."""
    if key in d:
        return d[key]
    for v in d.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None


def run_row(
    run_id: str, path: str | Path, config: dict[str, Any], metrics: dict[str, Any],
    steps_stats: pd.DataFrame,
) -> dict[str, Any]:
    """One run table row from config.json, metrics.json (may be empty) and step statistics."""
    row: dict[str, Any] = {"run_id": run_id, "path": str(path)}
    for k in ("seed", *CONFIG_KEYS):
        row[k] = metrics.get(k, lookup(config, k))
    for k in METRIC_COLUMNS:
        v = metrics.get(k)
        row[k] = float(v) if v is not None else math.nan
    for q in ("cos_prev_raw", "cos_prev_applied", "cos_prev_null"):
        if math.isnan(row[f"mean_{q}"]):
            s = steps_stats[steps_stats["quantity"] == q]
            row[f"mean_{q}"] = (
                float((s["mean"] * s["n"]).sum() / s["n"].sum()) if len(s) else math.nan
            )
    for k, default in VARIANT_DEFAULTS.items():
        row[k] = default if row[k] is None else row[k]
    for k in ("extractor", "reference_split", "n_samples", "n_reference", "image_size"):
        row[k] = metrics.get(k)
    row["hardware"] = metrics.get("hardware") or lookup(config, "hardware")
    wall = metrics.get("wall_time_s", lookup(config, "wall_time_s"))
    row["wall_time_s"] = float(wall) if wall is not None else math.nan
    return row


def runs_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The run table: typed columns, a ``config`` key and a readable ``label`` per run."""
    df = pd.DataFrame(list(rows), columns=list(RUN_COLUMNS)).astype(
        {"x0_estimate": bool, "normalize": bool, "classifier": str, "stabilizer": str})
    for k in ("scale", *METRIC_COLUMNS, "wall_time_s"):
        df[k] = pd.to_numeric(df[k], errors="coerce").astype(float)
    for k in ("seed", "target", "steps", "num_samples", "image_size"):
        df[k] = pd.to_numeric(df[k], errors="coerce").astype("Int64")
    for k, default in VARIANT_DEFAULTS.items():
        df[k] = df[k].where(df[k].notna(), default).astype(type(default))
    df["config"] = df[list(CONFIG_KEYS)].apply(lambda c: c.map(str)).agg("|".join, axis=1)
    df["label"] = config_labels(df)
    return df.sort_values(["label", "seed", "run_id"]).reset_index(drop=True)


def classifier_name(classifier: str) -> str:
    """Display name of a classifier (a path shows as its last folder name)."""
    if "/" in classifier or "\\" in classifier:
        return Path(classifier).name
    return {"nonrobust": "non-robust"}.get(classifier, classifier)


def method_name(classifier: str, x0_estimate: bool, stabilizer: str,
                normalize: bool = True, normalize_to: str = "score") -> str:
    """A guidance method without scale or sizes, e.g. 'non-robust + x0 + adam'."""
    parts = [classifier_name(classifier)]
    if x0_estimate:
        parts.append("x0")
    if stabilizer != "none":
        parts.append(stabilizer)
    if not normalize:
        parts.append("unnormalized")
    elif normalize_to != "score":
        parts.append(f"D5 to {normalize_to}")
    return " + ".join(parts)


def method_names(runs: pd.DataFrame) -> list[str]:
    """:func:`method_name` of every row of a run (or curve) table."""
    keys = [k for k in ("classifier", "x0_estimate", "stabilizer", "normalize", "normalize_to")
            if k in runs]
    return [method_name(*k) for k in runs[keys].itertuples(index=False, name=None)]


def config_labels(runs: pd.DataFrame) -> pd.Series:
    """A short label per run naming its configuration; fields appear only where runs differ."""
    shown = (("scale", "s"), ("target", "target"), ("steps", "T"), ("num_samples", "N"),
             ("normalize_to", "D5 norm"), ("diffusion_time", "D4' diffusion time"),
             ("log_prob", "D3"), ("image_size", "size"), ("results_version", "version"))
    varying = {k: runs[k].nunique(dropna=False) > 1 for k, _ in shown}

    def label(r: pd.Series) -> str:
        text = method_name(r["classifier"], r["x0_estimate"], r["stabilizer"], r["normalize"])
        extra = [f"{short}={r[k]:g}" if k == "scale" else f"{short}={r[k]}"
                 for k, short in shown if varying[k]]
        return f"{text} ({', '.join(extra)})" if extra else text

    return runs.apply(label, axis=1) if len(runs) else pd.Series([], dtype=str)


def provenance(runs: pd.DataFrame) -> str:
    """One line naming N, seeds, extractor, hardware and wall time of the runs behind a result."""
    if len(runs) == 0:
        return "no runs"
    n = sorted(set(runs["num_samples"].dropna().astype(int)))
    seeds = sorted(set(runs["seed"].dropna().astype(int)))
    extractors = sorted(set(runs["extractor"].dropna().astype(str))) or ["no metrics"]
    refs = sorted({f"{int(n)} {split} images" for n, split in
                   runs[["n_reference", "reference_split"]].dropna().itertuples(index=False)})
    hardware = sorted(set(runs["hardware"].dropna().astype(str))) or ["hardware not recorded"]
    wall = runs["wall_time_s"].dropna()
    wall_text = (f"wall time {wall.sum():.0f} s in {len(wall)} runs ({wall.mean():.1f} s/run)"
                 if len(wall) else "wall time not recorded")
    return (f"N = {', '.join(map(str, n))} samples per run; seeds {_ranges(seeds)} ({len(seeds)}); "
            f"extractor {', '.join(extractors)}"
            + (f" against {', '.join(refs)} (reference)" if refs else "")
            + f"; {'; '.join(hardware)}; {wall_text}")


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for v in values:
        if out and isinstance(out[-1], list) and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])  # type: ignore[arg-type]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


# ---- Table 1 ------------------------------------------------------------------------------------


def table1_protocol(runs: pd.DataFrame, scale: float | None = None) -> dict[str, Any]:
    """The protocol (:data:`PROTOCOL_KEYS`) whose runs cover most Table 1 configs; ties go to
    the newest results version, stable D3, normalised, target 0, larger N, more steps, more runs.
    ``scale``: only protocols at that guidance scale."""
    if scale is not None and len(runs):
        at = runs[np.isclose(runs["scale"].astype(float), scale)]
        if len(at) == 0:
            have = ", ".join(f"{s:g}" for s in sorted(set(runs["scale"].dropna())))
            raise GradcheckError(f"no runs at scale {scale:g}; the runs' scales: {have}")
        runs = at
    if len(runs) == 0:
        return {}
    paper = set(PAPER_TABLE1[list(TABLE1_KEYS)].itertuples(index=False, name=None))
    best_key, best_rank = None, None
    for key, g in runs.groupby(list(PROTOCOL_KEYS), dropna=False):
        proto = dict(zip(PROTOCOL_KEYS, key, strict=True))
        covered = set(g[list(TABLE1_KEYS)].itertuples(index=False, name=None)) & paper
        rank = (len(covered), _num(proto["results_version"]), proto["log_prob"] == "stable",
                bool(proto["normalize"]), proto["target"] == 0,
                _num(proto["num_samples"]), _num(proto["steps"]), len(g))
        if best_rank is None or rank > best_rank:
            best_key, best_rank = proto, rank
    return best_key or {}


def _num(v: Any) -> float:
    return -math.inf if v is None or pd.isna(v) else float(v)


def at_protocol(runs: pd.DataFrame, protocol: dict[str, Any]) -> pd.DataFrame:
    """The runs measured under ``protocol``."""
    mask = np.ones(len(runs), dtype=bool)
    for k, v in protocol.items():
        same = runs[k].isna() if pd.isna(v) else (runs[k] == v).fillna(False)
        mask &= same.to_numpy(dtype=bool)
    return runs[mask]


def table1(runs: pd.DataFrame, protocol: dict[str, Any] | None = None) -> pd.DataFrame:
    """GradCheck Table 1 at ``protocol`` beside the paper's: one row per (classifier, x0_estimate,
    stabilizer), the paper's eight first; means and 95% t-intervals; ``*_diff`` = ours - paper."""
    protocol = table1_protocol(runs) if protocol is None else protocol
    sel = at_protocol(runs, protocol)
    rows = []
    for key, g in sel.groupby(list(TABLE1_KEYS)):
        row: dict[str, Any] = dict(zip(TABLE1_KEYS, key, strict=True))
        row["label"] = method_name(*key)
        row["n_seeds"] = int(g["seed"].nunique())
        row["seeds"] = _ranges(sorted(set(g["seed"].dropna().astype(int))))
        for m in TABLE1_METRICS:
            row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = metric_interval(g, m)
        rows.append(row)
    ours = pd.DataFrame(rows, columns=[*TABLE1_KEYS, "label", "n_seeds", "seeds",
                                       *[f"{m}{s}" for m in TABLE1_METRICS
                                         for s in ("", "_ci_low", "_ci_high")]])
    out = PAPER_TABLE1.merge(ours, on=list(TABLE1_KEYS), how="outer")
    out["in_paper"] = out["paper_fid"].notna()
    out["n_seeds"] = out["n_seeds"].fillna(0).astype(int)
    out["seeds"] = out["seeds"].fillna("")
    missing = out["label"].isna()
    out.loc[missing, "label"] = [
        method_name(*k) for k in out.loc[missing, list(TABLE1_KEYS)].itertuples(
            index=False, name=None)
    ]
    out["protocol_vs_paper"] = [
        _protocol_difference(sel[(sel["classifier"] == c) & (sel["x0_estimate"] == x)
                                 & (sel["stabilizer"] == st)])
        for c, x, st in out[list(TABLE1_KEYS)].itertuples(index=False, name=None)]
    out["fid_diff"] = out["fid"] - out["paper_fid"]
    out["accuracy_guiding_diff"] = out["accuracy_guiding"] - out["paper_accuracy"]
    order = {k: i for i, k in enumerate(PAPER_TABLE1[list(TABLE1_KEYS)].itertuples(
        index=False, name=None))}
    out["_order"] = [order.get(k, len(order)) for k in out[list(TABLE1_KEYS)].itertuples(
        index=False, name=None)]
    out = out.sort_values(["_order", "classifier", "x0_estimate", "stabilizer"])
    for k, v in protocol.items():
        out[k] = v
    return out.drop(columns="_order").reset_index(drop=True)


def fmt_interval(mean: float, low: float, high: float, percent: bool = False,
                 digits: int = 2) -> str:
    """'26.64 [24.10, 29.18]', '96.9% [93.0, 100.0]', '26.64' without an interval, '-' if NaN."""
    if mean is None or pd.isna(mean):
        return "-"
    f, d, unit = (100.0, 1, "%") if percent else (1.0, digits, "")
    text = f"{mean * f:.{d}f}{unit}"
    if low is not None and not pd.isna(low):
        text += f" [{low * f:.{d}f}, {high * f:.{d}f}]"
    return text


def _fmt(v: float, percent: bool = False, signed: bool = False) -> str:
    if v is None or pd.isna(v):
        return "-"
    f, d, unit = (100.0, 1, "%") if percent else (1.0, 2, "")
    return f"{v * f:+.{d}f}{unit}" if signed else f"{v * f:.{d}f}{unit}"


def _protocol_difference(runs: pd.DataFrame) -> str:
    """How runs were measured otherwise than GradCheck's protocol ('' when not, or no runs)."""
    shown = {"steps": "{} steps", "num_samples": "N = {}", "image_size": "{0}x{0}",
             "scale": "s = {:g}"}
    parts = []
    for key, want in PAPER_PROTOCOL_SIZES.items():
        have = sorted({float(v) for v in runs[key].dropna()}) if key in runs else []
        if have and have != [want]:
            parts.append(", ".join(shown[key].format(v if key == "scale" else int(v))
                                   for v in have))
    return "; ".join(parts)


def format_table1(t1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as display strings: ours (mean [95% CI]) beside the paper and the difference; a
    row measured under another protocol and its differences carry a dagger."""
    def ci(r: pd.Series, m: str, percent: bool = False, digits: int = 2) -> str:
        return fmt_interval(r[m], r[f"{m}_ci_low"], r[f"{m}_ci_high"], percent, digits)

    rows = []
    for _, r in t1.iterrows():
        differs = bool(r.get("protocol_vs_paper")) and bool(r["in_paper"])
        mark = " †" if differs else ""
        rows.append({
            "configuration": r["label"] + mark,
            "seeds": r["n_seeds"] if r["n_seeds"] else "no runs",
            "FID": ci(r, "fid"),
            "FID (paper)": _fmt(r["paper_fid"]),
            "FID diff": _fmt(r["fid_diff"], signed=True) + mark,
            "KID": ci(r, "kid_mean", digits=4),
            "acc. guiding": ci(r, "accuracy_guiding", percent=True),
            "acc. (paper)": _fmt(r["paper_accuracy"], percent=True),
            "acc. diff": _fmt(r["accuracy_guiding_diff"], percent=True, signed=True) + mark,
            "acc. judge": ci(r, "accuracy_judge", percent=True),
            "mean cos_prev": ci(r, "mean_cos_prev_applied", digits=3),
            "cos_prev null": ci(r, "mean_cos_prev_null", digits=3),
            "protocol vs paper": ("† " + r["protocol_vs_paper"]) if differs else
            ("same" if r["n_seeds"] and r["in_paper"] else "-"),
        })
    return pd.DataFrame(rows)


# ---- Findings -----------------------------------------------------------------------------------


def _select(runs: pd.DataFrame, classifier: str, x0: bool, stabilizer: str) -> pd.DataFrame:
    return runs[(runs["classifier"] == classifier) & (runs["x0_estimate"] == x0)
                & (runs["stabilizer"] == stabilizer)]


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> dict[str, float]:
    """b - a of ``metric`` over seeds both ran (runs sharing a seed share their noise, D6):
    mean_a, mean_b, diff (mean of paired differences), diff_low, diff_high, n."""
    va = a.dropna(subset=[metric]).groupby("seed")[metric].mean()
    vb = b.dropna(subset=[metric]).groupby("seed")[metric].mean()
    seeds = va.index.intersection(vb.index)
    d = (vb[seeds] - va[seeds]).to_numpy()
    diff, low, high = interval(d)
    return {"mean_a": float(va[seeds].mean()) if len(seeds) else math.nan,
            "mean_b": float(vb[seeds].mean()) if len(seeds) else math.nan,
            "diff": diff, "diff_low": low, "diff_high": high, "n": int(len(seeds))}


def _direction(p: dict[str, float], sign: int) -> str:
    """The verdict on 'b - a has the sign ``sign``' from its 95% interval (docs/metrics.md)."""
    if p["n"] < 2 or pd.isna(p["diff_low"]):
        return "inconclusive"
    low, high = (p["diff_low"], p["diff_high"]) if sign > 0 else (-p["diff_high"], -p["diff_low"])
    return "holds" if low > 0 else "does not hold" if high < 0 else "inconclusive"


def _combine(verdicts: Iterable[str]) -> str:
    """All parts hold -> holds; any part does not -> does not hold; else inconclusive."""
    v = list(verdicts)
    return ("does not hold" if "does not hold" in v else
            "holds" if v and all(x == "holds" for x in v) else "inconclusive")


def _accuracy_metric(*groups: pd.DataFrame) -> str:
    """The judge's accuracy when every run has it (the honest number), else the guiding one."""
    if all(len(g) and g["accuracy_judge"].notna().all() for g in groups):
        return "accuracy_judge"
    return "accuracy_guiding"


def _describe(name: str, p: dict[str, float], percent: bool = False) -> str:
    f, d, unit = (100.0, 1, " pts") if percent else (1.0, 2, "")
    text = (f"{name} {p['mean_a'] * f:.{d}f} -> {p['mean_b'] * f:.{d}f} "
            f"(paired diff {p['diff'] * f:+.{d}f}{unit}")
    if p["n"] >= 2:
        text += f", 95% CI [{p['diff_low'] * f:+.{d}f}, {p['diff_high'] * f:+.{d}f}]"
    else:
        text += ", no interval"
    return text + f", {p['n']} seed{'s' if p['n'] != 1 else ''})"


def _comparison(
    a: pd.DataFrame, b: pd.DataFrame, fid_sign: int, acc_sign: int
) -> tuple[str | None, list[str]]:
    """The verdict on b vs a in FID and accuracy, with its numbers; None without a common seed."""
    acc = _accuracy_metric(a, b)
    pf, pa = paired_difference(a, b, "fid"), paired_difference(a, b, acc)
    if pf["n"] == 0 or pa["n"] == 0:
        return None, []
    evidence = [_describe("FID", pf), _describe(acc.replace("_", " "), pa, percent=True)]
    if acc == "accuracy_judge":
        pg = paired_difference(a, b, "accuracy_guiding")
        if pg["n"]:
            evidence.append(_describe("accuracy guiding", pg, percent=True))
    return _combine([_direction(pf, fid_sign), _direction(pa, acc_sign)]), evidence


def _level(mean: float, low: float, high: float, above: float | None = None,
           within: float | None = None) -> str:
    """Verdict on ``mean >= above`` or ``|mean| <= within`` by the 95% interval (or the value)."""
    if pd.isna(low):
        low = high = mean
    if above is not None:
        return "holds" if low >= above else "does not hold" if high < above else "inconclusive"
    assert within is not None
    return ("holds" if -within <= low and high <= within else
            "does not hold" if low > within or high < -within else "inconclusive")


def findings(runs: pd.DataFrame, pooled: pd.DataFrame | None = None,
             protocol: dict[str, Any] | None = None) -> pd.DataFrame:
    """Verdict on each finding of :data:`~gradcheck.report.paper.FINDINGS` with its numbers;
    ``pooled``: :func:`pool_step_stats` by ``config`` (cos_prev's steadiness over t)."""
    protocol = table1_protocol(runs) if protocol is None else protocol
    sel = at_protocol(runs, protocol)
    verdicts: dict[str, tuple[str, str]] = {}
    untestable = "not testable with these runs"

    def need(*groups: tuple[str, bool, str]) -> str | None:
        missing = [method_name(*g) for g in groups if len(_select(sel, *g)) == 0]
        return f"no runs of: {', '.join(missing)}" if missing else None

    def need_metrics(*groups: tuple[str, bool, str]) -> str | None:
        """Like ``need``, and the runs must carry metrics."""
        gap = need(*groups)
        if not gap and any(_select(sel, *g)["fid"].isna().all() for g in groups):
            gap = "runs have no metrics (FID/accuracy)"
        return gap

    # (1) cos_prev: robust high and steady, non-robust near orthogonal.
    gap = need(("robust", False, "none"), ("nonrobust", False, "none"))
    if gap:
        verdicts["1"] = (untestable, gap)
    else:
        r, n = _select(sel, "robust", False, "none"), _select(sel, "nonrobust", False, "none")
        mr = interval(r["mean_cos_prev_applied"])
        mn = interval(n["mean_cos_prev_applied"])
        steady = math.nan
        if pooled is not None and len(pooled):
            s = pooled[(pooled["config"] == r["config"].iloc[0])
                       & (pooled["quantity"] == "cos_prev_applied")]
            steady = float(s["mean"].std(ddof=0)) if len(s) else math.nan
        parts = [_level(*mr, above=0.5), _level(*mn, within=0.2)]
        if not pd.isna(steady):
            parts.append("holds" if steady <= 0.25 else "does not hold")
        null = interval(pd.concat([r["mean_cos_prev_null"], n["mean_cos_prev_null"]]))
        verdicts["1"] = (_combine(parts),
                         f"mean cos_prev robust {fmt_interval(*mr, digits=3)}, non-robust "
                         f"{fmt_interval(*mn, digits=3)} ({r['seed'].nunique()} seed(s)); on "
                         f"random gradients (D7' null) {fmt_interval(*null, digits=3)}; std over "
                         f"t of robust's per-step mean {steady:.3f}")

    # (2) x0-estimate helps non-robust guidance.
    base, x0 = ("nonrobust", False, "none"), ("nonrobust", True, "none")
    gap = need_metrics(base, x0)
    if gap:
        verdicts["2"] = (untestable, gap)
    else:
        v, ev = _comparison(_select(sel, *base), _select(sel, *x0), -1, +1)
        verdicts["2"] = (untestable, "no seed in common") if v is None else (
            v, "non-robust -> + x0: " + "; ".join(ev))

    # (3) x0 + ADAM best for non-robust; ADAM alone changes little.
    configs = [("nonrobust", x, s) for x in (False, True) for s in ("none", "adam")]
    gap = need_metrics(*configs)
    if gap:
        verdicts["3"] = (untestable, gap)
    else:
        best = _select(sel, "nonrobust", True, "adam")
        parts, votes = [], []
        for c in configs[:-1]:
            v, ev = _comparison(_select(sel, *c), best, -1, +1)
            votes.append(v or "inconclusive")
            parts.append(f"{method_name(*c)} -> + x0 + adam: " + "; ".join(ev))
        plain, adam = _select(sel, *configs[0]), _select(sel, *configs[1])
        acc = _accuracy_metric(plain, adam)
        pf, pa = paired_difference(plain, adam, "fid"), paired_difference(plain, adam, acc)
        little = "inconclusive"  # one seed: no interval to hold within the bounds
        if pf["n"] >= 2 and pa["n"] >= 2:
            little = _combine([
                _level(pf["diff"], pf["diff_low"], pf["diff_high"], within=0.1 * abs(pf["mean_a"])),
                _level(pa["diff"], pa["diff_low"], pa["diff_high"], within=0.05)])
        votes.append(little)
        parts.append("ADAM alone: " + _describe("FID", pf) + "; "
                     + _describe(acc.replace("_", " "), pa, percent=True)
                     + f" -> little change: {little}")
        verdicts["3"] = (_combine(votes), " | ".join(parts))

    # (4) x0 + ADAM over-regularises robust guidance.
    base, both = ("robust", False, "none"), ("robust", True, "adam")
    gap = need_metrics(base, both)
    if gap:
        verdicts["4"] = (untestable, gap)
    else:
        a, b = _select(sel, *base), _select(sel, *both)
        v, ev = _comparison(a, b, +1, -1)
        pc = paired_difference(a, b, "mean_cos_prev_applied")
        ev.append("mean cos_prev " + _describe("", pc).strip())
        if "mean_cos_prev_null" in b:
            applied, null = interval(b["mean_cos_prev_applied"]), interval(b["mean_cos_prev_null"])
            ev.append(f"x0 + adam's cos_prev {fmt_interval(*applied, digits=3)} against "
                      f"{fmt_interval(*null, digits=3)} that ADAM gives random gradients "
                      "(D7' null baseline): only the excess is the gradients' own stability")
        verdicts["4"] = (untestable, "no seed in common") if v is None else (
            v, "robust -> + x0 + adam: " + "; ".join(ev))

    verdicts["K"] = _kawar_scales(runs, protocol)
    size = protocol.get("image_size")
    reduced = size is not None and not pd.isna(size) and int(size) != PAPER_PROTOCOL_SIZES[
        "image_size"]  # the CPU scale: say what it may change

    return pd.DataFrame([
        {"finding": f.key, "source": f.source, "claim": f.claim, "test": f.test,
         "verdict": verdicts[f.key][0], "evidence": verdicts[f.key][1],
         "scale_note": f.scale_note if reduced else ""}
        for f in FINDINGS
    ])


def _kawar_scales(runs: pd.DataFrame, protocol: dict[str, Any]) -> tuple[str, str]:
    """Kawar Table 5: adversarial minus non-robust FID, paired by seed, at every scale both were
    run with (plain guidance, D5 to the score, otherwise the Table 1 protocol)."""
    keep = (~runs["x0_estimate"]) & (runs["stabilizer"] == "none") & runs["normalize"] \
        & (runs["normalize_to"] == "score")
    fixed = {k: v for k, v in protocol.items() if k not in ("scale", "normalize", "normalize_to")}
    c = at_protocol(runs[keep], fixed)
    adv, van = c[c["classifier"] == "adversarial"], c[c["classifier"] == "nonrobust"]
    common = sorted(set(adv.dropna(subset=["fid"])["scale"])
                    & set(van.dropna(subset=["fid"])["scale"]))
    if len(common) < 2:
        return ("not testable with these runs",
                "needs adversarial and non-robust runs with metrics at >= 2 common scales "
                "(run `gradcheck sweep --grid scales`)")
    votes, text = [], []
    for s in common:
        p = paired_difference(van[van["scale"] == s], adv[adv["scale"] == s], "fid")
        votes.append(_direction(p, -1) if p["n"] else "inconclusive")
        text.append(f"s={s:g}: " + _describe("FID non-robust -> adversarial", p))
    wins = sum(v == "holds" for v in votes)
    lower = sum(adv[adv["scale"] == s]["fid"].mean() < van[van["scale"] == s]["fid"].mean()
                for s in common)
    return _combine(votes), (f"adversarial FID lower on average at {lower}/{len(common)} scales, "
                             f"with its interval below 0 at {wins}/{len(common)}: "
                             + "; ".join(text))


# ---- Scale sweep --------------------------------------------------------------------------------


def scale_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """FID, KID and accuracies vs scale (mean, 95% interval) of configs run at >= 2 scales."""
    keys = [k for k in CONFIG_KEYS if k != "scale"]
    rows = []
    for key, g in runs.groupby(keys, dropna=False):
        if g["scale"].nunique() < 2:
            continue
        for s, gs in g.groupby("scale"):
            row = dict(zip(keys, key, strict=True))
            row["scale"] = float(s)
            row["n_seeds"] = int(gs["seed"].nunique())
            for m in ("fid", "kid_mean", "accuracy_guiding", "accuracy_judge",
                      "mean_cos_prev_applied"):
                row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = metric_interval(gs, m)
            rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["curve"] = method_names(out)
        out = out.sort_values(["curve", "scale"]).reset_index(drop=True)
    return out


def best_scales(curves: pd.DataFrame) -> pd.DataFrame:
    """Per curve of :func:`scale_curves`: the scale with the highest mean judge accuracy (the
    guiding classifier's where no judge graded it), ties to the lower FID; one row per curve."""
    acc = curves["accuracy_judge"].fillna(curves["accuracy_guiding"])
    ranked = curves.assign(_acc=acc).sort_values(["curve", "_acc", "fid"],
                                                 ascending=[True, False, True])
    return ranked.groupby("curve", sort=False).head(1).drop(columns="_acc").reset_index(drop=True)


def scale_ranking(curves: pd.DataFrame) -> pd.DataFrame:
    """Per scale: the mean judge accuracy (guiding where no judge) and median FID over the curves
    of :func:`scale_curves` run at every scale of the sweep, best first (ties: lower FID)."""
    acc = curves.assign(_acc=curves["accuracy_judge"].fillna(curves["accuracy_guiding"]))
    n_scales = acc["scale"].nunique()
    full = acc.groupby("curve").filter(lambda g: g["scale"].nunique() == n_scales)
    out = full.groupby("scale", as_index=False).agg(
        n_curves=("curve", "nunique"), accuracy=("_acc", "mean"), median_fid=("fid", "median"))
    return out.sort_values(["accuracy", "median_fid"], ascending=[False, True]).reset_index(
        drop=True)


def accuracy_pivot(acc: pd.DataFrame) -> pd.DataFrame:
    """accuracy_by_t rows -> one row per t, one column per (classifier, input)."""
    wide = acc.pivot_table(index="t", columns=["classifier", "input"], values="accuracy")
    wide.columns = [f"{c} ({i})" for c, i in wide.columns]
    return wide.reset_index()


# ---- Text output --------------------------------------------------------------------------------


def to_markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured markdown table (pandas' own needs the optional ``tabulate``)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in df.itertuples(index=False, name=None)]
    return "\n".join([head, rule, *body])
