"""Measure the per-photo choice of router.py and the quality score on studio and everyday photos.

    python scripts/route_study.py --carvana data/carvana --carparts data/carparts \\
        --holdout data/everyday/holdout.txt --labels data/everyday --out route-study.json

For every photo it records what the router reads (the backdrop share, each model's quality score)
and what each model's mask scores against the truth there is:
- studio, held out: the studio model's validation cars (every view), full-resolution Dice of both
  models (no model trained on these cars: the everyday checkpoint's validation cars include them, checked);
- studio, calibration: --calibration views of the studio model's training cars (backdrop and quality only);
- everyday, held out: the car-parts photos listed in --holdout: part recall, background specificity,
  usable (carseg/everyday.py) and, with --labels, IoU against the teacher-completed pseudo-truth;
- everyday, calibration: the other car-parts photos (the everyday model trained on them).
Then prints, for the thresholds in router.py: the held-out photos routed to each model, the studio
mean Dice and the everyday usable share of the router's answers, and the quality score's rank
correlation with per-photo truth (Spearman) and how many of the worst 5 % are in its lowest 10 %.
"""
import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/...` puts scripts/ on the path, not the project

from carseg import atomic, everyday  # noqa: E402
from carseg.checkpoint import load_checkpoint  # noqa: E402
from carseg.labels import read_coco  # noqa: E402
from config import QUALITY_FLAG  # noqa: E402
from dataset import load_mask  # noqa: E402
from inference import Predictor  # noqa: E402
import router  # noqa: E402
from everyday_eval import pseudo_truth  # noqa: E402 (a script beside this one)

SEED = 0


def scored(model: Predictor, images, full_size):
    """(full-size bool car mask, quality) of one photo from one model."""
    answer = model.answer([images])[0]
    prob = Predictor.upsample(answer.probs, full_size)
    return (prob > answer.threshold).cpu().numpy(), answer.quality


def studio_rows(pair: router.Router, carvana: Path, cars: set, views_per_car: int, with_truth: bool) -> list:
    studio, street = pair.studio, pair.everyday
    photos = sorted(p for p in (carvana / "train").glob("*.jpg") if p.stem.rsplit("_", 1)[0] in cars)
    if views_per_car:
        by_car = {}
        for p in photos:
            by_car.setdefault(p.stem.rsplit("_", 1)[0], []).append(p)
        rng = random.Random(SEED)
        photos = sorted(q for views in by_car.values() for q in rng.sample(views, min(views_per_car, len(views))))
    rows = []
    for photo in tqdm(photos, desc="studio", unit="photo", leave=False):
        (a, b), full_size = pair.read(photo)
        row = {"photo": photo.name, "backdrop": router.backdrop_share(a)}
        studio_mask, row["q_studio"] = scored(studio, a, full_size)
        if with_truth:
            truth = load_mask(carvana / "train_masks" / f"{photo.stem}_mask.gif") > 0
            street_mask, row["q_everyday"] = scored(street, b, full_size)
            row["dice_studio"], row["dice_everyday"] = dice(studio_mask, truth), dice(street_mask, truth)
        rows.append(row)
    return rows


def studio_training_cars(checkpoint: dict, carvana: Path) -> set:
    """The studio model's training cars: as recorded, else (a checkpoint from before format 3 kept only
    its validation cars) every car in --carvana but those."""
    if checkpoint.get("train_groups"):
        return set(checkpoint["train_groups"])
    return {p.stem.rsplit("_", 1)[0] for p in (carvana / "train").glob("*.jpg")} - set(checkpoint["val_groups"])


def dice(pred, truth) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def everyday_rows(pair: router.Router, items, labels: Path | None) -> list:
    rows = []
    for photo, shapes in tqdm(items, desc="everyday", unit="photo", leave=False):
        union = everyday.parts_union(shapes.rasterize())
        hull = everyday.dilated_hull(union)
        truth = pseudo_truth(labels, photo, union, hull)
        (a, b), full_size = pair.read(photo)
        row = {"photo": photo.name, "backdrop": router.backdrop_share(a)}
        for key, model, image in (("studio", pair.studio, a), ("everyday", pair.everyday, b)):
            mask, row[f"q_{key}"] = scored(model, image, full_size)
            for name, value in everyday.partial_scores(mask, union, hull).items():
                row[f"{name}_{key}"] = float(value)
            if truth is not None:
                row[f"iou_{key}"] = float((mask & truth).sum() / max(1, (mask | truth).sum()))
        rows.append(row)
    return rows


def routed(row) -> str:
    """Which model router.Router answers this photo with (its rule, on the recorded numbers)."""
    studio = row["backdrop"] >= router.STUDIO_BACKDROP and row["q_studio"] >= router.STUDIO_QUALITY
    return "studio" if studio else "everyday"


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def worst_caught(quality, truth, worst=0.05, lowest=0.10) -> tuple:
    """(how many of the worst `worst` share by truth are among the lowest `lowest` share by quality, of how many)."""
    n = len(truth)
    bad = set(np.argsort(truth)[:max(1, round(worst * n))])
    low = set(np.argsort(quality)[:max(1, round(lowest * n))])
    return len(bad & low), len(bad)


def report(study: dict):
    cal_s, cal_e = study["studio_calibration"], study["everyday_calibration"]
    held_s, held_e = study["studio_heldout"], study["everyday_heldout"]
    print(f"thresholds: backdrop >= {router.STUDIO_BACKDROP}, studio quality >= {router.STUDIO_QUALITY}")
    for name, rows, right in (("studio calibration", cal_s, "studio"), ("everyday calibration", cal_e, "everyday"),
                              ("studio held out", held_s, "studio"), ("everyday held out", held_e, "everyday")):
        wrong = [r["photo"] for r in rows if routed(r) != right]
        print(f"{name:>22}: {len(rows)} photos, {len(wrong)} routed to the other model {wrong[:6]}")
    pick = lambda r, key: r[f"{key}_{routed(r)}"]  # noqa: E731
    d = {k: np.array([r[f"dice_{k}"] for r in held_s]) for k in ("studio", "everyday")}
    d["router"] = np.array([pick(r, "dice") for r in held_s])
    for k, v in d.items():
        print(f"studio held out, {k:>8}: mean Dice {v.mean():.5f} (s.e. {v.std(ddof=1) / np.sqrt(len(v)):.5f})")
    for k in ("studio", "everyday", "router"):
        get = (lambda r, m: r[f"{m}_{k}"]) if k != "router" else pick
        usable = np.mean([get(r, "usable") for r in held_e])
        line = (f"everyday held out, {k:>8}: usable {usable:.1%}  recall {np.mean([get(r, 'recall') for r in held_e]):.3f}"
                f"  specificity {np.mean([get(r, 'specificity') for r in held_e]):.3f}")
        if all("iou_studio" in r for r in held_e):
            iou = np.array([get(r, "iou") for r in held_e])
            line += f"  pseudo-truth IoU {iou.mean():.3f} ({np.mean(iou >= 0.9):.0%} >= 0.9)"
        print(line)
    q = np.array([pick(r, "q") for r in held_s])
    caught = worst_caught(q, d["router"])
    print(f"quality vs studio Dice (router): Spearman {spearman(q, d['router']):.3f}; worst 5 % in lowest 10 %: "
          f"{caught[0]} of {caught[1]}; quality p5/p50/p95 {np.percentile(q, [5, 50, 95]).round(3).tolist()}")
    q = np.array([pick(r, "q") for r in held_e])
    for key in ("recall", "specificity", "iou"):
        if all(f"{key}_studio" in r for r in held_e):
            truth = np.array([pick(r, key) for r in held_e])
            caught = worst_caught(q, truth)
            print(f"quality vs everyday {key} (router): Spearman {spearman(q, truth):.3f}; worst 5 % in lowest 10 %: "
                  f"{caught[0]} of {caught[1]}")
    usable = np.array([pick(r, "usable") for r in held_e], bool)
    # With 3 unusable photos in 80, a rank correlation says little; the AUC says how often an unusable
    # photo scores below a usable one (0.5: chance, 1: always).
    auc = np.mean([a < b for a in q[~usable] for b in q[usable]]) if (~usable).any() else float("nan")
    print(f"quality vs everyday usable (router): Spearman {spearman(q, usable.astype(float)):.3f}, AUC {auc:.3f}; below "
          f"{QUALITY_FLAG}: {int((q < QUALITY_FLAG).sum())} of {len(q)} photos, {int((q[~usable] < QUALITY_FLAG).sum())} of "
          f"the {int((~usable).sum())} unusable; studio photos below it: "
          f"{int((np.array([pick(r, 'q') for r in held_s]) < QUALITY_FLAG).sum())} of {len(held_s)}")
    print(f"everyday quality: usable photos mean {q[usable].mean():.3f}, unusable {q[~usable].mean() if (~usable).any() else float('nan'):.3f};"
          f" p5/p50/p95 {np.percentile(q, [5, 50, 95]).round(3).tolist()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studio", default=str(ROOT / "checkpoints" / "carvana_unet.pt"))
    parser.add_argument("--everyday", default=str(ROOT / "checkpoints" / "everyday.pt"))
    parser.add_argument("--carvana", type=Path, required=True, help="Kaggle layout: train/ and train_masks/")
    parser.add_argument("--carparts", type=Path, required=True, help="annotations.json + JPEGImages/")
    parser.add_argument("--holdout", type=Path, required=True, help="car-parts photos held out, one name a line")
    parser.add_argument("--labels", type=Path, help="a make_everyday_data.py folder: adds the pseudo-truth IoU")
    parser.add_argument("--calibration", type=int, default=1, help="views per studio training car to calibrate on")
    parser.add_argument("--out", type=Path, help="write every photo's numbers here as JSON")
    parser.add_argument("--report", type=Path, help="print the report of an earlier --out, measuring nothing")
    args = parser.parse_args(argv)
    if args.report:
        return report(json.loads(args.report.read_text()))
    torch.set_grad_enabled(False)
    pair = router.Router.from_checkpoints(args.studio, args.everyday)
    source = load_checkpoint(args.studio)
    val_cars = set(source["val_groups"])
    trained = val_cars & set(load_checkpoint(args.everyday).get("train_groups", []))
    if trained:
        raise SystemExit(f"error: the everyday model trained on studio validation cars {sorted(trained)[:3]}")
    items, _, problems = read_coco(args.carparts / "annotations.json", args.carparts / "JPEGImages")
    held = {line.strip() for line in args.holdout.read_text().splitlines() if line.strip()}
    study = {
        "studio_heldout": studio_rows(pair, args.carvana, val_cars, 0, True),
        "studio_calibration": studio_rows(pair, args.carvana, studio_training_cars(source, args.carvana),
                                          args.calibration, False),
        "everyday_heldout": everyday_rows(pair, [i for i in items if i[0].name in held], args.labels),
        "everyday_calibration": everyday_rows(pair, [i for i in items if i[0].name not in held], None),
    }
    if args.out:
        atomic.write_text(args.out, json.dumps(study) + "\n")
    report(study)
    return study


if __name__ == "__main__":
    main()
