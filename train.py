"""Train a U-Net on Carvana image/mask pairs, validating by car with the full-resolution Kaggle metric.

    python train.py                                   # defaults: the 2-core CPU recipe
    python train.py --config configs/cpu-quick.json   # a few minutes on a laptop CPU
    python train.py --resume checkpoints/<run>/last.pt

Writes checkpoints/<run>/: config.json, last.pt (every epoch, atomically), best.pt (best validation
Dice), metrics.jsonl (one line per epoch) and curves.png.
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import plots
import runtime
from config import TrainConfig, parse_config, resolve_data_dir
from averaging import WeightEMA, recompute_batchnorm
from dataset import CarvanaDataset, build_transform, find_samples, prepare_store, split_by_car
from evaluate import evaluate
from losses import BCEDiceLoss
from model import CHECKPOINT_FORMAT, UNet, load_checkpoint

log = logging.getLogger(__name__)
# Options that change what the weights mean or which cars are validation: a resume may not change them.
# What a run saved before an option existed effectively used: today's default, except where that
# default has changed since (resuming such a run must go on with the loss it started with).
BEFORE_OPTION = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | {"boundary_weight": 0.0}
FIXED_ON_RESUME = ("width", "height", "base_channels", "depth", "bilinear", "space_to_depth", "refine_channels", "val_fraction", "split_seed", "max_cars")


def seed_everything(seed: int):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_stores(cfg: TrainConfig):
    """Find, split (by car) and decode all samples, failing before training on any problem."""
    data_dir = Path(cfg.data_dir)  # train() has resolved it already
    samples, problems = find_samples(data_dir)
    if cfg.max_cars:
        keep = set(sorted({s.car_id for s in samples})[:cfg.max_cars])
        samples = [s for s in samples if s.car_id in keep]
    train_samples, val_samples = split_by_car(samples, cfg.val_fraction, cfg.split_seed)
    store = prepare_store(train_samples + val_samples, (cfg.width, cfg.height), cfg.cache_dir, data_dir, problems)
    n = len(train_samples)
    train_store, val_store = store.subset(range(n)), store.subset(range(n, len(store)))
    log.info("data %s: %d training images of %d cars, %d validation images of %d cars, at %dx%d",
             data_dir, len(train_store), len({s.car_id for s in train_samples}), len(val_store),
             len({s.car_id for s in val_samples}), cfg.width, cfg.height)
    return train_store, val_store


def _worker_init(worker_id):
    # Each worker holds a copy of the transform; give each its own stream, derived from the loader's seed.
    info = torch.utils.data.get_worker_info()
    info.dataset.set_epoch(info.seed % 2**31)


def training_transform(cfg):
    """The augmentation and random crop every training sample goes through."""
    return build_transform(cfg.augment, (cfg.crop_width, cfg.crop_height) if cfg.crop_width else None)


def build_loaders(cfg, train_store, val_store, device):
    pin = device.type == "cuda"
    train_set = CarvanaDataset(train_store, training_transform(cfg))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) > cfg.batch_size,
        num_workers=cfg.num_workers, pin_memory=pin, generator=torch.Generator(),
        worker_init_fn=_worker_init if cfg.num_workers else None)
    val_loader = torch.utils.data.DataLoader(CarvanaDataset(val_store), batch_size=cfg.batch_size,
                                             num_workers=cfg.num_workers, pin_memory=pin)
    return train_loader, val_loader


def batchnorm_batches(cfg, train_store):
    """Batches for recompute_batchnorm: a fixed, seeded draw of augmented training samples (crops too).

    They must look like training batches: statistics of whole images, when the model trained on crops,
    cost 0.011 Dice here. The same draw every time, so a resumed run recomputes the same statistics.
    """
    dataset = CarvanaDataset(train_store, training_transform(cfg))
    dataset.set_epoch(cfg.seed)
    count = min(cfg.precise_bn, len(train_store))
    chosen = torch.randperm(len(train_store), generator=torch.Generator().manual_seed(cfg.seed))[:count].tolist()
    for start in range(0, count, cfg.batch_size):
        yield torch.stack([dataset[i][0] for i in chosen[start:start + cfg.batch_size]])


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from 0, then cosine decay to 0 at the last step."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(cfg, model, steps_per_epoch):
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = kind(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, device, precision, cfg, epoch, step,
                    ema=None):
    """One pass over the training set; returns (mean loss, images/s, global step)."""
    model.train()
    total, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, dynamic_ncols=True, disable=None)
    for images, masks, _ in bar:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, precision):
            logits = model(images)
        loss = loss_fn(logits, masks)  # fp32: BCEDiceLoss upcasts the logits
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step + 1}; stopping. "
                                     "last.pt still holds the last good epoch (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        if ema is not None:
            ema.update(step)
        total += loss.item() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{total / count:.4f}", img_s=f"{count / (time.perf_counter() - start):.1f}")
    return total / count, count / (time.perf_counter() - start), step


def save_checkpoint(path: Path, checkpoint: dict):
    """Write atomically: a kill mid-write leaves the previous file intact, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_checkpoint(raw_model, cfg, state: dict, full=True) -> dict:
    """"model" holds the weights to predict with: the EMA where there is one, else the trained weights."""
    ema = state.get("ema")
    checkpoint = {"format_version": CHECKPOINT_FORMAT, "model_args": raw_model.model_args,
                  "model": (ema.model if ema else raw_model).state_dict(), "config": dataclasses.asdict(cfg),
                  "threshold": cfg.threshold, "val_cars": sorted(state["val_cars"]),
                  "epoch": state["epoch"], "global_step": state["step"], "best_val_dice": state["best"],
                  "metrics": state["history"][-1] if state["history"] else {}, "history": state["history"]}
    if full:
        checkpoint.update(optimizer=state["optimizer"].state_dict(), scheduler=state["scheduler"].state_dict(),
                          scaler=state["scaler"].state_dict())
        if ema:
            checkpoint["train_model"] = raw_model.state_dict()
    return checkpoint


def run_dir_for(cfg: TrainConfig) -> Path:
    if cfg.resume:
        return Path(cfg.resume).parent if Path(cfg.resume).is_file() else Path(cfg.resume)
    run_dir = Path(cfg.out_dir) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume {run_dir / 'last.pt'} "
                              "or choose another --run-name")
    return run_dir


def load_resume_checkpoint(cfg):
    """Read --resume's checkpoint, refusing one that cannot continue under this config."""
    path = Path(cfg.resume)
    checkpoint = load_checkpoint(path / "last.pt" if path.is_dir() else path)
    for key in FIXED_ON_RESUME:
        used = checkpoint["config"].get(key, BEFORE_OPTION[key])
        if used != getattr(cfg, key):
            raise ValueError(f"--resume {cfg.resume}: the run used {key}={used!r}, "
                             f"this command says {getattr(cfg, key)!r}; drop the flag to continue the run")
    if "optimizer" not in checkpoint:
        raise ValueError(f"--resume {cfg.resume}: this checkpoint holds weights only; resume from last.pt")
    return checkpoint


def restore(checkpoint, raw_model, state):
    """Put a resumed run's weights and optimizer/scheduler/scaler state back in place."""
    raw_model.load_state_dict(checkpoint.get("train_model", checkpoint["model"]))
    if state.get("ema"):  # a run that had no EMA yet starts one from its current weights
        state["ema"].model.load_state_dict(checkpoint["model"] if "train_model" in checkpoint
                                           else raw_model.state_dict())
    for name in ("optimizer", "scheduler", "scaler"):
        state[name].load_state_dict(checkpoint[name])
    state.update(epoch=checkpoint["epoch"], step=checkpoint["global_step"], best=checkpoint["best_val_dice"],
                 history=checkpoint["history"])
    log.info("resuming at epoch %d, step %d", state["epoch"] + 1, state["step"])


def log_epoch(run_dir, cfg, record):
    """The one log line per epoch, metrics.jsonl and curves.png."""
    full = f" (full-res {record['val_dice_full']:.5f}, IoU {record['val_iou_full']:.5f})" \
        if "val_dice_full" in record else ""
    log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val Dice %.5f%s  lr %.2e  %.1f img/s  %.0fs",
             record["epoch"], cfg.epochs, record["train_loss"], record["val_loss"], record["val_dice"], full,
             record["lr"], record["images_per_s"], record["seconds"])


def write_history(run_dir, history):
    """metrics.jsonl is rewritten from the checkpointed history, so a resumed run never shows a lost epoch."""
    tmp = run_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, run_dir / "metrics.jsonl")
    plots.plot_training_curves(history, run_dir / "curves.png")


def train(cfg: TrainConfig) -> dict:
    """Train to cfg.epochs (continuing --resume if given); returns the last epoch's metrics."""
    # Record where the data really came from, so evaluate.py finds it from the checkpoint alone.
    cfg = dataclasses.replace(cfg, data_dir=str(resolve_data_dir(cfg.data_dir).resolve()))
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    runtime.configure_backends(device)
    run_dir = run_dir_for(cfg)
    resumed = load_resume_checkpoint(cfg) if cfg.resume else None  # fail fast, before decoding
    train_store, val_store = build_stores(cfg)
    train_loader, val_loader = build_loaders(cfg, train_store, val_store, device)
    seed_everything(cfg.seed)
    raw_model = UNet(base_channels=cfg.base_channels, depth=cfg.depth, bilinear=cfg.bilinear,
                     space_to_depth=cfg.space_to_depth, refine_channels=cfg.refine_channels).to(device)
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg, raw_model, len(train_loader))
    state = dict(optimizer=optimizer, scheduler=scheduler, scaler=runtime.grad_scaler(device, precision),
                 epoch=0, step=0, best=-1.0, history=[], val_cars={s.car_id for s in val_store.samples},
                 ema=WeightEMA(raw_model, cfg.ema_decay) if cfg.ema_decay else None)
    if resumed is not None:
        restore(resumed, raw_model, state)
    # Static shapes: training crops and whole validation images get a graph each. Dynamic-shape
    # graphs of this model failed to compile in bf16 with torch 2.14 (an inductor TypeError).
    model = torch.compile(raw_model, dynamic=False) if cfg.compile else raw_model
    loss_fn = BCEDiceLoss(cfg.bce_weight, cfg.dice_weight, cfg.boundary_weight)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    head = f" at half size + {cfg.refine_channels}-channel refinement head" if cfg.refine_channels else ""
    log.info("run %s: %s, %s, U-Net width %d depth %d%s (%.2f M parameters)", run_dir, device, precision,
             cfg.base_channels, cfg.depth, head, sum(p.numel() for p in raw_model.parameters()) / 1e6)
    try:
        run_epochs(cfg, run_dir, model, raw_model, train_loader, val_loader, loss_fn, state, device, precision,
                   train_store)
    except KeyboardInterrupt:
        # last.pt (the last whole epoch) stays the resume point: resuming from mid-epoch weights
        # could not replay the epoch exactly. The weights of the moment go to interrupted.pt.
        save_checkpoint(run_dir / "interrupted.pt", make_checkpoint(raw_model, cfg, state, full=False))
        log.warning("interrupted during epoch %d: weights of this moment in %s; resume from %s",
                    state["epoch"] + 1, run_dir / "interrupted.pt", run_dir / "last.pt")
        raise
    return {"run_dir": str(run_dir), "best_val_dice": state["best"], **state["history"][-1]}


def run_epochs(cfg, run_dir, model, raw_model, train_loader, val_loader, loss_fn, state, device, precision,
               train_store):
    """The epoch loop: train, validate, checkpoint, log."""
    optimizer, scheduler = state["optimizer"], state["scheduler"]
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        start = time.perf_counter()
        # Everything random in an epoch derives from (seed, epoch), so a resumed run replays it exactly.
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        train_loader.dataset.set_epoch(cfg.seed * 100_003 + epoch)
        train_loss, speed, state["step"] = train_one_epoch(model, train_loader, optimizer, scheduler, state["scaler"],
                                                           loss_fn, device, precision, cfg, epoch, state["step"],
                                                           state["ema"])
        # Validate what the checkpoint will hold: the average if there is one, else the (compiled) model.
        stats_model, eval_model = (state["ema"].model,) * 2 if state["ema"] else (raw_model, model)
        if cfg.precise_bn:
            recompute_batchnorm(stats_model, batchnorm_batches(cfg, train_store), device, precision, cfg.channels_last)
        result = evaluate(eval_model, val_loader, device, precision, cfg.threshold, cfg.full_res_val, loss_fn=loss_fn)
        record = {"epoch": epoch, "step": state["step"], "train_loss": train_loss, "val_loss": result["loss"],
                  "val_dice": result["small"]["dice"], "val_iou": result["small"]["iou"],
                  "lr": scheduler.get_last_lr()[0], "images_per_s": speed}
        if cfg.full_res_val:
            record.update(val_dice_full=result["full"]["dice"], val_iou_full=result["full"]["iou"])
        record["seconds"] = time.perf_counter() - start
        state["history"].append(record)
        state["epoch"] = epoch
        score = record.get("val_dice_full", record["val_dice"])
        improved = score > state["best"]
        state["best"] = max(state["best"], score)
        save_checkpoint(run_dir / "last.pt", make_checkpoint(raw_model, cfg, state))
        if improved:
            save_checkpoint(run_dir / "best.pt", make_checkpoint(raw_model, cfg, state, full=False))
        write_history(run_dir, state["history"])
        log_epoch(run_dir, cfg, record)


def resume_defaults(argv):
    """With --resume, the run's own stored config becomes the base that flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume", default="")
    resume = pre.parse_known_args(argv)[0].resume
    if not resume:
        return None
    path = Path(resume)
    stored = load_checkpoint(path / "last.pt" if path.is_dir() else path)["config"]
    return BEFORE_OPTION | stored | {"resume": resume}


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], base=resume_defaults(argv))
        summary = train(cfg)
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as err:
        raise SystemExit(f"error: {err}")
    except KeyboardInterrupt:
        print("interrupted: last.pt holds the last completed epoch; continue with --resume <run>/last.pt",
              file=sys.stderr)
        raise SystemExit(130)
    best = Path(summary["run_dir"]) / "best.pt"
    log.info("done: best validation Dice %.5f (full resolution); next:\n  python evaluate.py --checkpoint %s"
             "\n  python predict.py PHOTOS... --checkpoint %s --out-dir masks/", summary["best_val_dice"], best, best)
    return summary


if __name__ == "__main__":
    main()
