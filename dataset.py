"""Finding image/mask pairs on disk, checking them, the car-id split, preprocessing and augmentation.

Preprocessing is plain functions (`load_image`, `image_to_tensor`, `load_mask`, `shrink_mask`) so
that predict.py runs exactly the code training ran. Masks come from files, from the rows of Kaggle's
train_masks.csv (run-length encoded, read by rle.py) or from COCO shapes. Decoding a full-size
Carvana JPEG costs more than a training step of a small U-Net, so every sample is decoded once into a
`SampleStore` (RAM, and optionally a disk cache keyed by file identity and size) and later epochs
never touch the files.
"""
import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import distributed
from atomic import atomic_write, folder_problem, refuse_existing
from labels import BINARY_CLASSES, Shapes, load_class_mask, read_class_names, read_coco, read_coco_class_names
from rle import RleRow, compare_mask_csv, read_mask_csv, write_mask_csv

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
IMAGE_DIRS = ("train", "train_hq", "images")  # Kaggle layout first, then the plain one
MASK_DIRS = {"train": "train_masks", "train_hq": "train_masks", "images": "masks"}
COCO_FILE = "annotations.json"
COCO_IMAGE_DIRS = ("JPEGImages", "images")  # the Car Parts Dataset's layout, then the plain one
CLASSES_FILE = "classes.txt"  # beside images/ + masks/: the masks hold indices into this list
MASK_CSV = "train_masks.csv"  # Kaggle's run-length encoded masks, beside train/ in place of train_masks/

MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs; a Carvana photo is 2.5 M pixels
CACHE_VERSION = 2
# What Pillow's decoders raise on corrupt files besides OSError (found by tests/test_fuzz.py).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)
HOW_TO_GET_DATA = """Get the Carvana training data (a Kaggle account that has accepted the competition rules):
  pip install kaggle        # and put your API token in ~/.kaggle/kaggle.json
  kaggle competitions download -c carvana-image-masking-challenge -f train.zip -p data/carvana
  kaggle competitions download -c carvana-image-masking-challenge -f train_masks.zip -p data/carvana
  (cd data/carvana && unzip -q train.zip && unzip -q train_masks.zip)
(Kaggle's train_masks.csv, the same masks run-length encoded, can stand in for train_masks.zip), or point
--data-dir (or $CARVANA_DIR) at a folder holding train/ + train_masks/ (or train_masks.csv) or images/ + masks/."""
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
JPEG_END = b"\xff\xd9"  # the end-of-image marker
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (0xC4 is DHT, 0xCC DAC, 0xC8 reserved)
HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive
# Two runs of bytes that differ in every bit, neither holding 0xFF (which would start a marker): put before
# the end marker of a JPEG that lacks it, they change its pixels if its last scan still needs data.
_JPEG_RUN = np.random.default_rng(0).integers(1, 255, 256, dtype=np.uint8)
JPEG_RUNS = (_JPEG_RUN.tobytes(), (255 - _JPEG_RUN).tobytes())
_warned_missing_end = set()  # resolved paths already warned about: a file read twice is warned about once


class MaskError(ValueError):
    """A mask whose meaning cannot be read unambiguously (the message names the file)."""


class DatasetError(ValueError):
    """One or more problems with the dataset on disk, all listed at once."""

    def __init__(self, problems, where=""):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) with the dataset{' in ' + str(where) if where else ''}:"
        super().__init__("\n  ".join([head] + self.problems))


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | Shapes | RleRow  # a mask file, a train_masks.csv row, or the shapes of a COCO data set
    name: str     # the image's stem, e.g. 0cdf5b5d0ce1_01
    car_id: str   # the stem without its _NN view suffix, e.g. 0cdf5b5d0ce1


def car_id_of(name: str) -> str:
    """`0cdf5b5d0ce1_07` -> `0cdf5b5d0ce1`; a name without a `_NN` suffix is its own group."""
    match = re.fullmatch(r"(.+)_(\d+)", name)
    return match.group(1) if match else name


def _image_files(folder: Path):
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]


def find_class_names(data_dir) -> list:
    """The classes a data set's masks index, background first: a COCO file's categories, classes.txt
    beside images/ + masks/, else BINARY_CLASSES (masks are car/background)."""
    data_dir = Path(data_dir)
    if (data_dir / COCO_FILE).is_file():
        return read_coco_class_names(data_dir / COCO_FILE)
    if (data_dir / CLASSES_FILE).is_file():
        return read_class_names(data_dir / CLASSES_FILE)
    return list(BINARY_CLASSES)


def _coco_image_dir(data_dir: Path) -> Path:
    found = next((data_dir / d for d in COCO_IMAGE_DIRS if (data_dir / d).is_dir()), None)
    if found is None:
        raise FileNotFoundError(f"{data_dir} has {COCO_FILE} but no image folder beside it "
                                f"({' or '.join(COCO_IMAGE_DIRS)})")
    return found


def find_samples(data_dir) -> tuple[list, list]:
    """Pair every image with its mask (a file, a train_masks.csv row, or its shapes in a COCO annotations.json);
    returns (samples, problems) with every pairing or annotation problem found.

    Kaggle's layout is train/ (or train_hq/) with train_masks/ GIFs, or with train_masks.csv in their place.
    When both hold masks the GIFs are used and the CSV is not read: the GIFs are Kaggle's originals
    (the CSV is encoded from them), and reading one source keeps what a run trained on unambiguous;
    `python dataset.py compare-csv` checks that the two agree.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {data_dir} does not exist.\n{HOW_TO_GET_DATA}")
    if (data_dir / COCO_FILE).is_file():
        items, _, problems = read_coco(data_dir / COCO_FILE, _coco_image_dir(data_dir))
        return [Sample(image, shapes, image.stem, car_id_of(image.stem)) for image, shapes in items], problems
    image_dir = next((data_dir / d for d in IMAGE_DIRS if (data_dir / d).is_dir()), None)
    if image_dir is None:
        raise FileNotFoundError(f"{data_dir} has neither train/ + train_masks/ (Kaggle layout) "
                                f"nor images/ + masks/.\n{HOW_TO_GET_DATA}")
    mask_dir, csv_path = data_dir / MASK_DIRS[image_dir.name], data_dir / MASK_CSV
    mask_files = _image_files(mask_dir) if mask_dir.is_dir() else []
    if image_dir.name != "images" and csv_path.is_file():
        if not mask_files:
            return _pair_with_rows(image_dir, csv_path)
        log.info("masks from %s; %s beside it is not read (the GIFs are the originals it was encoded from)",
                 mask_dir, csv_path.name)
    if not mask_dir.is_dir():
        also = f" (or {csv_path.name}, Kaggle's run-length encoded masks)" if image_dir.name != "images" else ""
        raise FileNotFoundError(f"{image_dir} has no mask folder beside it: expected {mask_dir}{also}")
    problems, masks = [], {}
    images = _images_by_name(image_dir, problems)
    for path in mask_files:
        name = path.stem[:-5] if path.stem.endswith("_mask") else path.stem
        if name in masks:
            problems.append(f"{path}: duplicate mask for '{name}' (also {masks[name].name})")
        masks.setdefault(name, path)
    problems += [f"{images[n]}: no mask (expected {mask_dir / (n + '_mask.gif')} or similar)"
                 for n in sorted(images.keys() - masks.keys())]
    problems += [f"{masks[n]}: mask without an image in {image_dir}" for n in sorted(masks.keys() - images.keys())]
    samples = [Sample(images[n], masks[n], n, car_id_of(n)) for n in sorted(images.keys() & masks.keys())]
    return samples, problems


def _images_by_name(image_dir: Path, problems: list) -> dict:
    """{stem: path} of the images in image_dir; duplicate stems and an empty folder go to `problems`."""
    images = {}
    for path in _image_files(image_dir):
        if path.stem in images:
            problems.append(f"{path}: duplicate image id '{path.stem}' (also {images[path.stem].name})")
        images.setdefault(path.stem, path)
    if not images:
        problems.append(f"{image_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _pair_with_rows(image_dir: Path, csv_path: Path) -> tuple[list, list]:
    """find_samples for train/ + train_masks.csv: each image pairs with the row naming its file name."""
    problems = []
    images = _images_by_name(image_dir, problems)
    rows, row_problems = read_mask_csv(csv_path)
    problems += row_problems
    names = {path.name for path in images.values()}
    problems += [f"{images[n]}: no mask (no row for {images[n].name} in {csv_path})"
                 for n in sorted(images) if images[n].name not in rows]
    problems += [f"{row}: row for {img}, which is not an image in {image_dir}"
                 for img, row in rows.items() if row is not None and img not in names]
    samples = [Sample(images[n], rows[images[n].name], n, car_id_of(n))
               for n in sorted(images) if rows.get(images[n].name) is not None]
    return samples, problems


def group_of(name: str, group_by: str = "car-id") -> str:
    """The split group of an image name (its stem).

    car-id: the name without a trailing _<number> (Kaggle's <car_id>_<NN>); none: the name itself;
    anything else is a regular expression searched in the name: its first group (else the whole
    match) names the group, and a name it does not match is its own group.
    """
    if group_by == "car-id":
        return car_id_of(name)
    if group_by == "none":
        return name
    match = re.search(group_by, name)
    group = None if match is None else match.group(1) if match.re.groups else match.group(0)
    return group or name  # no match, or an optional group that took no part: the name is its own group


def regroup(samples, group_by: str):
    """The samples with their group (`car_id`) set by `group_by`; find_samples groups by car-id."""
    if group_by == "car-id":
        return samples
    groups = [group_of(s.name, group_by) for s in samples]
    unmatched = [s.name for s, group in zip(samples, groups) if group == s.name]
    if group_by != "none" and unmatched:
        log.warning("--group-by %r finds no group in %d of the %d names (e.g. %s): each of those is its own "
                    "group", group_by, len(unmatched), len(samples), unmatched[0])
    return [dataclasses.replace(s, car_id=group) for s, group in zip(samples, groups)]


def grouping_rule(group_by: str) -> str:
    """How --group-by groups names, in words, for messages."""
    if group_by == "car-id":
        return "by car id (--group-by car-id: the name before a trailing _<number>)"
    if group_by == "none":
        return "image by image (--group-by none)"
    return f"by the regular expression --group-by {group_by!r}"


def split_by_car(samples, val_fraction: float, seed: int, group_by: str = "car-id"):
    """Deterministic (train, val) split with no car (group) on both sides; `group_by` only words the errors.

    Cars are ranked by a seeded hash of their id, not by their position in a listing, so the split
    does not depend on file order, and adding cars rarely moves an old car across the split.
    """
    cars = sorted({s.car_id for s in samples})
    if len(cars) < 2:
        example = " (so DSC_2001 and DSC_2002 are one group, 'DSC')" if group_by == "car-id" else ""
        raise ValueError(f"need at least 2 cars to split train/validation by car, found {len(cars)}: the "
                         f"{len(samples)} images are grouped {grouping_rule(group_by)}{example}; use --group-by none to "
                         "split image by image, or a regular expression that finds each object's id in the name")
    rank = sorted(cars, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n_val = min(len(cars) - 1, max(1, round(len(cars) * val_fraction)))
    val_cars = set(rank[:n_val])
    return [s for s in samples if s.car_id not in val_cars], [s for s in samples if s.car_id in val_cars]


def describe_split(train, val, val_fraction: float, group_by: str = "car-id"):
    """(one log line on the split, [warnings]) for a split whose result differs from what was asked.

    Warns when the share of validation images is far from val_fraction (off by more than half of it,
    and by more than 5 points) or when one group holds more than half of all images.
    """
    total, achieved = len(train) + len(val), len(val) / (len(train) + len(val))
    sizes = Counter(s.car_id for s in list(train) + list(val))
    line = (f"split {grouping_rule(group_by)}: {len({s.car_id for s in train})} groups ({len(train)} images) "
            f"train, {len({s.car_id for s in val})} groups ({len(val)} images) validate: {achieved:.1%} of the "
            f"images validate (--val-fraction {val_fraction})")
    warnings = []
    if abs(achieved - val_fraction) > max(0.05, val_fraction / 2):
        warnings.append(f"{achieved:.1%} of the images validate, not the {val_fraction:.1%} --val-fraction asks: "
                        f"the {len(sizes)} groups are too few or too uneven for it; images are grouped "
                        f"{grouping_rule(group_by)}")
    biggest, count = sizes.most_common(1)[0]
    if len(sizes) > 1 and count > total / 2:
        warnings.append(f"one group, {biggest!r}, holds {count} of the {total} images; images are grouped "
                        f"{grouping_rule(group_by)}: check that this is what you meant")
    return line, warnings


# ---------------------------------------------------------------- decoding and preprocessing

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
    name = getattr(path, "name", path)
    img = open_image(path)
    try:
        try:
            array, full_size = _decoded(img, size)
        except DECODE_ERRORS:
            whole = _jpeg_lacking_only_its_end(img, path)
            if whole is None:
                raise
            array, full_size = _decoded(whole, size)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name}: image too large ({err})")
    except DECODE_ERRORS as err:  # truncated or corrupt data shows up only when decoding
        raise ValueError(f"{name}: cannot decode: {err}")
    if size is not None and (array.shape[1], array.shape[0]) != tuple(size):
        array = cv2.resize(array, tuple(size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(array), full_size


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
    missing is checked instead: the file ends inside a scan's data, the scans present code the whole
    image (_jpeg_scans_complete), and its pixels need no byte past the end (_jpeg_needs_no_more_data).
    The check decodes at full scale, so a JPEG read small (draft) is accepted or refused alike.
    """
    if img.format != "JPEG":
        return None
    data = _file_bytes(path)
    if data.endswith(JPEG_END) or not _jpeg_scans_complete(data) or not _jpeg_needs_no_more_data(data):
        return None
    name = getattr(path, "name", path)
    key = str(Path(path).resolve()) if isinstance(path, (str, os.PathLike)) else None  # uploads: every time
    if key not in _warned_missing_end:
        log.warning("%s: the JPEG lacks its end marker (its last 2 bytes, FF D9) but holds every pixel: read as "
                    "it is (save it again to repair it)", name)
    if key is not None:
        _warned_missing_end.add(key)
    whole = io.BytesIO(data + JPEG_END)
    whole.name = name  # what load_image's messages call it
    return open_image(whole)


def _file_bytes(path) -> bytes:
    """The whole content of a path or of a binary file object (from its start)."""
    if isinstance(path, (str, os.PathLike)):
        return Path(path).read_bytes()
    path.seek(0)
    return path.read()


def _jpeg_scans_complete(data: bytes) -> bool:
    """True when a JPEG's bytes end inside a scan's entropy-coded data, every segment before it is whole, and
    the scans present code every DCT coefficient of every component to full precision, the last one in its
    last restart interval: whatever is missing is then the end of the last scan, not a later scan.

    Only Huffman-coded frames (baseline, extended, progressive) qualify: those are what the
    decoder check (_jpeg_needs_no_more_data) was tried on.
    """
    pos, frame, coded, interval = 2, None, {}, 0
    while True:
        while data[pos:pos + 2] == b"\xff\xff":  # fill bytes before a marker
            pos += 1
        if data[pos:pos + 1] != b"\xff" or pos + 4 > len(data):
            return False
        code, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if code in (0xD8, 0xD9) or length < 2 or len(segment) != length - 2:  # a second start, an end, a cut
            return False
        if code in SOF_MARKERS:
            frame = _jpeg_frame(segment) if code in HUFFMAN_FRAMES else None
            if frame is None:
                return False
            coded = {component: set() for component in frame[2]}
        elif code == 0xDD:  # DRI: a restart marker every `interval` MCUs from here on
            interval = int.from_bytes(segment[:2], "big")
        elif code == 0xDA:  # SOS: a scan header, then its entropy-coded data
            scan = _jpeg_scan(segment)
            if frame is None or scan is None or not set(scan[0]) <= coded.keys():
                return False
            components, first, last, low_bit = scan
            if low_bit == 0:  # coded to full precision (a progressive scan with low_bit > 0 is refined later)
                for component in components:
                    coded[component].update(range(first, last + 1))
            pos, restarts = _end_of_scan_data(data, pos + 2 + length)
            if pos is None:
                whole_image = all(len(coefficients) == 64 for coefficients in coded.values())
                last_interval = interval == 0 or restarts == math.ceil(_jpeg_mcus(frame, components) / interval) - 1
                return whole_image and last_interval
            continue
        pos += 2 + length


def _jpeg_frame(segment: bytes):
    """(width, height, {component id: (h, v) sampling}) from a frame header; None if it is short or its
    height comes later (a DNL marker)."""
    if len(segment) < 6 or len(segment) < 6 + 3 * segment[5]:
        return None
    height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
    sampling = {segment[6 + 3 * i]: (segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(segment[5])}
    return (width, height, sampling) if height and width and all(h and v for h, v in sampling.values()) else None


def _jpeg_scan(segment: bytes):
    """(component ids, first coefficient, last coefficient, successive-approximation low bit) of a scan header;
    None if it is short."""
    if not segment or len(segment) < 4 + 2 * segment[0]:
        return None
    n = segment[0]
    return [segment[1 + 2 * i] for i in range(n)], segment[1 + 2 * n], segment[2 + 2 * n], segment[3 + 2 * n] & 15


def _end_of_scan_data(data: bytes, pos: int):
    """(position of the marker after the entropy-coded data starting at pos, restart markers on the way);
    the position is None when the data runs to the end of the file."""
    restarts = 0
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None, restarts
        follower = data[pos + 1]
        if follower not in (0x00, 0xFF) and not 0xD0 <= follower <= 0xD7:
            return pos, restarts
        restarts += 0xD0 <= follower <= 0xD7
        pos += 1 if follower == 0xFF else 2  # FF 00 is a data byte 0xFF; FF FF is fill


def _jpeg_mcus(frame, components) -> int:
    """MCUs in a scan: an interleaved one covers the frame in MCUs of the largest sampling factors' blocks,
    a one-component one covers that component in 8x8 blocks."""
    width, height, sampling = frame
    h_max, v_max = max(h for h, _ in sampling.values()), max(v for _, v in sampling.values())
    if len(components) > 1:
        return math.ceil(width / (8 * h_max)) * math.ceil(height / (8 * v_max))
    h, v = sampling[components[0]]
    return math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)


def _jpeg_needs_no_more_data(data: bytes) -> bool:
    """True when the pixels decoded from `data` do not depend on what would follow it: decoded with the end
    marker right after it, and after either of two runs of bytes that differ in every bit (JPEG_RUNS),
    they come out identical. A scan cut short would decode those runs as its missing data and differ."""
    try:
        pixels = _pixels(data + JPEG_END)  # libjpeg pads a short scan with zero bits
        return all(np.array_equal(pixels, _pixels(data + run + JPEG_END)) for run in JPEG_RUNS)
    except DECODE_ERRORS:
        return False


def _pixels(data: bytes) -> np.ndarray:
    """The pixels of an encoded image as decoded, at full size and in its own mode."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.array(img)


def image_to_tensor(image: np.ndarray, normalization: dict | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1], then (x - mean) / std per channel if a
    normalization {"mean": [r, g, b], "std": [r, g, b]} other than the identity is given."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
    if normalization is None or (list(normalization["mean"]) == [0.0] * 3 and list(normalization["std"]) == [1.0] * 3):
        return tensor
    mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def load_mask(path) -> np.ndarray:
    """Decode a binary mask file to uint8 {0, 1} (H, W), read as a viewer displays it: bright is car.

    Palette masks are read through their palette, not by index (a palette listing white first reads
    as it looks; Kaggle's black-then-white GIFs read the same either way). An alpha channel is the
    mask when the colour is uniform (a cutout: opaque is car) and is ignored when it is uniform
    itself. What is displayed must then be one grey channel of 0/1 or 0/255 (1 or 255 is car);
    colour masks, masks whose colour and transparency both vary, and other grey levels are refused
    with a ValueError naming the file.
    """
    img = open_image(path)
    try:
        array = _displayed_mask(img, path)
    except MaskError:
        raise  # already names the file; Pillow's errors are wrapped below
    except DECODE_ERRORS as err:
        raise ValueError(f"{path}: cannot decode mask: {err}")
    if array.ndim == 3:
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise ValueError(f"{path}: mask is a colour image; expected one channel of 0/1 or 0/255")
        array = array[..., 0]
    # bincount: for uint8 levels several times faster than np.unique on a 2.5 M-pixel mask
    values = np.flatnonzero(np.bincount(array.ravel())) if array.dtype == np.uint8 else np.unique(array)
    if set(values.tolist()) <= {0, 1}:
        return array.astype(np.uint8)
    if set(values.tolist()) <= {0, 255}:
        return (array == 255).astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    raise ValueError(f"{path}: mask values must be 0/1 or 0/255, found {len(values)} values: {shown}")


def _displayed_mask(img: Image.Image, path) -> np.ndarray:
    """The values a viewer shows for a mask image: (H, W) grey levels, or (H, W, 3) colours to check."""
    if img.mode == "P" and "transparency" not in img.info:
        return _palette_colours(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if not (np.isfinite(values).all() and (values == np.round(values)).all()):
            raise MaskError(f"{path}: mask holds fractional or non-finite values; expected one channel of 0/1 "
                             "or 0/255")
        return values.astype(np.int64)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"))
        colour, alpha = rgba[..., :3], rgba[..., 3]
        if alpha.min() == alpha.max():
            return colour
        if (colour == colour[0, 0]).all():
            return alpha  # a cutout: the colour says nothing, transparency is the mask
        raise MaskError(f"{path}: mask has both varying colour and varying transparency, so which one is the "
                         "mask is ambiguous; save it as one channel of 0/255")
    return np.asarray(img.convert("L") if img.mode == "1" else img.convert("RGB") if img.mode != "L" else img)


def _palette_colours(img: Image.Image) -> np.ndarray:
    """A palette image's displayed grey levels (H, W), or its colours (H, W, 3) where a used entry is not grey.

    Looks up only the palette entries in use (a 256-entry table), 2-3x faster than converting a
    1918x1280 GIF to RGB.
    """
    indices = np.asarray(img)
    palette = np.zeros((256, 3), np.uint8)
    entries = np.frombuffer(bytes(img.getpalette() or []), np.uint8)[:768].reshape(-1, 3)
    palette[:len(entries)] = entries
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    if (palette[used] == palette[used][:, :1]).all():
        return palette[:, 0][indices]
    return palette[indices]


def shrink_mask(mask: np.ndarray, size) -> np.ndarray:
    """{0,1} full-size mask -> soft uint8 mask (0..255) at size=(w, h), by area averaging.

    A soft target keeps the boundary's sub-pixel position: a perfect prediction of it at 480x320,
    upsampled bilinearly before thresholding, scores Dice 0.9994-0.9995 at 1918x1280 on real masks;
    a nearest-neighbour small mask scores 0.993-0.997, depending on how it is upsampled.
    """
    small = cv2.resize(mask.astype(np.float32), tuple(size), interpolation=cv2.INTER_AREA)
    return np.rint(small * 255.0).astype(np.uint8)


# ---------------------------------------------------------------- the decoded-sample store

class SampleStore:
    """Decoded samples in RAM: small images, small masks, full-resolution masks.

    Binary (num_classes 2): soft small masks (0..255, area-averaged) and bit-packed full masks.
    Multi-class: class-index small masks (nearest) and uint8 class-index full masks (H, W).
    """

    def __init__(self, size, num_classes=2):
        self.samples, self.size, self.num_classes = [], tuple(size), num_classes
        self.images, self.masks, self.full_masks, self.full_sizes = [], [], [], []

    def __len__(self):
        return len(self.samples)

    def add(self, sample, image, mask, full_mask_bits, full_size):
        self.samples.append(sample)
        self.images.append(image)
        self.masks.append(mask)
        self.full_masks.append(full_mask_bits)
        self.full_sizes.append(tuple(full_size))

    def subset(self, indices) -> "SampleStore":
        """A store sharing this one's arrays for the samples at `indices`."""
        part = SampleStore(self.size, self.num_classes)
        for i in indices:
            part.add(self.samples[i], self.images[i], self.masks[i], self.full_masks[i], self.full_sizes[i])
        return part

    def full_mask(self, index) -> np.ndarray:
        """The full-resolution mask (H, W) of sample `index`: {0,1} (binary) or class indices, uint8."""
        if self.num_classes > 2:
            return self.full_masks[index]
        w, h = self.full_sizes[index]
        return np.unpackbits(self.full_masks[index], count=w * h).reshape(h, w)


def decode_sample(sample: Sample, size, num_classes=2):
    """Decode and check one pair; returns (image, small mask, full mask as stored, full size) (see SampleStore)."""
    image, full_size = load_image(sample.image, size)
    if isinstance(sample.mask, RleRow):  # decoded at the image's own size, as the file states it
        mask = sample.mask.decode(full_size)
    elif isinstance(sample.mask, Shapes):
        mask = sample.mask.rasterize()
    elif num_classes > 2:
        mask = load_class_mask(sample.mask, num_classes)
    else:
        mask = load_mask(sample.mask)
    if (mask.shape[1], mask.shape[0]) != full_size:
        what = f"{sample.mask.source}: the mask of {sample.name}" if isinstance(sample.mask, Shapes) \
            else f"{sample.mask}: mask"
        raise ValueError(f"{what} is {mask.shape[1]}x{mask.shape[0]} but its image "
                         f"{sample.image.name} is {full_size[0]}x{full_size[1]}")
    if num_classes > 2:
        return image, cv2.resize(mask, tuple(size), interpolation=cv2.INTER_NEAREST), mask, full_size
    return image, shrink_mask(mask, size), np.packbits(mask.ravel()), full_size


def _cache_path(cache_dir: Path, sample: Sample, size):
    ident = [CACHE_VERSION, size[0], size[1]]
    for path in (sample.image, sample.mask):
        if isinstance(path, Shapes):  # the shapes themselves are the mask's identity
            ident.append(hashlib.sha1(repr(path.shapes).encode()).hexdigest())
            continue
        if isinstance(path, RleRow):  # so is the row's text: an edited row misses, a touched or moved CSV hits
            ident.append(path.digest)
            continue
        st = os.stat(path)
        ident += [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    return cache_dir / (hashlib.sha1(repr(ident).encode()).hexdigest() + ".npz")


def _load_cached(path: Path):
    try:
        with np.load(path) as z:
            return z["image"], z["mask"], z["full_mask"], tuple(z["full_size"].tolist())
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a damaged cache entry is simply rebuilt from the source files


def _save_cached(path: Path, image, mask, full_mask, full_size):
    with atomic_write(path) as f:
        np.savez(f, image=image, mask=mask, full_mask=full_mask, full_size=np.array(full_size))


def _usable_cache(cache_dir):
    """The cache folder, created; None (RAM only, with a warning) when it cannot be written."""
    if not cache_dir:
        return None
    problem = folder_problem(cache_dir)
    if problem is None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = str(err)
    if problem is not None:
        log.warning("--cache-dir %s cannot be written (%s): keeping decoded samples in memory only", cache_dir, problem)
        return None
    return Path(cache_dir)


def _is_cached(path, item) -> bool:
    """Write a decoded sample to the cache; False (with a warning) when that fails."""
    try:
        _save_cached(path, *item)
    except OSError as err:
        log.warning("the sample cache cannot be written (%s): keeping decoded samples in memory only", err)
        return False
    return True


def load_samples(samples, size, cache_dir="", desc="decoding", num_classes=2) -> tuple:
    """Decode (or read from the cache) every sample; returns (store, problems), checking them all."""
    store, problems = SampleStore(size, num_classes), []
    cache = _usable_cache(cache_dir)
    # Under torchrun every process decodes; the first one alone draws the bar.
    for sample in tqdm(samples, desc=desc, unit="img", leave=False, dynamic_ncols=True,
                       disable=distributed.current().bars):
        try:
            path = _cache_path(cache, sample, size) if cache is not None else None
            item = _load_cached(path) if path is not None and path.exists() else None
            if item is None:
                item = decode_sample(sample, size, num_classes)
        except (ValueError, OSError) as err:
            problems.append(str(err))
            continue
        if path is not None and not _is_cached(path, item):
            cache = None  # a cache that cannot be written (full disk...) is dropped: the samples stay in RAM
        store.add(sample, *item)
        if item[1].max() == 0 or (item[1].min() == 255 and num_classes == 2):  # cheap pre-check on the small mask
            full = store.full_mask(len(store) - 1)
            if full.min() == full.max():
                where = sample.mask if isinstance(sample.mask, RleRow) else getattr(sample.mask, "source", sample.mask)
                log.warning("%s: mask of %s is all %s", where, sample.name,
                            "background" if full.min() == 0 else "car" if num_classes == 2 else f"class {full.min()}")
    return store, problems


def prepare_store(samples, size, cache_dir="", where="", pairing_problems=(), num_classes=2):
    """load_samples, raising one DatasetError listing every problem (pairing problems included)."""
    store, problems = load_samples(samples, size, cache_dir, num_classes=num_classes)
    problems = list(pairing_problems) + problems
    if problems:
        raise DatasetError(problems, where)
    return store


# ---------------------------------------------------------------- the Dataset

class CarvanaDataset(torch.utils.data.Dataset):
    """Items of a SampleStore as (image (3, H, W) float32, mask, index).

    The mask is (1, H, W) float32 in [0, 1] (soft) for a binary store, (H, W) int64 class indices
    for a multi-class one.

    Images are in [0, 1], then normalised with `normalization` (see image_to_tensor) when given.
    """

    def __init__(self, store: SampleStore, transform=None, normalization: dict | None = None):
        self.store, self.transform, self.normalization = store, transform, normalization

    def __len__(self):
        return len(self.store)

    def reseed(self, seed: int):
        """Reseed the augmentation, so that the draws that follow depend on `seed` alone (exact resume)."""
        if self.transform is not None:
            self.transform.set_random_seed(seed)

    def __getitem__(self, index):
        image, mask = self.store.images[index], self.store.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        masks = torch.from_numpy(np.ascontiguousarray(mask))
        masks = masks.long() if self.store.num_classes > 2 else masks.float().div_(255.0).unsqueeze(0)
        return image_to_tensor(np.ascontiguousarray(image), self.normalization), masks, index


# ---------------------------------------------------------------- Kaggle's train_masks.csv from and against mask files

def mask_files(samples) -> dict:
    """{image file name: mask file} of samples, as rle.write_mask_csv takes them (with load=load_mask);
    ValueError naming a sample whose mask is not a file (a train_masks.csv row, COCO shapes)."""
    for sample in samples:
        if not isinstance(sample.mask, (str, os.PathLike)):
            raise ValueError(f"{sample.name}: its mask is {type(sample.mask).__name__}, not a mask file")
    return {sample.image.name: sample.mask for sample in samples}


def compare_csv_with_folder(csv_path, data_dir) -> dict:
    """rle.compare_mask_csv of csv_path against data_dir's mask files (train_masks/); FileNotFoundError if it
    has none."""
    files = {s.image.name: s.mask for s in find_samples(data_dir)[0] if isinstance(s.mask, Path)}
    if not files:
        raise FileNotFoundError(f"{data_dir} has no mask files (train_masks/) to compare {csv_path} with")
    return compare_mask_csv(csv_path, files, load=load_mask)


def main(argv=None):
    """python dataset.py write-csv DATA_DIR OUT.csv | compare-csv CSV DATA_DIR (Kaggle's train_masks.csv).

    The encoding and the CSV are rle.py's; these commands live here because they read a data folder's
    pairs (find_samples, load_mask), and rle.py sits below dataset.py in the import order.
    """
    parser = argparse.ArgumentParser(description="Kaggle's train_masks.csv: write one from a data folder's mask "
                                                 "files, or check one against them.")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-csv", help="encode DATA_DIR's mask files (train_masks/) into OUT.csv")
    write.add_argument("data_dir")
    write.add_argument("out")
    write.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUT.csv (Kaggle's own train_masks.csv comes back only by download)")
    compare = commands.add_parser("compare-csv", help="compare CSV's rows with the RLE of DATA_DIR's mask files; "
                                                      "exit status 1 unless every row with a mask file agrees")
    compare.add_argument("csv")
    compare.add_argument("data_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "write-csv":
            refuse_existing(args.out, args.overwrite)  # before encoding thousands of masks
            samples, problems = find_samples(args.data_dir)
            if problems:
                raise DatasetError(problems, args.data_dir)
            print(write_mask_csv(mask_files(samples), args.out, load=load_mask))
            return
        report = compare_csv_with_folder(args.csv, args.data_dir)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(report, indent=1))
    agreed = report["compared"] and report["same_pixels"] == report["same_text"] == report["compared"]
    raise SystemExit(0 if agreed and not report["csv_problems"] else 1)


if __name__ == "__main__":
    main()
