"""`gradcheck bench`: how fast each stage runs on this machine, against a plain baseline.

Each measurement is the median of ``repeats`` timed repetitions after an untimed warm-up, one
section (:data:`SECTIONS`) at a time, reported as it is taken. ``--quick`` (the tiny UNet at
32 x 32, small batches, no compiling) takes about a minute on a 2-core CPU, ``--full`` minutes
on a GPU (docs/performance.md, "The bench").
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcheck.utils import (
    GradcheckError,
    check_choice,
    check_positive,
    load_json,
    resolve_device,
    run_metadata,
    torch_flags_restored,
)

SAMPLING_MODES = ("unguided", "guided-xt", "guided-x0")
RECORDER_MODES = ("off", "subset", "all")
SECTIONS = ("dataset", "training", "unet", "sampling", "pipeline", "fid", "table1-mini",
            "table1-cpu")
DEFAULT_SECTIONS = SECTIONS[:-1]
"""What a bench without ``--sections`` runs: table1-cpu takes minutes and the 32x32 data set."""
UNET_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
UNET_LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
UNET_PASSES = ("forward", "forward+grad")

PEAK_TFLOPS = (
    # Dense tensor-core peaks (bf16, tf32) and the plain fp32 peak, TFLOP/s, from the vendors'
    # data sheets (SXM boards unless named); the first name contained in the device's wins.
    # float16's tensor-core peak is bf16's on all of these.
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


@dataclasses.dataclass(frozen=True)
class BenchSizes:
    """What one bench run measures; ``quick`` and ``full`` below are the two presets."""

    preset: str  # UNet preset (its sample size sets the image size)
    batches: tuple[int, ...]  # sampling batch sizes
    sampling_steps: int  # timed steps per measurement
    train_batch: int
    train_steps: int
    compile: bool  # also time compiled training
    dataset_images: int
    table1_samples: int  # the miniature Table 1 (full: the protocol itself, if asked)
    table1_steps: int


QUICK = BenchSizes(preset="tiny", batches=(4, 8), sampling_steps=10, train_batch=16,
                   train_steps=5, compile=False, dataset_images=2000, table1_samples=2,
                   table1_steps=4)
FULL = BenchSizes(preset="paper", batches=(64, 256), sampling_steps=10, train_batch=256,
                  train_steps=30, compile=True, dataset_images=20000, table1_samples=8,
                  table1_steps=20)


def device_peak_tflops(device: torch.device, precision: str = "bf16") -> float | None:
    """The device's peak TFLOP/s at a precision (fp32 | tf32 | bf16 | fp16); None when unknown
    (CPUs, GPUs not in :data:`PEAK_TFLOPS`) and for auto, which mixes precisions by step."""
    if device.type != "cuda" or precision == "auto":
        return None
    name = torch.cuda.get_device_name(device)
    key = "bf16" if precision == "fp16" else precision
    return next((peaks[key] for name_part, peaks in PEAK_TFLOPS if name_part in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_memory(device: torch.device, fn: Callable[[], Any]) -> float:
    """Peak GPU memory (GiB) allocated while ``fn`` runs; NaN on a CPU (``fn`` is not run)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


# ---- models ------------------------------------------------------------------------------------


def _models(sizes: BenchSizes, device: torch.device) -> tuple[nn.Module, Any, nn.Module, str]:
    """(UNet, scheduler, guiding classifier, where they came from). The shipped checkpoints
    when the preset is the paper's and they exist; random weights of the same architecture
    otherwise (speed does not depend on the weights)."""
    from gradcheck.models import (
        load_classifier,
        load_ddpm,
        make_classifier,
        make_scheduler,
        make_unet,
    )
    from gradcheck.paths import default_classifier, default_ddpm

    if sizes.preset == "paper" and (default_ddpm() / "model_index.json").is_file():
        unet, scheduler = load_ddpm(default_ddpm())
        clf, _ = load_classifier(default_classifier("nonrobust"), device)
        origin = "shipped checkpoints"
    else:
        torch.manual_seed(0)
        unet, scheduler = make_unet(sizes.preset).eval(), make_scheduler()
        clf = make_classifier().eval()
        origin = f"random {sizes.preset} UNet and MobileNetV3-small"
    unet = unet.to(device).requires_grad_(False)
    return unet, scheduler, clf.to(device).requires_grad_(False), origin


# ---- the sections ------------------------------------------------------------------------------


def bench_dataset(sizes: BenchSizes, say: Callable[[str], None] = lambda _: None
                  ) -> dict[str, Any]:
    """Images/s of ``generate_dataset`` writing a small data set to a temporary folder."""
    from gradcheck.data.sportballs import generate_dataset

    n = sizes.dataset_images
    with tempfile.TemporaryDirectory() as tmp:
        out = generate_dataset(Path(tmp) / "d", n_train=n - 2 * (n // 10), n_val=n // 10,
                               n_test=n // 10, progress=False)
    say(_dataset_line(row := {"images": n, "images_per_s": out["images_per_s"]}))
    return row


def benchmark_training(
    preset: str = "paper", batch_size: int = 256, steps: int = 50, compile: bool = False,
    channels_last: bool = True, mixed_precision: str = "bf16", warmup: int = 10,
    device: str = "auto", seed: int = 0,
) -> dict[str, Any]:
    """Speed of the real training step (EMA update included) on random uint8 images: images/s,
    it/s and peak memory. ``warmup`` untimed steps absorb compilation and cuDNN autotuning."""
    from gradcheck.config import TrainDDPMConfig
    from gradcheck.models import UNET_PRESETS, make_scheduler, make_unet
    from gradcheck.train_ddpm import (
        TrainStep,
        WeightAverage,
        make_optimizer,
        min_snr_weights,
        speed_flags,
    )

    check_choice("UNet preset", preset, list(UNET_PRESETS))
    check_choice("mixed_precision", mixed_precision, ("bf16", "no"))
    check_positive("steps", steps)
    check_positive("batch_size", batch_size)
    dev = resolve_device(device)
    with torch_flags_restored():  # a benchmark must not leave speed_flags behind
        speed_flags(dev)
        cfg = TrainDDPMConfig(preset=preset, batch_size=batch_size, max_steps=steps)
        torch.manual_seed(seed)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        unet = make_unet(preset).to(dev, memory_format=memory_format).train()
        size = unet.config.sample_size
        generator = torch.Generator(dev).manual_seed(seed)
        images = torch.randint(0, 256, (4096, 3, size, size), generator=generator, device=dev,
                               dtype=torch.uint8)
        ema = WeightAverage(unet, cfg.ema_decay)
        optimizer = make_optimizer(unet, cfg, dev)
        model = torch.compile(unet) if compile else unet
        scheduler = make_scheduler()
        step_fn = TrainStep(
            model, optimizer, images, scheduler.alphas_cumprod,
            min_snr_weights(scheduler.alphas_cumprod, cfg.min_snr_gamma), cfg.multiscale_weight,
            generator, batch_size, cfg.hflip, cfg.grad_clip, mixed_precision == "bf16",
            channels_last,
        )
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def run(n: int, offset: int) -> float:
            _sync(dev)
            start = time.perf_counter()
            for i in range(n):
                step_fn(cfg.lr)
                ema.update(unet, offset + i)
            _sync(dev)
            return time.perf_counter() - start

        warmup_s = run(warmup, 0)
        seconds = run(steps, warmup)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else math.nan
        return {"preset": preset, "batch_size": batch_size, "compile": compile,
                "channels_last": channels_last, "mixed_precision": mixed_precision,
                "it_per_s": steps / seconds, "images_per_s": steps * batch_size / seconds,
                "warmup_s": warmup_s, "peak_memory_gib": peak, "device": str(dev),
                "hardware": run_metadata(dev)["hardware"]}


def bench_training(sizes: BenchSizes, device: torch.device,
                   say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Training images/s, eager (and compiled when the sizes ask for it)."""
    out: dict[str, Any] = {"preset": sizes.preset, "batch_size": sizes.train_batch}
    for compiled in ((False, True) if sizes.compile else (False,)):
        r = benchmark_training(preset=sizes.preset, batch_size=sizes.train_batch,
                               steps=sizes.train_steps, compile=compiled, device=str(device),
                               warmup=3 if compiled else 2)
        key = "compiled" if compiled else "eager"
        out[f"{key}_images_per_s"] = r["images_per_s"]
        out[f"{key}_peak_memory_gib"] = r["peak_memory_gib"]
        out[f"{key}_warmup_s"] = r["warmup_s"]  # compiled: compilation included
    if not sizes.compile:
        out["compiled_images_per_s"] = None
        out["compiled_note"] = "skipped by --quick (compiling alone takes about a minute on a CPU)"
    say(_training_line(out))
    return out


def _counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter`` (whose module hooks refuse
    ``autograd.grad``: count passes written with ``backward()``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _step_flops(unet: nn.Module, clf: nn.Module, mode: str, batch: int, size: int,
                device: torch.device) -> float:
    """FLOPs of one sampling step's network work: the UNet forward; for guidance the classifier
    forward and backward to the input, twice for x_t (the gradient and the x0 diagnostic pass),
    and for the x0-estimate also the UNet backward."""
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((), 500, dtype=torch.long, device=device)

    def step() -> None:
        if mode == "guided-x0":
            x.requires_grad_(True)
            eps = unet(x, t).sample
            clf(x - eps).logsumexp(1).sum().backward()
            return
        with torch.no_grad():
            unet(x, t)
        if mode == "guided-xt":
            x.requires_grad_(True)
            clf(x).logsumexp(1).sum().backward()
            with torch.no_grad():
                clf(x)

    return _counted_flops(step)


def _unet_pass(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, kind: str) -> None:
    """One UNet call of :data:`UNET_PASSES`: the forward alone, or the forward plus the backward
    to a fresh copy of the input (the x0-estimate's work; the UNet's weights are frozen)."""
    if kind == "forward":
        with torch.no_grad():
            unet(x, t)
        return
    unet(x.detach().requires_grad_(True), t).sample.float().sum().backward()


def bench_unet(
    sizes: BenchSizes, device: torch.device, repeats: int,
    say: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """The UNet alone, per (batch, precision, memory layout, cuDNN autotuning, pass): ms per call,
    images/s and TFLOP/s, whatever the bench's ``precision``. On a CPU only fp32 without
    autotuning (TF32 and autotuning are CUDA's; bf16 there says nothing about a GPU)."""
    from gradcheck.numerics import NetworkCalls

    unet, _, _, origin = _models(sizes, device)
    size = unet.config.sample_size
    cuda = device.type == "cuda"
    precisions = UNET_PRECISIONS if cuda else ("fp32",)  # TF32 and fast 16-bit are GPU things
    rows: list[dict[str, Any]] = []
    with torch_flags_restored():  # the autotuning flag below is global
        for batch in sizes.batches:
            gen = torch.Generator(device).manual_seed(0)
            x = torch.randn(batch, 3, size, size, generator=gen, device=device)
            t = torch.full((batch,), 500, dtype=torch.long, device=device)
            pass_flops = {kind: _counted_flops(partial(_unet_pass, unet, x, t, kind))
                          for kind in UNET_PASSES}
            for precision in precisions:
                net = NetworkCalls.for_precision(precision, cuda=True)
                peak = device_peak_tflops(device, precision)
                for layout, memory_format in UNET_LAYOUTS.items():
                    unet.to(memory_format=memory_format)
                    x_in = x.contiguous(memory_format=memory_format)
                    for autotune in ((False, True) if cuda else (False,)):
                        torch.backends.cudnn.benchmark = autotune
                        for kind in UNET_PASSES:

                            def call(kind: str = kind, x_in: torch.Tensor = x_in,
                                     t: torch.Tensor = t, net: NetworkCalls = net) -> None:
                                with net.numerics(), net.unet_autocast(device):
                                    _unet_pass(unet, x_in, t, kind)

                            seconds = _median_time(call, device, repeats)
                            flops = pass_flops[kind]
                            row = {"batch": batch, "precision": precision, "layout": layout,
                                   "cudnn_benchmark": autotune, "pass": kind,
                                   "ms": 1e3 * seconds, "images_per_s": batch / seconds,
                                   "tflops": flops / seconds / 1e12,
                                   "peak_fraction": flops / seconds / 1e12 / peak if peak else None,
                                   "models": origin}
                            rows.append(row)
                            say(_unet_line(row))
    return rows


def _unet_line(r: dict[str, Any]) -> str:
    frac = f"{r['peak_fraction']:.1%}" if r["peak_fraction"] else "n/a"
    return (f"UNet {r['pass']:<12} batch {r['batch']:>4} {r['precision']:<4} {r['layout']} "
            f"autotune {'on ' if r['cudnn_benchmark'] else 'off'}  {r['ms']:9.1f} ms  "
            f"{r['images_per_s']:9.1f} images/s  {r['tflops']:8.3f} TFLOP/s ({frac} of peak)")


SAMPLING_HEADER = (f"{'batch':>5}  {'mode':<10} {'recorder':<8} {'steps/s':>9} {'ms/step':>9} "
                   f"{'overhead':>9} {'peak GiB':>9} {'TFLOP/s':>8} {'of peak':>8}")


def _sampling_line(r: dict[str, Any]) -> str:
    frac = f"{r['peak_fraction']:.1%}" if r["peak_fraction"] else "n/a"
    mem = f"{r['peak_memory_gib']:.2f}" if not math.isnan(r["peak_memory_gib"]) else "n/a"
    over = f"{r['recorder_overhead']:+.1%}" if r["recorder"] != "off" else ""
    return (f"{r['batch']:>5}  {r['mode']:<10} {r['recorder']:<8} {r['steps_per_s']:>9.2f} "
            f"{r['ms_per_step']:>9.1f} {over:>9} {mem:>9} {r['tflops']:>8.3f} {frac:>8}")


def bench_sampling(
    sizes: BenchSizes, device: torch.device, repeats: int, precision: str,
    recorders: tuple[str, ...] = RECORDER_MODES, say: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Steps/s, recorder overhead, peak memory and TFLOP/s per (batch, mode, recorder); the
    recorder's overhead is against "off", which is always measured first."""
    from gradcheck.guidance import ClassifierGuidance
    from gradcheck.numerics import NetworkCalls
    from gradcheck.recorder import StepRecorder
    from gradcheck.sampler import sample_guided
    from gradcheck.utils import sample_generators

    unet, scheduler, clf, origin = _models(sizes, device)
    peak = device_peak_tflops(device, precision)
    rows: list[dict[str, Any]] = []
    n_steps = sizes.sampling_steps
    say(SAMPLING_HEADER)
    size = unet.config.sample_size
    for batch in sizes.batches:
        net = NetworkCalls.for_precision(precision, rows=batch, cuda=device.type == "cuda")
        for mode in SAMPLING_MODES:
            guidance = (None if mode == "unguided"
                        else ClassifierGuidance(clf, x0_estimate=mode == "guided-x0"))
            flops = _step_flops(unet, clf, mode, batch, size, device)
            base_s = math.nan
            for record in ("off", *(r for r in recorders if r != "off")):

                def chain(record: str = record, guidance=guidance, batch: int = batch,
                          net: NetworkCalls = net) -> None:
                    recorder = (StepRecorder("bench", batch, n_steps, record)
                                if record != "off" else None)
                    sample_guided(unet, scheduler, guidance, sample_generators(0, range(batch)),
                                  steps=n_steps, net=net,
                                  stabilizer="adam" if guidance is not None else "none",
                                  observers=[recorder] if recorder else [])
                    if recorder is not None:
                        recorder.table()  # the one copy to the host is part of the cost
                        recorder.vectors()

                seconds = _median_time(chain, device, repeats)
                memory = _peak_memory(device, chain)
                if record == "off":
                    base_s = seconds
                steps_per_s = n_steps / seconds
                rows.append({
                    "batch": batch, "mode": mode, "recorder": record,
                    "steps_per_s": steps_per_s, "ms_per_step": 1e3 * seconds / n_steps,
                    "recorder_overhead": seconds / base_s - 1 if record != "off" else 0.0,
                    "peak_memory_gib": memory, "tflops": flops * steps_per_s / 1e12,
                    "peak_fraction": flops * steps_per_s / 1e12 / peak if peak else None,
                    "precision": precision, "models": origin})
                say(_sampling_line(rows[-1]))
    return rows


def bench_pipeline(
    sizes: BenchSizes, device: torch.device, repeats: int, precision: str,
    sampling: Sequence[dict[str, Any]] = (), say: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Steps/s of a plain diffusers DDPMPipeline loop (the unguided baseline), at the same
    precision as the sampler's, and the ratio of the unguided ``sampling`` rows' to it."""
    from diffusers import DDPMPipeline

    from gradcheck.numerics import NetworkCalls

    unet, scheduler, _, _ = _models(sizes, device)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    numerics = NetworkCalls.for_precision(precision, cuda=device.type == "cuda")
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for batch in sizes.batches:

        def loop(batch: int = batch) -> None:
            with numerics.numerics(), numerics.unet_autocast(device):
                pipe(batch_size=batch, generator=torch.Generator().manual_seed(0),
                     num_inference_steps=sizes.sampling_steps, output_type="np")

        steps_per_s = sizes.sampling_steps / _median_time(loop, device, repeats)
        ours = next((r for r in sampling if r["batch"] == batch and r["mode"] == "unguided"
                     and r["recorder"] == "off"), None)
        rows.append({"batch": batch, "steps_per_s": steps_per_s, "precision": precision,
                     "gradcheck_unguided_ratio": ours["steps_per_s"] / steps_per_s if ours
                     else None})
        say(_pipeline_line(rows[-1]))
    return rows


def bench_fid(device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds for FID and KID of 64 vs 64 rendered SportBalls images (judge features)."""
    from gradcheck.data.sportballs import render_images
    from gradcheck.metrics import (
        extract_features,
        features_to_fid,
        features_to_kid,
        load_judge,
        make_extractor,
    )
    from gradcheck.models import make_classifier

    rng = np.random.default_rng(0)
    n = 128
    images = render_images(rng.integers(0, 4, n), rng.uniform(24, 40, n), rng.uniform(24, 40, n),
                           rng.uniform(20, 36, n), rng.uniform(0, 360, n))
    try:
        judge, _ = load_judge(None, device)
        origin = "shipped judge"
    except GradcheckError:
        judge, origin = make_classifier("shufflenet_v2_x1_0").to(device).eval(), "random judge"
    extractor, name, _ = make_extractor("judge", judge, None, device)

    def metrics() -> None:
        feats = extract_features(images, extractor, device=device)
        features_to_fid(feats[:64], feats[64:])
        features_to_kid(feats[:64], feats[64:], subset_size=32)

    return {"n": "64 vs 64", "extractor": name, "judge": origin,
            "seconds": _median_time(metrics, device, repeats)}


def bench_table1(
    sizes: BenchSizes, device: torch.device, precision: str, full: bool,
) -> dict[str, Any]:
    """The Table 1 configurations sampled together vs one by one: wall time and equality. ``full``:
    the protocol itself (64 samples x 1,000 steps, metrics) on the shipped checkpoints, together
    only. Otherwise a miniature on random tiny models, both ways, checked to give the same samples.
    """
    from gradcheck import runner
    from gradcheck.config import RunConfig
    from gradcheck.sweep import grid_configs

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if full:
            base = RunConfig(protocol="paper", device=str(device), precision=precision)
        else:
            base = _mini_table1_base(sizes, tmp_path, device, precision)
        cfgs = grid_configs("table1", 1, base)
        if not full:  # the random classifiers saved beside the random DDPM
            cfgs = [dataclasses.replace(c, classifier=str(tmp_path / c.classifier)) for c in cfgs]
        start = time.perf_counter()
        together = runner.run_many(cfgs, out=tmp_path / "together", progress=False)
        together_s = time.perf_counter() - start
        resolved = runner.resolve_config(base)
        out: dict[str, Any] = {"configurations": len(cfgs), "num_samples": resolved.num_samples,
                               "steps": resolved.steps, "together_s": together_s}
        if full:
            return out
        start = time.perf_counter()
        alone = [runner.run(c, out=tmp_path / "alone", progress=False) for c in cfgs]
        out["one_by_one_s"] = time.perf_counter() - start
        out["speedup"] = out["one_by_one_s"] / together_s
        out["identical_samples"] = all(
            np.array_equal(np.load(a / "samples.npy"), np.load(t / "samples.npy"))
            for a, t in zip(alone, together, strict=True))
    return out


def _mini_table1_base(sizes: BenchSizes, tmp: Path, device: torch.device, precision: str):
    """A RunConfig on freshly saved random tiny checkpoints (no data set, no metrics)."""
    from diffusers import DDPMPipeline

    from gradcheck.config import RunConfig
    from gradcheck.models import (
        classifier_config,
        make_classifier,
        make_scheduler,
        make_unet,
        save_classifier,
    )

    torch.manual_seed(0)
    DDPMPipeline(make_unet(sizes.preset), make_scheduler()).save_pretrained(tmp / "ddpm")
    for kind in ("robust", "nonrobust"):
        save_classifier(make_classifier(), tmp / kind,
                        classifier_config(kind, "mobilenet_v3_small"))
    return RunConfig(ddpm=str(tmp / "ddpm"), num_samples=sizes.table1_samples,
                     batch_size=sizes.table1_samples, steps=sizes.table1_steps,
                     device=str(device), precision=precision, metrics=False, cos_oracle=False,
                     record_vectors="subset", data_root=str(tmp / "no-data"))


CPU_TABLE1_SETTINGS: dict[str, dict[str, Any]] = {
    "fp32 eager": dict(precision="fp32", net_batch=8, compile=False),  # the old CPU defaults
    "default": {},  # RunConfig's defaults, resolved for the CPU (runner.resolve_config)
    "no vectors": dict(record_vectors="none"),  # the default less the recorder's vector copies
}
"""``table1-cpu``: the settings compared, each a RunConfig override."""


def bench_table1_cpu(
    steps: int, repeats: int, say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """One seed of Table 1 on the shipped 32x32 set (N = 64), per :data:`CPU_TABLE1_SETTINGS`:
    ``repeats`` interleaved ``steps``-step respaced chains per setting; per seed = 1,000 x the
    median step + the rest of the last repeat's run (docs/performance.md, "Table 1 at 32x32")."""
    from gradcheck import runner
    from gradcheck.config import RunConfig
    from gradcheck.paths import checkpoint_set_image_size, default_data_root
    from gradcheck.sweep import grid_configs

    if checkpoint_set_image_size() != 32:
        raise GradcheckError("bench section table1-cpu needs the 32x32 set: run it without a "
                             "GPU or with --checkpoints sportballs32-v1")
    data_root = default_data_root()
    if not (data_root / "dataset.json").is_file():
        raise GradcheckError(f"bench section table1-cpu needs the 32x32 data set at {data_root} "
                             "(metrics, x_norm_ratio): gradcheck make-dataset --image-size 32")
    per_step: dict[str, list[float]] = {name: [] for name in CPU_TABLE1_SETTINGS}
    rest: dict[str, float] = {}
    resolved: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, override in CPU_TABLE1_SETTINGS.items():
                last = r == repeats - 1
                base = RunConfig(device="cpu", num_samples=64, steps=steps, metrics=last,
                                 **override)
                cfgs = grid_configs("table1", 1, base)
                out = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                start = time.perf_counter()
                folders = runner.run_many(cfgs, out=out, progress=False)
                total = time.perf_counter() - start
                sampling = load_json(folders[0] / "metrics.json")["batched_wall_time_s"]
                per_step[name].append(sampling / steps)
                say(f"{name}: {sampling / steps:.3f} s per step ({steps} steps, repeat {r + 1})")
                if last:
                    rest[name] = total - sampling
                    c = runner.resolve_config(base)
                    resolved[name] = {k: getattr(c, k) for k in (
                        "precision", "net_batch", "compile", "record_vectors")}
    rows = {}
    for name in CPU_TABLE1_SETTINGS:
        step_s = statistics.median(per_step[name])
        rows[name] = {**resolved[name], "step_s": step_s, "step_s_all": per_step[name],
                      "rest_s": rest[name], "per_seed_s": 1000 * step_s + rest[name]}
    base_s = rows["fp32 eager"]["per_seed_s"]
    for row in rows.values():
        row["speedup"] = base_s / row["per_seed_s"]
    return {"configurations": 8, "num_samples": 64, "timed_steps": steps,
            "protocol_steps": 1000, "settings": rows}


def _table1_cpu_lines(t: dict[str, Any]) -> list[str]:
    lines = [f"Table 1 at 32x32, one seed ({t['configurations']} configurations x "
             f"{t['num_samples']} samples x {t['protocol_steps']} steps, metrics included; "
             f"per step: median of the {t['timed_steps']}-step respaced chains)"]
    for name, r in t["settings"].items():
        lines.append(f"  {name:<11} precision {r['precision']:<5} net-batch {r['net_batch']:<3} "
                     f"compile {str(r['compile']):<5} vectors {r['record_vectors']:<6} "
                     f"{r['step_s']:.3f} s/step  "
                     f"{r['per_seed_s'] / 60:5.1f} min per seed  {r['speedup']:.2f}x")
    return lines


# ---- the whole bench ---------------------------------------------------------------------------


def run_bench(
    quick: bool = False, device: str = "auto", repeats: int | None = None,
    precision: str = "fp32", table1: bool = False, progress: Callable[[str], None] | None = None,
    sections: Sequence[str] | None = None, batches: Sequence[int] | None = None,
    steps: int | None = None, recorders: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``sections`` (default: :data:`DEFAULT_SECTIONS`) as a JSON-ready dict; ``progress``
    gets each section's name and each measurement's line as soon as it is taken, so a bench
    cut short still shows what it measured. ``batches``, ``steps`` and ``recorders`` replace
    the preset's sampling batch sizes, timed steps and recorder settings."""
    dev = resolve_device(device)
    sizes = QUICK if quick else FULL
    repeats = repeats if repeats is not None else 3
    if repeats < 1:
        raise GradcheckError(f"repeats must be >= 1, got {repeats}")
    from gradcheck.runner import PRECISIONS

    check_choice("precision", precision, PRECISIONS)
    if precision == "tf32" and dev.type != "cuda":
        raise GradcheckError("precision tf32 needs a CUDA device; use fp32, bf16, fp16 or auto")
    asked = DEFAULT_SECTIONS if sections is None else sections
    for name in asked:
        check_choice("bench section", name, SECTIONS)
    sections = tuple(name for name in SECTIONS if name in asked)  # always in this order
    if not sections and not table1:
        raise GradcheckError("nothing to measure: no section named and the full Table 1 not "
                             f"asked for; sections: {', '.join(SECTIONS)}")
    asked = RECORDER_MODES if recorders is None else recorders
    for name in asked:
        check_choice("recorder setting", name, RECORDER_MODES)
    recorders = tuple(name for name in RECORDER_MODES if name in asked)
    if batches is not None:
        if not batches or any(b < 1 for b in batches) or len(set(batches)) != len(batches):
            raise GradcheckError(f"batches must be distinct positive integers, got {list(batches)}")
        sizes = dataclasses.replace(sizes, batches=tuple(batches))
    if steps is not None:
        if steps < 1:
            raise GradcheckError(f"steps must be >= 1, got {steps}")
        sizes = dataclasses.replace(sizes, sampling_steps=steps)
    say = progress or (lambda _: None)
    result: dict[str, Any] = {
        "quick": quick, "repeats": repeats, "precision": precision, "sizes":
        dataclasses.asdict(sizes), "sections": list(sections), "device": str(dev),
        "peak_tflops": device_peak_tflops(dev, precision),
        **{k: v for k, v in run_metadata(dev).items() if k in ("hardware", "torch", "diffusers")},
    }
    measure: dict[str, tuple[str, Callable[[], Any]]] = {  # what each says, then measures
        "dataset": ("data set generation", lambda: bench_dataset(sizes, say)),
        "training": ("DDPM training", lambda: bench_training(sizes, dev, say)),
        "unet": ("the UNet alone, per precision, layout, autotuning and pass",
                 lambda: bench_unet(sizes, dev, repeats, say)),
        "sampling": ("sampling",
                     lambda: bench_sampling(sizes, dev, repeats, precision, recorders, say)),
        "pipeline": ("diffusers DDPMPipeline baseline", lambda: bench_pipeline(
            sizes, dev, repeats, precision, result.get("sampling", ()), say)),
        "fid": ("FID 64 vs 64", lambda: bench_fid(dev, repeats)),
        "table1-mini": ("Table 1 configurations together vs one by one",
                        lambda: bench_table1(sizes, dev, precision, full=False)),
        "table1-cpu": ("Table 1 at 32x32 on the CPU: float32 eager vs the default",
                       lambda: bench_table1_cpu(sizes.sampling_steps, repeats, say)),
        "table1": ("Table 1 protocol (64 samples x 1,000 steps, 8 configurations, metrics)",
                   lambda: bench_table1(sizes, dev, precision, full=True)),
    }
    start = time.perf_counter()
    for name in (*sections, *(("table1",) if table1 else ())):
        say(measure[name][0])
        result[name.replace("-", "_")] = measure[name][1]()
    result["total_s"] = time.perf_counter() - start
    return result


def _dataset_line(d: dict[str, Any]) -> str:
    return f"data set generation   {d['images_per_s']:,.0f} images/s ({d['images']} images)"


def _training_line(t: dict[str, Any]) -> str:
    compiled = (f"{t['compiled_images_per_s']:,.1f}" if t.get("compiled_images_per_s")
                else t.get("compiled_note", "n/a"))
    warm = (f", compiling and warm-up {t['compiled_warmup_s']:.0f} s"
            if t.get("compiled_warmup_s") is not None else "")
    return (f"DDPM training         {t['eager_images_per_s']:,.1f} images/s eager, "
            f"compiled: {compiled}  ({t['preset']} preset, batch {t['batch_size']}{warm})")


def _pipeline_line(p: dict[str, Any]) -> str:
    ratio = p["gradcheck_unguided_ratio"]
    return (f"diffusers DDPMPipeline, batch {p['batch']}: {p['steps_per_s']:.2f} steps/s"
            + (f"; gradcheck unguided is {ratio:.2f}x that" if ratio else ""))


def format_report(result: dict[str, Any]) -> str:
    """The bench as a terminal table (the sections it ran)."""
    lines = [f"gradcheck bench ({'quick' if result['quick'] else 'full'}) on {result['hardware']}"
             f", torch {result['torch']}, {result['precision']} UNet, median of "
             f"{result['repeats']}"]
    if "dataset" in result:
        lines.append(_dataset_line(result["dataset"]))
    if "training" in result:
        lines.append(_training_line(result["training"]))
    if "unet" in result:
        lines += ["", *map(_unet_line, result["unet"])]
    if "sampling" in result:
        lines += ["", SAMPLING_HEADER, *map(_sampling_line, result["sampling"])]
    lines += map(_pipeline_line, result.get("pipeline", []))
    if "fid" in result:
        f = result["fid"]
        lines.append(f"FID + KID {f['n']} ({f['extractor']} features): {f['seconds']:.2f} s")
    if "table1_mini" in result:
        m = result["table1_mini"]
        lines.append(f"Table 1 miniature ({m['configurations']} configurations x "
                     f"{m['num_samples']} samples x {m['steps']} steps): together "
                     f"{m['together_s']:.1f} s, one by one {m['one_by_one_s']:.1f} s "
                     f"({m['speedup']:.2f}x), identical samples: {m['identical_samples']}")
    if "table1_cpu" in result:
        lines += ["", *_table1_cpu_lines(result["table1_cpu"])]
    if "table1" in result:
        p = result["table1"]
        lines.append(f"Table 1 protocol ({p['configurations']} configurations x "
                     f"{p['num_samples']} samples x {p['steps']} steps, metrics included): "
                     f"{p['together_s']:.0f} s")
    lines.append(f"bench total {result['total_s']:.0f} s")
    return "\n".join(lines)
