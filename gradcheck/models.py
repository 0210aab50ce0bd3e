"""UNet presets, the DDPM scheduler, classifier constructors, and safetensors-only load/save
(formats: docs/formats.md; pickle files are refused everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import mobilenet_v3_small, shufflenet_v2_x1_0

from gradcheck import CLASS_NAMES
from gradcheck.utils import (
    GradcheckError,
    check_choice,
    from_uint8,
    load_json,
    refuse_pickle,
    save_json,
)

# ---- DDPM ---------------------------------------------------------------------------------------

_RGB = dict(in_channels=3, out_channels=3, attention_head_dim=8)  # every preset's
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # GradCheck App. B: ~22.5M parameters (this gives 22.41M), diffusers UNet2DModel.
    "paper": dict(
        sample_size=64, **_RGB, layers_per_block=2, block_out_channels=(64, 128, 192, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # The CPU scale (docs/scales.md): 32x32, 3.15M parameters; attention only at 8x8 and 4x4.
    "small32": dict(
        sample_size=32, **_RGB, layers_per_block=1, block_out_channels=(32, 64, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    # For CPU tests: same block types in miniature, 32x32 images.
    "tiny": dict(
        sample_size=32, **_RGB, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ),
}


def make_unet(preset: str = "paper") -> UNet2DModel:
    """A freshly initialised UNet2DModel of a named preset."""
    check_choice("UNet preset", preset, list(UNET_PRESETS))
    return UNet2DModel(**UNET_PRESETS[preset])


def make_scheduler() -> DDPMScheduler:
    """docs/maths.md: linear beta 1e-4..0.02, T = 1000, fixed small variance, epsilon, clipped."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", variance_type="fixed_small",
                         prediction_type="epsilon", clip_sample=True)


def _refuse_pickles_in(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            refuse_pickle(p)


def load_ddpm(folder: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load (unet, scheduler) from a diffusers pipeline folder, safetensors only, in eval mode."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise GradcheckError(f"{folder} is not a DDPM pipeline folder (no model_index.json); train "
                             "one with `gradcheck train-ddpm` or give another pipeline folder")
    _refuse_pickles_in(folder)
    try:
        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GradcheckError(f"cannot load DDPM from {folder}: {msg}") from None
    return unet.float().eval(), scheduler


# ---- Classifiers --------------------------------------------------------------------------------

CLASSIFIER_KINDS = ("nonrobust", "robust", "adversarial", "judge")
"""The registry of classifier kinds: a shipped set has one folder per kind."""
GUIDING_KINDS = CLASSIFIER_KINDS[:3]
"""The kinds that guide; the judge grades samples and never guides (docs/metrics.md)."""
INPUT_CONVENTION = (
    "float32 NCHW RGB, 3x64x64, values in [-1, 1] (x = 2 * uint8 / 255 - 1); "
    "logits over classes " + ", ".join(f"{i}={c}" for i, c in enumerate(CLASS_NAMES))
)
TIME_CONVENTION = (
    "time-conditioned: t enters as a 4th input channel, a constant plane of value t / 1000 "
    "(t in 0..999; 0 for clean images and x0-estimates)"
)


class TimeConditionedClassifier(nn.Module):
    """A classifier that also sees the diffusion timestep t as a constant extra input channel."""

    time_aware = True  # called as model(x, t) (classifier_logits)

    def __init__(self, net: nn.Module, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.net = net
        self.num_train_timesteps = num_train_timesteps

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | None = None) -> torch.Tensor:
        """x: (B, 3, H, W); t: (B,) or scalar timesteps (None = 0) -> logits (B, classes)."""
        b, _, h, w = x.shape
        if t is None or isinstance(t, int):  # a fill on the device: no host-to-device copy
            plane = x.new_full((b, 1, h, w), (t or 0) / self.num_train_timesteps)
            return self.net(torch.cat([x, plane], dim=1))
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1)
        plane = (t / self.num_train_timesteps).expand(b).view(b, 1, 1, 1).expand(b, 1, h, w)
        return self.net(torch.cat([x, plane], dim=1))


def _mobilenet(in_channels: int = 3) -> nn.Module:
    net = mobilenet_v3_small(weights=None, num_classes=len(CLASS_NAMES))
    if in_channels != 3:
        old = net.features[0][0]
        net.features[0][0] = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
    return net


def _judge() -> nn.Module:
    # ShuffleNetV2 x1.0, unlike the guiding MobileNetV3; no stem max-pool: 64x64 ends at 4x4.
    net = shufflenet_v2_x1_0(weights=None, num_classes=len(CLASS_NAMES))
    net.maxpool = nn.Identity()
    return net


ARCHITECTURES = ("mobilenet_v3_small", "shufflenet_v2_x1_0")


def make_classifier(arch: str = "mobilenet_v3_small", time_conditioned: bool = False) -> nn.Module:
    """A freshly initialised classifier; time-conditioned models take ``(x, t)``."""
    check_choice("classifier architecture", arch, ARCHITECTURES)
    if arch == "shufflenet_v2_x1_0":
        if time_conditioned:
            raise GradcheckError("the judge (shufflenet_v2_x1_0) cannot be time-conditioned")
        return _judge()
    if time_conditioned:
        return TimeConditionedClassifier(_mobilenet(in_channels=4))
    return _mobilenet()


def classifier_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features (B, D) of a plain classifier: the judge's are the metrics' features."""
    if isinstance(model, TimeConditionedClassifier):
        raise GradcheckError("features are defined for plain classifiers only")
    if hasattr(model, "conv5"):  # ShuffleNetV2
        h = model.conv5(model.stage4(model.stage3(model.stage2(model.maxpool(model.conv1(x))))))
        return h.mean(dim=(2, 3))
    h = model.avgpool(model.features(x)).flatten(1)  # MobileNetV3: features before classifier
    return model.classifier[:-1](h)


def classifier_config(
    kind: str, arch: str, time_conditioned: bool = False, **extra: Any
) -> dict[str, Any]:
    """The config.json written beside a classifier's model.safetensors."""
    size = int(extra.get("image_size", 64))
    return {"kind": kind, "arch": arch, "num_classes": len(CLASS_NAMES),
            "class_names": list(CLASS_NAMES), "time_conditioned": time_conditioned,
            "input": INPUT_CONVENTION.replace("3x64x64", f"3x{size}x{size}"),
            "time_input": TIME_CONVENTION if time_conditioned else "none", **extra}


def save_classifier(
    model: nn.Module, folder: str | Path, config: dict[str, Any], dtype: torch.dtype | None = None
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (optionally cast, e.g. fp16 for shipping)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    save_json(folder / "config.json", config)


def load_classifier(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Load (model in eval mode, float32; config) from a classifier folder, safetensors only."""
    folder = Path(folder)
    refuse_pickle(folder)
    if folder.is_file():
        raise GradcheckError(f"{folder} is a file; a classifier is a folder with config.json")
    if not folder.is_dir():
        raise GradcheckError(f"classifier folder {folder} does not exist; train one with "
                             "`gradcheck train-classifier` or pass its folder")
    _refuse_pickles_in(folder)
    config = load_json(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise GradcheckError(f"missing {weights}")
    model = make_classifier(config.get("arch", "mobilenet_v3_small"),
                            bool(config.get("time_conditioned", False)))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise GradcheckError(f"cannot read {weights}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GradcheckError(f"{weights} does not match {config.get('arch')}: "
                             f"{str(e).splitlines()[0]}") from None
    return model.float().to(device).eval(), config


def check_image_size(config: dict[str, Any], size: int, what: str, other: str) -> None:
    """Raise when a classifier trained on one image size would see images of another."""
    trained = config.get("image_size")
    if trained is not None and int(trained) != int(size):
        raise GradcheckError(f"{what} was trained on {trained}x{trained} images but {other} "
                             f"{size}x{size}")


def classifier_logits(model: nn.Module, x: torch.Tensor, t: torch.Tensor | int | None = None):
    """Logits of any gradcheck classifier or the oracle; ``t`` reaches only ``time_aware`` ones."""
    if getattr(model, "time_aware", False):
        return model(x, t)
    return model(x)


@torch.no_grad()
def classify(
    model: nn.Module, images: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) -> (predicted class (N,), its probability (N,)) on the CPU, in
    eval mode on the model's device; time-conditioned models see t = 0 (clean images)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, probs = [], []
    for i in range(0, len(images), batch_size):
        x = from_uint8(images[i:i + batch_size].to(device))
        p, c = classifier_log_probs(model, x, 0).exp().max(dim=1)
        preds.append(c.cpu())
        probs.append(p.cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(probs)


def classifier_log_probs(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor | int | None = None
) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C) float32 log-probabilities of :func:`classifier_logits`."""
    return torch.log_softmax(classifier_logits(model, x, t).float(), dim=1)
