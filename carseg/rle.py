"""Kaggle's run-length encoding: masks <-> `start length` text, and the train_masks.csv file.

The format is the Carvana competition's: a CSV with the header `img,rle_mask`, one row per image
(`img` its file name, e.g. 0cdf5b5d0ce1_01.jpg), and `rle_mask` the mask as space-separated
`start length` pairs: 1-indexed pixel positions over the (H, W) mask flattened row by row
(row-major, no transposition; runs may cross row ends), in increasing order, for the car pixels.
An empty `rle_mask` is an empty mask. Kaggle ships its training masks this way (train_masks.csv,
1280x1918 masks) and takes submissions this way.

This module knows the text, not data folders: which image a mask belongs to is dataset.py's
business (it pairs train/ with the rows read here), and `python dataset.py write-csv / compare-csv`
runs the CSV tools below on a data folder's mask files.
"""
import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from carseg.atomic import atomic_write

MASK_CSV_HEADER = "img,rle_mask"
QUOTED_FIELD = re.compile(rb'\s*"((?:[^"]|"")*)"\s*')  # a csv-quoted field at the start of a row


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle's run-length encoding: 1-indexed 'start length' pairs over the row-major flattened mask."""
    flat = np.asarray(mask).ravel() > 0
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # 0-indexed positions where a run starts or ends
    edges = np.concatenate([[0] if flat[:1].any() else [], edges, [flat.size] if flat[-1:].any() else []])
    edges = edges.astype(np.int64)
    starts, ends = edges[::2], edges[1::2]
    pairs = np.stack([starts + 1, ends - starts], axis=1).ravel()
    return " ".join(map(str, pairs.tolist()))


def rle_decode(rle: str, shape) -> np.ndarray:
    """Inverse of rle_encode: a uint8 {0,1} mask of shape (H, W); malformed input is a ValueError."""
    h, w = shape
    try:
        numbers = np.array(rle.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        raise ValueError(f"RLE must be whitespace-separated integers, got {rle[:40]!r}")
    if len(numbers) % 2:
        raise ValueError(f"RLE must hold 'start length' pairs, got an odd count of numbers ({len(numbers)})")
    starts, lengths = numbers[::2] - 1, numbers[1::2]
    ends = starts + lengths
    bad = np.flatnonzero((starts < 0) | (lengths < 1) | (ends > h * w) | np.r_[False, starts[1:] < ends[:-1]])
    if len(bad):
        i = bad[0]
        why = ("starts before pixel 1" if starts[i] < 0 else "has a length below 1" if lengths[i] < 1 else
               f"ends past the last pixel, {h * w}" if ends[i] > h * w else f"starts before run {i} ends")
        raise ValueError(f"RLE run {i + 1} ('{starts[i] + 1} {lengths[i]}') {why}: runs must be increasing, "
                         f"non-overlapping and inside {w}x{h}")
    # background, run, background, run, ..., background: one np.repeat, 1 ms for a Carvana mask (a
    # cumulative sum over all 2.5 M pixels took 13 ms)
    gaps = np.diff(np.column_stack([starts, ends]).ravel(), prepend=0, append=h * w)
    values = np.zeros(len(gaps), np.uint8)
    values[1::2] = 1
    return np.repeat(values, gaps).reshape(h, w)


# ---------------------------------------------------------------- reading train_masks.csv

@dataclass(frozen=True)
class RleRow:
    """Where one image's row of a train_masks.csv is (a Sample's mask source), not what it says.

    The full CSV is 5,088 rows of ~8.5 kB: as text that would be ~45 MB of RAM for the whole run,
    as offsets it is a few hundred bytes a row. `digest` (SHA-1 of the rle_mask field's bytes) is the
    row's identity in the sample cache, and is checked again when the row is read back.
    """
    source: Path  # the CSV file
    line: int     # 1-based line number, for messages
    img: str      # the row's img field: the image's file name
    offset: int   # byte offset of the rle_mask field in the file
    length: int   # its length in bytes
    digest: str

    def __str__(self):
        return f"{self.source} line {self.line}"

    def read(self) -> str:
        """The row's rle_mask text, as indexed; ValueError if the file has changed there since."""
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            raw = f.read(self.length)
        if hashlib.sha1(raw).hexdigest() != self.digest:
            raise ValueError(f"{self}: the row of {self.img} has changed since {self.source.name} was read; "
                             "run again to read the new file")
        return raw.strip().strip(b'"').decode("ascii", errors="replace")

    def decode(self, size) -> np.ndarray:
        """The row's mask for an image of size (width, height): uint8 {0,1} (height, width)."""
        rle = self.read()
        try:
            return rle_decode(rle, (size[1], size[0]))
        except ValueError as err:
            raise ValueError(f"{self}: rle_mask of {self.img} (a {size[0]}x{size[1]} image): {err}") from None


def read_mask_csv(path) -> tuple[dict, list]:
    """Index Kaggle's train_masks.csv: ({img: RleRow, or None where img has several rows}, problems).

    The header must be `img,rle_mask`; a wrong one is a ValueError, since no row can then be read
    safely. A quoted img (csv rules, as write_mask_csv writes a name with a comma) is unquoted.
    Every other problem (a row without two fields, an empty img, a second row for an image) is
    listed with its line and the file is read to the end. An empty rle_mask is an empty mask.
    The RLE itself is checked when a row is decoded, at its image's size (RleRow.decode).
    """
    path = Path(path)
    rows, first_line, problems = {}, {}, []
    with open(path, "rb") as f:
        header = f.readline()
        found = header.decode("utf-8-sig", errors="replace").strip()
        if [c.strip().strip('"').lower() for c in found.split(",")] != MASK_CSV_HEADER.split(","):
            raise ValueError(f"{path} line 1: expected the header '{MASK_CSV_HEADER}' (Kaggle's train_masks.csv), "
                             f"found {found[:60]!r}" + (" (an empty file)" if not header else ""))
        offset = len(header)
        for number, line in enumerate(f, start=2):
            start, offset = offset, offset + len(line)
            text = line.rstrip(b"\r\n")
            if not text.strip():
                continue  # blank lines (a trailing newline, an editor's extra one) hold no row
            head, img, others = _split_row(text)
            if len(others) != 1 or not img:
                what = f"{len(others) + 1} field(s)" if len(others) != 1 else "an empty img"
                problems.append(f"{path} line {number}: expected 'image name,rle_mask', found {what}: "
                                f"{text[:60].decode('utf-8', errors='replace')!r}")
                continue
            row = RleRow(path, number, img, start + len(head) + 1, len(others[0]),
                         hashlib.sha1(others[0]).hexdigest())
            if img in first_line:
                problems.append(f"{path} line {number}: another row for {img} (first on line "
                                f"{first_line[img]}); none of its rows is used")
                rows[img] = None
                continue
            rows[img], first_line[img] = row, number
    return rows, problems


def _split_row(text: bytes) -> tuple:
    """A row's (img field as it stands in the line, img, the fields after it as bytes).

    A quoted img is read by the csv rules write_mask_csv and carseg/submission.py write by: it may hold
    commas, and "" stands for a quote. Anything else is split at every comma, as before.
    """
    quoted = QUOTED_FIELD.match(text)
    if quoted and text[quoted.end():quoted.end() + 1] in (b",", b""):
        head, rest = text[:quoted.end()], text[quoted.end() + 1:]
        others = rest.split(b",") if len(text) > quoted.end() else []
        img = quoted.group(1).replace(b'""', b'"')
    else:
        head, *others = text.split(b",")
        img = head.strip().strip(b'"')
    return head, img.decode("utf-8", errors="replace"), others


# ---------------------------------------------------------------- train_masks.csv from and against masks

def write_mask_csv(masks: dict, path, load=np.asarray) -> Path:
    """Write masks as Kaggle's train_masks.csv: header img,rle_mask, one row per image, sorted by img.

    `masks` is {img: mask source}, img being the image's file name; `load(source)` gives the mask as
    an (H, W) array, non-zero is car (by default the source is that array). Masks are loaded one at a
    time, so a training set's 5,088 never sit in memory together. The file is written atomically.
    Names are quoted by the csv module's rules (a comma, a quote), as predict.py's submission quotes
    them; a name the file cannot hold is a ValueError naming it, before anything is written (unwritable_name).
    """
    path = Path(path)
    for img in masks:
        why = unwritable_name(img)
        if why:
            # bytes that are not UTF-8 escaped (caf\xe9.jpg), a line break as \n: the message stays one line
            shown = os.fsencode(img).decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")
            raise ValueError(f"cannot write {path}: the image name '{shown}' {why}; rename the image")
    with atomic_write(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        rows = csv.writer(text, lineterminator="\n")
        rows.writerow(MASK_CSV_HEADER.split(","))
        for img in tqdm(sorted(masks), desc="encoding", unit="mask", leave=False, disable=None):
            rows.writerow((img, rle_encode(load(masks[img]))))
        text.flush()
        text.detach()  # flushed, and `f` left open for atomic_write to fsync and rename
    return path


def unwritable_name(img: str) -> str | None:
    """Why `img` cannot be a row's img field, or None.

    Not UTF-8 (a Latin-1 'café.jpg', which Python carries as lone surrogates): the file is UTF-8, and
    an escaped or replaced name would be another name, matching no image. A line break: CSV could quote
    it, but every reader of train_masks.csv here (read_mask_csv) and most elsewhere take a row per line.
    """
    try:
        img.encode("utf-8")
    except UnicodeEncodeError:
        return "is not UTF-8, which the CSV cannot hold unchanged"
    if "\n" in img or "\r" in img:
        return "holds a line break, which would split its row"
    return None


def compare_mask_csv(csv_path, masks: dict, load=np.asarray, limit: int = 20) -> dict:
    """Check a train_masks.csv against masks ({img: mask source}, loaded by `load` as in write_mask_csv):
    for every img with both, our rle_encode of the mask must be the row, number for number, and the row
    must decode to the mask.

    Returns counts (rows, compared, same_text, same_pixels), up to `limit` rows that differ (img,
    line, differing pixels or why the row does not decode), the CSV's own problems, and how many rows
    have no mask and masks no row. The CSV's header is checked as read_mask_csv does (ValueError).
    """
    rows, problems = read_mask_csv(csv_path)
    found = sorted((row for row in rows.values() if row is not None), key=lambda row: row.line)
    report = {"csv": str(csv_path), "rows": len(found), "compared": 0, "same_text": 0, "same_pixels": 0,
              "differ": [], "csv_problems": problems, "rows_without_mask": sum(r.img not in masks for r in found),
              "masks_without_row": len(masks.keys() - rows.keys())}
    for row in tqdm([r for r in found if r.img in masks], desc="comparing", unit="mask", leave=False, disable=None):
        mask, theirs = np.asarray(load(masks[row.img])), row.read()
        same_text = rle_encode(mask).split() == theirs.split()
        try:
            wrong = int(np.count_nonzero(rle_decode(theirs, mask.shape) != (mask > 0)))
        except ValueError as err:
            wrong = str(err)
        report["compared"] += 1
        report["same_text"] += same_text
        report["same_pixels"] += wrong == 0
        if (not same_text or wrong != 0) and len(report["differ"]) < limit:
            report["differ"].append({"img": row.img, "line": row.line, "same_text": same_text, "pixels_differ": wrong})
    return report
