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

DATA_ROOT = "datasets/sportballs"
"""The data set root's default, relative to the working directory."""


def default_data_root() -> Path:
    """The data set root: GRADCHECK_DATA when set (read at each call, as the CLI reads it),
    else :data:`DATA_ROOT`."""
    return Path(os.environ.get("GRADCHECK_DATA") or DATA_ROOT)


def default_ddpm() -> Path:
    """The shipped DDPM pipeline folder."""
    return DEFAULT_CHECKPOINTS / "ddpm"


def default_classifier(kind: str) -> Path:
    """The shipped classifier folder of one kind (nonrobust, robust, adversarial, judge)."""
    return DEFAULT_CHECKPOINTS / "classifiers" / kind
