"""U-Net (Ronneberger et al., 2015): a contracting encoder, a bottleneck and an expanding decoder
joined by skip connections. Padded 3x3 convolutions with BatchNorm, so the output has the input's
height and width for any size, odd ones included.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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


def conv_relu(in_channels, out_channels):
    """3x3 conv (with bias) -> ReLU: no BatchNorm, which at 4x the U-Net's pixel count cost more than the convs."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]


class RefineHead(nn.Module):
    """Logits at the input's own size from the U-Net's half-size answer and the full-size image.

    The U-Net's last features (squeezed to a few channels) and logits are upsampled and joined with
    one conv layer's view of the image; two more conv layers add a correction to the upsampled logits.
    Every layer here runs at 4x the U-Net's top-level pixel count, so it is kept narrow.
    """

    def __init__(self, in_channels, feature_channels, out_channels, channels):
        super().__init__()
        self.squeeze = nn.Conv2d(feature_channels, channels - out_channels, 1)  # at half size: cheap
        self.image = nn.Sequential(*conv_relu(in_channels, channels))
        self.fuse = nn.Sequential(*conv_relu(2 * channels, channels), *conv_relu(channels, channels),
                                  nn.Conv2d(channels, out_channels, 1))
        # Start as plain bilinear upsampling of the U-Net's logits; training learns the correction.
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, images, features, logits):
        coarse = torch.cat([logits, self.squeeze(features)], dim=1)
        coarse = F.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=False)
        correction = self.fuse(torch.cat([coarse, self.image(images)], dim=1))
        return coarse[:, :logits.shape[1]] + correction


class UNet(nn.Module):
    """U-Net returning per-pixel logits of shape (B, out_channels, H, W)."""

    def __init__(self, in_channels=3, out_channels=1, base_channels=64, depth=4, bilinear=False, space_to_depth=1,
                 refine_channels=0):
        super().__init__()
        if space_to_depth > 1 and refine_channels:
            raise ValueError("space_to_depth and refine_channels cannot be combined")
        self.model_args = dict(in_channels=in_channels, out_channels=out_channels,
                               base_channels=base_channels, depth=depth, bilinear=bilinear,
                               space_to_depth=space_to_depth, refine_channels=refine_channels)
        # refine_channels=C runs the U-Net on the 2x2-averaged input and draws the logits at the input's
        # own size with a C-channel RefineHead, which sees the image at that finer size.
        self.refine = RefineHead(in_channels, base_channels, out_channels, refine_channels) if refine_channels else None
        # space_to_depth=S folds each SxS block of input pixels into channels, runs the U-Net at 1/S
        # of the input size and unfolds S*S logits per position back to full size: the network sees
        # and draws detail finer than its own grid for the cost of a wider first and last layer.
        self.space_to_depth = space_to_depth
        in_channels, out_channels = in_channels * space_to_depth ** 2, out_channels * space_to_depth ** 2
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
        body_input = F.avg_pool2d(images, 2, ceil_mode=True) if self.refine is not None else images
        x = self.inc(self._fold(body_input))
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is not a skip
        for up in self.ups:
            x = up(x, skips.pop())
        if self.refine is not None:
            return self.refine(images, x, self.outc(x))
        return self._unfold(self.outc(x), images.shape[-2:])

    def _fold(self, images):
        s = self.space_to_depth
        if s == 1:
            return images
        pad_h, pad_w = -images.shape[-2] % s, -images.shape[-1] % s  # any input size, like the s=1 model
        if pad_h or pad_w:
            images = F.pad(images, [0, pad_w, 0, pad_h], mode="replicate")
        return F.pixel_unshuffle(images, s)

    def _unfold(self, logits, size):
        if self.space_to_depth == 1:
            return logits
        return F.pixel_shuffle(logits, self.space_to_depth)[..., :size[0], :size[1]]

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "UNet":
        """Rebuild the model a train.py checkpoint describes, with its weights (in fp32)."""
        model = cls(**checkpoint["model_args"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
        model.load_state_dict(state)
        return model


CHECKPOINT_FORMAT = 1


def load_checkpoint(path) -> dict:
    """Read a train.py checkpoint as plain data (weights_only: a pickle carrying code is refused)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist: train one with `python train.py` "
                                "or pass --checkpoint PATH")
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"checkpoint {path} cannot be loaded safely: {type(err).__name__}: {err}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != CHECKPOINT_FORMAT \
            or "model_args" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a train.py checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint
