"""The CPU-scale reference set (checkpoints/sportballs32-v1): it loads in plain diffusers and
torchvision, recognises the data, is the default without a GPU, and its guidance works."""

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
from gradcheck.models import load_classifier
from gradcheck.paths import CPU_SET, REPO_ROOT, checkpoint_set_name
from gradcheck.runner import run

SET = REPO_ROOT / "checkpoints" / CPU_SET
KINDS = ("nonrobust", "robust", "adversarial", "judge")


@pytest.fixture(autouse=True)
def _cpu_set(monkeypatch):
    monkeypatch.setenv("GRADCHECK_CHECKPOINTS", CPU_SET)


@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    """A small 32x32 data set with 64 held-out baseballs for the metrics' reference."""
    root = tmp_path_factory.mktemp("shipped32") / "data"
    generate_dataset(root, n_train=256, n_val=64, n_test=256, seed=0, image_size=32,
                     progress=False)
    return root


def test_cpu_set_is_the_default_without_a_gpu(monkeypatch):
    monkeypatch.delenv("GRADCHECK_CHECKPOINTS")
    assert checkpoint_set_name() == ("sportballs-v1" if torch.cuda.is_available() else CPU_SET)


def test_shipped32_is_small_fp16_safetensors():
    # train_state/ is the git-ignored resume state of whoever trained the set here.
    files = [p for p in SET.rglob("*") if p.is_file() and "train_state" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= 24 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 5  # 1 UNet file + 4 classifiers
    for p in weights:
        assert {t.dtype for t in load_file(p).values() if t.is_floating_point()} == {torch.float16}
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".ckpt")]


def test_shipped32_ddpm_loads_in_plain_diffusers():
    pipe = DDPMPipeline.from_pretrained(SET / "ddpm", use_safetensors=True)
    assert pipe.unet.config.sample_size == 32
    assert sum(p.numel() for p in pipe.unet.parameters()) == 3_197_859
    sched = pipe.scheduler.config
    assert (sched.num_train_timesteps, sched.beta_start, sched.beta_end, sched.beta_schedule,
            sched.variance_type, sched.prediction_type) == (
        1000, 1e-4, 0.02, "linear", "fixed_small", "epsilon")


@pytest.mark.parametrize("kind", ["nonrobust", "robust"])
def test_shipped32_guiding_classifiers_load_strict_in_torchvision(kind):
    net = mobilenet_v3_small(num_classes=4)
    net.load_state_dict(load_file(SET / "classifiers" / kind / "model.safetensors"), strict=True)


# The adversarial classifier trades clean accuracy for robustness (94.1% on the validation
# split after its 9-minute CPU budget); the others are at 100% there.
CLEAN_FLOOR = {"nonrobust": 0.95, "robust": 0.95, "adversarial": 0.85, "judge": 0.95}


@pytest.mark.parametrize("kind", KINDS)
def test_shipped32_classifiers_recognise_clean_images(kind, data32):
    model, config = load_classifier(SET / "classifiers" / kind)
    x = torch.from_numpy(np.load(data32 / "val_images.npy")).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(np.load(data32 / "val_labels.npy"))
    with torch.no_grad():
        logits = model(x / 127.5 - 1) if not config["time_conditioned"] else model(x / 127.5 - 1, 0)
    assert (logits.argmax(1) == y).float().mean() >= CLEAN_FLOOR[kind]


def test_robust_guidance_raises_the_target_probability_on_the_shipped_set(tmp_path, data32):
    """A short run guided by the robust classifier ends with a higher judge-free target
    probability (the guiding classifier on x0_hat) than the paired unguided run (scale 0)."""
    torch.set_num_threads(1)
    late = {}
    for scale in (0.0, 2.0):
        cfg = RunConfig(classifier="robust", scale=scale, target="soccer", num_samples=4,
                        batch_size=4, steps=25, device="cpu", data_root=str(data32),
                        cos_oracle=False, record_vectors="none", metrics=False)
        folder = run(cfg, out=tmp_path / "runs", progress=False)
        steps = pd.read_parquet(folder / "steps.parquet")
        last = steps[steps["step"] >= steps["step"].max() - 4]
        late[scale] = float(last["prob_target_x0"].mean())
        config = json.loads((folder / "config.json").read_text())
        assert config["run_metadata"]["checkpoints"] == CPU_SET
    assert late[2.0] > late[0.0] + 0.2, late


def test_headline_run_on_shipped32_keeps_x_t_in_distribution(tmp_path, data32):
    """x0-estimate + ADAM at 50 respaced steps: with D4' the chain stays near the DDPM's
    marginal (the step-counted ADAM drove it to noise); metrics.json is strict JSON."""
    torch.set_num_threads(1)
    cfg = RunConfig(classifier="nonrobust", x0_estimate=True, stabilizer="adam", num_samples=2,
                    batch_size=2, steps=50, device="cpu", data_root=str(data32), cos_oracle=False,
                    record_vectors="none")
    folder = run(cfg, out=tmp_path / "runs", progress=False)
    steps = pd.read_parquet(folder / "steps.parquet")
    assert steps["x_norm_ratio"].max() < 2.0
    metrics = json.loads((folder / "metrics.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert metrics["extractor"] == "sportballs-judge-shufflenet"
    assert metrics["reference_split"] == "test" and metrics["n_reference"] == 64
