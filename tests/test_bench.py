"""Protects scripts/bench.py from rotting: it runs on tiny models and writes a complete JSON report (no timing asserted)."""
import json
import os
import pickle

import pytest

import bench


def test_bench_runs_and_reports_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--base-channels", "2", "--size", "64x32", "--train-size", "32x32", "--batch-size", "2",
                         "--repeats", "1", "--peak-size", "128", "--precisions", "fp32", "bf16", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert {(r["precision"], r["channels_last"]) for r in rows} == {("fp32", False), ("fp32", True),
                                                                    ("bf16", False), ("bf16", True)}
    for row in rows:
        assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0
        # FLOPs come from the counter, not the clock: a width-2 U-Net at 32x32 costs the same every run
        assert row["gflop_per_train_image"] == rows[0]["gflop_per_train_image"] > 0
    assert result["machine"]["matmul_peak_gflops"]["fp32"] > 0


@pytest.mark.slow
def test_bench_measures_each_architecture_with_the_multiclass_loss(tmp_path):
    result = bench.main(["--arch", "unet", "unet_efficientnet_lite0", "deeplabv3_efficientnet_lite0", "--classes", "5",
                         "--base-channels", "2", "--size", "64x64", "--train-size", "64x64", "--batch-size", "2",
                         "--repeats", "1", "--peak-size", "128", "--precisions", "fp32", "--layouts", "channels_last",
                         "--out", str(tmp_path / "bench.json")])
    rows = result["rows"]
    assert [r["arch"] for r in rows] == ["unet", "unet_efficientnet_lite0", "deeplabv3_efficientnet_lite0"]
    assert all(r["out_channels"] == 5 and r["train_images_per_s"] > 0 for r in rows)
    assert len({r["gflop_per_train_image"] for r in rows}) == 3  # three different networks were measured


@pytest.mark.slow
def test_bench_deploy_measures_each_backend_and_predict_as_a_process(tmp_path, monkeypatch):
    import torch
    from PIL import Image

    from conftest import car_picture
    from model import UNet
    from carseg.checkpoint import checkpoint_for
    checkpoint = tmp_path / "tiny.pt"
    torch.save(checkpoint_for(UNet(base_channels=4, depth=2), {"image_width": 64, "image_height": 48, "threshold": 0.5}),
               checkpoint)
    (tmp_path / "data" / "train").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(car_picture(i, 1, size=(96, 64))[0]).save(tmp_path / "data" / "train" / f"car{i}_01.jpg")
    monkeypatch.setenv("CARVANA_DIR", str(tmp_path / "data"))
    result = bench.main(["--deploy", "--checkpoint", str(checkpoint), "--predict-images", "2", "--repeats", "1",
                         "--peak-size", "128", "--out", str(tmp_path / "bench.json")])
    rows = result["deploy"]
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime", "openvino"]
    for row in rows:
        assert row["infer_images_per_s_batch1"] > 0 and row["infer_images_per_s_batch8"] > 0
        assert row["predict_images"] == 2 and row["predict_process_s"] > 0  # the process ran and exited 0


TINY = ["--base-channels", "2", "--size", "64x32", "--train-size", "32x32", "--batch-size", "2", "--repeats", "1",
        "--peak-size", "64", "--layouts", "contiguous"]


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """$CARVANA_DIR/train with two small car photos."""
    from PIL import Image

    from conftest import car_picture
    (tmp_path / "data" / "train").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(car_picture(i, 1, size=(96, 64))[0]).save(tmp_path / "data" / "train" / f"car{i}_01.jpg")
    monkeypatch.setenv("CARVANA_DIR", str(tmp_path / "data"))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    import torch

    from carseg.checkpoint import checkpoint_for
    from model import UNet
    path = tmp_path / "tiny.pt"
    torch.save(checkpoint_for(UNet(base_channels=4, depth=2), {"image_width": 64, "image_height": 48,
                                                               "threshold": 0.5}), path)
    return path


def test_what_this_cpu_cannot_run_is_a_skipped_row_and_bf16_says_it_is_emulated(photos, tmp_path, monkeypatch,
                                                                                 caplog, capsys):
    from test_precision import pretend_cpu
    pretend_cpu(monkeypatch, native=False)  # predict.py's default backend, OpenVINO, then refuses bf16
    out = tmp_path / "bench.json"
    result = bench.main(TINY + ["--precisions", "fp32", "bf16", "--predict-images", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["precision"], r["emulated"]) for r in result["rows"]] == [("fp32", False), ("bf16", True)]
    assert "no native bf16, so PyTorch emulates it" in caplog.text  # the scripts' own warning
    printed = capsys.readouterr().out
    assert " bf16* " in printed and "* bf16 emulated" in printed
    runs = {(p["precision"], p["tta"]): p for p in result["predict"]}
    assert runs["fp32", False]["images"] == runs["fp32", True]["images"] == 1
    for tta in (False, True):
        assert "no native bf16" in runs["bf16", tta]["skipped"] and runs["bf16", tta]["arch"] == "unet"


def test_the_measurements_are_written_when_a_later_step_fails(photos, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("predict broke")
    monkeypatch.setattr(bench, "bench_predict", broken)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="predict broke"):
        bench.main(TINY + ["--precisions", "fp32", "--predict-images", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert len(written["rows"]) == 1 and written["stopped"] == "RuntimeError: predict broke"


def test_deploy_measures_each_backend_at_each_precision_and_batch_size(tiny_checkpoint, tmp_path, monkeypatch):
    from test_precision import pretend_cpu
    pretend_cpu(monkeypatch, native=False)
    result = bench.main(["--deploy", "--checkpoint", str(tiny_checkpoint), "--backends", "torch", "onnxruntime",
                         "--precisions", "fp32", "bf16", "--batch-size", "2", "--repeats", "1", "--peak-size", "64",
                         "--out", str(tmp_path / "bench.json")])
    rows = {(r["backend"], r["precision"]): r for r in result["deploy"]}
    assert list(rows) == [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "bf16")]
    assert rows["torch", "bf16"]["emulated"] and not rows["torch", "fp32"]["emulated"]
    for key in (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32")):
        assert rows[key]["infer_images_per_s_batch1"] > 0 and rows[key]["infer_images_per_s_batch2"] > 0
        assert "infer_images_per_s_batch8" not in rows[key]
    assert "runs fp32 on the CPU" in rows["onnxruntime", "bf16"]["skipped"]


@pytest.mark.parametrize("args, words", [
    (["--deploy", "--size", "64x64"], "--size: --deploy measures the checkpoint as it is"),
    (["--deploy", "--arch", "deeplabv3_resnet50", "--layouts", "channels_last", "--compile"],
     "--arch --compile --layouts: --deploy"),
    (["--checkpoint", "x.pt"], "--checkpoint: only --deploy"), (["--backends", "torch"], "--backends: only --deploy"),
    (["--size", "480"], "give WIDTHxHEIGHT"), (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_options_the_mode_would_ignore_are_refused_before_anything_runs(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(args + ["--out", str(tmp_path / "bench.json")])
    assert stop.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


class Evil:
    """Unpickled, it would run a command: what a checkpoint must never be allowed to do."""

    def __reduce__(self):
        return os.system, ("echo unpickled",)


def test_deploy_problems_are_one_error_line_before_any_timing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda *args: 1.0)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    out = ["--out", str(tmp_path / "bench.json")]
    with pytest.raises(SystemExit, match=r"^error: .*evil\.pt"):
        bench.main(["--deploy", "--checkpoint", str(evil)] + out)
    monkeypatch.setattr(bench, "installed", lambda module: module != "onnxruntime")
    monkeypatch.setattr(bench, "bench_backend", lambda *args: pytest.fail("timed before refusing"))
    with pytest.raises(SystemExit, match=r"^error: --backends onnxruntime: onnxruntime not installed; pip install "
                                         r"-r requirements-deploy.txt"):
        bench.main(["--deploy", "--checkpoint", str(tiny_checkpoint)] + out)
    with pytest.raises(SystemExit, match=r"^error: cannot write --out .*: .* is not a folder"):
        bench.main(["--deploy", "--checkpoint", str(tiny_checkpoint), "--out", str(evil / "bench.json")])
    assert not (tmp_path / "bench.json").exists()


def test_a_failing_predict_process_is_reported_in_its_row(tiny_checkpoint, photos, monkeypatch):
    import subprocess
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 1, b"", b"some log line\nerror: the checkpoint is gone\n"))
    row = bench.bench_backend(str(tiny_checkpoint), "torch", n_images=1, repeats=1, batch=2)
    assert row["predict_error"] == "exit status 1: error: the checkpoint is gone" and "predict_images" not in row
