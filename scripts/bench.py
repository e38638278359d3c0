"""Measure training and inference speed on this machine; prints a table and writes JSON.

    python scripts/bench.py                                   # the CPU recipe's U-Net, fp32 (+ bf16 where native) x layouts
    python scripts/bench.py --compile --base-channels 16 32   # add torch.compile rows, two network widths
    python scripts/bench.py --predict-images 64               # also time predict.py end to end on 64 Carvana photos
    python scripts/bench.py --arch unet unet_efficientnet_lite0 deeplabv3_mobilenet_v3_large --layouts channels_last
    python scripts/bench.py --deploy --predict-images 96      # the bundled model on each --backend, predict.py as a process
    python scripts/bench.py --out bench.json --overwrite      # replace the repository's quoted numbers

Results go to bench-<date>-<time>.json in the current folder unless --out names a file; an existing
file is replaced only with --overwrite (the repository's bench.json holds the numbers the docs quote).

Training steps run on --train-size inputs (the recipe's random crops), inference on --size (whole
images) through inference.Predictor, the path evaluate.py and predict.py take.

Every number is the median of several timed repetitions after warm-up, so a noisy shared machine
moves it less; rerun on an idle machine for numbers to quote. GFLOP/s come from
torch.utils.flop_counter and are compared with a matmul peak measured in the same run.
"""
import argparse
import dataclasses
import json
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

from backends import TorchRunner  # noqa: E402 (the project, found through the line above)
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
            "batch": batch, "precision": precision,
            "channels_last": channels_last, "compile": compile_, "first_step_s": round(first_call, 2),
            "train_images_per_s": batch / train_s, "train_gflops_per_s": flops_train / train_s / 1e9,
            "infer_images_per_s": batch / infer_s, "infer_gflops_per_s": flops_infer / infer_s / 1e9,
            "gflop_per_train_image": flops_train / batch / 1e9}


def class_names(out_channels: int) -> list:
    """Placeholder class names for a model of `out_channels` outputs (one: car/background)."""
    return ["background", "car"] if out_channels == 1 else ["background"] + [f"part{i}" for i in range(1, out_channels)]


def bench_predict(n_images: int, arch: dict, size, precision: str, tta: bool) -> dict:
    """predict.py end to end (decode, inference, upsampling, threshold, PNG writing) on real photos."""
    import predict
    photos = sorted((resolve_data_dir("") / "train").glob("*.jpg"))[:n_images]
    if not photos:
        return {"skipped": f"no Carvana photos in {resolve_data_dir('')}/train"}
    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.asdict(TrainConfig()) | {"image_width": size[0], "image_height": size[1]}
        save_checkpoint(Path(tmp) / "bench.pt", checkpoint_for(build_model(**arch), config,
                                                               class_names=class_names(arch.get("out_channels", 1))))
        cfg = PredictConfig(inputs=[str(p) for p in photos], out_dir=str(Path(tmp) / "out"),
                            checkpoint=str(Path(tmp) / "bench.pt"), precision=precision, device="cpu", tta=tta)
        # What predict.py will run (its default backend, at `precision`), built the same way; this also
        # exports the ONNX file once, untimed, as a user's second run finds it cached.
        ran = Predictor.from_checkpoint(cfg.checkpoint, cfg.device, cfg.precision, backend=cfg.backend)
        start = time.perf_counter()
        written, failures = predict.predict_files(cfg)
        seconds = time.perf_counter() - start
    return {"images": len(written), "failed": len(failures), "seconds": seconds, "masks_per_s": len(written) / seconds,
            "backend": ran.backend, "precision": ran.precision, "tta": tta, **arch}


def bench_backend(checkpoint: str, backend: str, n_images: int, repeats: int) -> dict:
    """One backend on a real checkpoint: model-only images/s at batch 1 and 8 (Predictor.logits), then
    `python predict.py` as a fresh process on n_images Carvana photos, start-up included (imports,
    model build or ONNX/OpenVINO load, warm-up): what a user typing the README's command waits for."""
    predictor = Predictor.from_checkpoint(checkpoint, "cpu", "auto", backend=backend)
    w, h = predictor.input_size
    row = {"backend": backend, "precision": predictor.precision}
    for batch in (1, 8):
        images = torch.rand(batch, 3, h, w)
        row[f"infer_images_per_s_batch{batch}"] = batch / median_seconds(lambda images=images: predictor.logits(images), repeats)
    photos = sorted((resolve_data_dir("") / "train").glob("*.jpg"))[:n_images]
    if photos:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, str(ROOT / "predict.py"), *map(str, photos),
                       "--checkpoint", checkpoint, "--backend", backend, "--out-dir", tmp]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds = time.perf_counter() - start
        row.update(predict_images=len(photos), predict_process_s=seconds, predict_masks_per_s=len(photos) / seconds)
    return row


def bench_deploy(args, peaks) -> list:
    """bench_backend for each of args.backends on args.checkpoint (default: the bundled model)."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    for backend in args.backends:
        Predictor.from_checkpoint(checkpoint, "cpu", "auto", backend=backend)  # exports/compiles once, untimed
    rows = [bench_backend(checkpoint, backend, args.predict_images, args.repeats) for backend in args.backends]
    print(f"{Path(checkpoint).name}; {'backend':>12} {'prec':>5} | model img/s b1 {'b8':>6} | predict.py process")
    for r in rows:
        process = (f"{r['predict_images']} photos in {r['predict_process_s']:.1f} s = {r['predict_masks_per_s']:.2f} "
                   "masks/s" if "predict_images" in r else f"skipped: no photos under {resolve_data_dir('')}/train")
        print(f"{r['backend']:>12} {r['precision']:>5} | {r['infer_images_per_s_batch1']:>14.2f} "
              f"{r['infer_images_per_s_batch8']:>6.2f} | {process}")
    base = next((r for r in rows if r["backend"] == "torch"), None)
    if base:
        for r in rows:
            print(f"{r['backend']}: {r['infer_images_per_s_batch8'] / base['infer_images_per_s_batch8']:.2f}x torch's "
                  f"model throughput at batch 8 (fp32 matmul peak {peaks['fp32']:.0f} GFLOP/s in this run)")
    return rows


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


def main(argv=None):
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
    parser.add_argument("--size", default=f"{recipe.image_width}x{recipe.image_height}",
                        help="model input WIDTHxHEIGHT for inference")
    parser.add_argument("--train-size", default=f"{recipe.crop_width or recipe.image_width}x"
                                                 f"{recipe.crop_height or recipe.image_height}",
                        help="training input WIDTHxHEIGHT (the recipe's random crops)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (15-25 s each to compile)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
                        help="default: fp32, and bf16 where the CPU has it natively (emulated bf16 is very slow)")
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
    args = parser.parse_args(argv)
    args.out = args.out or default_out()
    try:
        atomic.refuse_existing(args.out, args.overwrite, ", or give another --out")  # before minutes of timing
    except FileExistsError as err:
        raise SystemExit(f"error: {err}")
    size = tuple(int(v) for v in args.size.lower().split("x"))
    train_size = tuple(int(v) for v in args.train_size.lower().split("x"))
    runtime.keep_freed_memory()
    # Emulated bf16 (no AVX-512 BF16/AMX) takes minutes for a 2048 matmul and no model runs it: 0 says "not native".
    peaks = {"fp32": matmul_peak(torch.float32, args.peak_size),
             "bf16": matmul_peak(torch.bfloat16, args.peak_size) if runtime.cpu_has_bf16() or not args.deploy else 0.0}
    machine = {"platform": platform.platform(), "processor": runtime.cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu_bf16_native": runtime.cpu_has_bf16(),
               "matmul_peak_gflops": peaks}
    print(f"{runtime.cpu_description()}; {machine['platform']}, {machine['threads']} threads, torch {torch.__version__}; "
          f"matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    if args.deploy:
        result = {"machine": machine, "deploy": bench_deploy(args, peaks)}
        atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return result
    rows = []
    header = f"{'model':>30} {'train':>8} {'prec':>5} {'layout':>6} {'compile':>7} | {'train img/s':>11} " \
             f"{'GFLOP/s':>8} {'%fp32':>6} {'%bf16':>6} | {'infer img/s':>11} {'1st step':>8}"
    print(header + "\n" + "-" * len(header))
    models = [model_variant(args, name, base) for name in args.arch
              for base in (args.base_channels if name == "unet" else [None])]
    precisions = args.precisions or (["fp32", "bf16"] if machine["cpu_bf16_native"] else ["fp32"])
    for arch in models:
        for precision in precisions:
            for channels_last in [layout == "channels_last" for layout in args.layouts]:
                for compile_ in ((False, True) if args.compile else (False,)):
                    r = bench_variant(arch, train_size, size, args.batch_size, precision, channels_last, compile_,
                                      args.repeats)
                    rows.append(r)
                    print(f"{describe(arch):>30} {r['train_size']:>8} {precision:>5} "
                          f"{'cl' if channels_last else 'nchw':>6} {str(compile_):>7} | {r['train_images_per_s']:>11.2f} "
                          f"{r['train_gflops_per_s']:>8.1f} {100 * r['train_gflops_per_s'] / peaks['fp32']:>5.0f}% "
                          f"{100 * r['train_gflops_per_s'] / peaks['bf16']:>5.0f}% | "
                          f"{r['infer_images_per_s']:>11.2f} {r['first_step_s']:>7.1f}s", flush=True)
    result = {"machine": machine, "rows": rows}
    if args.predict_images:
        runs = [(p, tta) for p in precisions for tta in (False, True)]
        result["predict"] = [bench_predict(args.predict_images, arch, size, p, tta) for arch in models for p, tta in runs]
        for p in result["predict"]:
            print(f"predict.py end to end, {describe(p)}: " + (p.get("skipped") or
                  f"{p['images']} photos in {p['seconds']:.1f} s = {p['masks_per_s']:.1f} full-size masks/s "
                  f"({p['backend']} {p['precision']}{', flip TTA' if p['tta'] else ''})"))
    atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
