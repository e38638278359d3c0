"""Protects file pairing, the by-car split, image/mask decoding and checks, the disk cache and the Dataset items."""
import io
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import FAKE_CARS, IMAGE_SIZE, MODEL_SIZE, PLAIN_CARS, VIEWS, car_picture, save_palette_gif
from carseg.augment import build_transform
from dataset import (SegmentationDataset, DatasetError, Sample, car_id_of, describe_split, find_samples, group_of, load_mask, load_samples, prepare_store, regroup, shrink_mask, split_by_car)
from carseg.images import load_image


# ---------------------------------------------------------------- finding and pairing files

def test_find_samples_kaggle_layout(kaggle_dir):
    samples, problems = find_samples(kaggle_dir)
    assert problems == []
    assert len(samples) == len(FAKE_CARS) * VIEWS
    assert {s.group for s in samples} == set(FAKE_CARS)
    first = samples[0]
    assert first.name == f"{FAKE_CARS[0]}_01"
    assert first.image == kaggle_dir / "train" / f"{FAKE_CARS[0]}_01.jpg"
    assert first.mask == kaggle_dir / "train_masks" / f"{FAKE_CARS[0]}_01_mask.gif"
    assert all(s.mask.name == f"{s.name}_mask.gif" for s in samples)


def test_find_samples_plain_layout(plain_dir):
    samples, problems = find_samples(plain_dir)
    assert problems == []
    assert len(samples) == len(PLAIN_CARS) * VIEWS
    assert all(s.image.parent.name == "images" and s.mask == plain_dir / "masks" / s.image.name for s in samples)
    assert {s.group for s in samples} == set(PLAIN_CARS)


def test_find_samples_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_samples(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither"):
        find_samples(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="train_masks"):
        find_samples(tmp_path)


@pytest.mark.parametrize("name, car", [("0cdf5b5d0ce1_07", "0cdf5b5d0ce1"), ("aaaaaaaaaa01_16", "aaaaaaaaaa01"),
                                       ("my_photo_3", "my_photo"), ("photo", "photo"), ("photo_", "photo_"),
                                       ("photo_a1", "photo_a1")])
def test_car_id_of(name, car):
    assert car_id_of(name) == car


def test_pairing_problems_are_all_reported(kaggle_dir):
    missing = kaggle_dir / "train_masks" / f"{FAKE_CARS[1]}_02_mask.gif"
    missing.unlink()
    orphan = kaggle_dir / "train_masks" / "cccccccccc01_01_mask.gif"
    save_palette_gif(np.zeros((4, 4), np.uint8), orphan)
    duplicate = kaggle_dir / "train" / f"{FAKE_CARS[2]}_01.png"
    Image.new("RGB", IMAGE_SIZE).save(duplicate)
    samples, problems = find_samples(kaggle_dir)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert f"{FAKE_CARS[1]}_02.jpg: no mask" in text
    assert f"{orphan}: mask without an image" in text
    assert str(duplicate) in text and "duplicate" in text
    assert f"{FAKE_CARS[1]}_02" not in {s.name for s in samples}
    assert len(samples) == len(FAKE_CARS) * VIEWS - 1


def test_hidden_and_non_image_files_are_ignored(kaggle_dir):
    (kaggle_dir / "train" / ".DS_Store").write_text("x")
    (kaggle_dir / "train" / "notes.txt").write_text("x")
    samples, problems = find_samples(kaggle_dir)
    assert problems == [] and len(samples) == len(FAKE_CARS) * VIEWS


# ---------------------------------------------------------------- the split by car

def fake_samples(n_cars=40, views=4):
    return [Sample(Path(f"{c:012x}_{v:02d}.jpg"), Path(f"{c:012x}_{v:02d}_mask.gif"), f"{c:012x}_{v:02d}", f"{c:012x}")
            for c in range(n_cars) for v in range(1, views + 1)]


def test_split_by_car_is_deterministic_disjoint_and_complete():
    samples = fake_samples()
    train, val = split_by_car(samples, 0.25, seed=0)
    again_train, again_val = split_by_car(samples, 0.25, seed=0)
    assert (train, val) == (again_train, again_val)
    train_groups, val_groups = {s.group for s in train}, {s.group for s in val}
    assert train_groups.isdisjoint(val_groups)
    assert train_groups | val_groups == {s.group for s in samples}
    assert len(val_groups) == 10                        # round(40 * 0.25)
    assert len(train) + len(val) == len(samples)      # every image on exactly one side
    assert all(len([s for s in val if s.group == c]) == 4 for c in val_groups)  # whole cars only


def test_split_by_car_does_not_depend_on_input_order():
    samples = fake_samples()
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    _, val = split_by_car(samples, 0.25, seed=0)
    _, val_shuffled = split_by_car(shuffled, 0.25, seed=0)
    assert {s.name for s in val} == {s.name for s in val_shuffled}


def test_split_seed_changes_the_split():
    samples = fake_samples()
    splits = {frozenset(s.group for s in split_by_car(samples, 0.25, seed)[1]) for seed in range(4)}
    assert len(splits) > 1


def test_split_keeps_at_least_one_car_on_each_side():
    samples = fake_samples(n_cars=2)
    for fraction in (0.01, 0.99):
        train, val = split_by_car(samples, fraction, seed=0)
        assert len({s.group for s in train}) == 1 and len({s.group for s in val}) == 1
    with pytest.raises(ValueError, match="at least 2 cars"):
        split_by_car(fake_samples(n_cars=1), 0.5, seed=0)


@pytest.mark.parametrize("name, group_by, group", [
    ("DSC_2001", "car-id", "DSC"), ("DSC_2001", "none", "DSC_2001"),
    ("carA_front_01", r"^([^_]+)_", "carA"), ("IMG_1007", r"\d+", "1007"), ("photo", r"^car(\d+)", "photo"),
    ("side_3", r"(x)?side", "side_3")])  # an optional group that takes no part: the name is its own group
def test_group_of_follows_the_rule_named_by_group_by(name, group_by, group):
    assert group_of(name, group_by) == group


def camera_samples(prefixes=("DSC", "IMG"), per_prefix=12):
    names = [f"{p}_{2001 + i}" for p in prefixes for i in range(per_prefix)]
    return [Sample(Path(n + ".jpg"), Path(n + ".png"), n, car_id_of(n)) for n in names]


def test_camera_names_under_the_car_id_rule_make_a_split_that_is_reported_and_warned_about():
    samples = camera_samples()  # 24 photos, "cars" DSC and IMG
    train, val = split_by_car(samples, 0.125, seed=0)
    line, warnings = describe_split(train, val, 0.125)
    assert "1 groups (12 images) train, 1 groups (12 images) validate: 50.0% of the images validate" in line
    assert len(warnings) == 1 and "50.0% of the images validate, not the 12.5%" in warnings[0]
    assert "--group-by car-id" in warnings[0]
    # each photo alone: 3 of the 24 validate, as asked, and nothing to warn about
    regrouped = regroup(samples, "none")
    train, val = split_by_car(regrouped, 0.125, seed=0)
    assert (len(train), len(val)) == (21, 3)
    assert describe_split(train, val, 0.125)[1] == []


def test_one_group_holding_most_images_is_warned_about():
    samples = camera_samples(("IMG",), 20) + camera_samples(("a", "b", "c", "d"), 1)
    train, val = split_by_car(samples, 0.25, seed=1)
    warnings = describe_split(train, val, 0.25)[1]
    assert any("one group, 'IMG', holds 20 of the 24 images" in w for w in warnings)


def test_a_group_by_pattern_that_misses_names_is_warned_about(caplog):
    regroup(camera_samples(), r"^car(\d+)")
    assert "finds no group in 24 of the 24 names" in caplog.text


def test_a_split_error_explains_the_grouping_rule():
    with pytest.raises(ValueError, match="at least 2 cars.*24 images are grouped by car id.*--group-by none"):
        split_by_car(camera_samples(("IMG",), 24), 0.125, seed=0)


# ---------------------------------------------------------------- masks

def test_load_mask_kaggle_gif(kaggle_dir):
    mask = load_mask(kaggle_dir / "train_masks" / f"{FAKE_CARS[0]}_01_mask.gif")
    _, expected = car_picture(0, 1)
    assert mask.dtype == np.uint8 and mask.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0])
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("mode, scale", [("L", 1), ("L", 255), ("1", 255), ("RGB", 255), ("P", 1)])
def test_load_mask_accepts_01_and_0255(tmp_path, mode, scale):
    expected = np.zeros((5, 7), np.uint8)
    expected[1:4, 2:6] = 1
    img = Image.fromarray(expected * scale)
    if mode == "1":
        img = img.convert("1")
    elif mode == "RGB":
        img = img.convert("RGB")
    elif mode == "P":
        img = Image.frombytes("P", (7, 5), expected.tobytes())
        img.putpalette([0, 0, 0, 255, 255, 255])
    path = tmp_path / "m.png"
    img.save(path)
    mask = load_mask(path)
    assert mask.dtype == np.uint8
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("values", [(0, 1, 2), (0, 128, 255), (0, 254)])
def test_load_mask_rejects_other_values(tmp_path, values):
    array = np.array([values * 3], np.uint8)
    path = tmp_path / "bad_mask.png"
    Image.fromarray(array).save(path)
    with pytest.raises(ValueError, match="bad_mask.png"):
        load_mask(path)


def test_load_mask_rejects_palette_gif_with_a_third_label(tmp_path):
    path = tmp_path / "three_mask.gif"
    img = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    img.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128])
    img.save(path)
    with pytest.raises(ValueError, match="three_mask.gif"):
        load_mask(path)


def test_load_mask_rejects_a_colour_image(tmp_path):
    path = tmp_path / "colour_mask.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)).save(path)
    with pytest.raises(ValueError, match="colour_mask.png"):
        load_mask(path)


def test_shrink_mask_area_averages_4x4_to_2x2():
    mask = np.array([[1, 1, 0, 0],
                     [1, 0, 0, 0],
                     [0, 0, 1, 1],
                     [0, 1, 1, 1]], np.uint8)
    # block means 3/4, 0, 1/4, 1 -> x255 -> 191.25, 0, 63.75, 255 -> rounded
    expected = np.array([[191, 0], [64, 255]], np.uint8)
    got = shrink_mask(mask, (2, 2))
    assert got.dtype == np.uint8
    assert np.array_equal(got, expected)


def test_shrink_mask_size_is_width_height():
    mask = np.array([[1, 1, 0, 0],
                     [1, 0, 0, 0]], np.uint8)   # 2 high, 4 wide
    assert np.array_equal(shrink_mask(mask, (2, 1)), np.array([[191, 0]], np.uint8))


# ---------------------------------------------------------------- images

def test_load_image_with_and_without_size(kaggle_dir):
    path = kaggle_dir / "train" / f"{FAKE_CARS[0]}_01.jpg"
    image, full = load_image(path, MODEL_SIZE)
    assert image.dtype == np.uint8 and image.shape == (MODEL_SIZE[1], MODEL_SIZE[0], 3)
    assert full == IMAGE_SIZE
    image, full = load_image(path)
    assert image.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0], 3) and full == IMAGE_SIZE
    assert image.flags.writeable and image.flags.c_contiguous


@pytest.mark.parametrize("size", [(48, 32), (100, 75), (399, 299), (13, 7)])
def test_load_image_jpeg_reduced_decoding_gives_exact_size(tmp_path, size):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    image, full = load_image(path, size)
    assert image.shape == (size[1], size[0], 3) and image.dtype == np.uint8
    assert full == (400, 300)


def test_load_image_reduced_decoding_matches_a_full_decode(tmp_path):
    path = tmp_path / "smooth.jpg"
    yy, xx = np.mgrid[0:320, 0:480]
    smooth = np.dstack([xx * 255 // 480, yy * 255 // 320, (xx + yy) * 255 // 800]).astype(np.uint8)
    Image.fromarray(smooth).save(path, quality=95)
    small, _ = load_image(path, (120, 80))       # decoded at 1/4 scale
    reference = np.asarray(Image.open(path).convert("RGB").resize((120, 80), Image.BOX))
    assert np.abs(small.astype(int) - reference.astype(int)).mean() < 2.0


def edge_position(profile: np.ndarray) -> float:
    """Where a rising 0..1 profile crosses 0.5, in pixel-centre coordinates, interpolated linearly."""
    i = int(np.argmax(profile >= 0.5))
    return i - 1 + (0.5 - profile[i - 1]) / (profile[i] - profile[i - 1])


@pytest.mark.parametrize("edge_column", [101, 1701])
def test_reduced_jpeg_decoding_stays_aligned_with_the_shrunk_mask(tmp_path, edge_column):
    # 1918 is not a multiple of 4: a 1/4-scale decode covers 1920 columns and put the image up to half
    # a model pixel off its area-averaged mask near the right edge. The step must land where the
    # mask's does, on both sides of the photo.
    mask = np.zeros((64, 1918), np.uint8)
    mask[:, edge_column:] = 1
    path = tmp_path / "step.jpg"
    Image.fromarray(np.dstack([mask * 255] * 3)).save(path, quality=98)
    image, full = load_image(path, (480, 16))
    assert full == (1918, 64)
    image_edge = edge_position(image[8, :, 1].astype(float) / 255.0)
    mask_edge = edge_position(shrink_mask(mask, (480, 16))[8].astype(float) / 255.0)
    assert abs(image_edge - mask_edge) < 0.1, (image_edge, mask_edge)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_load_image_upscales_a_small_file(tmp_path, fmt):
    # A photo smaller than the model's input (a thumbnail given to predict.py) must still load.
    path = tmp_path / f"small.{fmt}"
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(path)
    image, full = load_image(path, (64, 48))
    assert image.shape == (48, 64, 3)
    assert full == (40, 30)


def write_exif_rotated(path, orientation=6):
    """A 60x40 stored JPEG, left half red and right half blue, with an EXIF orientation tag."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=95)


@pytest.mark.parametrize("size", [None, (20, 30)])
def test_exif_orientation_6_is_applied(tmp_path, size):
    path = tmp_path / "rotated.jpg"
    write_exif_rotated(path)
    image, full = load_image(path, size)
    assert full == (40, 60)  # displayed upright: 40 wide, 60 high
    h, w = (60, 40) if size is None else (30, 20)
    assert image.shape == (h, w, 3)
    # orientation 6 = rotate 90 degrees clockwise to display: the stored left (red) half becomes the top
    top, bottom = image[: h // 3].reshape(-1, 3).mean(0), image[-h // 3:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_png_gives_rgb_over_white(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (10, 20, 30, 255)     # opaque left half
    rgba[:, 3:] = (10, 20, 30, 0)       # transparent right half
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image, full = load_image(path)
    assert image.dtype == np.uint8 and image.shape == (4, 6, 3) and full == (6, 4)
    assert (image[:, :3] == (10, 20, 30)).all()
    assert (image[:, 3:] == 255).all()


def test_grayscale_png_gives_rgb(tmp_path):
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    image, _ = load_image(path)
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    assert all(np.array_equal(image[..., c], gray) for c in range(3))


def test_16_bit_png_gives_rgb_uint8(tmp_path):
    values = np.array([[0, 65535, 32896]], np.uint16)  # 32896 * 255 / 65535 = 128 exactly
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image, full = load_image(path, (3, 1))
    assert image.dtype == np.uint8 and image.shape == (1, 3, 3) and full == (3, 1)
    assert image[0, :, 0].tolist() == [0, 255, 128]


def truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
@pytest.mark.parametrize("size", [None, MODEL_SIZE])
def test_unreadable_image_raises_value_error_naming_the_file(tmp_path, kind, size):
    path = tmp_path / f"broken_{kind}.jpg"
    if kind == "truncated":
        truncated_jpeg(path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("this is not a JPEG\n")
    reason = {"truncated": "truncated", "empty": "empty file", "text": "not an image file"}[kind]
    with pytest.raises(ValueError, match=f"broken_{kind}.jpg: .*{reason}"):
        load_image(path, size)


# ---------------------------------------------------------------- files that lack only their end, and cut ones

DRAFT_SIZE = (48, 32)  # a 192x128 JPEG read at this size is decoded at 1/4 scale (draft)


def jpeg_bytes(**options) -> bytes:
    """A 192x128 photo encoded as JPEG, ending with its end-of-image marker FF D9."""
    image, _ = car_picture(0, 1, size=(192, 128))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90, **options)
    assert buffer.getvalue().endswith(b"\xff\xd9")
    return buffer.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("size", [None, DRAFT_SIZE])
def test_a_jpeg_lacking_only_its_end_marker_is_read_with_one_warning_naming_it(tmp_path, caplog, progressive, size):
    data = jpeg_bytes(progressive=progressive)
    whole, lacking = tmp_path / "whole.jpg", tmp_path / "no_end.jpg"
    whole.write_bytes(data)
    lacking.write_bytes(data[:-2])
    expected, full_size = load_image(whole, size)
    with caplog.at_level(logging.WARNING, logger="dataset"):
        for _ in range(2):  # a file read twice (predict.py reads some twice) is warned about once
            array, read_size = load_image(lacking, size)
            assert np.array_equal(array, expected) and read_size == full_size
    warnings = [r.getMessage() for r in caplog.records if "end marker" in r.getMessage()]
    assert len(warnings) == 1 and "no_end.jpg" in warnings[0] and "holds every pixel" in warnings[0]


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("kept", [0.6, 0.99, -3])
def test_a_jpeg_cut_short_is_refused_naming_the_file(tmp_path, progressive, kept):
    data = jpeg_bytes(progressive=progressive)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:kept] if isinstance(kept, int) else data[:int(len(data) * kept)])
    for size in (None, DRAFT_SIZE):  # the full and the reduced-size decoding refuse it alike
        with pytest.raises(ValueError, match=r"cut\.jpg: cannot decode: image file is truncated"):
            load_image(path, size)


def end_of_scan_data(data: bytes, scan: int) -> int:
    """Where the entropy-coded data of the scan whose SOS marker is at `scan` ends (the next marker)."""
    start = scan + 2 + int.from_bytes(data[scan + 2:scan + 4], "big")
    return re.compile(rb"\xff[^\x00\xd0-\xd7\xff]").search(data, start).start()


def test_a_progressive_jpeg_missing_its_last_scans_is_refused(tmp_path):
    """Cut where a scan's data ends, its pixels need no more bytes; the scans after it are missing all the same."""
    data = jpeg_bytes(progressive=True)
    scans = [m.start() for m in re.finditer(rb"\xff\xda", data)]
    assert len(scans) > 2
    path = tmp_path / "coarse.jpg"
    for scan in scans[-2:-4:-1]:
        path.write_bytes(data[:end_of_scan_data(data, scan)])
        with pytest.raises(ValueError, match=r"coarse\.jpg: cannot decode: image file is truncated"):
            load_image(path)


def test_a_jpeg_cut_where_a_restart_interval_ends_is_refused(tmp_path):
    """With restart markers, data cut after a whole interval needs no more bytes, yet later intervals are missing."""
    data = jpeg_bytes(restart_marker_blocks=4)
    restarts = [m.start() for m in re.finditer(rb"\xff[\xd0-\xd7]", data)]
    assert len(restarts) > 2
    path = tmp_path / "intervals.jpg"
    for restart in (restarts[-1], restarts[len(restarts) // 2]):
        path.write_bytes(data[:restart])
        with pytest.raises(ValueError, match=r"intervals\.jpg: cannot decode: image file is truncated"):
            load_image(path)
    path.write_bytes(data[:-2])  # lacking only its end marker, it is read
    assert np.array_equal(load_image(path)[0], load_image(io.BytesIO(data))[0])


@pytest.mark.parametrize("fmt, end", [("PNG", 12), ("GIF", 1)])  # the IEND chunk; the trailer byte ';'
def test_a_png_or_gif_lacking_only_its_end_is_read_and_a_cut_one_refused(tmp_path, fmt, end):
    """Pillow decodes these until every row is there: a missing end chunk loses no pixel, a cut file does."""
    image, _ = car_picture(0, 1, size=(96, 64))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    data, path = buffer.getvalue(), tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data[:-end])
    assert np.array_equal(load_image(path)[0], load_image(io.BytesIO(data))[0])
    path.write_bytes(data[:int(len(data) * 0.6)])
    with pytest.raises(ValueError, match=rf"photo\.{fmt.lower()}: cannot decode: image file is truncated"):
        load_image(path)


@pytest.mark.parametrize("options", [{}, {"lossless": True}])
def test_a_webp_cut_short_is_refused_saying_so(tmp_path, options):
    """A WebP has no end marker: its last bytes are pixel data, so any cut loses pixels."""
    image, _ = car_picture(0, 1, size=(96, 64))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "WEBP", **options)
    data, path = buffer.getvalue(), tmp_path / "cut.webp"
    for kept in (len(data) - 1, int(len(data) * 0.6)):
        path.write_bytes(data[:kept])
        with pytest.raises(ValueError, match=rf"cut\.webp: .*\(cut short: {kept:,} of its {len(data):,} bytes\)"):
            load_image(path)


# ---------------------------------------------------------------- decoding a whole dataset

def test_prepare_store_lists_every_problem_at_once(kaggle_dir):
    (kaggle_dir / "train_masks" / f"{FAKE_CARS[0]}_02_mask.gif").unlink()          # a missing mask
    truncated_jpeg(kaggle_dir / "train" / f"{FAKE_CARS[1]}_01.jpg")                  # a truncated image
    save_palette_gif(np.zeros((64, 80), np.uint8),                                 # a mask of the wrong size
                     kaggle_dir / "train_masks" / f"{FAKE_CARS[2]}_03_mask.gif")
    samples, problems = find_samples(kaggle_dir)
    with pytest.raises(DatasetError) as err:
        prepare_store(samples, MODEL_SIZE, "", kaggle_dir, problems)
    assert isinstance(err.value, ValueError)
    assert len(err.value.problems) == 3
    message = str(err.value)
    assert "3 problem(s)" in message
    assert f"{FAKE_CARS[0]}_02.jpg: no mask" in message
    assert f"{FAKE_CARS[1]}_01.jpg" in message
    assert f"{FAKE_CARS[2]}_03_mask.gif: mask is 80x64" in message


def test_all_background_mask_is_only_a_warning(kaggle_dir, caplog):
    save_palette_gif(np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0]), np.uint8),
                     kaggle_dir / "train_masks" / f"{FAKE_CARS[0]}_01_mask.gif")
    samples, _ = find_samples(kaggle_dir)
    store = prepare_store(samples, MODEL_SIZE)
    assert len(store) == len(samples)
    assert "all background" in caplog.text


def same_store(a, b):
    assert [s.name for s in a.samples] == [s.name for s in b.samples]
    assert a.full_sizes == b.full_sizes
    for name in ("images", "masks", "full_masks"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_disk_cache_is_used_and_identical(kaggle_dir, tmp_path, monkeypatch):
    samples, _ = find_samples(kaggle_dir)
    cache = tmp_path / "cache"
    first, problems = load_samples(samples, MODEL_SIZE, cache)
    assert problems == [] and len(list(cache.glob("*.npz"))) == len(samples)
    calls = []

    def no_decoding(sample, size, num_classes=2):
        calls.append(sample.name)
        raise ValueError(f"decode_sample called for {sample.name}")

    monkeypatch.setattr(dataset, "decode_sample", no_decoding)
    second, problems = load_samples(samples, MODEL_SIZE, cache)
    assert problems == [] and calls == []
    same_store(first, second)
    assert all(isinstance(v, int) for size in second.full_sizes for v in size)
    # another model size is another cache entry
    _, problems = load_samples(samples[:1], (32, 24), cache)
    assert calls == [samples[0].name]


def test_disk_cache_notices_a_changed_file(kaggle_dir, tmp_path, monkeypatch):
    samples, _ = find_samples(kaggle_dir)
    cache = tmp_path / "cache"
    load_samples(samples, MODEL_SIZE, cache)
    changed = samples[3]
    _, new_mask = car_picture(9, 1)
    save_palette_gif(new_mask, changed.mask)
    stat = os.stat(changed.mask)
    os.utime(changed.mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    store, problems = load_samples(samples, MODEL_SIZE, cache)
    assert problems == []
    assert np.array_equal(store.full_mask(3), new_mask)


def test_damaged_cache_entry_is_rebuilt(kaggle_dir, tmp_path):
    samples, _ = find_samples(kaggle_dir)
    cache = tmp_path / "cache"
    first, _ = load_samples(samples, MODEL_SIZE, cache)
    for entry in cache.glob("*.npz"):
        entry.write_bytes(b"not a zip file")
    second, problems = load_samples(samples, MODEL_SIZE, cache)
    assert problems == []
    same_store(first, second)


def test_store_keeps_the_full_resolution_mask(kaggle_dir):
    samples, _ = find_samples(kaggle_dir)
    store = prepare_store(samples, MODEL_SIZE)
    for i, sample in enumerate(store.samples):
        assert store.full_sizes[i] == IMAGE_SIZE
        assert np.array_equal(store.full_mask(i), load_mask(sample.mask))
        assert np.array_equal(store.masks[i], shrink_mask(load_mask(sample.mask), MODEL_SIZE))


# ---------------------------------------------------------------- the Dataset and augmentation

@pytest.fixture
def store(kaggle_dir):
    samples, _ = find_samples(kaggle_dir)
    return prepare_store(samples, MODEL_SIZE)


def car_iou(image: torch.Tensor, mask: torch.Tensor) -> float:
    """IoU of "darker than the studio background" with mask > 0.5: high when image and mask are aligned."""
    brightness = image.mean(0)
    # midway between the car (about a third of the picture) and the background, whatever the colour jitter did
    low, high = torch.quantile(brightness.flatten(), torch.tensor([0.1, 0.9]))
    dark, car = brightness < (low + high) / 2, mask[0] > 0.5
    return ((dark & car).sum() / (dark | car).sum()).item()


def test_dataset_items(store):
    ds = SegmentationDataset(store)
    assert len(ds) == len(store)
    for i in range(len(ds)):
        image, mask, index = ds[i]
        assert index == i
        assert image.dtype == torch.float32 and image.shape == (3, MODEL_SIZE[1], MODEL_SIZE[0])
        assert mask.dtype == torch.float32 and mask.shape == (1, MODEL_SIZE[1], MODEL_SIZE[0])
        assert 0 <= image.min() and image.max() <= 1
        assert 0 <= mask.min() and mask.max() <= 1
        assert torch.equal(mask[0], torch.from_numpy(store.masks[i]).float() / 255)
        assert torch.equal(image, torch.from_numpy(store.images[i]).permute(2, 0, 1).float() / 255)
        assert car_iou(image, mask) > 0.9
    # the area-averaged mask is soft at the car's edge
    assert ((mask > 0) & (mask < 1)).any()


def test_no_augmentation_is_no_transform():
    assert build_transform("none") is None


@pytest.mark.parametrize("strength", ["flip", "light"])
def test_augmentation_is_reproducible_from_the_epoch_seed(store, strength):
    ds = SegmentationDataset(store, build_transform(strength))
    ds.reseed(12345)
    first = [ds[i] for i in range(len(ds))]
    ds.reseed(12345)
    second = [ds[i] for i in range(len(ds))]
    for (a_img, a_mask, _), (b_img, b_mask, _) in zip(first, second):
        assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    ds.reseed(54321)
    third = [ds[i] for i in range(len(ds))]
    assert any(not torch.equal(a[0], c[0]) for a, c in zip(first, third))
    plain = SegmentationDataset(store)
    assert any(not torch.equal(a[0], plain[i][0]) for i, a in enumerate(first))


def test_augmentation_moves_image_and_mask_together(store):
    ds = SegmentationDataset(store, build_transform("light"))
    for seed in range(3):
        ds.reseed(seed)
        for i in range(len(ds)):
            image, mask, _ = ds[i]
            assert image.shape == (3, MODEL_SIZE[1], MODEL_SIZE[0]) and mask.shape == (1, MODEL_SIZE[1], MODEL_SIZE[0])
            assert 0 <= mask.min() and mask.max() <= 1
            assert car_iou(image, mask) > 0.85, (seed, i)


def test_flip_augmentation_never_resamples_the_mask(store):
    # "flip" keeps every soft edge value exactly as decoded: each mask is the stored one or its mirror.
    ds = SegmentationDataset(store, build_transform("flip"))
    mirrored = 0
    for seed in range(4):
        ds.reseed(seed)
        for i in range(len(ds)):
            image, mask, _ = ds[i]
            stored = torch.from_numpy(store.masks[i]).float()[None] / 255
            assert torch.equal(mask, stored) or torch.equal(mask, stored.flip(-1)), (seed, i)
            mirrored += not torch.equal(mask, stored)
            assert car_iou(image, mask) > 0.9, (seed, i)
    assert 0 < mirrored < 4 * len(ds)


def test_random_crops_cut_image_and_mask_at_the_same_place(store):
    crop = (32, 16)
    ds = SegmentationDataset(store, build_transform("none", crop))
    plain = SegmentationDataset(store)
    ds.reseed(0)
    for i in range(len(ds)):
        image, mask, _ = ds[i]
        assert image.shape == (3, 16, 32) and mask.shape == (1, 16, 32)
        full_image, full_mask, _ = plain[i]
        # find the crop in the whole image: the mask must come from the very same window
        windows = full_image.unfold(1, 16, 1).unfold(2, 32, 1)  # (3, rows, cols, 16, 32)
        hits = (windows == image[:, None, None]).flatten(3).all(-1).all(0).nonzero()
        assert len(hits) >= 1
        top, left = hits[0].tolist()
        assert torch.equal(mask, full_mask[:, top:top + 16, left:left + 32])


# ---------------------------------------------------------------- masks read as they are displayed

def car_mask():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:5, 2:7] = 1
    return mask


def test_a_palette_mask_listing_white_first_reads_as_it_looks(tmp_path):
    mask = car_mask()
    adaptive = Image.fromarray(mask * 255).convert("P", palette=Image.ADAPTIVE, colors=2)
    adaptive.save(tmp_path / "adaptive.png")
    inverted = Image.frombytes("P", (8, 6), (1 - mask).tobytes())  # index 0 = white = car
    inverted.putpalette([255, 255, 255, 0, 0, 0])
    inverted.save(tmp_path / "white_first.gif")
    for name in ("adaptive.png", "white_first.gif"):
        assert np.array_equal(load_mask(tmp_path / name), mask), name


@pytest.mark.parametrize("values", [(0.0, 0.5), (0.05, 0.95), (0.0, float("nan"))])
def test_float_masks_with_fractional_values_are_refused_not_truncated(tmp_path, values):
    Image.fromarray(np.array([values * 4], np.float32), "F").save(tmp_path / "soft_mask.tif")
    with pytest.raises(ValueError, match=r"^[^:]*soft_mask.tif: mask holds fractional or non-finite values"):
        load_mask(tmp_path / "soft_mask.tif")


def test_an_alpha_channel_carrying_the_mask_is_read_and_a_uniform_one_ignored(tmp_path):
    mask = car_mask()
    cutout = np.zeros((6, 8, 4), np.uint8)
    cutout[..., 3] = mask * 255  # black everywhere, opaque where the car is
    Image.fromarray(cutout).save(tmp_path / "cutout.png")
    assert np.array_equal(load_mask(tmp_path / "cutout.png"), mask)
    opaque = np.dstack([mask * 255] * 3 + [np.full((6, 8), 255, np.uint8)])
    Image.fromarray(opaque).save(tmp_path / "opaque.png")
    assert np.array_equal(load_mask(tmp_path / "opaque.png"), mask)
    both = opaque.copy()
    both[0, 0, 3] = 0
    Image.fromarray(both).save(tmp_path / "both_mask.png")
    with pytest.raises(ValueError, match=r"^[^:]*both_mask.png: mask has both varying colour and varying transparency"):
        load_mask(tmp_path / "both_mask.png")


# ---------------------------------------------------------------- pixel values beyond 8-bit integers

def photo_and_copy(tmp_path, mode, scale, name):
    """A small photo as 8-bit RGB, and a one-channel copy of its grey levels in `mode` times `scale`."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(6, 8)).astype(np.float64)
    grey[0, :2] = 0, 255  # the full 8-bit range, so the scaled copy's range is known
    Image.fromarray((grey * scale).astype(np.float32 if mode == "F" else np.int32), mode).save(tmp_path / name)
    return grey.astype(np.uint8)


@pytest.mark.parametrize("mode, scale", [("F", 1 / 255), ("F", 1.0), ("I", 1.0), ("I", 257.0)])
def test_float_and_32_bit_images_are_scaled_by_their_unambiguous_range(tmp_path, mode, scale):
    grey = photo_and_copy(tmp_path, mode, scale, "photo.tif")
    image, _ = load_image(tmp_path / "photo.tif")
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert np.abs(image[..., 0].astype(int) - grey).max() <= 1  # the grey levels, not an all-black image


@pytest.mark.parametrize("mode, scale, found", [("F", 4.0 / 255, "from 0 to 4"), ("F", -1 / 255, "from -"),
                                                ("I", 300.0, "from 0 to 76500"), ("I", -1.0, "from -255")])
def test_pixel_ranges_without_one_meaning_are_refused_naming_the_file_and_range(tmp_path, mode, scale, found):
    photo_and_copy(tmp_path, mode, scale, "hdr.tif")
    with pytest.raises(ValueError, match=f"hdr.tif: cannot decode: .*values {found}"):
        load_image(tmp_path / "hdr.tif")


def test_non_finite_pixels_are_refused(tmp_path):
    array = np.zeros((4, 4), np.float32)
    array[1, 1] = np.nan
    Image.fromarray(array, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="nan.tif: cannot decode: pixel values include NaN"):
        load_image(tmp_path / "nan.tif")
