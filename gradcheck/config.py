"""Frozen dataclasses, one per stage. Field names equal CLI option names and parquet columns.

Each field's comment says where its default comes from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths and tuples become strings and lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass from :func:`config_to_dict` output, ignoring unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k in names:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def save_config(cfg: Any, path: str | Path, **extra: Any) -> None:
    """Write a config (and extra top-level keys such as versions) as JSON."""
    Path(path).write_text(json.dumps({**config_to_dict(cfg), **extra}, indent=2) + "\n")


# ---- stage configs: each section belongs to the module named in its header -----------------
# [dataset: data/sportballs.py]
# [train-ddpm: train_ddpm.py]
# [train-classifier: train_classifier.py]
# [run: sampler.py]
# [metrics: metrics.py]
# [sweep: sweep.py]
