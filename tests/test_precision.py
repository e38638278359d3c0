"""The precision every report names is the one that ran, on CPUs with and without native bf16.

This machine is one kind; the other is pretended: OpenVINO's capabilities and the compiled model's
INFERENCE_PRECISION_HINT answer as the other kind's do (and torch's oneDNN check, for PyTorch), so
both branches run here whatever the CPU. Each surface that reports a precision is read: the runner,
predict.py's log, evaluate.py's summary, serve.py's /api/health, export.py's parity table and
bench.py's rows.
"""
import logging

import pytest
import torch
from fastapi.testclient import TestClient

import backends
import bench
import evaluate
import export
import predict
from carseg import runtime
import serve
from conftest import FAKE_CARS, write_kaggle_dataset
from config import EvaluateConfig, ServeConfig
from inference import Predictor
from model import build_model
from carseg.checkpoint import checkpoint_for, save_checkpoint

NATIVE = ["FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"]   # what a Zen 4 / Sapphire Rapids CPU lists
NOT_NATIVE = ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]       # what an AVX2-only CPU lists


class _Compiled:
    """A compiled OpenVINO model whose INFERENCE_PRECISION_HINT reads `runs`, as on another CPU."""

    def __init__(self, compiled, runs):
        self.compiled, self.runs = compiled, runs

    def get_property(self, name):
        return self.runs if name == "INFERENCE_PRECISION_HINT" else self.compiled.get_property(name)

    def create_infer_request(self):
        return self.compiled.create_infer_request()


def pretend_cpu(monkeypatch, native: bool, honours_hint=True):
    """OpenVINO and PyTorch as they behave on a CPU with (or without) native bf16: auto compiles bf16
    (fp32), a precision hint is honoured (unless not `honours_hint`: then the default runs)."""
    import openvino as ov
    default = ov.Type.bf16 if native else ov.Type.f32

    class Core(ov.Core):
        def get_property(self, *args):
            if args == ("CPU", "OPTIMIZATION_CAPABILITIES"):
                return NATIVE if native else NOT_NATIVE
            return super().get_property(*args)

        def compile_model(self, model, device, config):
            asked = {"bf16": ov.Type.bf16, "f32": ov.Type.f32}.get(config.get("INFERENCE_PRECISION_HINT"))
            return _Compiled(super().compile_model(model, device, config), (honours_hint and asked) or default)

    monkeypatch.setattr(ov, "Core", Core)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """A tiny U-Net at 64x48 whose validation car is FAKE_CARS[0], saved as a .pt file."""
    torch.manual_seed(0)
    model = build_model("unet", pretrained=False, base_channels=4, depth=2).eval()
    config = {"image_width": 64, "image_height": 48, "threshold": 0.5, "group_by": "car-id"}
    path = tmp_path_factory.mktemp("precision") / "tiny.pt"
    save_checkpoint(path, checkpoint_for(model, config, val_groups=[FAKE_CARS[0]], train_groups=FAKE_CARS[1:]))
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CARSEG_CACHE_DIR", str(tmp_path / "cache"))  # OpenVINO's blobs: one per test


# ---------------------------------------------------------------- the runner

@pytest.mark.parametrize("native, auto", [(True, "bf16"), (False, "fp32")])
def test_openvino_reports_what_the_cpu_compiled(native, auto, checkpoint_path, monkeypatch):
    # A Zen 4 CPU compiles bf16 under auto, and the type comes back as openvino.Type.bf16, whose str()
    # is "<Type: 'bfloat16'>": once read as fp32 on every CPU.
    pretend_cpu(monkeypatch, native)
    assert Predictor.from_checkpoint(str(checkpoint_path), "cpu", "auto", backend="openvino").precision == auto
    assert Predictor.from_checkpoint(str(checkpoint_path), "cpu", "fp32", backend="openvino").precision == "fp32"
    if native:
        assert Predictor.from_checkpoint(str(checkpoint_path), "cpu", "bf16", backend="openvino").precision == "bf16"
    else:
        with pytest.raises(ValueError, match="--precision bf16: this CPU .* has no native bf16"):
            Predictor.from_checkpoint(str(checkpoint_path), "cpu", "bf16", backend="openvino")


def test_bf16_that_openvino_compiled_as_fp32_is_refused_not_relabelled(checkpoint_path, monkeypatch):
    # A CPU that lists BF16 yet compiles fp32 when asked for it: the answer is what was compiled.
    pretend_cpu(monkeypatch, native=False, honours_hint=False)
    monkeypatch.setattr(backends, "openvino_native_bf16", lambda core=None: True)
    with pytest.raises(ValueError, match="--precision bf16: OpenVINO compiled the model to run fp32"):
        Predictor.from_checkpoint(str(checkpoint_path), "cpu", "bf16", backend="openvino")


@pytest.mark.parametrize("native, auto", [(True, "bf16"), (False, "fp32")])
def test_torch_auto_is_bf16_only_where_native(native, auto, checkpoint_path, monkeypatch):
    pretend_cpu(monkeypatch, native)
    predictor = Predictor.from_checkpoint(str(checkpoint_path), "cpu", "auto", backend="torch")
    assert predictor.precision == auto
    logits = predictor.logits(torch.rand(1, 3, 48, 64))
    reference = Predictor.from_checkpoint(str(checkpoint_path), "cpu", "fp32").logits(torch.rand(1, 3, 48, 64))
    assert logits.dtype == reference.dtype == torch.float32  # fp32 logits out, whatever ran inside


@pytest.mark.parametrize("name, word", [("f32", "fp32"), ("bf16", "bf16"), ("f16", "fp16")])
def test_compiled_precision_reads_openvinos_type_by_name(name, word):
    import openvino as ov
    value = getattr(ov.Type, name)
    assert str(value).startswith("<Type: ")  # what the lookup once misread
    assert backends.compiled_precision(_Compiled(None, value)) == word


def test_a_precision_without_a_word_is_refused_not_reported_as_fp32():
    import openvino as ov
    with pytest.raises(ValueError, match="'u8', a precision this project does not report"):
        backends.compiled_precision(_Compiled(None, ov.Type.u8))


# ---------------------------------------------------------------- what each script reports

@pytest.mark.parametrize("native, auto", [(True, "bf16"), (False, "fp32")])
def test_predict_logs_the_precision_that_ran(native, auto, checkpoint_path, tmp_path, monkeypatch, caplog):
    from PIL import Image
    from conftest import car_picture
    pretend_cpu(monkeypatch, native)
    Image.fromarray(car_picture(0, 1)[0]).save(tmp_path / "car.png")
    with caplog.at_level(logging.INFO):
        predict.main([str(tmp_path / "car.png"), "--checkpoint", str(checkpoint_path), "--out-dir",
                      str(tmp_path / "out"), "--device", "cpu"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("backend "))
    assert line.startswith(f"backend openvino, {auto} on cpu"), line
    assert f"native bf16: {'yes' if native else 'no'}" in line
    assert (tmp_path / "out" / "car_mask.png").is_file()


@pytest.mark.parametrize("native, auto", [(True, "bf16"), (False, "fp32")])
def test_evaluate_reports_the_precision_that_ran(native, auto, checkpoint_path, tmp_path, monkeypatch):
    pretend_cpu(monkeypatch, native)
    data = write_kaggle_dataset(tmp_path / "data", cars=FAKE_CARS[:2])
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(
        checkpoint=str(checkpoint_path), data_dir=str(data), out_dir=str(tmp_path / "eval"), device="cpu",
        cache_dir="", backend="openvino", precision="auto", worst_k=1, num_samples=0))
    assert (summary["backend"], summary["precision"], summary["device"]) == ("openvino", auto, "cpu")
    assert summary["cpu"].endswith(f"native bf16: {'yes' if native else 'no'}")
    assert f"openvino {auto}" in evaluate.format_summary(summary)


@pytest.mark.parametrize("native, auto", [(True, "bf16"), (False, "fp32")])
def test_health_reports_the_precision_that_ran(native, auto, checkpoint_path, monkeypatch):
    pretend_cpu(monkeypatch, native)
    cfg = ServeConfig(checkpoint=str(checkpoint_path), backend="openvino", device="cpu", precision="auto")
    with TestClient(serve.create_app(cfg)) as client:
        health = client.get("/api/health").json()
    assert (health["backend"], health["precision"], health["device"]) == ("openvino", auto, "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_export_checks_bf16_only_where_it_runs_and_names_the_cpu(native, checkpoint_path, tmp_path, monkeypatch,
                                                                 capsys):
    pretend_cpu(monkeypatch, native)
    export.main([str(checkpoint_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--data-dir", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert f"native bf16: {'yes' if native else 'no'}" in out.splitlines()[0]
    line = next(l for l in out.splitlines() if l.startswith("openvino (bf16)"))
    if native:
        assert "within bf16's tolerance: 99.50%" in line
    else:
        assert "not checked: this CPU" in line and "no native bf16" in line
    assert "openvino (fp32): " in out and "onnxruntime (fp32): " in out and (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("native, auto", [(True, "bf16"), (False, "fp32")])
def test_bench_rows_name_the_precision_that_ran(native, auto, checkpoint_path, monkeypatch):
    pretend_cpu(monkeypatch, native)
    row = bench.bench_backend(str(checkpoint_path), "openvino", n_images=0, repeats=1)
    assert (row["backend"], row["precision"]) == ("openvino", auto)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_asked_of_pytorch_on_a_cpu_without_it_runs_and_says_it_is_emulated(native, monkeypatch, caplog):
    pretend_cpu(monkeypatch, native)
    with caplog.at_level(logging.WARNING):
        assert runtime.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert ("no native bf16, so PyTorch emulates it" in caplog.text) is not native
