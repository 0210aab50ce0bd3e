"""Pairwise human preference survey of two runs (Kawar et al. 2023, Table 2 and Appendix C).

``build_survey`` pairs the images of two run folders that share seed, sample index and target
class, and writes one self-contained HTML page (images embedded, no network) plus
``survey.json``. Each rater enters an id; the page shows the pairs in an order and with left/right
sides drawn from a generator seeded by (survey id, rater id), asks Kawar et al.'s question, and
downloads the rater's votes as JSON. ``analyze_votes`` validates vote files, skips malformed ones
(reported per file) and computes the Table 2 layout, the vote split and exact binomial tests.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import gradcheck
from gradcheck import CLASS_NAMES
from gradcheck.utils import (
    GradcheckError,
    atomic_output_dir,
    check_seed,
    load_json,
    save_json,
    write_parquet,
)

QUESTION = "Which image is more realistic, and more aligned to the description?"
"""Kawar et al. (2023) §5.2, word for word."""

THRESHOLDS = (50, 60, 70, 80)
"""Agreement thresholds in percent, as in Kawar et al. Table 2."""

METHOD_FIELDS = ("classifier", "x0_estimate", "stabilizer", "normalize", "scale", "steps")
"""Run config fields that describe a guidance method; copied into survey.json for the report."""

PAIRING_FIELDS = ("seed", "target", "num_samples")
"""Run config fields two runs must share for their samples to form pairs."""

SURVEY_FORMAT = "gradcheck-survey/1"
VOTES_FORMAT = "gradcheck-survey-votes/1"
RESULT_TABLES = ("votes", "pairs", "table", "split", "tests", "files")
"""Keys of :func:`analyze_votes`; each is written as ``survey_<key>.parquet``."""

_MASK32 = 0xFFFFFFFF


# ---- runs and pairing ---------------------------------------------------------------------------


def load_run(path: str | Path) -> tuple[str, dict[str, Any], np.ndarray]:
    """A run folder's (run id, config, samples uint8 (N, H, W, 3)), memory-mapped."""
    path = Path(path)
    if not path.is_dir():
        raise GradcheckError(f"{path} is a file, not a run folder" if path.exists()
                             else f"run folder {path} does not exist")
    config = load_json(path / "config.json")
    if not isinstance(config, dict):
        raise GradcheckError(f"{path / 'config.json'} is not a JSON object")
    npy = path / "samples.npy"
    if not npy.is_file():
        raise GradcheckError(f"run {path} has no samples.npy; the survey needs the run's samples")
    try:
        samples = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise GradcheckError(f"cannot read {npy}: {e}") from None
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[-1] != 3:
        raise GradcheckError(f"{npy} holds {samples.dtype} {tuple(samples.shape)}; expected "
                             "uint8 (N, H, W, 3)")
    return str(config.get("run_id") or path.name), config, samples


def check_paired(path_a: str | Path, config_a: dict[str, Any], samples_a: np.ndarray,
                 path_b: str | Path, config_b: dict[str, Any], samples_b: np.ndarray) -> None:
    """Raise unless runs A and B share seed, target and num_samples (so sample i pairs with i)."""
    if Path(path_a).resolve() == Path(path_b).resolve():
        raise GradcheckError(f"RUN_A and RUN_B are the same folder {path_a}; give two runs")
    for name, path, config, samples in (("A", path_a, config_a, samples_a),
                                        ("B", path_b, config_b, samples_b)):
        missing = [f for f in PAIRING_FIELDS if f not in config]
        if missing:
            raise GradcheckError(f"run {name} ({path}) config.json lacks {', '.join(missing)}")
        if config["num_samples"] != len(samples):
            raise GradcheckError(f"run {name} ({path}) has num_samples={config['num_samples']} "
                                 f"but samples.npy holds {len(samples)} images")
    for field in PAIRING_FIELDS:
        if config_a[field] != config_b[field]:
            raise GradcheckError(f"runs are not paired: {field} differs (A: {config_a[field]!r}, "
                                 f"B: {config_b[field]!r}); a survey pairs samples with the same "
                                 "seed, index and target class")
    if samples_a.shape[1:] != samples_b.shape[1:]:
        raise GradcheckError(f"runs are not paired: image shape differs (A: "
                             f"{tuple(samples_a.shape[1:])}, B: {tuple(samples_b.shape[1:])})")
    class_name(config_a["target"])


def class_name(target: Any) -> str:
    """The SportBalls class name of a run's target (label index or name)."""
    if isinstance(target, str) and target in CLASS_NAMES:
        return target
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(CLASS_NAMES):
        return CLASS_NAMES[target]
    raise GradcheckError(f"target {target!r} is not a class; the survey needs one of "
                         f"0..{len(CLASS_NAMES) - 1} or {', '.join(CLASS_NAMES)}")


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) image as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---- the per-rater order (mirrors the page's JavaScript exactly) --------------------------------


def _fnv1a32(text: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes of ``text`` (the page uses TextEncoder, same bytes)."""
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & _MASK32
    return h


def _mulberry32(seed: int):
    """Mulberry32, bit-identical to the page's JavaScript (all arithmetic on uint32)."""
    state = seed & _MASK32

    def next_float() -> float:
        nonlocal state
        state = (state + 0x6D2B79F5) & _MASK32
        t = ((state ^ (state >> 15)) * (1 | state)) & _MASK32
        t = ((t + (((t ^ (t >> 7)) * (61 | t)) & _MASK32)) & _MASK32) ^ t
        return ((t ^ (t >> 14)) & _MASK32) / 4294967296

    return next_float


def rater_order(survey_id: str, rater_id: str, n_pairs: int) -> list[tuple[int, str]]:
    """The (pair_id, side shown left "A"|"B") sequence the page shows rater ``rater_id``:
    Fisher-Yates shuffle of the pair ids, then one left/right draw per shown pair, all from
    mulberry32 seeded with FNV-1a(survey_id + "\\n" + rater_id)."""
    rng = _mulberry32(_fnv1a32(f"{survey_id}\n{rater_id}"))
    order = list(range(n_pairs))
    for i in range(n_pairs - 1, 0, -1):
        j = math.floor(rng() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return [(p, "A" if rng() < 0.5 else "B") for p in order]


# ---- build ---------------------------------------------------------------------------------------


def build_survey(run_a: str | Path, run_b: str | Path, out: str | Path = "survey",
                 pairs: int | None = None, seed: int = 0, overwrite: bool = False
                 ) -> dict[str, Any]:
    """Write ``out/survey.html`` (self-contained) and ``out/survey.json``; return the manifest.
    ``pairs`` sample indices (all when None) are drawn without replacement with ``seed``; pair ids
    0..pairs-1 follow increasing sample index. The survey id hashes the run ids, the pairing and the
    paired images."""
    check_seed(seed)
    id_a, config_a, samples_a = load_run(run_a)
    id_b, config_b, samples_b = load_run(run_b)
    check_paired(run_a, config_a, samples_a, run_b, config_b, samples_b)
    n = len(samples_a)
    if pairs is None:
        pairs = n
    if not 1 <= pairs <= n:
        raise GradcheckError(f"--pairs must be in 1..{n} (the runs' num_samples), got {pairs}")
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=pairs, replace=False))
    samples = [int(i) for i in chosen]

    digest = hashlib.sha256()
    digest.update(json.dumps([id_a, id_b, config_a["seed"], config_a["target"], samples])
                  .encode())
    for i in samples:
        digest.update(np.ascontiguousarray(samples_a[i]).tobytes())
        digest.update(np.ascontiguousarray(samples_b[i]).tobytes())
    survey_id = digest.hexdigest()[:16]

    def method(config: dict[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in METHOD_FIELDS if k in config}

    manifest = {
        "format": SURVEY_FORMAT, "survey_id": survey_id, "question": QUESTION,
        "target": config_a["target"], "class_name": class_name(config_a["target"]),
        "seed": config_a["seed"], "num_samples": n, "pair_seed": seed,
        "run_a": {"run_id": id_a, "path": str(run_a), "method": method(config_a)},
        "run_b": {"run_id": id_b, "path": str(run_b), "method": method(config_b)},
        "pairs": [{"pair_id": p, "sample": i} for p, i in enumerate(samples)],
        "gradcheck": gradcheck.__version__,
    }
    page_data = {
        "survey_id": survey_id, "run_a": id_a, "run_b": id_b,
        "class_name": manifest["class_name"], "question": QUESTION,
        "pairs": [{"pair_id": p, "a": png_data_uri(samples_a[i]), "b": png_data_uri(samples_b[i])}
                  for p, i in enumerate(samples)],
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "survey.html").write_text(survey_html(page_data), encoding="utf-8")
        save_json(tmp / "survey.json", manifest)
    return manifest


def survey_html(page_data: dict[str, Any]) -> str:
    """The survey page with ``page_data`` (ids, class name, question, pair images) inlined."""
    # "<" can only occur inside JSON strings; escaping it keeps "</script>" or "<!--" in a run id
    # from ending the <script> element early.
    blob = json.dumps(page_data, separators=(",", ":")).replace("<", "\\u003c")
    page = (Path(__file__).parent / "templates" / "survey.html").read_text(encoding="utf-8")
    return page.replace("__SURVEY_JSON__", blob)


# ---- analyze -------------------------------------------------------------------------------------


def load_survey(survey: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The survey manifest from a survey.json path, its folder, or an already loaded dict."""
    if isinstance(survey, dict):
        manifest = survey
    else:
        path = Path(survey)
        manifest = load_json(path / "survey.json" if path.is_dir() else path)
    if not isinstance(manifest, dict) or manifest.get("format") != SURVEY_FORMAT:
        raise GradcheckError(f"{survey} is not a gradcheck survey.json ({SURVEY_FORMAT})")
    return manifest


def find_vote_files(paths: Sequence[str | Path]) -> list[Path]:
    """Vote files from file paths and folders (a folder contributes its *.json, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.glob("*.json") if q.name != "survey.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise GradcheckError(f"vote file {p} does not exist")
    return files


def _parse_vote_file(path: Path, manifest: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(rater_id, votes) of one vote file; raises GradcheckError naming what is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GradcheckError(f"not valid JSON (truncated?): {e.msg} at line {e.lineno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GradcheckError(f"unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != VOTES_FORMAT:
        raise GradcheckError(f"not a gradcheck vote file ({VOTES_FORMAT})")
    if data.get("survey_id") != manifest["survey_id"]:
        raise GradcheckError(f"votes for survey {data.get('survey_id')!r}, not "
                             f"{manifest['survey_id']!r}")
    runs = (manifest["run_a"]["run_id"], manifest["run_b"]["run_id"])
    if (data.get("run_a"), data.get("run_b")) != runs:
        raise GradcheckError(f"votes name runs {data.get('run_a')!r}, {data.get('run_b')!r}, "
                             f"not {runs[0]!r}, {runs[1]!r}")
    rater = data.get("rater_id")
    if not isinstance(rater, str) or not rater.strip():
        raise GradcheckError("missing rater_id")
    if not isinstance(data.get("votes"), list) or not data["votes"]:
        raise GradcheckError("no votes")
    pair_ids = {p["pair_id"] for p in manifest["pairs"]}
    seen: set[int] = set()
    votes = []
    for k, v in enumerate(data["votes"]):
        if not isinstance(v, dict):
            raise GradcheckError(f"vote {k} is not an object")
        pid, left, answer = v.get("pair_id"), v.get("left"), v.get("answer")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid not in pair_ids:
            raise GradcheckError(f"vote {k}: unknown pair_id {pid!r} (this survey has "
                                 f"0..{len(pair_ids) - 1})")
        if pid in seen:
            raise GradcheckError(f"pair {pid} answered twice in this file")
        seen.add(pid)
        if left not in ("A", "B") or answer not in ("left", "right", "same"):
            raise GradcheckError(f"vote {k}: left={left!r} answer={answer!r}; expected "
                                 "left in A, B and answer in left, right, same")
        right = "B" if left == "A" else "A"
        chosen = {"left": left, "right": right, "same": "same"}[answer]
        if v.get("chosen") != chosen:
            raise GradcheckError(f"vote {k}: chosen={v.get('chosen')!r} contradicts "
                                 f"left={left!r}, answer={answer!r}")
        time_ms = v.get("time_ms")
        if time_ms is not None and (not isinstance(time_ms, int | float)
                                    or isinstance(time_ms, bool) or time_ms < 0):
            raise GradcheckError(f"vote {k}: time_ms={time_ms!r} is not a duration")
        votes.append({"pair_id": pid, "left": left, "answer": answer, "chosen": chosen,
                      "time_ms": float("nan") if time_ms is None else float(time_ms)})
    return rater, votes


def binomial_test_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair trials (p = 1/2): by symmetry
    2 * P(X <= min(k, n - k)), capped at 1 (equals scipy's ``binomtest``)."""
    if not 0 <= k <= n:
        raise GradcheckError(f"binomial test needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def preference_table(pairs: pd.DataFrame, thresholds: Sequence[int] = THRESHOLDS) -> pd.DataFrame:
    """Kawar et al. Table 2 from per-pair counts ``n_a``, ``n_b`` (one row per threshold). As in
    Kawar et al. 2023, §5.2: A is preferred on a pair at threshold T% when n_a / (n_a + n_b) > T/100
    (strictly; "Same" counts for neither side), B likewise, otherwise no preference. Shares are over
    the pairs with at least one vote and sum to 1."""
    rated = pairs[pairs["n_votes"] > 0]
    n_a, n_b = rated["n_a"].to_numpy(), rated["n_b"].to_numpy()
    rows = []
    for t in thresholds:
        if not 50 <= t < 100:
            raise GradcheckError(f"threshold {t} must be in 50..99 (percent)")
        # Integer comparison: 100 * n_a > t * (n_a + n_b) avoids float ties such as 3/5 vs 0.6.
        a_pref = 100 * n_a > t * (n_a + n_b)
        b_pref = 100 * n_b > t * (n_a + n_b)
        n = len(rated)
        rows.append({
            "threshold": int(t),
            "a_preferred": a_pref.sum() / n if n else float("nan"),
            "b_preferred": b_pref.sum() / n if n else float("nan"),
            "no_preference": (n - a_pref.sum() - b_pref.sum()) / n if n else float("nan"),
            "n_pairs": n,
        })
    return pd.DataFrame(rows)


def analyze_votes(votes: Sequence[str | Path], survey: str | Path | dict[str, Any],
                  thresholds: Sequence[int] = THRESHOLDS) -> dict[str, pd.DataFrame]:
    """Validate vote files against a survey and tabulate them (keys: :data:`RESULT_TABLES`).

    ``votes`` may name files or folders of *.json. A malformed file (invalid or truncated JSON,
    another survey, unknown pair ids, a pair answered twice, a (rater, pair) already counted from
    an earlier file) is skipped whole and reported in ``files``; files are taken in the order
    given, so no vote is ever counted twice.

    - ``votes``: one row per counted vote (rater_id, pair_id, sample, left, answer, chosen, ...).
    - ``pairs``: per pair n_votes, n_a, n_b, n_same and the shares of raters choosing A, B, Same.
    - ``table``: :func:`preference_table` (Kawar et al. Table 2 layout).
    - ``split``: one row; the overall vote split and counts of raters, pairs and votes.
    - ``tests``: exact two-sided binomial tests of A vs B, ties ("Same") excluded: over votes
      (the paper's test; treats votes as independent although votes on one pair share images)
      and over pairs (sign test of the pairs' majorities, with pairs as the unit).
    - ``files``: one row per vote file: status counted/skipped, n_votes, reason.
    """
    manifest = load_survey(survey)
    sample_of = {p["pair_id"]: p["sample"] for p in manifest["pairs"]}
    counted: dict[tuple[str, int], str] = {}
    rows, file_rows = [], []
    for path in find_vote_files(votes):
        try:
            rater, file_votes = _parse_vote_file(path, manifest)
            clash = [v["pair_id"] for v in file_votes if (rater, v["pair_id"]) in counted]
            if clash:
                first = Path(counted[(rater, clash[0])]).name
                raise GradcheckError(f"rater {rater!r} already counted for pair {clash[0]} from "
                                     f"{first} ({len(clash)} overlapping)")
        except GradcheckError as e:
            file_rows.append({"file": str(path), "rater_id": None, "status": "skipped",
                              "n_votes": 0, "reason": str(e)})
            continue
        for v in file_votes:
            counted[(rater, v["pair_id"])] = str(path)
            rows.append({"rater_id": rater, **v, "sample": sample_of[v["pair_id"]],
                         "file": str(path)})
        file_rows.append({"file": str(path), "rater_id": rater, "status": "counted",
                          "n_votes": len(file_votes), "reason": ""})

    vote_cols = ["rater_id", "pair_id", "sample", "left", "answer", "chosen", "time_ms", "file"]
    vote_df = pd.DataFrame(rows, columns=vote_cols).astype(
        {"pair_id": "int64", "sample": "int64", "time_ms": "float64"})
    vote_df.insert(0, "survey_id", manifest["survey_id"])

    pair_df = pd.DataFrame({"pair_id": list(sample_of), "sample": list(sample_of.values())})
    counts = (vote_df.groupby(["pair_id", "chosen"]).size().unstack(fill_value=0)
              .reindex(columns=["A", "B", "same"], fill_value=0))
    counts = counts.reindex(pair_df["pair_id"], fill_value=0).to_numpy()
    pair_df["n_a"], pair_df["n_b"], pair_df["n_same"] = counts.T.astype("int64")
    pair_df["n_votes"] = counts.sum(axis=1).astype("int64")
    with np.errstate(invalid="ignore", divide="ignore"):
        for col, n in (("share_a", "n_a"), ("share_b", "n_b"), ("share_same", "n_same")):
            pair_df[col] = pair_df[n] / pair_df["n_votes"].where(pair_df["n_votes"] > 0)
        sides = pair_df["n_a"] + pair_df["n_b"]
        pair_df["a_of_sides"] = pair_df["n_a"] / sides.where(sides > 0)

    n_a, n_b = int(pair_df["n_a"].sum()), int(pair_df["n_b"].sum())
    n_same, n_votes = int(pair_df["n_same"].sum()), len(vote_df)
    per_pair = pair_df.loc[pair_df["n_votes"] > 0, "n_votes"]
    split = pd.DataFrame([{
        "survey_id": manifest["survey_id"], "run_a": manifest["run_a"]["run_id"],
        "run_b": manifest["run_b"]["run_id"], "class_name": manifest["class_name"],
        "n_raters": vote_df["rater_id"].nunique(), "n_pairs": len(pair_df),
        "n_pairs_rated": len(per_pair), "n_votes": n_votes,
        "n_a": n_a, "n_b": n_b, "n_same": n_same,
        **{f"share_{k}": v / n_votes if n_votes else float("nan")
           for k, v in (("a", n_a), ("b", n_b), ("same", n_same))},
        "votes_per_pair_min": int(per_pair.min()) if len(per_pair) else 0,
        "votes_per_pair_mean": float(per_pair.mean()) if len(per_pair) else float("nan"),
        "votes_per_pair_max": int(per_pair.max()) if len(per_pair) else 0,
    }])

    pairs_a = int((pair_df["n_a"] > pair_df["n_b"]).sum())
    pairs_b = int((pair_df["n_b"] > pair_df["n_a"]).sum())
    tests = pd.DataFrame([
        {"level": level, "n_a": a, "n_b": b, "n": a + b,
         "share_a": a / (a + b) if a + b else float("nan"),
         "p_value": binomial_test_two_sided(a, a + b)}
        for level, a, b in (("votes", n_a, n_b), ("pairs", pairs_a, pairs_b))
    ])
    files = pd.DataFrame(file_rows, columns=["file", "rater_id", "status", "n_votes", "reason"])
    return {"votes": vote_df, "pairs": pair_df, "table": preference_table(pair_df, thresholds),
            "split": split, "tests": tests, "files": files}


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def survey_table_markdown(results: dict[str, pd.DataFrame]) -> str:
    """Markdown of :func:`analyze_votes` results: Table 2 layout, vote split, tests, files."""
    s = results["split"].iloc[0]
    lines = [
        f"### Pairwise preference survey `{s['survey_id']}` (class {s['class_name']})",
        "",
        f"A = `{s['run_a']}`, B = `{s['run_b']}`. Raters: {s['n_raters']}; votes: {s['n_votes']} "
        f"on {s['n_pairs_rated']} of {s['n_pairs']} pairs (per rated pair "
        f"{s['votes_per_pair_min']}-{s['votes_per_pair_max']}, mean "
        f"{s['votes_per_pair_mean']:.2f}).",
        "",
        f'Question: "{QUESTION}" A side is preferred on a pair when more than the threshold '
        "share of the raters who chose a side chose it; \"Same\" counts for neither side "
        "(Kawar et al. 2023, Table 2).",
        "",
        "| Threshold | A preferred | B preferred | No preference |",
        "|---:|---:|---:|---:|",
    ]
    for r in results["table"].itertuples():
        lines.append(f"| {r.threshold}% | {_pct(r.a_preferred)} | {_pct(r.b_preferred)} | "
                     f"{_pct(r.no_preference)} |")
    lines += [
        "",
        f"Votes: A {_pct(s['share_a'])}, B {_pct(s['share_b'])}, Same {_pct(s['share_same'])} "
        f"(n = {s['n_votes']}).",
        "",
        "Exact two-sided binomial tests of A vs B (p = 1/2, \"Same\" excluded):",
        "",
    ]
    for t in results["tests"].itertuples():
        what = ("votes (treats votes as independent)" if t.level == "votes"
                else "pairs (sign test of each pair's majority; pairs as the unit)")
        lines.append(f"- {what}: A {t.n_a}, B {t.n_b}, p = {t.p_value:.3g}")
    skipped = results["files"][results["files"]["status"] == "skipped"]
    n_files = len(results["files"])
    lines += ["", f"Vote files: {n_files - len(skipped)} counted, {len(skipped)} skipped."]
    lines += [f"- skipped `{Path(r.file).name}`: {r.reason}" for r in skipped.itertuples()]
    return "\n".join(lines) + "\n"


def analyze_survey(votes: Sequence[str | Path], survey: str | Path = "survey/survey.json",
                   out: str | Path | None = None, overwrite: bool = False
                   ) -> dict[str, pd.DataFrame]:
    """Run :func:`analyze_votes` and write ``survey_table.md`` and ``survey_<key>.parquet``
    (``out`` defaults to ``analysis/`` beside survey.json). Raises when no vote file is usable."""
    manifest = load_survey(survey)
    results = analyze_votes(votes, manifest)
    if results["votes"].empty:
        reasons = "; ".join(f"{Path(r.file).name}: {r.reason}"
                            for r in results["files"].itertuples())
        raise GradcheckError(f"no usable votes ({reasons or 'no vote files'})")
    survey_path = Path(survey)
    out = Path(out) if out is not None else (
        (survey_path if survey_path.is_dir() else survey_path.parent) / "analysis")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "survey_table.md").write_text(survey_table_markdown(results), encoding="utf-8")
        for key in RESULT_TABLES:
            write_parquet(results[key], tmp / f"survey_{key}.parquet", manifest,
                          key="gradcheck_survey")
    return results

