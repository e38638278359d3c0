"""Training augmentation: mirroring (relabelling left/right parts), a mild warp, random crops, colour jitter.

Its own module so that inference (predict.py, serve.py) never imports albumentations: 0.6 s of
every start-up on the 2-core reference machine.
"""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import
import albumentations as A
import cv2
import numpy as np

from carseg.labels import flip_permutation, is_multiclass


class MirrorSwappingSides(A.HorizontalFlip):
    """Horizontal mirroring that also relabels the mask: `permutation[c]` is what class c becomes in
    the mirror image (a mirrored left door is a right door; see labels.flip_permutation)."""

    def __init__(self, permutation, p=0.5):
        super().__init__(p=p)
        self.permutation = np.asarray(permutation, dtype=np.uint8)

    def apply_to_mask(self, mask, **params):
        return self.permutation[super().apply_to_mask(mask, **params)]


# (scale range, shift as a share of the side, rotation in degrees) of the affine warp. light: the
# turntable's own jitter; strong: everyday photos, where the car fills anything from half the frame
# to more than all of it, and the camera is rarely level.
WARPS = {"light": ((0.95, 1.05), 0.02, 2), "strong": ((0.6, 1.2), 0.1, 6)}


def build_transform(strength: str, crop: tuple[int, int] | None = None, class_names=None):
    """Training augmentation: mirror (and warp, for light and strong), an optional random (width,
    height) crop, then colour jitter (and blur or noise, for strong); None for strength "none" without a crop.

    Binary masks are soft, so they are warped with bilinear interpolation too. With `class_names`
    (more than two: class-index masks), mirroring swaps every left/right class pair and masks are
    warped with nearest-neighbour interpolation.
    """
    geometry, color = [], []
    multiclass = class_names is not None and is_multiclass(class_names)
    if strength != "none":
        # the turntable views come in mirrored pairs; vertical flips never occur
        geometry = [MirrorSwappingSides(flip_permutation(class_names)) if multiclass else A.HorizontalFlip(p=0.5)]
        if strength in WARPS:
            scale, shift, turn = WARPS[strength]
            geometry.append(A.Affine(scale=scale, translate_percent=(-shift, shift), rotate=(-turn, turn),
                                     interpolation=cv2.INTER_LINEAR,
                                     mask_interpolation=cv2.INTER_NEAREST if multiclass else cv2.INTER_LINEAR,
                                     border_mode=cv2.BORDER_REFLECT_101, p=0.5 if strength == "light" else 0.8))
        color = [A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5)]
        if strength == "strong":  # phone photos: soft focus, motion, sensor noise
            color.append(A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 7)),
                                  A.GaussNoise(std_range=(0.02, 0.06))], p=0.3))
    # Convolutions do not care where a crop came from, and a smaller crop is a cheaper step (and a
    # cheaper color jitter, which therefore comes after it).
    crop = [A.RandomCrop(width=crop[0], height=crop[1])] if crop else []
    steps = geometry + crop + color
    return A.Compose(steps) if steps else None
