"""Where the network runs: PyTorch, ONNX Runtime or OpenVINO, behind one call.

A *runner* takes a preprocessed batch, float32 (B, 3, h, w), and returns fp32 logits (B, C, h, w) as
a torch tensor on its `device`; `inference.Predictor` does everything before and after. This module
owns the runners, the ONNX file (export with dynamic batch, height and width, and the checkpoint's
inference metadata inside it) and the cache that lets `--backend onnxruntime|openvino` start from a
`.pt` checkpoint: the first run exports it, later runs find the file by the weights' hash.

    runner = make_runner(load_source("checkpoints/carvana_unet.pt"), "openvino", "auto", "auto")
"""
import gc
import hashlib
import importlib.util
import io
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from carseg import atomic, runtime
from model import load_model
from carseg.checkpoint import INFERENCE_OPTIONS, load_checkpoint, with_current_keys, written_by_torch

log = logging.getLogger(__name__)

ONNX_OPSET = 18
# Bump when the exported graph changes for the same weights (exporter options, model code): cached
# files of the old graph are then never found again.
EXPORT_VERSION = 1
METADATA_KEY = "car_segmentation"  # the ONNX metadata_props entry holding the checkpoint's JSON metadata
# The split's car ids stay, so evaluate.py can score an exported file on the validation split it was chosen on.
METADATA_FIELDS = ("format_version", "arch", "model_args", "normalization", "class_names", "exported_from",
                   "epoch", "best_val_score", "val_groups", "train_groups", "quality_reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' is OpenVINO on the CPU (the fastest that keeps Dice, docs/deployment.md) and torch on a GPU;
    on a CPU without OpenVINO installed (the base install, requirements.txt) it is torch, and says so."""
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        if not installed("openvino"):
            log.info("--backend auto: OpenVINO is not installed, so PyTorch runs the network (pip install -r "
                     "requirements-deploy.txt adds OpenVINO, faster on most CPUs)")
            return "torch"
        return "openvino"
    if backend != "torch" and device.type != "cpu":
        raise ValueError(f"--backend {backend} runs on the CPU here; use --device cpu, or --backend torch "
                         f"for {device}")
    return backend


ENGINE_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # what each engine backend imports


def installed(module: str) -> bool:
    """Whether `module` can be imported here (the engines come with requirements-deploy.txt, not the base install)."""
    return importlib.util.find_spec(module) is not None


def load_source(path) -> dict:
    """A checkpoint (.pt) as plain data, or an exported .onnx file's metadata with its path under "onnx_path".

    Raises FileNotFoundError or ValueError naming the file.
    """
    if Path(path).suffix.lower() != ".onnx":
        return load_checkpoint(path)
    import onnx  # only the ONNX paths pay for this import
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist")
    except Exception as err:  # noqa: BLE001 (protobuf's DecodeError and friends for a file that is not ONNX)
        raise ValueError(f"{path} is not a readable ONNX model: {not_onnx_because(path, err)}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} holds no {METADATA_KEY} metadata: export it with `python export.py CHECKPOINT "
                         "--format onnx` so it says its input size, threshold, normalisation and classes")
    try:
        metadata = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its {METADATA_KEY} metadata is not valid JSON ({err}); export the file again "
                         "with `python export.py CHECKPOINT --format onnx`") from None
    return {**with_current_keys(metadata), "onnx_path": str(path)}  # a file exported by an earlier version too


def not_onnx_because(path, err: Exception) -> str:
    """Why onnx.load refused `path`: a torch.save file named .onnx is named as one (load_source decides
    by the name), anything else by onnx's error."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    if written_by_torch(head):
        return "it is a PyTorch checkpoint: give it a .pt name, by which every script loads it as one"
    return f"{type(err).__name__}: {err}"


def make_runner(source: dict, backend: str, device, precision: str):
    """The runner for a loaded source (see load_source) on `backend` ('auto' included).

    device: 'auto', 'cpu', 'cuda'... or a torch.device; precision: 'auto', 'fp32', 'bf16' or 'fp16'.
    Raises ValueError for a combination this machine or file cannot run, saying which option to change.
    """
    device = runtime.resolve_device(device) if isinstance(device, str) else device
    if "onnx_path" in source and backend == "auto":
        backend = "openvino" if installed("openvino") else "onnxruntime"
    backend = resolve_backend(backend, device)
    if backend in ENGINE_MODULES and not installed(ENGINE_MODULES[backend]):
        raise ValueError(f"--backend {backend}: {ENGINE_MODULES[backend]} is not installed; pip install -r "
                         "requirements-deploy.txt adds it (or use --backend torch with a .pt checkpoint)")
    if backend == "torch":
        if "onnx_path" in source:
            raise ValueError(f"{source['onnx_path']} is an ONNX file: run it with --backend onnxruntime or "
                             "openvino, or give the .pt checkpoint it was exported from")
        model = load_model(source).to(device).to(memory_format=torch.channels_last).eval()
        return TorchRunner(model, device, runtime.resolve_precision(precision, device))
    path = source.get("onnx_path") or cached_onnx(source)
    width, height = source["config"]["image_width"], source["config"]["image_height"]
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, precision)
    if backend == "openvino":
        return OpenVINORunner(path, precision, (width, height))
    raise ValueError(f"--backend {backend!r}: unknown (torch, onnxruntime, openvino or auto)")


class TorchRunner:
    """Runs a torch module on `device` under the autocast of `precision`; returns fp32 logits on `device`.

    The module must already be in the mode wanted (eval for inference): the runner never switches it,
    so train.py can validate its live, possibly compiled, model through the same path.
    """
    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool = True):
        self.model, self.device, self.precision, self.channels_last = model, device, precision, channels_last
        if device.type == "cuda":  # cuDNN autotuning and TF32 for evaluate.py, predict.py and serve.py too
            runtime.configure_backends(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), runtime.autocast(self.device, self.precision):
            return self.model(images).float()


class OnnxRuntimeRunner:
    """An exported .onnx file on ONNX Runtime's CPU provider, fp32 (its CPU kernels have no bf16 path
    for these convolutions). InferenceSession.run is safe to call from several threads."""
    backend = "onnxruntime"
    device = torch.device("cpu")
    precision = "fp32"

    def __init__(self, path, precision: str = "auto"):
        if precision not in ("auto", "fp32"):
            raise ValueError(f"--precision {precision}: --backend onnxruntime runs fp32 on the CPU; use "
                             "--precision fp32 (or auto), or --backend openvino for bf16")
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The model's bytes, not its path: ONNX Runtime takes a path only as a str it can encode to UTF-8,
        # so a name with other bytes (m\xff.onnx, which Python carries as lone surrogates) was a TypeError,
        # and bytes it would read as the model itself. Exported files hold no external data to find beside them.
        self.session = ort.InferenceSession(Path(path).read_bytes(), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: images.cpu().numpy()})[0])


class OpenVINORunner:
    """An exported .onnx file (or OpenVINO IR .xml) compiled by OpenVINO for the CPU.

    precision 'auto' is OpenVINO's own choice: bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), fp32
    elsewhere. `self.precision` is read back from the compiled model, never taken from what was asked:
    OpenVINO compiles fp32 without a word where a CPU lacks the precision asked for, so an explicit
    'bf16' that did not take is refused rather than run (and reported) as something it is not. The
    spatial input size is fixed at the model's (only the batch stays dynamic), which lets OpenVINO plan
    its memory once. Compiled blobs are cached beside the ONNX cache, so a second start skips
    compilation. One infer request, used under a lock: concurrent callers (serve.py's requests) take turns.
    """
    backend = "openvino"
    device = torch.device("cpu")

    def __init__(self, path, precision: str, input_size):
        import openvino as ov
        core = ov.Core()
        blobs = str(cache_dir() / "openvino")
        try:
            blobs.encode("utf-8")  # OpenVINO takes no other bytes there (read_model's path may hold them)
            core.set_property({"CACHE_DIR": blobs})
        except UnicodeEncodeError:
            log.info("OpenVINO compiles without its cache: the cache folder %s is not UTF-8 ($CARSEG_CACHE_DIR)",
                     atomic.shown(blobs))
        model = core.read_model(str(path))
        width, height = input_size
        model.reshape({model.input(0): ov.PartialShape([-1, 3, height, width])})
        config = {"PERFORMANCE_HINT": "LATENCY", **openvino_precision(core, precision)}
        self.compiled = core.compile_model(model, "CPU", config)
        self.precision = compiled_precision(self.compiled)
        if precision != "auto" and self.precision != precision:
            raise ValueError(f"--precision {precision}: OpenVINO compiled the model to run {self.precision} on this "
                             f"CPU ({runtime.cpu_description()}); use --precision auto or {self.precision}")
        self.request, self.lock = self.compiled.create_infer_request(), threading.Lock()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            logits = self.request.infer({0: images.cpu().numpy()})[0]
            return torch.from_numpy(np.array(logits))  # a copy: the request reuses its output buffer


# OpenVINO's element type names (openvino.Type.get_type_name()) in the project's precision words.
OPENVINO_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def compiled_precision(compiled) -> str:
    """The precision an OpenVINO CompiledModel runs in: 'fp32', 'bf16' or 'fp16'.

    Read from its INFERENCE_PRECISION_HINT property, an openvino.Type (str() of it is "<Type: 'bfloat16'>",
    so it is looked up by its short name). Raises ValueError for a type this project has no word for,
    rather than reporting one it does.
    """
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    if name not in OPENVINO_PRECISIONS:
        raise ValueError(f"OpenVINO compiled the model to run in {name!r}, a precision this project does not "
                         f"report ({', '.join(OPENVINO_PRECISIONS)}); use --precision fp32")
    return OPENVINO_PRECISIONS[name]


def openvino_native_bf16(core=None) -> bool:
    """True where OpenVINO's CPU plugin runs bf16 natively (it lists BF16 among its optimisation capabilities)."""
    if core is None:
        import openvino as ov
        core = ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_precision(core, precision: str) -> dict:
    """OpenVINO's INFERENCE_PRECISION_HINT for a --precision value ({} = its default)."""
    if precision == "auto":
        return {}
    if precision == "fp32":
        return {"INFERENCE_PRECISION_HINT": "f32"}
    if precision == "bf16":
        if not openvino_native_bf16(core):
            raise ValueError(f"--precision bf16: this CPU ({runtime.cpu_name()}) has no native bf16 (AVX-512 BF16 or "
                             "AMX); OpenVINO would run fp32 instead; use --precision auto or fp32")
        return {"INFERENCE_PRECISION_HINT": "bf16"}
    raise ValueError(f"--precision {precision}: --backend openvino runs fp32 or bf16 on the CPU")


# ---------------------------------------------------------------- ONNX files

def cache_dir() -> Path:
    """Where exported files and OpenVINO's compiled blobs are kept: $CARSEG_CACHE_DIR, else
    $XDG_CACHE_HOME/car-segmentation, else ~/.cache/car-segmentation."""
    if os.environ.get("CARSEG_CACHE_DIR"):
        return Path(os.environ["CARSEG_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "car-segmentation"


def cached_onnx(checkpoint: dict) -> Path:
    """The checkpoint's ONNX file in the cache, exported the first time (a few seconds to a minute).

    Found again by a hash of the weights, the inference metadata and EXPORT_VERSION, so a retrained
    checkpoint at the same path is exported anew and a copied one is not. Raises ValueError when the
    cache folder cannot be written, naming it and $CARSEG_CACHE_DIR.
    """
    path = cache_dir() / "onnx" / f"{checkpoint['arch']}-{weights_hash(checkpoint)[:20]}.onnx"
    if path.is_file():
        return path
    problem = atomic.folder_problem(path.parent)
    if problem is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = str(err)
    if problem is not None:
        raise ValueError(f"cannot cache the ONNX export in {path.parent} ({problem}); set $CARSEG_CACHE_DIR to "
                         "a writable folder, or export once with `python export.py CHECKPOINT --format onnx`")
    log.info("exporting the checkpoint to ONNX once: %s (later runs reuse it)", path)
    export_onnx(checkpoint, path)
    gc.collect()
    runtime.release_freed_memory()
    return path


def weights_hash(checkpoint: dict) -> str:
    """sha256 over the weights' names, dtypes and bytes, the inference metadata and EXPORT_VERSION."""
    digest = hashlib.sha256(json.dumps([EXPORT_VERSION, onnx_metadata(checkpoint)], sort_keys=True).encode())
    for name, tensor in sorted(checkpoint["model"].items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_metadata(checkpoint: dict) -> dict:
    """What an exported file keeps of its checkpoint (no weights): enough for InferenceSpec.from_checkpoint."""
    metadata = {k: checkpoint[k] for k in METADATA_FIELDS if k in checkpoint}
    # and how its split grouped photos, so evaluate.py finds the validation cars again
    metadata["config"] = {k: checkpoint["config"][k] for k in (*INFERENCE_OPTIONS, "group_by") if k in checkpoint["config"]}
    return metadata


def export_onnx(checkpoint: dict, path) -> Path:
    """Write the checkpoint's model as ONNX (opset ONNX_OPSET) to `path`, atomically.

    Input "images" float32 (batch, 3, height, width), output "logits" float32 (batch, C, height, width),
    all three sizes dynamic; the checkpoint's inference metadata (onnx_metadata) is stored as JSON under
    the metadata key METADATA_KEY.

    Why the TorchScript exporter (dynamo=False), deprecated since torch 2.9: the torch.export-based one
    took 11 s (unet), 97 s (deeplabv3_efficientnet_lite0) and 292 s (unet_efficientnet_lite0) here,
    against 1-4 s, for graphs that agree with it and with PyTorch to 1e-6 at other sizes than the one
    traced (tests/test_backends.py checks every architecture at an odd size).
    """
    import onnx
    model = load_model(checkpoint).eval()
    width, height = checkpoint["config"]["image_width"], checkpoint["config"]["image_height"]
    example = torch.zeros(2, 3, height, width)
    sizes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings on shape arithmetic
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": sizes, "logits": sizes}, opset_version=ONNX_OPSET)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(onnx_metadata(checkpoint))
    atomic.write_bytes(Path(path), proto.SerializeToString())
    return Path(path)
