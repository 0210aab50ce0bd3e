"""The gradcheck command line: one thin typer command per stage, no logic beyond arguments."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
from typing import Any

import typer

import gradcheck
from gradcheck import config as C
from gradcheck.paths import REFERENCE_SETS, default_data_root
from gradcheck.utils import GradcheckError

app = typer.Typer(
    name="gradcheck",
    help="Why classifier guidance works or fails: data, DDPM, classifiers, guided sampling, "
    "metrics and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


# The stage configs: their fields' defaults are the options' defaults.
_DATA, _EVAL, _METRICS, _PAG = C.DatasetConfig, C.EvalDDPMConfig, C.MetricsConfig, C.PagConfig
_RUN, _SWEEP, _CLF, _DDPM = C.RunConfig, C.SweepConfig, C.TrainClassifierConfig, C.TrainDDPMConfig


def _given(values: dict[str, Any], config: Any) -> dict[str, Any]:
    """The entries of a command's ``locals()`` named like a field of the dataclass ``config``,
    None ones left out: an option given as None means that field's default."""
    names = {f.name for f in dataclasses.fields(config)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradcheck {gradcheck.__version__}")
        raise typer.Exit()


def _data_root_option(help: str) -> typer.models.OptionInfo:
    """--data-root: GRADCHECK_DATA when set, else the data set of the chosen checkpoint set."""
    return typer.Option(
        None, envvar="GRADCHECK_DATA", callback=lambda v: v or str(default_data_root()),
        help=help + " [default: the checkpoint set's: datasets/sportballs32 for sportballs32-v1, "
        "datasets/sportballs for sportballs-v1]")


def _sized_data_root_option(help: str, by: str) -> typer.models.OptionInfo:
    """--data-root: GRADCHECK_DATA when set, else the data set of ``by``'s image size."""
    return typer.Option(None, envvar="GRADCHECK_DATA",
                        help=f"{help} [default: the data set of {by}'s image size]")


def _choose_checkpoints(value: str | None) -> str | None:
    """--checkpoints: a set name or folder, made the process's GRADCHECK_CHECKPOINTS."""
    import os

    from gradcheck.paths import checkpoint_set, checkpoint_set_name

    if value:
        os.environ["GRADCHECK_CHECKPOINTS"] = value
    folder = checkpoint_set()
    if value and not folder.is_dir():
        raise GradcheckError(f"checkpoint set {checkpoint_set_name()!r} not found at {folder}; "
                             f"choose one of: {', '.join(REFERENCE_SETS)}, or a folder holding "
                             "ddpm/ and classifiers/")
    how = "--checkpoints" if value else ("GRADCHECK_CHECKPOINTS" if os.environ.get(
        "GRADCHECK_CHECKPOINTS") else "no GPU" if checkpoint_set_name() != "sportballs-v1"
        else "GPU")
    typer.echo(f"checkpoints: {checkpoint_set_name()} ({how})", err=True)
    return value


def _checkpoints_option() -> typer.models.OptionInfo:
    return typer.Option(
        None, "--checkpoints", is_eager=True, callback=_choose_checkpoints,
        help="Reference set for every default model and data set: sportballs32-v1 (32x32, CPU "
        "scale) | sportballs-v1 (64x64, paper scale) | a folder; also GRADCHECK_CHECKPOINTS "
        "[default: sportballs-v1 with a GPU, sportballs32-v1 without].")


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """gradcheck: instrumented classifier guidance for diffusion models."""


# ---- commands: each section belongs to the module named in its header -----------------------
# [make-dataset: data/sportballs.py]
@app.command("make-dataset")
def make_dataset(
    root: str | None = typer.Option(
        None, envvar="GRADCHECK_DATA", help="Output folder (must not exist) [default: "
        "datasets/sportballs for 64x64, datasets/sportballsN for NxN]."),
    n_train: int = typer.Option(
        _DATA.n_train, help="Training images (balanced over the 4 classes)."),
    n_val: int = typer.Option(_DATA.n_val, help="Validation images."),
    n_test: int = typer.Option(_DATA.n_test, help="Test images."),
    seed: int = typer.Option(_DATA.seed, help="Fixes every byte of the data set."),
    image_size: int = typer.Option(_DATA.image_size, help="Image side in pixels."),
    png: bool = typer.Option(_DATA.png, "--png", help="Also write png/{split}/{class}/NNNNN.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing root."),
) -> None:
    """Generate the SportBalls data set: image arrays, labels, factors.parquet, preview.png."""
    from gradcheck import CLASS_NAMES
    from gradcheck.data.sportballs import generate_dataset
    from gradcheck.paths import data_root_for

    root = root or data_root_for(image_size)
    summary = generate_dataset(
        root, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, image_size=image_size,
        png=png, overwrite=overwrite, progress=True,
    )
    total = sum(sum(c.values()) for c in summary["counts"].values())
    typer.echo(
        f"wrote {total} images to {summary['root']} in {summary['seconds']:.1f} s "
        f"({summary['images_per_s']:.0f} images/s)"
    )
    typer.echo(f"{'split':<6}" + "".join(f"{c:>12}" for c in CLASS_NAMES))
    for split, counts in summary["counts"].items():
        typer.echo(f"{split:<6}" + "".join(f"{counts[c]:>12}" for c in CLASS_NAMES))


# [train-ddpm, eval-ddpm: train_ddpm.py]
@app.command("train-ddpm")
def train_ddpm_cmd(
    data_root: str | None = _sized_data_root_option("Data set root (train split).", "--preset"),
    out: str = typer.Option(_DDPM.out, help="Root; writes OUT/NAME/ddpm and its train state."),
    name: str = typer.Option(_DDPM.name, help="Checkpoint set name."),
    preset: str = typer.Option(
        _DDPM.preset, help="UNet preset: paper (64x64, 22.4M) | small32 (32x32, 3.15M: the CPU "
        "scale) | tiny (32x32, tests)."),
    max_minutes: float | None = typer.Option(
        None, help="Wall-clock budget of this call (data loading and compilation included); "
        "ends with a checkpoint and export."),
    max_steps: int | None = typer.Option(None, help="Total optimiser steps (across sittings)."),
    batch_size: int = typer.Option(
        _DDPM.batch_size, help="Global batch size (split over processes)."),
    lr: float = typer.Option(_DDPM.lr, help="AdamW peak learning rate."),
    warmup_steps: int = typer.Option(
        _DDPM.warmup_steps, help="Linear learning-rate warm-up steps."),
    adam_beta1: float = typer.Option(_DDPM.adam_beta1, help="AdamW beta1."),
    adam_beta2: float = typer.Option(_DDPM.adam_beta2, help="AdamW beta2."),
    weight_decay: float = typer.Option(_DDPM.weight_decay, help="AdamW weight decay."),
    grad_clip: float = typer.Option(
        _DDPM.grad_clip, help="Max global gradient norm (0: no clipping)."),
    min_snr_gamma: float = typer.Option(
        _DDPM.min_snr_gamma, help="Min-SNR-gamma loss weighting min(SNR, gamma)/SNR; 0 = the "
        "simple loss."),
    multiscale_weight: float = typer.Option(
        _DDPM.multiscale_weight, help="Weight of the low-frequency error term (Hoogeboom et al. "
        "2023) that teaches the UNet to remove the noise's mean colour (white backgrounds); "
        "0 = plain loss; try 0.02."),
    ema_decay: float = typer.Option(_DDPM.ema_decay, help="EMA decay (ceiling of the warm-up)."),
    ema_warmup: bool = typer.Option(
        _DDPM.ema_warmup, help="EMA decay min(ema_decay, (1+step)/(10+step))."),
    hflip: bool = typer.Option(
        _DDPM.hflip, help="Random horizontal flips (the volleyball is chiral)."),
    max_images: int | None = typer.Option(None, help="Use only the first N training images."),
    mixed_precision: str = typer.Option(
        _DDPM.mixed_precision, help="auto (bf16 on a GPU; on a CPU bf16 where a timed probe finds "
        "it >= 1.2x faster, else float32; printed and recorded) | bf16 | no."),
    channels_last: bool = typer.Option(
        _DDPM.channels_last, help="NHWC memory format for the UNet."),
    compile: bool = typer.Option(
        _DDPM.compile, "--compile", help="torch.compile the UNet: 1.81x images/s on an H100 after "
        "about 150 s of compiling, so worth it past a few minutes."),
    seed: int = typer.Option(
        _DDPM.seed, help="Seed of initialisation, batches, timesteps and noise."),
    log_every: int = typer.Option(_DDPM.log_every, help="Steps between progress-bar updates."),
    sample_every: int = typer.Option(
        _DDPM.sample_every, help="Steps between sample grids (EMA); 0 = only at the end."),
    sample_steps: int = typer.Option(
        _DDPM.sample_steps, help="Respaced DDPM steps for those grids."),
    checkpoint_every: int = typer.Option(
        _DDPM.checkpoint_every, help="Steps between train state + export; 0 = only at the end."),
    fp16_export: bool = typer.Option(
        _DDPM.fp16_export, help="Export the EMA UNet in fp16 (shards < 16 MiB)."),
    resume: bool = typer.Option(_DDPM.resume, "--resume", help="Continue OUT/NAME's train state."),
    init_from: str | None = typer.Option(
        None, help="Start from an exported DDPM folder (model and EMA); fresh optimiser."),
    device: str = typer.Option(_DDPM.device, help="auto | cpu | cuda | cuda:N."),
    overwrite: bool = typer.Option(_DDPM.overwrite, "--overwrite", help="Replace OUT/NAME's DDPM."),
    progress: bool = typer.Option(_DDPM.progress, help="Show the progress bar."),
) -> None:
    """Train the unconditional DDPM (several GPUs: `accelerate launch -m gradcheck train-ddpm`)."""
    from gradcheck.models import UNET_PRESETS
    from gradcheck.paths import data_root_for
    from gradcheck.train_ddpm import train_ddpm

    if data_root is None:
        data_root = data_root_for(UNET_PRESETS.get(preset, {}).get("sample_size", 64))
    s = train_ddpm(_DDPM(**_given(locals(), _DDPM)))
    if not s["main_process"]:
        return
    typer.echo(f"step {s['step']} ({s['steps_this_call']} this call, {s['images_seen']} images "
               f"seen) in {s['minutes']:.1f} min, {s['images_per_s']:.0f} images/s on "
               f"{s['device']} x{s['num_processes']}; loss {s['loss']:.4f}")
    typer.echo(f"export: {s['export']}  train state: {s['train_state']}")


@app.command("eval-ddpm")
def eval_ddpm_cmd(
    folder: str | None = typer.Argument(
        None, help="DDPM pipeline folder [default: the checkpoint set's ddpm/]."),
    num_samples: int = typer.Option(
        _EVAL.num_samples, help="Samples; sample i depends only on (seed, i)."),
    steps: int = typer.Option(_EVAL.steps, help="DDPM steps (fewer are respaced)."),
    batch_size: int = typer.Option(_EVAL.batch_size, help="Batch size (memory only)."),
    judge: str | None = typer.Option(
        None, help="Judge classifier folder: class histogram, confidence, FID/KID features."),
    data_root: str | None = _sized_data_root_option("Data set root (test split).", "the DDPM"),
    seed: int = typer.Option(_EVAL.seed, help="Sampling seed."),
    device: str = typer.Option(_EVAL.device, help="auto | cpu | cuda | cuda:N."),
    mixed_precision: str = typer.Option(
        _EVAL.mixed_precision, help="auto (bf16 autocast on a GPU and on CPUs with native bf16, "
        "AVX-512 bf16 or AMX; float32 elsewhere) | bf16 | no. Recorded in eval.json."),
    out: str | None = typer.Option(None, help="Output folder (default: FOLDER/eval)."),
    overwrite: bool = typer.Option(
        _EVAL.overwrite, "--overwrite", help="Replace an existing output."),
    progress: bool = typer.Option(_EVAL.progress, help="Show the progress bar."),
) -> None:
    """Unconditional sample quality: white borders, judge classes, FID/KID -> eval.json."""
    from pathlib import Path

    from gradcheck.eval_ddpm import evaluate_ddpm
    from gradcheck.paths import data_root_for, default_ddpm
    from gradcheck.utils import load_json

    folder = folder or str(default_ddpm())
    if data_root is None:
        unet_config = Path(folder) / "unet" / "config.json"
        size = load_json(unet_config).get("sample_size", 64) if unet_config.is_file() else 64
        data_root = data_root_for(int(size))
    s = evaluate_ddpm(_EVAL(**_given(locals(), _EVAL)))
    typer.echo(f"{s['num_samples']} samples, {s['steps']} steps: white border "
               f"{s['white_border_share']:.1%}, mean-colour slope at t=T-1 "
               f"{s['mean_colour_slope']:.2f} (ideal 1)")
    if "class_share" in s:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in s["class_share"].items())
        typer.echo(f"judge: {shares}; confident {s['confident_share']:.1%}")
    if "fid" in s:
        std = f" ± {s['kid_std']:.4f}" if math.isfinite(s["kid_std"]) else ""
        typer.echo(f"FID {s['fid']:.2f}, KID {s['kid_mean']:.4f}{std} "
                   f"({s['extractor']}, N={s['num_samples']} vs {s['n_reference']})")
    else:
        typer.echo(f"FID/KID skipped: {s['fid_skipped']}")
    typer.echo(f"wrote {s['out']}")


# [train-classifier: train_classifier.py]


@app.command("train-classifier")
def train_classifier_cmd(
    kind: str = typer.Option(..., help="nonrobust | robust | adversarial | judge."),
    time_conditioned: bool = typer.Option(
        _CLF.time_conditioned, help="Robust/adversarial only: the network also gets t (a constant "
        "4th input channel t/1000)."),
    ddpm: str | None = typer.Option(
        None, help="DDPM folder. Its scheduler config gives the noise schedule (required for "
        "robust and adversarial); its UNet, when present, adds x0-estimate (D2) evaluation."),
    data_root: str = _data_root_option("Data set root."),
    out: str = typer.Option(_CLF.out, help="Root; writes OUT/NAME/classifiers/KIND."),
    name: str = typer.Option(_CLF.name, help="Checkpoint set name."),
    epochs: int = typer.Option(
        _CLF.epochs, help="Maximum epochs (early stopping usually ends sooner)."),
    batch_size: int = typer.Option(_CLF.batch_size, help="Batch size."),
    lr: float = typer.Option(_CLF.lr, help="AdamW peak learning rate (warm-up, cosine to lr/10)."),
    weight_decay: float = typer.Option(_CLF.weight_decay, help="AdamW weight decay."),
    patience: int = typer.Option(
        _CLF.patience, help="Epochs without better validation accuracy to stop."),
    max_minutes: float | None = typer.Option(None, help="Wall-clock cap; keeps the best weights."),
    seed: int = typer.Option(
        _CLF.seed, help="Seed of initialisation, batches, noise and evaluation."),
    device: str = typer.Option(_CLF.device, help="auto | cpu | cuda | cuda:N."),
    amp: bool = typer.Option(_CLF.amp, help="bf16 autocast on CUDA."),
    fp16: bool = typer.Option(_CLF.fp16, help="Store the weights in float16 (for shipping)."),
    attack_eps: float = typer.Option(
        _CLF.attack_eps, help="Adversarial: L2 PGD radius (Kawar et al.)."),
    attack_step_size: float = typer.Option(
        _CLF.attack_step_size, help="Adversarial: PGD step size."),
    attack_steps: int = typer.Option(
        _CLF.attack_steps, help="Adversarial: maximum PGD steps (early stop)."),
    eval_samples: int = typer.Option(
        _CLF.eval_samples, help="Validation images in accuracy_by_t.parquet."),
    eval_pgd_steps: int = typer.Option(
        _CLF.eval_pgd_steps, help="Evaluation PGD steps (step 2.5 eps / steps)."),
    eval_pgd_eps: list[float] = typer.Option(
        list(_CLF.eval_pgd_eps), help="Evaluation L2 PGD radii (repeat the option)."),
    overwrite: bool = typer.Option(_CLF.overwrite, help="Replace an existing classifier folder."),
    progress: bool = typer.Option(_CLF.progress, help="Show progress bars."),
) -> None:
    """Train a guiding classifier or the judge, then write its accuracy_by_t.parquet."""
    from gradcheck.train_classifier import train_classifier

    eval_pgd_eps = tuple(eval_pgd_eps)
    folder = train_classifier(_CLF(**_given(locals(), _CLF)))
    typer.echo(str(folder))


@app.command("eval-classifier")
def eval_classifier_cmd(
    folder: str = typer.Argument(..., help="Classifier folder (config.json + model.safetensors)."),
    data_root: str = _data_root_option("Data set root."),
    ddpm: str | None = typer.Option(None, help="DDPM folder: its UNet adds x0-estimate (D2) rows."),
    eval_samples: int = typer.Option(_CLF.eval_samples, help="Validation images in the table."),
    eval_pgd_eps: list[float] = typer.Option(
        list(_CLF.eval_pgd_eps), help="L2 PGD radii (repeat the option)."),
    eval_pgd_steps: int = typer.Option(
        _CLF.eval_pgd_steps, help="PGD steps (step 2.5 eps / steps)."),
    batch_size: int = typer.Option(_CLF.batch_size, help="Batch size."),
    seed: int = typer.Option(_CLF.seed, help="Seed of the fixed evaluation noise."),
    device: str = typer.Option(_CLF.device, help="auto | cpu | cuda | cuda:N."),
    amp: bool = typer.Option(_CLF.amp, help="bf16 autocast on CUDA."),
    progress: bool = typer.Option(_CLF.progress, help="Show progress bars."),
) -> None:
    """Re-evaluate a classifier: rewrite accuracy_by_t.parquet and config.json's summary."""
    from gradcheck.train_classifier import evaluate_classifier

    eval_pgd_eps = tuple(eval_pgd_eps)  # the options are train-classifier's, the config's fields
    table = evaluate_classifier(folder, **_given(locals(), _CLF))
    typer.echo(table.to_string(index=False))
# [run: sampler.py]


@app.command("run")
def run_cmd(
    checkpoints: str | None = _checkpoints_option(),
    classifier: str = typer.Option(
        _RUN.classifier, help="nonrobust | robust | adversarial (the shipped classifiers) | oracle "
        "(exact empirical posterior, D8) | a classifier folder."),
    x0_estimate: bool = typer.Option(
        _RUN.x0_estimate, "--x0-estimate/--no-x0-estimate",
        help="Guide with the classifier on the one-step x0-estimate (D2, GradCheck Eq. 3)."),
    adam: bool | None = typer.Option(
        None, "--adam/--no-adam", help="Shorthand for --stabilizer adam (D4) / none."),
    stabilizer: str | None = typer.Option(
        None, help="Gradient stabiliser (D4): none | adam | ema | rmsprop | adam-nobias "
        "[default: none]."),
    normalize: bool = typer.Option(
        _RUN.normalize, "--normalize/--no-normalize",
        help="Scale the guidance to a reference norm (D5, GradCheck Eq. 2; docs/maths.md)."),
    normalize_to: str = typer.Option(
        _RUN.normalize_to, help="D5's reference norm: score (GradCheck) | eps (Augustin et al.'s "
        "code, sqrt(1 - abar_t) x the score's)."),
    diffusion_time: bool = typer.Option(
        _RUN.diffusion_time, "--diffusion-time/--no-diffusion-time",
        help="Stabiliser betas in diffusion time, beta ** (T // steps) (D4'; identical at 1000 "
        "steps); --no-diffusion-time counts sampler steps."),
    log_prob: str = typer.Option(
        _RUN.log_prob, help="D3's objective: stable (exact at any margin) | log-softmax "
        "(autograd through log_softmax, which loses the target's term once p(y|x) rounds to 1 "
        "in float32; docs/maths.md D3)."),
    scale: float = typer.Option(
        _RUN.scale, help="Guidance scale s (D6); 0 = unguided, same noise."),
    target: str = typer.Option(
        "baseball", help="Target class: baseball | basketball | soccer | volleyball | 0-3."),
    num_samples: int | None = typer.Option(
        None, help="Samples [default: 64 on a GPU, 8 on a CPU; the paper: 64]."),
    batch_size: int = typer.Option(
        _RUN.batch_size, help="Batch size (memory only; results do not change)."),
    steps: int | None = typer.Option(
        None, help="Sampling steps; fewer than T = 1000 respace the chain [default: 1000]."),
    seed: int = typer.Option(_RUN.seed, help="Seed; sample i depends only on (seed, i)."),
    device: str = typer.Option(_RUN.device, help="auto | cpu | cuda | cuda:N."),
    ddpm: str | None = typer.Option(
        None, help="DDPM pipeline folder [default: the checkpoint set's ddpm/]."),
    judge: str | None = typer.Option(
        None, help="Judge classifier folder for the metrics [default: the checkpoint set's]."),
    data_root: str = _data_root_option("Data set root (oracle and FID reference images)."),
    cos_oracle: bool | None = typer.Option(
        None, "--cos-oracle/--no-cos-oracle", "--oracle/--no-oracle",
        help="Log cos_oracle against the exact gradient (D8) at every sample and step [default: "
        "so on a GPU, on a CPU at the first 8 samples and every 10th step; off without the data "
        "set]. --oracle is its old name; --classifier oracle guides with the oracle."),
    record_vectors: str = typer.Option(
        _RUN.record_vectors, help="none | subset (8 samples, every 10th step; x0-estimates in "
        "fp16) | all (float32)."),
    protocol: str = typer.Option(
        _RUN.protocol, help="auto (8 samples x 1000 steps without a GPU unless sizes are given) | "
        "paper (64 x 1000) | reduced (8 x 50, respaced: for trying the tool, not for numbers)."),
    metrics: bool = typer.Option(
        _RUN.metrics, "--metrics/--no-metrics", help="Compute metrics.json."),
    precision: str | None = typer.Option(
        None, help="fp32 (true float32; TF32 off on a GPU) | tf32 (GPU) | bf16 | fp16 (UNet "
        "autocast) | auto (GPU: fp16 UNet and TF32, but x0-estimate gradients at t >= 700 in "
        "float32; CPU: bf16 UNet where no gradient passes through it, x0-estimate gradients in "
        "float32). tf32/bf16/fp16 corrupt x0-estimate gradients at high noise: `gradcheck "
        "precision` [default: auto on a CPU, fp32 on a GPU]."),
    net_batch: int | None = typer.Option(
        None, help="Rows per network call, padded: samples are identical for every batch size "
        "[default: 64; on a CPU at most the number of samples]."),
    compile: bool = typer.Option(
        _RUN.compile, "--compile/--no-compile", help="torch.compile the UNet (worth it for long "
        "runs)."),
    out: str = typer.Option("runs", help="Parent folder of the run folder."),
    name: str | None = typer.Option(None, help="Run folder name [default: derived from config]."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Guided sampling with every step logged: samples, steps.parquet, vectors, metrics."""
    import logging
    from pathlib import Path

    from gradcheck.runner import parse_target, run, summary_table
    from gradcheck.utils import load_json

    if adam is True and stabilizer not in (None, "adam"):
        raise GradcheckError(f"--adam conflicts with --stabilizer {stabilizer}; give one")
    if adam is False and stabilizer == "adam":
        raise GradcheckError("--no-adam conflicts with --stabilizer adam; give one")
    stabilizer = "adam" if adam else stabilizer or "none"
    target = parse_target(target)
    cfg = _RUN(**_given(locals(), _RUN))
    logger = logging.getLogger("gradcheck")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    folder = run(cfg, out=Path(out), name=name, overwrite=overwrite, progress=progress)
    typer.echo(summary_table(load_json(folder / "metrics.json")))
    typer.echo(f"run folder        {folder}")
# [metrics: metrics.py]


@app.command("metrics")
def metrics_cmd(
    run_folder: str = typer.Argument(..., help="Run folder (config.json + samples.npy)."),
    inception_weights: str | None = typer.Option(
        None, envvar="GRADCHECK_INCEPTION_WEIGHTS",
        help="The standard FID Inception-v3 file pt_inception-2015-12-05-6726825d.pth (SHA-256 "
        "checked; nothing is downloaded)."),
    extractor: str = typer.Option(
        _METRICS.extractor, help="auto | judge | inception. auto: Inception when weights are "
        "given, else the judge's penultimate features."),
    n_reference: int | None = typer.Option(
        None, help="Training images of the target class to compare with (default: as recorded, "
        "else 64)."),
    reference_seed: int | None = typer.Option(
        None, help="Seed drawing the reference images (default: as recorded, else 0)."),
    judge: str | None = typer.Option(None, help="Judge folder (default: the run's)."),
    data_root: str | None = typer.Option(None, help="Data set root (default: the run's)."),
    kid_subset_size: int | None = typer.Option(
        None, help="KID subset size, at most N (default: min(N, n_reference))."),
    n_bootstrap: int = typer.Option(
        _METRICS.n_bootstrap, help="Bootstrap resamples for accuracy and KID."),
    bootstrap_seed: int = typer.Option(_METRICS.bootstrap_seed, help="Seed of the bootstrap."),
    batch_size: int = typer.Option(
        _METRICS.batch_size, help="Feature batch size (results do not depend on it)."),
    device: str = typer.Option(_METRICS.device, help="auto | cpu | cuda | cuda:N."),
) -> None:
    """Recompute a run's FID/KID/precision/recall and accuracies; rewrite its metrics files."""
    from gradcheck.metrics import RECOMPUTE_OPTIONS, recompute_run_metrics

    given = locals()
    row = recompute_run_metrics(run_folder, **{k: given[k] for k in RECOMPUTE_OPTIONS})
    ci = "{:.4g}  [{:.4g}, {:.4g}]".format
    typer.echo(f"extractor         {row['extractor']} (dim {row['feature_dim']})")
    typer.echo(f"N                 {row['n_samples']} samples vs {row['n_reference']} references "
               f"(seed {row['reference_seed']})")
    typer.echo(f"FID               {row['fid']:.4g}")
    typer.echo(f"KID               {ci(row['kid_mean'], row['kid_ci_low'], row['kid_ci_high'])}")
    typer.echo(f"precision/recall  {row['precision']:.3f} / {row['recall']:.3f}")
    typer.echo("accuracy guiding  " + ci(row["accuracy_guiding"], row["accuracy_guiding_ci_low"],
                                         row["accuracy_guiding_ci_high"]))
    typer.echo("accuracy judge    " + ci(row["accuracy_judge"], row["accuracy_judge_ci_low"],
                                         row["accuracy_judge_ci_high"]))
    typer.echo(f"notes             {row['notes']}")
# [pag: pag.py]


def _split(value: str | None) -> tuple[str, ...] | None:
    """'a,b,c' -> ('a', 'b', 'c'), empty items dropped; None stays None."""
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(option: str, value: str | None, example: str = "64,256") -> tuple[int, ...] | None:
    """'64,256' -> (64, 256); a clear error for anything else."""
    try:
        return None if value is None else tuple(int(v) for v in _split(value) or ())
    except ValueError:
        raise GradcheckError(f"--{option} {value!r} is not a comma-separated list of integers; "
                             f"e.g. {example}") from None


@app.command("pag")
def pag_cmd(
    checkpoints: str | None = _checkpoints_option(),
    classifiers: str = typer.Option(
        "nonrobust,robust,adversarial", help="Comma-separated classifier kinds (the shipped "
        "folders) or classifier folders."),
    oracle: bool | None = typer.Option(
        None, "--oracle/--no-oracle", help="Add the exact oracle gradient (D8) as a source; "
        "default: when the data set's train split exists."),
    data_root: str = _data_root_option("Data set root (val images; train split for the oracle)."),
    ddpm: str | None = typer.Option(
        None, help="DDPM folder whose scheduler gives abar_t (default: docs/maths.md schedule)."),
    num_images: int = typer.Option(
        _PAG.num_images, help="Validation images per class for the PAG scores."),
    timesteps: str = typer.Option("0,100,250,500,750", help="Comma-separated timesteps t."),
    pgd_eps: float | None = typer.Option(
        None, help="Targeted PGD L2 radius (default: Kawar's 100 at 3x128x128 by per-pixel RMS; "
        "50.0 at 3x64x64)."),
    pgd_steps: int = typer.Option(_PAG.pgd_steps, help="Targeted PGD steps (Kawar et al.: 7)."),
    pgd_step_size: float | None = typer.Option(None, help="PGD step (default 2.5 eps / steps)."),
    seed: int = typer.Option(_PAG.seed, help="Seed of the image choice and the noise draws."),
    batch_size: int = typer.Option(
        _PAG.batch_size, help="Gradient batch size (results do not depend on it)."),
    device: str = typer.Option(_PAG.device, help="auto | cpu | cuda | cuda:N."),
    out: str = typer.Option(_PAG.out, help="Output folder (`gradcheck report` reads it there)."),
    overwrite: bool = typer.Option(_PAG.overwrite, help="Replace an existing output folder."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """PAG: gradient maps, large-eps targeted PGD and PAG scores (D9) per classifier."""
    from gradcheck.oracle import oracle_available
    from gradcheck.pag import run_pag

    timesteps = _ints("timesteps", timesteps, example="0,100,250")
    if oracle is None and not oracle_available(data_root):
        typer.echo(f"note: no train split at {data_root}; the oracle is skipped", err=True)
    classifiers = _split(classifiers)
    folder = run_pag(_PAG(**_given(locals(), _PAG)), progress=progress)
    typer.echo(str(folder))
# [sweep, report: sweep.py, report/]


@app.command("sweep")
def sweep_cmd(
    checkpoints: str | None = _checkpoints_option(),
    grid: str = typer.Option(
        _SWEEP.grid, help="table1 | scales | scales-x0 | d5-norm | stabilizers | classifiers."),
    seeds: int = typer.Option(_SWEEP.seeds, help="Seeds 0..SEEDS-1 of every configuration."),
    shard: str | None = typer.Option(
        None, help="Run only shard i/n (0-based, round-robin over seeds with --batch-configs when "
        "there are at least n, else over runs; --seeds 5 --shard k/5 runs seed k). Default: "
        "the launcher's (accelerate/torchrun RANK/WORLD_SIZE, SLURM array task), else all runs."),
    out: str = typer.Option("runs", help="Folder of the run folders."),
    records: str | None = typer.Option(
        _SWEEP.records, help="Also write a compact record of each finished run here, and skip "
        "runs recorded here: commit this folder and the sweep resumes on another machine."),
    scale: float | None = typer.Option(
        None, help="Guidance scale s for grids that do not vary it (default: run's)."),
    target: str | None = typer.Option(
        None, help="Target class: a name or 0-3 (default: run's, baseball)."),
    normalize: bool | None = typer.Option(
        None, "--normalize/--no-normalize", help="D5 normalisation (default: on)."),
    normalize_to: str | None = typer.Option(None, help="score | eps (see `run`)."),
    log_prob: str | None = typer.Option(None, help="stable | log-softmax (see `run`)."),
    diffusion_time: bool | None = typer.Option(
        None, "--diffusion-time/--no-diffusion-time", help="D4' (see `run`; default: on)."),
    num_samples: int | None = typer.Option(None, help="Samples per run (default: run's)."),
    batch_size: int | None = typer.Option(None, help="Sampling batch size (memory only)."),
    steps: int | None = typer.Option(None, help="Sampling steps (default: run's)."),
    protocol: str | None = typer.Option(None, help="auto | paper | reduced (see `run`)."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    ddpm: str | None = typer.Option(None, help="DDPM folder (default: shipped)."),
    judge: str | None = typer.Option(None, help="Judge folder (default: shipped)."),
    data_root: str | None = typer.Option(None, help="Data set root."),
    cos_oracle: bool | None = typer.Option(
        None, "--cos-oracle/--no-cos-oracle", "--oracle/--no-oracle",
        help="Log cos_oracle (D8); default as in `run` (--oracle: the old name)."),
    record_vectors: str | None = typer.Option(None, help="none | subset | all."),
    metrics: bool | None = typer.Option(
        None, "--metrics/--no-metrics", help="Compute metrics.json per run (default: on)."),
    precision: str | None = typer.Option(
        None, help="fp32 | tf32 | bf16 | fp16 | auto (see `run`)."),
    net_batch: int | None = typer.Option(None, help="Rows per network call (see `run`)."),
    compile: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the UNet (see `run`)."),
    batch_configs: bool = typer.Option(
        _SWEEP.batch_configs, "--batch-configs/--no-batch-configs",
        help="Sample the configurations of a seed together (same results, shared UNet calls)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run a grid of configurations over seeds; finished runs are skipped, so re-running resumes.

    Grids: table1 = classifier {robust, nonrobust} x x0-estimate x ADAM; scales = s in
    {0.25 .. 8} x {nonrobust, robust, adversarial}; scales-x0 = s x {nonrobust, robust} with
    x0-estimate + ADAM; d5-norm = D5 to the score or to eps x s (non-robust); stabilizers =
    every stabiliser (non-robust, x0-estimate); classifiers = {nonrobust, robust, adversarial,
    oracle}. Runs two grids share (same config and seed) run once.
    """
    from gradcheck.runner import parse_target
    from gradcheck.sweep import SCALE_GRIDS, run_sweep

    if grid in SCALE_GRIDS and scale is not None:
        raise GradcheckError(f"the {grid} grid sets the scale itself; drop --scale")
    target = parse_target(target) if target is not None else None
    result = run_sweep(_SWEEP(**_given(locals(), _SWEEP)),
                       _RUN(**_given(locals(), _RUN)), out=out, progress=progress)
    i, n = result.shard
    typer.echo(f"sweep {grid}, shard {i}/{n}: {len(result.planned)} runs, {len(result.ran)} run "
               f"now, {len(result.skipped)} already finished, in {out}/")
    typer.echo(f"next: gradcheck report {out}")


@app.command("report")
def report_cmd(
    runs: list[str] = typer.Argument(
        None, help="Run folders or folders holding them (default: runs). PAG outputs, survey "
        "analyses and accuracy_by_t.parquet files found there are used too."),
    out: str = typer.Option(
        "report", help="Output folder (reports/ holds the committed reference reports)."),
    overwrite: bool = typer.Option(
        False, help="Replace an existing report (other files in the folder are kept)."),
    records: str | None = typer.Option(
        None, help="Also write a compact record of every run folder found (config, metrics, "
        "per-step summaries, first samples) into this folder; the report renders from records "
        "as from run folders, so records are what to keep or commit."),
    scale: float | None = typer.Option(
        None, help="Table 1's guidance scale s (default: the protocol whose runs cover most "
        "Table 1 configurations)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Table 1 beside the paper, the findings' verdicts and figures: report.md, report.html
    (self-contained), figures/ (PNG, PDF), tables/ (CSV)."""
    from gradcheck.report import find_inputs, render_report, write_records

    if records is not None:
        runs_found = [r for r in find_inputs(runs or ["runs"]).runs
                      if (r / "steps.parquet").is_file()]
        typer.echo(f"{len(write_records(runs_found, records, overwrite))} records in {records}")
    folder = render_report(runs or ["runs"], out=out, overwrite=overwrite, progress=progress,
                           scale=scale)
    typer.echo(f"{folder / 'report.md'}\n{folder / 'report.html'}")
# [survey: survey.py]
survey_app = typer.Typer(
    help="Pairwise human preference survey of two runs (Kawar et al. 2023, Table 2).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@survey_app.command("build")
def survey_build(
    run_a: str = typer.Argument(..., help="Run folder A (config.json, samples.npy)."),
    run_b: str = typer.Argument(..., help="Run folder B: same seed, target and num_samples."),
    pairs: int | None = typer.Option(None, help="Number of pairs to show (default: all)."),
    seed: int = typer.Option(0, help="Seed choosing which sample indices become pairs."),
    out: str = typer.Option("survey", help="Folder for survey.html and survey.json."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Write a self-contained survey page (images embedded, no network) for two paired runs.

    Raters open survey.html, enter an id, answer Left / Right / Same (keys: arrow left or L,
    arrow right or R, arrow down or S) and get their votes as a JSON download.
    """
    from gradcheck.survey import build_survey

    manifest = build_survey(run_a, run_b, out=out, pairs=pairs, seed=seed, overwrite=overwrite)
    typer.echo(f"survey {manifest['survey_id']}: {len(manifest['pairs'])} pairs of "
               f"{manifest['class_name']} -> {out}/survey.html; collect the raters' vote files "
               f"(e.g. in {out}/votes/) and run: gradcheck survey analyze {out}/votes "
               f"--survey {out}/survey.json")


@survey_app.command("analyze")
def survey_analyze(
    votes: list[str] = typer.Argument(..., help="Vote JSON files or folders of them."),
    survey: str = typer.Option("survey/survey.json", help="The survey's survey.json."),
    out: str | None = typer.Option(None, help="Output folder (default: analysis/ beside "
                                    "survey.json)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Tabulate votes: Table 2 layout at 50-80% agreement, vote split, exact binomial tests.

    Malformed vote files are reported and skipped; no (rater, pair) vote is counted twice.
    """
    from gradcheck.survey import analyze_survey, survey_table_markdown

    results = analyze_survey(votes, survey=survey, out=out, overwrite=overwrite)
    for r in results["files"].itertuples():
        if r.status == "skipped":
            typer.echo(f"skipped {r.file}: {r.reason}", err=True)
    typer.echo(survey_table_markdown(results))


app.add_typer(survey_app, name="survey")
# [bench: bench.py]


@app.command("bench")
def bench_cmd(
    quick: bool | None = typer.Option(
        None, "--quick/--full", help="--quick: tiny UNet, small batches, no compilation, about "
        "a minute on a 2-core CPU; --full: the paper UNet at batch 64 and 256 [default: --full "
        "on a GPU, --quick on a CPU]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    json_path: str | None = typer.Option(None, "--json", help="Also write the results as JSON."),
    repeats: int | None = typer.Option(
        None, help="Timed repetitions per measurement, the median reported [default: 3]."),
    precision: str = typer.Option(
        "fp32", help="UNet precision: fp32 | tf32 | bf16 | fp16 | auto (see `run`)."),
    table1: bool = typer.Option(
        False, "--table1", help="Also time the full Table 1 protocol (8 configurations x 64 "
        "samples x 1,000 steps, metrics) on the shipped checkpoints: minutes on a GPU."),
    sections: str | None = typer.Option(
        None, help="Comma-separated sections to run, in this order [default: all but "
        "table1-cpu]: dataset, training, unet (compares fp32, tf32, bf16 and fp16 itself), "
        "sampling, pipeline (its ratio needs sampling), fid, table1-mini, table1-cpu (one Table 1 "
        "seed at 32x32, float32 eager vs the defaults: minutes; needs datasets/sportballs32)."),
    batches: str | None = typer.Option(
        None, help="Comma-separated batch sizes of the unet, sampling and pipeline sections "
        "[default: the preset's, 4,8 or 64,256]."),
    steps: int | None = typer.Option(
        None, help="Timed sampling steps per measurement [default: the preset's, 10]."),
    recorders: str | None = typer.Option(
        None, help="Comma-separated recorder settings to time: off, subset, all [default: all "
        "three; off is always measured, as the overhead's baseline]."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
) -> None:
    """Measure data generation, training, the UNet alone, sampling (per mode and recorder
    setting), the diffusers baseline, metrics and the Table 1 protocol on this machine; each
    measurement is printed as it is taken."""
    from gradcheck.bench import format_report, run_bench
    from gradcheck.utils import atomic_output_file, check_output, resolve_device, save_json

    if json_path is not None:
        check_output(json_path, overwrite)
    if quick is None:
        quick = resolve_device(device).type != "cuda"
        if quick:
            typer.echo("no GPU: the quick bench (--full forces the paper-size one)", err=True)
    result = run_bench(quick=quick, device=device, repeats=repeats, precision=precision,
                       table1=table1, progress=lambda line: typer.echo(f"... {line}", err=True),
                       sections=_split(sections), batches=_ints("batches", batches),
                       steps=steps, recorders=_split(recorders))
    typer.echo(format_report(result))
    if json_path is not None:
        with atomic_output_file(json_path, overwrite) as tmp:
            save_json(tmp, result)
        typer.echo(f"results written to {json_path}")


@app.command("precision")
def precision_cmd(
    timesteps: str = typer.Option(
        "999,900,800,700,500,300,100", help="Comma-separated timesteps t to measure at."),
    num_samples: int = typer.Option(
        4, help="Test images, noised to x_t (the first N of the split)."),
    classifiers: str = typer.Option(
        "nonrobust,robust", help="Comma-separated guiding classifiers (names or folders)."),
    modes: str = typer.Option(
        "fp64,tf32,bf16,fp16,auto,cpu-auto",
        help="Precisions compared with float32: fp64 | tf32 | bf16 | fp16 | auto (the GPU's) | "
        "cpu-auto (the CPU's --precision auto)."),
    x0_estimate: bool = typer.Option(
        True, "--x0-estimate/--no-x0-estimate",
        help="Gradient through the x0-estimate (D2; the sensitive one) or on x_t."),
    target: str = typer.Option("baseball", help="Target class: a name or 0-3."),
    ddpm: str | None = typer.Option(
        None, help="DDPM pipeline folder [default: the checkpoint set's ddpm/]."),
    data_root: str = _data_root_option("Data set root (test images)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (TF32 is emulated "
                               "on a CPU, real on a GPU)."),
    seed: int = typer.Option(0, help="Seed of the forward-process noise."),
    out: str | None = typer.Option(None, help="Also write the full table as parquet."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """How far each precision turns the guidance gradient from float32's, per t: the numbers
    behind --precision (TF32 emulated on a CPU)."""
    from gradcheck.precision import format_agreement, measure_precision
    from gradcheck.utils import atomic_output_file, check_output

    ts = list(_ints("timesteps", timesteps, example="999,900,500"))
    if out is not None:
        check_output(out, overwrite)
    table = measure_precision(
        ddpm=ddpm, classifiers=_split(classifiers), data_root=data_root, timesteps=ts,
        num_samples=num_samples, target=target, modes=_split(modes), x0_estimate=x0_estimate,
        device=device, seed=seed, progress=progress)
    typer.echo(format_agreement(table))
    if out is not None:
        with atomic_output_file(out, overwrite) as tmp:
            table.to_parquet(tmp, index=False)
        typer.echo(f"table written to {out}")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM; not a KeyboardInterrupt, which typer would swallow silently."""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2; Ctrl-C exits 130."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        rv = app(args=argv, standalone_mode=False)
    except GradcheckError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt, typer.Abort) as e:
        how = f" by {e}" if isinstance(e, Interrupted) and str(e) else ""
        typer.echo(f"error: interrupted{how}; partial outputs were removed", err=True)
        sys.exit(130)
    except Exception as e:
        # Usage errors of whichever click typer uses (recent typer vendors its own copy).
        if not (hasattr(e, "show") and hasattr(e, "exit_code")):
            raise
        e.show()
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)

