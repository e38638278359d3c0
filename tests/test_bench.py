"""Protects bench.py from rotting: it runs on a tiny model and writes a complete JSON report (no timing asserted)."""
import json

import bench


def test_bench_runs_and_reports_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--base-channels", "2", "--size", "64x32", "--train-size", "32x32", "--batch-size", "2", "--repeats", "1", "--peak-size", "128",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert {(r["precision"], r["channels_last"]) for r in rows} == {("fp32", False), ("fp32", True),
                                                                    ("bf16", False), ("bf16", True)}
    for row in rows:
        assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0
        # FLOPs come from the counter, not the clock: a width-2 U-Net at 32x32 costs the same every run
        assert row["gflop_per_train_image"] == rows[0]["gflop_per_train_image"] > 0
    assert result["machine"]["matmul_peak_gflops"]["fp32"] > 0
