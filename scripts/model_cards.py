"""Write the model cards of a checkpoint set from what its commands recorded (no hand-typed
numbers): the DDPM's train_config.json and eval/eval.json, each classifier's config.json,
train_log.parquet and accuracy_by_t.parquet.

    python scripts/model_cards.py checkpoints/sportballs32-v1 --script scripts/sportballs32.sh
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from gradcheck import CLASS_NAMES

BAR = {"white_border_share": 0.95, "confident_share": 0.90, "class_share": (0.18, 0.32)}


def pct(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.{digits}f}%"


def ci(pair: list[float] | None) -> str:
    return "" if not pair else f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def ddpm_card(folder: Path, script: str) -> str:
    train = json.loads((folder / "train_config.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    sittings = train["sittings"]
    first = sittings[0]["config"]
    hardware = sorted({s["metadata"]["hardware"] for s in sittings})
    minutes = train["train_seconds"] / 60
    rows = "\n".join(
        f"| {i + 1} | {s['mode']} | {s['start_step']:,} -> {s['end_step']:,} | "
        f"{s['seconds'] / 60:.1f} min | {s.get('precision', {}).get('autocast', '?')} |"
        for i, s in enumerate(sittings))
    precision = sittings[0].get("precision", {})
    lines = [
        f"# SportBalls DDPM, preset `{first['preset']}` ({unet['sample_size']}x"
        f"{unet['sample_size']})",
        "",
        f"Unconditional DDPM: diffusers `UNet2DModel`, `block_out_channels="
        f"{tuple(unet['block_out_channels'])}`, {unet['layers_per_block']} resnet per level, "
        f"blocks {', '.join(unet['down_block_types'])}; `DDPMScheduler` linear beta 1e-4 -> 0.02, "
        "T = 1000, fixed small variance, epsilon prediction, clipped samples (docs/maths.md). "
        "Weights are the EMA in fp16 safetensors.",
        "",
        "```python",
        "from diffusers import DDPMPipeline",
        f'pipe = DDPMPipeline.from_pretrained("{folder.as_posix()}", use_safetensors=True)',
        "```",
        "",
        "## Training",
        "",
        f"Data set `{first['data_root']}` (seed 0), {', '.join(hardware)}, batch "
        f"{first['batch_size']}, AdamW lr {first['lr']:g} ({first['warmup_steps']}-step warm-up, "
        f"betas {first['adam_beta1']}/{first['adam_beta2']}), Min-SNR-gamma "
        f"{first['min_snr_gamma']:g}, multiscale weight {first['multiscale_weight']:g}, EMA "
        f"{first['ema_decay']} with warm-up, gradient clipping {first['grad_clip']:g}. "
        f"Arithmetic: {precision.get('autocast', '?')} ({precision.get('reason', '')}).",
        "",
        "| sitting | mode | steps | wall time | arithmetic |",
        "|---|---|---|---|---|",
        rows,
        "",
        f"Total: {train['step']:,} steps, {train['images_seen']:,} images seen, {minutes:.1f} "
        f"CPU minutes of training. `{script} ddpm` reproduces it (resumable).",
    ]
    ev_path = folder / "eval" / "eval.json"
    if ev_path.is_file():
        ev = json.loads(ev_path.read_text())
        share = ev.get("class_share", {})
        share_ci = ev.get("class_share_ci", {})
        lo, hi = BAR["class_share"]
        ok = {
            "border": ev["white_border_share"] >= BAR["white_border_share"],
            "confident": ev.get("confident_share", 0) >= BAR["confident_share"],
            "classes": bool(share) and all(lo <= v <= hi for v in share.values()),
        }
        meta = ev["metadata"]
        lines += [
            "",
            "## Evaluation",
            "",
            f"`gradcheck eval-ddpm {folder.as_posix()} --num-samples {ev['num_samples']} "
            f"--steps {ev['steps']} --judge <set>/classifiers/judge` ({ev['num_samples']} samples, "
            f"the full {ev['steps']}-step sampler, seed {ev['config']['seed']}, "
            f"{ev.get('sampling_autocast', '?')} autocast, {ev['sampling_s'] / 60:.1f} min on "
            f"{meta['hardware']}; `eval/`). Intervals are exact 95% (Clopper-Pearson).",
            "",
            "| measure | value | quality bar | met |",
            "|---|---|---|---|",
            f"| samples with a white border (mean border pixel >= 0.95) | "
            f"{pct(ev['white_border_share'])}{ci(ev.get('white_border_share_ci'))} | >= 95% | "
            f"{'yes' if ok['border'] else 'no'} |",
            f"| judge confidence >= 0.9 | {pct(ev.get('confident_share'))}"
            f"{ci(ev.get('confident_share_ci'))} | >= 90% | {'yes' if ok['confident'] else 'no'} |",
            "| class shares (judge) " + " / ".join(CLASS_NAMES) + " | "
            + " / ".join(f"{pct(share.get(c))}{ci(share_ci.get(c))}" for c in CLASS_NAMES)
            + f" | 25 +/- 7% each | {'yes' if ok['classes'] else 'no'} |",
        ]
        if "fid" in ev:
            lines.append(f"| FID vs test split ({ev['extractor']}, N = {ev['num_samples']} vs "
                         f"{ev['n_reference']}) | {ev['fid']:.2f} | - | - |")
        lines += ["", "Samples (first 64): ![samples](eval/samples.png)"]
    return "\n".join(lines) + "\n"


def classifier_card(folder: Path, script: str) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    tc = cfg["train_config"]
    acc = pd.read_parquet(folder / "accuracy_by_t.parquet")
    log = pd.read_parquet(folder / "train_log.parquet")
    noisy = acc[(acc["input"] == "x_t") & (acc["attack"] == "none")]
    pgd = cfg.get("pgd_l2_accuracy", {})
    kind = cfg["kind"]
    what = {
        "nonrobust": "trained on clean images only (GradCheck's non-robust classifier)",
        "robust": "trained on noisy latents x_t with t uniform (GradCheck's robust classifier)",
        "adversarial": "time-conditioned, trained on x_t with L2 PGD adversarial examples "
                       f"(eps {tc['attack_eps']}, step {tc['attack_step_size']}, "
                       f"{tc['attack_steps']} steps; Kawar et al. 2023)",
        "judge": "a different architecture that grades samples and never guides",
    }[kind]
    lines = [
        f"# SportBalls classifier `{kind}` ({cfg['arch']}, {cfg['image_size']}x"
        f"{cfg['image_size']})",
        "",
        f"{cfg['arch']}, {what}. Input: {cfg['input']}.",
    ]
    if cfg.get("time_conditioned"):
        lines += ["", cfg["time_input"] + "."]
    lines += [
        "",
        "## Training",
        "",
        f"Data set `{tc['data_root']}` (seed 0), {cfg['train_images']:,} training images, "
        f"{cfg['hardware']}, batch {tc['batch_size']}, AdamW lr {tc['lr']:g}, weight decay "
        f"{tc['weight_decay']}, up to {tc['epochs']} epochs capped at {tc['max_minutes']} min: "
        f"{len(log)} epochs ({int(log['steps'].iloc[-1]):,} steps) in "
        f"{cfg['train_wall_s'] / 60:.1f} CPU minutes; best epoch {cfg['best_epoch']} by "
        f"{cfg['early_stopping_metric']}. `{script} classifiers` reproduces it.",
        "",
        "## Evaluation (validation split)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| clean accuracy ({cfg['val_images']:,} images) | {pct(cfg['clean_val_accuracy'], 2)} |",
        f"| noisy-latent accuracy, t uniform ({cfg['val_images']:,} images) | "
        f"{pct(cfg['noisy_val_accuracy'], 2)} |",
    ]
    for eps, a in sorted(pgd.items(), key=lambda kv: float(kv[0])):
        if float(eps) > 0:
            lines.append(f"| L2 PGD accuracy, eps {eps} ({tc['eval_pgd_steps']} steps, clean "
                         f"images) | {pct(a)} |")
    if len(noisy):
        by_t = noisy.groupby("t")["accuracy"].mean()
        picks = [t for t in (0, 250, 500, 750, 950) if t in by_t.index]
        lines.append("| accuracy on x_t at t = " + ", ".join(map(str, picks)) + " | "
                     + ", ".join(pct(by_t[t]) for t in picks) + " |")
    lines += ["", "`accuracy_by_t.parquet` has every t, on x_t and on the DDPM's x0-estimate."]
    return "\n".join(lines) + "\n"


def set_card(root: Path, script: str) -> str:
    """The set's README: one line per model with its headline numbers, links to the cards."""
    ddpm = root / "ddpm"
    train = json.loads((ddpm / "train_config.json").read_text())
    unet = json.loads((ddpm / "unet" / "config.json").read_text())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()
               and "train_state" not in p.parts)
    lines = [
        f"# Checkpoint set `{root.name}`",
        "",
        f"A {unet['sample_size']}x{unet['sample_size']} reference set: the unconditional DDPM "
        "and the four classifiers, trained with the project's own commands "
        f"(`{script}`), fp16 safetensors, {size / 2**20:.1f} MiB in all. Every number below is "
        "read from the files the commands wrote (`scripts/model_cards.py`).",
        "",
        "| model | what | headline numbers | card |",
        "|---|---|---|---|",
    ]
    ev_path = ddpm / "eval" / "eval.json"
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
    ddpm_numbers = f"{train['step']:,} steps, {train['train_seconds'] / 60:.0f} CPU min"
    if ev:
        ddpm_numbers += (f"; white borders {pct(ev['white_border_share'])}, judge-confident "
                         f"{pct(ev.get('confident_share'))} of {ev['num_samples']} samples")
    lines.append(f"| DDPM | `UNet2DModel` {unet['block_out_channels']} | {ddpm_numbers} | "
                 "[ddpm/README.md](ddpm/README.md) |")
    for folder in sorted((root / "classifiers").iterdir()):
        if not (folder / "config.json").is_file():
            continue
        cfg = json.loads((folder / "config.json").read_text())
        numbers = (f"clean {pct(cfg['clean_val_accuracy'])}, noisy latents "
                   f"{pct(cfg['noisy_val_accuracy'])}")
        pgd = cfg.get("pgd_l2_accuracy", {})
        if "0.5" in pgd:
            numbers += f", L2 PGD eps 0.5: {pct(pgd['0.5'])}"
        card = f"classifiers/{folder.name}/README.md"
        lines.append(f"| `{cfg['kind']}` | {cfg['arch']} | {numbers} | [{card}]({card}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", type=Path)
    ap.add_argument("--script", default="scripts/sportballs32.sh")
    args = ap.parse_args()
    (args.set / "ddpm" / "README.md").write_text(ddpm_card(args.set / "ddpm", args.script))
    (args.set / "README.md").write_text(set_card(args.set, args.script))
    for folder in sorted((args.set / "classifiers").iterdir()):
        if (folder / "config.json").is_file():
            (folder / "README.md").write_text(classifier_card(folder, args.script))
    print(f"wrote the cards of {args.set}")


if __name__ == "__main__":
    main()
