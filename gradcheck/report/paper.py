"""What the papers report: GradCheck Table 1 (docs/metrics.md) and the findings the report checks.

Values are copied from the papers, not computed; accuracies are fractions (0.9688 = 96.88%).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

TABLE1_KEYS = ("classifier", "x0_estimate", "stabilizer")
"""The run-config fields that identify a row of GradCheck Table 1."""

PAPER_TABLE1 = pd.DataFrame(
    [
        # classifier, x0_estimate, stabilizer, FID, accuracy of the guiding classifier
        ("robust", False, "none", 26.641, 0.9688),
        ("robust", True, "none", 38.053, 0.8125),
        ("robust", False, "adam", 26.575, 0.9219),
        ("robust", True, "adam", 34.484, 0.7813),
        ("nonrobust", False, "none", 126.526, 0.1563),
        ("nonrobust", True, "none", 103.301, 0.3906),
        ("nonrobust", False, "adam", 127.526, 0.1563),
        ("nonrobust", True, "adam", 24.348, 0.8594),
    ],
    columns=[*TABLE1_KEYS, "paper_fid", "paper_accuracy"],
)
"""GradCheck (Vaeth 2024) Table 1: target class baseball, N = 64 vs 64 training images, Inception
FID, accuracy by the guiding classifier, batch 64, 1,000 DDPM steps."""

PAPER_PROTOCOL = (
    "GradCheck Table 1: target baseball, 64 samples vs 64 training images of the class, "
    "Inception-v3 FID, accuracy by the guiding classifier, 1,000 sampling steps, one seed"
)

PAPER_CLASSIFIER_ACCURACY = pd.DataFrame(
    [
        ("nonrobust", "clean", 0.992),
        ("nonrobust", "noisy latents", 0.2665),
        ("robust", "clean", 0.99),
        ("robust", "noisy latents", 0.641),
    ],
    columns=["classifier", "input", "paper_accuracy"],
)
"""GradCheck §3.3: validation accuracy of the guiding classifiers."""


@dataclass(frozen=True)
class Finding:
    """A claim of a paper that the report tests against the runs."""

    key: str
    source: str
    claim: str
    test: str


FINDINGS: tuple[Finding, ...] = (
    Finding(
        key="1",
        source="GradCheck §4, Figure 1",
        claim="Robust guidance has high, steady cos_prev; non-robust guidance is near orthogonal "
        "between steps.",
        test="robust (no x0, no ADAM): mean cos_prev_applied >= 0.5 and the standard deviation of "
        "its per-step mean over t <= 0.25; non-robust (no x0, no ADAM): |mean cos_prev_applied| "
        "<= 0.2.",
    ),
    Finding(
        key="2",
        source="GradCheck §4, Figure 2, Table 1",
        claim="The x0-estimate helps non-robust guidance (lower FID, higher accuracy).",
        test="non-robust + x0 vs non-robust: FID lower and accuracy higher, each paired by seed; "
        "with >= 2 seeds the 95% t-interval of the paired difference must exclude 0.",
    ),
    Finding(
        key="3",
        source="GradCheck §4, Figure 2, Table 1",
        claim="x0-estimate + ADAM is best for non-robust guidance; ADAM alone changes little.",
        test="non-robust + x0 + ADAM has lower FID and higher accuracy than each other non-robust "
        "configuration (paired, interval excluding 0 with >= 2 seeds); non-robust + ADAM differs "
        "from non-robust by at most 10% of its FID and 5 accuracy points (means).",
    ),
    Finding(
        key="4",
        source="GradCheck §4, Figure 3, Table 1",
        claim="x0-estimate + ADAM over-regularises robust guidance (higher cos_prev but worse "
        "FID and accuracy).",
        test="robust + x0 + ADAM vs robust: FID higher and accuracy lower, paired by seed; with "
        ">= 2 seeds the 95% t-interval of the paired difference must exclude 0.",
    ),
    Finding(
        key="K",
        source="Kawar et al. 2023, Table 5",
        claim="Robust (adversarially trained) guidance beats vanilla guidance at every scale.",
        test="adversarial vs non-robust, no x0, no ADAM: lower mean FID at every scale both were "
        "run with (scale sweep).",
    ),
)
"""GradCheck's four findings (docs/metrics.md) and Kawar et al.'s scale-sweep claim."""

VERDICTS = ("supported", "not supported", "not testable with these runs")
