"""Checkpoint files: what one holds, writing it atomically, reading it back as plain data, and
upgrading the formats earlier versions wrote.

A checkpoint is one dict of plain data and tensors, so it loads with torch.load(weights_only=True)
and a file carrying code is refused, never run:

    format_version  CHECKPOINT_FORMAT
    arch, model_args     what model.build_model needs to rebuild the network
    model                its state_dict (fp16 in a shipped, slim file; rebuilt in fp32)
    normalization        {"mean": [r, g, b], "std": [r, g, b]} applied to images in [0, 1]
    config               the training options, input size and threshold included, machine paths dropped
    class_names          what the output indexes, background first
    val_groups, train_groups   the split's groups (Carvana's car ids; single photos for the Car Parts Dataset)
    epoch, global_step, metrics, history, best_val_score (mean Dice, or mean IoU over the parts)
    optimizer, scheduler, scaler, pending   training state, in last.pt only

Users hold checkpoints of earlier versions: `load_checkpoint` upgrades formats 1 and 2 in memory,
here and nowhere else, so every script reads one format.
"""
import importlib.util
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from carseg.atomic import atomic_write
from carseg.labels import BINARY_CLASSES, is_multiclass

CHECKPOINT_FORMAT = 3
# The options an inference needs from a checkpoint's `config` (besides its weights and normalisation).
INFERENCE_OPTIONS = ("image_width", "image_height", "threshold")
# Options naming folders of the machine that trained: they stay in the run folder's config.json,
# never in a checkpoint, which may travel (the bundled model does).
LOCAL_OPTIONS = ("data_dir", "cache_dir", "out_dir", "resume")
CHECKPOINT_KEYS = ("arch", "model_args", "model", "normalization", "config")
# Format 2 named the split's groups after Carvana's cars and the best score after Dice, although a
# parts model's groups are photos and its score a mean IoU. Exported ONNX files carry the same keys.
RENAMED_KEYS = {"val_cars": "val_groups", "train_cars": "train_groups", "best_val_dice": "best_val_score"}
# The per-epoch record names of runs written before the full_res/model_res vocabulary, so a resumed
# run's history keeps one set of names.
RENAMED_RECORD_KEYS = {"val_dice": "val_dice_model_res", "val_iou": "val_iou_model_res",
                       "val_dice_full": "val_dice_full_res", "val_iou_full": "val_iou_full_res"}
# Format 1 held U-Nets that saw images in [0, 1] as they were.
FORMAT_1_NORMALIZATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
# What files mistaken for a checkpoint begin with, so that a refusal can say what the file is.
FILE_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                   (b"RIFF", "a RIFF file (a WebP image, a WAV sound...)"), (b"\x1f\x8b", "a gzip-compressed file"),
                   (b"\x89HDF", "an HDF5 file (Keras weights?)"), (b"\x93NUMPY", "a NumPy array file"))
ZIP_START = b"PK\x03\x04"  # torch.save writes a zip archive holding <name>/data.pkl first
# torch.save before PyTorch 1.6 (still read by torch.load): a pickled magic number, then the pickles.
LEGACY_TORCH_START = b"\x80\x02\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little") + b"."
# An ONNX file is a ModelProto: field 1 (ir_version, a small varint: tag 0x08) comes first, then the tag
# of another of its fields (producer_name 0x12 ... graph 0x3a, opset_import 0x42, metadata_props 0x72).
ONNX_SECOND_TAGS = b"\x12\x1a\x22\x28\x32\x3a\x42\x72"


def checkpoint_for(model, config: dict, **extra) -> dict:
    """A checkpoint of `model` (uncompiled; it has .arch, .model_args and .normalization, as
    model.build_model's do): plain data and tensors only, loadable with weights_only=True.

    `config` is the training options as a dict (it must hold image_width, image_height and
    threshold); machine-local paths are dropped from it. `extra` adds keys (class_names, epoch,
    history, optimizer...); `class_names` (index 0 the background) defaults to BINARY_CLASSES.
    """
    missing = [name for name in INFERENCE_OPTIONS if name not in config]
    if missing:
        raise ValueError(f"a checkpoint's config needs {', '.join(missing)}")
    extra.setdefault("class_names", list(BINARY_CLASSES))
    return {"format_version": CHECKPOINT_FORMAT, "arch": model.arch, "model_args": dict(model.model_args),
            "model": model.state_dict(), "normalization": {k: list(v) for k, v in model.normalization.items()},
            "config": {k: v for k, v in config.items() if k not in LOCAL_OPTIONS}, **extra}


def save_checkpoint(path, checkpoint: dict):
    """Write atomically (temporary file, fsync, rename): a kill mid-write leaves the previous file intact."""
    with atomic_write(path) as f:
        torch.save(checkpoint, f)


def load_checkpoint(path) -> dict:
    """Read a checkpoint as plain data, in the current format.

    Loads with weights_only=True, so a pickle carrying code is refused and never runs. Raises
    FileNotFoundError for a missing file and ValueError, naming the file, for anything that is not a
    checkpoint of this project (formats 1 to CHECKPOINT_FORMAT; older ones are upgraded in memory).
    """
    checkpoint = _load_plain_data(path)
    if isinstance(checkpoint, dict) and checkpoint.get("format_version") == 1 and "model_args" in checkpoint:
        checkpoint = _upgrade_from_format_1(checkpoint, path)
    if isinstance(checkpoint, dict) and checkpoint.get("format_version") == 2:
        checkpoint = {**with_current_keys(checkpoint), "format_version": CHECKPOINT_FORMAT}
    problem = _not_a_checkpoint_because(checkpoint)
    if problem:
        raise ValueError(f"checkpoint {path} is not a train.py checkpoint (format {CHECKPOINT_FORMAT}): {problem}")
    checkpoint.setdefault("class_names", list(BINARY_CLASSES))  # written before multi-class models
    names, out_channels = checkpoint["class_names"], checkpoint["model_args"].get("out_channels", 1)
    if not (isinstance(names, list) and len(names) >= 2 and out_channels == output_channels(names)):
        raise ValueError(f"checkpoint {path}: its class_names {names!r} do not fit a model of {out_channels} "
                         f"output channel{'' if out_channels == 1 else 's'} (one for two classes, else one per class)")
    config = checkpoint["config"]
    sizes_ok = all(isinstance(config[k], int) and config[k] > 0 for k in ("image_width", "image_height"))
    if not (sizes_ok and isinstance(config["threshold"], (int, float)) and 0 < config["threshold"] < 1):
        raise ValueError(f"checkpoint {path} holds an impossible threshold {config['threshold']!r} or input size "
                         f"{config['image_width']!r}x{config['image_height']!r}")
    return checkpoint


def output_channels(class_names) -> int:
    """The network's output channels for these classes: one car channel for two, else one per class."""
    return len(class_names) if is_multiclass(class_names) else 1


def with_current_keys(metadata: dict) -> dict:
    """A checkpoint's (or an exported file's) metadata with format 2's key names replaced by today's."""
    return {RENAMED_KEYS.get(k, k): v for k, v in metadata.items()}


def with_current_names(record: dict) -> dict:
    """An epoch record (a metrics.jsonl line) with older key names replaced by today's."""
    return {RENAMED_RECORD_KEYS.get(k, k): v for k, v in record.items()}


def _load_plain_data(path):
    """torch.load(weights_only=True) of a file given by the user; every failure a ValueError naming the file."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is not a PyTorch checkpoint: it is a folder; give the file in it (a run folder "
                         "holds best.pt and last.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist: train one with `python train.py` "
                                "or pass --checkpoint PATH") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, OSError... for bad files
        raise ValueError(_refusal(path, err)) from None


def _refusal(path, err: Exception) -> str:
    """Why torch.load(weights_only=True) refused `path`, in this project's words.

    PyTorch's own message is never passed on: it advises re-loading with weights_only=False, which
    would run whatever code the file carries. Only the name of the object it refused is kept.
    """
    refused = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if refused:
        return (f"checkpoint {path} holds Python objects other than tensors and plain data ({refused[1]}): not a "
                "checkpoint this project wrote; nothing in it was run")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as io_err:  # permission denied, an unreadable disk...
        return f"checkpoint {path} cannot be read: {io_err.strerror or io_err}"
    if written_by_torch(head):
        return (f"{path} is not a complete PyTorch checkpoint: it is cut short or damaged ({size:,} bytes, "
                f"{type(err).__name__}); copy it or save it again")
    return f"{path} is not a PyTorch checkpoint ({_file_kind(path, head, size)})"


def _file_kind(path, head: bytes, size: int) -> str:
    """What a file that is no checkpoint is, from its first bytes: "an empty file", "a JPEG image"..."""
    if size == 0:
        return "an empty file"
    kind = next((what for start, what in FILE_SIGNATURES if head.startswith(start)), None)
    if kind:
        return kind
    if is_onnx(path, head):  # named otherwise, as every script decides by the name, it would not run as one
        return "an ONNX model" + ("" if Path(path).suffix.lower() == ".onnx" else
                                  ": give it a .onnx name, by which every script runs it with ONNX Runtime or OpenVINO")
    if head.startswith(ZIP_START):
        try:
            with zipfile.ZipFile(path) as archive:
                return f"a zip archive holding {', '.join(archive.namelist()[:3]) or 'nothing'}"
        except zipfile.BadZipFile:
            return "a damaged zip archive"
    if head[8:10] == b'{"':  # a little-endian header length, then the JSON header
        return "a safetensors file"
    if head.startswith(b"\x80"):  # pickle's PROTO opcode
        return "a Python pickle, not written by torch.save"
    text = _text_start(head)
    if text is not None:
        return f"a text file beginning {text!r}"
    return f"{size:,} byte{'' if size == 1 else 's'} of unrecognised data"


def written_by_torch(head: bytes) -> bool:
    """Whether a file beginning with `head` (its first 512 bytes) was written by torch.save, whole or not."""
    return head.startswith(LEGACY_TORCH_START) or (head.startswith(ZIP_START) and b"data.pkl" in head)


def is_onnx(path, head: bytes) -> bool:
    """Whether the file at `path`, beginning with `head`, is an ONNX model.

    Its first bytes decide where the onnx package is not installed (the base install); where it is,
    a file that begins so must also load as one (without external data), as three bytes alone could
    begin other data.
    """
    if not (len(head) > 2 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in ONNX_SECOND_TAGS):
        return False
    if importlib.util.find_spec("onnx") is None:
        return True
    import onnx
    try:
        onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError and friends: not ONNX after all)
        return False
    return True


def _text_start(head: bytes):
    """The first words of `head` if it is UTF-8 text, else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # more than a character cut at the end of the 512 bytes read
            return None
        text = head[:err.start].decode("utf-8")
    if not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    return " ".join(text.split())[:40]


def _not_a_checkpoint_because(checkpoint):
    """Why plain data loaded from a file is not a train.py checkpoint of the current format, in words; None if it is."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict"
    keys = ", ".join(map(str, list(checkpoint)[:6])) + (", ..." if len(checkpoint) > 6 else "")
    if "format_version" not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            tensors = f"{len(checkpoint)} tensor{'' if len(checkpoint) == 1 else 's'}"
            return f"it is a bare state_dict ({tensors}), without the architecture and options a checkpoint records"
        return f"it has no format_version; its keys: {keys or 'none'}"
    if checkpoint["format_version"] not in range(1, CHECKPOINT_FORMAT + 1):  # an old one here lacks keys
        return f"its format_version is {checkpoint['format_version']!r}; this version reads 1 to {CHECKPOINT_FORMAT}"
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        return f"it lacks {', '.join(missing)}; its keys: {keys}"
    if not isinstance(checkpoint["model"], dict) or not isinstance(checkpoint["config"], dict):
        return "its model or config is not a dict"
    missing = [k for k in INFERENCE_OPTIONS if k not in checkpoint["config"]]
    return f"its config lacks {', '.join(missing)}" if missing else None


def _upgrade_from_format_1(checkpoint: dict, path) -> dict:
    """Format 1 (U-Net only): no `arch` or `normalization`, the input size as config width/height,
    the threshold stored twice, the machine's data path in the config, older metric names. Returns
    the current format."""
    model_args = dict(checkpoint["model_args"])
    for name, off in (("space_to_depth", 1), ("refine_channels", 0)):
        value = model_args.pop(name, off)
        if value != off:
            raise ValueError(f"checkpoint {path} is a U-Net with {name}={value}, a variant this version no "
                             "longer builds (it lost to the plain U-Net); load it with the version that wrote it")
    config = dict(checkpoint.get("config", {}))
    for old, new in (("width", "image_width"), ("height", "image_height")):
        if old in config:
            config[new] = config.pop(old)
    if "threshold" in checkpoint:
        config.setdefault("threshold", checkpoint["threshold"])
    upgraded = with_current_keys({k: v for k, v in checkpoint.items() if k != "threshold"})
    upgraded.update(format_version=CHECKPOINT_FORMAT, arch="unet", model_args=model_args,
                    normalization={k: list(v) for k, v in FORMAT_1_NORMALIZATION.items()},
                    config={k: v for k, v in config.items() if k not in LOCAL_OPTIONS})
    if "history" in checkpoint:
        upgraded["history"] = [with_current_names(record) for record in checkpoint["history"]]
    if "metrics" in checkpoint:
        upgraded["metrics"] = with_current_names(checkpoint["metrics"])
    return upgraded
