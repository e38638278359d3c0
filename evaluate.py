"""Score a checkpoint with the Carvana metric: mean per-image Dice (and IoU) at full resolution.

`evaluate()` is the one evaluation code path: train.py validates with it, and this script runs it on
a checkpoint alone, rebuilding the model, the input size and the validation cars from the file.

    python evaluate.py --checkpoint checkpoints/<run>/best.pt
"""
import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import plots
import runtime
from config import EvaluateConfig, parse_config, resolve_checkpoint, resolve_data_dir
from dataset import CarvanaDataset, find_samples, prepare_store
from metrics import SegmentationMeter
from model import UNet, load_checkpoint

log = logging.getLogger(__name__)
SWEEP_THRESHOLDS = (0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8)


def predict_logits(model, images, device, precision, channels_last=True, tta=False) -> torch.Tensor:
    """Forward pass -> fp32 logits (B, 1, h, w), on `device`.

    With `tta`, the mirrored images go through the model too and the two answers' logits are averaged.
    """
    images = images.to(device, non_blocking=True)
    if tta:
        images = torch.cat([images, images.flip(-1)])
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), runtime.autocast(device, precision):
        logits = model(images).float()
    if tta:
        plain, mirrored = logits.chunk(2)
        logits = (plain + mirrored.flip(-1)) / 2
    return logits


def upsample_probs(probs: torch.Tensor, full_size) -> torch.Tensor:
    """Probabilities (1, h, w) -> (H, W) at full_size=(W, H), bilinear: threshold *after* this."""
    w, h = full_size
    return F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def evaluate(model, loader, device, precision="fp32", threshold=0.5, full_res=True, sweep=(),
             loss_fn=None, tta=False) -> dict:
    """Score `model` on a loader of CarvanaDataset items; returns metrics and per-image records.

    Model-resolution scores compare against the area-averaged mask thresholded at 0.5; full-resolution
    scores upsample the probabilities to each image's original size and compare against the original
    mask, which is the Kaggle metric.
    """
    store = loader.dataset.store
    was_training = model.training
    model.eval()
    small, full = SegmentationMeter(), SegmentationMeter()
    sweeps = {t: SegmentationMeter() for t in sweep}
    records, loss_sum = [], 0.0
    for images, masks, indices in tqdm(loader, desc="evaluate", unit="batch", leave=False, dynamic_ncols=True, disable=None):
        logits = predict_logits(model, images, device, precision, tta=tta)
        probs, masks = torch.sigmoid(logits), masks.to(device)
        if loss_fn is not None:
            loss_sum += loss_fn(logits, masks).item() * len(images)
        small_dice = small.update(probs > threshold, masks > 0.5)
        for j, index in enumerate(indices.tolist()):
            record = {"name": store.samples[index].name, "car_id": store.samples[index].car_id,
                      "dice_small": small_dice[j].item()}
            if full_res:
                prob = upsample_probs(probs[j], store.full_sizes[index])
                target = torch.from_numpy(store.full_mask(index)).to(device).bool()[None]
                record["dice"] = full.update(prob[None] > threshold, target).item()
                record["iou"] = full.iou[-1]
                for t, meter in sweeps.items():
                    meter.update(prob[None] > t, target)
            records.append(record)
    model.train(was_training)
    result = {"threshold": threshold, "small": small.compute(), "records": records}
    if full_res:
        result["full"] = full.compute()
    if loss_fn is not None:
        result["loss"] = loss_sum / len(records)
    if sweeps:
        result["sweep"] = [{"threshold": t, **m.compute()} for t, m in sweeps.items()]
    return result


# ---------------------------------------------------------------- evaluate.py on a checkpoint

def select_samples(checkpoint, data_dir, split):
    """The samples of `split`: the checkpoint's own validation (or training) cars, or all of them."""
    samples, problems = find_samples(data_dir)
    if split == "all":
        return samples, problems
    val_cars = set(checkpoint["val_cars"])
    chosen = [s for s in samples if (s.car_id in val_cars) == (split == "val")]
    if not chosen:
        raise ValueError(f"none of the checkpoint's {split} cars are in {data_dir}; use --split all "
                         "to score every image there")
    for problem in problems:  # unrelated to the chosen split, so not fatal
        log.warning("ignored: %s", problem)
    return chosen, []


def evaluation_data_dir(cfg, train_config):
    """--data-dir, else the folder the checkpoint was trained on (if it still exists), else the default."""
    stored = train_config.get("data_dir", "")
    if cfg.data_dir or not stored or not Path(stored).is_dir():
        return resolve_data_dir(cfg.data_dir)
    return Path(stored)


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """Score a checkpoint and write per_image.csv, summary.json and the PNGs; returns the summary."""
    cfg = dataclasses.replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or str(Path(cfg.checkpoint).parent / f"eval-{cfg.split}"))
    log.info("evaluating %s", cfg.checkpoint)
    checkpoint = load_checkpoint(cfg.checkpoint)
    train_config = checkpoint["config"]
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    threshold = cfg.threshold or checkpoint.get("threshold", 0.5)
    size = (train_config["width"], train_config["height"])
    data_dir = evaluation_data_dir(cfg, train_config)
    out_dir = Path(cfg.out_dir)
    samples, problems = select_samples(checkpoint, data_dir, cfg.split)
    store = prepare_store(samples, size, cfg.cache_dir, data_dir, problems)
    model = UNet.from_checkpoint(checkpoint).to(device).to(memory_format=torch.channels_last).eval()
    loader = torch.utils.data.DataLoader(CarvanaDataset(store), batch_size=cfg.batch_size,
                                         pin_memory=device.type == "cuda")
    start = time.perf_counter()
    result = evaluate(model, loader, device, precision, threshold, sweep=SWEEP_THRESHOLDS, tta=cfg.tta)
    summary = {"checkpoint": str(cfg.checkpoint), "data_dir": str(data_dir), "split": cfg.split,
               "out_dir": str(out_dir), "threshold": threshold, "precision": precision, "tta": cfg.tta, "model_size": list(size),
               "cars": len({s.car_id for s in store.samples}), "seconds": round(time.perf_counter() - start, 1),
               "full_resolution": result["full"], "model_resolution": result["small"], "sweep": result["sweep"]}
    write_reports(out_dir, summary, result["records"], cfg.worst_k)
    draw_examples(model, store, result["records"], out_dir, cfg, device, precision, threshold)
    return summary


def write_reports(out_dir: Path, summary: dict, records: list, worst_k: int):
    """per_image.csv (worst first), summary.json and threshold_sweep.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["dice"])
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "car_id", "dice", "iou", "dice_small"])
        writer.writeheader()
        writer.writerows(records)
    summary["worst"] = [{"name": r["name"], "dice": r["dice"]} for r in records[:worst_k]]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots.plot_threshold_sweep(summary["sweep"], out_dir / "threshold_sweep.png")


def draw_examples(model, store, records, out_dir, cfg, device, precision, threshold):
    """worst.png (the lowest-Dice images) and samples.png (a seeded random few)."""
    by_name = {s.name: i for i, s in enumerate(store.samples)}
    ranked = sorted(records, key=lambda r: r["dice"])
    rng = np.random.default_rng(0)
    picks = {"worst.png": [by_name[r["name"]] for r in ranked[:cfg.worst_k]],
             "samples.png": sorted(rng.choice(len(store), min(cfg.num_samples, len(store)), replace=False).tolist())}
    dice = {r["name"]: r["dice"] for r in records}
    for filename, indices in picks.items():
        if not indices:
            continue
        rows = []
        for index in indices:
            images, _, _ = CarvanaDataset(store)[index]
            logits = predict_logits(model, images[None], device, precision, tta=cfg.tta)
            prob = upsample_probs(torch.sigmoid(logits[0]), store.full_sizes[index])
            name = store.samples[index].name
            rows.append({"image": store.images[index], "pred": (prob > threshold).cpu().numpy(),
                         "target": store.full_mask(index).astype(bool), "label": f"{name}  Dice {dice[name]:.4f}"})
        plots.plot_prediction_panels(rows, out_dir / filename, title=f"{filename[:-4]}: {Path(cfg.checkpoint).name}")


def format_summary(summary: dict) -> str:
    """Human-readable headline, worst images and sweep."""
    full, small = summary["full_resolution"], summary["model_resolution"]
    lines = [f"{summary['split']} split: {full['images']} images of {summary['cars']} cars from {summary['data_dir']}",
             f"full resolution   mean Dice {full['dice']:.5f}  mean IoU {full['iou']:.5f}  "
             f"pooled Dice {full['dice_pooled']:.5f}  pixel accuracy {full['pixel_accuracy']:.5f}",
             f"model resolution  mean Dice {small['dice']:.5f}  mean IoU {small['iou']:.5f}  "
             f"({summary['model_size'][0]}x{summary['model_size'][1]}, threshold {summary['threshold']}"
             f"{', flip TTA' if summary.get('tta') else ''})",
             "worst images: " + ", ".join(f"{w['name']} {w['dice']:.4f}" for w in summary["worst"]),
             "threshold sweep (full-res Dice): " + "  ".join(f"{r['threshold']}:{r['dice']:.5f}" for r in summary["sweep"])]
    return "\n".join(lines)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    try:
        summary = evaluate_checkpoint(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(format_summary(summary))
    print(f"reports in {summary['out_dir']}")
    return summary


if __name__ == "__main__":
    main()
