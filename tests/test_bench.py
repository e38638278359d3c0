"""Protects bench.py from rotting: it runs on tiny models and writes a complete JSON report (no timing asserted)."""
import json

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


def test_bench_measures_each_architecture_with_the_multiclass_loss(tmp_path):
    result = bench.main(["--arch", "unet", "unet_efficientnet_lite0", "deeplabv3_efficientnet_lite0", "--classes", "5",
                         "--base-channels", "2", "--size", "64x64", "--train-size", "64x64", "--batch-size", "2",
                         "--repeats", "1", "--peak-size", "128", "--precisions", "fp32", "--layouts", "channels_last",
                         "--out", str(tmp_path / "bench.json")])
    rows = result["rows"]
    assert [r["arch"] for r in rows] == ["unet", "unet_efficientnet_lite0", "deeplabv3_efficientnet_lite0"]
    assert all(r["out_channels"] == 5 and r["train_images_per_s"] > 0 for r in rows)
    assert len({r["gflop_per_train_image"] for r in rows}) == 3  # three different networks were measured
