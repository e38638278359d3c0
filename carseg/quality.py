"""quality.csv: predict.py's per-photo quality scores, one row per mask in its --out-dir.

    photo,mask,model,quality,flagged
    street/IMG_0042.jpg,IMG_0042_mask.png,everyday,0.412,yes

`quality` is inference.Predictor.quality of the model that answered (`model`); `flagged` says whether
it fell below --flag-below. Each mask PNG carries its own model and score too (MASK_TEXT). The file
describes the masks in the folder: a later run into the same folder replaces the rows of the masks it rewrites and keeps the others, so --skip-existing and runs
over several folders leave one complete table. A file of that name whose first line is not this
header is the user's own and is refused, never replaced.
"""
import csv
import io
from pathlib import Path

from carseg import atomic
from carseg.images import png_text

FILE = "quality.csv"
HEADER = ("photo", "mask", "model", "quality", "flagged")
# Each mask PNG also carries its model and score as tEXt chunks, so a run resumed with --skip-existing
# rebuilds the rows of the masks it reuses (a killed run never wrote its table) without the model.
MASK_TEXT = ("car-segmentation model", "car-segmentation quality")


def row(photo: Path, mask: Path, model: str, quality: float, flag_below: float) -> dict:
    """One photo's row: its input as given, its mask's file name, the model, the score to 4 places."""
    return {"photo": atomic.shown(str(photo)), "mask": atomic.shown(mask.name), "model": model,
            "quality": f"{quality:.4f}", "flagged": "yes" if quality < flag_below else "no"}


def mask_text(score: dict) -> dict:
    """The tEXt chunks a mask PNG carries for its quality.csv row."""
    return {MASK_TEXT[0]: score["model"], MASK_TEXT[1]: score["quality"]}


def row_from_mask(photo: Path, mask: Path, flag_below: float) -> dict | None:
    """A reused mask's row, from the tEXt chunks it was written with (None for a mask without them)."""
    text = png_text(mask)
    if not all(key in text for key in MASK_TEXT):
        return None
    return row(photo, mask, text[MASK_TEXT[0]], float(text[MASK_TEXT[1]]), flag_below)


def refuse_foreign(out_dir) -> None:
    """ValueError if OUT_DIR/quality.csv exists and is not a quality table (the user's own file)."""
    path = Path(out_dir) / FILE
    if path.is_dir():
        raise ValueError(f"{path} is a folder; predict.py writes its quality table there: move it or choose "
                         "another --out-dir")
    if path.exists() and _header(path) != HEADER:
        raise ValueError(f"{path} exists and is not a quality table of predict.py (its first line is not "
                         f"{','.join(HEADER)}); move it or choose another --out-dir")


def _header(path: Path) -> tuple:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return tuple(next(csv.reader(f), ()))
    except (UnicodeDecodeError, csv.Error):
        return ()


def update(out_dir, rows: list, masks: list) -> Path:
    """Write OUT_DIR/quality.csv atomically: a row per mask of this run's inputs, in input order (`masks`:
    their mask paths), from `rows` (the photos this run predicted) or else the earlier file (the photos
    --skip-existing reused), then the earlier file's rows of other masks that still exist. So a killed
    run resumed writes the file a run that was never stopped writes. Returns its path."""
    path = Path(out_dir) / FILE
    fresh = {r["mask"]: r for r in rows}
    earlier = {r["mask"]: r for r in read(path) if (Path(out_dir) / r["mask"]).is_file()}
    names = [atomic.shown(mask.name) for mask in masks]
    ordered = [fresh.get(name) or earlier.get(name) for name in names]
    this_run = set(names)
    others = [r for name, r in earlier.items() if name not in this_run]
    text = io.StringIO()
    writer = csv.DictWriter(text, HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows([r for r in ordered if r is not None] + others)
    atomic.write_text(path, text.getvalue())
    return path


def read(path) -> list:
    """The rows of a quality table as dicts ([] where there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
