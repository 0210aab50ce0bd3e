"""The shipped reference checkpoints load and drive a short guided run on CPU (issue 9)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file
from torchvision.models import mobilenet_v3_small

from gradcheck.config import RunConfig
from gradcheck.data.sportballs import generate_dataset
from gradcheck.models import load_classifier, load_ddpm
from gradcheck.paths import checkpoint_set, default_classifier, default_ddpm
from gradcheck.precision import measure_precision
from gradcheck.runner import run

KINDS = ("nonrobust", "robust", "adversarial", "judge")


@pytest.fixture(autouse=True)
def _paper_set(monkeypatch):
    """These tests are about the paper-scale set, whichever set this machine defaults to."""
    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", "sportballs-v1")


def test_shipped_checkpoints_are_small_fp16_safetensors():
    files = [p for p in checkpoint_set().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 64 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 8  # 4 UNet shards + 4 classifiers
    assert all(p.stat().st_size < 16 * 2**20 for p in weights)
    for p in weights:
        assert {t.dtype for t in load_file(p).values() if t.is_floating_point()} == {torch.float16}
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".ckpt")]


def test_shipped_ddpm_loads_in_plain_diffusers():
    pipe = DDPMPipeline.from_pretrained(default_ddpm(), use_safetensors=True)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 22_411_843
    unet, scheduler = load_ddpm(default_ddpm())
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.variance_type == "fixed_small"


@pytest.mark.parametrize("kind", ["nonrobust", "robust"])
def test_shipped_guiding_classifiers_load_strict_in_torchvision(kind):
    net = mobilenet_v3_small(num_classes=4)
    net.load_state_dict(load_file(default_classifier(kind) / "model.safetensors"), strict=True)


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    """A small 64x64 data set: 64 baseballs for the metrics' reference set."""
    root = tmp_path_factory.mktemp("shipped") / "data"
    generate_dataset(root, n_train=256, n_val=64, n_test=256, seed=0, progress=False)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_classifiers_recognise_clean_images(kind, data64):
    model, config = load_classifier(default_classifier(kind))
    x = torch.from_numpy(np.load(data64 / "val_images.npy")).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(np.load(data64 / "val_labels.npy"))
    with torch.no_grad():
        logits = model(x / 127.5 - 1) if not config["time_conditioned"] else model(x / 127.5 - 1, 0)
    assert (logits.argmax(1) == y).float().mean() >= 0.95


def test_headline_run_on_shipped_checkpoints(tmp_path, data64):
    torch.set_num_threads(1)
    cfg = RunConfig(classifier="nonrobust", x0_estimate=True, stabilizer="adam", num_samples=2,
                    batch_size=2, steps=3, device="cpu", data_root=str(data64), cos_oracle=False,
                    record_vectors="subset")
    folder = run(cfg, out=tmp_path / "runs", progress=False)
    samples = np.load(folder / "samples.npy")
    assert samples.shape == (2, 64, 64, 3) and samples.dtype == np.uint8
    steps = pd.read_parquet(folder / "steps.parquet")
    assert len(steps) == 2 * 3 and not steps.grad_norm_raw.isna().any()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["extractor"] == "sportballs-judge-shufflenet"
    assert 0.0 <= metrics["accuracy_judge"] <= 1.0


def test_auto_precision_keeps_the_shipped_x0_gradients(data64):
    """The finding behind --precision auto, on the shipped models (TF32 emulated): plain TF32
    turns the non-robust x0-estimate gradient at t = 999 (D2 gain 157), auto keeps it exact
    there and within 0.95 cosine at t = 500, where it runs a float16 UNet and TF32."""
    torch.set_num_threads(1)
    table = measure_precision(classifiers=("nonrobust",), data_root=str(data64),
                              timesteps=(999, 500), num_samples=2, modes=("tf32", "auto"),
                              device="cpu").set_index(["t", "mode"])
    assert table.loc[(999, "tf32"), "cos_min"] < 0.9
    assert table.loc[(999, "auto"), "rel_err_max"] == 0.0
    assert table.loc[(500, "auto"), "cos_min"] > 0.95
