"""Protects Kaggle's run-length encoding: hand-computed cases, round trips, malformed input, the CSV on bare arrays."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from carseg.rle import compare_mask_csv, read_mask_csv, rle_decode, rle_encode, write_mask_csv


@pytest.mark.parametrize("mask, expected", [
    ([[0, 1, 1], [1, 0, 0]], "2 3"),            # row-major: runs cross row ends, no transposition
    ([[1, 0], [0, 1]], "1 1 4 1"),              # runs at the very start and the very end
    ([[0, 0], [0, 0]], ""),                     # empty mask: empty string
    ([[1, 1], [1, 1]], "1 4"),
    ([[255, 0, 255]], "1 1 3 1"),               # any non-zero value is car
])
def test_rle_encode_hand_computed(mask, expected):
    assert rle_encode(np.array(mask)) == expected


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 1)))
def test_rle_round_trip(mask):
    assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


@pytest.mark.parametrize("rle", ["1", "a b", "0 2", "3 0", "5 3", "1 2 2 1", "3 1 1 1", "1.5 2"])
def test_rle_decode_rejects_malformed(rle):
    with pytest.raises(ValueError):
        rle_decode(rle, (2, 3))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789 -x\n", max_size=30))
def test_rle_decode_never_crashes_otherwise(rle):
    # Any text either decodes to a {0,1} mask of the right shape or raises ValueError.
    try:
        mask = rle_decode(rle, (3, 4))
    except ValueError:
        return
    assert mask.shape == (3, 4) and set(np.unique(mask)) <= {0, 1}


def test_train_masks_csv_written_and_compared_from_arrays(tmp_path):
    # rle.py needs no data folder: {img: mask} in, Kaggle's CSV out, rows sorted by img.
    masks = {"b_01.jpg": np.array([[0, 1], [1, 1]]), "a_01.jpg": np.zeros((2, 2), np.uint8)}
    path = write_mask_csv(masks, tmp_path / "train_masks.csv")
    assert path.read_text() == "img,rle_mask\na_01.jpg,\nb_01.jpg,2 3\n"
    rows, problems = read_mask_csv(path)
    assert problems == [] and rows["b_01.jpg"].line == 3 and rows["b_01.jpg"].read() == "2 3"
    report = compare_mask_csv(path, masks | {"c_01.jpg": np.ones((2, 2))})
    assert (report["rows"], report["compared"], report["same_text"], report["same_pixels"]) == (2, 2, 2, 2)
    assert report["masks_without_row"] == 1 and report["rows_without_mask"] == 0 and report["differ"] == []
    report = compare_mask_csv(path, {"b_01.jpg": np.array([[1, 1], [1, 1]])})
    assert report["differ"] == [{"img": "b_01.jpg", "line": 3, "same_text": False, "pixels_differ": 1}]


def test_a_name_with_a_comma_or_a_quote_is_quoted_and_read_back(tmp_path):
    masks = {"a,b.jpg": np.array([[0, 1], [1, 1]]), 'say "cheese".jpg': np.ones((2, 2)), "plain.jpg": np.zeros((2, 2))}
    path = write_mask_csv(masks, tmp_path / "train_masks.csv")
    assert path.read_text() == 'img,rle_mask\n"a,b.jpg",2 3\nplain.jpg,\n"say ""cheese"".jpg",1 4\n'  # csv rules
    rows, problems = read_mask_csv(path)
    assert problems == [] and {img: row.read() for img, row in rows.items()} == {
        "a,b.jpg": "2 3", "plain.jpg": "", 'say "cheese".jpg': "1 4"}
    report = compare_mask_csv(path, masks)
    assert report["same_pixels"] == report["compared"] == 3 and report["csv_problems"] == []


@pytest.mark.parametrize("name, why", [(os.fsdecode(b"caf\xe9.jpg"), r"'caf\\xe9.jpg' is not UTF-8"),
                                       ("line\nbreak.jpg", r"'line\\nbreak.jpg' holds a line break")])
def test_a_name_the_csv_cannot_hold_is_refused_naming_it_before_anything_is_written(tmp_path, name, why):
    (tmp_path / "train_masks.csv").write_text("img,rle_mask\nearlier.jpg,1 1\n")
    with pytest.raises(ValueError, match=f"cannot write .*train_masks.csv: the image name {why}"):
        write_mask_csv({"a.jpg": np.ones((2, 2)), name: np.ones((2, 2))}, tmp_path / "train_masks.csv")
    assert (tmp_path / "train_masks.csv").read_text() == "img,rle_mask\nearlier.jpg,1 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["train_masks.csv"]
