"""Train a segmentation model on Carvana image/mask pairs, validating by car with the full-resolution Kaggle metric.

    python train.py                                   # defaults: the 2-core CPU recipe
    python train.py --config configs/cpu-quick.json   # a few minutes on a laptop CPU
    python train.py --resume checkpoints/<run>/last.pt
    torchrun --standalone --nproc_per_node=4 train.py --sync-bn   # DDP, one process per GPU (docs/distributed.md)

Writes checkpoints/<run>/: config.json, last.pt (every epoch, atomically), best.pt (best validation
Dice), metrics.jsonl (one line per epoch) and curves.png. <run> is --run-name (a new or empty folder)
or the start time; each run creates its own folder (create_run_dir), so no run writes into another's.
"""
import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from carseg import atomic, distributed, plots, runtime
from backends import TorchRunner
from carseg.batchnorm import recompute_batchnorm, synchronise
from config import TrainConfig, counted, option_shown, parse_config, resolve_data_dir
from carseg.augment import build_transform
from dataset import (SegmentationDataset, describe_split, find_class_names, find_samples, prepare_store,
                     regroup, split_by_car)
from evaluate import evaluate
from inference import InferenceSpec, Predictor
from losses import BCEDiceLoss, CEDiceLoss
from model import OFFLINE_PRETRAINED, build_model
from carseg.checkpoint import checkpoint_for, load_checkpoint, output_channels, save_checkpoint
from carseg.labels import is_multiclass

log = logging.getLogger(__name__)
# Options that change what the weights mean or which cars are validation: a resume may not change them.
FIXED_ON_RESUME = ("arch", "image_width", "image_height", "base_channels", "depth", "bilinear", "val_fraction",
                   "split_seed", "group_by", "max_cars", "run_name")
# What a run saved before an option existed effectively used: today's default, except where that
# default has changed since (resuming such a run must go on with the loss it started with).
BEFORE_OPTION = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | {"boundary_weight": 0.0}
# Options removed because they lost (docs/exploration.md keeps their numbers), each with its "off"
# value: a run that used one cannot be continued by this version.
REMOVED_OPTIONS = {"ema_decay": 0.0, "optimizer": "adamw", "space_to_depth": 1, "refine_channels": 0}


@dataclass
class TrainState:
    """Where a run stands, and what its checkpoints hold, so that a resumed run continues exactly."""
    model: torch.nn.Module      # the uncompiled module: its state_dict keys carry no torch.compile prefix
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    val_groups: list              # the validation car ids, sorted
    train_groups: list            # the training car ids, sorted
    class_names: list           # what the masks' values index, background first (binary: background, car)
    epoch: int = 0              # epochs completed
    global_step: int = 0        # optimisation steps taken
    best_val_score: float = -1.0  # best selection_score so far: Dice, or mean IoU over the parts for multi-class
    history: list = field(default_factory=list)  # one record per epoch, as in metrics.jsonl
    pending: dict | None = None  # the last epoch's training figures while it is not yet validated
    world_size: int = 1         # processes training (torchrun), recorded so a resume can say what changed
    steps_per_epoch: int = 0    # optimisation steps in each epoch of this run's last stretch

    def checkpoint(self, cfg: TrainConfig, resumable: bool = True) -> dict:
        """last.pt (resumable: with optimizer, scheduler and scaler) or best.pt / interrupted.pt (without)."""
        extra = {"class_names": self.class_names, "val_groups": self.val_groups, "train_groups": self.train_groups,
                 "epoch": self.epoch, **self.quality_reference(),
                 "global_step": self.global_step, "best_val_score": self.best_val_score,
                 "metrics": self.history[-1] if self.history else {}, "history": self.history,
                 "world_size": self.world_size, "steps_per_epoch": self.steps_per_epoch}
        if resumable:
            extra.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), pending=self.pending)
        return checkpoint_for(self.model, dataclasses.asdict(cfg), **extra)

    def quality_reference(self) -> dict:
        """{"quality_reference": the best epoch's median unsure pixels per outline pixel on the validation
        photos} for a binary model (inference.Predictor.quality scores photos against it), else {}."""
        scored = [r for r in self.history if "val_unsure_per_edge" in r]
        return {"quality_reference": max(scored, key=selection_score)["val_unsure_per_edge"]} if scored else {}

    def restore(self, checkpoint: dict):
        """Put a resumed run's weights, optimizer/scheduler/scaler state and progress back in place."""
        self.model.load_state_dict(checkpoint["model"])
        for name in ("optimizer", "scheduler", "scaler"):
            getattr(self, name).load_state_dict(checkpoint[name])
        self.epoch, self.global_step = checkpoint["epoch"], checkpoint["global_step"]
        self.best_val_score, self.history = checkpoint["best_val_score"], checkpoint["history"]
        self.pending = checkpoint.get("pending")
        log.info("resuming at epoch %d, step %d", self.epoch + 1, self.global_step)


@dataclass(frozen=True)
class Run:
    """What stays fixed through a run: its options, its folder, where and how it computes, its loss."""
    cfg: TrainConfig
    dir: Path
    device: torch.device
    precision: str
    loss_fn: torch.nn.Module
    world: distributed.World = distributed.SOLO  # this process's place under torchrun
    val_images: int = 0         # validation images over all processes: each is scored exactly once

    def save(self, name: str, state: "TrainState", resumable: bool = True):
        """Write <run>/name from the first process only (every process holds the same weights)."""
        if self.world.main:
            save_checkpoint(self.dir / name, state.checkpoint(self.cfg, resumable))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of an epoch's shuffling and augmentation on one process.

    Rank 0 keeps the one-process value, so a torchrun run's first process replays a plain run's
    augmentation; the rank term (a prime above any epoch count) gives each process its own stream.
    """
    return seed * 100_003 + epoch + rank * 1_000_003


def seed_everything(seed: int):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_args(cfg: TrainConfig, class_names) -> dict:
    """The architecture's constructor arguments: one output channel for car/background, else one per class."""
    args = {"out_channels": output_channels(class_names)}
    if cfg.arch == "unet":
        args.update(base_channels=cfg.base_channels, depth=cfg.depth, bilinear=cfg.bilinear)
    return args


def build_model_for(cfg: TrainConfig, class_names, val_groups=()):
    """A new model for this run; EfficientNet-Lite encoders start from their offline ImageNet weights,
    every layer from --init-from's checkpoint when given (see start_from)."""
    pretrained = not cfg.init_from and ((cfg.pretrained and cfg.arch in OFFLINE_PRETRAINED) or cfg.pretrained_backbone)
    model = build_model(cfg.arch, pretrained=pretrained, **model_args(cfg, class_names))
    origin = "from ImageNet weights" if pretrained else "trained from scratch"
    if cfg.init_from:
        origin = start_from(cfg.init_from, model, class_names, val_groups)
    log.info("model %s (%.2f M parameters), %s", cfg.arch, sum(p.numel() for p in model.parameters()) / 1e6,
             origin if cfg.init_from else f"encoder {origin}")
    return model


def check_fits(path: str, checkpoint: dict, model, class_names):
    """ValueError, naming --init-from and the file, unless the checkpoint holds `model`'s architecture,
    options and classes."""
    what = f"--init-from {path}"
    if checkpoint["arch"] != model.arch or checkpoint["model_args"] != model.model_args:
        raise ValueError(f"{what}: holds a {checkpoint['arch']} {checkpoint['model_args']}, this run builds a "
                         f"{model.arch} {model.model_args}; give the run the checkpoint's --arch and options")
    if list(checkpoint["class_names"]) != list(class_names):
        raise ValueError(f"{what}: trained on the classes {checkpoint['class_names']}, this run's data has "
                         f"{list(class_names)}")


def check_init_from(cfg: TrainConfig):
    """--init-from's model against this run's, before any photo is decoded (fail fast)."""
    class_names = find_class_names(resolve_data_dir(cfg.data_dir))  # cheap: no image decoded
    model = build_model(cfg.arch, **model_args(cfg, class_names))
    check_fits(cfg.init_from, load_checkpoint(cfg.init_from), model, class_names)


def start_from(path: str, model, class_names, val_groups: list) -> str:
    """Load --init-from's weights into `model`; says where they came from.

    ValueError, naming the option and the file, when the checkpoint is another architecture, other
    outputs or classes, or trained on any of this run's validation cars (its score would be a
    training score).
    """
    checkpoint = load_checkpoint(path)
    what = f"--init-from {path}"
    check_fits(path, checkpoint, model, class_names)
    trained = checkpoint.get("train_groups")  # exported checkpoints may lack it: then only its val_groups are safe
    seen = set(val_groups) & set(trained) if trained is not None else set(val_groups) - set(checkpoint["val_groups"])
    seen = sorted(seen)
    if seen:
        raise ValueError(f"{what}: {'trained on' if trained is not None else 'does not say it held out'} "
                         f"{counted(len(seen), 'car')} this run validates on ({', '.join(seen[:3])}"
                         f"{', ...' if len(seen) > 3 else ''}); use the checkpoint's own data and split "
                         "(--data-dir, --val-fraction, --split-seed, --max-cars)")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in checkpoint["model"].items()})
    score = checkpoint.get("best_val_score")
    return (f"weights from {path} (epoch {checkpoint['epoch']}"
            + (f", validation score {score:.5f})" if score is not None else ")"))


def build_loss(cfg: TrainConfig, class_names) -> torch.nn.Module:
    if is_multiclass(class_names):
        return CEDiceLoss(cfg.bce_weight, cfg.dice_weight)
    return BCEDiceLoss(cfg.bce_weight, cfg.dice_weight, cfg.boundary_weight)


def build_stores(cfg: TrainConfig):
    """Find, split (by car) and decode all samples, failing before training on any problem.

    Returns (training store, validation store, class names)."""
    data_dir = resolve_data_dir(cfg.data_dir)
    samples, problems = find_samples(data_dir)
    class_names = find_class_names(data_dir)
    samples = regroup(samples, cfg.group_by)
    if cfg.max_cars:
        keep = set(sorted({s.group for s in samples})[:cfg.max_cars])
        samples = [s for s in samples if s.group in keep]
    train_samples, val_samples = split_by_car(samples, cfg.val_fraction, cfg.split_seed, cfg.group_by)
    if len(train_samples) == 1 and cfg.bottleneck_cells() == 1:  # known before anything is decoded
        width, height = cfg.training_input()
        raise ValueError(f"the split leaves one training image, so every batch holds one image, and its {width}x"
                         f"{height} input shrinks to a 1x1 bottleneck at --depth {cfg.depth}, where BatchNorm cannot "
                         "train: use more images (--val-fraction, --split-seed, --max-cars) or a larger input "
                         "(--crop-width/--crop-height, --image-width/--image-height)")
    line, warnings = describe_split(train_samples, val_samples, cfg.val_fraction, cfg.group_by)
    log.info("%s", line)
    for warning in warnings:
        log.warning("%s", warning)
    size = (cfg.image_width, cfg.image_height)
    store = prepare_store(train_samples + val_samples, size, cfg.cache_dir, data_dir, problems, len(class_names))
    if all(mask.max() == 0 for mask in store.masks):
        raise ValueError(f"every mask in {data_dir} is background: there is nothing to learn (an empty "
                         "annotation list, or masks saved without their labels?)")
    n = len(train_samples)
    train_store, val_store = store.subset(range(n)), store.subset(range(n, len(store)))
    log.info("data %s: %s of %s, %s of %s, at %dx%d", data_dir, counted(len(train_store), "training image"),
             counted(len({s.group for s in train_samples}), "car"), counted(len(val_store), "validation image"),
             counted(len({s.group for s in val_samples}), "car"), *size)
    if is_multiclass(class_names):
        log.info("%d classes: %s", len(class_names), ", ".join(class_names))
    return train_store, val_store, class_names


def _worker_init(worker_id):
    # Each worker holds a copy of the transform; give each its own stream, derived from the loader's seed.
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed % 2**31)


def training_transform(cfg, class_names):
    """The augmentation and random crop every training sample goes through."""
    return build_transform(cfg.augment, (cfg.crop_width, cfg.crop_height) if cfg.crop_width else None, class_names)


def build_loaders(cfg, train_store, val_store, device, normalization, class_names, world=distributed.SOLO):
    """(training loader, validation loader) of this process.

    The training loader draws through a DistributedSampler, in one process too: one permutation per
    epoch, seeded by (seed, epoch), dealt to the processes in turn, so that a step's global batch holds
    the images a one-process step of batch_size x processes takes. The validation loader holds
    this process's contiguous block of the validation images, unpadded (DistributedSampler would repeat
    some to even the blocks, and a repeated image would count twice in the mean Dice).
    """
    pin = device.type == "cuda"
    train_set = SegmentationDataset(train_store, training_transform(cfg, class_names), normalization)
    sampler = DistributedSampler(train_set, world.size, world.rank, seed=cfg.seed * 100_003)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(sampler) > cfg.batch_size,
        num_workers=cfg.num_workers, pin_memory=pin,
        generator=torch.Generator(), worker_init_fn=_worker_init if cfg.num_workers else None)
    val_part = val_store.subset(distributed.shard(len(val_store), world)) if world.distributed else val_store
    val_loader = torch.utils.data.DataLoader(SegmentationDataset(val_part, normalization=normalization),
                                             batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin)
    return train_loader, val_loader


def batchnorm_batches(cfg, train_set: SegmentationDataset, class_names, world=distributed.SOLO):
    """Batches for recompute_batchnorm: a fixed, seeded draw of augmented training samples (crops too).

    They must look like training batches: statistics of whole images, when the model trained on crops,
    cost 0.011 Dice here. The same draw every time, so a resumed run recomputes the same statistics.
    Under torchrun the batches are global batches (batch_size x processes) and each process yields its
    share of each, so that with --sync-bn the statistics are exactly those of one process.
    """
    dataset = SegmentationDataset(train_set.store, training_transform(cfg, class_names), train_set.normalization)
    dataset.reseed(cfg.seed)
    count, size = min(cfg.precise_bn, len(dataset)), cfg.batch_size * world.size  # a global batch
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:count].tolist()
    starts = list(range(0, count, size))
    # Never a batch of one (per process): a short last batch joins the batch before.
    if len(starts) > 1 and count - starts[-1] < 2 * world.size:
        starts.pop()
    for start, end in zip(starts, starts[1:] + [count]):
        batch = chosen[start:end]
        yield torch.stack([dataset[batch[i]][0] for i in distributed.shard(len(batch), world)])


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from 0, then cosine decay to 0 at the last step."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(cfg, model, steps_per_epoch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, build_scheduler(cfg, optimizer, steps_per_epoch)


def build_scheduler(cfg, optimizer, steps_per_epoch: int, epochs_done: int = 0):
    """Warm-up + cosine over cfg.epochs epochs of steps_per_epoch steps, positioned after epochs_done
    (for a resume whose steps per epoch changed; the optimizer then holds each group's initial_lr)."""
    schedule = warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    # last_epoch = position - 1: the constructor takes one step, to the position.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=epochs_done * steps_per_epoch - 1)


def train_one_epoch(run: Run, model, loader, state: TrainState, epoch: int):
    """One pass over the training set, advancing state.global_step; returns (mean loss, images/s)."""
    cfg = run.cfg
    model.train()
    total, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, dynamic_ncols=True,
               disable=run.world.bars)
    for images, masks, _ in bar:
        images = images.to(run.device, non_blocking=True)
        masks = masks.to(run.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(run.device, run.precision):
            logits = model(images)
        loss = run.loss_fn(logits, masks)  # fp32: BCEDiceLoss upcasts the logits
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {state.global_step + 1}; stopping. "
                                     "last.pt still holds the last good epoch (try a lower --lr)")
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if cfg.grad_clip:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        state.global_step += 1
        total += loss.item() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{total / count:.4f}", img_s=f"{count / (time.perf_counter() - start):.1f}")
    if run.world.distributed:  # the mean over every process's images, and all processes' images per second
        total, count = distributed.all_sum(torch.tensor([total, count], dtype=torch.float64, device=run.device),
                                           run.world).tolist()
    return total / count, count / (time.perf_counter() - start)


def validate(run: Run, predictor: Predictor, state: TrainState, loaders) -> dict:
    """Recompute BatchNorm statistics (--precise-bn), then score the validation cars: evaluate()'s result."""
    cfg, (train_loader, val_loader) = run.cfg, loaders
    if cfg.precise_bn:
        recompute_batchnorm(state.model, batchnorm_batches(cfg, train_loader.dataset, state.class_names, run.world),
                            run.device, run.precision, cfg.channels_last, run.world)
    state.model.eval()  # (the compiled model shares the module) the next train_one_epoch switches it back
    result = evaluate(predictor, val_loader, cfg.full_res_val, loss_fn=run.loss_fn, world=run.world)
    names = [record["name"] for record in result["records"]]
    if len(names) != run.val_images or len(set(names)) != len(names):
        raise RuntimeError(f"validation scored {len(names)} images ({len(set(names))} distinct) of {run.val_images}")
    return result


def run_epochs(run: Run, models, state: TrainState, loaders):
    """The epoch loop: train, validate, checkpoint, log. models = (the training model, the validation one)."""
    (cfg, (train_loader, _)), (model, eval_model) = (run.cfg, loaders), models
    # Validation runs the model being trained (compiled, if it is) through the one inference path.
    predictor = Predictor(TorchRunner(eval_model, run.device, run.precision, cfg.channels_last),
                          InferenceSpec.from_config(dataclasses.asdict(cfg), state.model.normalization, state.class_names))
    if state.pending is not None:  # resumed between an epoch's training and its validation
        finish_epoch(run, predictor, state, loaders)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        start = time.perf_counter()
        # Everything random in an epoch derives from (seed, epoch), so a resumed run replays it exactly.
        train_loader.generator.manual_seed(epoch_seed(cfg.seed, epoch, run.world.rank))
        train_loader.dataset.reseed(epoch_seed(cfg.seed, epoch, run.world.rank))
        train_loader.sampler.set_epoch(epoch)
        train_loss, speed = train_one_epoch(run, model, train_loader, state, epoch)
        state.epoch, state.pending = epoch, {"epoch": epoch, "step": state.global_step, "train_loss": train_loss,
                                             "images_per_s": speed, "train_seconds": time.perf_counter() - start}
        # The trained epoch is saved before validation, so a failure or a kill there never loses it:
        # a resume validates it first (recomputed BatchNorm statistics and all, so exactly as here).
        run.save("last.pt", state)
        finish_epoch(run, predictor, state, loaders)


def finish_epoch(run: Run, predictor: Predictor, state: TrainState, loaders):
    """Validate the epoch just trained, then record it: last.pt, best.pt if it is the best so far,
    metrics.jsonl, curves.png and the log line."""
    start, pending = time.perf_counter(), state.pending
    result = validate(run, predictor, state, loaders)
    record = {"epoch": pending["epoch"], "step": pending["step"], "train_loss": pending["train_loss"],
              "val_loss": result["loss"], "val_images": len(result["records"])}
    # Binary: mean per-image Dice and IoU. Multi-class: mean IoU and Dice over the parts, pixel accuracy.
    names = ("miou", "mdice", "pixel_accuracy") if is_multiclass(state.class_names) else ("dice", "iou")
    for res in ("full_res", "model_res") if run.cfg.full_res_val else ("model_res",):
        record.update({f"val_{name}_{res}": result[res][name] for name in names})
    if result.get("unsure_per_edge") is not None:  # binary models: what their quality score is measured against
        record["val_unsure_per_edge"] = result["unsure_per_edge"]
    record.update(lr=state.scheduler.get_last_lr()[0], images_per_s=pending["images_per_s"],
                  seconds=pending["train_seconds"] + time.perf_counter() - start)
    state.history.append(record)
    state.pending = None
    score = selection_score(record)
    improved = score > state.best_val_score
    state.best_val_score = max(state.best_val_score, score)
    run.save("last.pt", state)
    if improved:
        run.save("best.pt", state, resumable=False)
    if run.world.main:
        write_history(run.dir, state.history)
        log_epoch(run.cfg, record)


def selection_score(record: dict) -> float:
    """What best.pt is chosen by: validation Dice (binary) or mean IoU over the parts, at full resolution
    where validated so."""
    name = "val_miou" if "val_miou_model_res" in record else "val_dice"
    return record.get(f"{name}_full_res", record[f"{name}_model_res"])


def log_epoch(cfg, record):
    """The one log line per epoch."""
    if "val_miou_model_res" in record:
        res = "full_res" if "val_miou_full_res" in record else "model_res"
        log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val mIoU %.4f  mDice %.4f  pixel acc %.4f (%s)  "
                 "lr %.2e  %.1f img/s  %.0fs", record["epoch"], cfg.epochs, record["train_loss"], record["val_loss"],
                 record[f"val_miou_{res}"], record[f"val_mdice_{res}"], record[f"val_pixel_accuracy_{res}"],
                 res.replace("_", "-"), record["lr"], record["images_per_s"], record["seconds"])
        return
    full = f"full-res {record['val_dice_full_res']:.5f} (IoU {record['val_iou_full_res']:.5f}), " \
        if "val_dice_full_res" in record else ""
    log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val Dice %smodel-res %.5f  lr %.2e  %.1f img/s  %.0fs",
             record["epoch"], cfg.epochs, record["train_loss"], record["val_loss"], full, record["val_dice_model_res"],
             record["lr"], record["images_per_s"], record["seconds"])


def write_history(run_dir, history):
    """metrics.jsonl is rewritten from the checkpointed history, so a resumed run never shows a lost epoch."""
    atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    plots.plot_training_curves(history, run_dir / "curves.png")


def resume_path(resume: str) -> Path:
    """--resume's checkpoint: the file given, or last.pt inside the run folder given."""
    path = Path(resume)
    return path / "last.pt" if path.is_dir() else path


@contextmanager
def run_folder(cfg: TrainConfig, world=distributed.SOLO):
    """The run's folder (run_dir_for), for the `with` block that trains in it.

    A new run's folder that holds nothing but its config.json when the block fails (bad data, an
    interrupt while decoding) is removed again: a failed start leaves no empty run behind, and the
    same --run-name can be given again.
    """
    run_dir, made = run_dir_for(cfg, world)
    try:
        yield run_dir
    except BaseException:
        if world.main and not cfg.resume:
            discard_unused_run_dir(run_dir, made)
        raise


def run_dir_for(cfg: TrainConfig, world=distributed.SOLO) -> tuple:
    """(the run folder, whether this run made it): --resume's folder, else a new one the first process
    creates (create_run_dir) and names to the others. Every process raises the first one's refusal."""
    if cfg.resume:
        run_dir = resume_path(cfg.resume).parent
        problem = atomic.folder_problem(run_dir)
        if problem is not None:  # before any work, not after decoding the whole data set
            raise ValueError(f"--resume {cfg.resume}: the run folder {run_dir} cannot be written: {problem}")
        return run_dir, False
    outcome = None
    if world.main:
        try:
            outcome = create_run_dir(cfg)
        except (OSError, ValueError) as err:
            outcome = err
    outcome = distributed.broadcast(outcome, world)  # the name is the first process's clock
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def create_run_dir(cfg: TrainConfig) -> tuple:
    """Create a new run's folder under --out-dir and claim it with its config.json; returns (folder, made).

    os.mkdir, which fails where the folder exists, so that two runs never share one and neither
    replaces the other's checkpoints: the default name is the time to the second, and a run started
    in the same second as another takes the next free <time>-2, -3... An explicit --run-name must be
    new or an empty folder (a run there continues with --resume); one holding files is refused.
    """
    out_dir = Path(cfg.out_dir)
    problem = atomic.folder_problem(out_dir)
    if problem is not None:  # before any work, not after decoding the whole data set
        raise ValueError(f"--out-dir {cfg.out_dir}: the run folder cannot be created there: {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run_name:
        run_dir = out_dir / cfg.run_name
        try:
            os.mkdir(run_dir)
            made = True
        except FileExistsError:
            refuse_used_run_dir(run_dir)
            made = False
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in itertools.count(1):
            run_dir = out_dir / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                os.mkdir(run_dir)
                break
            except FileExistsError:
                continue
        made = True
    try:
        write_config(run_dir, cfg, claim=True)
    except FileExistsError:  # another run given the same --run-name claimed the empty folder first
        refuse_used_run_dir(run_dir)
        raise
    return run_dir, made


def refuse_used_run_dir(run_dir: Path):
    """FileExistsError naming `run_dir` unless it is an empty folder: a run's to --resume, or someone's files."""
    if not run_dir.is_dir():
        raise FileExistsError(f"--run-name {run_dir.name}: {run_dir} exists and is not a folder; choose another "
                              "--run-name")
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume "
                              f"{shlex.quote(str(run_dir / 'last.pt'))} or choose another --run-name")
    held = sorted(os.listdir(run_dir))
    if held:
        raise FileExistsError(f"--run-name {run_dir.name}: {run_dir} exists and holds {', '.join(held[:4])}"
                              f"{', ...' if len(held) > 4 else ''}, and no run to --resume (no last.pt): choose "
                              "another --run-name, or empty the folder")


def write_config(run_dir: Path, cfg: TrainConfig, claim: bool = False):
    """<run>/config.json: the options as given, minus --resume, so that replaying the file with --config
    starts a new run. `claim`: create it first with O_EXCL, FileExistsError if it exists already."""
    if claim:
        open(run_dir / "config.json", "x").close()
    replay = dataclasses.asdict(dataclasses.replace(cfg, resume=""))
    atomic.write_text(run_dir / "config.json", json.dumps(replay, indent=2) + "\n")


def discard_unused_run_dir(run_dir: Path, made: bool):
    """Remove the config.json of a new run that wrote nothing else, and its folder if this run made it."""
    try:
        if os.listdir(run_dir) != ["config.json"]:
            return
        (run_dir / "config.json").unlink()
        if made:
            run_dir.rmdir()
    except OSError as err:  # never in place of the error that stopped the run
        log.warning("could not remove the unused run folder %s: %s", run_dir, err.strerror or err)


def check_resumable(cfg: TrainConfig, checkpoint: dict) -> dict:
    """Refuse a checkpoint that cannot continue under this config; returns it."""
    used = checkpoint["config"]
    removed = [f"{key}={used[key]!r}" for key, off in REMOVED_OPTIONS.items() if used.get(key, off) != off]
    if removed:
        raise ValueError(f"--resume {cfg.resume}: the run used {', '.join(removed)}, which this version no longer "
                         "has; finish it with the version that started it")
    for key in FIXED_ON_RESUME:
        value = used.get(key, BEFORE_OPTION[key])
        if value != getattr(cfg, key):
            raise ValueError(f"--resume {cfg.resume}: the run used {option_shown(key, value)}, this command says "
                             f"{option_shown(key, getattr(cfg, key))}; drop the flag to continue the run")
    if "optimizer" not in checkpoint:
        raise ValueError(f"--resume {cfg.resume}: this checkpoint holds weights only; resume from last.pt")
    if cfg.epochs < checkpoint["epoch"]:
        raise ValueError(f"--resume {cfg.resume}: the run has done {counted(checkpoint['epoch'], 'epoch')} already; "
                         f"--epochs {cfg.epochs} would end it before that")
    data_dir = resolve_data_dir(cfg.data_dir)
    found = find_class_names(data_dir)  # cheap: before any image is decoded
    if found != checkpoint["class_names"]:
        raise ValueError(f"--resume {cfg.resume}: the run trained on the classes {checkpoint['class_names']}, the "
                         f"data in {data_dir} has {found}; point --data-dir at the run's data")
    return checkpoint


def check_same_cars(cfg: TrainConfig, checkpoint: dict, state: "TrainState"):
    """A resumed run must validate on the cars it validated on: the data folder found now must be the run's."""
    if checkpoint["val_groups"] != state.val_groups:
        groups = checkpoint["val_groups"]
        raise ValueError(f"--resume {cfg.resume}: the run validated on {counted(len(groups), 'car')} "
                         f"({', '.join(groups[:3])}{', ...' if len(groups) > 3 else ''}), the data in "
                         f"{resolve_data_dir(cfg.data_dir)} gives {counted(len(state.val_groups), 'other')}; point "
                         "--data-dir at the run's data")


def train(cfg: TrainConfig, resumed: dict | None = None) -> dict:
    """Train to cfg.epochs, continuing cfg.resume if given; returns the last epoch's record, run_dir and best_val_score.

    `resumed` is cfg.resume's checkpoint when the caller has loaded it already (main does, for its options).
    Under torchrun this runs in every process (DDP); the first creates the run folder; see docs/distributed.md.
    """
    device = runtime.resolve_device(distributed.device_for(cfg.device, distributed.current()))
    precision = runtime.resolve_precision(cfg.precision, device)
    runtime.configure_backends(device)
    world = distributed.start(device)
    with run_folder(cfg, world) as run_dir:
        if cfg.resume:  # fail fast, before decoding
            resumed = check_resumable(cfg, resumed if resumed is not None else load_checkpoint(resume_path(cfg.resume)))
        if cfg.init_from:
            check_init_from(cfg)
        train_store, val_store, class_names = build_stores(cfg)
        seed_everything(cfg.seed)
        val_groups = sorted({s.group for s in val_store.samples})
        raw_model = build_model_for(cfg, class_names, val_groups).to(device)
        if cfg.sync_bn and world.distributed:
            raw_model = synchronise(raw_model, device)
        if cfg.channels_last:
            raw_model = raw_model.to(memory_format=torch.channels_last)
        loaders = build_loaders(cfg, train_store, val_store, device, raw_model.normalization, class_names, world)
        optimizer, scheduler = build_optimizer(cfg, raw_model, len(loaders[0]))
        state = TrainState(raw_model, optimizer, scheduler, runtime.grad_scaler(device, precision),
                           val_groups=val_groups,
                           train_groups=sorted({s.group for s in train_store.samples}), class_names=class_names,
                           world_size=world.size, steps_per_epoch=len(loaders[0]))
        if resumed is not None:
            check_same_cars(cfg, resumed, state)
            state.restore(resumed)
            follow_schedule(cfg, state, resumed)
        check_batchnorm_share(cfg, len(train_store), world)
        run = Run(cfg, run_dir, device, precision, build_loss(cfg, class_names), world, len(val_store))
        if world.main and cfg.resume:  # a new run's folder got its config.json when it was created
            write_config(run_dir, cfg)
        log.info("run %s: %s, %s%s", run_dir, device, precision, f", {world.size} processes, global batch "
                 f"{cfg.batch_size * world.size}" if world.distributed else "")
        try:
            run_epochs(run, training_models(cfg, raw_model, world, device), state, loaders)
        except KeyboardInterrupt:
            # last.pt (the last whole epoch) stays the resume point: resuming from mid-epoch weights
            # could not replay the epoch exactly. The weights of the moment go to interrupted.pt.
            run.save("interrupted.pt", state, resumable=False)
            log.warning("interrupted during epoch %d: weights of this moment in %s; resume from %s",
                        state.epoch + (state.pending is None), run_dir / "interrupted.pt", run_dir / "last.pt")
            raise
    distributed.stop(world)
    return {"run_dir": str(run_dir), "best_val_score": state.best_val_score, **state.history[-1]}


def check_batchnorm_share(cfg: TrainConfig, train_images: int, world):
    """Every process must get at least one of the --precise-bn images; ValueError before any training if not."""
    count = min(cfg.precise_bn, train_images)
    if cfg.precise_bn and count < world.size:
        raise ValueError(f"--precise-bn {cfg.precise_bn}: each of the {world.size} processes needs at least one of the "
                         f"{counted(count, 'image')} BatchNorm statistics are recomputed on; use --precise-bn "
                         f"{world.size} or more, or 0")


def training_models(cfg: TrainConfig, raw_model, world, device):
    """(the model training steps run, the model validation runs): compiled if asked, DDP under torchrun.

    Validation cannot go through DDP: its forward syncs buffers across processes, and the processes
    validate different numbers of images. It runs the bare module, which shares DDP's weights.
    """
    # Static shapes: training crops and whole validation images get a graph each. Dynamic-shape
    # graphs of this model failed to compile in bf16 with torch 2.14 (an inductor TypeError).
    compiled = (lambda m: torch.compile(m, dynamic=False)) if cfg.compile else (lambda m: m)
    if not world.distributed:
        model = compiled(raw_model)
        return model, model
    ddp = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    return compiled(ddp), compiled(raw_model)


def follow_schedule(cfg: TrainConfig, state: TrainState, resumed: dict):
    """After a resume with another number of processes or batch size, say what changed and, if the
    steps per epoch did, put the learning rate where this run's schedule has it after the epochs done."""
    before = {"processes": resumed.get("world_size", 1), "batch per process": resumed["config"]["batch_size"],
              # checkpoints before torchrun support: every epoch had the same steps
              "steps per epoch": resumed.get("steps_per_epoch") or state.global_step // max(1, state.epoch),
              "sync_bn": resumed["config"].get("sync_bn", False)}
    now = {"processes": state.world_size, "batch per process": cfg.batch_size,
           "steps per epoch": state.steps_per_epoch, "sync_bn": cfg.sync_bn}
    changed = [f"{key} {before[key]} -> {now[key]}" for key in before if before[key] != now[key]]
    if not changed:
        return
    log.warning("resuming with %s: from here the run differs from an uninterrupted one (docs/distributed.md#resume)",
                ", ".join(changed))
    if before["steps per epoch"] != now["steps per epoch"] and state.epoch:
        state.scheduler = build_scheduler(cfg, state.optimizer, state.steps_per_epoch, state.epoch)
        log.warning("the learning-rate schedule continues from the end of epoch %d", state.epoch)


def local_options(config_json: Path) -> dict:
    """The folders (data_dir, cache_dir) a run's config.json recorded; {} without one."""
    try:
        values = json.loads(config_json.read_text())
    except (OSError, ValueError):
        log.warning("%s is missing or unreadable: the data folder is --data-dir, else $CARVANA_DIR, else the default",
                    config_json)
        return {}
    return {k: values[k] for k in ("data_dir", "cache_dir") if isinstance(values, dict)
            and isinstance(values.get(k), str)}


def resume_defaults(argv):
    """With --resume: (the run's options, as the base that flags override; its loaded checkpoint), else (None, None).

    The options come from the checkpoint; the folders it does not record come from the run's config.json.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume", default="")
    resume = pre.parse_known_args(argv)[0].resume
    if not resume:
        return None, None
    path = resume_path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path} (give a run's last.pt or its folder)")
    checkpoint = load_checkpoint(path)
    return BEFORE_OPTION | checkpoint["config"] | local_options(path.parent / "config.json") | {"resume": str(path)}, \
        checkpoint


def main(argv=None):
    logging.basicConfig(level=distributed.log_level(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        base, resumed = resume_defaults(argv)
        cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], base=base)
        summary = train(cfg, resumed)
    except (OSError, ValueError, FloatingPointError) as err:  # OSError: a missing file, a full disk...
        raise SystemExit(f"error: {atomic.shown(err)}")  # a name that is not UTF-8 shows as U+FFFD
    except KeyboardInterrupt:
        if distributed.first_process():
            print("interrupted: last.pt holds the last completed epoch; continue with --resume <run>/last.pt",
                  file=sys.stderr)
        raise SystemExit(130)
    best = shlex.quote(str(Path(summary["run_dir"]) / "best.pt"))  # to paste: a space or [ ] stays in the path
    log.info("done: best validation %s %.5f; next:\n  python evaluate.py --checkpoint %s"
             "\n  python predict.py PHOTOS... --checkpoint %s --out-dir masks/",
             "mIoU" if "val_miou_model_res" in summary else "Dice", summary["best_val_score"], best, best)
    return summary


if __name__ == "__main__":
    main()
