"""Score a checkpoint: car masks by mean per-image Dice (Carvana), car parts by mean IoU over the parts.

`evaluate()` is the one evaluation code path: train.py validates with it, and this script runs it on
a checkpoint alone, rebuilding the model, its input size, its classes and its validation cars from the file.

    python evaluate.py --checkpoint checkpoints/<run>/best.pt

Scores come in two resolutions, named the same way everywhere (metrics.jsonl, summary.json,
per_image.csv): `full_res`, each photo's own size against its original mask (the Kaggle metric),
and `model_res`, the model's input size against the area-averaged mask thresholded at 0.5 (binary)
or the nearest-neighbour class mask (parts).

Car parts (a checkpoint with more than two class_names): each pixel takes its most probable class
(argmax; there is no threshold), and the headline is the dataset-level mean IoU of semantic
segmentation (PASCAL VOC, Cityscapes): one confusion matrix summed over every pixel of every image,
each class's IoU = TP / (TP + FP + FN) read from it, and mIoU = the mean of those IoUs over the part
classes, background excluded (it is most of every photo and would flatter the mean; its IoU is
reported apart). A part small in every photo weighs as much as the hood. The data set is the Car
Parts Dataset of Pasupa et al. 2021, "Evaluation of deep learning algorithms for semantic
segmentation of car parts", Complex & Intelligent Systems, doi 10.1007/s40747-021-00397-8; note
that the paper's headline numbers are instance-segmentation mAP (HTC 55.2), not this mIoU. Per-image
mIoU (per_image.csv) only ranks the worst images. Reports: summary.json, per_class.csv,
per_image.csv, confusion.png, worst.png and samples.png, and .evaluation.json, the list of those it
wrote: a later evaluation replaces or removes only the files listed there, and refuses a folder holding
other files of those names (the user's own, say) before scoring, unless --overwrite.
"""
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from carseg import atomic, distributed, plots, runtime
from backends import load_source
from config import EvaluateConfig, counted, parse_config, resolve_checkpoint, resolve_data_dir
from dataset import SegmentationDataset, find_class_names, find_samples, prepare_store, regroup
from carseg.images import encode, load_image
from inference import Predictor
from carseg.labels import is_multiclass, palette
from metrics import ConfusionMeter, SegmentationMeter

log = logging.getLogger(__name__)
SWEEP_THRESHOLDS = (0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8)
# Every file an evaluation writes, for either kind of model: the reports of one run (remove_stale_reports).
REPORT_FILES = ("summary.json", "per_image.csv", "per_class.csv", "threshold_sweep.png", "confusion.png",
                "worst.png", "samples.png")
MANIFEST = ".evaluation.json"  # in the report folder: the REPORT_FILES an evaluation wrote there (report_files_owned)


def evaluate(predictor: Predictor, loader, full_res=True, sweep=(), loss_fn=None, world=distributed.SOLO) -> dict:
    """Score `predictor` on a loader of SegmentationDataset items; returns metrics and per-image records.

    Multi-class models are scored by evaluate_parts (the sweep does not apply to them). Under torchrun
    (`world` of several processes) each process's loader holds its own share of the images and every
    process returns the scores of all of them: the meters are merged, so each image counts once, and
    the records come in rank order.

    The loader's dataset must be preprocessed with the predictor's normalisation. Returns
    {"threshold", "model_res": scores, "full_res": scores (if full_res), "loss" (if loss_fn),
    "sweep" (full-res scores per threshold in `sweep`), "records": one dict per image}.
    """
    if predictor.spec.multiclass:
        return evaluate_parts(predictor, loader, full_res, loss_fn, world)
    store = loader.dataset.store
    threshold = predictor.threshold
    model_res, full = SegmentationMeter(), SegmentationMeter()
    sweeps = {t: SegmentationMeter() for t in sweep}
    records, loss_sum = [], 0.0
    for images, masks, indices in _progress(loader, world):
        logits = predictor.logits(images)
        probs, masks = torch.sigmoid(logits), masks.to(predictor.device)
        if loss_fn is not None:
            loss_sum += loss_fn(logits, masks).item() * len(images)
        model_res_dice = model_res.update(probs > threshold, masks > 0.5)
        unsure = [u if math.isfinite(u) else None for u in predictor.unsure_per_edge(probs).tolist()]  # None: no car
        for j, index in enumerate(indices.tolist()):
            record = {"name": store.samples[index].name, "group": store.samples[index].group,
                      "dice_model_res": model_res_dice[j].item(), "unsure_per_edge": unsure[j]}
            if full_res:
                prob = predictor.upsample(probs[j], store.full_sizes[index])
                target = torch.from_numpy(store.full_mask(index)).to(predictor.device).bool()[None]
                record["dice_full_res"] = full.update(prob[None] > threshold, target).item()
                record["iou_full_res"] = full.iou[-1]
                for t, meter in sweeps.items():
                    meter.update(prob[None] > t, target)
            records.append(record)
    meters, records, loss_sum = _all_ranks(world, {"model_res": model_res, "full": full, **sweeps}, records, loss_sum)
    model_res, full, sweeps = meters.pop("model_res"), meters.pop("full"), meters
    result = {"threshold": threshold, "model_res": model_res.compute(), "records": records,
              "unsure_per_edge": _median([r["unsure_per_edge"] for r in records if r["unsure_per_edge"] is not None])}
    if full_res:
        result["full_res"] = full.compute()
    if loss_fn is not None:
        result["loss"] = loss_sum / len(records)
    if sweeps:
        result["sweep"] = [{"threshold": t, **m.compute()} for t, m in sweeps.items()]
    return result


def evaluate_parts(predictor: Predictor, loader, full_res=True, loss_fn=None, world=distributed.SOLO) -> dict:
    """Score a multi-class `predictor`: confusion matrices over all pixels of all images (the usual
    semantic-segmentation mIoU) at the model's input size and at each photo's own size.

    Returns {"model_res": scores, "full_res": scores (if full_res), "loss" (if loss_fn), "records"},
    scores as metrics.ConfusionMeter.compute gives them; each record holds an image's own mean IoU
    over the parts present in its target or prediction.
    """
    store, names = loader.dataset.store, list(predictor.spec.class_names)
    model_res, full = ConfusionMeter(len(names)), ConfusionMeter(len(names))
    records, loss_sum = [], 0.0
    for images, masks, indices in _progress(loader, world):
        logits = predictor.logits(images)
        probs, masks = logits.softmax(1), masks.to(predictor.device)
        if loss_fn is not None:
            loss_sum += loss_fn(logits, masks).item() * len(images)
        model_res.update(probs.argmax(1), masks)
        for j, index in enumerate(indices.tolist()):
            record = {"name": store.samples[index].name, "group": store.samples[index].group}
            if full_res:
                pred = predictor.class_map(probs[j], store.full_sizes[index])
                target = torch.from_numpy(store.full_mask(index)).to(predictor.device)
                own = ConfusionMeter(len(names))
                own.update(pred, target)
                full.confusion += own.confusion  # the image's counts, not a second pass over its pixels
                record["miou_full_res"] = own.compute(names)["miou"]
            records.append(record)
    meters, records, loss_sum = _all_ranks(world, {"model_res": model_res, "full": full}, records, loss_sum)
    model_res, full = meters["model_res"], meters["full"]
    result = {"model_res": model_res.compute(names), "records": records}
    if full_res:
        result["full_res"] = full.compute(names)
    if loss_fn is not None:
        result["loss"] = loss_sum / len(records)
    return result


def _progress(loader, world):
    """The loader behind a progress bar, drawn by the first process only."""
    return tqdm(loader, desc="evaluate", unit="batch", leave=False, dynamic_ncols=True, disable=world.bars)


def _all_ranks(world, meters: dict, records: list, loss_sum: float):
    """The meters, records and loss sum of every process merged, on every process; as given in a world of one."""
    if not world.distributed:
        return meters, records, loss_sum
    parts = distributed.gather((meters, records, loss_sum), world)
    merged = {key: type(meter).merged(part[0][key] for part in parts) for key, meter in meters.items()}
    return merged, [record for part in parts for record in part[1]], sum(part[2] for part in parts)


# ---------------------------------------------------------------- evaluate.py on a checkpoint

def select_samples(checkpoint: dict, data_dir, split, where=""):
    """The samples of `split`: the checkpoint's validation cars, its training cars, or all of them.

    "Cars" are the split groups the run drew (its config's group_by), e.g. single photos for the Car Parts set.
    """
    samples, problems = find_samples(data_dir)
    if split == "all":
        return samples, problems
    samples = regroup(samples, checkpoint["config"].get("group_by", "car-id"))  # the groups its split was of
    if "val_groups" not in checkpoint:
        raise ValueError(f"checkpoint {where} records no validation cars; use --split all")
    val_groups = set(checkpoint["val_groups"])
    if split == "val":
        chosen = [s for s in samples if s.group in val_groups]
    elif "train_groups" in checkpoint:
        train_groups = set(checkpoint["train_groups"])
        chosen = [s for s in samples if s.group in train_groups]
    else:  # written before train_groups was recorded
        log.warning("checkpoint %s does not record its training cars: --split train scores every car that is not a "
                    "validation car, including any the run never saw", where)
        chosen = [s for s in samples if s.group not in val_groups]
    if not chosen:
        raise ValueError(f"none of the checkpoint's {split} cars are in {data_dir}; use --split all "
                         "to score every image there")
    for problem in problems:  # unrelated to the chosen split, so not fatal
        log.warning("ignored: %s", problem)
    return chosen, []


def check_classes(checkpoint: dict, data_dir, where=""):
    """ValueError naming both unless the data's classes (find_class_names) are the checkpoint's, in order.

    A mask value is an index into the class list: with another list, or the same names in another
    order, every score would be filed under the wrong class without any error.
    """
    found, trained = list(find_class_names(data_dir)), list(checkpoint["class_names"])
    if found == trained:
        return
    only_data, only_checkpoint = [n for n in found if n not in trained], [n for n in trained if n not in found]
    if only_data or only_checkpoint:
        difference = f"only in the data: {only_data}; only in the checkpoint: {only_checkpoint}"
    else:
        at = next(i for i, (a, b) in enumerate(zip(found, trained)) if a != b)
        difference = f"the same names in another order (class {at} is {found[at]!r} there, {trained[at]!r} here)"
    raise ValueError(f"the classes of the data folder {data_dir} are not those checkpoint {where} was trained on: "
                     f"{difference}\n  data:       {found}\n  checkpoint: {trained}")


def load_split(checkpoint: dict, predictor: Predictor, cfg: EvaluateConfig) -> SegmentationDataset:
    """The decoded samples of cfg.split as a dataset preprocessed for `predictor`, after checking the classes."""
    data_dir = resolve_data_dir(cfg.data_dir)
    check_classes(checkpoint, data_dir, cfg.checkpoint)
    samples, problems = select_samples(checkpoint, data_dir, cfg.split, cfg.checkpoint)
    refuse_names_csv_cannot_hold(samples)
    store = prepare_store(samples, predictor.input_size, cfg.cache_dir, data_dir, problems,
                          num_classes=len(checkpoint["class_names"]))
    return SegmentationDataset(store, normalization=predictor.spec.normalization)


def refuse_names_csv_cannot_hold(samples):
    """ValueError naming the photos whose names are not UTF-8, before any decoding or scoring.

    per_image.csv is UTF-8 text, so such a name (a Latin-1 'café.jpg', which Python carries as lone
    surrogates) could only be written as another name than the file's; found after scoring, it cost
    the run its reports. Shown with the byte escaped ('caf\\xe9.jpg'), as the name cannot be printed.
    """
    bad = [sample.image for sample in samples if not _is_utf8(sample.name)]
    if bad:
        names = ", ".join(os.fsencode(path).decode("utf-8", "backslashreplace") for path in bad[:3])
        raise ValueError(f"{counted(len(bad), 'photo name')} {'is' if len(bad) == 1 else 'are'} not UTF-8, which "
                         f"per_image.csv cannot hold unchanged: {names}{', ...' if len(bad) > 3 else ''}; rename "
                         f"{'it' if len(bad) == 1 else 'them'}")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def default_out_dir(checkpoint, split: str) -> Path:
    """<checkpoint folder>/eval-<checkpoint stem>-<split>: each checkpoint's own, as the two bundled
    models share checkpoints/ (eval-<split> alone mixed their reports in one folder)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"eval-{checkpoint.stem}-{split}"


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """Score a checkpoint and write the reports (see the module docstring); returns the summary.

    Raises ValueError for a --threshold given to a car-parts checkpoint, data whose classes differ
    from the checkpoint's, or a split with none of the checkpoint's images, and FileExistsError for a
    report folder holding files of the reports' names that no evaluation wrote (check_report_folder),
    all before any scoring.
    """
    cfg = dataclasses.replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or str(default_out_dir(cfg.checkpoint, cfg.split)))
    log.info("evaluating %s", cfg.checkpoint)
    problem = atomic.folder_problem(cfg.out_dir)
    if problem is not None:  # before scoring, not after
        raise ValueError(f"--out-dir {cfg.out_dir}: reports cannot be written there: {problem}")
    replaceable = check_report_folder(Path(cfg.out_dir), cfg.overwrite)
    checkpoint = load_source(cfg.checkpoint)  # a .pt checkpoint, or an exported .onnx file's metadata
    classes = len(checkpoint["class_names"])
    if is_multiclass(classes) and cfg.threshold is not None:
        raise ValueError(f"--threshold {cfg.threshold}: checkpoint {cfg.checkpoint} is a {classes}-class parts model; "
                         "each pixel takes its most probable class (argmax), which has no threshold to set")
    predictor = Predictor.from_checkpoint(checkpoint, cfg.device, cfg.precision, cfg.tta, cfg.threshold, cfg.backend)
    log.info("%s", predictor.describe())
    dataset = load_split(checkpoint, predictor, cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, pin_memory=predictor.device.type == "cuda")
    start = time.perf_counter()
    multiclass = predictor.spec.multiclass
    result = evaluate(predictor, loader, sweep=() if multiclass else SWEEP_THRESHOLDS)
    head = {"checkpoint": str(cfg.checkpoint), "data_dir": str(resolve_data_dir(cfg.data_dir)), "split": cfg.split,
            "out_dir": cfg.out_dir, "device": str(predictor.device), "cpu": runtime.cpu_description()}
    summarise, write, draw = ((parts_summary, write_parts_reports, draw_parts_examples) if multiclass else
                              (binary_summary, write_reports, draw_examples))
    summary, ranked = summarise(head, result, predictor, dataset.store, cfg, time.perf_counter() - start)
    try:
        out_dir = Path(cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Every report's name is listed before any is written, so that a run killed midway still owns
        # what it wrote (check_report_folder made sure no other file of those names is there).
        record_report_files(out_dir, REPORT_FILES)
        written = write(out_dir, summary, ranked) + draw(predictor, dataset, ranked, cfg)
        remove_stale_reports(out_dir, written, replaceable)
        record_report_files(out_dir, written)
    except OSError as err:  # the scores are still worth having: main prints them, then fails
        summary["report_error"] = str(err)
    return summary


def _median(values: list):
    return float(np.median(values)) if values else None


def binary_summary(head: dict, result: dict, predictor: Predictor, store, cfg, seconds: float):
    """(summary, records ranked worst first by full-res Dice) of a binary model's `evaluate` result."""
    summary = {**head, "threshold": predictor.threshold, "backend": predictor.backend, "precision": predictor.precision,
               "tta": cfg.tta, "model_size": list(predictor.input_size), "cars": len({s.group for s in store.samples}),
               "seconds": round(seconds, 1), "full_res": result["full_res"],
               "model_res": result["model_res"], "sweep": result["sweep"],
               # the median photo's unsure pixels per outline pixel: a checkpoint's quality_reference (inference.py)
               "unsure_per_edge": result["unsure_per_edge"]}
    ranked = sorted(result["records"], key=lambda r: r["dice_full_res"])
    summary["worst"] = [{"name": r["name"], "dice_full_res": r["dice_full_res"]} for r in ranked[:cfg.worst_k]]
    return summary, ranked


def parts_summary(head: dict, result: dict, predictor: Predictor, store, cfg, seconds: float):
    """(summary, records ranked worst first by full-res per-image mIoU) of a parts model's `evaluate` result.

    An image with no part in its truth or its prediction has no mIoU (None): nothing to miss, it ranks last.
    """
    summary = {**head, "backend": predictor.backend, "precision": predictor.precision, "tta": cfg.tta, "model_size": list(predictor.input_size),
               "images": len(result["records"]), "groups": len({s.group for s in store.samples}),
               "seconds": round(seconds, 1), "class_names": list(predictor.spec.class_names),
               "full_res": result["full_res"], "model_res": result["model_res"]}
    ranked = sorted(result["records"], key=lambda r: (r["miou_full_res"] is None, r["miou_full_res"] or 0.0))
    summary["worst"] = [{"name": r["name"], "miou_full_res": r["miou_full_res"]} for r in ranked[:cfg.worst_k]]
    return summary, ranked


def report_files_owned(out_dir: Path) -> set:
    """The REPORT_FILES that an earlier evaluation recorded writing in out_dir (its MANIFEST); none
    without a readable one. Names the manifest holds besides REPORT_FILES are ignored: it never
    makes evaluate.py touch another file."""
    try:
        files = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):  # none, unreadable, not JSON, not an object
        return set()
    return set(files) & set(REPORT_FILES) if isinstance(files, list) and all(isinstance(f, str) for f in files) \
        else set()


def check_report_folder(out_dir: Path, overwrite: bool) -> list:
    """Before scoring: the REPORT_FILES in out_dir this evaluation may replace or remove, in REPORT_FILES order.

    Those an earlier evaluation wrote (report_files_owned); the others present too with `overwrite`.
    Without it, such a file (the user's own summary.json, or reports of a version that kept no
    manifest) is a FileExistsError naming it; a folder at a report's name always is.
    """
    present = [name for name in REPORT_FILES if os.path.lexists(out_dir / name)]
    folders = [name for name in present if (out_dir / name).is_dir()]
    if folders:
        raise FileExistsError(f"the report folder {out_dir} holds folders named as reports ({', '.join(folders)}); "
                              "move them, or choose another --out-dir")
    owned = report_files_owned(out_dir)
    foreign = [name for name in present if name not in owned]
    if foreign and not overwrite:
        why = (f"its {MANIFEST} does not list them" if (out_dir / MANIFEST).exists() else
               f"it has no {MANIFEST}; reports of a version before it carry no record either")
        raise FileExistsError(f"the report folder {out_dir} holds {', '.join(foreign)}, which no earlier evaluation "
                              f"recorded writing there ({why}): pass --overwrite to replace or remove them, or "
                              "choose another --out-dir")
    return present


def record_report_files(out_dir: Path, names):
    """Write out_dir's MANIFEST: the report files this evaluation writes there, which a later one may replace."""
    names = [name for name in REPORT_FILES if name in set(names)]
    atomic.write_text(out_dir / MANIFEST, json.dumps({"written_by": "evaluate.py", "files": names}, indent=2) + "\n")


def remove_stale_reports(out_dir: Path, written: list, replaceable) -> list:
    """Delete the `replaceable` report files (check_report_folder's) this evaluation did not write; returns their names.

    They are an earlier evaluation's whose other files this one has just replaced: another model's
    confusion.png beside this one's summary.json, or a worst.png that --worst-k 0 no longer draws,
    would read as this run's. Only after every report is written, so a failed run removes nothing.
    """
    stale = [name for name in REPORT_FILES
             if name in replaceable and name not in written and (out_dir / name).is_file()]
    for name in stale:
        (out_dir / name).unlink()
    if stale:
        log.info("removed an earlier evaluation's %s from %s", ", ".join(stale), out_dir)
    return stale


def write_reports(out_dir: Path, summary: dict, ranked: list) -> list:
    """per_image.csv (the records as ranked: worst first), summary.json and threshold_sweep.png; returns their names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["name", "car_id", "dice_full_res", "iou_full_res", "dice_model_res"],
                            lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**record, "car_id": record["group"]} for record in ranked)  # a Carvana group is a car
    atomic.write_text(out_dir / "per_image.csv", text.getvalue())
    atomic.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    plots.plot_threshold_sweep(summary["sweep"], out_dir / "threshold_sweep.png")
    return ["per_image.csv", "summary.json", "threshold_sweep.png"]


def write_parts_reports(out_dir: Path, summary: dict, ranked: list) -> list:
    """per_image.csv (worst first), per_class.csv (full res), summary.json and confusion.png (full res);
    returns their names.

    A score that does not exist (a class absent from truth and prediction) is an empty CSV cell, null in JSON.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"name": r["name"], "group": r["group"], "miou_full_res": r.get("miou_full_res")} for r in ranked]
    atomic.write_text(out_dir / "per_image.csv", csv_text(["name", "group", "miou_full_res"], rows))
    per_class = summary["full_res"]["per_class"]
    rows = [{"class": name, "iou": s["iou"], "dice": s["dice"], "true_pixels": s["pixels"],
             "predicted_pixels": s["predicted"]} for name, s in per_class.items()]
    atomic.write_text(out_dir / "per_class.csv", csv_text(["class", "iou", "dice", "true_pixels", "predicted_pixels"],
                                                          rows))
    atomic.write_text(out_dir / "summary.json", compact_json(summary))
    plots.plot_confusion_matrix(summary["full_res"]["confusion"], summary["class_names"], out_dir / "confusion.png",
                                title=f"full-resolution confusion, {summary['split']} split: "
                                      f"{atomic.shown(Path(summary['checkpoint']).name)}")
    return ["per_image.csv", "per_class.csv", "summary.json", "confusion.png"]


def csv_text(fields: list, rows: list) -> str:
    """CSV of dict rows; floats at full precision (repr), so they read back equal to summary.json's."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def compact_json(data) -> str:
    """Indented JSON with each innermost list of integers on one line: a 19-class confusion matrix
    takes 19 lines, not 400."""
    return re.sub(r"\[\s+(-?\d+(?:,\s+-?\d+)*)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]",
                  json.dumps(data, indent=2)) + "\n"


def example_picks(store, ranked: list, cfg: EvaluateConfig) -> dict:
    """{"worst.png": store indices of the first cfg.worst_k ranked records, "samples.png": a seeded random few},
    leaving out a file with no image to draw."""
    by_name = {s.name: i for i, s in enumerate(store.samples)}
    rng = np.random.default_rng(0)
    picks = {"worst.png": [by_name[r["name"]] for r in ranked[:cfg.worst_k]],
             "samples.png": sorted(rng.choice(len(store), min(cfg.num_samples, len(store)), replace=False).tolist())}
    return {filename: indices for filename, indices in picks.items() if indices}


def draw_examples(predictor: Predictor, dataset: SegmentationDataset, ranked: list, cfg: EvaluateConfig) -> list:
    """worst.png (the first, lowest-Dice, of the ranked records) and samples.png (a seeded random few);
    returns the names drawn."""
    store = dataset.store
    dice = {r["name"]: r["dice_full_res"] for r in ranked}
    picks = example_picks(store, ranked, cfg)
    for filename, indices in picks.items():
        rows = []
        for index in indices:
            images, _, _ = dataset[index]
            pred = predictor.masks(images[None], [store.full_sizes[index]])[0] > 0
            name = store.samples[index].name
            rows.append({"image": store.images[index], "pred": pred,
                         "target": store.full_mask(index).astype(bool), "label": f"{name}  Dice {dice[name]:.4f}"})
        plots.plot_prediction_panels(rows, Path(cfg.out_dir) / filename,
                                     title=f"{filename[:-4]}: {atomic.shown(Path(cfg.checkpoint).name)}")
    return list(picks)


def draw_parts_examples(predictor: Predictor, dataset: SegmentationDataset, ranked: list, cfg: EvaluateConfig) -> list:
    """worst.png (lowest per-image mIoU first) and samples.png (a seeded random few): per image one row
    photo | truth overlay | predicted overlay, over a legend of the classes in either; returns the names drawn."""
    store, names = dataset.store, list(predictor.spec.class_names)
    colours = palette(len(names))
    miou = {r["name"]: r.get("miou_full_res") for r in ranked}
    picks = example_picks(store, ranked, cfg)
    for filename, indices in picks.items():
        rows = []
        for index in indices:
            images, _, _ = dataset[index]
            pred = predictor.labels(images[None], [store.full_sizes[index]])[0]
            sample = store.samples[index]
            score = "no parts" if miou[sample.name] is None else f"mIoU {miou[sample.name]:.3f}"
            truth = store.full_mask(index)
            # from the file: the store holds the photo squashed to the model's input size
            photo, _ = load_image(sample.image, plots.panel_size(truth.shape))
            rows.append(plots.parts_row(photo, truth, pred, names, colours, f"{sample.name}  {score}"))
        title = f"{filename[:-4]}: {atomic.shown(Path(cfg.checkpoint).name)}, {cfg.split} split"
        atomic.write_bytes(Path(cfg.out_dir) / filename, encode(plots.stack_rows(rows, title), "png"))
    return list(picks)


# ---------------------------------------------------------------- printing

def format_summary(summary: dict) -> str:
    """Human-readable headline, worst images and sweep (binary), or the per-class table (parts)."""
    if "class_names" in summary:
        return format_parts_summary(summary)
    full, small = summary["full_res"], summary["model_res"]
    lines = [f"{summary['split']} split: {counted(full['images'], 'image')} of {counted(summary['cars'], 'car')} from "
             f"{atomic.shown(summary['data_dir'])}; {summary.get('backend', 'torch')} {summary['precision']}",
             f"full resolution   mean Dice {full['dice']:.5f}  mean IoU {full['iou']:.5f}  "
             f"pooled Dice {full['dice_pooled']:.5f}  pixel accuracy {full['pixel_accuracy']:.5f}",
             f"model resolution  mean Dice {small['dice']:.5f}  mean IoU {small['iou']:.5f}  "
             f"({summary['model_size'][0]}x{summary['model_size'][1]}, threshold {summary['threshold']}"
             f"{', flip TTA' if summary.get('tta') else ''})",
             "worst images: " + ", ".join(f"{w['name']} {w['dice_full_res']:.4f}" for w in summary["worst"]),
             "threshold sweep (full-res Dice): " + "  ".join(f"{r['threshold']}:{r['dice']:.5f}" for r in summary["sweep"])]
    return "\n".join(lines)


def format_parts_summary(summary: dict) -> str:
    """The full-resolution per-class table (parts in class order, background apart below), the means
    over the parts, pixel accuracy, the model-resolution means and the worst images."""
    full, small, names = summary["full_res"], summary["model_res"], summary["class_names"]
    scored = sum(full["per_class"][n]["iou"] is not None for n in names[1:])
    parts = f"{len(names) - 1} parts" + (f" ({scored} occur{'s' if scored == 1 else ''})" if scored < len(names) - 1
                                         else "")
    means = [(f"mean IoU over the {parts}", full["miou"]), (f"mean Dice over the {parts}", full["mdice"]),
             ("pixel accuracy", full["pixel_accuracy"])]
    width = max(len(n) + 2 for n in names + ["class"])
    width = max([width] + [len(label) for label, _ in means])
    lines = [f"{summary['split']} split: {counted(summary['images'], 'image')} ({counted(summary['groups'], 'group')}) "
             f"from {atomic.shown(summary['data_dir'])}; model {summary['model_size'][0]}x{summary['model_size'][1]}, "
             f"{summary.get('backend', 'torch')} {summary['precision']}{', flip TTA' if summary.get('tta') else ''}",
             "full resolution, scored from one confusion matrix over all pixels:"]
    lines += class_table(full, names, width)
    lines += [f"{label:<{width}}  {_score(value)}" for label, value in means]
    lines += [f"model resolution: mean IoU {_score(small['miou']).strip()}  mean Dice {_score(small['mdice']).strip()}  "
              f"pixel accuracy {_score(small['pixel_accuracy']).strip()}",
              "worst images (per-image mIoU): " + ", ".join(f"{w['name']} {_score(w['miou_full_res']).strip()}"
                                                           for w in summary["worst"])]
    return "\n".join(lines)


def class_table(scores: dict, names: list, width: int) -> list:
    """Lines of class | IoU | Dice | share of the true pixels: the parts in order, then the background
    under a rule; names indented by 2 in a column `width` wide."""
    total = sum(s["pixels"] for s in scores["per_class"].values())
    row = lambda n, s: f"  {n:<{width - 2}}  {_score(s['iou'])}  {_score(s['dice'])}  {100 * s['pixels'] / total:9.2f}%"
    lines = [f"  {'class':<{width - 2}}  {'IoU':>7}  {'Dice':>7}  {'true px':>10}"]
    lines += [row(n, scores["per_class"][n]) for n in names[1:]]
    return lines + [f"  {'-' * (width + 26)}", row(names[0], scores["per_class"][names[0]])]


def _score(value) -> str:
    """A score in 7 characters; '-' for None (a class absent from both truth and prediction)."""
    return f"{'-':>7}" if value is None else f"{value:7.4f}"


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    try:
        summary = evaluate_checkpoint(cfg)
    except (OSError, ValueError) as err:  # FileNotFoundError, a folder that cannot be written...
        raise SystemExit(f"error: {atomic.shown(err)}")  # a name that is not UTF-8 shows as U+FFFD
    print(format_summary(summary))
    if "report_error" in summary:
        raise SystemExit(f"error: the reports could not be written: {atomic.shown(summary['report_error'])}")
    print(f"reports in {atomic.shown(summary['out_dir'])}")
    return summary


if __name__ == "__main__":
    main()
