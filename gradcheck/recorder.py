"""Turn GuidanceSteps into ``steps.parquet`` rows and ``vectors.safetensors`` (DESIGN.md §4).

:class:`StepRecorder` is a read-only observer of the sampler: it copies numbers out of each
:class:`~gradcheck.sampler.GuidanceStep` and never hands anything back, so recording cannot change
a sample. With an oracle (D8) it also computes ``cos_oracle`` from the step's x_t.
"""

from __future__ import annotations

import json
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
from gradcheck.guidance import cosine, flat_norm
from gradcheck.sampler import GuidanceStep
from gradcheck.utils import check_choice

RECORD_VECTORS = ("none", "subset", "all")
SUBSET_SAMPLES = 8  # DESIGN.md §4: the first 8 samples ...
SUBSET_EVERY = 10  # ... at every 10th step (and the last step, where the trajectory ends)
VECTOR_KEYS = (col.VEC_GRAD_RAW, col.VEC_GRAD_APPLIED, col.VEC_X0_HAT)

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


def vector_dtype(record_vectors: str) -> torch.dtype:
    """fp16 for the subset (DESIGN.md §4); float32 for ``all`` (exact, for recomputation)."""
    return torch.float32 if record_vectors == "all" else torch.float16


def expected_vector_bytes(
    record_vectors: str, num_samples: int, num_steps: int, image_shape: Sequence[int]
) -> int:
    """Size of vectors.safetensors' tensor data for these settings, in bytes."""
    samples, steps = vector_selection(record_vectors, num_samples, num_steps)
    per = int(np.prod(image_shape)) * vector_dtype(record_vectors).itemsize
    return len(samples) * len(steps) * per * len(VECTOR_KEYS)


class StepRecorder:
    """Observer collecting steps.parquet rows (every sample, every step) and selected vectors."""

    def __init__(
        self, run_id: str, num_samples: int, num_steps: int, record_vectors: str = "subset",
        oracle: torch.nn.Module | None = None,
    ) -> None:
        self.run_id = run_id
        self.record_vectors = record_vectors
        self.oracle = oracle
        samples, steps = vector_selection(record_vectors, num_samples, num_steps)
        self._vec_sample = {s: i for i, s in enumerate(samples)}
        self._vec_step = {k: i for i, k in enumerate(steps)}
        self._vec_t: dict[int, int] = {}
        self._vectors: dict[str, torch.Tensor] = {}
        self._chunks: list[dict[str, np.ndarray]] = []

    def __call__(self, step: GuidanceStep) -> None:
        """Record one step of one batch."""
        b = step.sample.shape[0]
        y = torch.full((b,), step.target, dtype=torch.long, device=step.log_probs.device)
        rows = torch.arange(b, device=y.device)
        if self.oracle is not None:
            oracle_grad = self.oracle.grad_log_prob(step.x_t, step.t, y)
            cos_oracle = cosine(step.grad_applied, oracle_grad).cpu().numpy()
        else:
            cos_oracle = np.full(b, np.nan)
        guided = bool(torch.isfinite(step.log_probs).any())
        self._chunks.append({
            col.SAMPLE: step.sample.numpy().astype(np.int32),
            col.STEP: np.full(b, step.step, dtype=np.int32),
            col.T: np.full(b, step.t, dtype=np.int32),
            col.ABAR: np.full(b, step.abar, dtype=np.float64),
            col.TARGET: np.full(b, step.target, dtype=np.int32),
            col.GRAD_NORM_RAW: _np(flat_norm(step.grad_raw)),
            col.GRAD_NORM_APPLIED: _np(flat_norm(step.grad_applied)),
            col.SCORE_NORM: _np(flat_norm(step.score)),
            col.COS_PREV_RAW: _np(step.cos_prev_raw),
            col.COS_PREV_APPLIED: _np(step.cos_prev_applied),
            col.COS_RAW_APPLIED: _np(cosine(step.grad_raw, step.grad_applied)),
            col.COS_SCORE: _np(cosine(step.grad_applied, step.score)),
            col.LOG_PROB_TARGET: _np(step.log_probs[rows, y]),
            col.PRED_CLASS: (step.log_probs.argmax(dim=1).cpu().numpy().astype(np.int32)
                             if guided else np.full(b, -1, dtype=np.int32)),
            col.PROB_TARGET_X0: _np(step.log_probs_x0[rows, y].exp()),
            col.COS_ORACLE: cos_oracle.astype(np.float64),
            col.GRAD_VANISHED: step.vanished.numpy().astype(bool),
        })
        self._keep_vectors(step)

    def _keep_vectors(self, step: GuidanceStep) -> None:
        """Copy the selected samples' vectors of a selected step into the preallocated store."""
        j = self._vec_step.get(step.step)
        if j is None:
            return
        local = [i for i, s in enumerate(step.sample.tolist()) if s in self._vec_sample]
        if not local:
            return
        self._vec_t[step.step] = step.t
        dtype = vector_dtype(self.record_vectors)
        if not self._vectors:
            shape = (len(self._vec_sample), len(self._vec_step), *step.grad_raw.shape[1:])
            self._vectors = {k: torch.zeros(shape, dtype=dtype) for k in VECTOR_KEYS}
        rows = [self._vec_sample[int(step.sample[i])] for i in local]
        for key, v in ((col.VEC_GRAD_RAW, step.grad_raw), (col.VEC_GRAD_APPLIED, step.grad_applied),
                       (col.VEC_X0_HAT, step.x0_hat)):
            self._vectors[key][rows, j] = v[local].to(device="cpu", dtype=dtype)

    def frame(self) -> pd.DataFrame:
        """All rows so far as a typed DataFrame, sorted by (sample, step)."""
        return self.table().to_pandas()

    def table(self, config: dict[str, Any] | None = None) -> pa.Table:
        """All rows as a pyarrow Table with the run config JSON in the schema metadata."""
        data = {name: np.concatenate([c[name] for c in self._chunks]) if self._chunks
                else np.zeros(0) for name in col.STEP_COLUMNS if name != col.RUN_ID}
        order = np.lexsort((data[col.STEP], data[col.SAMPLE]))
        arrays = [pa.array(np.full(len(order), self.run_id, dtype=object), pa.string())]
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
        steps = sorted(self._vec_step, key=self._vec_step.get)
        return {
            **{k: v.contiguous() for k, v in self._vectors.items()},
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


def _np(v: torch.Tensor) -> np.ndarray:
    return v.detach().double().cpu().numpy()


def read_steps_config(path: str | Path) -> dict[str, Any]:
    """The run config stored in a steps.parquet's schema metadata."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(col.CONFIG_METADATA_KEY.encode(), b"{}"))
