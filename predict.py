"""Cut cars out of photos: write a full-size mask (and optionally an overlay and a cutout) per image.

    python predict.py photos/ more/*.jpg --out-dir masks/ --cutout

For each input, OUT_DIR/<stem>_mask.png is a single-channel 0/255 PNG of the input's own size.
A file that cannot be read is reported with its reason and the rest are still processed; the exit
status is 1 if any input failed. Outputs are written atomically and never over an input.
"""
import csv
import glob
import io
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import atomic
from config import PredictConfig, parse_config, resolve_checkpoint
from dataset import IMAGE_EXTENSIONS, load_image, rle_encode
from inference import Predictor

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = ("_mask.png", "_overlay.jpg", "_cutout.png")


def collect_inputs(inputs, recursive=False):
    """Expand files, folders and globs into image paths; returns (paths, problems)."""
    paths, problems = [], []
    for item in inputs:
        matches = [Path(p) for p in sorted(glob.glob(item, recursive=recursive))] if glob.has_magic(item) else [Path(item)]
        if not matches:
            problems.append(f"{item}: no file matches this pattern")
        for path in matches:
            if path.is_dir():
                found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                               if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
                if not found:
                    problems.append(f"{path}: folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
                paths += found
            elif path.is_file():
                paths.append(path)
            else:
                problems.append(f"{path}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return unique, problems


def output_paths(paths, out_dir: Path):
    """Map each input to its mask path; refuse name clashes and outputs that would replace an input."""
    outputs, seen = {}, {}
    for path in paths:
        mask_path = out_dir.resolve() / f"{path.stem}_mask.png"
        if mask_path in seen:
            raise ValueError(f"{path} and {seen[mask_path]} would both write {mask_path.name}; "
                             "predict them into different --out-dir folders")
        seen[mask_path] = path
        outputs[path] = mask_path
    inputs = set(paths)
    for mask_path in outputs.values():
        for suffix in OUTPUT_SUFFIXES:
            if mask_path.with_name(mask_path.name.replace("_mask.png", suffix)) in inputs:
                raise ValueError(f"refusing to write over input {mask_path.name.replace('_mask.png', suffix)}; "
                                 "choose another --out-dir")
    return outputs


def prepare_outputs(cfg: PredictConfig):
    """Refuse --rle-csv and --out-dir locations that cannot be written, then create --out-dir: before any work."""
    if cfg.rle_csv:
        csv_path = Path(cfg.rle_csv)
        if csv_path.is_dir():
            raise ValueError(f"--rle-csv {csv_path} is a folder; give a file name, e.g. {csv_path / 'submission.csv'}")
        if not csv_path.parent.is_dir():
            raise ValueError(f"--rle-csv {csv_path}: {csv_path.parent} is not an existing folder")
        problem = atomic.folder_problem(csv_path.parent)
        if problem is not None:
            raise ValueError(f"--rle-csv {csv_path}: {problem}")
    problem = atomic.folder_problem(cfg.out_dir)
    if problem is not None:
        raise ValueError(f"--out-dir {cfg.out_dir}: {problem}")
    try:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out-dir {cfg.out_dir}: cannot create the folder: {err.strerror or err}")


def encode(ext: str, array: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(ext, array, [cv2.IMWRITE_PNG_COMPRESSION, 1] if ext == ".png" else [])
    if not ok:
        raise OSError(f"could not encode {ext}")
    return buffer.tobytes()


def write_outputs(path: Path, mask_path: Path, pred_mask: np.ndarray, cfg: PredictConfig):
    """Write <stem>_mask.png and, if asked, the overlay and the RGBA cutout; returns (mask path, RLE)."""
    atomic.write_bytes(mask_path, encode(".png", pred_mask))
    rle = rle_encode(pred_mask) if cfg.rle_csv else None
    if cfg.overlay or cfg.cutout:
        image, _ = load_image(path)  # full resolution, upright RGB
        if cfg.overlay:
            tinted = image.copy()
            car = pred_mask > 0
            tinted[car] = (0.55 * image[car] + 0.45 * np.array([0, 200, 80])).astype(np.uint8)
            atomic.write_bytes(mask_path.with_name(f"{path.stem}_overlay.jpg"), encode(".jpg", tinted[..., ::-1]))
        if cfg.cutout:
            rgba = np.dstack([image[..., ::-1], pred_mask])  # OpenCV writes BGRA
            atomic.write_bytes(mask_path.with_name(f"{path.stem}_cutout.png"), encode(".png", rgba))
    return mask_path, rle


def _read(predictor, path):
    try:
        return predictor.read(path)
    except (ValueError, OSError) as err:
        return err


def _prefetch(paths, predictor, pool, depth):
    """Decode ahead in `pool`, keeping at most `depth` images in flight (bounded memory)."""
    queue = deque()
    for path in paths:
        queue.append((path, pool.submit(_read, predictor, path)))
        if len(queue) >= depth:
            path, future = queue.popleft()
            yield path, future.result()
    while queue:
        path, future = queue.popleft()
        yield path, future.result()


def predict_files(cfg: PredictConfig):
    """Predict every input; returns (written mask paths, {input: error message}).

    With cfg.rle_csv, the masks are also written run-length encoded to that CSV, in input order.
    """
    checkpoint_path = resolve_checkpoint(cfg.checkpoint)
    log.info("predicting with %s", checkpoint_path)
    paths, problems = collect_inputs(cfg.inputs, cfg.recursive)
    failures = {p: p for p in problems}
    out_dir = Path(cfg.out_dir)
    outputs = output_paths(paths, out_dir)
    prepare_outputs(cfg)  # before any work: a folder that cannot be written fails now, not after every image
    predictor = Predictor.from_checkpoint(checkpoint_path, cfg.device, cfg.precision, cfg.tta, cfg.threshold)
    written, rles = [], {}
    with ThreadPoolExecutor(2) as readers, ThreadPoolExecutor(2) as writers, \
            tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True, disable=None) as bar:
        decoded = _prefetch(paths, predictor, readers, 2 * cfg.batch_size)
        pending = deque()
        for batch in _batches(decoded, cfg.batch_size, failures, bar):
            images = predictor.preprocess([image for _, (image, _) in batch])
            pred_masks = predictor.masks(images, [full_size for _, (_, full_size) in batch])
            for (path, _), pred_mask in zip(batch, pred_masks):
                pending.append((path, writers.submit(write_outputs, path, outputs[path], pred_mask, cfg)))
            while pending and (pending[0][1].done() or len(pending) > 4 * cfg.batch_size):
                _collect(pending.popleft(), written, rles, failures, bar)
        while pending:
            _collect(pending.popleft(), written, rles, failures, bar)
    if cfg.rle_csv:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([("img", "rle_mask")] + [(p.name, rles[p]) for p in paths if p in rles])
        atomic.write_text(Path(cfg.rle_csv), text.getvalue())  # csv quotes names with commas
    return written, {str(k): v for k, v in failures.items()}


def _batches(decoded, batch_size, failures, bar):
    """Group decoded images into batches, recording decode failures as they come."""
    batch = []
    for path, item in decoded:
        if isinstance(item, Exception):
            failures[path] = str(item)
            bar.update(1)
            continue
        batch.append((path, item))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _collect(entry, written, rles, failures, bar):
    path, future = entry
    try:
        mask_path, rles[path] = future.result()
        written.append(mask_path)
    except (OSError, ValueError) as err:
        failures[path] = f"{path}: cannot write output: {err}"
    bar.update(1)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_config(PredictConfig, argv, description=__doc__.splitlines()[0])
    try:
        written, failures = predict_files(cfg)
    except (OSError, ValueError) as err:  # FileNotFoundError, an output folder that cannot be written...
        raise SystemExit(f"error: {err}")
    for message in failures.values():
        log.error("failed: %s", message)
    print(f"wrote {len(written)} mask(s) to {cfg.out_dir}; {len(failures)} input(s) failed")
    if failures:
        sys.exit(1)
    return written


if __name__ == "__main__":
    main()
