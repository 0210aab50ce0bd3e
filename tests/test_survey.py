"""Pairwise preference survey: pairing, page, vote validation, Table 2 layout, binomial tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradcheck.cli import main
from gradcheck.survey import (
    QUESTION,
    analyze_votes,
    binomial_test_two_sided,
    build_survey,
    png_data_uri,
    preference_table,
    rater_order,
    survey_table_markdown,
)
from gradcheck.utils import GradcheckError


def make_run(root: Path, name: str, n: int = 8, seed: int = 3, target: int = 0,
             samples: bool = True, **config) -> Path:
    """A fake run folder: config.json and random uint8 samples (n, 16, 16, 3)."""
    folder = root / name
    folder.mkdir(parents=True)
    images = np.random.default_rng(len(name) + 7 * n).integers(0, 256, (n, 16, 16, 3), np.uint8)
    if samples:
        np.save(folder / "samples.npy", images)
    cfg = {"classifier": name, "x0_estimate": True, "stabilizer": "adam", "normalize": True,
           "scale": 1.0, "target": target, "num_samples": n, "seed": seed, "steps": 50, **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def vote(pair_id: int, chosen: str, left: str = "A", time_ms: float = 800.0) -> dict:
    """One vote as the page writes it, given the side chosen ("A", "B" or "same")."""
    answer = "same" if chosen == "same" else "left" if chosen == left else "right"
    return {"pair_id": pair_id, "left": left, "answer": answer, "chosen": chosen,
            "time_ms": time_ms}


def write_votes(path: Path, manifest: dict, rater: str, votes: list[dict], **override) -> Path:
    """A vote file as the page downloads it."""
    data = {"format": "gradcheck-survey-votes/1", "survey_id": manifest["survey_id"],
            "rater_id": rater, "run_a": manifest["run_a"]["run_id"],
            "run_b": manifest["run_b"]["run_id"], "n_pairs": len(manifest["pairs"]),
            "complete": False, "votes": votes, **override}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def survey(tmp_path: Path) -> dict:
    """A built survey of 6 pairs out of two paired 8-sample runs."""
    a, b = make_run(tmp_path, "nonrobust"), make_run(tmp_path, "robust")
    return build_survey(a, b, out=tmp_path / "survey", pairs=6, seed=1)


# ---- build ---------------------------------------------------------------------------------------


def test_build_writes_self_contained_page_and_manifest(tmp_path: Path, survey: dict) -> None:
    html = (tmp_path / "survey" / "survey.html").read_text()
    manifest = json.loads((tmp_path / "survey" / "survey.json").read_text())
    assert manifest == survey
    assert [p["pair_id"] for p in survey["pairs"]] == list(range(6))
    samples = [p["sample"] for p in survey["pairs"]]
    assert samples == sorted(set(samples)) and all(0 <= s < 8 for s in samples)
    assert survey["class_name"] == "baseball" and survey["run_b"]["run_id"] == "robust"
    # Self-contained: every image is inlined, nothing is fetched.
    assert not re.search(r"https?:|\s(src|href)=[\"']|url\(|<link|<iframe|fetch\(|XMLHttp", html)
    assert "default-src 'none'; img-src data:;" in html  # and the browser is told so (CSP)
    images_b = np.load(tmp_path / "robust" / "samples.npy")
    assert all(png_data_uri(images_b[s]) in html for s in samples)
    assert QUESTION in html and "image-rendering: pixelated" in html
    # The survey id is a hash of the pairing: same inputs, same id; other pairs, other id.
    again = build_survey(tmp_path / "nonrobust", tmp_path / "robust", out=tmp_path / "survey",
                         pairs=6, seed=1, overwrite=True)
    assert again["survey_id"] == survey["survey_id"]
    other = build_survey(tmp_path / "nonrobust", tmp_path / "robust", out=tmp_path / "s2",
                         pairs=6, seed=2)
    assert other["survey_id"] != survey["survey_id"]
    with pytest.raises(GradcheckError, match="already exists"):
        build_survey(tmp_path / "nonrobust", tmp_path / "robust", out=tmp_path / "survey")
    with pytest.raises(GradcheckError, match="--pairs must be in 1..8"):
        build_survey(tmp_path / "nonrobust", tmp_path / "robust", out=tmp_path / "s3", pairs=9)


@pytest.mark.parametrize("a_kwargs, b_kwargs, message", [
    ({}, {"seed": 4}, "runs are not paired: seed differs \\(A: 3, B: 4\\)"),
    ({}, {"target": 1}, "runs are not paired: target differs \\(A: 0, B: 1\\)"),
    ({}, {"n": 6}, "runs are not paired: num_samples differs \\(A: 8, B: 6\\)"),
    ({}, {"samples": False}, "run .*b has no samples.npy"),
    ({"target": 7}, {"target": 7}, "target 7 is not a class"),
])
def test_unpaired_runs_are_refused(tmp_path: Path, a_kwargs: dict, b_kwargs: dict,
                                   message: str) -> None:
    a, b = make_run(tmp_path, "a", **a_kwargs), make_run(tmp_path, "b", **b_kwargs)
    with pytest.raises(GradcheckError, match=message):
        build_survey(a, b, out=tmp_path / "survey")
    assert not (tmp_path / "survey").exists()


def test_cli_refusal_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", seed=9)
    with pytest.raises(SystemExit) as exit_info:
        main(["survey", "build", str(a), str(b), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: runs are not paired: seed differs") and err.count("\n") == 1
    with pytest.raises(GradcheckError, match="same folder"):
        build_survey(a, a, out=tmp_path / "s")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GradcheckError, match="afile is a file, not a run folder"):
        build_survey(a, tmp_path / "afile", out=tmp_path / "s")
    with pytest.raises(GradcheckError, match="run folder .*nowhere does not exist"):
        build_survey(a, tmp_path / "nowhere", out=tmp_path / "s")
    with pytest.raises(GradcheckError, match="seed must be an integer in 0.."):
        build_survey(a, make_run(tmp_path, "c"), out=tmp_path / "s", seed=-1)


def test_rater_order_is_a_reproducible_per_rater_permutation() -> None:
    order = rater_order("abc", "rater-1", 50)
    assert order == rater_order("abc", "rater-1", 50)
    assert sorted(p for p, _ in order) == list(range(50))
    assert {side for _, side in order} == {"A", "B"}
    assert order != rater_order("abc", "rater-2", 50)
    assert order != rater_order("abd", "rater-1", 50)


# ---- statistics ----------------------------------------------------------------------------------


def test_binomial_test_matches_hand_computed_values() -> None:
    assert binomial_test_two_sided(0, 0) == 1.0
    assert binomial_test_two_sided(5, 10) == 1.0
    assert binomial_test_two_sided(8, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert binomial_test_two_sided(2, 10) == binomial_test_two_sided(8, 10)
    assert binomial_test_two_sided(0, 5) == pytest.approx(2 / 32)
    assert binomial_test_two_sided(9, 9) == pytest.approx(2 / 512)
    # Kawar et al.: 40.4% and 32.4% of 5018 answers (2027 vs 1626) are significant at > 95%.
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((2027, 3653), (12, 30), (3, 4)):
        expected = scipy_stats.binomtest(k, n, 0.5, alternative="two-sided").pvalue
        assert binomial_test_two_sided(k, n) == pytest.approx(expected, rel=1e-9)
    assert binomial_test_two_sided(2027, 3653) < 0.05
    with pytest.raises(GradcheckError, match="0 <= k <= n"):
        binomial_test_two_sided(4, 3)


# Per pair, the side chosen by raters r0..r4 (None: that rater did not answer the pair).
CHOICES = {
    0: ["A", "A", "A", "B", None],          # A 3/4 = 75% of sides: A at 50, 60, 70; not 80
    1: ["A", "A", "A", "B", "B"],           # A 3/5 = 60%: A at 50 only (strictly "more than")
    2: ["A", "B", None, None, None],        # 50%: no preference at any threshold
    3: ["B", "B", "same", "B", "B"],        # B 4/4 = 100%: B at every threshold
    4: ["same", "same", "same", None, None],  # no side chosen: no preference
    5: [None] * 5,                          # unrated: not in the denominator
}


def write_choices(folder: Path, manifest: dict) -> list[Path]:
    """One vote file per rater from CHOICES (sides alternate so both orders occur)."""
    folder.mkdir()
    files = []
    for r in range(5):
        votes = [vote(p, c[r], left="AB"[(p + r) % 2]) for p, c in CHOICES.items() if c[r]]
        files.append(write_votes(folder / f"r{r}.json", manifest, f"r{r}", votes))
    return files


def test_threshold_table_and_split_match_hand_computed_values(tmp_path: Path,
                                                               survey: dict) -> None:
    results = analyze_votes(write_choices(tmp_path / "votes", survey), survey)
    table = results["table"].set_index("threshold")
    expected = {50: (2, 1, 2), 60: (1, 1, 3), 70: (1, 1, 3), 80: (0, 1, 4)}  # of 5 rated pairs
    for t, (a, b, none) in expected.items():
        assert tuple(table.loc[t, ["a_preferred", "b_preferred", "no_preference"]]) == \
            pytest.approx((a / 5, b / 5, none / 5))
    assert (table["n_pairs"] == 5).all()
    pairs = results["pairs"].set_index("pair_id")
    assert list(pairs["n_votes"]) == [4, 5, 2, 5, 3, 0]
    assert pairs.loc[0, "share_a"] == 0.75 and pairs.loc[3, "share_same"] == 0.2
    assert pairs.loc[1, "a_of_sides"] == 0.6 and np.isnan(pairs.loc[5, "share_a"])
    split = results["split"].iloc[0]
    assert (split["n_a"], split["n_b"], split["n_same"], split["n_votes"]) == (7, 8, 4, 19)
    assert split["n_raters"] == 5 and split["votes_per_pair_max"] == 5
    tests = results["tests"].set_index("level")
    assert tuple(tests.loc["votes", ["n_a", "n_b"]]) == (7, 8)
    assert tests.loc["votes", "p_value"] == 1.0  # 7 of 15: as likely as it gets
    assert tuple(tests.loc["pairs", ["n_a", "n_b"]]) == (2, 1)  # majorities: pairs 0, 1 vs 3
    assert tests.loc["pairs", "p_value"] == pytest.approx(2 * 4 / 8)
    md = survey_table_markdown(results)
    assert "| 50% | 40.0% | 20.0% | 40.0% |" in md and "| 80% | 0.0% | 20.0% | 80.0% |" in md
    assert "A = `nonrobust`, B = `robust`" in md
    skewed = pd.DataFrame({"n_a": [9], "n_b": [1], "n_votes": [10]})
    assert preference_table(skewed)["a_preferred"].tolist() == [1.0, 1.0, 1.0, 1.0]


# ---- malformed vote files ------------------------------------------------------------------------


def test_malformed_vote_files_are_reported_and_skipped(tmp_path: Path, survey: dict,
                                                       capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "votes"
    d.mkdir()
    good = write_votes(d / "01-good.json", survey, "ann", [vote(0, "A"), vote(1, "B", "B")])
    text = json.dumps({"format": "gradcheck-survey-votes/1", "votes": [vote(2, "A")]})
    (d / "02-truncated.json").write_text(text[: len(text) // 2])
    write_votes(d / "03-other.json", survey, "bob", [vote(0, "A")], survey_id="0123456789abcdef")
    write_votes(d / "04-unknown-pair.json", survey, "cat", [vote(0, "A"), vote(17, "B")])
    write_votes(d / "05-dup-within.json", survey, "dan", [vote(3, "A"), vote(3, "B")])
    write_votes(d / "06-dup-across.json", survey, "ann", [vote(2, "A"), vote(1, "A")])
    write_votes(d / "07-contradiction.json", survey, "eve",
                [{**vote(0, "A", left="A"), "chosen": "B"}])
    write_votes(d / "08-empty.json", survey, "fay", [])
    shutil.copy(good, d / "09-copy-of-good.json")
    ok_more = write_votes(d / "10-ann-more.json", survey, "ann", [vote(4, "same")])

    results = analyze_votes([d], survey)
    files = results["files"].assign(file=lambda f: f["file"].map(lambda p: Path(p).name))
    reasons = dict(zip(files["file"], files["reason"], strict=True))
    assert reasons["02-truncated.json"].startswith("not valid JSON (truncated?)")
    assert reasons["03-other.json"] == \
        f"votes for survey '0123456789abcdef', not '{survey['survey_id']}'"
    assert reasons["04-unknown-pair.json"] == "vote 1: unknown pair_id 17 (this survey has 0..5)"
    assert reasons["05-dup-within.json"] == "pair 3 answered twice in this file"
    assert reasons["06-dup-across.json"].startswith("rater 'ann' already counted for pair 1 from")
    assert reasons["07-contradiction.json"].startswith("vote 0: chosen='B' contradicts")
    assert reasons["08-empty.json"] == "no votes"
    assert reasons["09-copy-of-good.json"].startswith("rater 'ann' already counted for pair 0")
    counted = files.loc[files["status"] == "counted", "file"].tolist()
    assert counted == ["01-good.json", "10-ann-more.json"]
    # Nothing from a skipped file, nothing twice: ann's pairs 0, 1 (file 1) and 4 (file 10).
    v = results["votes"]
    assert sorted(zip(v["rater_id"], v["pair_id"], v["chosen"], strict=True)) == \
        [("ann", 0, "A"), ("ann", 1, "B"), ("ann", 4, "same")]
    assert set(v["file"]) == {str(good), str(ok_more)}

    # The command line reports each skipped file and writes the tables.
    main_exit = None
    try:
        main(["survey", "analyze", str(d), "--survey", str(tmp_path / "survey" / "survey.json")])
    except SystemExit as e:
        main_exit = e.code
    captured = capsys.readouterr()
    assert main_exit == 0
    assert captured.err.count("skipped ") == 8 and "08-empty.json: no votes" in captured.err
    out = tmp_path / "survey" / "analysis"
    assert (out / "survey_table.md").read_text() == captured.out.rstrip("\n") + "\n"
    meta = pq.read_schema(out / "survey_table.parquet").metadata[b"gradcheck_survey"]
    assert json.loads(meta)["survey_id"] == survey["survey_id"]
    assert len(pd.read_parquet(out / "survey_votes.parquet")) == 3
    with pytest.raises(GradcheckError, match="no usable votes .*08-empty.json: no votes"):
        from gradcheck.survey import analyze_survey
        analyze_survey([d / "08-empty.json"], tmp_path / "survey" / "survey.json",
                       out=tmp_path / "a2")


# ---- the page in a real browser ------------------------------------------------------------------


def _browser_or_skip() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skip when absent unless CI is set (then fail)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    try:
        import selenium  # noqa: F401
        have_selenium = True
    except ImportError:
        have_selenium = False
    if chromium and driver and have_selenium:
        return chromium, driver
    missing = ", ".join(n for n, ok in (("chromium", chromium), ("chromedriver", driver),
                                        ("selenium", have_selenium)) if not ok)
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {missing} is missing (.ci/run installs them)")
    pytest.skip(f"{missing} not installed (apt-get install chromium chromium-driver)")


def _wait_for_download(folder: Path, name: str, timeout: float = 10.0) -> Path:
    """The downloaded file once complete (chromium writes .crdownload first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (folder / name).is_file():
            return folder / name
        time.sleep(0.05)
    raise AssertionError(f"no download {name} in {folder}: {list(folder.iterdir())}")


def test_browser_survey_round_trip(tmp_path: Path, survey: dict,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Drive survey.html in headless chromium; `survey analyze` reproduces every answer."""
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    downloads, profile = tmp_path / "downloads", tmp_path / "profile"
    downloads.mkdir()
    profile.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    sid = survey["survey_id"]
    images = {k: np.load(tmp_path / name / "samples.npy")
              for k, name in (("A", "nonrobust"), ("B", "robust"))}
    sample_of = {p["pair_id"]: p["sample"] for p in survey["pairs"]}
    try:
        wait = WebDriverWait(browser, 10, poll_frequency=0.02)

        def start(rater: str) -> None:
            browser.get((tmp_path / "survey" / "survey.html").as_uri())
            browser.find_element(By.ID, "rater").send_keys(rater)
            browser.find_element(By.ID, "start-button").click()

        def check_shown(position: int, pair_id: int, left: str) -> None:
            wait.until(ec.element_to_be_clickable((By.ID, "btn-left")))
            page = browser.find_element(By.ID, "survey")
            assert browser.find_element(By.ID, "progress").text == f"Pair {position} of 6"
            assert (int(page.get_attribute("data-pair-id")), page.get_attribute("data-left")) \
                == (pair_id, left)
            right = "B" if left == "A" else "A"
            src = {s: browser.find_element(By.ID, f"img-{s}").get_attribute("src")
                   for s in ("left", "right")}
            assert src["left"] == png_data_uri(images[left][sample_of[pair_id]])
            assert src["right"] == png_data_uri(images[right][sample_of[pair_id]])

        # Rater 1 answers all six pairs: clicks, except the third answer by the "S" key.
        rater = "José 1"
        start(rater)
        assert browser.find_element(By.ID, "class-name").text == "baseball"
        assert browser.find_element(By.ID, "question").text == QUESTION
        answers = ["left", "right", "same", "right", "left", "left"]
        for k, ((pair_id, left), answer) in enumerate(
                zip(rater_order(sid, rater, 6), answers, strict=True)):
            check_shown(k + 1, pair_id, left)
            if k == 2:
                browser.find_element(By.TAG_NAME, "body").send_keys("s")
            else:
                browser.find_element(By.ID, f"btn-{answer}").click()
        file1 = _wait_for_download(downloads, f"votes-{sid}-Jos_1.json")
        assert "6 of 6 pairs" in browser.find_element(By.ID, "done-text").text

        # Rater 2 answers two pairs (one by arrow key) and finishes early.
        start("bob")
        order2 = rater_order(sid, "bob", 6)
        check_shown(1, *order2[0])
        browser.find_element(By.ID, "btn-same").click()
        check_shown(2, *order2[1])
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
        wait.until(ec.element_to_be_clickable((By.ID, "btn-left")))
        browser.find_element(By.ID, "finish").click()
        file2 = _wait_for_download(downloads, f"votes-{sid}-bob.json")
    finally:
        browser.quit()

    assert json.loads(file2.read_text())["complete"] is False
    out = tmp_path / "analysis"
    with pytest.raises(SystemExit) as exit_info:
        main(["survey", "analyze", str(file1), str(file2), "--survey",
              str(tmp_path / "survey" / "survey.json"), "--out", str(out)])
    assert exit_info.value.code == 0
    got = pd.read_parquet(out / "survey_votes.parquet")
    given = [(rater, p, left, a) for (p, left), a in zip(rater_order(sid, rater, 6), answers,
                                                           strict=True)]
    given += [("bob", order2[0][0], order2[0][1], "same"),
              ("bob", order2[1][0], order2[1][1], "right")]
    assert list(zip(got["rater_id"], got["pair_id"], got["left"], got["answer"],
                    strict=True)) == given
    side = {("A", "left"): "A", ("A", "right"): "B", ("B", "left"): "B", ("B", "right"): "A"}
    assert list(got["chosen"]) == [side.get((g[2], g[3]), "same") for g in given]
    assert (got["time_ms"] >= 0).all() and (got["sample"] == got["pair_id"].map(sample_of)).all()
    split = pd.read_parquet(out / "survey_split.parquet").iloc[0]
    assert (split["n_raters"], split["n_votes"]) == (2, 8)
