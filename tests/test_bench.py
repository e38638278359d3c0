"""Protects scripts/bench.py from rotting: it runs on tiny models and writes a complete JSON report (no timing asserted)."""
import json

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
