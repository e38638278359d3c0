"""Ship a model: a slim .pt checkpoint (fp16 weights), or an ONNX file for ONNX Runtime and OpenVINO.

    python export.py checkpoints/<run>/best.pt                  # -> checkpoints/<run>/best.slim.pt
    python export.py checkpoints/<run>/best.pt --out my.pt
    python export.py checkpoints/carvana_unet.pt --format onnx  # -> checkpoints/carvana_unet.onnx, parity checked
    python export.py checkpoints/<run>/best.pt --out checkpoints/carvana_unet.pt --overwrite  # ship it

The file is written beside its source unless --out says otherwise, and an existing file (the bundled
models included) is replaced only with --overwrite: every script loads checkpoints/carvana_unet.pt
by default, so shipping a new one is a command that names it (git checkout -- checkpoints/<name>
brings back the shipped file).

--format pt drops optimizer/scheduler state and stores floating-point weights as fp16 (half the
size); the model is rebuilt in fp32 when loaded. The written file must load with weights_only=True
and give the same masks as the original on a random batch.

--format onnx writes the model with dynamic batch, height and width and the checkpoint's inference
metadata (backends.export_onnx), then checks it against PyTorch on real photos (--check-images, or
up to 8 validation photos of the checkpoint found under --data-dir / $CARVANA_DIR) through ONNX
Runtime in fp32, OpenVINO in fp32 and OpenVINO in bf16 (where the CPU runs bf16 natively; elsewhere
that row says it was not checked): the largest absolute logit difference, the share of
full-resolution mask pixels that agree and the mean Dice between the masks. Each run is held to the
tolerance of the precision it ran (PARITY_TOLERANCE: fp32 must give PyTorch's masks, bf16 may flip a
few boundary pixels), so the same file is kept or refused for the same reasons on every CPU. The file
is kept only if every run is within its tolerance; otherwise nothing is written and the exit status is 1.
"""
import argparse
import os
from pathlib import Path

import numpy as np
import torch

from carseg import atomic, runtime
from backends import export_onnx, installed, load_source, openvino_native_bf16
from config import BUNDLED_CHECKPOINT, BUNDLED_PARTS_CHECKPOINT, counted, resolve_data_dir
from evaluate import select_samples
from inference import Predictor
from metrics import dice_per_image
from carseg.checkpoint import load_checkpoint, save_checkpoint

KEEP = ("format_version", "arch", "model_args", "normalization", "config", "class_names", "val_groups", "train_groups", "epoch",
        "global_step", "metrics", "best_val_score", "history", "quality_reference")
# Each engine at each precision it can run on a CPU, checked against PyTorch fp32 on the same photos.
PARITY_RUNS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))
# The share of full-size mask (or class-map) pixels, and the mean Dice between car masks, that a run
# must reach against PyTorch fp32, by the precision it ran. fp32 must give PyTorch's masks: that is
# where a wrong graph shows (a mask one model pixel off, 4 px at 1918 wide, agrees on only 99.76 % of
# Carvana's pixels). bf16 keeps 8 bits of mantissa: PyTorch's own bf16 on 8 validation photos moved
# logits by up to 0.64 (car model) and 0.86 (parts model) and agreed on 99.997 % / 99.91 % of the
# pixels (worst photo 99.81 %, car-mask Dice 0.9967); 99.5 % leaves room for that and still refuses
# what bf16 alone can break (an op that loses its precision costs far more than boundary pixels).
PARITY_TOLERANCE = {"fp32": 0.9999, "bf16": 0.995}
PARITY_PHOTOS = 8
RESTORE = "`git checkout -- {}` brings back the shipped file"


def export_checkpoint(source, out) -> dict:
    """Write the slim copy of `source` to `out` atomically; returns it."""
    refuse_training_source(source, out)
    checkpoint = load_checkpoint(source)
    slim = {k: checkpoint[k] for k in KEEP if k in checkpoint}
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    # The training run's file name, not its path: a shipped checkpoint names no folder of the machine that wrote it.
    slim["exported_from"] = checkpoint.get("exported_from") or Path(source).name
    check_same_masks(checkpoint, slim)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, slim)
    load_checkpoint(out)
    return slim


def check_same_masks(original, slim):
    """fp16 storage must not change the predicted masks (or class maps) beyond a few boundary pixels."""
    a, b = Predictor.from_checkpoint(original), Predictor.from_checkpoint(slim)
    w, h = a.input_size
    images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    sizes = [(w, h)] * len(images)
    changed = np.mean([(x != y).mean() for x, y in zip(a.labels(images, sizes), b.labels(images, sizes))])
    if changed > 1e-3:
        raise ValueError(f"fp16 weights change {changed:.2%} of the predicted pixels; keep fp32")


def export_onnx_checked(source, out, photos) -> list:
    """Export `source` (a .pt path) to `out` (.onnx) and keep it only if it agrees with PyTorch on `photos`.

    Returns the parity rows (see parity_rows). Raises ValueError when a run disagrees beyond its
    precision's tolerance, leaving no file.
    """
    checkpoint = load_checkpoint(source)
    checkpoint.setdefault("exported_from", Path(source).name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    candidate = out.with_name(f".{out.stem}.checking.onnx")
    export_onnx(checkpoint, candidate)
    try:
        rows = parity_rows(checkpoint, candidate, photos)
        failed = [row for row in rows if row.get("passed") is False]
        if failed:
            names = ", ".join(f"{row['backend']} {row['precision']}" for row in failed)
            raise ValueError(f"the ONNX export disagrees with PyTorch on {names}: "
                             + "; ".join(format_parity(row) for row in failed))
        os.replace(candidate, out)
    finally:
        candidate.unlink(missing_ok=True)
    return rows


def parity_rows(checkpoint: dict, onnx_path, photos) -> list:
    """Each of PARITY_RUNS on the ONNX file against PyTorch fp32 on `photos` (see parity).

    A run this CPU cannot do (bf16 without native bf16: OpenVINO would silently run fp32) is a row
    {"backend", "precision", "skipped": why} rather than a mislabelled fp32 row.
    """
    reference = Predictor.from_checkpoint(checkpoint, "cpu", "fp32")
    rows = []
    for backend, precision in PARITY_RUNS:
        if precision == "bf16" and not openvino_native_bf16():
            rows.append({"backend": backend, "precision": precision,
                         "skipped": f"this CPU ({runtime.cpu_name()}) has no native bf16 (AVX-512 BF16 or AMX)"})
            continue
        other = Predictor.from_checkpoint(str(onnx_path), "cpu", precision, backend=backend)
        rows.append(parity(reference, other, photos))
    return rows


def parity(reference: Predictor, other: Predictor, photos) -> dict:
    """`other` against `reference` (PyTorch fp32) on `photos` (paths; none: two random images at the model size).

    Returns {"backend", "precision" (what `other` ran), "photos", "max_abs_logit_diff", "agreement" (share
    of equal full-size mask pixels, or class-map pixels for a parts model), "dice" (mean over photos of
    the Dice between the two car masks), "tolerance" and "passed" (agreement and Dice both at least
    PARITY_TOLERANCE of other's precision)}.
    """
    if photos:
        decoded = [reference.read(path) for path in photos]
        batch, sizes = reference.preprocess([image for image, _ in decoded]), [size for _, size in decoded]
    else:
        w, h = reference.input_size
        batch, sizes = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)), [(w, h)] * 2
    diff = max((reference.logits(image[None]) - other.logits(image[None])).abs().max().item() for image in batch)
    ours, theirs = reference.labels(batch, sizes), other.labels(batch, sizes)
    agreement = float(np.mean([(a == b).mean() for a, b in zip(ours, theirs)]))
    dice = float(np.mean([dice_per_image(torch.from_numpy(a > 0)[None], torch.from_numpy(b > 0)[None]).item()
                          for a, b in zip(ours, theirs)]))
    tolerance = PARITY_TOLERANCE[other.precision]
    return {"backend": other.backend, "precision": other.precision, "photos": len(sizes) if photos else 0,
            "max_abs_logit_diff": diff, "agreement": agreement, "dice": dice, "tolerance": tolerance,
            "passed": agreement >= tolerance and dice >= tolerance}


def format_parity(row: dict) -> str:
    """One line of export's parity table."""
    head = f"{row['backend']} ({row['precision']}): "
    if "skipped" in row:
        return head + f"not checked: {row['skipped']}, so OpenVINO cannot run it here; check on a CPU that has it"
    return head + (f"max |logit diff| {row['max_abs_logit_diff']:.2e}, {row['agreement']:.6%} of full-size mask pixels "
                   f"agree, Dice {row['dice']:.6f} ({'within' if row['passed'] else 'OUTSIDE'} {row['precision']}'s "
                   f"tolerance: {row['tolerance']:.2%})")


def parity_photos(checkpoint_path, check_images, data_dir) -> list:
    """--check-images as given, else up to PARITY_PHOTOS validation photos (one per car first) under data_dir."""
    if check_images:
        return [Path(p) for p in check_images]
    folder = resolve_data_dir(data_dir)
    if not folder.is_dir():
        return []
    try:
        samples, _ = select_samples(load_source(checkpoint_path), folder, "val", where=checkpoint_path)
    except ValueError:  # a folder of other photos, or a checkpoint without a split
        return []
    firsts = list({s.group: s for s in reversed(samples)}.values())[::-1]  # each car's first view
    return [s.image for s in (firsts + samples)[:PARITY_PHOTOS]]


def default_out(checkpoint_path, fmt: str) -> Path:
    """Beside the source: <stem>.slim.pt (pt) or <stem>.onnx (onnx).

    Beside it, as the run's folder is the run's own (and git-ignored); `.slim` because `<stem>.pt` is
    the source's own name, and the suffix stays .pt so every --checkpoint takes it. Never a bundled
    model: that is every script's default, replaced only by a command that names it (check_out).
    """
    source = Path(checkpoint_path)
    return source.with_name(f"{source.stem}.onnx" if fmt == "onnx" else f"{source.stem}.slim.pt")


def bundled_name(out) -> str | None:
    """checkpoints/<name> if `out` is one of the bundled models, else None."""
    bundled = {BUNDLED_CHECKPOINT.resolve(), BUNDLED_PARTS_CHECKPOINT.resolve()}
    return f"checkpoints/{Path(out).name}" if Path(out).resolve() in bundled else None


def refuse_training_source(source, out):
    """ValueError if `out` is the training checkpoint `source` itself, --overwrite or not: its optimizer
    state, which resume needs, would be lost."""
    if Path(out).resolve() == Path(source).resolve() and "optimizer" in load_checkpoint(source):
        raise ValueError(f"--out {out} is the training checkpoint itself; exporting would drop its optimizer state")


# The names each --format's file needs: every script decides by the name whether a file is ONNX
# (backends.load_source), so a checkpoint named .onnx, or an ONNX file named .pt, would not load.
SUFFIXES = {"pt": (".pt", ".pth"), "onnx": (".onnx",)}


def check_out(source, out: Path, overwrite: bool, fmt: str = "pt"):
    """Before any work: refuse an `out` that is a folder, one whose name does not end as `fmt`'s files do
    (SUFFIXES), one in a folder that cannot be written, writing over the training checkpoint read
    (refuse_training_source), and an existing `out` without --overwrite (atomic.refuse_existing), saying
    for a bundled model what it is and how its shipped file comes back."""
    if out.is_dir():  # --overwrite or not: a folder is never replaced by a file
        example = out / default_out(source, fmt).name
        raise ValueError(f"--out {out} is a folder: give the file's name, e.g. --out {example}")
    if out.suffix.lower() not in SUFFIXES[fmt]:
        other = next(name for name in SUFFIXES if name != fmt)
        swapped = out.suffix.lower() in SUFFIXES[other]  # x.onnx -> x.pt; model -> model.pt
        named = out.with_suffix(SUFFIXES[fmt][0]) if swapped else out.with_name(out.name + SUFFIXES[fmt][0])
        kind = "an ONNX model" if fmt == "onnx" else "a PyTorch checkpoint"
        raise ValueError(f"--out {out}: --format {fmt} writes {kind}, whose name must end in "
                         f"{' or '.join(SUFFIXES[fmt])}, as every script decides by the name how to load a file: "
                         f"use --out {named}" + (f", or --format {other} for a {out.suffix} file" if swapped else ""))
    problem = atomic.folder_problem(out.parent)
    if problem is not None:
        raise ValueError(f"--out {out}: cannot be written: {problem}")
    refuse_training_source(source, out)
    shipped = bundled_name(out)
    why = (f": it is the bundled model every script loads by default ({RESTORE.format(shipped)})" if shipped else
           ", or give another --out")
    atomic.refuse_existing(out, overwrite, why)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a train.py checkpoint (best.pt) or a bundled one")
    parser.add_argument("--format", choices=("pt", "onnx"), default="pt",
                        help="pt: slim fp16 checkpoint (default); onnx: for --backend onnxruntime/openvino")
    parser.add_argument("--out", help="the file to write, named .pt (or .pth) for pt, .onnx for onnx: every script "
                                      "decides by the name how to load it (default: beside the checkpoint, pt: "
                                      "<stem>.slim.pt, onnx: <stem>.onnx)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out, e.g. a bundled model: --out "
                             f"checkpoints/{BUNDLED_CHECKPOINT.name} or checkpoints/{BUNDLED_PARTS_CHECKPOINT.name}")
    parser.add_argument("--check-images", nargs="+", metavar="PHOTO",
                        help="onnx: photos to check parity on (default: validation photos under --data-dir)")
    parser.add_argument("--data-dir", default="", help="onnx: where the checkpoint's validation photos are "
                                                       "(default: $CARVANA_DIR, else data/carvana)")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out or default_out(args.checkpoint, args.format))
        check_out(args.checkpoint, out, args.overwrite, args.format)
        if args.format == "pt":
            export_checkpoint(args.checkpoint, out)
        else:
            export_onnx_main(args, out)
    except (OSError, ValueError) as err:  # FileNotFoundError, a folder that cannot be written...
        raise SystemExit(f"error: {atomic.shown(err)}")  # a name that is not UTF-8 shows as U+FFFD
    print(f"wrote {atomic.shown(out)} ({out.stat().st_size / 1e6:.1f} MB)")
    if bundled_name(out):
        print(f"{atomic.shown(out)} is now the bundled model every script loads by default; "
              f"{RESTORE.format(bundled_name(out))}")


def export_onnx_main(args, out):
    if not installed("onnx"):
        raise ValueError("--format onnx: the onnx package is not installed; pip install -r requirements-deploy.txt")
    photos = parity_photos(args.checkpoint, args.check_images, args.data_dir)
    print(f"CPU: {runtime.cpu_description()}")
    print(f"parity on {counted(len(photos), 'photo')}" if photos else
          "parity on 2 random images only: no --check-images given and no validation photos found under "
          f"{atomic.shown(resolve_data_dir(args.data_dir))}")
    for row in export_onnx_checked(args.checkpoint, out, photos):
        print(format_parity(row))


if __name__ == "__main__":
    main()
