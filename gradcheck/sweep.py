"""``gradcheck sweep``: the paper's grids over seeds as many ``gradcheck run``s.

Runs are ordered seeds outermost (:func:`grid_configs`) and named by ``runner.default_run_id``;
run folders (and ``records``) appear only when complete, so an existing one is skipped and a
killed sweep resumes by running the same command again. Shard i of n takes units i, i + n, ...
of that order; a unit is one seed's group of runs sampled together, or a single run when there
are fewer groups than shards (README, "Commands").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from gradcheck.config import RunConfig, SweepConfig
from gradcheck.models import GUIDING_KINDS
from gradcheck.utils import GradcheckError, check_choice

T = TypeVar("T")

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""GradCheck App. C.1 and Kawar et al. Table 5 (0.25-2) extended to 8."""

SCALE_CLASSIFIERS = GUIDING_KINDS
"""Vanilla vs robust (GradCheck's noisy-trained and Kawar's adversarially trained)."""

SCALE_X0_CLASSIFIERS = ("nonrobust", "robust")
"""Table 1's classifiers: the scale of its best configuration (x0-estimate + ADAM) justified too."""

GRIDS = ("table1", "scales", "scales-x0", "d5-norm", "stabilizers", "classifiers")
"""Grid names (what each varies: :func:`_grid_points`, `gradcheck sweep --help`)."""

SCALE_GRIDS = ("scales", "scales-x0", "d5-norm")
"""Grids that set the scale themselves."""


def _grid_points(grid: str) -> list[dict[str, Any]]:
    """The config fields each run of one seed of ``grid`` sets, in run order."""
    from gradcheck.stabilizers import STABILIZERS

    check_choice("grid", grid, GRIDS)
    plain = dict(x0_estimate=False, stabilizer="none")
    if grid == "table1":
        return [dict(classifier=c, x0_estimate=x, stabilizer=s)
                for c in ("robust", "nonrobust") for x in (False, True) for s in ("none", "adam")]
    if grid == "scales":
        return [dict(classifier=c, scale=s, **plain) for c in SCALE_CLASSIFIERS for s in SCALES]
    if grid == "scales-x0":
        return [dict(classifier=c, x0_estimate=True, stabilizer="adam", scale=s)
                for c in SCALE_X0_CLASSIFIERS for s in SCALES]
    if grid == "d5-norm":
        return [dict(classifier="nonrobust", normalize=True, normalize_to=n, scale=s, **plain)
                for n in ("score", "eps") for s in SCALES]
    if grid == "stabilizers":
        return [dict(classifier="nonrobust", x0_estimate=True, stabilizer=s) for s in STABILIZERS]
    return [dict(classifier=c, **plain) for c in (*GUIDING_KINDS, "oracle")]


def grid_configs(grid: str, seeds: int | Sequence[int], base: RunConfig) -> list[RunConfig]:
    """The ordered run configs of ``grid``: seeds ``0..seeds-1`` (or the given seeds), outermost;
    other fields come from ``base``, with open sizes the paper's 64 x 1,000 on every device."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise GradcheckError(f"seeds must be >= 1, got {seeds}")
    if len(set(seed_list)) != len(seed_list):
        raise GradcheckError(f"seeds repeat: {seed_list}")
    points = _grid_points(grid)
    if base.protocol == "auto":
        from gradcheck.runner import PAPER_SIZE

        base = dataclasses.replace(base, num_samples=base.num_samples or PAPER_SIZE[0],
                                   steps=base.steps or PAPER_SIZE[1])
    return [dataclasses.replace(base, seed=s, **p) for s in seed_list for p in points]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n (shards are 0-based, like RANK)."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise GradcheckError(f"shard {text!r} must look like i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise GradcheckError(f"shard {text!r} needs 0 <= i < n (shards are 0-based: 0/{max(n, 1)}"
                             f" .. {max(n, 1) - 1}/{max(n, 1)})")
    return i, n


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise GradcheckError(f"environment variable {name}={v!r} is not an integer") from None


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's (i, n) from torchrun/accelerate ranks and/or a SLURM array; (0, 1) else."""
    env = os.environ if env is None else env
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if rank is None or world is None:
        rank, world = _env_int(env, "LOCAL_RANK"), _env_int(env, "LOCAL_WORLD_SIZE")
    if rank is None or world is None:
        rank, world = 0, 1
    task, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        task_index, count = 0, 1
    else:
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        task_index = (task - (_env_int(env, "SLURM_ARRAY_TASK_MIN") or 0)) // step
    if not (0 <= rank < world and 0 <= task_index < count):
        raise GradcheckError(f"launcher environment gives process {rank} of {world} and array "
                             f"task {task_index} of {count}; pass --shard i/n explicitly")
    return task_index * world + rank, count * world


def shard(configs: Sequence[T], i: int, n: int) -> list[T]:
    """Shard i of n (0-based) of an ordered list: items i, i + n, i + 2n, ..."""
    if n < 1 or not 0 <= i < n:
        raise GradcheckError(f"shard {i}/{n} needs 0 <= i < n")
    return list(configs[i::n])


def group_configs(configs: Sequence[RunConfig]) -> list[list[RunConfig]]:
    """The configs grouped by :func:`runner.shared_key` (sampled together), order kept."""
    from gradcheck import runner

    groups: dict[tuple, list[RunConfig]] = {}
    for c in configs:
        groups.setdefault(runner.shared_key(c), []).append(c)
    return list(groups.values())


def is_finished(run_dir: Path) -> bool:
    """A run folder exists only once complete (the runner renames it into place at the end)."""
    return (run_dir / "config.json").is_file()


@dataclass(frozen=True)
class SweepResult:
    """Run ids of a sweep (this shard's): every one planned, those run now, those found done."""

    planned: tuple[str, ...]
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    shard: tuple[int, int]


def _use_local_gpu(env: Mapping[str, str]) -> None:
    """Put each launched process on its own GPU, so run configs (and ids) stay the same."""
    import torch

    local = _env_int(env, "LOCAL_RANK")
    if local is not None and torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())


def run_sweep(
    cfg: SweepConfig, base: RunConfig, out: str | Path = "runs", progress: bool = True,
) -> SweepResult:
    """Run this process's shard (``cfg.shard`` 'i/n', else :func:`shard_from_env`) of a sweep
    into ``out``, skipping finished runs; a failing run stops it, finished runs stay."""
    from gradcheck import runner
    from gradcheck.report import write_records

    i, n = parse_shard(cfg.shard) if cfg.shard else shard_from_env()
    configs = grid_configs(cfg.grid, cfg.seeds, base)
    groups = group_configs(configs) if cfg.batch_configs else []
    if cfg.batch_configs and n <= len(groups):
        configs = [c for group in shard(groups, i, n) for c in group]
    else:  # one run at a time, or more shards than seeds: no shard may sit idle
        configs = shard(configs, i, n)
    out = Path(out)
    records = Path(cfg.records) if cfg.records else None
    ids = [runner.default_run_id(c) for c in configs]
    if len(set(ids)) != len(ids):
        raise GradcheckError("two runs of the sweep share a run id; this is a bug in "
                             "runner.default_run_id")
    if n > 1:
        _use_local_gpu(os.environ)
    run_id_of = dict(zip(configs, ids, strict=True))  # RunConfig is frozen, so hashable
    ran, skipped, todo = [], [], []
    for run_cfg, run_id in run_id_of.items():
        recorded = records is not None and is_finished(records / run_id)
        if is_finished(out / run_id):
            skipped.append(run_id)
            if records is not None and not recorded:  # finished before records were asked for
                write_records([out / run_id], records)
        elif recorded:
            skipped.append(run_id)
        else:
            todo.append(run_cfg)
    # Configurations of one seed (and sizes) are sampled together: same samples, fewer calls.
    groups = group_configs(todo) if cfg.batch_configs else [[c] for c in todo]
    bar = tqdm(total=len(todo), desc=f"sweep {cfg.grid} {i}/{n}", unit="run",
               disable=not progress)
    for group in groups:
        names = [run_id_of[c] for c in group]
        bar.set_postfix_str(names[0] if len(group) == 1 else f"{len(group)} runs together")
        runner.run_many(group, out=out, names=names, overwrite=False, progress=False)
        if records is not None:
            write_records([out / name for name in names], records)
        ran.extend(names)
        bar.update(len(group))
    bar.close()
    return SweepResult(tuple(ids), tuple(ran), tuple(skipped), (i, n))
