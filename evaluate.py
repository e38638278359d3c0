"""Score a checkpoint with the Carvana metric: mean per-image Dice (and IoU) at full resolution.

`evaluate()` is the one evaluation code path: train.py validates with it, and this script runs it on
a checkpoint alone, rebuilding the model, its input size and its validation cars from the file.

    python evaluate.py --checkpoint checkpoints/<run>/best.pt

Scores come in two resolutions, named the same way everywhere (metrics.jsonl, summary.json,
per_image.csv): `full_res`, each photo's own size against its original mask (the Kaggle metric),
and `model_res`, the model's input size against the area-averaged mask thresholded at 0.5.
"""
import csv
import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import atomic
import plots
from config import EvaluateConfig, parse_config, resolve_checkpoint, resolve_data_dir
from dataset import CarvanaDataset, find_samples, prepare_store, regroup
from inference import Predictor
from metrics import SegmentationMeter
from model import load_checkpoint

log = logging.getLogger(__name__)
SWEEP_THRESHOLDS = (0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8)


def evaluate(predictor: Predictor, loader, full_res=True, sweep=(), loss_fn=None) -> dict:
    """Score `predictor` on a loader of CarvanaDataset items; returns metrics and per-image records.

    The loader's dataset must be preprocessed with the predictor's normalisation. Returns
    {"threshold", "model_res": scores, "full_res": scores (if full_res), "loss" (if loss_fn),
    "sweep" (full-res scores per threshold in `sweep`), "records": one dict per image}.
    """
    store = loader.dataset.store
    threshold = predictor.threshold
    model_res, full = SegmentationMeter(), SegmentationMeter()
    sweeps = {t: SegmentationMeter() for t in sweep}
    records, loss_sum = [], 0.0
    for images, masks, indices in tqdm(loader, desc="evaluate", unit="batch", leave=False, dynamic_ncols=True, disable=None):
        logits = predictor.logits(images)
        probs, masks = torch.sigmoid(logits), masks.to(predictor.device)
        if loss_fn is not None:
            loss_sum += loss_fn(logits, masks).item() * len(images)
        model_res_dice = model_res.update(probs > threshold, masks > 0.5)
        for j, index in enumerate(indices.tolist()):
            record = {"name": store.samples[index].name, "car_id": store.samples[index].car_id,
                      "dice_model_res": model_res_dice[j].item()}
            if full_res:
                prob = predictor.upsample(probs[j], store.full_sizes[index])
                target = torch.from_numpy(store.full_mask(index)).to(predictor.device).bool()[None]
                record["dice_full_res"] = full.update(prob[None] > threshold, target).item()
                record["iou_full_res"] = full.iou[-1]
                for t, meter in sweeps.items():
                    meter.update(prob[None] > t, target)
            records.append(record)
    result = {"threshold": threshold, "model_res": model_res.compute(), "records": records}
    if full_res:
        result["full_res"] = full.compute()
    if loss_fn is not None:
        result["loss"] = loss_sum / len(records)
    if sweeps:
        result["sweep"] = [{"threshold": t, **m.compute()} for t, m in sweeps.items()]
    return result


# ---------------------------------------------------------------- evaluate.py on a checkpoint

def select_samples(checkpoint: dict, data_dir, split, where=""):
    """The samples of `split`: the checkpoint's validation cars, its training cars, or all of them."""
    samples, problems = find_samples(data_dir)
    if split == "all":
        return samples, problems
    samples = regroup(samples, checkpoint["config"].get("group_by", "car-id"))  # the groups its split was of
    if "val_cars" not in checkpoint:
        raise ValueError(f"checkpoint {where} records no validation cars; use --split all")
    val_cars = set(checkpoint["val_cars"])
    if split == "val":
        chosen = [s for s in samples if s.car_id in val_cars]
    elif "train_cars" in checkpoint:
        train_cars = set(checkpoint["train_cars"])
        chosen = [s for s in samples if s.car_id in train_cars]
    else:  # written before train_cars was recorded
        log.warning("checkpoint %s does not record its training cars: --split train scores every car that is not a "
                    "validation car, including any the run never saw", where)
        chosen = [s for s in samples if s.car_id not in val_cars]
    if not chosen:
        raise ValueError(f"none of the checkpoint's {split} cars are in {data_dir}; use --split all "
                         "to score every image there")
    for problem in problems:  # unrelated to the chosen split, so not fatal
        log.warning("ignored: %s", problem)
    return chosen, []


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """Score a checkpoint and write per_image.csv, summary.json and the PNGs; returns the summary."""
    cfg = dataclasses.replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or str(Path(cfg.checkpoint).parent / f"eval-{cfg.split}"))
    log.info("evaluating %s", cfg.checkpoint)
    problem = atomic.folder_problem(cfg.out_dir)
    if problem is not None:  # before scoring, not after
        raise ValueError(f"--out-dir {cfg.out_dir}: reports cannot be written there: {problem}")
    checkpoint = load_checkpoint(cfg.checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, cfg.device, cfg.precision, cfg.tta, cfg.threshold)
    data_dir = resolve_data_dir(cfg.data_dir)
    samples, problems = select_samples(checkpoint, data_dir, cfg.split, cfg.checkpoint)
    store = prepare_store(samples, predictor.input_size, cfg.cache_dir, data_dir, problems)
    dataset = CarvanaDataset(store, normalization=predictor.spec.normalization)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, pin_memory=predictor.device.type == "cuda")
    start = time.perf_counter()
    result = evaluate(predictor, loader, sweep=SWEEP_THRESHOLDS)
    summary = {"checkpoint": str(cfg.checkpoint), "data_dir": str(data_dir), "split": cfg.split,
               "out_dir": cfg.out_dir, "threshold": predictor.threshold, "precision": predictor.precision,
               "tta": cfg.tta, "model_size": list(predictor.input_size), "cars": len({s.car_id for s in store.samples}),
               "seconds": round(time.perf_counter() - start, 1), "full_res": result["full_res"],
               "model_res": result["model_res"], "sweep": result["sweep"]}
    ranked = sorted(result["records"], key=lambda r: r["dice_full_res"])
    summary["worst"] = [{"name": r["name"], "dice_full_res": r["dice_full_res"]} for r in ranked[:cfg.worst_k]]
    try:
        write_reports(Path(cfg.out_dir), summary, ranked)
        draw_examples(predictor, dataset, ranked, cfg)
    except OSError as err:  # the scores are still worth having: main prints them, then fails
        summary["report_error"] = str(err)
    return summary


def write_reports(out_dir: Path, summary: dict, ranked: list):
    """per_image.csv (the records as ranked: worst first), summary.json and threshold_sweep.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["name", "car_id", "dice_full_res", "iou_full_res", "dice_model_res"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(ranked)
    atomic.write_text(out_dir / "per_image.csv", text.getvalue())
    atomic.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    plots.plot_threshold_sweep(summary["sweep"], out_dir / "threshold_sweep.png")


def draw_examples(predictor: Predictor, dataset: CarvanaDataset, ranked: list, cfg: EvaluateConfig):
    """worst.png (the first, lowest-Dice, of the ranked records) and samples.png (a seeded random few)."""
    store = dataset.store
    by_name = {s.name: i for i, s in enumerate(store.samples)}
    rng = np.random.default_rng(0)
    picks = {"worst.png": [by_name[r["name"]] for r in ranked[:cfg.worst_k]],
             "samples.png": sorted(rng.choice(len(store), min(cfg.num_samples, len(store)), replace=False).tolist())}
    dice = {r["name"]: r["dice_full_res"] for r in ranked}
    for filename, indices in picks.items():
        if not indices:
            continue
        rows = []
        for index in indices:
            images, _, _ = dataset[index]
            pred = predictor.masks(images[None], [store.full_sizes[index]])[0] > 0
            name = store.samples[index].name
            rows.append({"image": store.images[index], "pred": pred,
                         "target": store.full_mask(index).astype(bool), "label": f"{name}  Dice {dice[name]:.4f}"})
        plots.plot_prediction_panels(rows, Path(cfg.out_dir) / filename,
                                     title=f"{filename[:-4]}: {Path(cfg.checkpoint).name}")


def format_summary(summary: dict) -> str:
    """Human-readable headline, worst images and sweep."""
    full, small = summary["full_res"], summary["model_res"]
    lines = [f"{summary['split']} split: {full['images']} images of {summary['cars']} cars from {summary['data_dir']}",
             f"full resolution   mean Dice {full['dice']:.5f}  mean IoU {full['iou']:.5f}  "
             f"pooled Dice {full['dice_pooled']:.5f}  pixel accuracy {full['pixel_accuracy']:.5f}",
             f"model resolution  mean Dice {small['dice']:.5f}  mean IoU {small['iou']:.5f}  "
             f"({summary['model_size'][0]}x{summary['model_size'][1]}, threshold {summary['threshold']}"
             f"{', flip TTA' if summary.get('tta') else ''})",
             "worst images: " + ", ".join(f"{w['name']} {w['dice_full_res']:.4f}" for w in summary["worst"]),
             "threshold sweep (full-res Dice): " + "  ".join(f"{r['threshold']}:{r['dice']:.5f}" for r in summary["sweep"])]
    return "\n".join(lines)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    try:
        summary = evaluate_checkpoint(cfg)
    except (OSError, ValueError) as err:  # FileNotFoundError, a folder that cannot be written...
        raise SystemExit(f"error: {err}")
    print(format_summary(summary))
    if "report_error" in summary:
        raise SystemExit(f"error: the reports could not be written: {summary['report_error']}")
    print(f"reports in {summary['out_dir']}")
    return summary


if __name__ == "__main__":
    main()
