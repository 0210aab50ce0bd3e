"""Where gradcheck looks for the shipped reference checkpoints and the data set by default."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout holding the package; the shipped checkpoints live in its checkpoints/ folder."""

DEFAULT_CHECKPOINTS = Path(
    os.environ.get("GRADCHECK_CHECKPOINTS", REPO_ROOT / "checkpoints" / "sportballs-v1")
)
"""Reference checkpoints (DESIGN.md §1); override with GRADCHECK_CHECKPOINTS."""

DEFAULT_DATA_ROOT = Path(os.environ.get("GRADCHECK_DATA", "datasets/sportballs"))
"""Data set root, relative to the working directory; override with GRADCHECK_DATA."""


def default_ddpm() -> Path:
    """The shipped DDPM pipeline folder."""
    return DEFAULT_CHECKPOINTS / "ddpm"


def default_classifier(kind: str) -> Path:
    """The shipped classifier folder of one kind (nonrobust, robust, adversarial, judge)."""
    return DEFAULT_CHECKPOINTS / "classifiers" / kind
