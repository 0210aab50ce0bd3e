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
    scale_note: str = ""  # what the CPU scale (32x32, a 3M-parameter UNet) may change


FINDINGS: tuple[Finding, ...] = (
    Finding(
        key="1",
        source="GradCheck §4, Figure 1",
        claim="Robust guidance has high, steady cos_prev; non-robust guidance is near orthogonal "
        "between steps.",
        test="robust (no x0, no ADAM): mean cos_prev_applied >= 0.5 and the standard deviation of "
        "its per-step mean over t <= 0.25; non-robust (no x0, no ADAM): |mean cos_prev_applied| "
        "<= 0.2 (95% intervals over seeds on the right side of each bound; one seed: its "
        "values).",
        scale_note="At 32x32 (D = 3,072, not 12,288) and with classifiers trained for minutes, "
        "gradients may be smoother, which raises cosines of every kind: the gap to the null "
        "baseline matters more than the level.",
    ),
    Finding(
        key="2",
        source="GradCheck §4, Figure 2, Table 1",
        claim="The x0-estimate helps non-robust guidance (lower FID, higher accuracy).",
        test="non-robust + x0 vs non-robust: FID lower and accuracy higher, each paired by seed, "
        "the 95% t-interval over seeds of the paired difference excluding 0.",
        scale_note="The x0-estimate is only as good as the 3M-parameter DDPM's denoising at "
        "large t; a weaker denoiser gives blurrier estimates, which may shrink or grow the gain.",
    ),
    Finding(
        key="3",
        source="GradCheck §4, Figure 2, Table 1",
        claim="x0-estimate + ADAM is best for non-robust guidance; ADAM alone changes little.",
        test="non-robust + x0 + ADAM has lower FID and higher accuracy than each other non-robust "
        "configuration (paired, interval excluding 0); the interval of non-robust + ADAM minus "
        "non-robust lies within 10% of its FID and 5 accuracy points.",
        scale_note="ADAM smooths noisy raw gradients; classifiers trained for minutes on 32x32 "
        "shapes may be noisier or smoother than the paper's, which moves what ADAM can add.",
    ),
    Finding(
        key="4",
        source="GradCheck §4, Figure 3, Table 1",
        claim="x0-estimate + ADAM over-regularises robust guidance (higher cos_prev but worse "
        "FID and accuracy).",
        test="robust + x0 + ADAM vs robust: FID higher and accuracy lower, paired by seed, the "
        "95% t-interval over seeds of the paired difference excluding 0.",
        scale_note="Over-regularisation needs robust gradients that are already steady; a robust "
        "classifier trained for 3 epochs may be less steady than the paper's, leaving ADAM more "
        "to smooth.",
    ),
    Finding(
        key="K",
        source="Kawar et al. 2023, Table 5",
        claim="Robust (adversarially trained) guidance beats vanilla guidance at every scale.",
        test="adversarial vs non-robust, no x0, no ADAM: lower FID at every scale both were run "
        "with (scale sweep), paired by seed, each interval excluding 0.",
        scale_note="Kawar et al. measured 256x256 ImageNet; on 32x32 shapes with an "
        "adversarially trained classifier of one epoch the gap may be smaller.",
    ),
)
"""GradCheck's four findings (docs/metrics.md) and Kawar et al.'s scale-sweep claim."""

VERDICTS = ("holds", "does not hold", "inconclusive", "not testable with these runs")
"""A comparison holds when the 95% interval over seeds of every paired difference lies on the
claimed side of 0, does not hold when one lies on the other side, and is inconclusive otherwise:
one seed gives no interval, so a comparison of one seed is inconclusive and its direction is
reported."""
