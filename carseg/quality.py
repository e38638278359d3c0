"""quality.csv: predict.py's per-photo quality scores, one row per mask in its --out-dir.

    photo,mask,model,quality,flagged
    street/IMG_0042.jpg,IMG_0042_mask.png,everyday,0.412,yes

`quality` is inference.Predictor.quality of the model that answered (`model`); `flagged` says whether
it fell below --flag-below. The file describes the masks in the folder: a later run into the same
folder replaces the rows of the masks it rewrites and keeps the others, so --skip-existing and runs
over several folders leave one complete table. A file of that name whose first line is not this
header is the user's own and is refused, never replaced.
"""
import csv
import io
from pathlib import Path

from carseg import atomic

FILE = "quality.csv"
HEADER = ("photo", "mask", "model", "quality", "flagged")


def row(photo: Path, mask: Path, model: str, quality: float, flag_below: float) -> dict:
    """One photo's row: its input as given, its mask's file name, the model, the score to 4 places."""
    return {"photo": atomic.shown(str(photo)), "mask": atomic.shown(mask.name), "model": model,
            "quality": f"{quality:.4f}", "flagged": "yes" if quality < flag_below else "no"}


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


def update(out_dir, rows: list) -> Path:
    """Write OUT_DIR/quality.csv atomically: `rows` (in input order), then the earlier file's rows of
    masks this run did not write that still exist. Returns its path."""
    path = Path(out_dir) / FILE
    written = {r["mask"] for r in rows}
    kept = [r for r in read(path) if r["mask"] not in written and (Path(out_dir) / r["mask"]).is_file()]
    text = io.StringIO()
    writer = csv.DictWriter(text, HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows + kept)
    atomic.write_text(path, text.getvalue())
    return path


def read(path) -> list:
    """The rows of a quality table as dicts ([] where there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
