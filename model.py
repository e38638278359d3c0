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
import functools
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write
# Where ImageNet weights exist without a network (--pretrained); the others download them (--pretrained-backbone).
from config import DOWNLOADED_PRETRAINED, OFFLINE_PRETRAINED
from encoders import IMAGENET_NORMALIZATION, LITE0_CHANNELS, efficientnet_lite0
from labels import BINARY_CLASSES
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
        # Exported to ONNX the sizes are symbolic: pad unconditionally (a no-op when they match) so the
        # graph serves every input size, not only the one traced.
        if torch.onnx.is_in_onnx_export() or dy or dx:
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


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate it, then (3x3 conv -> BatchNorm -> ReLU) twice."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x, skip=None, size=None):
        x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else size, mode="bilinear", align_corners=False)
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


class EfficientNetUNet(nn.Module):
    """U-Net decoder on an ImageNet-pretrained EfficientNet-Lite0 encoder (as segmentation_models.pytorch's Unet).

    The encoder's features at strides 32 -> 16, 8, 4, 2 feed four decoder blocks; a fifth block
    (when decoder_channels has five widths) returns to the input's resolution, else the half-size
    logits are upsampled bilinearly (cheaper: the full-size block costs most of the decoder). Logits (B, out_channels, H, W) for any H, W (the blocks
    interpolate to each skip's size, so odd sizes need no padding).
    """

    arch = "unet_efficientnet_lite0"
    normalization = IMAGENET_NORMALIZATION

    def __init__(self, out_channels=1, decoder_channels=(128, 64, 32, 24, 16), pretrained=False):
        super().__init__()
        self.model_args = dict(out_channels=out_channels, decoder_channels=list(decoder_channels))
        self.encoder = efficientnet_lite0(pretrained)
        if len(decoder_channels) not in (4, 5):
            raise ValueError(f"decoder_channels needs 4 or 5 widths, got {list(decoder_channels)}")
        skips = list(reversed(LITE0_CHANNELS[:-1])) + [0]  # 112, 40, 24, 16, then none at full size
        ins = [LITE0_CHANNELS[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=1)

    def forward(self, images):  # (B, 3, H, W) -> (B, out_channels, H, W)
        *skips, x = self.encoder(images)
        for block in self.blocks:
            x = block(x, skips.pop()) if skips else block(x, size=images.shape[-2:])
        logits = self.head(x)
        if logits.shape[-2:] != images.shape[-2:]:  # four blocks end at half size: upsample the logits
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class DeepLabV3(nn.Module):
    """DeepLabV3 (Chen et al., 2017): torchvision's ASPP head on a backbone; logits (B, out_channels, H, W).

    Backbones: torchvision's MobileNetV3-Large (output stride 16) and ResNet-50 (output stride 8),
    as its `deeplabv3_*` builders make them, and EfficientNet-Lite0 (output stride 16, dilated by timm).
    `pretrained`: ImageNet backbone weights; offline for EfficientNet-Lite0, downloaded by torchvision
    (network needed) for the others.
    """

    normalization = IMAGENET_NORMALIZATION

    def __init__(self, backbone, out_channels=1, pretrained=False):
        super().__init__()
        from torchvision.models import segmentation  # imported here: the U-Nets need no torchvision models
        self.arch, self.model_args = f"deeplabv3_{backbone}", dict(out_channels=out_channels)
        if backbone == "efficientnet_lite0":
            self.backbone = efficientnet_lite0(pretrained, out_indices=(4,), output_stride=16)
            self.head = segmentation.deeplabv3.DeepLabHead(LITE0_CHANNELS[-1], out_channels)
        else:
            build = getattr(segmentation, f"deeplabv3_{backbone}")
            model = build(weights=None, weights_backbone=_torchvision_backbone(backbone) if pretrained else None,
                          num_classes=out_channels, aux_loss=False)
            self.backbone, self.head = model.backbone, model.classifier

    def forward(self, images):  # (B, 3, H, W) -> (B, out_channels, H, W)
        features = self.backbone(images)
        x = features[-1] if isinstance(features, list) else features["out"]
        return F.interpolate(self.head(x), size=images.shape[-2:], mode="bilinear", align_corners=False)


def _torchvision_backbone(backbone: str):
    """torchvision's ImageNet weights enum for a backbone, downloaded now (RuntimeError offline, at once)."""
    from torchvision import models
    weights = {"mobilenet_v3_large": models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
               "resnet50": models.ResNet50_Weights.IMAGENET1K_V1}[backbone]
    try:
        weights.get_state_dict(progress=False, check_hash=True)  # cached in $TORCH_HOME after the first time
    except OSError as err:  # URLError (no network) is an OSError
        raise RuntimeError(f"--pretrained-backbone: torchvision's {backbone} ImageNet weights cannot be downloaded "
                           f"from {weights.url} ({err}); connect to the internet once, or train without "
                           "--pretrained-backbone (EfficientNet-Lite0 backbones have offline weights)") from None
    return weights


# ---------------------------------------------------------------- the registry

ARCHITECTURES = {
    "unet": UNet,
    "unet_efficientnet_lite0": EfficientNetUNet,
    "deeplabv3_mobilenet_v3_large": functools.partial(DeepLabV3, "mobilenet_v3_large"),
    "deeplabv3_resnet50": functools.partial(DeepLabV3, "resnet50"),
    "deeplabv3_efficientnet_lite0": functools.partial(DeepLabV3, "efficientnet_lite0"),
}


def build_model(arch: str, pretrained: bool = False, **model_args) -> nn.Module:
    """A model of a registered architecture; ValueError names an unknown one.

    pretrained: start the encoder from ImageNet weights (architectures in OFFLINE_PRETRAINED and
    DOWNLOADED_PRETRAINED only; RuntimeError when they cannot be had). Checkpoints are rebuilt with
    pretrained=False: their own weights replace the encoder's.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; registered: {', '.join(sorted(ARCHITECTURES))}")
    if not pretrained:
        return ARCHITECTURES[arch](**model_args)
    if arch not in OFFLINE_PRETRAINED + DOWNLOADED_PRETRAINED:
        raise ValueError(f"{arch} has no pretrained weights")
    return ARCHITECTURES[arch](pretrained=True, **model_args)


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
CHECKPOINT_KEYS = ("arch", "model_args", "model", "normalization", "config")
# What files mistaken for a checkpoint begin with, so that a refusal can say what the file is.
FILE_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                   (b"RIFF", "a RIFF file (a WebP image, a WAV sound...)"), (b"\x1f\x8b", "a gzip-compressed file"),
                   (b"\x89HDF", "an HDF5 file (Keras weights?)"), (b"\x93NUMPY", "a NumPy array file"))
ZIP_START = b"PK\x03\x04"  # torch.save writes a zip archive holding <name>/data.pkl first
# torch.save before PyTorch 1.6 (still read by torch.load): a pickled magic number, then the pickles.
LEGACY_TORCH_START = b"\x80\x02\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little") + b"."


def checkpoint_for(model: nn.Module, config: dict, **extra) -> dict:
    """A checkpoint of `model` (uncompiled): plain data and tensors only, loadable with weights_only=True.

    `config` is the training options as a dict (it must hold image_width, image_height and
    threshold); machine-local paths are dropped from it. `extra` adds keys (class_names, epoch,
    history, optimizer...); `class_names` (index 0 the background) defaults to BINARY_CLASSES.
    """
    missing = [name for name in INFERENCE_OPTIONS if name not in config]
    if missing:
        raise ValueError(f"a checkpoint's config needs {', '.join(missing)}")
    extra.setdefault("class_names", list(BINARY_CLASSES))
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
    checkpoint = _load_plain_data(path)
    if isinstance(checkpoint, dict) and checkpoint.get("format_version") == 1 and "model_args" in checkpoint:
        checkpoint = _upgrade_from_format_1(checkpoint, path)
    problem = _not_a_checkpoint_because(checkpoint)
    if problem:
        raise ValueError(f"checkpoint {path} is not a train.py checkpoint (format {CHECKPOINT_FORMAT}): {problem}")
    checkpoint.setdefault("class_names", list(BINARY_CLASSES))  # written before multi-class models
    names, out_channels = checkpoint["class_names"], checkpoint["model_args"].get("out_channels", 1)
    if not (isinstance(names, list) and len(names) >= 2 and out_channels == (len(names) if len(names) > 2 else 1)):
        raise ValueError(f"checkpoint {path}: its class_names {names!r} do not fit a model of {out_channels} "
                         "output channel(s) (one for two classes, else one per class)")
    config = checkpoint["config"]
    sizes_ok = all(isinstance(config[k], int) and config[k] > 0 for k in ("image_width", "image_height"))
    if not (sizes_ok and isinstance(config["threshold"], (int, float)) and 0 < config["threshold"] < 1):
        raise ValueError(f"checkpoint {path} holds an impossible threshold {config['threshold']!r} or input size "
                         f"{config['image_width']!r}x{config['image_height']!r}")
    return checkpoint


def _load_plain_data(path):
    """torch.load(weights_only=True) of a file given by the user; every failure a ValueError naming the file."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is not a PyTorch checkpoint: it is a folder; give the file in it (a run folder "
                         "holds best.pt and last.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist: train one with `python train.py` "
                                "or pass --checkpoint PATH") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, OSError... for bad files
        raise ValueError(_refusal(path, err)) from None


def _refusal(path, err: Exception) -> str:
    """Why torch.load(weights_only=True) refused `path`, in this project's words.

    PyTorch's own message is never passed on: it advises re-loading with weights_only=False, which
    would run whatever code the file carries. Only the name of the object it refused is kept.
    """
    refused = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if refused:
        return (f"checkpoint {path} holds Python objects other than tensors and plain data ({refused[1]}): not a "
                "checkpoint this project wrote; nothing in it was run")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as io_err:  # permission denied, an unreadable disk...
        return f"checkpoint {path} cannot be read: {io_err.strerror or io_err}"
    if head.startswith(LEGACY_TORCH_START) or (head.startswith(ZIP_START) and b"data.pkl" in head):
        return (f"{path} is not a complete PyTorch checkpoint: it is cut short or damaged ({size:,} bytes, "
                f"{type(err).__name__}); copy it or save it again")
    return f"{path} is not a PyTorch checkpoint ({_file_kind(path, head, size)})"


def _file_kind(path, head: bytes, size: int) -> str:
    """What a file that is no checkpoint is, from its first bytes: "an empty file", "a JPEG image"..."""
    if size == 0:
        return "an empty file"
    kind = next((what for start, what in FILE_SIGNATURES if head.startswith(start)), None)
    if kind:
        return kind
    if head.startswith(ZIP_START):
        try:
            with zipfile.ZipFile(path) as archive:
                return f"a zip archive holding {', '.join(archive.namelist()[:3]) or 'nothing'}"
        except zipfile.BadZipFile:
            return "a damaged zip archive"
    if head[8:10] == b'{"':  # a little-endian header length, then the JSON header
        return "a safetensors file"
    if head.startswith(b"\x80"):  # pickle's PROTO opcode
        return "a Python pickle, not written by torch.save"
    text = _text_start(head)
    return f"a text file beginning {text!r}" if text is not None else f"{size:,} bytes of unrecognised data"


def _text_start(head: bytes):
    """The first words of `head` if it is UTF-8 text, else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # more than a character cut at the end of the 512 bytes read
            return None
        text = head[:err.start].decode("utf-8")
    if not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    return " ".join(text.split())[:40]


def _not_a_checkpoint_because(checkpoint):
    """Why plain data loaded from a file is not a train.py checkpoint of the current format, in words; None if it is."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict"
    keys = ", ".join(map(str, list(checkpoint)[:6])) + (", ..." if len(checkpoint) > 6 else "")
    if "format_version" not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return (f"it is a bare state_dict ({len(checkpoint)} tensors), without the architecture and options a "
                    "checkpoint records")
        return f"it has no format_version; its keys: {keys or 'none'}"
    if checkpoint["format_version"] not in (1, CHECKPOINT_FORMAT):  # a format 1 one here lacks its model_args
        return f"its format_version is {checkpoint['format_version']!r}; this version reads 1 and {CHECKPOINT_FORMAT}"
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        return f"it lacks {', '.join(missing)}; its keys: {keys}"
    if not isinstance(checkpoint["model"], dict) or not isinstance(checkpoint["config"], dict):
        return "its model or config is not a dict"
    missing = [k for k in INFERENCE_OPTIONS if k not in checkpoint["config"]]
    return f"its config lacks {', '.join(missing)}" if missing else None


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
