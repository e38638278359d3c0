"""Multi-class label sets and class-index masks: COCO polygons/RLE, class lists, mirrored classes, colours.

A class-index mask is uint8 (H, W); 0 is always the background, so at most 256 classes.

COCO rules (read_coco):
- Class indices: a category named like the background (`_background_`, `Background`; case-insensitive,
  underscores stripped) is index 0 and its annotations are ignored: pixels under no polygon are background
  anyway. The other categories get 1.. in category-id order and keep their COCO names.
- Overlap rule: instances are painted largest first, so where two overlap the *smaller* one keeps the pixels
  (a mirror or a light drawn over a door survives). Size is the rasterised pixel area that pycocotools
  computes from the RLE (`mask.area`), not the file's `area` field, which a tool may fill with the bbox area
  or leave out; equal areas paint in annotation-id order (the higher id wins). Shapes.shapes is stored
  already in paint order, so the order of the annotation list never matters. `iscrowd` is not special.
- Problems are collected, not raised, so that one error can list everything wrong with a file.
  Polygon points may sit up to EDGE_TOLERANCE pixels outside the image: COCO boundary points lie on the
  edge, and annotation tools let a click land a little past it (the Car Parts set has points 1.8 px out);
  pycocotools clips them to the image when rasterising.
"""
import colorsys
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

BACKGROUND = "background"
BINARY_CLASSES = [BACKGROUND, "car"]  # what a binary (car/background) mask indexes


def is_multiclass(classes) -> bool:
    """Whether a model of these classes (their names, or how many) is multi-class: one output channel
    per class (softmax, argmax) rather than one car channel (sigmoid, threshold). Decided here only."""
    return (classes if isinstance(classes, int) else len(classes)) > 2
EDGE_TOLERANCE = 2.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Sasha Trubetskoy's 20 distinct colours ("List of 20 Simple, Distinct Colors", 2017), strongest first:
# in the Car Parts order no two parts share a hue family (Kelly's list gave the back-left door and the
# hood two oranges).
DISTINCT_COLOURS = ["E6194B", "3CB44B", "FFE119", "4363D8", "F58231", "911EB4", "42D4F4", "F032E6", "BFEF45",
                    "FABED4", "469990", "DCBEFF", "9A6324", "FFFAC8", "800000", "AAFFC3", "808000", "FFD8B1",
                    "000075", "A9A9A9"]


@dataclass(frozen=True)
class Shapes:
    """The annotated shapes of one image, as plain hashable data (a Sample's mask source for COCO data)."""
    source: Path    # the annotations.json they come from
    width: int      # the image size the annotation file states
    height: int
    shapes: tuple   # ((class_index, segmentation_json_str), ...) in paint order, largest first

    def rasterize(self) -> np.ndarray:
        """uint8 (height, width) class-index mask; later shapes overwrite earlier ones."""
        mask = np.zeros((self.height, self.width), np.uint8)
        for class_index, segmentation in self.shapes:
            rle = _to_rle(json.loads(segmentation), self.height, self.width)
            mask[_decode(rle).astype(bool)] = class_index
        return mask


def _to_rle(segmentation, height: int, width: int) -> dict:
    """One pycocotools RLE for a (checked) polygon list or an RLE dict, compressed or not."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode()}


def _decode(rle: dict) -> np.ndarray:
    """uint8 (H, W) {0,1} mask of one RLE, without pycocotools' NumPy 2 DeprecationWarning on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def _is_background(name: str) -> bool:
    return str(name).lower().replace("_", "").strip() == BACKGROUND


def _read_categories(categories: list, where: str, problems: list) -> tuple[list[str], dict]:
    """-> (class_names, category id -> class index)."""
    class_names, index_of = [BACKGROUND], {}
    valid = [c for c in categories if isinstance(c.get("id"), int) and isinstance(c.get("name"), str)]
    for cat in categories:
        if cat not in valid:
            problems.append(f"{where}: category {cat!r} needs an integer id and a name")
    for cat in sorted(valid, key=lambda c: c["id"]):
        if cat["id"] in index_of or cat["name"] in class_names:
            problems.append(f"{where}: category id {cat['id']} ({cat['name']!r}): duplicate id or name")
        elif _is_background(cat["name"]):
            index_of[cat["id"]] = 0
        else:
            index_of[cat["id"]] = len(class_names)
            class_names.append(cat["name"])
    return class_names, index_of


def _image_problem(image: dict, image_dir: Path) -> str | None:
    """What is wrong with one `images` entry (name, size, file on disk), or None."""
    name, width, height = image.get("file_name"), image.get("width"), image.get("height")
    if not isinstance(name, str) or not name or ".." in PurePosixPath(name).parts or Path(name).is_absolute():
        return f"file_name {name!r} must be a relative path inside {image_dir}"
    if not all(isinstance(v, int) and v > 0 for v in (width, height)):
        return f"width/height {width!r}/{height!r} must be positive integers"
    path = image_dir / name
    if not path.is_file():
        return f"file {name!r} is missing in {image_dir}"
    try:
        with Image.open(path) as img:   # reads the header only
            size = img.size
    except (OSError, UnidentifiedImageError) as err:
        return f"file {name!r} is unreadable ({err})"
    return None if size == (width, height) else f"file {name!r} is {size[0]}x{size[1]}, listed {width}x{height}"


def _read_images(images: list, image_dir: Path, where: str, problems: list) -> dict:
    """-> image id -> (path, width, height) for every usable image; also reports unlisted files."""
    found, names, seen_ids, seen_names = {}, set(), set(), set()
    for image in images:
        image_id, name = image.get("id"), image.get("file_name")
        duplicate = image_id in seen_ids or name in seen_names
        seen_ids.add(image_id)
        seen_names.add(name)
        if isinstance(name, str):   # a listed file is not "unlisted", even if its entry has a problem
            names.add(PurePosixPath(name).as_posix())
        problem = "duplicate image id or file_name" if duplicate else _image_problem(image, image_dir)
        if problem:
            problems.append(f"{where}: image id {image_id} ({name!r}): {problem}")
            continue
        found[image_id] = (image_dir / name, image["width"], image["height"])
    for path in sorted(image_dir.rglob("*")):
        relative = path.relative_to(image_dir).as_posix()
        if path.suffix.lower() in IMAGE_SUFFIXES and relative not in names and path.is_file():
            problems.append(f"{where}: image file {relative!r} in {image_dir} is not listed")
    return found


def _segmentation_problem(segmentation, width: int, height: int) -> str | None:
    """What is wrong with one polygon list or RLE dict for a width x height image, or None."""
    if isinstance(segmentation, dict):
        counts = segmentation.get("counts")
        if segmentation.get("size") != [height, width]:
            return f"RLE size {segmentation.get('size')} differs from the image's [{height}, {width}]"
        if isinstance(counts, list):
            ok = all(isinstance(c, int) and c >= 0 for c in counts) and sum(counts) == height * width
            return None if ok else f"uncompressed RLE counts must be non-negative and sum to {height * width}"
        try:
            _decode(_to_rle(segmentation, height, width))
        except (ValueError, AttributeError, TypeError) as err:
            return f"RLE counts are not a valid compressed RLE ({err})"
        return None
    if not isinstance(segmentation, list) or not segmentation:
        return "segmentation must be a non-empty list of polygons or an RLE dict"
    for polygon in segmentation:
        if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                    for v in polygon):
            return "a polygon must be a flat list of numbers [x1, y1, x2, y2, ...]"
        if len(polygon) % 2 or len(polygon) < 6:
            return f"a polygon has {len(polygon)} coordinates; needs an even number, at least 3 points"
        xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
        outside = max(-xs.min(), -ys.min(), xs.max() - width, ys.max() - height)
        if outside > EDGE_TOLERANCE:
            return f"a polygon lies {outside:.1f} px outside the {width}x{height} image"
    return None


def _paint_lists(coco: dict, images: dict, index_of: dict, where: str, problems: list) -> dict:
    """-> image id -> [(-area, annotation id, class index, segmentation json)] for the usable annotations."""
    listed_ids = {image.get("id") for image in coco["images"]}
    painted = {image_id: [] for image_id in images}
    for ann in coco["annotations"]:
        ann_id, image_id, cat_id = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        unknown = [f"{key} {value!r}" for key, value, known in
                   (("image_id", image_id, listed_ids), ("category_id", cat_id, index_of)) if value not in known]
        if unknown or not isinstance(ann_id, int):
            problems.append(f"{where}: annotation id {ann_id!r}: " +
                            (f"unknown {' and '.join(unknown)}" if unknown else "needs an integer id"))
            continue
        if image_id not in images or index_of[cat_id] == 0:
            continue   # the image is already reported; background shapes paint nothing
        _, width, height = images[image_id]
        segmentation = ann.get("segmentation")
        problem = _segmentation_problem(segmentation, width, height)
        if problem:
            problems.append(f"{where}: annotation id {ann_id} (image id {image_id}): {problem}")
            continue
        area = int(mask_utils.area(_to_rle(segmentation, height, width)))
        painted[image_id].append((-area, ann_id, index_of[cat_id], json.dumps(segmentation)))
    return painted


def _load_coco(annotations: Path) -> dict:
    """The parsed file; ValueError at once if it is not JSON or lacks lists of images/annotations/categories."""
    try:
        coco = json.loads(annotations.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{annotations}: unreadable COCO annotations ({err})") from err
    keys = ("images", "annotations", "categories")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) and
                                             all(isinstance(entry, dict) for entry in coco[k]) for k in keys):
        raise ValueError(f"{annotations}: not COCO: needs lists of objects 'images', 'annotations', 'categories'")
    return coco


def read_coco_class_names(annotations: Path) -> list[str]:
    """read_coco's class_names alone, from the categories: no image is opened and no shape rasterised.

    Problems with the categories are left to read_coco, which reports them with everything else.
    """
    annotations = Path(annotations)
    return _read_categories(_load_coco(annotations)["categories"], str(annotations), [])[0]


def read_coco(annotations: Path, image_dir: Path) -> tuple[list, list[str], list[str]]:
    """-> (items, class_names, problems): items are (image_path, Shapes) sorted by file name.

    class_names[0] is BACKGROUND. problems lists everything wrong, each naming the file and the image or
    annotation id. ValueError at once if the file is not JSON or lacks images/annotations/categories.
    """
    annotations, image_dir = Path(annotations), Path(image_dir)
    coco, problems = _load_coco(annotations), []
    class_names, index_of = _read_categories(coco["categories"], str(annotations), problems)
    images = _read_images(coco["images"], image_dir, str(annotations), problems)
    painted = _paint_lists(coco, images, index_of, str(annotations), problems)
    items = [(path, Shapes(annotations, width, height,   # sorted: largest first, ties by annotation id
                           tuple((cls, seg) for _, _, cls, seg in sorted(painted[image_id]))))
             for image_id, (path, width, height) in images.items()]
    return sorted(items, key=lambda item: item[0].relative_to(image_dir).as_posix()), class_names, problems


def read_class_names(path: Path) -> list[str]:
    """classes.txt: one name a line, the first the background; blank lines and '#' comments ignored.

    ValueError naming the file if it holds fewer than 2 names or a name twice.
    """
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    names = [line for line in lines if line and not line.startswith("#")]
    if len(names) < 2:
        raise ValueError(f"{path}: needs the background and at least one class, found {names}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate class names {duplicates}")
    return names


def load_class_mask(path, num_classes: int) -> np.ndarray:
    """A single-channel class-index image (mode 1, L, P or I;16/I) -> uint8 (H, W) class indices.

    For mode P the palette *indices* are the classes; the colours are ignored. ValueError naming the file
    for colour images, values >= num_classes and unreadable files; FileNotFoundError if it is missing.
    """
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256 (uint8 masks), got {num_classes}")
    try:
        with Image.open(path) as img:
            img.load()
            mode, values = img.mode, np.array(img)
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{path}: unreadable mask ({err})") from err
    if mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L") or values.ndim != 2:
        raise ValueError(f"{path}: mode {mode} is not a single-channel class-index mask "
                         "(save class indices as mode L or P, not colours)")
    bad, counts = np.unique(values[(values < 0) | (values >= num_classes)], return_counts=True)
    if bad.size:
        listed = ", ".join(f"{v} ({n} px)" for v, n in zip(bad[:10].tolist(), counts[:10].tolist()))
        raise ValueError(f"{path}: values {listed} are not classes 0..{num_classes - 1} "
                         f"({counts.sum()} pixels in all)")
    return values.astype(np.uint8)


def _mirror_name(name: str) -> str:
    """The name with every 'left' token made 'right' and back, keeping the token's case style."""
    swap = {"left": "right", "right": "left"}

    def mirror(token: str) -> str:
        other = swap.get(token.lower())
        if other is None:
            return token
        return other.upper() if token.isupper() else other.title() if token[0].isupper() else other
    return "".join(mirror(token) for token in re.split(r"([_\- ])", name))


def flip_permutation(class_names) -> np.ndarray:
    """int64 (C,) perm such that a horizontally mirrored mask is perm[mask[:, ::-1]].

    ValueError naming the class if a left/right class has no partner, or if names repeat.
    """
    index = {name: i for i, name in enumerate(class_names)}
    if len(index) != len(class_names):
        raise ValueError(f"duplicate class names in {list(class_names)}")
    perm = np.arange(len(class_names), dtype=np.int64)
    for i, name in enumerate(class_names):
        mirrored = _mirror_name(name)
        if mirrored not in index:
            raise ValueError(f"class {name!r} has no mirrored partner {mirrored!r}: a flipped {name} "
                             "would keep the wrong side")
        perm[i] = index[mirrored]
    return perm


def palette(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3) distinct colours: black background, DISTINCT_COLOURS, then an HSV spread."""
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256, got {num_classes}")
    colours = [(0, 0, 0)] + [tuple(bytes.fromhex(c)) for c in DISTINCT_COLOURS]
    for i in range(num_classes - len(colours)):
        # Golden-ratio hue steps never repeat; cycling value and saturation separates near hues further.
        hue = (i * 0.618033988749895) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, 0.55 + 0.45 * (i % 2), 0.6 + 0.2 * (i % 3))
        colours.append(tuple(round(255 * c) for c in rgb))
    return np.array(colours[:num_classes], dtype=np.uint8)


def car_mask(labels: np.ndarray) -> np.ndarray:
    """A car-parts class map (H, W) -> uint8 0/255 mask of the whole car: every non-background pixel,
    with the holes inside each outer outline filled.

    Part classes need not cover a car (the Car Parts Dataset has no roof, fender or side-panel class),
    so the union alone has holes between the parts; filling each region's outer contour closes the
    ones surrounded by parts. Gaps open to the background stay background.
    """
    union = (labels > 0).astype(np.uint8) * 255
    contours, _ = cv2.findContours(union, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.drawContours(union, contours, -1, 255, thickness=cv2.FILLED)
