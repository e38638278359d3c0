"""Segmentation models and their checkpoints.

Architectures are registered by name (`ARCHITECTURES`); `build_model(arch, **model_args)` builds
one, and every checkpoint records both, so `load_model(checkpoint)` rebuilds any registered model
from the file alone. This module is the one owner of checkpoint files: `checkpoint_for` assembles
one, `save_checkpoint` writes it atomically and `load_checkpoint` reads it back as plain data,
upgrading older formats.

The U-Net (Ronneberger et al., 2015): a contracting encoder, a bottleneck and an expanding decoder
joined by skip connections. Padded 3x3 convolutions with BatchNorm, so the output has the input's
height and width for any size, odd ones included.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write
from metrics import with_current_names

# What a model expects of its input tensor: (x - mean) / std per RGB channel of an image in [0, 1].
# The U-Net trains from scratch on [0, 1] images; an ImageNet-pretrained encoder would record
# ImageNet's mean and std here.
IDENTITY_NORMALIZATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


class DoubleConv(nn.Module):
    """(3x3 conv -> BatchNorm -> ReLU) twice."""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.block(x)


class Down(nn.Module):
    """Halve the resolution with 2x2 max-pooling, then DoubleConv."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.block = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.block(x)


class Up(nn.Module):
    """Double the resolution, concatenate the encoder's skip tensor, then DoubleConv."""

    def __init__(self, in_channels, out_channels, bilinear=False):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x, skip):
        x = self.up(x)
        # An odd-sized encoder level was floored by max-pooling: pad back to the skip's size.
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net returning per-pixel logits of shape (B, out_channels, H, W) for images (B, in_channels, H, W)."""

    arch = "unet"
    normalization = IDENTITY_NORMALIZATION

    def __init__(self, in_channels=3, out_channels=1, base_channels=64, depth=4, bilinear=False):
        super().__init__()
        self.model_args = dict(in_channels=in_channels, out_channels=out_channels,
                               base_channels=base_channels, depth=depth, bilinear=bilinear)
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        # With bilinear upsampling the bottleneck keeps the width of the level above it, so the
        # concatenated tensors match without a learned up-projection (as in the reference code).
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1] // (factor if i == depth - 1 else 1)) for i in range(depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i] // (factor if i > 0 else 1), bilinear) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, images):  # (B, C, H, W) -> (B, out_channels, H, W)
        x = self.inc(images)
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is not a skip
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


# ---------------------------------------------------------------- the registry

ARCHITECTURES = {cls.arch: cls for cls in (UNet,)}


def build_model(arch: str, **model_args) -> nn.Module:
    """A freshly initialised model of a registered architecture; ValueError names an unknown one."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; registered: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](**model_args)


def load_model(checkpoint: dict) -> nn.Module:
    """Rebuild the model a checkpoint describes, with its weights in fp32 (fp16-exported ones included)."""
    model = build_model(checkpoint["arch"], **checkpoint["model_args"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"the checkpoint's weights do not fit its {checkpoint['arch']} {checkpoint['model_args']}: "
                         f"{str(err).splitlines()[0]}") from None
    return model


# ---------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 2
# The options an inference needs from a checkpoint's `config` (besides its weights and normalisation).
INFERENCE_OPTIONS = ("image_width", "image_height", "threshold")
# Options naming folders of the machine that trained: they stay in the run folder's config.json,
# never in a checkpoint, which may travel (the bundled model does).
LOCAL_OPTIONS = ("data_dir", "cache_dir", "out_dir", "resume")


def checkpoint_for(model: nn.Module, config: dict, **extra) -> dict:
    """A checkpoint of `model` (uncompiled): plain data and tensors only, loadable with weights_only=True.

    `config` is the training options as a dict (it must hold image_width, image_height and
    threshold); machine-local paths are dropped from it. `extra` adds keys (epoch, history, optimizer...).
    """
    missing = [name for name in INFERENCE_OPTIONS if name not in config]
    if missing:
        raise ValueError(f"a checkpoint's config needs {', '.join(missing)}")
    return {"format_version": CHECKPOINT_FORMAT, "arch": model.arch, "model_args": dict(model.model_args),
            "model": model.state_dict(), "normalization": {k: list(v) for k, v in model.normalization.items()},
            "config": {k: v for k, v in config.items() if k not in LOCAL_OPTIONS}, **extra}


def save_checkpoint(path, checkpoint: dict):
    """Write atomically (temporary file, fsync, rename): a kill mid-write leaves the previous file intact."""
    with atomic_write(path) as f:
        torch.save(checkpoint, f)


def load_checkpoint(path) -> dict:
    """Read a checkpoint as plain data, in the current format.

    Loads with weights_only=True, so a pickle carrying code is refused and never runs. Raises
    FileNotFoundError for a missing file and ValueError, naming the file, for anything that is not a
    checkpoint of this project (format 1 or 2; format 1 is upgraded in memory).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist: train one with `python train.py` "
                                "or pass --checkpoint PATH")
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"checkpoint {path} cannot be loaded safely: {type(err).__name__}: {err}") from None
    if isinstance(checkpoint, dict) and checkpoint.get("format_version") == 1 and "model_args" in checkpoint:
        checkpoint = _upgrade_from_format_1(checkpoint, path)
    required = ("arch", "model_args", "model", "normalization", "config")
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != CHECKPOINT_FORMAT \
            or any(k not in checkpoint for k in required) \
            or any(k not in checkpoint["config"] for k in INFERENCE_OPTIONS):
        raise ValueError(f"checkpoint {path} is not a train.py checkpoint (format {CHECKPOINT_FORMAT})")
    config = checkpoint["config"]
    sizes_ok = all(isinstance(config[k], int) and config[k] > 0 for k in ("image_width", "image_height"))
    if not (sizes_ok and isinstance(config["threshold"], (int, float)) and 0 < config["threshold"] < 1):
        raise ValueError(f"checkpoint {path} holds an impossible threshold {config['threshold']!r} or input size "
                         f"{config['image_width']!r}x{config['image_height']!r}")
    return checkpoint


def _upgrade_from_format_1(checkpoint: dict, path) -> dict:
    """Format 1 (U-Net only): no `arch` or `normalization`, the input size as config width/height,
    the threshold stored twice, the machine's data path in the config, older metric names."""
    model_args = dict(checkpoint["model_args"])
    for name, off in (("space_to_depth", 1), ("refine_channels", 0)):
        value = model_args.pop(name, off)
        if value != off:
            raise ValueError(f"checkpoint {path} is a U-Net with {name}={value}, a variant this version no "
                             "longer builds (it lost to the plain U-Net); load it with the version that wrote it")
    config = dict(checkpoint.get("config", {}))
    for old, new in (("width", "image_width"), ("height", "image_height")):
        if old in config:
            config[new] = config.pop(old)
    if "threshold" in checkpoint:
        config.setdefault("threshold", checkpoint["threshold"])
    upgraded = {k: v for k, v in checkpoint.items() if k != "threshold"}
    upgraded.update(format_version=CHECKPOINT_FORMAT, arch="unet", model_args=model_args,
                    normalization={k: list(v) for k, v in IDENTITY_NORMALIZATION.items()},
                    config={k: v for k, v in config.items() if k not in LOCAL_OPTIONS})
    if "history" in checkpoint:
        upgraded["history"] = [with_current_names(record) for record in checkpoint["history"]]
    if "metrics" in checkpoint:
        upgraded["metrics"] = with_current_names(checkpoint["metrics"])
    return upgraded
