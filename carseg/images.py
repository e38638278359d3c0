"""Photos in and out: decoding any image file upright as RGB (small, fast, for the model), and encoding
masks, cutouts and overlays as PNG, JPEG or WebP.

Decoding is shared by training (dataset.py), prediction (inference.Predictor) and the server (uploads
as file objects), so each sees a photo exactly as the others do. Errors are ValueErrors naming the
file and what is wrong with it.
"""
import io
import logging
import os
import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from carseg import jpeg

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs; a Carvana photo is 2.5 M pixels
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# What Pillow's decoders raise on corrupt files besides OSError (found by tests/test_fuzz.py).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)
_warned_missing_end = set()  # resolved paths already warned about: a file read twice is warned about once


def open_image(path) -> Image.Image:
    """Open an image lazily: a path, or a binary file object (serve.py's uploads, as io.BytesIO, named
    by their `name` attribute if they have one). Errors are ValueErrors naming it and the reason."""
    name = getattr(path, "name", path)
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{name}: empty file (0 bytes)")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name}: image too large ({err}); limit is {MAX_IMAGE_PIXELS} pixels")
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file (or a format Pillow cannot read)")
    except OSError as err:
        raise ValueError(f"{name}: cannot read: {err}{_riff_shortfall(path)}")
    except DECODE_ERRORS as err:  # Pillow's parsers raise these too on corrupt headers
        raise ValueError(f"{name}: corrupt image header: {err}")
    # Pillow only warns between 1x and 2x its limit; refuse from 1x, before any pixel is decoded.
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name}: image too large ({img.width}x{img.height} pixels); "
                         f"limit is {MAX_IMAGE_PIXELS} pixels")
    return img


def _riff_shortfall(path) -> str:
    """' (cut short: N of its M bytes)' for a RIFF file (WebP) shorter than its header says, else ''.

    A WebP has no end marker: its last bytes are image data, so any missing byte is missing pixels
    (libwebp refuses the file; Pillow says only "could not create decoder object").
    """
    try:
        data = _file_bytes(path)
    except OSError:  # unreadable: open_image's message says why
        return ""
    declared = 8 + int.from_bytes(data[4:8], "little")
    return f" (cut short: {len(data):,} of its {declared:,} bytes)" if data[:4] == b"RIFF" and len(data) < declared \
        else ""


def _oriented_size(img: Image.Image):
    """(width, height) as displayed, after the EXIF orientation is applied."""
    w, h = img.size
    orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_8_bit(img: Image.Image) -> Image.Image:
    """A one-channel image of integer (I;16, I) or float (F) pixels -> mode L, by the one reading of its range
    that is unambiguous; ValueError giving the range found for any other.

    Integers 0-255 are 8-bit levels as they are (a 16-bit container may hold 8-bit values), up to 65535
    16-bit levels; floats 0-1 are a unit range, and whole-number floats up to 255 are 8-bit levels.
    Negative, non-finite and other values (HDR radiance such as 0-4.7) have no single 8-bit meaning
    and are refused.
    """
    array = np.asarray(img, dtype=np.float64)
    is_float = img.mode == "F"
    if not np.isfinite(array).all():
        raise ValueError("pixel values include NaN or infinity")
    low, high = array.min(), array.max()
    if low >= 0 and is_float and high <= 1:
        scale = 255.0
    elif low >= 0 and high <= 255 and (not is_float or (array == np.round(array)).all()):
        scale = 1.0
    elif low >= 0 and not is_float and high <= 65535:
        scale = 255.0 / 65535.0
    else:
        expected = "0-1, or whole numbers 0-255" if is_float else "0-255 or 0-65535"
        raise ValueError(f"{'float' if is_float else 'integer'} pixel values from {low:g} to {high:g} have no "
                         f"unambiguous 8-bit reading (expected {expected})")
    return Image.fromarray(np.rint(array * scale).clip(0, 255).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency over white (the studio background), 16-bit and float scaled to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8_bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path, size=None):
    """Decode an image (a path or a binary file object, see open_image) upright as RGB uint8 (H, W, 3);
    with size=(w, h), decoded small and resized.

    Returns (array, full_size) where full_size is the upright (width, height) of the file. JPEGs are
    decoded at a reduced DCT scale where that stays at or above `size` and divides the stored size
    exactly (a 1918x1280 Carvana photo decodes at 1/2 scale to 959x640 in a few ms, instead of 25 ms
    for the full image, and is then area-averaged to `size`). A JPEG that lacks only its end marker
    is read, with a warning (see _jpeg_lacking_only_its_end); a cut one is refused.
    """
    array, full_size = _decode(path, size)
    if size is not None and (array.shape[1], array.shape[0]) != tuple(size):
        array = cv2.resize(array, tuple(size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(array), full_size


def load_image_sizes(path, sizes):
    """One decode, several sizes: ([uint8 (h, w, 3) per (w, h) in sizes], full (width, height)).

    Each array is what load_image(path, size) gives where the reduced JPEG scale that covers every
    size is the one that size alone picks (a 1918x1280 photo for 480x320 and 384x384: 1/2 for both);
    otherwise the finer scale, then area-averaged to each size. Errors as load_image.
    """
    cover = (max(w for w, _ in sizes), max(h for _, h in sizes))
    array, full_size = _decode(path, cover)
    resized = [array if (array.shape[1], array.shape[0]) == tuple(size)
               else cv2.resize(array, tuple(size), interpolation=cv2.INTER_AREA) for size in sizes]
    return [np.ascontiguousarray(a) for a in resized], full_size


def _decode(path, size):
    """(upright RGB array at a reduced JPEG scale covering size, upright full size), or ValueError naming the file."""
    name = getattr(path, "name", path)
    img = open_image(path)
    try:
        try:
            return _decoded(img, size)
        except DECODE_ERRORS:
            whole = _jpeg_lacking_only_its_end(img, path)
            if whole is None:
                raise
            return _decoded(whole, size)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name}: image too large ({err})")
    except DECODE_ERRORS as err:  # truncated or corrupt data shows up only when decoding
        raise ValueError(f"{name}: cannot decode: {err}")


def _decoded(img: Image.Image, size):
    """(upright RGB array, upright full size) of an opened image; a JPEG at the DCT scale load_image picks."""
    full_size = _oriented_size(img)
    if size is not None and img.format in ("JPEG", "MPO"):  # MPO: the multi-picture JPEG of phones and cameras
        swap = full_size != img.size
        w, h = (size[1], size[0]) if swap else size
        # Only a scale that divides the stored size: libjpeg rounds a partial last block up to a
        # whole pixel, so 1918 columns at 1/4 give 480 pixels covering 1920, and the image would
        # slide against its area-averaged mask by up to 2 full-size pixels at the far edge.
        scale = max([s for s in (2, 4, 8) if img.size[0] % s == 0 and img.size[1] % s == 0
                     and img.size[0] // s >= w and img.size[1] // s >= h], default=1)
        img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
    img = _to_rgb(ImageOps.exif_transpose(img))
    return np.array(img), full_size  # a writable copy: torch.from_numpy warns on read-only arrays


# ---------------------------------------------------------------- JPEGs that lack only their end marker

def _jpeg_lacking_only_its_end(img: Image.Image, path):
    """A JPEG that Pillow refused, reopened with its end marker (FF D9) restored when that marker is all
    it lacks, with a warning once per file; None for any other file, a really cut one included.

    Such a file holds every pixel (browsers show it; compare python-pillow/Pillow#4215). Pillow's
    LOAD_TRUNCATED_IMAGES would read it too, but it would also fill a cut photo with grey, so what is
    missing is checked instead (carseg/jpeg.py).
    """
    if img.format != "JPEG":
        return None
    data = _file_bytes(path)
    if not jpeg.lacks_only_its_end(data, _pixels):
        return None
    name = getattr(path, "name", path)
    key = str(Path(path).resolve()) if isinstance(path, (str, os.PathLike)) else None  # uploads: every time
    if key not in _warned_missing_end:
        log.warning("%s: the JPEG lacks its end marker (its last 2 bytes, FF D9) but holds every pixel: read as "
                    "it is (save it again to repair it)", name)
    if key is not None:
        _warned_missing_end.add(key)
    whole = io.BytesIO(data + jpeg.JPEG_END)
    whole.name = name  # what load_image's messages call it
    return open_image(whole)


def _file_bytes(path) -> bytes:
    """The whole content of a path or of a binary file object (from its start)."""
    if isinstance(path, (str, os.PathLike)):
        return Path(path).read_bytes()
    path.seek(0)
    return path.read()


def _file_bytes(path) -> bytes:
    """The whole content of a path or of a binary file object (from its start)."""
    if isinstance(path, (str, os.PathLike)):
        return Path(path).read_bytes()
    path.seek(0)
    return path.read()


def _pixels(data: bytes) -> np.ndarray:
    """The pixels of an encoded image as decoded, at full size and in its own mode; ValueError if it cannot be."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.array(img)
    except DECODE_ERRORS as err:
        raise ValueError(str(err)) from None


# ---------------------------------------------------------------- encoding

MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}  # what encode writes
JPEG_QUALITY = 95  # OpenCV's default, what predict.py's overlays have always been written at
WEBP_QUALITY = 90


def encode(array: np.ndarray, fmt: str, colours: np.ndarray | None = None, text: dict | None = None) -> bytes:
    """File bytes of uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA in fmt "png", "jpeg" or "webp".

    With colours (C, 3) uint8, a 2-D array is class indices, saved as a palette PNG whose values stay
    the indices. PNG is written at zlib level 1: masks and class maps compress well anyway, and Pillow
    at level 1 wrote a full-size Carvana mask in 14 ms and a cutout in 86 ms, against OpenCV's 33 and
    139 ms (same pixels). A grey mask stays lossless in WebP too. Raises ValueError for what the
    format cannot hold (JPEG with alpha, a palette outside PNG) or an unknown format. text: PNG only,
    {key: value} stored as tEXt chunks before the pixels (png_text reads them back).
    """
    if fmt not in ("png", "jpeg", "webp"):
        raise ValueError(f"unknown image format {fmt!r}: png, jpeg or webp")
    if colours is not None and (fmt != "png" or array.ndim != 2):
        raise ValueError(f"a palette image of class indices is a 2-D array written as png, not {fmt}")
    if fmt == "jpeg" and array.ndim == 3 and array.shape[2] == 4:
        raise ValueError("jpeg has no alpha channel; write png or webp, or composite over a background first")
    image = Image.fromarray(array)
    if colours is not None:
        image.putpalette(np.asarray(colours, np.uint8).tobytes())  # an "L" image given a palette becomes "P"
    buffer = io.BytesIO()
    if fmt == "png":
        info = None
        if text:
            info = PngImagePlugin.PngInfo()
            for key, value in text.items():
                info.add_text(key, value)
        image.save(buffer, format="PNG", compress_level=1, pnginfo=info)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    elif array.ndim == 2:  # lossless WebP; quality is then the compression effort
        image.save(buffer, format="WEBP", lossless=True, quality=20, method=1)
    else:
        image.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=2)
    return buffer.getvalue()


def png_text(path) -> dict:
    """The tEXt chunks before the pixels of a PNG file ({} for none, or for another format)."""
    with Image.open(path) as image:
        return dict(getattr(image, "text", {}) or {}) if image.format == "PNG" else {}
