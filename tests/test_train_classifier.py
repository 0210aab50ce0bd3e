"""train-classifier: learning, outputs, per-t evaluation, strict torchvision load, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file
from torchvision.models import mobilenet_v3_small

from gradcheck.cli import main
from gradcheck.config import TrainClassifierConfig
from gradcheck.models import (
    TimeConditionedClassifier,
    load_classifier,
    make_scheduler,
    make_unet,
)
from gradcheck.train_classifier import (
    ACCURACY_COLUMNS,
    EVAL_TIMESTEPS,
    augment,
    evaluate_classifier,
    read_accuracy_table,
    train_classifier,
)
from gradcheck.utils import GradcheckError

# Small and fast: 32x32 images, few epochs, a small evaluation.
FAST = dict(batch_size=32, eval_samples=32, eval_pgd_steps=5, progress=False, device="cpu",
            eval_pgd_eps=(0.0, 0.5, 2.0))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 train / 64 val 32x32 images: enough for MobileNetV3-small to learn in a few epochs."""
    from gradcheck.data.sportballs import generate_dataset

    root = tmp_path_factory.mktemp("clf") / "sportballs"
    generate_dataset(root, n_train=256, n_val=64, n_test=8, seed=1, image_size=32,
                     progress=False)
    return root


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained DDPM pipeline folder (UNet + scheduler)."""
    folder = tmp_path_factory.mktemp("ddpm") / "ddpm"
    torch.manual_seed(0)
    DDPMPipeline(unet=make_unet("tiny"), scheduler=make_scheduler()).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


@pytest.fixture(scope="module")
def schedule_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DDPM folder that so far holds only its scheduler config (its UNet still trains)."""
    folder = tmp_path_factory.mktemp("sched") / "ddpm"
    make_scheduler().save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def nonrobust(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    return train_classifier(kind="nonrobust", data_root=str(data), out=str(out), name="t",
                            epochs=8, lr=3e-3, patience=8, **FAST)


def test_nonrobust_learns_and_writes_its_folder(nonrobust: Path) -> None:
    assert nonrobust.name == "nonrobust" and nonrobust.parent.name == "classifiers"
    assert sorted(p.name for p in nonrobust.iterdir()) == [
        "accuracy_by_t.parquet", "config.json", "model.safetensors", "train_log.parquet"]
    config = json.loads((nonrobust / "config.json").read_text())
    assert config["clean_val_accuracy"] >= 0.6  # chance is 0.25
    assert config["kind"] == "nonrobust" and config["arch"] == "mobilenet_v3_small"
    assert config["time_input"] == "none" and "[-1, 1]" in config["input"]
    assert config["weights_dtype"] == "float32" and config["hardware"]
    log = pd.read_parquet(nonrobust / "train_log.parquet")
    assert len(log) == config["epochs_trained"] <= 8
    assert config["best_val_accuracy"] == log["val_accuracy"].max()
    assert log["val_accuracy"].iloc[config["best_epoch"] - 1] == config["best_val_accuracy"]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]


def test_nonrobust_loads_strict_into_plain_torchvision(nonrobust: Path) -> None:
    state = load_file(nonrobust / "model.safetensors")
    net = mobilenet_v3_small(num_classes=4)
    net.load_state_dict(state, strict=True)
    model, _ = load_classifier(nonrobust)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model(x))


def test_safetensors_round_trip_reproduces_saved_accuracy(nonrobust: Path, data: Path) -> None:
    from gradcheck.data.sportballs import load_tensors

    model, config = load_classifier(nonrobust)
    x, y = load_tensors(data, "val")
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(config["clean_val_accuracy"], abs=1e-6)


def test_accuracy_table_layout_and_attack_monotonic(nonrobust: Path) -> None:
    df = read_accuracy_table(nonrobust)
    assert list(df.columns) == list(ACCURACY_COLUMNS)
    assert df.attrs["config"]["kind"] == "nonrobust"
    xt = df[df["input"] == "x_t"]
    assert xt["t"].tolist() == list(EVAL_TIMESTEPS) and (xt["n"] == 32).all()
    assert not (df["input"] == "x0_hat").any()  # no DDPM given
    assert df["accuracy"].between(0, 1).all() and df["prob_target"].between(0, 1).all()
    # Almost clean at t = 0, chance-like at t = 950 for a classifier that never saw noise.
    clean = df[(df["input"] == "clean") & (df["attack"] == "none")]
    assert xt["accuracy"].iloc[0] >= clean["accuracy"].iloc[0] - 0.1
    attacked = df[df["attack"] == "pgd_l2"].sort_values("eps")
    assert attacked["eps"].tolist() == [0.0, 0.5, 2.0]
    assert attacked["accuracy"].iloc[0] == pytest.approx(clean["accuracy"].iloc[0])
    assert attacked["accuracy"].is_monotonic_decreasing
    assert attacked["accuracy"].iloc[-1] < attacked["accuracy"].iloc[0]


def test_robust_needs_ddpm_and_reads_only_its_scheduler(
    tiny_data: Path, schedule_only: Path, tmp_path: Path
) -> None:
    with pytest.raises(GradcheckError, match="kind 'robust' .* needs --ddpm FOLDER"):
        train_classifier(kind="robust", data_root=str(tiny_data), out=str(tmp_path), **FAST)
    with pytest.raises(GradcheckError, match="has no scheduler/scheduler_config.json"):
        train_classifier(kind="robust", ddpm=str(tmp_path / "nope"), data_root=str(tiny_data),
                         out=str(tmp_path), **FAST)
    folder = train_classifier(kind="robust", ddpm=str(schedule_only), data_root=str(tiny_data),
                              out=str(tmp_path), epochs=1, **FAST)
    config = json.loads((folder / "config.json").read_text())
    assert config["early_stopping_metric"] == "val_noisy_accuracy"
    assert config["noise_schedule"]["beta_end"] == 0.02
    assert config["noise_schedule_source"].endswith("scheduler_config.json")
    assert config["x0_hat_evaluated"] is False
    net = mobilenet_v3_small(num_classes=4)
    net.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    assert not list(tmp_path.glob("**/.*tmp*"))  # failed attempts left nothing behind


def test_adversarial_time_conditioned_with_ddpm_evaluation(
    tiny_data: Path, ddpm_folder: Path, tmp_path: Path
) -> None:
    folder = train_classifier(kind="adversarial", time_conditioned=True, ddpm=str(ddpm_folder),
                              data_root=str(tiny_data), out=str(tmp_path), epochs=1, fp16=True,
                              attack_steps=3, **FAST)
    model, config = load_classifier(folder)
    assert isinstance(model, TimeConditionedClassifier)
    assert "t / 1000" in config["time_input"]
    assert config["attack"] == dict(norm="l2", eps=0.5, step_size=0.083, steps=3,
                                    early_stop=True, clamp=None)
    assert all(v.dtype == torch.float16 for v in load_file(folder / "model.safetensors").values()
               if v.is_floating_point())
    df = read_accuracy_table(folder)
    assert df.loc[df["input"] == "x0_hat", "t"].tolist() == list(EVAL_TIMESTEPS)


def test_eval_classifier_adds_x0_hat_rows_later(
    nonrobust: Path, ddpm_folder: Path, data: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(nonrobust, folder)
    before = read_accuracy_table(folder)
    after = evaluate_classifier(folder, data_root=data, ddpm=ddpm_folder, eval_samples=32,
                                eval_pgd_eps=(0.0,), eval_pgd_steps=2, device="cpu",
                                progress=False)
    assert (after["input"] == "x0_hat").sum() == len(EVAL_TIMESTEPS)
    # Same seed, same fixed noise: the x_t rows are reproduced exactly.
    cols = ["t", "accuracy", "prob_target"]
    pd.testing.assert_frame_equal(
        before.loc[before["input"] == "x_t", cols].reset_index(drop=True),
        after.loc[after["input"] == "x_t", cols].reset_index(drop=True),
    )
    assert json.loads((folder / "config.json").read_text())["x0_hat_evaluated"] is True


def test_training_is_seeded(tiny_data: Path, tmp_path: Path) -> None:
    kw = dict(kind="judge", data_root=str(tiny_data), epochs=1, **{**FAST, "eval_pgd_eps": (0.0,)})
    a = train_classifier(out=str(tmp_path / "a"), **kw)
    b = train_classifier(out=str(tmp_path / "b"), **kw)
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a / "config.json").read_text())["arch"] == "shufflenet_v2_x1_0"
    with pytest.raises(GradcheckError, match="already exists; pass --overwrite"):
        train_classifier(out=str(tmp_path / "a"), **kw)


def test_augment_flips_and_shifts_but_keeps_content() -> None:
    x = torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out.min() >= x.min() and out.max() <= x.max()  # replicate padding adds no values
    outs = [augment(x, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(o, x) for o in outs)
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])


def test_pickle_refused(nonrobust: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(nonrobust, folder)
    (folder / "model.pt").write_bytes(b"not really a pickle")
    with pytest.raises(GradcheckError, match="refusing pickle file .*model.pt"):
        load_classifier(folder)
    with pytest.raises(GradcheckError, match="refusing pickle file"):
        load_classifier(nonrobust / "model.pth")


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train-classifier", "--kind", "fancy", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: unknown classifier kind 'fancy'; choose one of: "
                   "nonrobust, robust, adversarial, judge")
    with pytest.raises(SystemExit) as e:
        main(["train-classifier", "--kind", "robust", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "needs --ddpm FOLDER" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train-classifier", "--kind", "judge", "--time-conditioned"])
    assert "--time-conditioned needs noisy training" in capsys.readouterr().err
    for extra, message in ((["--kind", "judge", "--seed", "-1"], "seed must be an integer in"),
                           (["--kind", "judge", "--name", "../up"],
                            "checkpoint set name '../up' must be a plain folder name"),
                           (["--kind", "adversarial", "--attack-steps", "0"],
                            "attack_steps must be > 0, got 0")):
        with pytest.raises(SystemExit) as e:
            main(["train-classifier", "--out", str(tmp_path), *extra])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_ddpm_of_another_image_size_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    from diffusers import DDPMPipeline, UNet2DModel

    from gradcheck.models import UNET_PRESETS, make_scheduler

    ddpm = tmp_path / "ddpm64"
    unet = UNet2DModel(**{**UNET_PRESETS["tiny"], "sample_size": 64})
    DDPMPipeline(unet, make_scheduler()).save_pretrained(ddpm)
    with pytest.raises(GradcheckError, match=f"the DDPM makes 64x64 images but {tiny_data} has "
                                             "32x32"):
        train_classifier(kind="robust", ddpm=str(ddpm), data_root=str(tiny_data),
                         out=str(tmp_path / "out"), epochs=1, **FAST)
    assert not (tmp_path / "out" / "sportballs-v1" / "classifiers" / "robust").exists()


def test_config_fields_match_cli_options() -> None:
    import dataclasses

    import typer.main

    from gradcheck.cli import app

    cmd = typer.main.get_command(app).commands["train-classifier"]
    options = {p.name for p in cmd.params}
    assert options == {f.name for f in dataclasses.fields(TrainClassifierConfig)}


def test_missing_data_set_leaves_no_checkpoint_tree(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train-classifier", "--kind", "judge", "--data-root", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "ck"), "--name", "x", "--no-progress"])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()
