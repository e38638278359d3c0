"""A car cut out of its photo: alpha from the model's probabilities, backgrounds, the crop box and
overlays (images.encode writes them as PNG, WebP or JPEG).

Arrays are NumPy at the photo's full resolution, channels last: photos uint8 (H, W, 3) RGB,
probabilities float32 (H, W) in [0, 1], alpha uint8 (H, W) with 255 = car, 0 = background.
serve.py builds its answers from these functions; any script that writes cutouts can do the same:

    alpha = soft_alpha(prob, threshold)
    png = images.encode(composite(image, alpha, WHITE), "png")

Work that needs float temporaries runs over bands of STRIP_ROWS rows, so a cutout of a 40-megapixel
photo needs a few MB beyond its uint8 input and output, not gigabytes of float copies.
"""

import cv2
import numpy as np

EDGE_RAMP = 0.5     # soft edges: alpha goes 0 -> 255 as the probability crosses threshold -/+ EDGE_RAMP / 2
STRIP_ROWS = 256    # rows composited at a time
CROP_MARGIN = 0.03  # crop: this share of the car box's longer side is kept around it (at least 2 px)
TINT, TINT_STRENGTH = (0, 200, 80), 0.45  # overlay: predict.py's green
BLUR_SIDE = 320     # the blurred background is computed on the photo shrunk to this longer side...
BLUR_SIGMA = 6.0    # ...with a Gaussian of this many (shrunk) pixels: about 2 % of the photo's size
WHITE = (255, 255, 255)


def soft_alpha(prob: np.ndarray, threshold: float, opaque: np.ndarray | None = None) -> np.ndarray:
    """Anti-aliased alpha uint8 (H, W) from a car probability float32 (H, W).

    A linear ramp centred on `threshold`: 128 at the threshold (so alpha >= 128 is hard_alpha's car),
    0 below threshold - EDGE_RAMP / 2, 255 above threshold + EDGE_RAMP / 2. Only the few pixels where
    the upsampled probability crosses over are partly transparent; a confident interior is opaque.
    opaque: optional bool (H, W) set to 255 whatever the probability (a parts model's filled holes).
    """
    alpha = np.empty(prob.shape, np.uint8)
    for rows in _strips(prob.shape[0]):
        ramp = (prob[rows] - threshold) * (255.0 / EDGE_RAMP) + 128.0
        alpha[rows] = np.clip(np.floor(ramp), 0, 255)
    if opaque is not None:
        alpha[opaque] = 255
    return alpha


def hard_alpha(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Alpha uint8 (H, W), 255 where the car probability float32 (H, W) is above `threshold`, else 0."""
    return (prob > threshold).astype(np.uint8) * np.uint8(255)


def crop_box(alpha: np.ndarray, margin: float = CROP_MARGIN):
    """(x0, y0, x1, y1), exclusive ends, of the car (alpha >= 128) plus a margin, within the photo;
    None when no pixel is car."""
    car = alpha >= 128
    cols, rows = np.flatnonzero(car.any(0)), np.flatnonzero(car.any(1))
    if cols.size == 0:
        return None
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    pad = max(2, round(margin * max(x1 - x0, y1 - y0)))
    height, width = alpha.shape
    return int(max(0, x0 - pad)), int(max(0, y0 - pad)), int(min(width, x1 + pad)), int(min(height, y1 + pad))


def composite(image: np.ndarray, alpha: np.ndarray, background=None) -> np.ndarray:
    """The car of `image` uint8 (H, W, 3) over a background: uint8 (H, W, 4) RGBA when background is
    None (transparent), else uint8 (H, W, 3) RGB over an RGB colour tuple or an image (H, W, 3).

    Where alpha is partial the photo's colour still holds some of the old background, which shows as
    a halo on a new one: those pixels get an estimate of the car's own colour (estimated_foreground).
    Fully transparent pixels of an RGBA cutout are black, so nothing of the background is kept.
    """
    height = alpha.shape[0]
    out = np.empty(alpha.shape + (3 if background is not None else 4,), np.uint8)
    radius = max(2, round(max(alpha.shape) / 320))  # ~6 px on a 1918x1280 photo: the soft band's width
    for rows in _strips(height):
        fg = estimated_foreground(image, alpha, rows, radius)
        a = alpha[rows]
        if background is None:
            out[rows, :, :3] = np.where(a[..., None] > 0, fg, 0)
            out[rows, :, 3] = a
            continue
        weight = a[..., None].astype(np.float32) / 255.0
        under = background[rows] if isinstance(background, np.ndarray) else np.asarray(background, np.float32)
        out[rows] = np.rint(fg * weight + under * (1.0 - weight))
    return out


def estimated_foreground(image: np.ndarray, alpha: np.ndarray, rows: slice, radius: int) -> np.ndarray:
    """The car's colour uint8 (r, W, 3) on image rows `rows`: the photo where alpha is 0 or 255, and
    where it is partial the blur-fusion estimate of Germer et al. 2020 ("Fast multi-level foreground
    estimation"), one level: F = Fb + a (I - a Fb - (1 - a) Bb), with Fb and Bb the local means of the
    photo weighted by a and by 1 - a over a (2 radius + 1)^2 box. Works on the partial pixels' columns
    plus `radius` pixels around them, so a band's answer equals the whole photo's."""
    band = image[rows]
    partial = (alpha[rows] > 0) & (alpha[rows] < 255)
    cols = np.flatnonzero(partial.any(0))
    if cols.size == 0:
        return band
    top, bottom = max(0, rows.start - radius), min(alpha.shape[0], rows.stop + radius)
    left, right = max(0, cols[0] - radius), min(alpha.shape[1], cols[-1] + 1 + radius)
    a = alpha[top:bottom, left:right, None].astype(np.float32) / 255.0
    photo = image[top:bottom, left:right].astype(np.float32)
    box, eps = (2 * radius + 1, 2 * radius + 1), 1e-4
    weight = cv2.blur(a, box)[..., None]  # the box mean of 1 - a is 1 - this
    fg_sum, all_sum = cv2.blur(photo * a, box), cv2.blur(photo, box)
    fg = fg_sum / (weight + eps)
    bg = (all_sum - fg_sum) / (1.0 - weight + eps)
    estimate = np.clip(fg + a * (photo - a * fg - (1.0 - a) * bg), 0, 255)
    inside = estimate[rows.start - top:rows.start - top + band.shape[0], cols[0] - left:cols[-1] + 1 - left]
    out = band.copy()
    window = out[:, cols[0]:cols[-1] + 1]
    keep = partial[:, cols[0]:cols[-1] + 1]
    window[keep] = np.rint(inside[keep])
    return out


def blurred_background(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): the photo's background, strongly blurred, with the car left out of the blur.

    A normalised convolution (blur of photo x (1 - a), divided by the blur of 1 - a), so the car's
    colours do not smear into a glow around it; where the car covers the whole neighbourhood it
    falls back to the plain blur. Computed on a copy shrunk to BLUR_SIDE pixels: cheap at any size.
    """
    height, width = alpha.shape
    scale = min(1.0, BLUR_SIDE / max(height, width))
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    photo = cv2.resize(image, small, interpolation=cv2.INTER_AREA).astype(np.float32)
    keep = 1.0 - cv2.resize(alpha, small, interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255.0
    sigma = BLUR_SIGMA * scale * max(height, width) / BLUR_SIDE
    weight = cv2.GaussianBlur(keep, (0, 0), sigma)[..., None]
    plain = cv2.GaussianBlur(photo, (0, 0), sigma)
    normalised = cv2.GaussianBlur(photo * keep, (0, 0), sigma) / np.maximum(weight, 1e-3)
    mixed = np.where(weight > 0.05, normalised, plain)
    return cv2.resize(np.clip(mixed, 0, 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)


def tint(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The photo uint8 (H, W, 3) with the car tinted green in proportion to its alpha, uint8 (H, W, 3)."""
    out = np.empty_like(image)
    colour = np.asarray(TINT, np.float32)
    for rows in _strips(alpha.shape[0]):
        weight = alpha[rows, :, None].astype(np.float32) * (TINT_STRENGTH / 255.0)
        out[rows] = np.rint(image[rows] + (colour - image[rows]) * weight)
    return out


def _strips(height: int):
    """Row slices of at most STRIP_ROWS rows covering 0..height."""
    return [slice(top, min(height, top + STRIP_ROWS)) for top in range(0, height, STRIP_ROWS)]
