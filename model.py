"""Segmentation models: the architectures, built by name and rebuilt from a checkpoint.

Architectures are registered by name (`ARCHITECTURES`); `build_model(arch, **model_args)` builds
one, and every checkpoint records both, so `load_model(checkpoint)` rebuilds any registered model
from the file alone (the file itself, its format and its upgrades: carseg/checkpoint.py).

The U-Net (Ronneberger et al., 2015): a contracting encoder, a bottleneck and an expanding decoder
joined by skip connections. Padded 3x3 convolutions with BatchNorm, so the output has the input's
height and width for any size, odd ones included.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# Where ImageNet weights exist without a network (--pretrained); the others download them (--pretrained-backbone).
from config import DOWNLOADED_PRETRAINED, OFFLINE_PRETRAINED
from carseg.encoders import CHANNELS, IMAGENET_NORMALIZATION, efficientnet_lite

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
    """U-Net decoder on an ImageNet-pretrained EfficientNet-Lite encoder (as segmentation_models.pytorch's Unet).

    variant: lite0 (the default), lite1 or lite2 (carseg/encoders.py), named in the architecture
    (`unet_efficientnet_lite1`).

    The encoder's features at strides 32 -> 16, 8, 4, 2 feed four decoder blocks; a fifth block
    (when decoder_channels has five widths) returns to the input's resolution, else the half-size
    logits are upsampled bilinearly (cheaper: the full-size block costs most of the decoder). Logits (B, out_channels, H, W) for any H, W (the blocks
    interpolate to each skip's size, so odd sizes need no padding).
    """

    normalization = IMAGENET_NORMALIZATION

    def __init__(self, out_channels=1, decoder_channels=(128, 64, 32, 24, 16), pretrained=False, variant="lite0"):
        super().__init__()
        if len(decoder_channels) not in (4, 5):
            raise ValueError(f"decoder_channels needs 4 or 5 widths, got {list(decoder_channels)}")
        self.arch = f"unet_efficientnet_{variant}"
        self.model_args = dict(out_channels=out_channels, decoder_channels=list(decoder_channels))
        self.encoder = efficientnet_lite(variant, pretrained)
        channels = CHANNELS[variant]
        skips = list(reversed(channels[:-1])) + [0]  # Lite0: 112, 40, 24, 16, then none at full size
        ins = [channels[-1]] + list(decoder_channels[:-1])
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
            self.backbone = efficientnet_lite("lite0", pretrained, out_indices=(4,), output_stride=16)
            self.head = segmentation.deeplabv3.DeepLabHead(CHANNELS["lite0"][-1], out_channels)
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
    "unet_efficientnet_lite1": functools.partial(EfficientNetUNet, variant="lite1"),
    "unet_efficientnet_lite2": functools.partial(EfficientNetUNet, variant="lite2"),
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
