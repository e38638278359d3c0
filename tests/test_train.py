"""Protects the scripts end to end: run files, exact resume, run/NaN guards, evaluate's metric and predict's outputs."""
import csv
import dataclasses
import io
import json
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import evaluate
import predict
import train
from config import EvaluateConfig, PredictConfig, TrainConfig, parse_config
from conftest import IMAGE_SIZE, MODEL_SIZE, car_picture, tiny_config, write_kaggle_dataset
from dataset import SegmentationDataset, find_samples, image_to_tensor, split_by_car
from carseg.images import load_image
from inference import Predictor
from carseg.labels import BINARY_CLASSES
from losses import BCEDiceLoss
from model import UNet, load_model
from carseg.checkpoint import LOCAL_OPTIONS, load_checkpoint

TIMING_FIELDS = {"seconds", "images_per_s"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_kaggle_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def straight(data_dir, work):
    """A 2-epoch run, trained once for the whole module: (cfg, summary, run folder)."""
    cfg = tiny_config(data_dir, work, run_name="straight")
    summary = train.train(cfg)
    return cfg, summary, Path(summary["run_dir"])


@pytest.fixture(scope="module")
def trained(data_dir, work):
    """A run long enough to segment the synthetic cars (val Dice ~0.95), so masks are not trivially empty."""
    cfg = tiny_config(data_dir, work, run_name="trained", epochs=15, batch_size=2, lr=3e-2, warmup_epochs=0.5)
    summary = train.train(cfg)
    return cfg, summary, Path(summary["run_dir"])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def config_file(cfg, path) -> str:
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return str(path)


# ---------------------------------------------------------------- train.py

def test_train_writes_a_complete_run(straight, data_dir):
    cfg, summary, run = straight
    assert summary["epoch"] == 2 and summary["run_dir"] == str(run)
    assert run == Path(cfg.out_dir) / "straight"
    for key in ("train_loss", "val_loss", "val_dice_model_res", "val_dice_full_res", "val_iou_full_res", "best_val_score"):
        assert np.isfinite(summary[key]), key
    assert 0 <= summary["val_dice_full_res"] <= 1
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert Image.open(run / "curves.png").format == "PNG"
    assert json.loads((run / "config.json").read_text()) == dataclasses.asdict(cfg)

    history = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [1, 2]
    assert [r["step"] for r in history] == [2, 4]  # 9 training images, batches of 4, last partial batch dropped
    assert summary["best_val_score"] == max(r["val_dice_full_res"] for r in history)

    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 4 and last["history"] == history
    assert {"optimizer", "scheduler", "scaler"} <= last.keys()
    assert "optimizer" not in best  # best.pt holds weights only
    best_epoch = max(history, key=lambda r: r["val_dice_full_res"])["epoch"]
    assert best["epoch"] == best_epoch and best["best_val_score"] == summary["best_val_score"]
    # the quality score's reference, in both files where the model found a car's outline at all (2 epochs may not)
    if any("val_unsure_per_edge" in r for r in history):
        assert best["quality_reference"] == last["quality_reference"] > 0
    assert last["arch"] == "unet"
    assert last["model_args"] == dict(in_channels=3, out_channels=1, base_channels=4, depth=2, bilinear=False)
    # the threshold is stored once (in the config); the machine's folders stay in config.json
    assert "threshold" not in last and last["config"]["threshold"] == cfg.threshold
    assert last["config"] == {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LOCAL_OPTIONS}
    for checkpoint in (last, best):
        assert load_checkpoint(run / "last.pt")["format_version"] == checkpoint["format_version"]
        model = load_model(checkpoint)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_quality_reference_is_the_best_epochs_median_unsure_share():
    history = [{"val_dice_full_res": 0.90, "val_dice_model_res": 0.9, "val_unsure_per_edge": 0.8},
               {"val_dice_full_res": 0.95, "val_dice_model_res": 0.9, "val_unsure_per_edge": 0.6},
               {"val_dice_full_res": 0.99, "val_dice_model_res": 0.9},  # no outline found in any photo: no median
               {"val_dice_full_res": 0.93, "val_dice_model_res": 0.9, "val_unsure_per_edge": 0.7}]
    assert train.TrainState.quality_reference(SimpleNamespace(history=history)) == {"quality_reference": 0.6}
    assert train.TrainState.quality_reference(SimpleNamespace(history=history[2:3])) == {}


@pytest.mark.slow
def test_tiny_model_learns_the_synthetic_cars(trained):
    # Deterministic (fixed seeds, one thread); ~0.95 when written. Misaligned masks or a broken loss stay near 0.
    _, summary, run = trained
    history = read_jsonl(run / "metrics.jsonl")
    assert len(history) == 15
    assert summary["best_val_score"] > 0.8
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # a model that finds the cars has outlines to be unsure of: its checkpoint carries the quality reference
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert best["quality_reference"] == history[best["epoch"] - 1]["val_unsure_per_edge"] > 0


def test_learning_rate_schedule_hand_computed(straight):
    # warm-up 2 steps, 4 steps in all: factors 1/2, 1, then cosine 1 -> 0.5*(1+cos(pi/2)) = 1/2 -> 0
    factor = train.warmup_cosine(2, 4)
    assert [factor(s) for s in range(5)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    cfg, _, run = straight
    # the lr logged after each epoch is the one the next step would use: steps 2 and 4
    assert [r["lr"] for r in read_jsonl(run / "metrics.jsonl")] == pytest.approx([cfg.lr, 0.0])


def test_train_fails_before_training_on_bad_data(tiny_cfg, monkeypatch):
    data = Path(tiny_cfg.data_dir)
    (data / "train_masks" / "aaaaaaaaaa01_01_mask.gif").unlink()
    (data / "train" / "aaaaaaaaaa02_02.jpg").write_text("not a photo")
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_file(tiny_cfg, data.parent / "cfg.json")])
    message = str(exit_info.value.code)
    assert "2 problem(s)" in message and "aaaaaaaaaa01_01.jpg: no mask" in message and "aaaaaaaaaa02_02.jpg" in message
    assert not (Path(tiny_cfg.out_dir) / tiny_cfg.run_name).exists()


def test_train_on_the_plain_layout(plain_dir, tmp_path):
    summary = train.train(tiny_config(plain_dir, tmp_path, epochs=1))
    checkpoint = load_checkpoint(Path(summary["run_dir"]) / "last.pt")
    assert len(checkpoint["val_groups"]) == 1 and checkpoint["val_groups"][0].startswith("bbbbbbbbbb")


@pytest.mark.slow
def test_group_by_none_splits_image_by_image_and_evaluate_scores_that_split(plain_dir, tmp_path):
    # 2 cars x 3 views: grouped by car id, one car validates; image by image, 1 of the 6 images does
    # (round(6 * 0.125) = 1), and evaluate.py rebuilds the same groups from the checkpoint.
    summary = train.train(tiny_config(plain_dir, tmp_path, epochs=1, group_by="none"))
    checkpoint = load_checkpoint(Path(summary["run_dir"]) / "best.pt")
    assert len(checkpoint["val_groups"]) == 1 and len(checkpoint["train_groups"]) == 5
    assert checkpoint["val_groups"][0].startswith("bbbbbbbbbb") and checkpoint["val_groups"][0][-3] == "_"
    result = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(Path(summary["run_dir"]) / "best.pt"),
                                                         data_dir=str(plain_dir), cache_dir="", device="cpu",
                                                         out_dir=str(tmp_path / "eval"), worst_k=1, num_samples=1))
    assert result["full_res"]["images"] == 1 and result["full_res"]["dice"] == pytest.approx(
        checkpoint["metrics"]["val_dice_full_res"], abs=1e-6)


def test_bf16_autocast_training_keeps_fp32_weights(tiny_cfg):
    summary = train.train(dataclasses.replace(tiny_cfg, precision="bf16", epochs=1))
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["val_loss"])
    checkpoint = load_checkpoint(Path(summary["run_dir"]) / "last.pt")
    assert all(v.dtype == torch.float32 for v in checkpoint["model"].values() if v.is_floating_point())


def test_checkpoint_val_groups_are_the_car_split(straight, data_dir):
    cfg, _, run = straight
    val_groups = set(torch.load(run / "last.pt", weights_only=True)["val_groups"])
    train_samples, val_samples = split_by_car(find_samples(data_dir)[0], cfg.val_fraction, cfg.split_seed)
    train_groups = {s.group for s in train_samples}
    assert val_groups == {s.group for s in val_samples}
    assert val_groups and train_groups and val_groups.isdisjoint(train_groups)


@pytest.mark.slow
def test_resume_after_an_interruption_is_exact(straight, data_dir, work, monkeypatch, capsys):
    _, _, straight_run = straight
    cfg = tiny_config(data_dir, work, run_name="interrupted")
    real_log_epoch = train.log_epoch

    def stop_after_epoch_1(cfg, record):
        real_log_epoch(cfg, record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt  # as if Ctrl-C came right after epoch 1 was saved

    monkeypatch.setattr(train, "log_epoch", stop_after_epoch_1)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_file(cfg, work / "interrupted.json")])
    assert exit_info.value.code == 130 and "interrupted" in capsys.readouterr().err  # 128 + SIGINT
    run = Path(cfg.out_dir) / "interrupted"
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    interrupted = load_checkpoint(run / "interrupted.pt")  # the weights of the moment, for inspection
    assert "optimizer" not in interrupted and interrupted["epoch"] == 1
    monkeypatch.setattr(train, "log_epoch", real_log_epoch)

    summary = train.main(["--resume", str(run / "last.pt")])
    assert summary["epoch"] == 2
    assert_same_training(run, straight_run)
    assert json.loads((run / "config.json").read_text())["resume"] == ""  # replaying it starts a new run


@pytest.mark.slow
def test_extending_a_finished_run_with_resume_matches_a_straight_run(straight, data_dir, work):
    # Epoch 1 is exactly the warm-up (warmup_epochs=1), whose learning rates do not depend on --epochs,
    # so a 1-epoch run resumed to 2 epochs takes the same steps as a 2-epoch run.
    _, _, straight_run = straight
    cfg = tiny_config(data_dir, work, run_name="extended", epochs=1)
    train.train(cfg)
    run = Path(cfg.out_dir) / "extended"
    summary = train.main(["--resume", str(run / "last.pt"), "--epochs", "2"])
    assert summary["epoch"] == 2
    assert_same_training(run, straight_run)


@pytest.mark.slow
def test_resume_with_crops_and_precise_bn_is_exact(data_dir, work):
    options = dict(crop_width=32, crop_height=32, precise_bn=5)
    straight_crops = tiny_config(data_dir, work, run_name="straight-crops", **options)
    train.train(straight_crops)
    extended = tiny_config(data_dir, work, run_name="extended-crops", **{**options, "epochs": 1})
    train.train(extended)
    run = Path(extended.out_dir) / "extended-crops"
    train.main(["--resume", str(run / "last.pt"), "--epochs", "2"])
    assert_same_training(run, Path(straight_crops.out_dir) / "straight-crops")


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [True, False])
def test_evaluate_reproduces_the_runs_own_validation_dice(data_dir, work, channels_last):
    # In-training validation and evaluate.py are one path: the score best.pt was chosen by is the one
    # evaluate.py gives it (precise BatchNorm statistics and all).
    name = f"val-{channels_last}"
    cfg = tiny_config(data_dir, work, run_name=name, epochs=1, crop_width=32, crop_height=32, precise_bn=5,
                      channels_last=channels_last)
    train.train(cfg)
    best = load_checkpoint(Path(cfg.out_dir) / name / "best.pt")
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(Path(cfg.out_dir) / name / "best.pt"),
                                                          data_dir=str(data_dir),
                                                          out_dir=str(work / f"{name}-eval"), device="cpu",
                                                          cache_dir=str(work / "cache")))
    assert summary["full_res"]["dice"] == pytest.approx(best["metrics"]["val_dice_full_res"], abs=1e-6)
    assert summary["model_res"]["dice"] == pytest.approx(best["metrics"]["val_dice_model_res"], abs=1e-6)


def assert_same_training(run, reference):
    a = torch.load(run / "last.pt", weights_only=True)
    b = torch.load(reference / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and a.keys() == b.keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in state_a:
            assert torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])), key
    assert without_timing(read_jsonl(run / "metrics.jsonl")) == without_timing(read_jsonl(reference / "metrics.jsonl"))


def test_resume_of_a_missing_checkpoint_names_the_option(tmp_path):
    with pytest.raises(SystemExit, match=r"--resume .*nope: no checkpoint at .*nope"):
        train.main(["--resume", str(tmp_path / "nope")])


def test_resume_refuses_a_different_architecture(straight, tmp_path):
    _, _, straight_run = straight
    run = shutil.copytree(straight_run, tmp_path / "copy")
    with pytest.raises(SystemExit, match="the run used --base-channels 4, this command says --base-channels 8"):
        train.main(["--resume", str(run / "last.pt"), "--base-channels", "8"])
    cfg = parse_config(TrainConfig, ["--resume", str(run)], base=train.resume_defaults(["--resume", str(run)])[0])
    with pytest.raises(ValueError, match="--image-width"):
        train.train(dataclasses.replace(cfg, image_width=32))


def test_resuming_a_run_from_before_the_boundary_weight_keeps_its_loss(straight, tmp_path):
    # A last.pt written before --boundary-weight existed has no such key: the run trained without
    # it, so its resume must not pick up today's default of 12.
    _, _, straight_run = straight
    run = shutil.copytree(straight_run, tmp_path / "old")
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    checkpoint["config"].pop("boundary_weight")
    torch.save(checkpoint, run / "last.pt")
    argv = ["--resume", str(run)]
    assert parse_config(TrainConfig, argv, base=train.resume_defaults(argv)[0]).boundary_weight == 0.0
    argv += ["--boundary-weight", "3"]
    assert parse_config(TrainConfig, argv, base=train.resume_defaults(argv)[0]).boundary_weight == 3.0


def test_resume_refuses_a_run_that_used_a_removed_option(straight, tmp_path):
    _, _, straight_run = straight
    run = shutil.copytree(straight_run, tmp_path / "ema")
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    checkpoint["config"]["ema_decay"] = 0.998  # as an older version wrote it for a run with --ema-decay
    torch.save(checkpoint, run / "last.pt")
    with pytest.raises(SystemExit, match="ema_decay=0.998"):
        train.main(["--resume", str(run)])


def test_resume_refuses_other_data_fewer_epochs_and_another_run_name(straight, plain_dir, tmp_path):
    _, _, straight_run = straight
    run = shutil.copytree(straight_run, tmp_path / "copy")
    before = (run / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"validated on 1 car \(\w+\), the data in .* gives 1 other;"):
        train.main(["--resume", str(run), "--data-dir", str(plain_dir)])
    with pytest.raises(SystemExit, match="done 2 epochs already"):
        train.main(["--resume", str(run), "--epochs", "1"])
    with pytest.raises(SystemExit, match="the run used --run-name straight, this command says --run-name other"):
        train.main(["--resume", str(run), "--run-name", "other"])
    assert (run / "last.pt").read_bytes() == before


def test_init_from_starts_a_new_run_at_another_size_from_the_checkpoints_weights(straight, data_dir, work, caplog):
    cfg, _, straight_run = straight
    source = load_checkpoint(straight_run / "best.pt")
    bigger = dataclasses.replace(cfg, run_name="finer", epochs=1, init_from=str(straight_run / "best.pt"),
                                 image_width=cfg.image_width * 2, image_height=cfg.image_height * 2)
    seen = {}
    real = train.start_from

    def spy(path, model, class_names, val_groups):  # the weights as loaded, before any training step
        said = real(path, model, class_names, val_groups)
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return said
    with caplog.at_level("INFO", logger="train"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "start_from", spy)
        summary = train.train(bigger)
    for key, value in source["model"].items():
        assert torch.equal(seen[key], value.float()), key
    assert f"weights from {straight_run / 'best.pt'} (epoch" in caplog.text
    finer = load_checkpoint(Path(summary["run_dir"]) / "last.pt")
    assert finer["epoch"] == 1 and finer["config"]["image_width"] == cfg.image_width * 2
    assert finer["config"]["init_from"] == str(straight_run / "best.pt")
    assert finer["val_groups"] == source["val_groups"]


def test_init_from_refuses_another_architecture_and_weights_that_saw_the_validation_cars(straight, work, tmp_path):
    cfg, _, straight_run = straight
    best = straight_run / "best.pt"
    other_arch = dataclasses.replace(cfg, run_name="wider", init_from=str(best), base_channels=8)
    with pytest.raises(ValueError, match=r"--init-from .*best.pt: holds a unet .*'base_channels': 4.*this run "
                                         r"builds a unet .*'base_channels': 8"):
        train.train(other_arch)
    checkpoint = load_checkpoint(best)
    leaked = tmp_path / "leaked.pt"
    torch.save({**checkpoint, "train_groups": checkpoint["train_groups"] + checkpoint["val_groups"]}, leaked)
    with pytest.raises(ValueError, match=r"--init-from .*leaked.pt: trained on 1 car this run validates on"):
        train.train(dataclasses.replace(cfg, run_name="leak", init_from=str(leaked)))
    with pytest.raises(ValueError, match="--init-from.*cannot be combined with --resume"):
        dataclasses.replace(cfg, init_from=str(best), resume=str(straight_run))
    assert not (work / "runs" / "wider").exists() and not (work / "runs" / "leak").exists()


def test_the_cpu_recipe_script_finishes_the_first_runs_best_weights(data_dir, tmp_path):
    """scripts/cpu_recipe.sh's wiring, on tiny settings: two runs, the second from the first's best.pt."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    tiny = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "runs"), "--arch", "unet", "--base-channels", "4",
            "--depth", "2", "--no-bilinear", "--image-width", "64", "--image-height", "48", "--crop-width", "0",
            "--crop-height", "0", "--epochs", "1", "--batch-size", "4", "--precise-bn", "0", "--device", "cpu",
            "--precision", "fp32", "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(["bash", str(root / "scripts/cpu_recipe.sh"), "hour", *tiny], capture_output=True, text=True,
                          env={**os.environ, "CARSEG_PYTHON": sys.executable, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = (load_checkpoint(tmp_path / "runs" / f"hour-{size}" / "best.pt") for size in (480, 960))
    assert second["config"]["init_from"] == str(tmp_path / "runs" / "hour-480" / "best.pt")
    assert first["config"]["init_from"] == "" and second["config"]["lr"] == 3e-4 and first["config"]["lr"] == 1e-3
    assert f"the recipe's model: {tmp_path / 'runs' / 'hour-960' / 'best.pt'}" in done.stdout


@pytest.mark.slow
def test_evaluate_split_train_is_the_cars_the_run_trained_on(data_dir, work):
    # --max-cars 3 of the 4 cars: 2 train, 1 validates; the 4th car was never seen and is in neither split.
    cfg = tiny_config(data_dir, work, run_name="three-cars", epochs=1, max_cars=3)
    train.train(cfg)
    checkpoint = Path(cfg.out_dir) / "three-cars" / "best.pt"
    assert len(load_checkpoint(checkpoint)["train_groups"]) == 2
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), data_dir=str(data_dir),
                                                          split="train", cache_dir="", out_dir=str(work / "tc"),
                                                          device="cpu", worst_k=1, num_samples=1))
    assert summary["full_res"]["images"] == 6 and summary["cars"] == 2


@pytest.mark.slow
def test_a_failure_in_validation_keeps_the_trained_epoch_and_resume_validates_it(straight, data_dir, work,
                                                                                 monkeypatch):
    _, _, straight_run = straight
    cfg = tiny_config(data_dir, work, run_name="failed-validation")
    real_evaluate = train.evaluate

    def fail_in_epoch_2(predictor, loader, *args, **kwargs):
        if len(calls) == 1:
            raise RuntimeError("validation failed")
        calls.append(1)
        return real_evaluate(predictor, loader, *args, **kwargs)

    calls = []
    monkeypatch.setattr(train, "evaluate", fail_in_epoch_2)
    with pytest.raises(RuntimeError, match="validation failed"):
        train.train(cfg)
    run = Path(cfg.out_dir) / "failed-validation"
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["pending"]["epoch"] == 2 and len(last["history"]) == 1  # trained, not lost
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    summary = train.main(["--resume", str(run)])
    assert summary["epoch"] == 2 and load_checkpoint(run / "last.pt")["pending"] is None
    assert_same_training(run, straight_run)


def test_precise_bn_never_forms_a_batch_of_one(straight):
    cfg, _, _ = straight
    store = train.build_stores(cfg)[0]  # 9 training images
    dataset = SegmentationDataset(store)
    for batch_size, precise_bn, sizes in ((8, 64, [9]), (4, 5, [5]), (4, 9, [4, 5]), (4, 8, [4, 4])):
        options = dataclasses.replace(cfg, batch_size=batch_size, precise_bn=precise_bn)
        assert [len(b) for b in train.batchnorm_batches(options, dataset, BINARY_CLASSES)] == sizes


def test_output_locations_that_cannot_be_written_are_refused_before_any_work(tiny_cfg, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(train, "build_stores", lambda cfg: pytest.fail("the data was decoded"))
    with pytest.raises(ValueError, match="--out-dir .*a-file is not a folder"):
        train.train(dataclasses.replace(tiny_cfg, out_dir=str(blocker / "runs")))
    monkeypatch.undo()
    # a cache that cannot be written is not an error: the run keeps its samples in memory
    summary = train.train(dataclasses.replace(tiny_cfg, epochs=1, cache_dir=str(blocker / "cache")))
    assert summary["epoch"] == 1 and "keeping decoded samples in memory only" in caplog.text


def test_a_full_disk_while_saving_a_checkpoint_is_an_error_naming_the_file(tiny_cfg, tmp_path, monkeypatch):
    from carseg import atomic

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    real_open = open
    monkeypatch.setattr(atomic, "open", lambda path, mode="r", *a, **k:
                        (real_open(path, mode).close(), FullDisk())[1] if "last.pt" in str(path) else
                        real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(SystemExit, match="error: .*cannot write .*last.pt: No space left on device"):
        train.main(["--config", config_file(tiny_cfg, tmp_path / "cfg.json")])
    assert not list((Path(tiny_cfg.out_dir) / tiny_cfg.run_name).glob(".*.tmp"))


def test_a_split_leaving_one_training_image_at_a_1x1_bottleneck_is_refused_before_decoding(plain_dir, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setattr(train, "prepare_store", lambda *a: pytest.fail("the data was decoded"))
    cfg = tiny_config(plain_dir, tmp_path, max_cars=2, group_by="none", val_fraction=0.8, crop_width=4,
                      crop_height=4, batch_size=2)  # 6 images, 5 validate: 1 trains, 4x4 crops at depth 2
    with pytest.raises(ValueError, match="one training image.*1x1 bottleneck.*--val-fraction"):
        train.train(cfg)


def test_a_cache_write_failure_midway_keeps_every_sample(kaggle_dir, tmp_path, monkeypatch, caplog):
    import dataset
    samples, _ = find_samples(kaggle_dir)
    monkeypatch.setattr(dataset, "_save_cached", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    store, problems = dataset.load_samples(samples, MODEL_SIZE, str(tmp_path / "cache"))
    assert problems == [] and len(store) == len(samples)
    assert caplog.text.count("cannot be written") == 1  # warned once, then RAM only


def test_evaluate_refuses_an_unwritable_out_dir_first_and_prints_scores_if_reports_fail(trained, data_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    _, _, run = trained
    (tmp_path / "a-file").write_text("x")
    argv = ["--checkpoint", str(run / "best.pt"), "--data-dir", str(data_dir), "--device", "cpu", "--cache-dir", ""]
    real_evaluate = evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("scored before checking --out-dir"))
    with pytest.raises(SystemExit, match="--out-dir .*a-file is not a folder"):
        evaluate.main(argv + ["--out-dir", str(tmp_path / "a-file" / "eval")])
    monkeypatch.setattr(evaluate, "evaluate", real_evaluate)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_reports", full_disk)
    with pytest.raises(SystemExit, match="reports could not be written: .*No space left"):
        evaluate.main(argv + ["--out-dir", str(tmp_path / "eval")])
    assert "full resolution   mean Dice" in capsys.readouterr().out  # the scores were printed all the same


def test_train_refuses_to_reuse_a_run_folder(straight):
    cfg, _, run = straight
    before = (run / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(cfg)
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(["--config", config_file(cfg, run.parent / "again.json")])
    assert (run / "last.pt").read_bytes() == before


def test_two_runs_started_in_the_same_second_get_a_folder_each_and_say_it_pasteably(data_dir, tmp_path, monkeypatch,
                                                                                     caplog):
    # The default run name is the time to the second: a second run started while the first was still
    # reading its data took the same folder, and the two wrote over each other's checkpoints.
    monkeypatch.setattr(train.time, "strftime", lambda *a: "20250101-120000")
    out_dir = tmp_path / "runs [x]" / "ü run*?"  # what a shell would split or expand
    cfg = tiny_config(data_dir, tmp_path, epochs=1, run_name="", out_dir=str(out_dir))
    argv = ["--config", config_file(cfg, tmp_path / "cfg.json")]
    real_build_stores, second = train.build_stores, []

    def second_run_starts_meanwhile(cfg):
        if not second:
            second.append(None)
            second.append(Path(train.main(argv)["run_dir"]))
        return real_build_stores(cfg)

    monkeypatch.setattr(train, "build_stores", second_run_starts_meanwhile)
    with caplog.at_level("INFO", logger="train"):
        first = Path(train.main(argv)["run_dir"])
    assert (first.name, second[1].name) == ("20250101-120000", "20250101-120000-2")
    for run in (first, second[1]):
        assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
        assert len(read_jsonl(run / "metrics.jsonl")) == 1
    # The closing commands can be pasted into a shell: the path comes back whole.
    evaluate_line = [line for line in caplog.text.splitlines() if "python evaluate.py" in line][-1]
    assert shlex.split(evaluate_line)[-1] == str(first / "best.pt")
    assert f"--checkpoint {shlex.quote(str(first / 'best.pt'))} --out-dir masks/" in caplog.text


def test_an_explicit_run_name_holding_files_is_refused_naming_it_and_an_empty_one_is_used(data_dir, tmp_path,
                                                                                           monkeypatch):
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text('{"my": "notes"}')
    (mine / "curves.png").write_bytes(b"my plot")
    monkeypatch.setattr(train, "build_stores", lambda *a: pytest.fail("the data was read before the refusal"))
    cfg = tiny_config(data_dir, tmp_path, run_name="mine")
    with pytest.raises(SystemExit, match=f"--run-name mine: {mine} exists and holds config.json, curves.png, and "
                                         r"no run to --resume \(no last.pt\)"):
        train.main(["--config", config_file(cfg, tmp_path / "cfg.json")])
    assert (mine / "config.json").read_text() == '{"my": "notes"}' and (mine / "curves.png").read_bytes() == b"my plot"
    (tmp_path / "runs" / "empty").mkdir()
    run_dir, made = train.create_run_dir(dataclasses.replace(cfg, run_name="empty"))
    assert run_dir == tmp_path / "runs" / "empty" and not made
    assert json.loads((run_dir / "config.json").read_text())["run_name"] == "empty"
    with pytest.raises(FileExistsError, match="--run-name empty: .*holds config.json"):  # claimed: taken now
        train.create_run_dir(dataclasses.replace(cfg, run_name="empty"))


def test_nan_loss_stops_training_and_keeps_the_last_good_epoch(tiny_cfg, monkeypatch):
    cfg = tiny_cfg
    real_forward = BCEDiceLoss.forward
    training_calls = []

    def nan_on_third_training_step(self, logits, targets):
        if logits.requires_grad:  # a training step, not a validation batch
            training_calls.append(1)
            if len(training_calls) == 3:  # epoch 2 (2 steps per epoch), step 3
                return logits.new_tensor(float("nan"))
        return real_forward(self, logits, targets)

    monkeypatch.setattr(BCEDiceLoss, "forward", nan_on_third_training_step)
    with pytest.raises(FloatingPointError, match="epoch 2, step 3"):
        train.train(cfg)
    run = Path(cfg.out_dir) / cfg.run_name
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["epoch"] == 1 and "optimizer" in checkpoint
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert len(read_jsonl(run / "metrics.jsonl")) == 1


# ---------------------------------------------------------------- evaluate.py

def independent_full_res_dice(checkpoint_path, data_dir, threshold=0.5) -> dict:
    """Per-image Dice recomputed without evaluate.py: PIL masks, own forward pass, numpy Dice."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model = UNet(**checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    size = (checkpoint["config"]["image_width"], checkpoint["config"]["image_height"])
    dice = {}
    for car in checkpoint["val_groups"]:
        for image_path in sorted((Path(data_dir) / "train").glob(f"{car}_*.jpg")):
            truth = np.array(Image.open(Path(data_dir) / "train_masks" / f"{image_path.stem}_mask.gif")) == 1
            image, _ = load_image(image_path, size)
            with torch.no_grad():
                probs = torch.sigmoid(model(image_to_tensor(image)[None]))
            probs = F.interpolate(probs, size=truth.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            pred = probs > threshold
            total = pred.sum() + truth.sum()
            dice[image_path.stem] = 1.0 if total == 0 else 2.0 * (pred & truth).sum() / total
    return dice


@pytest.mark.slow
def test_evaluate_checkpoint_from_the_checkpoint_and_the_data_alone(trained, data_dir, tmp_path):
    _, _, run = trained
    out = tmp_path / "eval"
    cfg = EvaluateConfig(checkpoint=str(run / "best.pt"), data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"),
                         out_dir=str(out), device="cpu")
    summary = evaluate.evaluate_checkpoint(cfg)
    for name in ("per_image.csv", "summary.json", "worst.png", "samples.png", "threshold_sweep.png"):
        assert (out / name).is_file(), name

    expected = independent_full_res_dice(run / "best.pt", data_dir)
    assert len(expected) == summary["full_res"]["images"] == 3  # one validation car x 3 views
    assert summary["full_res"]["dice"] == pytest.approx(np.mean(list(expected.values())), abs=1e-9)
    assert 0.5 < summary["full_res"]["dice"] < 1  # a real, imperfect segmentation: the check is not vacuous
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["name"]: float(r["dice_full_res"]) for r in rows} == pytest.approx(expected, abs=1e-9)
    assert [float(r["dice_full_res"]) for r in rows] == sorted(float(r["dice_full_res"]) for r in rows)  # worst first
    stored = json.loads((out / "summary.json").read_text())
    assert stored["full_res"]["dice"] == summary["full_res"]["dice"]
    assert stored["threshold"] == 0.5 and stored["model_size"] == list(MODEL_SIZE)
    assert [r["threshold"] for r in stored["sweep"]] == list(evaluate.SWEEP_THRESHOLDS)
    at_half = next(r for r in stored["sweep"] if r["threshold"] == 0.5)
    assert at_half["dice"] == pytest.approx(summary["full_res"]["dice"], abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("split, images", [("train", 9), ("all", 12)])
def test_evaluate_other_splits(trained, data_dir, tmp_path, split, images):
    _, _, run = trained
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(run / "best.pt"), data_dir=str(data_dir),
                                                          split=split, cache_dir="",
                                                          out_dir=str(tmp_path / split), device="cpu", worst_k=1,
                                                          num_samples=1))
    assert summary["full_res"]["images"] == images


@pytest.mark.slow
def test_evaluate_on_data_without_the_checkpoint_cars(trained, plain_dir, tmp_path):
    _, _, run = trained
    cfg = EvaluateConfig(checkpoint=str(run / "best.pt"), data_dir=str(plain_dir), cache_dir="",
                         out_dir=str(tmp_path / "eval"), device="cpu")
    with pytest.raises(ValueError, match="--split all"):
        evaluate.evaluate_checkpoint(cfg)
    summary = evaluate.evaluate_checkpoint(dataclasses.replace(cfg, split="all"))
    assert summary["full_res"]["images"] == 6


@pytest.mark.slow
def test_evaluate_finds_the_data_where_train_found_it_and_an_explicit_folder_wins(data_dir, plain_dir, tmp_path,
                                                                                 monkeypatch):
    # `python train.py` without --data-dir reads $CARVANA_DIR; the checkpoint records no folder of this
    # machine, and evaluate.py resolves the data the same way: --data-dir, else $CARVANA_DIR.
    monkeypatch.setenv("CARVANA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    summary = train.train(tiny_config("", tmp_path, epochs=1))
    best = Path(summary["run_dir"]) / "best.pt"
    assert "data_dir" not in torch.load(best, weights_only=True)["config"]
    assert str(data_dir) not in (best.read_bytes().decode("latin-1"))
    result = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(best), cache_dir="",
                                                         out_dir=str(tmp_path / "eval"), device="cpu"))
    assert result["data_dir"] == str(data_dir) and result["full_res"]["images"] == 3
    explicit = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(best), data_dir=str(plain_dir), split="all",
                                                           cache_dir="", out_dir=str(tmp_path / "eval2"), device="cpu"))
    assert explicit["data_dir"] == str(plain_dir) and explicit["full_res"]["images"] == 6


# ---------------------------------------------------------------- predict.py

def own_mask(checkpoint_path, image_path) -> np.ndarray:
    """The 0/255 full-size mask predict.py should write, computed here step by step."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model = UNet(**checkpoint["model_args"])
    model.load_state_dict({k: v.float() for k, v in checkpoint["model"].items()})
    model.eval()
    image, (w, h) = load_image(image_path, (checkpoint["config"]["image_width"], checkpoint["config"]["image_height"]))
    with torch.no_grad():
        probs = torch.sigmoid(model(image_to_tensor(image)[None]))
    probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return (probs > 0.5).numpy().astype(np.uint8) * 255


@pytest.fixture
def photos(data_dir, tmp_path) -> Path:
    """A folder of inputs of several sizes and formats, one of them EXIF-rotated."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((data_dir / "train").glob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    image, _ = car_picture(1, 2, size=(101, 67))  # odd size, PNG
    Image.fromarray(image).save(folder / "odd.png")
    stored, _ = car_picture(2, 1, size=(120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed 80 wide x 120 high
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=exif)
    return folder


def test_predict_writes_full_size_masks_overlays_and_cutouts(trained, photos, tmp_path):
    _, _, run = trained
    out = tmp_path / "out"
    # PyTorch fp32 on both sides, like with like (engines and precisions are compared in test_backends.py).
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(out), checkpoint=str(run / "best.pt"), device="cpu",
                        overlay=True, cutout=True, batch_size=3, backend="torch", precision="fp32")
    written, failures = predict.predict_files(cfg)
    assert failures == {}
    inputs = sorted(photos.iterdir())
    assert sorted(written) == sorted(out.resolve() / f"{p.stem}_mask.png" for p in inputs)
    for path in inputs:
        size = ImageOps.exif_transpose(Image.open(path)).size  # upright (width, height)
        mask = Image.open(out / f"{path.stem}_mask.png")
        assert mask.mode == "L" and mask.size == size, path.name
        mask = np.array(mask)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert np.array_equal(mask, own_mask(run / "best.pt", path)), path.name
        assert np.array_equal(mask, Predictor.from_checkpoint(str(run / "best.pt")).predict([path])[0]), path.name
        overlay = Image.open(out / f"{path.stem}_overlay.jpg")
        assert overlay.mode == "RGB" and overlay.size == size
        cutout = Image.open(out / f"{path.stem}_cutout.png")
        assert cutout.mode == "RGBA" and cutout.size == size
        cutout = np.array(cutout)
        alpha, photo = cutout[..., 3], load_image(path)[0]
        assert np.array_equal(alpha >= 128, mask > 0)  # soft edges: half-transparent exactly at the threshold
        assert np.array_equal(cutout[alpha == 255, :3], photo[alpha == 255])  # the car's inside is the photo
        assert not cutout[alpha == 0, :3].any()  # nothing of the background is kept under full transparency
    assert (out / "rotated_mask.png").exists() and Image.open(out / "rotated_mask.png").size == (80, 120)


def test_predict_reports_a_corrupt_file_and_writes_the_others(trained, photos, tmp_path):
    _, _, run = trained
    bad = photos / "broken.jpg"
    data = (photos / "odd.png").read_bytes()
    shutil.copy(sorted(photos.glob("*.jpg"))[0], bad)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated inside the compressed data
    empty = photos / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(out), checkpoint=str(run / "best.pt"), device="cpu")
    written, failures = predict.predict_files(cfg)
    assert set(failures) == {str(bad.resolve()), str(empty.resolve())}
    assert "broken.jpg" in failures[str(bad.resolve())] and "empty.png" in failures[str(empty.resolve())]
    good = sorted(p for p in photos.iterdir() if p not in (bad, empty))
    assert sorted(written) == sorted(out.resolve() / f"{p.stem}_mask.png" for p in good)
    assert not (out / "broken_mask.png").exists() and not (out / "empty_mask.png").exists()
    assert (photos / "odd.png").read_bytes() == data

    out2 = tmp_path / "out2"
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(photos), "--out-dir", str(out2), "--checkpoint", str(run / "best.pt"), "--device", "cpu"])
    assert exit_info.value.code == 1
    assert sorted(p.name for p in out2.iterdir()) == sorted([f"{p.stem}_mask.png" for p in good] + ["quality.csv"])


def test_predict_refuses_to_overwrite_an_input(trained, photos):
    _, _, run = trained
    # A second run into the input folder itself: the first run's odd_mask.png is now an input.
    Image.new("L", (10, 10)).save(photos / "odd_mask.png")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(photos), checkpoint=str(run / "best.pt"), device="cpu")
    with pytest.raises(ValueError, match="odd_mask.png"):
        predict.predict_files(cfg)
    with pytest.raises(SystemExit, match="refusing to write over input"):
        predict.main([str(photos), "--out-dir", str(photos), "--checkpoint", str(run / "best.pt"), "--device", "cpu"])
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_a_float_tiff_in_0_1_predicts_the_mask_of_its_8_bit_copy(trained, tmp_path):
    # The same photo as 8-bit grey and as 32-bit float grey in [0, 1] (once decoded as all black).
    _, _, run = trained
    image, _ = car_picture(0, 2)
    grey = np.asarray(Image.fromarray(image).convert("L"))
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(grey).save(folder / "eight.png")
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(folder / "float.tif")
    out = tmp_path / "out"
    written, failures = predict.predict_files(PredictConfig(inputs=[str(folder)], out_dir=str(out),
                                                            checkpoint=str(run / "best.pt"), device="cpu"))
    assert failures == {} and len(written) == 2
    eight, floating = (np.array(Image.open(out / f"{name}_mask.png")) for name in ("eight", "float"))
    assert eight.any() and np.array_equal(eight, floating)


def test_predict_refuses_outputs_it_cannot_write_before_any_work(trained, photos, tmp_path, monkeypatch):
    _, _, run = trained
    monkeypatch.setattr(predict.Predictor, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a-file").write_text("x")
    for extra, message in ((["--out-dir", str(tmp_path / "a-file")], "--out-dir .*a-file is not a folder"),
                           (["--out-dir", str(tmp_path / "o"), "--submission", str(tmp_path / "no" / "s.csv")],
                            "--submission .*no is not an existing folder"),
                           (["--out-dir", str(tmp_path / "o"), "--submission", str(tmp_path)], "--submission .* is a folder")):
        with pytest.raises(SystemExit, match=message):
            predict.main([str(photos), "--checkpoint", str(run / "best.pt"), "--device", "cpu", *extra])
    assert not (tmp_path / "o").exists()  # a refused run creates nothing


def test_predict_refuses_two_inputs_with_one_output_name(trained, photos, tmp_path):
    _, _, run = trained
    Image.new("RGB", IMAGE_SIZE).save(photos / "odd.jpg")  # beside odd.png
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(tmp_path / "out"), checkpoint=str(run / "best.pt"),
                        device="cpu")
    with pytest.raises(ValueError, match="odd_mask.png"):
        predict.predict_files(cfg)


@pytest.mark.parametrize("name", ["submission.csv", "submission.csv.gz"])
def test_predict_submission_decodes_to_the_written_masks(trained, photos, tmp_path, name):
    import gzip

    from carseg.rle import rle_decode
    _, _, run = trained
    out, csv_path = tmp_path / "out", tmp_path / name
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(out), checkpoint=str(run / "best.pt"), device="cpu",
                        submission=str(csv_path), batch_size=2)
    predict.predict_files(cfg)
    text = gzip.decompress(csv_path.read_bytes()).decode() if name.endswith(".gz") else csv_path.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the streamed file was renamed into place
    assert [r["img"] for r in rows] == sorted(p.name for p in photos.iterdir())
    for row in rows:
        mask = np.array(Image.open(out / f"{Path(row['img']).stem}_mask.png")) // 255
        assert np.array_equal(rle_decode(row["rle_mask"], mask.shape), mask), row["img"]


def test_an_interrupted_submission_leaves_no_file_and_no_temporary(trained, photos, tmp_path, monkeypatch):
    _, _, run = trained
    calls, real_write = [], predict.write_outputs

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third mask is written
        return real_write(*args)

    monkeypatch.setattr(predict, "write_outputs", interrupted)
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(tmp_path / "out"), checkpoint=str(run / "best.pt"),
                        device="cpu", submission=str(tmp_path / "sub.csv"), batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_files(cfg)
    assert not [p.name for p in tmp_path.iterdir() if "sub.csv" in p.name]  # no sub.csv, no .sub.csv.<pid>.tmp


def test_ctrl_c_in_predict_py_says_how_to_finish_instead_of_a_traceback(trained, photos, tmp_path, monkeypatch,
                                                                        capsys):
    _, _, run = trained
    monkeypatch.setattr(predict, "predict_files", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(photos), "--out-dir", str(tmp_path / "out"), "--checkpoint", str(run / "best.pt")])
    assert exit_info.value.code == 130 and "--skip-existing" in capsys.readouterr().err


def test_skip_existing_resumes_a_run_and_rebuilds_the_whole_submission(trained, photos, tmp_path, monkeypatch):
    _, _, run = trained
    out = tmp_path / "out"

    def run_predict(name, **extra):
        cfg = PredictConfig(inputs=[str(photos)], out_dir=str(out), checkpoint=str(run / "best.pt"), device="cpu",
                            cutout=True, submission=str(tmp_path / name), batch_size=2, **extra)
        return predict.predict_files(cfg)

    run_predict("full.csv")
    masks = sorted(out.glob("*_mask.png"))
    masks[1].unlink()  # as if the run had been killed before this photo's mask was written
    (out / masks[2].name.replace("_mask.png", "_cutout.png")).unlink()  # ...or before this one's cutout
    predicted, real_predict = [], predict._predict
    monkeypatch.setattr(predict, "_predict", lambda p, images, *a: predicted.append(len(images)) or real_predict(p, images, *a))
    written, failures = run_predict("resumed.csv", skip_existing=True)
    assert failures == {} and len(written) == len(masks) and sum(predicted) == 2  # only the two unfinished photos
    assert (tmp_path / "resumed.csv").read_text() == (tmp_path / "full.csv").read_text()  # every row, input order
