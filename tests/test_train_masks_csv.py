"""Protects Kaggle's train_masks.csv as a mask source: pairing, decoding at each image's size, every bad input, the cache."""
import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import evaluate
import train
from config import EvaluateConfig
from conftest import FAKE_CARS, IMAGE_SIZE, MODEL_SIZE, VIEWS, car_picture, tiny_config, write_kaggle_dataset
from dataset import (DatasetError, compare_csv_with_folder, find_samples, load_mask, load_samples, mask_files,
                     prepare_store)
from carseg.rle import RleRow, read_mask_csv, rle_decode, rle_encode, write_mask_csv

FIRST = f"{FAKE_CARS[0]}_01.jpg"


def write_csv(samples, path) -> Path:
    """The samples' mask files written as a train_masks.csv at path (what `python dataset.py write-csv` does)."""
    return write_mask_csv(mask_files(samples), path, load=load_mask)


@pytest.fixture
def csv_dir(kaggle_dir) -> Path:
    """The Kaggle-layout fixture with its GIFs encoded into train_masks.csv and train_masks/ removed."""
    write_csv(find_samples(kaggle_dir)[0], kaggle_dir / "train_masks.csv")
    shutil.rmtree(kaggle_dir / "train_masks")
    return kaggle_dir


def rows_of(root: Path) -> list:
    """The lines of root/train_masks.csv, header included."""
    return (root / "train_masks.csv").read_text().splitlines()


def rewrite(root: Path, lines: list, newline="\n"):
    (root / "train_masks.csv").write_bytes(newline.join(lines).encode() + newline.encode())


def line_of(root: Path, img: str) -> int:
    """The 1-based line number of img's row."""
    return next(i for i, line in enumerate(rows_of(root), start=1) if line.startswith(img + ","))


# ---------------------------------------------------------------- pairing and decoding

def test_images_pair_with_their_rows_and_decode_to_the_gif_masks(kaggle_dir, tmp_path):
    gif_samples, _ = find_samples(kaggle_dir)
    gif_store = prepare_store(gif_samples, MODEL_SIZE)
    csv_root = tmp_path / "csv"
    shutil.copytree(kaggle_dir / "train", csv_root / "train")
    write_csv(gif_samples, csv_root / "train_masks.csv")
    samples, problems = find_samples(csv_root)
    assert problems == []
    assert [s.name for s in samples] == [s.name for s in gif_samples]
    assert all(isinstance(s.mask, RleRow) and s.mask.img == s.image.name for s in samples)
    assert [s.mask.line for s in samples] == list(range(2, 2 + len(FAKE_CARS) * VIEWS))  # written in name order
    store = prepare_store(samples, MODEL_SIZE)
    for i, sample in enumerate(gif_samples):
        assert np.array_equal(store.full_mask(i), load_mask(sample.mask)), sample.name
        assert np.array_equal(store.masks[i], gif_store.masks[i]) and np.array_equal(store.images[i], gif_store.images[i])


def test_masks_decode_at_each_images_own_size(csv_dir):
    # 1918x1280 is Carvana's size, not an assumption: a 50x30 photo's row is read as 30 rows of 50.
    _, mask = car_picture(1, 2, size=(50, 30))
    Image.fromarray(car_picture(1, 2, size=(50, 30))[0]).save(csv_dir / "train" / "small_01.jpg")
    rewrite(csv_dir, rows_of(csv_dir) + [f"small_01.jpg,{rle_encode(mask)}"])
    samples, problems = find_samples(csv_dir)
    assert problems == []
    store = prepare_store(samples, MODEL_SIZE)
    index = [s.name for s in store.samples].index("small_01")
    assert store.full_sizes[index] == (50, 30)
    assert np.array_equal(store.full_mask(index), mask)
    assert store.full_sizes[0] == IMAGE_SIZE


def test_an_empty_rle_mask_is_an_empty_mask(csv_dir, caplog):
    lines = rows_of(csv_dir)
    n = line_of(csv_dir, FIRST)
    lines[n - 1] = f"{FIRST},"
    rewrite(csv_dir, lines)
    samples, problems = find_samples(csv_dir)
    assert problems == []
    store = prepare_store(samples, MODEL_SIZE)
    assert store.full_mask(0).shape == (IMAGE_SIZE[1], IMAGE_SIZE[0]) and store.full_mask(0).max() == 0
    assert f"train_masks.csv line {n}: mask of {FIRST[:-4]} is all background" in caplog.text


def test_windows_line_ends_a_byte_order_mark_quotes_and_blank_lines_are_read(csv_dir):
    lines = rows_of(csv_dir)
    expected = {s.name: load_mask_of(s) for s in prepare_store(find_samples(csv_dir)[0], MODEL_SIZE).samples}
    name, rle = lines[1].split(",")
    lines[0] = "\ufeff" + lines[0]                # Excel's UTF-8 "BOM"
    lines[1] = f'"{name}","{rle}"'                 # every field quoted
    lines.insert(3, "")                            # a blank line between rows
    rewrite(csv_dir, lines, newline="\r\n")
    samples, problems = find_samples(csv_dir)
    assert problems == [] and len(samples) == len(expected)
    store = prepare_store(samples, MODEL_SIZE)
    for i, sample in enumerate(store.samples):
        assert np.array_equal(store.full_mask(i), expected[sample.name]), sample.name


def load_mask_of(sample) -> np.ndarray:
    """The mask a sample's row decodes to, at its image's size."""
    return sample.mask.decode(Image.open(sample.image).size)


# ---------------------------------------------------------------- GIFs and CSV together

def test_gif_masks_win_over_a_csv_beside_them_and_say_so(kaggle_dir, caplog):
    (kaggle_dir / "train_masks.csv").write_text("img,rle_mask\nnot read at all\n")
    caplog.set_level("INFO")
    samples, problems = find_samples(kaggle_dir)
    assert problems == [] and all(isinstance(s.mask, Path) for s in samples)
    assert "train_masks.csv beside it is not read" in caplog.text


def test_an_empty_gif_folder_beside_a_csv_leaves_the_csv_as_the_source(csv_dir):
    (csv_dir / "train_masks").mkdir()
    samples, problems = find_samples(csv_dir)
    assert problems == [] and all(isinstance(s.mask, RleRow) for s in samples)


def test_neither_masks_nor_csv_names_both(kaggle_dir):
    shutil.rmtree(kaggle_dir / "train_masks")
    with pytest.raises(FileNotFoundError, match="expected .*train_masks \\(or train_masks.csv"):
        find_samples(kaggle_dir)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("header, found", [
    (None, "aaaaaaaaaa01_01.jpg,"),           # no header: the first row is taken for one
    ("img,mask", "'img,mask'"),               # a wrong column name
    ("img", "'img'"),                          # one column
    ("img,rle_mask,extra", "'img,rle_mask,extra'"),
    ("", "an empty file"),
])
def test_a_wrong_header_is_an_error_naming_the_file_and_line_1(csv_dir, header, found):
    lines = rows_of(csv_dir)
    if header is None:
        lines = lines[1:]
    elif header == "":
        lines = []
    else:
        lines[0] = header
    (csv_dir / "train_masks.csv").write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(ValueError, match=r"train_masks.csv line 1: expected the header 'img,rle_mask'") as err:
        find_samples(csv_dir)
    assert found in str(err.value)


def test_every_pairing_problem_is_listed_with_its_line_and_nothing_is_paired_wrongly(csv_dir):
    lines = rows_of(csv_dir)
    by_img = {line.split(",")[0]: i for i, line in enumerate(lines)}
    second, third, fourth = f"{FAKE_CARS[1]}_01.jpg", f"{FAKE_CARS[2]}_01.jpg", f"{FAKE_CARS[3]}_01.jpg"
    lines[by_img[second]] = ""                                  # an image with no row (a blank line stays)
    lines.append(lines[by_img[third]])                          # a duplicate row
    lines.append("cccccccccc01_01.jpg,1 5")                     # a row for an image that does not exist
    lines.append("just-a-name.jpg")                             # no rle_mask field
    lines.append("a.jpg,1 2,3 4")                               # a comma too many
    lines.append(",1 2")                                        # no img
    rewrite(csv_dir, lines)
    samples, problems = find_samples(csv_dir)
    csv_path = csv_dir / "train_masks.csv"
    n = len(lines)
    expected = [
        f"{csv_path} line {n - 4}: another row for {third} (first on line {by_img[third] + 1}); none of its rows is used",
        f"{csv_path} line {n - 2}: expected 'image name,rle_mask', found 1 field(s): 'just-a-name.jpg'",
        f"{csv_path} line {n - 1}: expected 'image name,rle_mask', found 3 field(s): 'a.jpg,1 2,3 4'",
        f"{csv_path} line {n}: expected 'image name,rle_mask', found an empty img: ',1 2'",
        f"{csv_dir / 'train' / second}: no mask (no row for {second} in {csv_path})",  # the duplicated one: once
        f"{csv_path} line {n - 3}: row for cccccccccc01_01.jpg, which is not an image in {csv_dir / 'train'}",
    ]
    assert problems == expected
    names = {s.name + ".jpg" for s in samples}
    assert names == {s.name for s in (csv_dir / "train").iterdir()} - {second, third}
    assert fourth in names  # an untouched row still pairs
    with pytest.raises(DatasetError) as err:
        prepare_store(samples, MODEL_SIZE, "", csv_dir, problems)
    assert err.value.problems == problems


@pytest.mark.parametrize("rle, reason", [
    ("1 2 3", "odd count of numbers (3)"),
    ("1 2 x 4", "whitespace-separated integers"),
    ("6100 200", f"run 1 ('6100 200') ends past the last pixel, {IMAGE_SIZE[0] * IMAGE_SIZE[1]}"),
    ("0 5", "run 1 ('0 5') starts before pixel 1"),
    ("10 5 12 3", "run 2 ('12 3') starts before run 1 ends"),  # overlapping runs
    ("20 5 10 3", "run 2 ('10 3') starts before run 1 ends"),  # runs out of order
    ("10 0", "run 1 ('10 0') has a length below 1"),
])
def test_malformed_rle_is_an_error_naming_the_file_line_image_and_reason(csv_dir, rle, reason):
    lines = rows_of(csv_dir)
    n = line_of(csv_dir, FIRST)
    lines[n - 1] = f"{FIRST},{rle}"
    rewrite(csv_dir, lines)
    samples, problems = find_samples(csv_dir)
    assert problems == []  # the RLE is read when the mask is decoded, at its image's size
    with pytest.raises(DatasetError) as err:
        prepare_store(samples, MODEL_SIZE, "", csv_dir, problems)
    assert len(err.value.problems) == 1
    message = err.value.problems[0]
    assert message.startswith(f"{csv_dir / 'train_masks.csv'} line {n}: rle_mask of {FIRST} "
                              f"(a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image): ")
    assert reason in message


def test_every_malformed_row_is_listed_at_once(csv_dir):
    lines = rows_of(csv_dir)
    bad = {2: "1 2 3", 5: "0 4", len(lines): "99999999 1"}
    for n, rle in bad.items():
        lines[n - 1] = lines[n - 1].split(",")[0] + "," + rle
    rewrite(csv_dir, lines)
    samples, problems = find_samples(csv_dir)
    with pytest.raises(DatasetError) as err:
        prepare_store(samples, MODEL_SIZE, "", csv_dir, problems)
    assert [p.split(":")[0] for p in err.value.problems] == [f"{csv_dir / 'train_masks.csv'} line {n}" for n in bad]


def test_a_row_changed_after_it_was_read_is_refused_not_misread(csv_dir):
    samples, _ = find_samples(csv_dir)
    lines = rows_of(csv_dir)
    lines.insert(1, f"{FIRST}_extra.jpg,1 1")  # every later row moves
    rewrite(csv_dir, lines)
    _, problems = load_samples(samples, MODEL_SIZE)
    assert len(problems) == len(samples)
    assert problems[0] == (f"{csv_dir / 'train_masks.csv'} line 2: the row of {FIRST} has changed since "
                           "train_masks.csv was read; run again to read the new file")


# ---------------------------------------------------------------- the disk cache

def test_the_cache_is_keyed_by_the_rows_content(csv_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    samples, _ = find_samples(csv_dir)
    load_samples(samples, MODEL_SIZE, cache)
    decoded = []
    real_decode = dataset.decode_sample
    monkeypatch.setattr(dataset, "decode_sample", lambda s, *a, **k: decoded.append(s.name) or real_decode(s, *a, **k))

    # A touched CSV with the same rows (a re-download, a copy) and a row moved to another line: all cached.
    lines = rows_of(csv_dir)
    rewrite(csv_dir, [lines[0]] + lines[:0:-1])
    stat = os.stat(csv_dir / "train_masks.csv")
    os.utime(csv_dir / "train_masks.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    store, problems = load_samples(find_samples(csv_dir)[0], MODEL_SIZE, cache)
    assert problems == [] and decoded == []

    # One edited row: that image alone is decoded again, and its new mask is used.
    _, new_mask = car_picture(9, 1)
    lines = rows_of(csv_dir)
    n = line_of(csv_dir, FIRST)
    lines[n - 1] = f"{FIRST},{rle_encode(new_mask)}"
    rewrite(csv_dir, lines)
    store, problems = load_samples(find_samples(csv_dir)[0], MODEL_SIZE, cache)
    assert problems == [] and decoded == [FIRST[:-4]]
    assert np.array_equal(store.full_mask(0), new_mask)


def test_gif_and_csv_masks_of_one_image_are_different_cache_entries(kaggle_dir, tmp_path):
    cache = tmp_path / "cache"
    gif_samples, _ = find_samples(kaggle_dir)
    write_csv(gif_samples, kaggle_dir / "train_masks.csv")
    load_samples(gif_samples, MODEL_SIZE, cache)
    shutil.rmtree(kaggle_dir / "train_masks")
    load_samples(find_samples(kaggle_dir)[0], MODEL_SIZE, cache)
    assert len(list(cache.glob("*.npz"))) == 2 * len(gif_samples)


# ---------------------------------------------------------------- index size

def test_rows_are_held_as_offsets_not_text(csv_dir):
    # A 1918x1280 Kaggle row is ~8.5 kB of text; what the index keeps of it must not grow with it.
    lines = rows_of(csv_dir)
    long_rle = " ".join(f"{1 + 2 * i} 1" for i in range(2000))  # ~18 kB
    lines[1] = lines[1].split(",")[0] + "," + long_rle
    rewrite(csv_dir, lines)
    rows, _ = read_mask_csv(csv_dir / "train_masks.csv")
    row = rows[lines[1].split(",")[0]]
    assert row.length == len(long_rle) and all(len(str(getattr(row, f))) < 200 for f in RleRow.__dataclass_fields__)
    assert row.read() == long_rle


# ---------------------------------------------------------------- the tool: write and compare

def test_compare_finds_agreement_and_each_disagreement(kaggle_dir, tmp_path):
    csv_path = write_csv(find_samples(kaggle_dir)[0], tmp_path / "kaggle.csv")
    report = compare_csv_with_folder(csv_path, kaggle_dir)
    n = len(FAKE_CARS) * VIEWS
    assert report | {"differ": [], "csv_problems": []} == {
        "csv": str(csv_path), "rows": n, "compared": n, "same_text": n, "same_pixels": n, "differ": [],
        "csv_problems": [], "rows_without_mask": 0, "masks_without_row": 0}
    assert report["differ"] == []

    lines = csv_path.read_text().splitlines()
    lines[1] = lines[1] + " "                                   # extra whitespace: the same numbers
    img, rle = lines[2].split(",")
    numbers = rle.split()
    numbers[1] = str(int(numbers[1]) + 2)                       # a run 2 pixels longer
    lines[2] = f"{img}," + " ".join(numbers)
    lines[3] = lines[3].split(",")[0] + ",1 2 3"                # does not decode
    lines.append("dddddddddd01_01.jpg,1 1")                     # Kaggle's other cars: no mask file here
    csv_path.write_text("\n".join(lines) + "\n")
    report = compare_csv_with_folder(csv_path, kaggle_dir)
    assert (report["rows"], report["compared"], report["same_text"], report["same_pixels"]) == (n + 1, n, n - 2, n - 2)
    assert report["rows_without_mask"] == 1 and report["masks_without_row"] == 0
    assert report["differ"][0] == {"img": img, "line": 3, "same_text": False, "pixels_differ": 2}
    assert report["differ"][1]["line"] == 4 and "odd count" in report["differ"][1]["pixels_differ"]


def test_the_command_line_writes_and_compares(kaggle_dir, tmp_path, capsys):
    out = tmp_path / "train_masks.csv"
    dataset.main(["write-csv", str(kaggle_dir), str(out)])
    assert capsys.readouterr().out.strip() == str(out) and rows_of(tmp_path)[0] == "img,rle_mask"
    with pytest.raises(SystemExit) as err:
        dataset.main(["compare-csv", str(out), str(kaggle_dir)])
    assert err.value.code == 0 and '"same_pixels": 12' in capsys.readouterr().out
    lines = rows_of(tmp_path)
    lines[1] = lines[1].split(",")[0] + ","
    rewrite(tmp_path, lines)
    with pytest.raises(SystemExit) as err:
        dataset.main(["compare-csv", str(out), str(kaggle_dir)])
    assert err.value.code == 1


def test_write_refuses_a_sample_without_a_mask_file(csv_dir, tmp_path):
    with pytest.raises(ValueError, match="not a mask file"):
        write_csv(find_samples(csv_dir)[0], tmp_path / "again.csv")
    assert not (tmp_path / "again.csv").exists()


# ---------------------------------------------------------------- train.py and evaluate.py on it

@pytest.mark.slow
def test_training_on_the_csv_is_training_on_the_gifs(tmp_path):
    gif_dir = write_kaggle_dataset(tmp_path / "gif")
    csv_dir = tmp_path / "csv"
    shutil.copytree(gif_dir / "train", csv_dir / "train")
    write_csv(find_samples(gif_dir)[0], csv_dir / "train_masks.csv")
    results = {}
    for name, data_dir in (("gif", gif_dir), ("csv", csv_dir)):
        cfg = tiny_config(data_dir, tmp_path / name, epochs=3, batch_size=2, lr=3e-2, warmup_epochs=0.5)
        summary = train.train(cfg)
        result = evaluate.evaluate_checkpoint(EvaluateConfig(
            checkpoint=str(Path(summary["run_dir"]) / "best.pt"), data_dir=str(data_dir), cache_dir=cfg.cache_dir,
            device="cpu", out_dir=str(tmp_path / name / "eval"), worst_k=1, num_samples=1))
        results[name] = (summary["train_loss"], summary["val_dice_full_res"], result["full_res"]["dice"])
    assert results["csv"] == results["gif"]
    assert 0 < results["csv"][1] < 1  # a model that learned something from these masks


# ---------------------------------------------------------------- real Carvana masks

REAL_SIZE = (1918, 1280)


@pytest.fixture(scope="module")
def real_csv_dir(carvana_dir, tmp_path_factory):
    """train/ with links to two real cars' photos and a train_masks.csv encoded from their real GIFs, no train_masks/;
    returns (folder, the real GIF-masked samples)."""
    samples, problems = find_samples(carvana_dir)
    assert problems == [], problems[:5]
    cars = sorted({s.group for s in samples})[:2]
    chosen = [s for s in samples if s.group in cars]
    root = tmp_path_factory.mktemp("real-csv")
    (root / "train").mkdir()
    for sample in chosen:
        (root / "train" / sample.image.name).symlink_to(sample.image.resolve())
    write_csv(chosen, root / "train_masks.csv")
    return root, chosen


def reference_rle(mask: np.ndarray) -> str:
    """Kaggle's definition run by run, independent of rle_encode: 1-indexed 'start length' pairs over the
    mask flattened row by row."""
    numbers, position = [], 1
    for value, run in itertools.groupby(mask.ravel().tolist()):
        length = sum(1 for _ in run)
        if value:
            numbers += [position, length]
        position += length
    return " ".join(map(str, numbers))


def test_real_masks_from_the_csv_equal_the_gifs_pixel_for_pixel(real_csv_dir, carvana_dir):
    root, chosen = real_csv_dir
    samples, problems = find_samples(root)
    assert problems == [] and [s.name for s in samples] == [s.name for s in chosen]
    assert all(isinstance(s.mask, RleRow) for s in samples)
    store = prepare_store(samples, (96, 64))
    for i, sample in enumerate(chosen):
        assert store.full_sizes[i] == REAL_SIZE  # read from each photo, not assumed
        assert np.array_equal(store.full_mask(i), load_mask(sample.mask)), sample.name
    report = compare_csv_with_folder(root / "train_masks.csv", carvana_dir)  # the checker's tool, on the real GIFs
    assert (report["compared"], report["same_text"], report["same_pixels"]) == (len(chosen),) * 3, report["differ"]


def test_rle_of_a_real_mask_follows_kaggles_definition_and_round_trips(real_csv_dir):
    _, chosen = real_csv_dir
    mask = load_mask(chosen[len(chosen) // 2].mask)
    assert mask.shape == (REAL_SIZE[1], REAL_SIZE[0])
    rle = rle_encode(mask)
    assert rle == reference_rle(mask)
    assert np.array_equal(rle_decode(rle, mask.shape), mask)
    first = np.argwhere(mask)[0]  # (row, column) of the first car pixel, scanning rows top to bottom
    assert int(rle.split()[0]) == first[0] * REAL_SIZE[0] + first[1] + 1  # row by row, 1-indexed
    assert not np.array_equal(rle_decode(rle, mask.shape[::-1]).T, mask)  # and the other order would be wrong


def test_train_and_evaluate_on_real_photos_with_only_a_train_masks_csv(real_csv_dir, tmp_path):
    root, _ = real_csv_dir
    cfg = tiny_config(root, tmp_path, image_width=96, image_height=64, epochs=1, batch_size=8, run_name="real-csv")
    summary = train.train(cfg)
    assert summary["epoch"] == 1 and np.isfinite(summary["train_loss"])
    result = evaluate.evaluate_checkpoint(EvaluateConfig(
        checkpoint=str(Path(summary["run_dir"]) / "best.pt"), data_dir=str(root), cache_dir=cfg.cache_dir,
        out_dir=str(tmp_path / "eval"), device="cpu", worst_k=1, num_samples=1))
    assert result["cars"] == 1 and result["full_res"]["images"] == 16
    assert result["full_res"]["dice"] == pytest.approx(summary["val_dice_full_res"], abs=1e-6)
