"""Report figures: pure functions from DataFrames and sample arrays to matplotlib Figures (no
pyplot state, nothing written), each with a provenance footer (:func:`tables.provenance`)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from gradcheck import CLASS_NAMES

QUANTITY_TITLES = {
    "cos_prev_applied": "cos_prev of the applied vector (D7, paper Eq. 5)",
    "cos_prev_raw": "cos_prev of the raw gradient g (D3)",
    "grad_norm_raw": "||g|| raw gradient (D3)",
    "grad_norm_applied": "||g~|| applied vector (D5)",
    "score_norm": "||score|| (D1)",
    "cos_score": "cos(g~, score)",
    "cos_oracle": "cos(g~, oracle gradient) (D8)",
    "cos_prev_null": "cos_prev of the stabiliser on random gradients (D7')",
    "x_norm_ratio": "||x_t|| / expected norm",
}


def _figure(n_panels: int, title: str, footer: str, width: float = 5.2,
            height: float = 3.6, max_cols: int = 2) -> tuple[Figure, list[Axes]]:
    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    fig.suptitle(title, fontsize=11)
    # supxlabel never overlaps a panel; wrapped at the width (a 7 pt character is ~1/17 inch).
    chars = max(40, int(width * cols * 17))
    fig.supxlabel("\n".join(textwrap.wrap(footer, chars)), fontsize=7, color="0.3")
    return fig, axes


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    import seaborn as sns

    palette = sns.color_palette("tab10" if len(labels) <= 10 else "tab20", len(labels))
    return dict(zip(labels, palette, strict=True))


def _over_t(ax: Axes, pooled: pd.DataFrame, quantity: str, band: bool = True,
            log: bool = False, dashes: bool = False, legend: bool = True,
            colors: dict[str, tuple] | None = None) -> None:
    """Mean (and +-std band) of one step quantity over t, one line per ``label``."""
    import seaborn as sns

    data = pooled[pooled["quantity"] == quantity].sort_values("t", ascending=False)
    labels = sorted(data["label"].unique())
    colors = colors or _colors(labels)
    if len(data):
        sns.lineplot(data=data, x="t", y="mean", hue="label", hue_order=labels, palette=colors,
                     ax=ax, lw=1.0 if dashes else 1.3, linestyle="--" if dashes else "-",
                     legend=legend and not dashes, errorbar=None, sort=False)
    for lab in labels if band else ():
        d = data[data["label"] == lab]
        lo, hi = d["mean"] - d["std"], d["mean"] + d["std"]
        if log:
            lo = lo.where(lo > 0, d["mean"] / 10)
        ax.fill_between(d["t"], lo, hi, color=colors[lab], alpha=0.18, lw=0)
    if dashes:
        return  # an overlay on a panel that another quantity set up
    ax.set_xlim(max(data["t"].max(), 1) if len(data) else 1, 0)  # sampling runs from T to 0
    ax.set_xlabel("t (sampling proceeds to the right)")
    ax.set_ylabel("")
    ax.set_title(QUANTITY_TITLES.get(quantity, quantity), fontsize=9)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def cos_prev_figure(pooled: pd.DataFrame, title: str, footer: str) -> Figure:
    """cos_prev over t per configuration, mean +- std over samples (paper Figures 1-3 and 6);
    ``pooled``: columns label, t, quantity, mean, std (pooled over seeds)."""
    fig, (left, right) = _figure(2, title, footer)
    colors = _colors(sorted(pooled["label"].unique()))  # one colour per configuration
    _over_t(left, pooled, "cos_prev_applied", colors=colors)
    # D7': dashed, what each stabiliser gives isotropic random gradients of the same norms.
    _over_t(left, pooled, "cos_prev_null", band=False, dashes=True, colors=colors)
    _over_t(right, pooled, "cos_prev_raw", colors=colors)
    for ax in (left, right):
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_ylabel("cosine to the previous step")
    if left.get_legend() is not None:
        left.legend(fontsize=7, loc="lower left", title="dashed: null baseline (D7')",
                    title_fontsize=7)
    if right.get_legend() is not None:
        right.get_legend().remove()
    return fig


def norms_figure(pooled: pd.DataFrame, title: str, footer: str) -> Figure:
    """Guidance norms (raw, applied, score) and cos(g~, score) over t per configuration."""
    fig, axes = _figure(4, title, footer)
    for ax, q in zip(axes, ("grad_norm_raw", "grad_norm_applied", "score_norm", "cos_score"),
                     strict=True):
        _over_t(ax, pooled, q, log=q != "cos_score")
    axes[3].axhline(0, color="0.5", lw=0.6)
    axes[0].legend(fontsize=7)
    return fig


def oracle_figure(pooled: pd.DataFrame, title: str, footer: str) -> Figure:
    """cos(g~, oracle) over t per configuration (D8)."""
    fig, (ax,) = _figure(1, title, footer, width=7.5)
    _over_t(ax, pooled, "cos_oracle")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_ylabel("cosine to the exact guidance gradient")
    ax.legend(fontsize=7)
    ax.text(0.99, 0.02, "at small t the empirical posterior collapses onto the nearest "
            "training image", transform=ax.transAxes, ha="right", fontsize=7, color="0.3")
    return fig


def tile(images: np.ndarray, max_images: int = 16) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) mosaic of the first ``max_images``."""
    x = images[:max_images]
    n, h, w, c = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[r * h:(r + 1) * h, k * w:(k + 1) * w] = x[i]
    return canvas


def samples_figure(images: Mapping[str, np.ndarray], title: str, footer: str,
                   max_images: int = 16) -> Figure:
    """Sample grids per configuration (paper Figures 7-8): ``images`` maps a title to (N,H,W,3)."""
    fig, axes = _figure(len(images), title, footer, width=3.0, height=3.2, max_cols=4)
    for ax, (name, x) in zip(axes, images.items(), strict=True):
        ax.imshow(tile(x, max_images), interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    return fig


def _errorbars(ax: Axes, d: pd.DataFrame, metric: str, color: tuple, label: str,
               fmt: str = "o-", scale: float = 1.0) -> None:
    m = d[metric] * scale
    lo = (d[metric] - d[f"{metric}_ci_low"]).fillna(0) * scale
    hi = (d[f"{metric}_ci_high"] - d[metric]).fillna(0) * scale
    ax.errorbar(d["scale"], m, yerr=[lo, hi], fmt=fmt, color=color, label=label, capsize=3,
                ms=4, lw=1.2)


def scale_figure(curves: pd.DataFrame, title: str, footer: str) -> Figure:
    """FID and accuracy vs guidance scale s per configuration (GradCheck App. C.1, Kawar Table 5)
    from :func:`tables.scale_curves`; bars are 95% intervals over seeds."""
    fig, (left, right) = _figure(2, title, footer)
    names = sorted(curves["curve"].unique())
    colors = _colors(names)
    for name in names:
        d = curves[curves["curve"] == name].sort_values("scale")
        _errorbars(left, d, "fid", colors[name], name)
        _errorbars(right, d, "accuracy_guiding", colors[name], f"{name} (guiding)", "o-", 100)
        if d["accuracy_judge"].notna().any():
            _errorbars(right, d, "accuracy_judge", colors[name], f"{name} (judge)", "s--", 100)
    for ax, ylabel in ((left, "FID"), (right, "accuracy (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("guidance scale s")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_title("FID vs s (lower is better)", fontsize=9)
    right.set_title("accuracy on the target class vs s", fontsize=9)
    return fig


def _curves_over_t(d: pd.DataFrame, curve: str, y: str, title: str, footer: str, level: float,
                   xlabel: str, ylabel: str, scale: float = 1.0) -> tuple[Figure, Axes]:
    """One line of ``scale`` x mean ``y`` over t per ``curve`` and a dotted ``level``."""
    fig, (ax,) = _figure(1, title, footer, width=7.5)
    names = sorted(d[curve].astype(str).unique())
    colors = _colors(names)
    for name in names:
        e = d[d[curve] == name].groupby("t", as_index=False)[y].mean()
        ax.plot(e["t"], scale * e[y], "o-", ms=3, color=colors[name], label=name)
    ax.axhline(level, color="0.5", lw=0.6, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig, ax


def accuracy_by_t_figure(acc: pd.DataFrame, title: str, footer: str) -> Figure:
    """Classifier accuracy vs t: columns classifier, t, accuracy and optionally input."""
    acc = acc.copy()
    if "input" not in acc.columns:
        acc["input"] = "x_t"
    acc["curve"] = acc["classifier"].astype(str) + " (" + acc["input"].astype(str) + ")"
    fig, ax = _curves_over_t(acc, "curve", "accuracy", title, footer, 25,
                             "t (noise level of the input)", "accuracy (%)", scale=100)
    ax.set_ylim(0, 102)
    return fig


def pag_figure(pag: pd.DataFrame, title: str, footer: str) -> Figure:
    """PAG score (D9) vs t per classifier from pag.parquet rows (:func:`pag_by_t`), on a log
    axis: the median where pag.parquet has it (a few images can dominate the mean), else the mean.
    """
    d = pag_by_t(pag)
    y = "pag_score_median" if "pag_score_median" in d.columns else "pag_score_mean"
    fig, ax = _curves_over_t(d, "classifier", y, title, footer, 1, "t",
                             f"PAG score, {y.rsplit('_', 1)[1]} (inside / outside the ball)")
    ax.set_yscale("log")
    return fig


def pag_by_t(pag: pd.DataFrame) -> pd.DataFrame:
    """Per (classifier, t): the per-class PAG mean (and median, where pag.parquet has it) averaged
    over classes, weighted by images; n_images."""
    stats = [c for c in ("pag_score_mean", "pag_score_median") if c in pag.columns]
    w = pag["n_images"].astype(float)
    d = pag.assign(_w=w, **{c: w * pag[c] for c in stats}).groupby(
        ["classifier", "t"], as_index=False)[["_w", *stats]].sum()
    for c in stats:
        d[c] = d[c] / d["_w"].where(d["_w"] > 0)
    return d.rename(columns={"_w": "n_images"})


# ---- PAG (gradcheck pag; docs/maths.md D9) ----------------------------------------------------


def minmax_normalize(g: np.ndarray) -> np.ndarray:
    """Per map min-max normalisation to [0, 1], a constant map 0.5: (..., 3, H, W) -> same shape."""
    a = np.asarray(g, dtype=np.float64)
    lo = a.min(axis=(-3, -2, -1), keepdims=True)
    span = a.max(axis=(-3, -2, -1), keepdims=True) - lo
    return np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.5)


def _to_rgb(x: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return np.clip((np.asarray(x).transpose(1, 2, 0) + 1) / 2, 0, 1)


def _image_grid(n_rows: int, n_cols: int, size: tuple[float, float], hspace: float,
                bottom: float, top: float) -> tuple[Figure, np.ndarray]:
    """A figure of ``size`` inches with (n_rows, n_cols) tickless image axes, 0.6 inch on the
    left for row labels and ``bottom`` / ``top`` inches of margin."""
    width, height = size
    fig = Figure(figsize=size)
    axes = fig.subplots(n_rows, n_cols, squeeze=False,
                        gridspec_kw=dict(wspace=0.05, hspace=hspace, left=0.6 / width, right=0.99,
                                         bottom=bottom / height, top=1 - top / height))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def gradient_map_figure(images: np.ndarray, maps: dict[str, np.ndarray],
                        timesteps: tuple[int, ...], row_labels: list[str]) -> Figure:
    """Kawar Figure 3: images (R, 3, H, W) in [-1, 1] and per source gradients (T, R, 3, H, W),
    min-max normalised per map; one column per (source, t)."""
    n_rows, n_t = images.shape[0], len(timesteps)
    n_cols = 1 + n_t * len(maps)
    fig, axes = _image_grid(n_rows, n_cols, (0.9 * n_cols + 0.6, 0.95 * n_rows + 0.9),
                            hspace=0.05, bottom=0.1, top=0.9)
    for r in range(n_rows):
        axes[r, 0].imshow(_to_rgb(images[r]))
        axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
        for k, (name, g) in enumerate(maps.items()):
            normed = minmax_normalize(g[:, r])
            for ti, t in enumerate(timesteps):
                ax = axes[r, 1 + k * n_t + ti]
                ax.imshow(normed[ti].transpose(1, 2, 0))
                if r == 0:
                    ax.set_title(f"{name}\nt={t}", fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    title = r"$\nabla_x \log p(y \mid x_t)$ on the true class, min-max normalised per map"
    from gradcheck.pag import ORACLE

    if ORACLE in maps:
        title += ("\noracle: the exact gradient (D8); at small t its posterior is one-hot on the "
                  "nearest training image, and grey = zero gradient (that image has class y)")
    fig.suptitle(title, fontsize=8)
    return fig


def pgd_figure(
    images: np.ndarray, adversarial: dict[str, np.ndarray], probs: dict[str, np.ndarray],
    row_labels: list[str], eps: float, steps: int, step_size: float,
    class_names: tuple[str, ...] = CLASS_NAMES,
) -> Figure:
    """Kawar Figure 4: sources (S, 3, H, W) and per model targeted PGD results (S, C, 3, H, W)
    with target probabilities (S, C)."""
    s, c = images.shape[0], len(class_names)
    n_cols = 1 + c * len(adversarial)
    fig, axes = _image_grid(s, n_cols, (0.95 * n_cols + 0.6, 1.1 * s + 1.2), hspace=0.3,
                            bottom=0.25, top=1.0)
    for i in range(s):
        axes[i, 0].imshow(_to_rgb(images[i]))
        axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
        for k, (name, adv) in enumerate(adversarial.items()):
            for j in range(c):
                ax = axes[i, 1 + k * c + j]
                ax.imshow(_to_rgb(adv[i, j]))
                ax.set_xlabel(f"p={probs[name][i, j]:.2f}", fontsize=6, labelpad=1)
                if i == 0:
                    ax.set_title(f"{name}\n-> {class_names[j]}", fontsize=7)
    axes[0, 0].set_title("source", fontsize=7)
    from gradcheck.pag import KAWAR_RMS

    rms = eps / math.sqrt(math.prod(images.shape[1:]))
    fig.suptitle(
        f"targeted L2 PGD at t=0 towards each class: eps = {eps:.1f} (per-pixel RMS {rms:.3f}; "
        f"Kawar et al.: eps = 100 at 3x128x128, RMS {KAWAR_RMS:.3f}), "
        f"{steps} steps of {step_size:.2f}, no early stop\n"
        "p = the model's probability of the target class", fontsize=8)
    return fig


def pag_score_figure(table: pd.DataFrame) -> Figure:
    """PAG score (D9) vs t from pag.parquet rows: one panel per class, one line per source,
    error bars = standard error of the mean over images; 1 = no preference for the ball."""
    classes = [c for c in CLASS_NAMES if c in set(table["class_name"])]
    fig = Figure(figsize=(3.0 * len(classes) + 0.5, 3.2), layout="constrained")
    axes = fig.subplots(1, len(classes), squeeze=False, sharey=True)[0]
    for ax, cls in zip(axes, classes, strict=True):
        part = table[table["class_name"] == cls]
        for name, rows in part.groupby("classifier", sort=False):
            rows = rows.sort_values("t")
            sem = rows["pag_score_std"].fillna(0) / np.sqrt(rows["n_images"].clip(lower=1))
            ax.errorbar(rows["t"], rows["pag_score_mean"], yerr=sem, marker="o", ms=3,
                        capsize=2, label=name)
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(cls, fontsize=9)
        ax.set_xlabel("t")
    axes[0].set_ylabel("PAG score: mean G on ball / off ball")
    axes[-1].legend(fontsize=7)
    fig.suptitle(
        "PAG score (D9), mean over images, bars: standard error. At small t the oracle's "
        "posterior is one-hot on the nearest training image (D8):\nits gradient is zero (no "
        "score, point missing) when that image has the true class", fontsize=8)
    return fig
