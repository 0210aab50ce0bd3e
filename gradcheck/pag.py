"""Perceptually aligned gradients (Kawar et al. 2023, Figures 3-4) and the PAG score (D9).

Three analyses per gradient source (a classifier, or the exact oracle of D8):

- gradient maps ``grad_x log p(y | x_t)`` of validation images on their true class at several t,
  min-max normalised (Kawar Figure 3);
- targeted L2 PGD with a large radius, turning an image of each class into every class, at t = 0
  (Kawar Figure 4), with the per-pixel RMS of Kawar's radius (:func:`kawar_equivalent_eps`);
- the PAG score of D9: with G the channel sum of the squared gradient, mean(G on the ball disc) /
  mean(G off it), from the generator's known discs. 1 means the gradient ignores the object.

Pure functions turn tensors or DataFrames into numbers and figures; :func:`run_pag` is the one
writer.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gradcheck import CLASS_NAMES
from gradcheck.attacks import pgd
from gradcheck.config import PagConfig, config_to_dict
from gradcheck.data.sportballs import ball_masks, load_factors, load_split
from gradcheck.guidance import log_prob_gradient
from gradcheck.models import (
    CLASSIFIER_KINDS,
    check_image_size,
    classifier_log_probs,
    load_classifier,
)
from gradcheck.oracle import EmpiricalOracle, oracle_available
from gradcheck.paths import default_classifier
from gradcheck.train_classifier import load_noise_schedule
from gradcheck.utils import (
    GradcheckError,
    atomic_output_dir,
    check_fields,
    check_output,
    check_seed,
    load_json,
    randn_per_sample,
    resolve_device,
    run_metadata,
    sample_generators,
    save_json,
    write_parquet,
)

KAWAR_EPS = 100.0  # Kawar et al. §5.1: targeted PGD, ||delta||_2 <= 100 ...
KAWAR_SHAPE = (3, 128, 128)  # ... on 128x128 ImageNet images in [-1, 1]
KAWAR_RMS = KAWAR_EPS / math.sqrt(math.prod(KAWAR_SHAPE))  # per-pixel RMS of that radius: 0.451
ORACLE = "oracle"
PAG_COLUMNS = (
    "classifier", "class_name", "label", "t", "pag_score_mean", "pag_score_std",
    "pag_score_median", "n_images", "n_undefined",
)
PGD_COLUMNS = ("classifier", "source_index", "source_label", "target", "prob_target", "l2")

GradientSource = nn.Module  # a gradcheck classifier, or an EmpiricalOracle


def kawar_equivalent_eps(image_shape: tuple[int, ...] = (3, 64, 64)) -> float:
    """L2 radius with the per-pixel RMS of Kawar's eps = 100 on 3x128x128: 50.0 for 3x64x64."""
    return KAWAR_RMS * math.sqrt(math.prod(image_shape))


# ---- Gradients ----------------------------------------------------------------------------------


def gradient_maps(
    source: GradientSource,
    x0: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    timesteps: tuple[int, ...],
    alphas_cumprod: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """Gradients (len(timesteps), N, 3, H, W) on the true class y (N,) at x_t = sqrt(abar_t) x0
    + sqrt(1 - abar_t) noise, x0 and noise (N, 3, H, W); float64 on the CPU, each image's up to
    a power of two (guidance.log_prob_gradient's direction): D9 and the min-max maps are
    scale-free, and a confident source's gradient itself underflows (the oracle's at small t)."""
    out = []
    for t in timesteps:
        abar = float(alphas_cumprod[t])
        x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
        out.append(torch.cat([
            log_prob_gradient(source, x_t[i:i + batch_size], y[i:i + batch_size], t)[0].cpu()
            for i in range(0, x0.shape[0], batch_size)
        ]))
    return torch.stack(out)


def pag_scores(grads: torch.Tensor | np.ndarray, masks: np.ndarray) -> np.ndarray:
    """D9 per image: grads (N, 3, H, W), ball discs masks (N, H, W) bool -> (N,) float64.

    G = sum over channels of grad^2; score = mean(G on the disc) / mean(G off the disc). A zero
    gradient (0 / 0) scores NaN.
    """
    g = torch.as_tensor(grads, dtype=torch.float64)
    m = torch.as_tensor(np.asarray(masks, dtype=bool))
    if g.dim() != 4 or m.shape != (g.shape[0], *g.shape[2:]):
        raise GradcheckError(
            f"PAG score needs grads (N, C, H, W) and masks (N, H, W), got {tuple(g.shape)} and "
            f"{tuple(m.shape)}"
        )
    if bool((m.flatten(1).all(1) | ~m.flatten(1).any(1)).any()):
        raise GradcheckError("every PAG mask needs pixels both on and off the disc")
    energy = g.square().sum(dim=1)
    inside = (energy * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    outside = (energy * ~m).flatten(1).sum(1) / (~m).flatten(1).sum(1)
    return (inside / outside).numpy()  # torch: 0 / 0 = NaN, x / 0 = inf, without warnings


def targeted_pgd_grid(
    source: GradientSource,
    x: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    num_classes: int = len(CLASS_NAMES),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted L2 PGD at t = 0 of clean images x (S, 3, H, W) towards every class.

    Returns adversarial images (S, C, 3, H, W) and the source's probability of the target
    (S, C). No early stop: the figure shows where the full budget leads (Kawar Figure 4).
    """
    model = _FixedTimestep(source, 0) if isinstance(source, EmpiricalOracle) else source
    s = x.shape[0]
    adv, prob = [], []
    for target in range(num_classes):
        y = torch.full((s,), target, dtype=torch.long, device=x.device)
        xa = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, norm="l2",
                 targeted=True, early_stop=False, t=0, clamp=(-1.0, 1.0))
        with torch.no_grad():
            p = classifier_log_probs(source, xa, 0).exp()[:, target]
        adv.append(xa.detach().cpu())
        prob.append(p.float().cpu())
    return torch.stack(adv, dim=1), torch.stack(prob, dim=1)


class _FixedTimestep(nn.Module):
    """The oracle at a fixed t as a t-less classifier (log q as logits), for the PGD attack."""

    def __init__(self, oracle: EmpiricalOracle, t: int) -> None:
        super().__init__()
        self.oracle, self.t = oracle, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) log q(. | x_t) at the fixed t."""
        return self.oracle(x, self.t)


# ---- Tables (pure; the figures are report.figures') ---------------------------------------------


def pag_table(
    classifier: str, scores: np.ndarray, labels: np.ndarray, timesteps: tuple[int, ...]
) -> pd.DataFrame:
    """Scores (T, N) of one source on images of labels (N,) -> pag.parquet rows (PAG_COLUMNS)."""
    rows = []
    for ti, t in enumerate(timesteps):
        for c in sorted(set(labels.tolist())):
            s = scores[ti, labels == c]
            ok = s[np.isfinite(s)]
            rows.append({
                "classifier": classifier, "class_name": CLASS_NAMES[c], "label": int(c),
                "t": int(t),
                "pag_score_mean": float(ok.mean()) if ok.size else float("nan"),
                "pag_score_std": float(ok.std(ddof=1)) if ok.size > 1 else float("nan"),
                "pag_score_median": float(np.median(ok)) if ok.size else float("nan"),
                "n_images": int(ok.size), "n_undefined": int(s.size - ok.size),
            })
    return pd.DataFrame(rows, columns=list(PAG_COLUMNS))


# ---- The writer ---------------------------------------------------------------------------------


def resolve_classifier_folder(spec: str) -> tuple[str, Path]:
    """(name, folder) of a --classifiers entry: a kind (the shipped default folder) or a path."""
    if spec in CLASSIFIER_KINDS:
        folder = default_classifier(spec)
        if not folder.is_dir():
            raise GradcheckError(
                f"classifier {spec!r}: the default folder {folder} does not exist (reference "
                "checkpoints not installed); pass classifier folders to --classifiers"
            )
        return spec, folder
    folder = Path(spec)
    if not folder.is_dir():
        raise GradcheckError(
            f"--classifiers entry {spec!r} is neither a kind ({', '.join(CLASSIFIER_KINDS)}) "
            "nor a classifier folder"
        )
    return folder.name, folder


def select_images(labels: np.ndarray, num_per_class: int, seed: int) -> np.ndarray:
    """Indices of up to ``num_per_class`` images of every class, drawn with ``seed``, grouped
    by class."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.sort(rng.permutation(np.flatnonzero(labels == c))[:num_per_class])
                           for c in range(len(CLASS_NAMES))])


def _check_config(cfg: PagConfig) -> None:
    check_fields(cfg, "num_images", "batch_size", "pgd_steps", "pgd_eps", "pgd_step_size")
    check_seed(cfg.seed)
    if not cfg.timesteps:
        raise GradcheckError("timesteps must name at least one t")
    if not cfg.classifiers and cfg.oracle is False:
        raise GradcheckError("nothing to analyse: no --classifiers and --no-oracle")
    if len(set(cfg.classifiers)) != len(cfg.classifiers):
        raise GradcheckError(f"--classifiers names one entry twice: {','.join(cfg.classifiers)}")
    if ORACLE in cfg.classifiers:
        raise GradcheckError("the oracle is not a classifier folder; use --oracle")


def run_pag(cfg: PagConfig | None = None, progress: bool = True, **overrides: Any) -> Path:
    """Gradient maps, targeted PGD and PAG scores of every source; writes ``cfg.out``:
    pag.parquet, pgd.parquet, gradient_maps, pgd_targeted and pag_score figures (PNG and PDF),
    config.json."""
    cfg = dataclasses.replace(cfg or PagConfig(), **overrides)
    _check_config(cfg)
    device = resolve_device(cfg.device)
    out = check_output(cfg.out, cfg.overwrite, folder=True)
    folders = [resolve_classifier_folder(s) for s in cfg.classifiers]
    names = [n for n, _ in folders]
    if len(set(names)) != len(names):
        raise GradcheckError(f"--classifiers gives two sources the same name: {names}")
    # Any clean kind: without --ddpm the schedule is docs/maths.md's.
    scheduler, schedule_source = load_noise_schedule(cfg.ddpm, kind="nonrobust")
    abar = scheduler.alphas_cumprod
    bad = [t for t in cfg.timesteps if not 0 <= t < abar.shape[0]]
    if bad:
        raise GradcheckError(f"timesteps must lie in 0..{abar.shape[0] - 1}, got {bad[0]}")
    use_oracle = oracle_available(cfg.data_root) if cfg.oracle is None else cfg.oracle
    if use_oracle and not oracle_available(cfg.data_root):
        raise GradcheckError(
            f"--oracle needs the train split of {cfg.data_root}, which is missing; generate it "
            "with `gradcheck make-dataset` or pass --no-oracle"
        )

    # Validation images: a seeded choice per class, with the same noise draw at every t.
    images_u8, labels_all = load_split(cfg.data_root, "val")
    counts = np.bincount(np.asarray(labels_all), minlength=len(CLASS_NAMES))
    if counts.min() < cfg.num_images:
        c = int(counts.argmin())
        raise GradcheckError(f"num_images {cfg.num_images} is more than the {counts[c]} validation "
                             f"images of class {CLASS_NAMES[c]} in {cfg.data_root}; pass "
                             f"--num-images <= {counts[c]}")
    idx = select_images(np.asarray(labels_all), cfg.num_images, cfg.seed)
    x0 = torch.from_numpy(np.asarray(images_u8[idx])).permute(0, 3, 1, 2).float() / 127.5 - 1
    x0 = x0.to(device)
    y = torch.as_tensor(np.asarray(labels_all)[idx], dtype=torch.long, device=device)
    noise = randn_per_sample(x0.shape[1:], sample_generators(cfg.seed, idx.tolist()), device)
    factors = load_factors(cfg.data_root)
    val = factors[factors["split"] == "val"].set_index("index").loc[idx].reset_index()
    masks = ball_masks(val, x0.shape[-1])
    eps = cfg.pgd_eps if cfg.pgd_eps is not None else kawar_equivalent_eps(tuple(x0.shape[1:]))
    step_size = cfg.pgd_step_size or 2.5 * eps / cfg.pgd_steps
    # One source image per class for the figures: the first picked of each class.
    labels_np = y.cpu().numpy()
    fig_rows = np.array([int(np.flatnonzero(labels_np == c)[0]) for c in np.unique(labels_np)])

    # (name, classifier folder); the oracle has none. Loaded one at a time to bound memory.
    sources: list[tuple[str, Path | None]] = folders + ([(ORACLE, None)] if use_oracle else [])
    for name, folder in folders:  # before minutes of work on the others
        check_image_size(load_json(folder / "config.json"), x0.shape[-1], f"classifier {name}",
                         f"{cfg.data_root} has")
    tables, maps, adversarial, probs, pgd_rows = [], {}, {}, {}, []
    bar = tqdm(sources, desc="pag", disable=not progress)
    for name, folder in bar:
        bar.set_postfix_str(name)
        if folder is None:
            source = EmpiricalOracle.from_data_root(cfg.data_root, abar, device)
        else:
            source = load_classifier(folder, device)[0]
        grads = gradient_maps(source, x0, y, noise, tuple(cfg.timesteps), abar, cfg.batch_size)
        scores = np.stack([pag_scores(g, masks) for g in grads])
        tables.append(pag_table(name, scores, labels_np, tuple(cfg.timesteps)))
        maps[name] = grads[:, fig_rows].numpy()
        src = x0[fig_rows]
        adv, p = targeted_pgd_grid(source, src, eps, cfg.pgd_steps, step_size)
        adversarial[name], probs[name] = adv.numpy(), p.numpy()
        for i, r in enumerate(fig_rows):
            for j in range(adv.shape[1]):
                pgd_rows.append({
                    "classifier": name, "source_index": int(idx[r]), "source_label": int(y[r]),
                    "target": j, "prob_target": float(p[i, j]),
                    "l2": float((adv[i, j] - src[i].cpu()).norm()),
                })
        del source
    table = pd.concat(tables, ignore_index=True)
    pgd_table = pd.DataFrame(pgd_rows, columns=list(PGD_COLUMNS))
    meta = {
        "config": config_to_dict(cfg), "pgd_eps": eps, "pgd_step_size": step_size,
        "pgd_eps_rule": "given" if cfg.pgd_eps is not None else
        "per-pixel RMS of Kawar et al.'s eps = 100 on 3x128x128 (0.451)",
        "schedule": schedule_source, "oracle": use_oracle, "sources": [n for n, _ in sources],
        "val_indices": idx.tolist(), **run_metadata(device),
    }
    from gradcheck.report.figures import gradient_map_figure, pag_score_figure, pgd_figure

    row_labels = [f"{CLASS_NAMES[int(y[r])]} #{int(idx[r])}" for r in fig_rows]
    figures = {
        "gradient_maps": gradient_map_figure(x0[fig_rows].cpu().numpy(), maps,
                                             tuple(cfg.timesteps), row_labels),
        "pgd_targeted": pgd_figure(x0[fig_rows].cpu().numpy(), adversarial, probs, row_labels,
                                   eps, cfg.pgd_steps, step_size),
        "pag_score": pag_score_figure(table),
    }
    with atomic_output_dir(out, overwrite=cfg.overwrite) as tmp:
        write_parquet(table, tmp / "pag.parquet", meta)
        write_parquet(pgd_table, tmp / "pgd.parquet", meta)
        for stem, fig in figures.items():
            fig.savefig(tmp / f"{stem}.png", dpi=150)
            fig.savefig(tmp / f"{stem}.pdf")
        save_json(tmp / "config.json", meta)
    return out
