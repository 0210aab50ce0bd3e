"""Where gradcheck looks for the shipped reference checkpoints and the data set by default.

Two reference sets ship with the repository (docs/scales.md): ``sportballs-v1`` at paper scale
(64x64, 22.4M-parameter UNet, trained on a GPU) and ``sportballs32-v1`` at CPU scale (32x32,
3.2M-parameter UNet, trained on two CPU cores). Without a choice, a machine with a GPU uses the
paper set and one without uses the CPU set. ``GRADCHECK_CHECKPOINTS`` (a set name or a folder;
the ``--checkpoints`` option sets it) chooses for every command; each set has its own data set.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout holding the package; the shipped checkpoints live in its checkpoints/ folder."""

REFERENCE_SETS: dict[str, dict[str, object]] = {
    "sportballs-v1": {"image_size": 64, "data_root": "datasets/sportballs", "scale": "paper"},
    "sportballs32-v1": {"image_size": 32, "data_root": "datasets/sportballs32", "scale": "cpu"},
}
"""The shipped sets: image size, the data set they were trained on, and their scale."""
PAPER_SET, CPU_SET = "sportballs-v1", "sportballs32-v1"

DATA_ROOT = "datasets/sportballs"
"""The 64x64 data set's default root, relative to the working directory."""


def data_root_for(image_size: int) -> str:
    """The default data set root of an image size: datasets/sportballs (64), .../sportballsN."""
    return DATA_ROOT if image_size == 64 else f"{DATA_ROOT}{image_size}"


def checkpoint_set_name() -> str:
    """The chosen set as given: GRADCHECK_CHECKPOINTS, else the paper set on a GPU and the CPU
    set without one."""
    chosen = os.environ.get("GRADCHECK_CHECKPOINTS")
    if chosen:
        for name in REFERENCE_SETS:  # a shipped set given by its folder is that set
            if chosen != name and Path(chosen).resolve() == REPO_ROOT / "checkpoints" / name:
                return name
        return chosen
    import torch

    return PAPER_SET if torch.cuda.is_available() else CPU_SET


def checkpoint_set(name: str | None = None) -> Path:
    """The folder of a reference set: ``name`` (a set name or folder), else the chosen one
    (:func:`checkpoint_set_name`)."""
    name = name or checkpoint_set_name()
    return REPO_ROOT / "checkpoints" / name if name in REFERENCE_SETS else Path(name)


def checkpoint_set_image_size() -> int:
    """The image size of the chosen set: its registry entry, else its DDPM's config, else 64."""
    name = checkpoint_set_name()
    if name in REFERENCE_SETS:
        return int(REFERENCE_SETS[name]["image_size"])
    import json

    try:
        config = json.loads((checkpoint_set() / "ddpm" / "unet" / "config.json").read_text())
        return int(config["sample_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 64


def default_data_root() -> Path:
    """The data set root: GRADCHECK_DATA when set (read at each call, as the CLI reads it),
    else the data set of the chosen checkpoint set's image size."""
    return Path(os.environ.get("GRADCHECK_DATA") or data_root_for(checkpoint_set_image_size()))


def default_ddpm() -> Path:
    """The shipped DDPM pipeline folder of the chosen set."""
    return checkpoint_set() / "ddpm"


def default_classifier(kind: str, checkpoints: str | None = None) -> Path:
    """The shipped classifier folder of one kind (nonrobust, robust, adversarial, judge) in
    the set ``checkpoints`` (default: the chosen set)."""
    return checkpoint_set(checkpoints) / "classifiers" / kind
