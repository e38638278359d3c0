"""Measure training and inference speed on this machine; prints a table and writes JSON.

    python scripts/bench.py                                   # the CPU recipe's U-Net, fp32 (+ bf16 where native) x layouts
    python scripts/bench.py --compile --base-channels 16 32   # add torch.compile rows, two network widths
    python scripts/bench.py --predict-images 64               # also time predict.py end to end on 64 Carvana photos
    python scripts/bench.py --arch unet unet_efficientnet_lite0 deeplabv3_mobilenet_v3_large --layouts channels_last
    python scripts/bench.py --deploy --predict-images 96      # the bundled model on each --backend, predict.py as a process
    python scripts/bench.py --out bench.json --overwrite      # replace the repository's quoted numbers

Results go to bench-<date>-<time>.json in the current folder unless --out names a file; an existing
file is replaced only with --overwrite (the repository's bench.json holds the numbers the docs quote).
A run this CPU cannot do (OpenVINO's bf16 without native bf16, say) is a row saying why it was
skipped, and whatever was measured is written even when a later step fails. bf16 where the CPU has
no native bf16 is emulated by PyTorch, several times slower: such rows are marked (bf16*, "emulated").

Training steps run on --train-size inputs (the recipe's random crops), inference on --size (whole
images) through inference.Predictor, the path evaluate.py and predict.py take.

Every number is the median of several timed repetitions after warm-up, so a noisy shared machine
moves it less; rerun on an idle machine for numbers to quote. GFLOP/s come from
torch.utils.flop_counter and are compared with a matmul peak measured in the same run.
"""
import argparse
import dataclasses
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/bench.py` puts scripts/ on the path, not the project

from backends import ENGINE_MODULES, TorchRunner, installed, load_source  # noqa: E402 (found through the line above)
from carseg import atomic, runtime  # noqa: E402
from config import ARCHS, BACKENDS, PredictConfig, TrainConfig, resolve_checkpoint, resolve_data_dir  # noqa: E402
from inference import InferenceSpec, Predictor  # noqa: E402
from losses import BCEDiceLoss, CEDiceLoss  # noqa: E402
from model import build_model  # noqa: E402
from carseg.checkpoint import checkpoint_for, save_checkpoint  # noqa: E402


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype, n=2048, repeats=5) -> float:
    """Achieved GFLOP/s of an n x n matmul: the ceiling a convolution net can hope to approach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def step_flops(model, images, masks, loss_fn, train: bool) -> float:
    """FLOPs of one training step (forward + backward) or one forward pass."""
    with FlopCounterMode(display=False) as counter:
        if train:
            loss_fn(model(images), masks).backward()
        else:
            with torch.no_grad():
                model(images)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_variant(arch, train_size, size, batch, precision, channels_last, compile_, repeats) -> dict:
    """Training (on train_size inputs) and inference (on size, through a Predictor) throughput of one configuration.

    `arch` is {"arch": name, **model_args}; out_channels > 1 trains with the multi-class loss.
    """
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(**arch)
    classes = arch.get("out_channels", 1)
    crops = torch.rand(batch, 3, train_size[1], train_size[0])
    images = torch.rand(batch, 3, size[1], size[0])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        crops = crops.contiguous(memory_format=torch.channels_last)
    recipe = TrainConfig()
    if classes > 1:
        masks = torch.randint(0, classes, (batch, train_size[1], train_size[0]))
        loss_fn = CEDiceLoss(recipe.bce_weight, recipe.dice_weight)
    else:
        masks = (torch.rand(batch, 1, train_size[1], train_size[0]) > 0.5).float()
        loss_fn = BCEDiceLoss(recipe.bce_weight, recipe.dice_weight, recipe.boundary_weight)  # the recipe's loss
    flops_train = step_flops(model, crops, masks, loss_fn, train=True)
    flops_infer = step_flops(model, images, None, loss_fn, train=False)
    run_model = torch.compile(model, dynamic=False) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    spec = InferenceSpec.from_config({"image_width": size[0], "image_height": size[1], "threshold": recipe.threshold},
                                     model.normalization, class_names(classes))
    predictor = Predictor(TorchRunner(run_model, device, precision, channels_last), spec)

    def train_step():
        with runtime.autocast(device, precision):
            logits = run_model(crops)
        loss = loss_fn(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        predictor.logits(images)

    start = time.perf_counter()
    train_step()  # the first call pays for compilation, if any
    first_call = time.perf_counter() - start
    model.train()
    train_s = median_seconds(train_step, repeats)
    model.eval()
    infer_s = median_seconds(infer_step, repeats)
    return {**arch, "train_size": f"{train_size[0]}x{train_size[1]}", "size": f"{size[0]}x{size[1]}",
            "batch": batch, "precision": precision, "emulated": emulated(precision),
            "channels_last": channels_last, "compile": compile_, "first_step_s": round(first_call, 2),
            "train_images_per_s": batch / train_s, "train_gflops_per_s": flops_train / train_s / 1e9,
            "infer_images_per_s": batch / infer_s, "infer_gflops_per_s": flops_infer / infer_s / 1e9,
            "gflop_per_train_image": flops_train / batch / 1e9}


def emulated(precision: str) -> bool:
    """Whether PyTorch emulates this precision on this CPU (bf16 without AVX-512 BF16 or AMX)."""
    return precision == "bf16" and not runtime.cpu_has_bf16()


def class_names(out_channels: int) -> list:
    """Placeholder class names for a model of `out_channels` outputs (one: car/background)."""
    return ["background", "car"] if out_channels == 1 else ["background"] + [f"part{i}" for i in range(1, out_channels)]


def bench_predict(n_images: int, arch: dict, size, precision: str, tta: bool) -> dict:
    """predict.py end to end (decode, inference, upsampling, threshold, PNG writing) on real photos;
    {"skipped": why, ...} without photos, or where predict.py's default backend cannot run `precision`
    on this CPU."""
    import predict
    photos = sorted((resolve_data_dir("") / "train").glob("*.jpg"))[:n_images]
    asked = {"precision": precision, "tta": tta, **arch}
    if not photos:
        return {"skipped": f"no Carvana photos in {atomic.shown(resolve_data_dir(''))}/train", **asked}
    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.asdict(TrainConfig()) | {"image_width": size[0], "image_height": size[1]}
        save_checkpoint(Path(tmp) / "bench.pt", checkpoint_for(build_model(**arch), config,
                                                               class_names=class_names(arch.get("out_channels", 1))))
        cfg = PredictConfig(inputs=[str(p) for p in photos], out_dir=str(Path(tmp) / "out"),
                            checkpoint=str(Path(tmp) / "bench.pt"), precision=precision, device="cpu", tta=tta)
        # What predict.py will run (its default backend, at `precision`), built the same way; this also
        # exports the ONNX file once, untimed, as a user's second run finds it cached.
        try:
            ran = Predictor.from_checkpoint(cfg.checkpoint, cfg.device, cfg.precision, backend=cfg.backend)
        except ValueError as err:  # OpenVINO refuses bf16 where it would silently run fp32
            return {"skipped": atomic.shown(err), "backend": cfg.backend, **asked}
        start = time.perf_counter()
        written, failures = predict.predict_files(cfg)
        seconds = time.perf_counter() - start
    return {"images": len(written), "failed": len(failures), "seconds": seconds, "masks_per_s": len(written) / seconds,
            "backend": ran.backend, "precision": ran.precision, "emulated": ran.backend == "torch" and
            emulated(ran.precision), "tta": tta, **arch}


def bench_backend(checkpoint: str, backend: str, n_images: int, repeats: int, precision: str = "auto",
                  batch: int = 8) -> dict:
    """One backend on a real checkpoint: model-only images/s at batch 1 and `batch` (Predictor.logits),
    then `python predict.py` as a fresh process on n_images Carvana photos, start-up included (imports,
    model build or ONNX/OpenVINO load, warm-up): what a user typing the README's command waits for.
    A predict.py process that fails is reported in the row (predict_error), not raised."""
    predictor = Predictor.from_checkpoint(checkpoint, "cpu", precision, backend=backend)
    w, h = predictor.input_size
    row = {"backend": backend, "precision": predictor.precision, "emulated": backend == "torch" and
           emulated(predictor.precision)}
    for size in sorted({1, batch}):
        images = torch.rand(size, 3, h, w)
        seconds = median_seconds(lambda images=images: predictor.logits(images), repeats)
        row[f"infer_images_per_s_batch{size}"] = size / seconds
    photos = sorted((resolve_data_dir("") / "train").glob("*.jpg"))[:n_images]
    if n_images and not photos:
        row["predict_skipped"] = f"no Carvana photos in {atomic.shown(resolve_data_dir(''))}/train"
    if photos:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, str(ROOT / "predict.py"), *map(str, photos), "--checkpoint", checkpoint,
                       "--backend", backend, "--precision", precision, "--device", "cpu", "--out-dir", tmp]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True)
            seconds = time.perf_counter() - start
        if done.returncode:
            said = done.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            row["predict_error"] = f"exit status {done.returncode}: {said[-1]}"
        else:
            row.update(predict_images=len(photos), predict_process_s=seconds, predict_masks_per_s=len(photos) / seconds)
    return row


def bench_deploy(args, peaks, rows: list):
    """bench_backend for each of args.backends x --precisions (default: auto) on args.checkpoint (default:
    the bundled model), appended to `rows` as each is measured; a pair this CPU cannot run is a row
    {"backend", "precision", "skipped": why}. FileNotFoundError or ValueError, before any timing, for a
    checkpoint that cannot be read or a backend that is not installed."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    source = load_source(checkpoint)  # refused here, naming the file, rather than in the middle of the run
    missing = [b for b in args.backends if b in ENGINE_MODULES and not installed(ENGINE_MODULES[b])]
    if missing:
        raise ValueError(f"--backends {' '.join(missing)}: {', '.join(ENGINE_MODULES[b] for b in missing)} not "
                         "installed; pip install -r requirements-deploy.txt adds it, or leave it out of --backends")
    runs, skipped = [(b, p) for b in args.backends for p in args.precisions or ["auto"]], {}
    for backend, precision in runs:
        try:  # exports/compiles once, untimed
            Predictor.from_checkpoint(source, "cpu", precision, backend=backend)
        except ValueError as err:  # a precision this backend does not run on this CPU
            skipped[backend, precision] = atomic.shown(err)
    batches = sorted({1, args.batch_size})
    print(f"{atomic.shown(Path(checkpoint).name)}, model only at batch {' and '.join(map(str, batches))}, then "
          "predict.py as a process:")
    print(f"{'backend':>12} {'prec':>5} | " + " ".join(f"{f'b{b} img/s':>10}" for b in batches) + " | predict.py")
    for backend, precision in runs:
        if (backend, precision) in skipped:
            rows.append({"backend": backend, "precision": precision, "skipped": skipped[backend, precision]})
            print(f"{backend:>12} {precision:>5} | skipped: {skipped[backend, precision]}", flush=True)
            continue
        r = bench_backend(checkpoint, backend, args.predict_images, args.repeats, precision, args.batch_size)
        rows.append(r)
        process = (f"{r['predict_images']} photos in {r['predict_process_s']:.1f} s = {r['predict_masks_per_s']:.2f} "
                   "masks/s" if "predict_images" in r else f"failed: {r['predict_error']}" if "predict_error" in r
                   else f"skipped: {r['predict_skipped']}" if "predict_skipped" in r else "not run (--predict-images)")
        print(f"{backend:>12} {label(r['precision'], r['emulated']):>5} | "
              + " ".join(f"{r[f'infer_images_per_s_batch{b}']:>10.2f}" for b in batches) + f" | {process}", flush=True)
    measured = [r for r in rows if "skipped" not in r]
    base = next((r for r in measured if r["backend"] == "torch"), None)
    key = f"infer_images_per_s_batch{batches[-1]}"
    for r in measured if base else []:
        print(f"{r['backend']} {label(r['precision'], r['emulated'])}: {r[key] / base[key]:.2f}x torch "
              f"{label(base['precision'], base['emulated'])}'s model throughput at batch {batches[-1]} "
              f"(fp32 matmul peak {peaks['fp32']:.0f} GFLOP/s in this run)")
    if any(r["emulated"] for r in measured):
        print(EMULATED_NOTE)


def label(precision: str, is_emulated: bool) -> str:
    """The precision as the tables show it: bf16* where PyTorch emulates it."""
    return precision + ("*" if is_emulated else "")


EMULATED_NOTE = "* bf16 emulated: this CPU has no native bf16 (AVX-512 BF16 or AMX), so PyTorch emulates it"


def model_variant(args, name: str, base_channels) -> dict:
    """{"arch": name, **model_args} of one measured model."""
    arch = {"arch": name, "out_channels": args.classes}
    if name == "unet":
        arch.update(base_channels=base_channels, depth=args.depth, bilinear=args.bilinear)
    return arch


def describe(arch: dict) -> str:
    return arch["arch"] + (f" base {arch['base_channels']}" if "base_channels" in arch else "")


def default_out() -> str:
    """bench-<date>-<time>.json: each run's own file. A run measures a moment of a shared machine, so
    earlier runs are worth keeping beside it, and a fixed name (bench.json) replaced the repository's
    tracked results; refusing that fixed name instead would fail every second plain
    `python scripts/bench.py`."""
    return time.strftime("bench-%Y%m%d-%H%M%S.json")


DEPLOY_UNUSED = ("arch", "classes", "base_channels", "depth", "bilinear", "size", "train_size", "compile", "layouts")
DEPLOY_ONLY = ("checkpoint", "backends")


def build_parser() -> argparse.ArgumentParser:
    recipe = TrainConfig()  # the defaults: what `python train.py` trains
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=[recipe.arch], choices=ARCHS, metavar="ARCH",
                        help=f"architectures to measure: {', '.join(ARCHS)}")
    parser.add_argument("--classes", type=int, default=1,
                        help="output channels: 1 = car/background, e.g. 19 = the Car Parts Dataset's classes")
    parser.add_argument("--base-channels", type=int, nargs="+", default=[recipe.base_channels],
                        help="unet widths to measure: channels of the first level")
    parser.add_argument("--depth", type=int, default=recipe.depth)
    parser.add_argument("--bilinear", action=argparse.BooleanOptionalAction, default=recipe.bilinear)
    parser.add_argument("--size", type=dimensions, default=(recipe.image_width, recipe.image_height),
                        help="model input WIDTHxHEIGHT for inference")
    parser.add_argument("--train-size", type=dimensions, default=(recipe.crop_width or recipe.image_width,
                                                                  recipe.crop_height or recipe.image_height),
                        help="training input WIDTHxHEIGHT (the recipe's random crops)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per step (default: 8); with --deploy, the model-only batch measured besides 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (15-25 s each to compile)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
                        help="default: fp32, and bf16 where the CPU has it natively (emulated bf16 is very slow); "
                             "with --deploy, auto (predict.py's default)")
    parser.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"),
                        default=["contiguous", "channels_last"])
    parser.add_argument("--predict-images", type=int, default=0, help="time predict.py on this many photos")
    parser.add_argument("--peak-size", type=int, default=2048,
                        help="matmul size N of the GFLOP/s reference (an N x N bf16 matmul takes minutes where "
                             "the CPU has no native bf16)")
    parser.add_argument("--deploy", action="store_true",
                        help="instead of training/inference rows: a real checkpoint on each --backends")
    parser.add_argument("--checkpoint", default="", help="--deploy: the checkpoint (default: the bundled model)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS[1:], default=list(BACKENDS[1:]),
                        help="--deploy: the backends to measure")
    parser.add_argument("--out", default="", help="where the JSON goes (default: bench-<date>-<time>.json here)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def dimensions(text: str) -> tuple:
    """WIDTHxHEIGHT -> (width, height), for argparse."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 480x320") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be >= 1")
    return width, height


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """parser.error for a count out of range, or an option the mode would silently ignore: --deploy measures
    the checkpoint as it is (its architecture, input size, layout), and only --deploy reads a checkpoint."""
    for name, least in (("batch_size", 1), ("repeats", 1), ("peak_size", 1), ("predict_images", 0), ("classes", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}")
    unused = DEPLOY_UNUSED if args.deploy else DEPLOY_ONLY
    given = [f"--{name.replace('_', '-')}" for name in unused if getattr(args, name) != parser.get_default(name)]
    if given and args.deploy:
        parser.error(f"{' '.join(given)}: --deploy measures the checkpoint as it is (its architecture and input "
                     "size); leave them out")
    if given:
        parser.error(f"{' '.join(given)}: only --deploy reads a checkpoint and measures backends")


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.out = args.out or default_out()
    try:
        atomic.refuse_existing(args.out, args.overwrite, ", or give another --out")  # before minutes of timing
        problem = atomic.folder_problem(Path(args.out).absolute().parent)
        if problem:
            raise ValueError(f"cannot write --out {args.out}: {problem}")
    except (FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {atomic.shown(err)}")
    runtime.keep_freed_memory()
    if "bf16" in (args.precisions or []) and not args.deploy:  # --deploy: each Predictor says it
        runtime.resolve_precision("bf16", torch.device("cpu"))  # the scripts' own warning where bf16 is emulated
    # Emulated bf16 (no AVX-512 BF16/AMX) takes minutes for a 2048 matmul and no model runs it: 0 says "not native".
    peaks = {"fp32": matmul_peak(torch.float32, args.peak_size),
             "bf16": matmul_peak(torch.bfloat16, args.peak_size) if runtime.cpu_has_bf16() or not args.deploy else 0.0}
    machine = {"platform": platform.platform(), "processor": runtime.cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu_bf16_native": runtime.cpu_has_bf16(),
               "matmul_peak_gflops": peaks}
    print(f"{runtime.cpu_description()}; {machine['platform']}, {machine['threads']} threads, torch {torch.__version__}; "
          f"matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    result = {"machine": machine}
    try:
        if args.deploy:
            bench_deploy(args, peaks, result.setdefault("deploy", []))
        else:
            measure(args, peaks, result)
    except (OSError, ValueError) as err:  # an unreadable checkpoint, a backend not installed...
        result["stopped"] = f"error: {atomic.shown(err)}"
    except BaseException as err:  # a bug, Ctrl-C: the measurements so far are kept, saying what stopped them
        result["stopped"] = f"{type(err).__name__}: {atomic.shown(err)}"
        save(args.out, result)
        raise
    save(args.out, result)
    if "stopped" in result:
        raise SystemExit(result["stopped"])
    return result


def save(out: str, result: dict):
    """Write `result` to `out` atomically if it holds any measurement; SystemExit naming the file if it cannot."""
    if not any(result.get(key) for key in ("rows", "predict", "deploy")):
        return
    try:
        atomic.write_text(out, json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise SystemExit(f"error: {atomic.shown(err)}") from None
    print(f"wrote {atomic.shown(out)}" + (" (incomplete: the run stopped)" if "stopped" in result else ""))


def measure(args, peaks: dict, result: dict):
    """The training/inference rows (and predict.py end to end), into result["rows"] (and ["predict"]) as measured."""
    rows = result.setdefault("rows", [])
    header = f"{'model':>30} {'train':>8} {'prec':>5} {'layout':>6} {'compile':>7} | {'train img/s':>11} " \
             f"{'GFLOP/s':>8} {'%fp32':>6} {'%bf16':>6} | {'infer img/s':>11} {'1st step':>8}"
    print(header + "\n" + "-" * len(header))
    models = [model_variant(args, name, base) for name in args.arch
              for base in (args.base_channels if name == "unet" else [None])]
    precisions = args.precisions or (["fp32", "bf16"] if runtime.cpu_has_bf16() else ["fp32"])
    for arch in models:
        for precision in precisions:
            for channels_last in [layout == "channels_last" for layout in args.layouts]:
                for compile_ in ((False, True) if args.compile else (False,)):
                    r = bench_variant(arch, args.train_size, args.size, args.batch_size, precision, channels_last,
                                      compile_, args.repeats)
                    rows.append(r)
                    print(f"{describe(arch):>30} {r['train_size']:>8} {label(precision, r['emulated']):>5} "
                          f"{'cl' if channels_last else 'nchw':>6} {str(compile_):>7} | {r['train_images_per_s']:>11.2f} "
                          f"{r['train_gflops_per_s']:>8.1f} {100 * r['train_gflops_per_s'] / peaks['fp32']:>5.0f}% "
                          f"{100 * r['train_gflops_per_s'] / peaks['bf16']:>5.0f}% | "
                          f"{r['infer_images_per_s']:>11.2f} {r['first_step_s']:>7.1f}s", flush=True)
    if any(r["emulated"] for r in rows):
        print(EMULATED_NOTE)
    if args.predict_images:
        runs = [(p, tta) for p in precisions for tta in (False, True)]
        result["predict"] = []
        for arch in models:
            for precision, tta in runs:
                p = bench_predict(args.predict_images, arch, args.size, precision, tta)
                result["predict"].append(p)
                tta_note = ", flip TTA" if p["tta"] else ""
                print(f"predict.py end to end, {describe(p)}: " + (f"{p['precision']}{tta_note}: "
                      f"skipped: {p['skipped']}" if "skipped" in p else
                      f"{p['images']} photos in {p['seconds']:.1f} s = {p['masks_per_s']:.1f} full-size masks/s "
                      f"({p['backend']} {label(p['precision'], p['emulated'])}{tta_note})"), flush=True)


if __name__ == "__main__":
    main()
