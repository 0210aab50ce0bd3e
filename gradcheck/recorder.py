"""Turn GuidanceSteps into ``steps.parquet`` rows and ``vectors.safetensors`` (docs/formats.md).

:class:`StepRecorder` is a read-only observer of the sampler: it copies numbers out of each
:class:`~gradcheck.sampler.GuidanceStep` and never hands anything back, so recording cannot change
a sample. With an oracle (D8) it also computes ``cos_oracle`` from the step's x_t, for every
sample and step or, where the oracle is slow (a CPU), for the vector subset's samples and steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from gradcheck import columns as col
from gradcheck.guidance import cosine, flat_norm, log_prob_gradient, picked
from gradcheck.sampler import GuidanceStep
from gradcheck.utils import check_choice

RECORD_VECTORS = ("none", "subset", "all")
SUBSET_SAMPLES = 8  # docs/formats.md: the first 8 samples ...
SUBSET_EVERY = 10  # ... at every 10th step (and the last step, where the trajectory ends)
VECTOR_KEYS = (col.VEC_GRAD_RAW, col.VEC_GRAD_APPLIED, col.VEC_X0_HAT)
PIN_LIMIT_BYTES = 2**30  # vector stores up to 1 GiB are pinned for asynchronous copies

SCHEMA = pa.schema([
    (col.RUN_ID, pa.string()),
    (col.SAMPLE, pa.int32()),
    (col.STEP, pa.int32()),
    (col.T, pa.int32()),
    (col.ABAR, pa.float64()),
    (col.TARGET, pa.int32()),
    (col.GRAD_NORM_RAW, pa.float64()),
    (col.GRAD_NORM_APPLIED, pa.float64()),
    (col.SCORE_NORM, pa.float64()),
    (col.COS_PREV_RAW, pa.float64()),
    (col.COS_PREV_APPLIED, pa.float64()),
    (col.COS_RAW_APPLIED, pa.float64()),
    (col.COS_SCORE, pa.float64()),
    (col.LOG_PROB_TARGET, pa.float64()),
    (col.PRED_CLASS, pa.int32()),
    (col.PROB_TARGET_X0, pa.float64()),
    (col.COS_ORACLE, pa.float64()),
    (col.GRAD_VANISHED, pa.bool_()),
    (col.COS_PREV_NULL, pa.float64()),
    (col.X_NORM_RATIO, pa.float64()),
])
"""steps.parquet's typed columns, in :data:`gradcheck.columns.STEP_COLUMNS` order."""


def vector_selection(
    record_vectors: str, num_samples: int, num_steps: int
) -> tuple[list[int], list[int]]:
    """(sample indices, step indices k) whose vectors are kept, for a record_vectors mode."""
    check_choice("record_vectors", record_vectors, RECORD_VECTORS)
    if record_vectors == "none":
        return [], []
    if record_vectors == "all":
        return list(range(num_samples)), list(range(num_steps))
    steps = sorted(set(range(0, num_steps, SUBSET_EVERY)) | {num_steps - 1})
    return list(range(min(SUBSET_SAMPLES, num_samples))), steps


def vector_dtype(record_vectors: str, key: str) -> torch.dtype:
    """How a kept vector is stored: g_t in float64 (a sure classifier's is below float32's
    range: guidance.unscale), gtilde_t in float32, the x0-estimate in float32 (float16 in the
    subset: values up to a few hundred at t = 999)."""
    check_choice("record_vectors", record_vectors, RECORD_VECTORS)
    if key == col.VEC_GRAD_RAW:
        return torch.float64
    if record_vectors == "subset" and key == col.VEC_X0_HAT:
        return torch.float16
    return torch.float32


def expected_vector_bytes(
    record_vectors: str, num_samples: int, num_steps: int, image_shape: Sequence[int]
) -> int:
    """Size of vectors.safetensors' tensor data for these settings, in bytes."""
    samples, steps = vector_selection(record_vectors, num_samples, num_steps)
    per = int(np.prod(image_shape))
    return len(samples) * len(steps) * per * sum(vector_dtype(record_vectors, k).itemsize
                                                 for k in VECTOR_KEYS)


FLOAT_COLUMNS = (
    col.GRAD_NORM_RAW, col.GRAD_NORM_APPLIED, col.SCORE_NORM, col.COS_PREV_RAW,
    col.COS_PREV_APPLIED, col.COS_RAW_APPLIED, col.COS_SCORE, col.LOG_PROB_TARGET,
    col.PROB_TARGET_X0, col.COS_ORACLE, col.COS_PREV_NULL, col.X_NORM_RATIO,
)
"""Per-(sample, step) quantities computed on the sampling device, as float64."""


class StepRecorder:
    """Observer collecting steps.parquet rows (every sample, every step) and selected vectors.
    Nothing per step waits for the device: quantities stay where the sample lives, vectors are
    copied asynchronously into pinned memory, and both reach the host once, when asked for."""

    def __init__(
        self, run_id: str, num_samples: int, num_steps: int, record_vectors: str = "subset",
        oracle: torch.nn.Module | None = None, oracle_subset: bool = False,
    ) -> None:
        self.run_id = run_id
        self.record_vectors = record_vectors
        self.oracle = oracle
        self._oracle_at = None  # None: every sample and step; else (samples, steps) as for vectors
        if oracle_subset:
            self._oracle_at = tuple(map(set, vector_selection("subset", num_samples, num_steps)))
        samples, steps = vector_selection(record_vectors, num_samples, num_steps)
        self._vec_sample = {s: i for i, s in enumerate(samples)}
        self._vec_step = {k: i for i, k in enumerate(steps)}
        self._vec_t: dict[int, int] = {}
        self._vectors: dict[str, torch.Tensor] = {}  # (steps, samples, C, H, W) while recording
        self._chunks: list[tuple[np.ndarray, int, int, float, int, torch.Tensor, torch.Tensor]]
        self._chunks = []
        self._device: torch.device | None = None

    def _oracle_direction(self, x_t: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        """The direction of the oracle's grad log q(y | x_t) (D8), float64: exact at margins
        where the gradient itself is below float64's range (guidance.logit_cotangent)."""
        return log_prob_gradient(self.oracle, x_t.double(), y, t)[0]

    def __call__(self, step: GuidanceStep) -> None:
        """Record one step of one batch."""
        b = step.sample.shape[0]
        device = step.grad_raw.device
        self._device = device
        y = torch.full((b,), step.target, dtype=torch.long, device=device)
        cos_oracle = torch.full((b,), float("nan"), dtype=torch.float64, device=device)
        if self.oracle is not None and self._oracle_at is None:
            cos_oracle = cosine(step.grad_applied, self._oracle_direction(step.x_t, step.t, y))
        elif self.oracle is not None and step.step in self._oracle_at[1]:
            rows = [i for i, s in enumerate(step.sample.tolist()) if s in self._oracle_at[0]]
            if rows:
                cos_oracle[rows] = cosine(step.grad_applied[rows],
                                          self._oracle_direction(step.x_t[rows], step.t, y[rows]))
        values = {
            col.GRAD_NORM_RAW: flat_norm(step.grad_raw),
            col.GRAD_NORM_APPLIED: flat_norm(step.grad_applied),
            col.SCORE_NORM: flat_norm(step.score),
            col.COS_PREV_RAW: step.cos_prev_raw,
            col.COS_PREV_APPLIED: step.cos_prev_applied,
            col.COS_RAW_APPLIED: cosine(step.grad_direction, step.grad_applied),
            col.COS_SCORE: cosine(step.grad_applied, step.score),
            col.LOG_PROB_TARGET: picked(step.log_probs, y),
            col.PROB_TARGET_X0: picked(step.log_probs_x0, y).exp(),
            col.COS_ORACLE: cos_oracle,
            col.COS_PREV_NULL: step.cos_prev_null,
            col.X_NORM_RATIO: step.x_norm_ratio,
        }
        floats = torch.stack([values[name].to(device=device, dtype=torch.float64)
                              for name in FLOAT_COLUMNS], dim=1)
        pred = (step.log_probs.argmax(dim=1) if step.guided
                else torch.full((b,), -1, dtype=torch.long, device=device))
        ints = torch.stack([pred, step.vanished.to(torch.long)], dim=1)
        self._chunks.append((step.sample.numpy().astype(np.int32), step.step, step.t, step.abar,
                             step.target, floats, ints))
        self._keep_vectors(step)

    def _keep_vectors(self, step: GuidanceStep) -> None:
        """Copy the selected samples' vectors of a selected step into the (pinned) store."""
        j = self._vec_step.get(step.step)
        if j is None:
            return
        local = [i for i, s in enumerate(step.sample.tolist()) if s in self._vec_sample]
        if not local:
            return
        self._vec_t[step.step] = step.t
        if not self._vectors:
            shape = (len(self._vec_step), len(self._vec_sample), *step.grad_raw.shape[1:])
            dtypes = {k: vector_dtype(self.record_vectors, k) for k in VECTOR_KEYS}
            # Pinned (page-locked) host memory makes the copies asynchronous; a larger store
            # stays in ordinary memory (its copies then wait for the device) so as not to lock
            # gigabytes of RAM (``all`` on the paper protocol is 12.6 GB per run).
            size = math.prod(shape) * sum(d.itemsize for d in dtypes.values())
            pin = step.grad_raw.is_cuda and size <= PIN_LIMIT_BYTES
            self._vectors = {k: torch.zeros(shape, dtype=d, pin_memory=pin)
                             for k, d in dtypes.items()}
        rows = [self._vec_sample[int(step.sample[i])] for i in local]
        # Samples of a batch are consecutive indices: then one contiguous block per key.
        if rows == list(range(rows[0], rows[0] + len(rows))) and \
                local == list(range(local[0], local[0] + len(local))):
            blocks = [(rows[0], slice(local[0], local[-1] + 1))]
        else:
            blocks = [(r, slice(i, i + 1)) for r, i in zip(rows, local, strict=True)]
        for key, v in ((col.VEC_GRAD_RAW, step.grad_raw), (col.VEC_GRAD_APPLIED, step.grad_applied),
                       (col.VEC_X0_HAT, step.x0_hat)):
            for first, src in blocks:
                block = v[src].to(self._vectors[key].dtype)
                self._vectors[key][j, first:first + block.shape[0]].copy_(block, non_blocking=True)

    def _sync(self) -> None:
        """Wait for the asynchronous copies (on the sampling device) before the host reads."""
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def frame(self) -> pd.DataFrame:
        """All rows so far as a typed DataFrame, sorted by (sample, step)."""
        return self.table().to_pandas()

    def table(self, config: dict[str, Any] | None = None) -> pa.Table:
        """All rows as a pyarrow Table with the run config JSON in the schema metadata."""
        n = sum(len(c[0]) for c in self._chunks)
        data: dict[str, np.ndarray] = {}
        if self._chunks:
            floats = torch.cat([c[5] for c in self._chunks]).cpu().numpy()  # one copy per run
            ints = torch.cat([c[6] for c in self._chunks]).cpu().numpy()
            data[col.SAMPLE] = np.concatenate([c[0] for c in self._chunks])
            for name, i in ((col.STEP, 1), (col.T, 2), (col.TARGET, 4)):
                data[name] = np.concatenate([np.full(len(c[0]), c[i], dtype=np.int32)
                                             for c in self._chunks])
            data[col.ABAR] = np.concatenate([np.full(len(c[0]), c[3], dtype=np.float64)
                                             for c in self._chunks])
            for j, name in enumerate(FLOAT_COLUMNS):
                data[name] = floats[:, j]
            data[col.PRED_CLASS] = ints[:, 0].astype(np.int32)
            data[col.GRAD_VANISHED] = ints[:, 1].astype(bool)
        else:
            data = {name: np.zeros(0) for name in col.STEP_COLUMNS if name != col.RUN_ID}
        order = np.lexsort((data[col.STEP], data[col.SAMPLE]))
        arrays = [pa.array(np.full(n, self.run_id, dtype=object), pa.string())]
        arrays += [pa.array(data[f.name][order], f.type) for f in SCHEMA if f.name != col.RUN_ID]
        meta = {col.CONFIG_METADATA_KEY: json.dumps(config or {}, sort_keys=True, default=str)}
        return pa.Table.from_arrays(arrays, schema=SCHEMA.with_metadata(meta))

    def write_steps(self, path: str | Path, config: dict[str, Any] | None = None) -> None:
        """Write steps.parquet."""
        pq.write_table(self.table(config), path)

    def vectors(self) -> dict[str, torch.Tensor]:
        """The kept vectors (samples, steps, 3, H, W) and their sample, step and t indices."""
        if not self._vectors:
            return {}
        self._sync()
        steps = sorted(self._vec_step, key=self._vec_step.get)
        return {
            **{k: v.transpose(0, 1).contiguous() for k, v in self._vectors.items()},
            col.VEC_SAMPLE: torch.tensor(sorted(self._vec_sample, key=self._vec_sample.get)),
            col.VEC_STEP: torch.tensor(steps),
            col.VEC_T: torch.tensor([self._vec_t.get(k, -1) for k in steps]),
        }

    def write_vectors(self, path: str | Path, metadata: dict[str, str] | None = None) -> bool:
        """Write vectors.safetensors; False (and no file) when nothing was selected."""
        tensors = self.vectors()
        if not tensors:
            return False
        meta = {"run_id": self.run_id, "record_vectors": self.record_vectors, **(metadata or {})}
        save_file(tensors, str(path), metadata=meta)
        return True


def read_steps_config(path: str | Path) -> dict[str, Any]:
    """The run config stored in a steps.parquet's schema metadata."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(col.CONFIG_METADATA_KEY.encode(), b"{}"))
