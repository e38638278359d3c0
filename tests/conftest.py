"""Shared fixtures: tiny synthetic Carvana-like datasets written with PIL, a tiny TrainConfig, real-data paths."""
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not go to the network

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the project is flat scripts, not a package
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # the lab instruments (bench.py, loadtest.py) under test

from config import TrainConfig  # noqa: E402

# One thread: the tiny models here gain nothing from more, and on a busy 2-core machine OpenMP's
# spinning threads made a 64x48 training step ~200x slower (1.4 s instead of 7 ms).
torch.set_num_threads(1)

# Fake car ids: 12 lowercase hex characters, like Kaggle's, but not real Carvana ids.
FAKE_CARS = ["aaaaaaaaaa01", "aaaaaaaaaa02", "aaaaaaaaaa03", "aaaaaaaaaa04"]
PLAIN_CARS = ["bbbbbbbbbb01", "bbbbbbbbbb02"]
VIEWS = 3
IMAGE_SIZE = (96, 64)   # (width, height) of the synthetic "photos"
MODEL_SIZE = (64, 48)   # (width, height) the tiny model sees


def car_picture(car_index: int, view: int, size=IMAGE_SIZE, seed: int = 0):
    """An RGB uint8 photo with a drawn ellipse "car", and its {0,1} mask (identical geometry)."""
    w, h = size
    rng = np.random.default_rng(1000 * car_index + 10 * view + seed)
    # Ellipse box varies with car and view, so masks differ and Dice is not trivial; it sits left of
    # centre, so a mask flipped without its image (or the reverse) no longer matches.
    x0 = int(w * (0.04 + 0.02 * view)) + car_index
    y0 = int(h * (0.25 + 0.03 * car_index))
    x1 = int(w * (0.55 + 0.03 * view)) - car_index
    y1 = int(h * (0.80 - 0.02 * view))
    box = (x0, y0, x1, y1)
    mask_img = Image.new("L", size, 0)
    ImageDraw.Draw(mask_img).ellipse(box, fill=1)
    photo = Image.new("RGB", size, (235, 235, 240))  # a light studio background
    colour = tuple(int(c) for c in rng.integers(20, 160, size=3))
    ImageDraw.Draw(photo).ellipse(box, fill=colour)
    image = np.asarray(photo).astype(np.int16)
    image += rng.integers(-8, 9, size=image.shape, dtype=np.int16)  # a little texture for JPEG
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(mask_img, dtype=np.uint8)


def save_palette_gif(mask01: np.ndarray, path):
    """Save a {0,1} mask as Kaggle does: a mode-P GIF whose palette indices are the labels."""
    h, w = mask01.shape
    img = Image.frombytes("P", (w, h), mask01.astype(np.uint8).tobytes())
    img.putpalette([0, 0, 0, 255, 255, 255])
    img.save(path)


def write_kaggle_dataset(root: Path, cars=FAKE_CARS, views=VIEWS, size=IMAGE_SIZE) -> Path:
    """root/train/<id>_<NN>.jpg + root/train_masks/<id>_<NN>_mask.gif; returns root."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "train_masks").mkdir(parents=True, exist_ok=True)
    for c, car in enumerate(cars):
        for v in range(1, views + 1):
            image, mask = car_picture(c, v, size)
            Image.fromarray(image).save(root / "train" / f"{car}_{v:02d}.jpg", quality=95)
            save_palette_gif(mask, root / "train_masks" / f"{car}_{v:02d}_mask.gif")
    return root


def write_plain_dataset(root: Path, cars=PLAIN_CARS, views=VIEWS, size=IMAGE_SIZE) -> Path:
    """root/images/<id>_<NN>.png + root/masks/<id>_<NN>.png with 0/255 masks; returns root."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for c, car in enumerate(cars):
        for v in range(1, views + 1):
            image, mask = car_picture(c, v, size, seed=7)
            Image.fromarray(image).save(root / "images" / f"{car}_{v:02d}.png")
            Image.fromarray(mask * 255).save(root / "masks" / f"{car}_{v:02d}.png")
    return root


def tiny_config(data_dir, tmp, **overrides) -> TrainConfig:
    """A TrainConfig that trains a 4-channel, depth-2 U-Net at 64x48 on the CPU in seconds."""
    values = dict(data_dir=str(data_dir), image_width=MODEL_SIZE[0], image_height=MODEL_SIZE[1], base_channels=4, depth=2,
                  epochs=2, batch_size=4, device="cpu", precision="fp32", num_workers=0, augment="light",
                  bilinear=False, crop_width=0, crop_height=0, precise_bn=0,
                  full_res_val=True, cache_dir=str(Path(tmp) / "cache"), out_dir=str(Path(tmp) / "runs"),
                  run_name="tiny", seed=42)
    values.update(overrides)
    return TrainConfig(**values)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (torchrun, SIGKILL, "
                     "the browser, real data, long training): .ci/run does; RUN_SLOW=1 does the same")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one; scripts/gpu_check.sh runs them")
    config.addinivalue_line("markers", "slow: seconds to minutes each (torchrun, SIGKILL, the browser, real data, "
                                       "long training); skipped unless --run-slow or RUN_SLOW=1, as .ci/run sets")


def pytest_collection_modifyitems(config, items):
    """Skip the slow tests unless asked for: the everyday run stays about a minute, CI runs everything."""
    if config.getoption("--run-slow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (or RUN_SLOW=1), as .ci/run does")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _export_cache(tmp_path_factory):
    """ONNX exports and OpenVINO blobs of the tests go to a temporary folder, never the user's ~/.cache."""
    os.environ["CARSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("export-cache"))


@pytest.fixture(autouse=True)
def _seed():
    """A fixed seed for every test."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def kaggle_dir(tmp_path) -> Path:
    """Kaggle layout: 4 fake cars x 3 views, 96x64 JPEGs + mode-P 0/1 GIF masks."""
    return write_kaggle_dataset(tmp_path / "kaggle")


@pytest.fixture
def plain_dir(tmp_path) -> Path:
    """Plain layout: images/*.png + masks/*.png (0/255), 2 fake cars x 3 views."""
    return write_plain_dataset(tmp_path / "plain")


@pytest.fixture
def tiny_cfg(kaggle_dir, tmp_path) -> TrainConfig:
    """A TrainConfig for the Kaggle-layout fixture: 64x48, base_channels=4, depth=2, 2 epochs, CPU fp32."""
    return tiny_config(kaggle_dir, tmp_path)


# ---------------------------------------------------------------- real Carvana data

def skip_unless_required(reason: str):
    """Skip a test whose real data or reference package is absent; CI (CARVANA_REQUIRED=1) fails instead."""
    if os.environ.get("CARVANA_REQUIRED") == "1":
        pytest.fail(reason + "; CARVANA_REQUIRED=1 makes this a failure", pytrace=False)
    pytest.skip(reason)


def real_data_dir() -> Path:
    """Where the real Carvana files are: $CARVANA_DIR, else data/carvana in the repository (where the
    README puts them, and where train.py looks)."""
    return Path(os.environ.get("CARVANA_DIR") or REPO_ROOT / "data" / "carvana").expanduser()


@pytest.fixture(scope="session")
def carvana_dir() -> Path:
    """The real data folder; skips when absent, or fails instead when CARVANA_REQUIRED=1."""
    path = real_data_dir()
    if not ((path / "train").is_dir() and (path / "train_masks").is_dir()):
        reason = f"real Carvana data not found at {path} (set CARVANA_DIR, or put it at data/carvana)"
        skip_unless_required(reason)
    return path


# ---------------------------------------------------------------- real Car Parts data

@pytest.fixture(scope="session")
def carparts_dir() -> Path:
    """The Car Parts Dataset's training folder (annotations.json + JPEGImages/): $CARPARTS_DIR, else
    data/carparts; skips when absent, or fails instead when CARVANA_REQUIRED=1."""
    path = Path(os.environ.get("CARPARTS_DIR") or REPO_ROOT / "data" / "carparts").expanduser()
    if not (path / "annotations.json").is_file():
        reason = f"the Car Parts Dataset was not found at {path} (set CARPARTS_DIR, or put it at data/carparts)"
        skip_unless_required(reason)
    return path


# ---------------------------------------------------------------- synthetic car parts (COCO)

PART_CATEGORIES = [{"id": 1, "name": "_background_"}, {"id": 2, "name": "left_door"},
                   {"id": 3, "name": "right_door"}, {"id": 4, "name": "wheel"}]
PART_COLOURS = {2: (200, 40, 40), 3: (40, 40, 200), 4: (30, 30, 30)}


def parts_picture(index: int, size=IMAGE_SIZE):
    """An RGB photo with a "left door" (red, left half), a "right door" (blue, right half) and a dark
    "wheel" drawn over the doors, and the COCO polygons of the three, [(category_id, [x, y, ...])]."""
    w, h = size
    rng = np.random.default_rng(index)
    dx, dy = int(rng.integers(-4, 5)), int(rng.integers(-3, 4))
    shapes = [(2, [8 + dx, 12 + dy, w // 2 + dx, 12 + dy, w // 2 + dx, h - 14 + dy, 8 + dx, h - 14 + dy]),
              (3, [w // 2 + dx, 12 + dy, w - 8 + dx, 12 + dy, w - 8 + dx, h - 14 + dy, w // 2 + dx, h - 14 + dy]),
              (4, [w // 2 - 10 + dx, h - 24 + dy, w // 2 + 10 + dx, h - 24 + dy, w // 2 + 10 + dx, h - 8 + dy,
                   w // 2 - 10 + dx, h - 8 + dy])]
    photo = Image.new("RGB", size, (235, 235, 240))
    draw = ImageDraw.Draw(photo)
    for category, polygon in shapes:
        draw.polygon(polygon, fill=PART_COLOURS[category])
    image = np.asarray(photo).astype(np.int16) + rng.integers(-8, 9, size=(h, w, 3), dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8), shapes


def write_coco_dataset(root: Path, count: int = 12, size=IMAGE_SIZE) -> Path:
    """root/annotations.json (COCO polygons of 3 parts + a background category) + root/JPEGImages/; returns root."""
    import json
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, shapes = parts_picture(i, size)
        name = f"part{i:03d}.jpg"
        Image.fromarray(image).save(root / "JPEGImages" / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
        for category, polygon in shapes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "segmentation": [polygon], "iscrowd": 0})
    coco = {"images": images, "annotations": annotations, "categories": PART_CATEGORIES}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture
def coco_dir(tmp_path) -> Path:
    """A COCO-layout car-parts set: 12 96x64 photos, classes background, left_door, right_door, wheel."""
    return write_coco_dataset(tmp_path / "coco")


def pytest_terminal_summary(terminalreporter):
    """Name the kind of CPU the suite ran on: `--precision auto` (and OpenVINO's default) is bf16 where
    the CPU runs it natively and fp32 elsewhere, so a report of a failure needs to say which it was."""
    from carseg import runtime
    try:
        from backends import openvino_native_bf16
        openvino = "yes" if openvino_native_bf16() else "no"
    except ImportError:
        openvino = "not installed"
    terminalreporter.write_line(f"CPU: {runtime.cpu_description()} (PyTorch/oneDNN); OpenVINO native bf16: {openvino}")
