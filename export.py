"""Slim a training checkpoint into a model to ship: fp16 weights and what evaluate/predict need.

    python export.py checkpoints/<run>/best.pt                # -> checkpoints/carvana_unet.pt (the bundled model)
                                                              #    or checkpoints/carparts.pt for a parts model
    python export.py checkpoints/<run>/best.pt --out my.pt

Drops optimizer/scheduler state and stores floating-point weights as fp16 (half the size); the
model is rebuilt in fp32 when loaded. The written file is checked: it must load with
weights_only=True and give the same masks as the original on a random input batch. Written in the
current checkpoint format, so exporting an older checkpoint also upgrades it.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from config import BUNDLED_CHECKPOINT, BUNDLED_PARTS_CHECKPOINT
from inference import Predictor
from model import load_checkpoint, save_checkpoint

KEEP = ("format_version", "arch", "model_args", "normalization", "config", "class_names", "val_cars", "train_cars", "epoch",
        "global_step", "metrics", "best_val_dice", "history")


def export_checkpoint(source, out) -> dict:
    """Write the slim copy of `source` to `out` atomically; returns it."""
    if Path(out).resolve() == Path(source).resolve() and "optimizer" in load_checkpoint(source):
        raise ValueError(f"--out {out} is the training checkpoint itself; exporting would drop its optimizer state")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a train.py checkpoint (best.pt)")
    parser.add_argument("--out", help="where to write (default: the bundled model of its kind, "
                                       f"{BUNDLED_CHECKPOINT.name} or {BUNDLED_PARTS_CHECKPOINT.name} for a parts model)")
    args = parser.parse_args(argv)
    try:
        args.out = args.out or str(BUNDLED_PARTS_CHECKPOINT if len(load_checkpoint(args.checkpoint)["class_names"]) > 2
                                   else BUNDLED_CHECKPOINT)
        export_checkpoint(args.checkpoint, args.out)
    except (OSError, ValueError) as err:  # FileNotFoundError, a folder that cannot be written...
        raise SystemExit(f"error: {err}")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
