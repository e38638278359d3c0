"""Finding image/mask pairs on disk, checking them, the car-id split, preprocessing and augmentation.

Preprocessing is plain functions (`image_to_tensor`, `load_mask`, `shrink_mask` here, `load_image` in
carseg/images.py) so that predict.py runs exactly the code training ran. Masks come from files, from
the rows of Kaggle's train_masks.csv (run-length encoded, read by carseg/rle.py) or from COCO shapes.
Decoding a full-size Carvana JPEG costs more than a training step of a small U-Net, so every sample is
decoded once into a `SampleStore` (RAM, and optionally a disk cache keyed by file identity and size)
and later epochs never touch the files.
"""
import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from carseg import distributed
from carseg.atomic import atomic_write, folder_problem, refuse_existing
from carseg.images import DECODE_ERRORS, IMAGE_EXTENSIONS, load_image, open_image
from carseg.labels import (BINARY_CLASSES, Shapes, is_multiclass, load_class_mask, read_class_names, read_coco,
                           read_coco_class_names)
from carseg.rle import RleRow, compare_mask_csv, read_mask_csv, write_mask_csv

log = logging.getLogger(__name__)

IMAGE_DIRS = ("train", "train_hq", "images")  # Kaggle layout first, then the plain one
MASK_DIRS = {"train": "train_masks", "train_hq": "train_masks", "images": "masks"}
COCO_FILE = "annotations.json"
COCO_IMAGE_DIRS = ("JPEGImages", "images")  # the Car Parts Dataset's layout, then the plain one
CLASSES_FILE = "classes.txt"  # beside images/ + masks/: the masks hold indices into this list
MASK_CSV = "train_masks.csv"  # Kaggle's run-length encoded masks, beside train/ in place of train_masks/

CACHE_VERSION = 2
HOW_TO_GET_DATA = """Get the Carvana training data (a Kaggle account that has accepted the competition rules):
  pip install kaggle        # and put your API token in ~/.kaggle/kaggle.json
  kaggle competitions download -c carvana-image-masking-challenge -f train.zip -p data/carvana
  kaggle competitions download -c carvana-image-masking-challenge -f train_masks.zip -p data/carvana
  (cd data/carvana && unzip -q train.zip && unzip -q train_masks.zip)
(Kaggle's train_masks.csv, the same masks run-length encoded, can stand in for train_masks.zip), or point
--data-dir (or $CARVANA_DIR) at a folder holding train/ + train_masks/ (or train_masks.csv) or images/ + masks/."""


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
    group: str    # what the split keeps together: by default the car id, the stem without its _NN view suffix


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
    """The samples with their `group` set by `group_by`; find_samples groups by car-id."""
    if group_by == "car-id":
        return samples
    groups = [group_of(s.name, group_by) for s in samples]
    unmatched = [s.name for s, group in zip(samples, groups) if group == s.name]
    if group_by != "none" and unmatched:
        log.warning("--group-by %r finds no group in %d of the %d names (e.g. %s): each of those is its own "
                    "group", group_by, len(unmatched), len(samples), unmatched[0])
    return [dataclasses.replace(s, group=group) for s, group in zip(samples, groups)]


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
    cars = sorted({s.group for s in samples})
    if len(cars) < 2:
        example = " (so DSC_2001 and DSC_2002 are one group, 'DSC')" if group_by == "car-id" else ""
        raise ValueError(f"need at least 2 cars to split train/validation by car, found {len(cars)}: the "
                         f"{len(samples)} images are grouped {grouping_rule(group_by)}{example}; use --group-by none to "
                         "split image by image, or a regular expression that finds each object's id in the name")
    rank = sorted(cars, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n_val = min(len(cars) - 1, max(1, round(len(cars) * val_fraction)))
    val_groups = set(rank[:n_val])
    return [s for s in samples if s.group not in val_groups], [s for s in samples if s.group in val_groups]


def describe_split(train, val, val_fraction: float, group_by: str = "car-id"):
    """(one log line on the split, [warnings]) for a split whose result differs from what was asked.

    Warns when the share of validation images is far from val_fraction (off by more than half of it,
    and by more than 5 points) or when one group holds more than half of all images.
    """
    total, achieved = len(train) + len(val), len(val) / (len(train) + len(val))
    sizes = Counter(s.group for s in list(train) + list(val))
    line = (f"split {grouping_rule(group_by)}: {len({s.group for s in train})} groups ({len(train)} images) "
            f"train, {len({s.group for s in val})} groups ({len(val)} images) validate: {achieved:.1%} of the "
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


# ---------------------------------------------------------------- preprocessing

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
        if is_multiclass(self.num_classes):
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
    elif is_multiclass(num_classes):
        mask = load_class_mask(sample.mask, num_classes)
    else:
        mask = load_mask(sample.mask)
    if (mask.shape[1], mask.shape[0]) != full_size:
        what = f"{sample.mask.source}: the mask of {sample.name}" if isinstance(sample.mask, Shapes) \
            else f"{sample.mask}: mask"
        raise ValueError(f"{what} is {mask.shape[1]}x{mask.shape[0]} but its image "
                         f"{sample.image.name} is {full_size[0]}x{full_size[1]}")
    if is_multiclass(num_classes):
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
        if item[1].max() == 0 or (item[1].min() == 255 and not is_multiclass(num_classes)):  # cheap pre-check on the small mask
            full = store.full_mask(len(store) - 1)
            if full.min() == full.max():
                where = sample.mask if isinstance(sample.mask, RleRow) else getattr(sample.mask, "source", sample.mask)
                log.warning("%s: mask of %s is all %s", where, sample.name,
                            "background" if full.min() == 0 else "car" if not is_multiclass(num_classes) else f"class {full.min()}")
    return store, problems


def prepare_store(samples, size, cache_dir="", where="", pairing_problems=(), num_classes=2):
    """load_samples, raising one DatasetError listing every problem (pairing problems included)."""
    store, problems = load_samples(samples, size, cache_dir, num_classes=num_classes)
    problems = list(pairing_problems) + problems
    if problems:
        raise DatasetError(problems, where)
    return store


# ---------------------------------------------------------------- the Dataset

class SegmentationDataset(torch.utils.data.Dataset):
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
        masks = masks.long() if is_multiclass(self.store.num_classes) else masks.float().div_(255.0).unsqueeze(0)
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

    The encoding and the CSV are carseg/rle.py's; these commands live here because they read a data
    folder's pairs (find_samples, load_mask), and carseg/ sits below dataset.py in the import order.
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
