"""Frozen dataclasses, one per stage; field names equal CLI option names and parquet columns."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gradcheck import paths


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths and tuples become strings and lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


# ---- stage configs: each section belongs to the module named in its header -----------------
def _default_ddpm() -> str:
    return str(paths.default_ddpm())


def _default_data_root() -> str:
    return str(paths.default_data_root())


def _default_judge() -> str:
    return str(paths.default_classifier("judge"))


# [dataset: data/sportballs.py]
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """make-dataset: where and how the SportBalls generator writes (docs/formats.md)."""

    root: str = dataclasses.field(default_factory=_default_data_root)
    n_train: int = 40000  # GradCheck Appendix A scale; exactly balanced (10,000 per class)
    n_val: int = 5000  # early stopping and classifier selection
    n_test: int = 5000  # held out: accuracy and FID reference statistics
    seed: int = 0  # fixes every byte of the data set
    image_size: int = 64  # paper: 3x64x64
    png: bool = False  # also write an ImageFolder tree of PNG files


# [train-ddpm: train_ddpm.py]


@dataclasses.dataclass(frozen=True)
class TrainDDPMConfig:
    """`gradcheck train-ddpm`: the unconditional DDPM (train_ddpm.py; docs/scales.md)."""

    data_root: str = dataclasses.field(default_factory=_default_data_root)  # train split
    out: str = "checkpoints"  # writes out/name/ddpm/ and out/name/train_state/ddpm/
    name: str = "sportballs-v1"  # the shipped reference set (paths.DEFAULT_CHECKPOINTS)
    preset: str = "paper"  # models.UNET_PRESETS; its sample_size must equal the image size
    max_minutes: float | None = None  # wall-clock budget of this call: the usual stop on a GPU
    max_steps: int | None = None  # total optimiser steps (counted across --resume / --init-from)
    batch_size: int = 256  # global; the defaults' reasons: docs/scales.md, "The recipe"
    lr: float = 5e-4  # AdamW peak; the notes' 2e-4 at batch 128, a bit above linear for 2x batch
    warmup_steps: int = 250  # linear warm-up from 0 (restarts with a fresh optimiser)
    adam_beta1: float = 0.9  # Kingma & Ba default
    adam_beta2: float = 0.99  # EDM2: faster second-moment tracking suits short, high-lr runs
    weight_decay: float = 0.0  # DDPM/EDM use none; decay only slows a short run
    grad_clip: float = 1.0  # max global grad norm (diffusers scripts); guards the high lr
    min_snr_gamma: float = 5.0  # Min-SNR-gamma weighting min(SNR, g)/SNR (Hang et al. 2023); 0=off
    multiscale_weight: float = 0.0  # low-frequency loss term (docs/scales.md); sportballs-v1: 0
    ema_decay: float = 0.9995  # the training notes (docs/scales.md); the warm-up's ceiling
    ema_warmup: bool = True  # decay = min(ema_decay, (1+step)/(10+step)): early exports usable
    hflip: bool = False  # off: the volleyball is chiral, a flip draws one the data never has
    max_images: int | None = None  # use only the first N training images (overfitting checks)
    mixed_precision: str = "auto"  # auto | bf16 | no (auto: the train-ddpm help)
    channels_last: bool = True  # NHWC: faster bf16 convs; eager GroupNorm may copy (benchmark)
    compile: bool = False  # torch.compile the UNet: 1.81x images/s on an H100 after 151 s
    seed: int = 0  # model init, batch indices, flips, timesteps and noise
    log_every: int = 50  # steps between progress updates (the log keeps every step)
    sample_every: int = 1000  # steps between sample grids of the EMA model; 0 = only at the end
    sample_steps: int = 50  # respaced DDPM steps for those grids (cheap, not the eval protocol)
    checkpoint_every: int = 2000  # steps between train state + export; 0 = only at the end
    fp16_export: bool = True  # export the EMA UNet in fp16, shards < 16 MiB (shipping format)
    resume: bool = False  # continue from out/name/train_state/ddpm/ (bitwise on CPU)
    init_from: str | None = None  # start from exported weights (model and EMA); fresh optimiser
    device: str = "auto"  # auto | cpu | cuda (accelerate launch sets the device per process)
    overwrite: bool = False  # replace an existing out/name/ddpm/ and its train state
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class EvalDDPMConfig:
    """`gradcheck eval-ddpm`: unconditional sample quality of a DDPM folder (eval_ddpm.py)."""

    folder: str = dataclasses.field(default_factory=_default_ddpm)  # the shipped DDPM
    num_samples: int = 1000  # samples drawn; sample i depends only on (seed, i)
    steps: int = 1000  # DDPM steps; fewer are respaced by DDPMScheduler.set_timesteps
    batch_size: int = 250  # memory only in float32 (bf16 kernels may round per batch shape)
    judge: str | None = None  # classifier folder for the class histogram and confidence
    data_root: str = dataclasses.field(default_factory=_default_data_root)  # test: FID reference
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"  # auto | bf16 | no (auto: the eval-ddpm help)
    out: str | None = None  # default: FOLDER/eval/
    overwrite: bool = False
    progress: bool = True
# [train-classifier: train_classifier.py]


@dataclasses.dataclass(frozen=True)
class TrainClassifierConfig:
    """`gradcheck train-classifier`: one guiding classifier or the judge (train_classifier.py)."""

    kind: str = "nonrobust"  # nonrobust | robust | adversarial | judge (issue 4)
    time_conditioned: bool = False  # t as a 4th input channel t/1000 (models.TIME_CONVENTION)
    ddpm: str | None = None  # DDPM folder: its scheduler config gives abar_t; its UNet the D2 eval
    data_root: str = dataclasses.field(default_factory=_default_data_root)
    out: str = "checkpoints"  # writes out/name/classifiers/kind/
    name: str = "sportballs-v1"  # the shipped reference set (paths.DEFAULT_CHECKPOINTS)
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    batch_size: int = 256  # small 64x64 inputs: large batches keep a GPU busy
    lr: float = 2e-3  # AdamW peak, cosine-annealed to lr/10 after a short warm-up
    weight_decay: float = 0.05  # Kawar et al. §5.1
    patience: int = 5  # epochs without a better validation accuracy before stopping
    max_minutes: float | None = None  # wall-clock cap; the best weights so far are saved
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    fp16: bool = False  # store weights in float16 (shipping); float32 otherwise
    attack_eps: float = 0.5  # adversarial: L2 threat model, Kawar et al. §5.1
    attack_step_size: float = 0.083  # Kawar et al. §5.1 (about eps / 6)
    attack_steps: int = 7  # Kawar et al. §5.1; per-sample early stopping
    eval_samples: int = 1000  # validation images for accuracy_by_t.parquet
    eval_pgd_steps: int = 20  # evaluation attack: step 2.5 * eps / steps (Madry et al.)
    eval_pgd_eps: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    overwrite: bool = False
    progress: bool = True
# [run: sampler.py]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """`gradcheck run`: one guided sampling run (runner.py, sampler.py; docs/maths.md D1-D7)."""

    classifier: str = "nonrobust"  # nonrobust | robust | adversarial | oracle | classifier folder
    x0_estimate: bool = False  # D2 (GradCheck Eq. 3): the classifier sees x0_hat
    stabilizer: str = "none"  # D4 registry (none, adam, ema, rmsprop, adam-nobias); --adam = adam
    normalize: bool = True  # D5 (GradCheck Eq. 2), the paper's setting for every experiment
    normalize_to: str = "score"  # score | eps (docs/maths.md D5; the d5-norm grid: README)
    log_prob: str = "stable"  # D3's objective: stable | log-softmax (guidance.py)
    diffusion_time: bool = True  # D4': stabiliser betas in diffusion time (docs/maths.md)
    scale: float = 1.0  # s of D6 (the paper's is lost, App. C.1); 1 = the denoiser's pull (D6)
    target: int | str = 0  # baseball (GradCheck App. C); a name resolves to its index
    num_samples: int | None = None  # None = the protocol's (runner.resolve_config)
    batch_size: int = 64  # memory only: results do not depend on it (one generator per sample)
    steps: int | None = None  # sampling steps; None = T = 1000 (the paper); fewer respace
    seed: int = 0  # sample i depends only on (seed, i)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ddpm: str = dataclasses.field(default_factory=_default_ddpm)  # shipped DDPM pipeline folder
    judge: str = dataclasses.field(default_factory=_default_judge)  # docs/metrics.md judge folder
    data_root: str = dataclasses.field(default_factory=_default_data_root)  # oracle, FID reference
    # cos_oracle (D8): True at every sample and step; None = so on a GPU, at the vector subset on
    # a CPU, off without the data set.
    cos_oracle: bool | None = None
    record_vectors: str = "subset"  # none | subset (8 samples, every 10th step) | all
    protocol: str = "auto"  # auto (sizes above) | paper (64 x 1000) | reduced (8 x 50, opt-in)
    metrics: bool = True  # metrics.json via gradcheck.metrics at the end of the run
    # numerics.NetworkCalls; None = auto on a CPU, fp32 on a GPU (docs/performance.md).
    precision: str | None = None  # fp32 | tf32 | bf16 | fp16 | auto
    net_batch: int | None = None  # rows per network call; None = 64 (CPU: at most num_samples)
    compile: bool = False  # torch.compile the UNet (one shape thanks to net_batch)
# [metrics: metrics.py]


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """`gradcheck metrics` and the metrics step of `gradcheck run` (metrics.py, docs/metrics.md)."""

    n_reference: int = 64  # paper: 64 samples vs 64 training images of the target class
    reference_seed: int = 0  # draws the reference images; recorded beside every number
    extractor: str = "auto"  # auto | judge | inception; auto = Inception when weights are given
    inception_weights: str | None = None  # standard FID file (SHA-256 checked); or the env var
    device: str = "auto"  # metrics on GPU when present
    batch_size: int = 64  # feature batches only; results do not depend on it
    kid_subset_size: int | None = None  # None = min(N, n_reference); never above N
    n_bootstrap: int = 1000  # resamples for one run's accuracy and KID intervals
    bootstrap_seed: int = 0  # bootstrap intervals are reproducible
# [sweep: sweep.py]


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """`gradcheck sweep`: a grid of runs over seeds (sweep.py); run sizes come from RunConfig."""

    grid: str = "table1"  # table1 | scales | scales-x0 | d5-norm | stabilizers | classifiers
    seeds: int = 3  # seeds 0..seeds-1: the fewest that give a 95% t-interval worth reading
    shard: str | None = None  # "i/n", 0-based; None = the launcher's (RANK/WORLD_SIZE, SLURM)
    batch_configs: bool = True  # sample one seed's configs together (runner.run_many), same results
    records: str | None = None  # compact records (report.write_records); recorded runs are skipped


# ---- pag: pag.py --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PagConfig:
    """`gradcheck pag`: gradient maps, targeted PGD and PAG scores (pag.py; docs/maths.md D9)."""

    classifiers: tuple[str, ...] = ("nonrobust", "robust", "adversarial")  # kinds or folders
    oracle: bool | None = None  # add the exact D8 gradient; None = when the train split exists
    data_root: str = dataclasses.field(default_factory=_default_data_root)  # val; train (oracle)
    ddpm: str | None = None  # DDPM folder whose scheduler gives abar_t; None = docs/maths.md
    num_images: int = 16  # per class: 64 images, one batch (the figures show the first of each)
    timesteps: tuple[int, ...] = (0, 100, 250, 500, 750)  # Kawar et al. Figure 3
    pgd_eps: float | None = None  # None = Kawar's 100 at 3x128x128 by per-pixel RMS: 50 at 64x64
    pgd_steps: int = 7  # Kawar et al. §5.1
    pgd_step_size: float | None = None  # None = 2.5 * eps / steps (Madry et al.)
    seed: int = 0  # image choice and noise draws
    batch_size: int = 64  # gradient batches only; results do not depend on it
    device: str = "auto"
    out: str = "report/pag"  # where `gradcheck report` (default out report/) reads it
    overwrite: bool = False
