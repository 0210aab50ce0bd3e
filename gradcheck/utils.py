"""Small shared helpers: user errors, atomic output folders, devices, seeds, run metadata."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class GradcheckError(ValueError):
    """A user error: one line naming the bad value and what is allowed (the CLI exits 2)."""


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise a GradcheckError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise GradcheckError(f"unknown {name} {value!r}; choose one of: "
                             f"{', '.join(map(str, allowed))}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise a GradcheckError unless ``value`` is finite and > 0 (>= 0 with ``allow_zero``)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise GradcheckError(f"{name} must be {bound}, got {value}")


def check_fields(cfg: Any, *names: str, allow_zero: bool = False) -> None:
    """:func:`check_positive` on each named field of ``cfg`` that is set (None: not given)."""
    for name in names:
        if getattr(cfg, name) is not None:
            check_positive(name, getattr(cfg, name), allow_zero)


def check_folder_name(what: str, name: str) -> None:
    """Raise unless ``name`` is one plain folder name: not empty, no separator, no leading dot."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise GradcheckError(f"{what} {name!r} must be a plain folder name (no '/', not '.x')")


MAX_SEED = 2**32 - 1
"""Seeds are 32-bit: mixed with sample indices (seed * 1,000,003 + i) they fit torch's 64 bits."""


def check_seed(seed: int, name: str = "seed") -> None:
    """Raise a GradcheckError unless ``seed`` is an integer in 0..MAX_SEED."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise GradcheckError(f"{name} must be an integer in 0..{MAX_SEED}, got {seed!r}")


def refuse_pickle(path: str | Path) -> None:
    """Refuse pickle-based checkpoint files: loading them can run arbitrary code."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise GradcheckError(f"refusing pickle file {path} ({path.suffix}); gradcheck loads only "
                             ".safetensors")


@contextlib.contextmanager
def torch_flags_restored() -> Iterator[None]:
    """Put PyTorch's global TF32 and cuDNN autotuning flags back afterwards."""
    benchmark = torch.backends.cudnn.benchmark
    try:
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the program uses torch's newer fp32_precision settings instead
        tf32 = None
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _owner_tag() -> str:
    """Who may judge whether a temporary's process lives: this host, boot and PID namespace."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(os.readlink(path) if path.endswith("pid") else Path(path).read_text())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]


def _temporary_name(final: Path, kind: str) -> Path:
    """``.<name>.<kind>-<owner>-<pid>-<random>``: whose it is, so stale ones can be told apart."""
    owner = f"{_owner_tag()}-{os.getpid()}"
    return final.parent / f".{final.name}.{kind}-{owner}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries in ``folder`` whose process (of this host, boot and PID namespace,
    :func:`_owner_tag`) is gone -> the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^\..+\.(?:tmp|old)-{_owner_tag()}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if not m or _process_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder (stale ones removed first) that replaces ``final`` (an
    error unless ``overwrite``) only on success; on any exception, Ctrl-C included, it is gone."""
    final = check_output(final, overwrite, folder=True)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent)
        tmp = _temporary_name(final, "tmp")
        tmp.mkdir()
    except OSError as e:
        raise GradcheckError(f"cannot write to {final.parent}: {e.strerror}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # innermost first: parents made for this output go too, if empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    if final.exists():
        old = _temporary_name(final, "old")
        final.rename(old)
        tmp.rename(final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        tmp.rename(final)


def check_output(final: str | Path, overwrite: bool = False, folder: bool = False) -> Path:
    """``final`` (a file, or a ``folder``) as a Path, checked writable before any work: a file is
    no folder, its parent no file, and it does not exist unless ``overwrite``."""
    final = Path(final)
    if final.is_dir() and not folder:
        raise GradcheckError(f"{final} is a folder; give a file path")
    if final.exists() and not overwrite:
        what = " as a file" if folder and not final.is_dir() else ""
        raise GradcheckError(f"{final} already exists{what}; pass --overwrite to replace it")
    if final.parent.exists() and not final.parent.is_dir():
        raise GradcheckError(f"cannot write {final}: {final.parent} is a file, not a folder")
    return final


@contextlib.contextmanager
def atomic_output_file(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces ``final`` only when the block succeeds."""
    final = check_output(final, overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradcheckError(f"cannot write to {final.parent}: {e.strerror}") from None
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(final)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else must be a valid torch device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GradcheckError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GradcheckError(f"device {device!r} requested but CUDA is not available; use cpu")
    return dev


def sample_generators(
    seed: int, indices: Sequence[int], device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per sample: sample i depends only on (seed, i), never on its batch."""
    # Mix seed and index so that (seed, i) and (seed + 1, i - 1) do not collide.
    seeds = [(int(seed) * 1_000_003 + int(i)) % (2**63 - 1) for i in indices]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def randn_per_sample(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stack one standard normal draw of ``shape`` per generator: (len(generators), *shape)."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in generators]
    ).to(device)


def git_commit() -> str | None:
    """The commit of the gradcheck checkout, or None when not in a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """A human-readable hardware name for reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def run_metadata(device: torch.device) -> dict[str, Any]:
    """Versions, git commit and hardware, stored beside every output."""
    import diffusers

    import gradcheck
    from gradcheck.paths import checkpoint_set_name

    return {
        "gradcheck": gradcheck.__version__,
        "checkpoints": checkpoint_set_name(),  # the reference set that the defaults came from
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
        "git_commit": git_commit(), "device": str(device), "hardware": device_name(device),
    }


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as None: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return _json_safe(obj.item())
    return obj


def strict_json(obj: Any) -> str:
    """Indented, standard JSON: NaN and infinities become null, so strict readers accept it."""
    return json.dumps(_json_safe(obj), indent=2, default=str, allow_nan=False) + "\n"


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (:func:`strict_json`)."""
    Path(path).write_text(strict_json(obj))


def load_json(path: str | Path) -> Any:
    """Read JSON, turning a missing or broken file into a GradcheckError."""
    path = Path(path)
    if not path.is_file():
        raise GradcheckError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GradcheckError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Write uint8 images (N, 3, H, W) as one PNG grid with 2-pixel gray gutters, ``nrow`` per
    row (default: a square)."""
    from PIL import Image
    from torchvision.utils import make_grid

    nrow = nrow or max(1, math.isqrt(len(images) - 1) + 1)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=128)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def read_image_grid(path: str | Path, n: int, size: int, nrow: int) -> np.ndarray:
    """The first ``n`` images (n, size, size, 3) uint8 of a :func:`save_image_grid` PNG."""
    from PIL import Image

    grid = np.asarray(Image.open(path).convert("RGB"))
    step = size + 2  # 2-pixel gutters before every row and column
    return np.stack([grid[2 + (i // nrow) * step:][:size, 2 + (i % nrow) * step:][:, :size]
                     for i in range(n)])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, 3, H, W) on the CPU (clamped, rounded)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 in [-1, 1]: the models' input convention."""
    return images.float() / 127.5 - 1


def write_parquet(table: Any, path: str | Path, metadata: Any, key: str = "gradcheck") -> None:
    """Write a DataFrame as parquet atomically, ``metadata`` as strict JSON under schema ``key``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = {**(arrow.schema.metadata or {}), key.encode(): strict_json(metadata).encode()}
    with atomic_output_file(path, overwrite=True) as tmp:
        pq.write_table(arrow.replace_schema_metadata(meta), tmp)
