"""SportBalls: four procedurally drawn sport balls on a white canvas (docs/formats.md).

Classes, in label order: baseball (white, two red stitched seams), basketball (orange, black
seam lines), soccer (white, black pentagons), volleyball (yellow, blue and white curved panels),
each with a thin dark outline on a pure white (255) canvas. Factors, uniform over
:func:`factor_ranges`, each from its own seeded stream, independent of the class and of each
other: ``diameter``; ``center_x``, ``center_y`` (every ball, anti-aliased rim included, inside
the canvas); ``rotation_deg``, counter-clockwise on screen.

Rendering. Each class is drawn once per integer texture diameter T by evaluating its pattern
analytically at 8x8 samples per texel (supersampling), averaged in integer arithmetic; outside
the disc the texture continues in the outline colour. An image of diameter D (T = ceil(D)) is
the texture warped by rotation, scale D/T and translation, sampled bilinearly with 6-bit
fixed-point weights (the three channels packed into one int64), then composited over white with
the disc's analytic pixel coverage, clamp(D/2 + 1/2 - distance, 0, 1) in 1/256 steps. So the
silhouette is a smooth circle and every pixel whose centre is at least D/2 + 1/2 from the
ball centre is exactly 255. Only IEEE-exact float64 operations (+, -, *, /, sqrt, floor,
remainder) and integers are used (sin and cos are a fixed polynomial, no matmul, no float
reductions), so the same seed gives the same bytes on any CPU.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import io
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gradcheck import CLASS_NAMES
from gradcheck.utils import GradcheckError, atomic_output_dir, check_choice, save_json

GENERATOR_VERSION = "1.0"
"""Bumped whenever the same parameters would give different bytes."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
FACTOR_NAMES: tuple[str, ...] = ("diameter", "center_x", "center_y", "rotation_deg")
DIAMETER_RANGE = (0.375, 0.625)
"""Ball diameter as a fraction of the image size (24 to 40 pixels at 64x64)."""
RIM = 0.5
"""Pixels beyond the nominal radius that the anti-aliased edge may tint (see ball_masks)."""
CENTER_MARGIN = 1.0
"""Pixels between the largest ball's nominal edge and the canvas edge (>= RIM + 1/2, so even
the edge pixels' centres stay outside every ball's rim)."""
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512  # 50,000 images of 512x512 already take 39 GB
CARD = "README.md"
"""The dataset card, committed inside the default root; generation keeps it."""

SUPERSAMPLE = 8  # samples per texel side when drawing a texture: 64 per texel
WEIGHT_BITS = 6  # bilinear weights in 1/64 texel, as in GPU texture units
FIELD_BITS = 21  # one int64 holds R, G, B, each up to 255 * 64 * 64 < 2**21
ALPHA_BITS = 8  # disc coverage in 1/256 pixel
CHUNK = 512  # images rendered per call; results do not depend on it
THREADS = min(8, os.cpu_count() or 1)  # rendering threads; results do not depend on it
_PAD = 4  # canvas padding so a ball's bounding box never needs clipping


# ---- deterministic trigonometry -------------------------------------------------------------
_SIN_COEF = [(-1) ** k / math.factorial(2 * k + 1) for k in range(14)]
_COS_COEF = [(-1) ** k / math.factorial(2 * k) for k in range(14)]


def cos_sin_deg(deg: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of angles in degrees from a fixed Taylor polynomial (error < 1e-15). libm and
    SIMD sin/cos differ in the last bit across CPUs; +, * and remainder do not."""
    x = np.asarray(deg, dtype=np.float64) % 360.0 * (math.pi / 180.0) - math.pi  # [-pi, pi)
    x2 = x * x
    s = np.zeros_like(x)
    c = np.zeros_like(x)
    for ks, kc in zip(reversed(_SIN_COEF), reversed(_COS_COEF), strict=True):
        s = s * x2 + ks
        c = c * x2 + kc
    return -c, -(s * x)  # cos(x + pi) = -cos x, sin(x + pi) = -sin x


# ---- ball patterns in unit-disc coordinates ---------------------------------------------------
# Each pattern maps sample points (x right, y down, unit radius; z = sqrt(1 - x^2 - y^2) toward
# the viewer) to indices into its palette; index 0 is the outline. No ball colour is 255, so
# the ball never merges with the background.
OUTLINE = (45, 40, 40)
PALETTES: dict[str, np.ndarray] = {
    "baseball": np.array([OUTLINE, (246, 243, 235), (205, 30, 40)], np.uint8),
    "basketball": np.array([OUTLINE, (236, 118, 36), (40, 25, 20)], np.uint8),
    "soccer": np.array([OUTLINE, (246, 246, 246), (25, 25, 25), (150, 150, 150)], np.uint8),
    "volleyball": np.array([OUTLINE, (250, 208, 40), (30, 85, 190), (246, 246, 246),
                            (70, 70, 80)], np.uint8),
}
OUTLINE_WIDTH = 0.07  # of the radius: about 1 pixel at 64x64
LINE_WIDTH = 0.1  # seam lines, of the radius


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _baseball(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """White leather; two mirrored red seams (arcs bulging toward the centre) with V stitches."""
    out = np.full(x.shape, 1, np.uint8)
    for side in (-1.0, 1.0):
        dist = np.sqrt((x - side * 1.32) ** 2 + y * y) - 0.97  # signed distance to the seam
        ad = np.abs(dist)
        seam = ad < 0.045
        stitch = (ad < 0.16) & (_frac(y * 5.5 + ad * 4.0) < 0.42)
        out[seam | stitch] = 2
    return out


def _basketball(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Orange; a vertical and a horizontal seam and two side arcs, all black."""
    h = LINE_WIDTH / 2
    lines = (np.abs(x) < h) | (np.abs(y) < h)
    for side in (-1.0, 1.0):
        lines |= np.abs(np.sqrt((x - side * 1.3) ** 2 + y * y) - 0.92) < h
    return np.where(lines, 2, 1).astype(np.uint8)


def _icosahedron() -> tuple[np.ndarray, np.ndarray]:
    """Unit vertices (12, 3), one at +z facing the viewer, and unit face centres (20, 3)."""
    c72, s72 = cos_sin_deg(np.arange(5) * 72.0)
    c36, s36 = cos_sin_deg(np.arange(5) * 72.0 + 36.0)
    r, h = 2.0 / math.sqrt(5.0), 1.0 / math.sqrt(5.0)
    verts = np.concatenate([[[0.0, 0.0, 1.0]], np.stack([r * c72, r * s72, np.full(5, h)], 1),
                            np.stack([r * c36, r * s36, np.full(5, -h)], 1), [[0.0, 0.0, -1.0]]])
    faces = []
    for i in range(12):
        for j in range(i + 1, 12):
            for k in range(j + 1, 12):
                tri = verts[[i, j, k]]
                d = [_dot3(tri[a], tri[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
                if min(d) > 0.4:  # neighbours have dot 1/sqrt(5), others <= -1/sqrt(5)
                    s = tri[0] + tri[1] + tri[2]
                    faces.append(s / math.sqrt(_dot3(s, s)))
    return verts, np.array(faces)


def _dot3(a: np.ndarray, b: np.ndarray) -> float:
    return float(a[0] * b[0] + a[1] * b[1] + a[2] * b[2])


def _soccer(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Truncated icosahedron: black pentagons, white hexagons, grey seams, one pentagon central. A
    ray from the centre meets first the face plane with the largest (p . n) / distance."""
    verts, faces = _icosahedron()
    # Plane distances of the truncated icosahedron (cut at a third of each edge): pentagons
    # 2/3 + 1/(3 sqrt 5), hexagons that of (2a + b) / 3 along the face normal.
    d_pent = 2.0 / 3.0 + 1.0 / (3.0 * math.sqrt(5.0))
    d_hex = (1.0 + 2.0 / math.sqrt(5.0)) / math.sqrt(3.0 + 6.0 / math.sqrt(5.0))
    pent = np.full(x.shape, -np.inf)
    first = np.full(x.shape, -np.inf)  # best and second-best hexagon score, for the seams
    second = np.full(x.shape, -np.inf)
    for v in verts:
        score = (x * (v[0] / d_pent) + y * (v[1] / d_pent)) + z * (v[2] / d_pent)
        np.maximum(pent, score, out=pent)
    for f in faces:
        score = (x * (f[0] / d_hex) + y * (f[1] / d_hex)) + z * (f[2] / d_hex)
        np.maximum(second, np.minimum(first, score), out=second)
        np.maximum(first, score, out=first)
    out = np.where(pent >= first, 2, 1).astype(np.uint8)
    out[(out == 1) & ((first - np.maximum(second, pent)) < 0.025 * first)] = 3
    return out


_VB_TILT = (28.0, -22.0)  # degrees about x then y, so no panel faces the viewer square on


def _volleyball(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Cube-like layout of 6 groups of 3 curved strips; yellow, blue and white; dark seams."""
    (ca, cb), (sa, sb) = cos_sin_deg(np.array(_VB_TILT))
    y1, z1 = ca * y - sa * z, sa * y + ca * z
    x2, z2 = cb * x + sb * z1, -sb * x + cb * z1
    ax, ay, az = np.abs(x2), np.abs(y1), np.abs(z2)
    on_x = (ax >= ay) & (ax >= az)  # the cube face (panel group) the point belongs to
    on_y = ~on_x & (ay >= az)
    axis = np.where(on_x, 0, np.where(on_y, 1, 2))
    top = np.maximum(np.maximum(ax, ay), az)
    middle = np.maximum(np.minimum(ax, ay), np.minimum(np.maximum(ax, ay), az))
    # Strips run across the neighbouring axis, so adjacent groups are perpendicular.
    across = np.where(on_x, y1, np.where(on_y, z2, x2)) / top
    strip = (across > -1.0 / 3.0).astype(np.int64) + (across > 1.0 / 3.0)
    colours = np.array([[1, 2, 1], [2, 1, 2], [3, 3, 3]], np.uint8)  # per axis, per strip
    out = colours[axis, strip]
    seam = (np.abs(np.abs(across) - 1.0 / 3.0) < 0.035) | ((top - middle) < 0.05 * top)
    out[seam] = 4
    return out


PATTERNS = {"baseball": _baseball, "basketball": _basketball, "soccer": _soccer,
            "volleyball": _volleyball}


def _draw_ball(name: str, t: int) -> np.ndarray:
    """One class at diameter t texels on a (t+2, t+2) patch, 8x8 supersampled: uint8 RGB."""
    m = t + 2
    pos = ((np.arange(m * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - m / 2) / (t / 2)
    x = np.broadcast_to(pos[None, :], (pos.size, pos.size))
    y = np.broadcast_to(pos[:, None], (pos.size, pos.size))
    r2 = x * x + y * y
    z = np.sqrt(np.maximum(1.0 - r2, 0.0))
    idx = PATTERNS[name](x, y, z)
    idx[r2 > (1.0 - OUTLINE_WIDTH) ** 2] = 0  # and beyond: the silhouette is cut per image
    # Count each palette colour per texel, then average in integers.
    palette = PALETTES[name].astype(np.int64)
    texel = np.arange(pos.size) // SUPERSAMPLE
    bins = (texel[:, None] * m + texel[None, :]) * len(palette) + idx
    counts = np.bincount(bins.ravel(), minlength=m * m * len(palette)).reshape(m, m, -1)
    n = SUPERSAMPLE * SUPERSAMPLE
    return ((counts @ palette + n // 2) // n).astype(np.uint8)


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int64 with R, G, B in 21-bit fields."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] | (rgb[..., 1] << FIELD_BITS) | (rgb[..., 2] << (2 * FIELD_BITS))


@functools.cache
def _texture_level(t: int) -> tuple[int, tuple[np.ndarray, ...]]:
    """Texture width tw and the four bilinear taps of all classes at diameter t, each (4*tw*tw,). tw
    covers the bounding box of a ball of diameter D in (t-1, t] at any rotation."""
    reach = math.sqrt(2.0) * (t / 2 + 2.25) * t / (t - 1)
    tw = 2 * math.ceil(reach + 1.5) + t % 2
    m = t + 2
    o = (tw - m) // 2
    tex = np.full((len(CLASS_NAMES), tw + 1, tw + 1), _pack(np.array(OUTLINE)), np.int64)
    for c, name in enumerate(CLASS_NAMES):
        tex[c, o : o + m, o : o + m] = _pack(_draw_ball(name, t))
    taps = tuple(np.ascontiguousarray(tex[:, dy : dy + tw, dx : dx + tw]).ravel()
                 for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)))
    return tw, taps


# ---- rendering --------------------------------------------------------------------------------
def factor_ranges(image_size: int) -> dict[str, tuple[float, float]]:
    """Documented factor ranges in pixels and degrees for one image size."""
    d_lo, d_hi = DIAMETER_RANGE[0] * image_size, DIAMETER_RANGE[1] * image_size
    c_lo = d_hi / 2 + CENTER_MARGIN
    return {"diameter": (d_lo, d_hi), "center_x": (c_lo, image_size - c_lo),
            "center_y": (c_lo, image_size - c_lo), "rotation_deg": (0.0, 360.0)}


def render_images(
    labels: Sequence[int] | np.ndarray, center_x: Sequence[float] | np.ndarray,
    center_y: Sequence[float] | np.ndarray, diameter: Sequence[float] | np.ndarray,
    rotation_deg: Sequence[float] | np.ndarray, image_size: int = 64,
) -> np.ndarray:
    """Draw balls from labels and factors: uint8 (N, image_size, image_size, 3). Pixel (i, j) covers
    [j, j+1] x [i, i+1]; centres are in pixels from the top-left corner. Each image depends only on
    its own row, never on the batch."""
    labels = np.asarray(labels, np.int64)
    cx, cy, dia, rot = (np.asarray(a, np.float64)
                        for a in (center_x, center_y, diameter, rotation_deg))
    n = labels.shape[0]
    if any(a.shape != (n,) for a in (cx, cy, dia, rot)):
        raise GradcheckError(f"labels and factors must be 1-d of the same length {n}")
    if n and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise GradcheckError(f"labels must lie in 0..{len(CLASS_NAMES) - 1}")
    if n and (not np.isfinite(dia).all() or dia.min() < 4.0):
        raise GradcheckError(f"diameter must be >= 4 pixels, got {dia.min()}")
    r = dia / 2 + RIM
    if n and ((cx - r).min() < 0 or (cy - r).min() < 0 or (cx + r).max() > image_size
              or (cy + r).max() > image_size):
        raise GradcheckError(f"every ball must lie inside the {image_size}x{image_size} canvas")

    size = image_size + 2 * _PAD
    canvas = np.full((n, size, size, 3), 255, np.uint8)
    cos, sin = cos_sin_deg(rot)
    level = np.ceil(dia).astype(np.int64)
    one = 1 << WEIGHT_BITS
    fmask = np.int64(one - 1)
    field = np.int64((1 << FIELD_BITS) - 1)
    shift = 2 * WEIGHT_BITS + ALPHA_BITS
    full = 1 << ALPHA_BITS
    white = 255 << (2 * WEIGHT_BITS)
    for t in np.unique(level).tolist():
        sel = np.flatnonzero(level == t)
        tw, (t00, t01, t10, t11) = _texture_level(t)
        w = t + 4
        ox = np.floor(cx[sel] - t / 2 - 1.25).astype(np.int64)
        oy = np.floor(cy[sel] - t / 2 - 1.25).astype(np.int64)
        # Output pixel centre -> texture coordinate: rotate by -rotation, scale t/D, shift to the
        # texture centre (minus half a texel for bilinear taps), all in 1/64 texel.
        scale = (t / dia[sel]) * one
        a = (scale * cos[sel])[:, None, None]
        b = (scale * sin[sel])[:, None, None]
        ramp = np.arange(w) + 0.5
        dx = (ox - cx[sel])[:, None, None] + ramp[None, None, :]
        dy = (oy - cy[sel])[:, None, None] + ramp[None, :, None]
        c0 = (tw / 2 - 0.5) * one
        u = ((a * dx + c0) - b * dy).astype(np.int64)
        v = ((b * dx + c0) + a * dy).astype(np.int64)
        fu, fv = u & fmask, v & fmask
        base = (labels[sel] * (tw * tw))[:, None, None]  # the class's texture in the stack
        idx = (v >> WEIGHT_BITS) * tw + (u >> WEIGHT_BITS) + base
        gu, gv = one - fu, one - fv
        top = t00.take(idx) * gu + t01.take(idx) * fu
        bottom = t10.take(idx) * gu + t11.take(idx) * fu
        packed = top * gv + bottom * fv
        # Analytic coverage of the disc: 1 inside, 0 from D/2 + 1/2 out, linear between.
        edge = (dia[sel] / 2 + 0.5)[:, None, None]
        alpha = np.floor((edge - np.sqrt(dx * dx + dy * dy)) * full).astype(np.int64)
        np.clip(alpha, 0, full, out=alpha)
        background = white * (full - alpha) + (1 << (shift - 1))
        patch = np.empty((sel.size, w, w, 3), np.uint8)
        for c in range(3):
            colour = (packed >> (FIELD_BITS * c)) & field
            patch[..., c] = (colour * alpha + background) >> shift
        for k, i in enumerate(sel.tolist()):
            y0, x0 = oy[k] + _PAD, ox[k] + _PAD
            canvas[i, y0 : y0 + w, x0 : x0 + w] = patch[k]
    return np.ascontiguousarray(canvas[:, _PAD:-_PAD, _PAD:-_PAD])


def ball_masks(factors: pd.DataFrame, image_size: int) -> np.ndarray:
    """Pixels whose centre lies closer than diameter/2 + RIM to the ball centre: bool (N, H, W).
    This is the ball with its anti-aliased edge: render_images leaves every other pixel exactly
    white, since the disc coverage there is 0."""
    cx = factors["center_x"].to_numpy(np.float64)[:, None, None]
    cy = factors["center_y"].to_numpy(np.float64)[:, None, None]
    r = factors["diameter"].to_numpy(np.float64)[:, None, None] / 2 + RIM
    ramp = np.arange(image_size) + 0.5
    return (ramp[None, None, :] - cx) ** 2 + (ramp[None, :, None] - cy) ** 2 < r * r


# ---- generation -------------------------------------------------------------------------------
def _draw_factors(
    rngs: Sequence[np.random.Generator], n: int, image_size: int
) -> dict[str, np.ndarray]:
    """n values of each factor, each from its own stream (FACTOR_NAMES order)."""
    ranges = factor_ranges(image_size)
    out = {}
    for name, rng in zip(FACTOR_NAMES, rngs, strict=True):
        lo, hi = ranges[name]
        out[name] = lo + (hi - lo) * rng.random(n)
    out["rotation_deg"] %= 360.0  # [0, 360) even if the product rounds up to 360
    return out


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random order of n labels with class counts differing by at most one: int64 (n,)."""
    k = len(CLASS_NAMES)
    counts = [n // k + (c < n % k) for c in range(k)]
    return rng.permutation(np.repeat(np.arange(k, dtype=np.int64), counts))


def _image_key(image: np.ndarray) -> bytes:
    return hashlib.sha256(image.tobytes()).digest()


def _render_chunk(
    labels: np.ndarray, factors: dict[str, np.ndarray], image_size: int, sl: slice
) -> tuple[np.ndarray, list[bytes]]:
    """Images uint8 (B, H, W, 3) of one slice and their keys (runs in a worker thread)."""
    images = render_images(labels[sl], *(factors[k][sl] for k in _RENDER_ORDER), image_size)
    return images, [_image_key(image) for image in images]


def _render_unique(
    labels: np.ndarray, factors: dict[str, np.ndarray], redraw: Sequence[np.random.Generator],
    image_size: int, sink: Callable[[np.ndarray], object], seen: set[bytes],
    bar: tqdm | None = None,
) -> int:
    """Render in chunks, re-drawing the factors of any image equal to one already ``seen``; pass
    each finished chunk, uint8 (B, H, W, 3) in index order, to ``sink``. Updates ``factors`` and
    ``seen`` in place and returns the number of re-draws. Splits are rendered in order against one
    ``seen`` set, so no image appears twice in the data set. Chunks render in threads (numpy and
    hashlib release the GIL); every image depends only on its own factors and duplicates are
    resolved here in index order, so the bytes do not depend on the number of threads."""
    n_redrawn = 0
    starts = iter(range(0, labels.shape[0], CHUNK))
    pending: collections.deque[tuple[int, concurrent.futures.Future]] = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(THREADS)

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            sl = slice(start, start + CHUNK)
            pending.append((start, pool.submit(_render_chunk, labels, factors, image_size, sl)))

    try:
        for _ in range(2 * THREADS):
            submit()
        while pending:
            start, future = pending.popleft()
            images, keys = future.result()
            submit()
            for k, key in enumerate(keys):
                i = start + k
                while key in seen:
                    n_redrawn += 1
                    for name, value in _draw_factors(redraw, 1, image_size).items():
                        factors[name][i] = value[0]
                    again, (key,) = _render_chunk(labels, factors, image_size, slice(i, i + 1))
                    images[k] = again[0]
                seen.add(key)
            sink(images)
            if bar is not None:
                bar.update(images.shape[0])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return n_redrawn


_RENDER_ORDER = ("center_x", "center_y", "diameter", "rotation_deg")


class _NpyWriter:
    """Stream a C-ordered .npy file chunk by chunk (the bytes np.save writes) and its SHA-256."""

    def __init__(self, file: BinaryIO, shape: tuple[int, ...], dtype: type | np.dtype) -> None:
        self.dtype, self.rows = np.dtype(dtype), shape[0]
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": shape})
        self.file = file
        self.hash = hashlib.sha256()
        self._write(header.getvalue())

    def _write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.hash.update(data)

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        self.rows -= chunk.shape[0]
        self._write(memoryview(chunk).cast("B"))

    def finish(self) -> str:
        """The hex SHA-256 of all bytes written, once every row promised by the header is."""
        if self.rows != 0:
            raise RuntimeError(f"{self.rows} rows short of the .npy header's shape")
        return self.hash.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_sizes(sizes: dict[str, Any]) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise GradcheckError(f"{name} must be an integer, got {value!r}")
    n = len(CLASS_NAMES)
    for name in ("n_train", "n_val", "n_test"):
        if sizes[name] < n:
            raise GradcheckError(f"{name} must be >= {n} (one image per class), got {sizes[name]}")
    if not MIN_IMAGE_SIZE <= sizes["image_size"] <= MAX_IMAGE_SIZE:
        raise GradcheckError(f"image_size must lie in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels, "
                             f"got {sizes['image_size']}")
    if sizes["seed"] < 0:
        raise GradcheckError(f"seed must be >= 0, got {sizes['seed']}")


def _check_disk(root: Path, nbytes: int) -> None:
    """Refuse a data set that cannot fit on the disk (image arrays; PNGs counted as big)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if nbytes > free:
        raise GradcheckError(f"the data set needs {nbytes / 2**30:.3g} GiB but {existing} has "
                             f"{free / 2**30:.3g} GiB free; lower --n-train/--n-val/--n-test "
                             "or --image-size")


def generate_dataset(
    root: str | Path, n_train: int = 40000, n_val: int = 5000, n_test: int = 5000, seed: int = 0,
    image_size: int = 64, png: bool = False, overwrite: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Generate SportBalls into ``root`` (docs/formats.md); return a summary. The summary has
    ``root``, ``counts`` (split -> class -> images), ``seconds``, ``images_per_s``, ``redrawn`` and
    ``sha256`` (split -> file -> hex digest)."""
    from gradcheck.config import DatasetConfig, config_to_dict

    sizes = dict(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, image_size=image_size)
    _check_sizes(sizes)
    cfg = DatasetConfig(root=str(root), png=bool(png), **{k: int(v) for k, v in sizes.items()})
    n_split = dict(zip(SPLITS, (cfg.n_train, cfg.n_val, cfg.n_test), strict=True))
    root = Path(root)
    card = root / CARD
    if root.exists() and not root.is_dir():
        raise GradcheckError(f"root {root} is a file, not a folder")
    holds_data = root.is_dir() and any(p.name != CARD for p in root.iterdir())
    if holds_data and not overwrite:
        raise GradcheckError(f"{root} already exists; pass --overwrite to replace it")
    _check_disk(root, sum(n_split.values()) * 3 * cfg.image_size**2 * (2 if png else 1))
    start = time.perf_counter()
    # The committed dataset card lives in the root: a root holding only the card counts as
    # empty, and the card is carried into the new folder.
    with atomic_output_dir(root, overwrite=overwrite or not holds_data) as tmp:
        if card.is_file():
            shutil.copyfile(card, tmp / CARD)
        seen: set[bytes] = set()
        tables, info, redrawn = [], {}, 0
        total = sum(n_split.values())
        bar = tqdm(total=total, desc="make-dataset", unit="img", disable=not progress)
        # Streams: one per split, then per purpose, so a factor never shares a stream with the
        # label or another factor (STYLE.md: no factor may leak the class).
        split_seqs = np.random.SeedSequence(cfg.seed).spawn(len(SPLITS))
        for split, split_seq in zip(SPLITS, split_seqs, strict=True):
            label_seq, redraw_seq, *factor_seqs = split_seq.spawn(2 + len(FACTOR_NAMES))
            n = n_split[split]
            labels = _balanced_labels(np.random.default_rng(label_seq), n)
            factors = _draw_factors([np.random.default_rng(s) for s in factor_seqs], n,
                                    cfg.image_size)
            redraw = [np.random.default_rng(s) for s in redraw_seq.spawn(len(FACTOR_NAMES))]
            with open(tmp / f"{split}_images.npy", "wb") as f:
                writer = _NpyWriter(f, (n, cfg.image_size, cfg.image_size, 3), np.uint8)
                redrawn += _render_unique(labels, factors, redraw, cfg.image_size, writer.write,
                                          seen, bar)
                images_sha = writer.finish()
            np.save(tmp / f"{split}_labels.npy", labels.astype("<i8"))
            tables.append(pd.DataFrame({
                "split": split, "index": np.arange(n, dtype=np.int64), "label": labels,
                "class_name": np.array(CLASS_NAMES)[labels],
                **{k: factors[k] for k in _RENDER_ORDER}}))
            info[split] = {
                "n": n,
                "counts": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
                "sha256": {f"{split}_images.npy": images_sha,
                           f"{split}_labels.npy": _sha256(tmp / f"{split}_labels.npy")},
            }
        bar.close()
        factors_df = pd.concat(tables, ignore_index=True)
        factors_df.to_parquet(tmp / "factors.parquet", index=False)
        params = config_to_dict(cfg)
        del params["root"]  # the same seed must give the same bytes wherever it is written
        save_json(tmp / "dataset.json", {
            "name": "SportBalls", "generator_version": GENERATOR_VERSION, "parameters": params,
            "class_names": list(CLASS_NAMES),
            "factor_ranges": {k: list(v) for k, v in factor_ranges(cfg.image_size).items()},
            "rim_px": RIM, "supersample": SUPERSAMPLE, "redrawn": redrawn, "splits": info})
        _write_preview(tmp, factors_df)
        if cfg.png:
            _write_png_tree(tmp, factors_df, progress)
    seconds = time.perf_counter() - start
    return {"root": str(root), "counts": {s: info[s]["counts"] for s in SPLITS},
            "seconds": seconds, "images_per_s": total / seconds, "redrawn": redrawn,
            "sha256": {s: info[s]["sha256"] for s in SPLITS}}


PREVIEW_COLUMNS = 10


def _write_preview(folder: Path, factors: pd.DataFrame) -> None:
    """preview.png: one row per class (first train images of that class), names on the left."""
    from PIL import Image, ImageDraw, ImageFont

    images = np.load(folder / "train_images.npy", mmap_mode="r")
    size = images.shape[1]
    zoom = max(1, 128 // size)
    cell = size * zoom
    gap, label_w = 4, 110
    rows = len(CLASS_NAMES)
    sheet = Image.new("RGB", (label_w + PREVIEW_COLUMNS * (cell + gap), rows * (cell + gap) + gap),
                      "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=16)
    except (TypeError, ImportError):  # Pillow < 10.1 or without FreeType: the small bitmap font
        font = ImageFont.load_default()
    train = factors[factors["split"] == "train"]
    for c, name in enumerate(CLASS_NAMES):
        top = gap + c * (cell + gap)
        draw.text((8, top + cell // 2 - 8), f"{c} {name}", fill=(0, 0, 0), font=font)
        picks = train.loc[train["label"] == c, "index"].to_numpy()[:PREVIEW_COLUMNS]
        for k, i in enumerate(picks.tolist()):
            tile = Image.fromarray(np.asarray(images[i])).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_w + k * (cell + gap), top))
            # A light frame shows the canvas edge against the white sheet.
            x0 = label_w + k * (cell + gap)
            draw.rectangle((x0 - 1, top - 1, x0 + cell, top + cell), outline=(200, 200, 200))
    sheet.save(folder / "preview.png")


def _write_png_tree(folder: Path, factors: pd.DataFrame, progress: bool) -> None:
    """png/{split}/{class_name}/{index:05d}.png (torchvision ImageFolder layout)."""
    from PIL import Image

    for split in SPLITS:
        for name in CLASS_NAMES:
            (folder / "png" / split / name).mkdir(parents=True)
    bar = tqdm(total=len(factors), desc="png", unit="img", disable=not progress)
    for split in SPLITS:
        images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
        rows = factors[factors["split"] == split]
        for i, name in zip(rows["index"].tolist(), rows["class_name"].tolist(), strict=True):
            Image.fromarray(np.asarray(images[i])).save(folder / "png" / split / name
                                                        / f"{i:05d}.png")
            bar.update(1)
    bar.close()


# ---- reading ----------------------------------------------------------------------------------
def _require(root: str | Path, name: str) -> Path:
    path = Path(root) / name
    if not path.is_file():
        raise GradcheckError(f"no SportBalls file {path}; create the data set with: gradcheck "
                             f"make-dataset --root {root}")
    return path


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, H, W, 3), memory-mapped, and labels int64 (N,) of one split."""
    check_choice("split", split, SPLITS)
    images = np.load(_require(root, f"{split}_images.npy"), mmap_mode="r")
    labels = np.load(_require(root, f"{split}_labels.npy")).astype(np.int64)
    return images, labels


def load_tensors(
    root: str | Path, split: str, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split on ``device``: x float32 (N, 3, H, W) in [-1, 1], y int64 (N,)."""
    from gradcheck.utils import resolve_device

    dev = resolve_device(device)
    images, labels = load_split(root, split)
    x = torch.from_numpy(np.array(images)).to(dev).permute(0, 3, 1, 2).contiguous()
    return x.float().div_(127.5).sub_(1.0), torch.from_numpy(labels).to(dev)


def load_factors(root: str | Path) -> pd.DataFrame:
    """The factor table: split, index, label, class_name, center_x, center_y, diameter,
    rotation_deg (one row per image)."""
    return pd.read_parquet(_require(root, "factors.parquet"))


class SportBalls(torch.utils.data.Dataset):
    """One split as a torch Dataset of (x float32 (3, H, W) in [-1, 1], label int).
    ``in_memory=True`` reads the split into RAM as a uint8 tensor (fast path for training loops);
    otherwise images are read from the memory-mapped array on access. ``factors`` holds this split's
    rows of the factor table, in index order."""

    def __init__(self, root: str | Path, split: str, in_memory: bool = False) -> None:
        images, labels = load_split(root, split)
        self.root, self.split = Path(root), split
        self.labels = labels
        self.class_names = CLASS_NAMES
        factors = load_factors(root)
        factors = factors[factors["split"] == split]
        self.factors = factors.sort_values("index").reset_index(drop=True)
        self.images = np.array(images) if in_memory else images
        self._tensor = torch.from_numpy(self.images) if in_memory else None  # shares memory

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._tensor is not None:
            x = self._tensor[i]
        else:
            x = torch.from_numpy(np.array(self.images[i]))
        return x.permute(2, 0, 1).float() / 127.5 - 1.0, int(self.labels[i])
