"""The ONNX export and the two CPU engines behind --backend: the same logits and masks as PyTorch for
every architecture and size, the metadata inside the file, the export cache, and each refusal."""
import importlib.util
import json

import onnx
import pytest
import torch

import backends
import export
from carseg import runtime
from conftest import REPO_ROOT, car_picture
from inference import Predictor
from model import build_model
from carseg.checkpoint import checkpoint_for

CPU = torch.device("cpu")
ENGINES = ("onnxruntime", "openvino")


def tiny_checkpoint(arch="unet", classes=2, size=(64, 48), seed=0):
    torch.manual_seed(seed)
    args = dict(base_channels=4, depth=2) if arch == "unet" else {}
    model = build_model(arch, pretrained=False, out_channels=1 if classes == 2 else classes, **args).eval()
    names = ["background", "car"] if classes == 2 else ["background"] + [f"part{i}" for i in range(1, classes)]
    config = {"image_width": size[0], "image_height": size[1], "threshold": 0.5, "group_by": "car-id"}
    return checkpoint_for(model, config, class_names=names, val_groups=["a"], train_groups=["b"])


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory):
    checkpoint = tiny_checkpoint()
    path = backends.export_onnx(checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return checkpoint, path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["unet", "unet_efficientnet_lite0", "deeplabv3_efficientnet_lite0",
                                  "deeplabv3_mobilenet_v3_large"])
def test_every_architecture_exports_with_dynamic_batch_height_and_width(arch, tmp_path):
    checkpoint = tiny_checkpoint(arch, classes=2 if arch == "unet" else 5)
    path = backends.export_onnx(checkpoint, tmp_path / "m.onnx")
    model = build_model(arch, pretrained=False, **checkpoint["model_args"]).eval()
    model.load_state_dict(checkpoint["model"])
    runner = backends.OnnxRuntimeRunner(path)
    for shape in [(1, 3, 48, 64), (3, 3, 61, 87)]:  # another batch, and a size no power of two divides
        images = torch.rand(*shape)
        with torch.no_grad():
            expected = model(images)
        got = runner(images)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_gives_pytorchs_logits_and_masks_through_the_predictor(engine, unet_onnx):
    checkpoint, path = unet_onnx
    reference = Predictor.from_checkpoint(checkpoint, "cpu", "fp32")
    other = Predictor.from_checkpoint(str(path), "cpu", "fp32", backend=engine)
    assert other.backend == engine and other.precision == "fp32" and other.device == CPU
    assert other.spec == reference.spec  # the spec came from the file's metadata alone
    images = torch.rand(2, 3, 48, 64)
    assert (other.logits(images) - reference.logits(images)).abs().max().item() < 1e-4
    sizes = [(97, 71), (64, 48)]
    for a, b in zip(reference.masks(images, sizes), other.masks(images, sizes)):
        assert a.shape == b.shape and (a != b).mean() < 1e-3


def test_tta_runs_the_same_on_an_engine(unet_onnx):
    checkpoint, path = unet_onnx
    images = torch.rand(2, 3, 48, 64)
    reference = Predictor.from_checkpoint(checkpoint, "cpu", "fp32", tta=True).logits(images)
    got = Predictor.from_checkpoint(str(path), "cpu", "fp32", tta=True, backend="onnxruntime").logits(images)
    assert (got - reference).abs().max().item() < 1e-4


def test_the_file_carries_the_checkpoints_inference_metadata_and_no_training_state(unet_onnx):
    checkpoint, path = unet_onnx
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta = json.loads(props[backends.METADATA_KEY])
    assert meta["config"] == {"image_width": 64, "image_height": 48, "threshold": 0.5, "group_by": "car-id"}
    assert meta["class_names"] == ["background", "car"] and meta["val_groups"] == ["a"]
    assert "model" not in meta and "optimizer" not in meta
    source = backends.load_source(path)
    assert source["onnx_path"] == str(path) and source["arch"] == "unet"


def test_a_pt_checkpoint_is_exported_once_then_found_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CARSEG_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = tiny_checkpoint()
    first = backends.cached_onnx(checkpoint)
    assert first.parent == tmp_path / "cache" / "onnx" and first.is_file()
    monkeypatch.setattr(backends, "export_onnx", lambda *a: pytest.fail("exported again"))
    assert backends.cached_onnx(checkpoint) == first
    Predictor.from_checkpoint(checkpoint, "cpu", "auto", backend="openvino")  # from the cache, no export
    assert list((tmp_path / "cache" / "openvino").iterdir())  # OpenVINO kept its compiled blob there


def test_other_weights_or_metadata_are_another_cache_entry():
    checkpoint = tiny_checkpoint()
    key = backends.weights_hash(checkpoint)
    assert backends.weights_hash(tiny_checkpoint()) == key  # the same weights, built again
    assert backends.weights_hash(tiny_checkpoint(seed=1)) != key
    moved = {**checkpoint, "config": {**checkpoint["config"], "threshold": 0.4}}
    assert backends.weights_hash(moved) != key


def test_an_unwritable_cache_is_refused_naming_the_folder_and_the_variable(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CARSEG_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(ValueError, match="CARSEG_CACHE_DIR"):
        backends.cached_onnx(tiny_checkpoint())


def test_auto_is_openvino_on_the_cpu_and_torch_elsewhere():
    assert backends.resolve_backend("auto", CPU) == "openvino"
    assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="--backend onnxruntime runs on the CPU"):
        backends.resolve_backend("onnxruntime", torch.device("cuda"))


def test_without_openvino_auto_runs_pytorch_and_says_so(unet_onnx, monkeypatch, caplog):
    # The base install (requirements.txt) has no engine: auto must still predict, and say why it is PyTorch.
    checkpoint, path = unet_onnx
    monkeypatch.setattr(backends, "installed", lambda module: False)
    with caplog.at_level("INFO"):
        predictor = Predictor.from_checkpoint(checkpoint, "cpu", "auto", backend="auto")
    assert predictor.backend == "torch" and "OpenVINO is not installed, so PyTorch runs the network" in caplog.text
    for engine in ENGINES:
        with pytest.raises(ValueError, match=f"--backend {engine}: {engine} is not installed; pip install -r "
                                             "requirements-deploy.txt"):
            Predictor.from_checkpoint(checkpoint, "cpu", "auto", backend=engine)
    with pytest.raises(ValueError, match="onnxruntime is not installed"):  # an .onnx file needs an engine
        Predictor.from_checkpoint(str(path), "cpu", "auto", backend="auto")


def test_refusals_name_the_option_to_change(unet_onnx, tmp_path):
    checkpoint, path = unet_onnx
    with pytest.raises(ValueError, match="is an ONNX file: run it with --backend onnxruntime or openvino"):
        Predictor.from_checkpoint(str(path), "cpu", "fp32", backend="torch")
    with pytest.raises(ValueError, match="--backend onnxruntime runs fp32"):
        Predictor.from_checkpoint(str(path), "cpu", "bf16", backend="onnxruntime")
    with pytest.raises(ValueError, match="--backend openvino runs fp32 or bf16"):
        Predictor.from_checkpoint(str(path), "cpu", "fp16", backend="openvino")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not protobuf at all" * 10)
    with pytest.raises(ValueError, match="garbage.onnx is not a readable ONNX model"):
        backends.load_source(garbage)
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="holds no car_segmentation metadata: export it with"):
        backends.load_source(bare)
    with pytest.raises(FileNotFoundError, match="missing.onnx does not exist"):
        backends.load_source(tmp_path / "missing.onnx")


def test_openvino_bf16_is_refused_where_the_cpu_does_not_run_it_natively(unet_onnx):
    _, path = unet_onnx
    if backends.openvino_native_bf16():
        assert Predictor.from_checkpoint(str(path), "cpu", "bf16", backend="openvino").precision == "bf16"
    else:
        with pytest.raises(ValueError, match="no native bf16"):
            Predictor.from_checkpoint(str(path), "cpu", "bf16", backend="openvino")


def test_openvino_reports_the_precision_it_compiled_on_this_cpu(unet_onnx):
    import openvino as ov
    _, path = unet_onnx
    runner = Predictor.from_checkpoint(str(path), "cpu", "fp32", backend="openvino").runner
    assert runner.precision == "fp32"
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    auto = Predictor.from_checkpoint(str(path), "cpu", "auto", backend="openvino")
    # OpenVINO's own default on x86: bf16 where the CPU runs it natively, fp32 elsewhere.
    assert auto.precision == ("bf16" if backends.openvino_native_bf16() else "fp32")
    assert auto.precision == backends.OPENVINO_PRECISIONS[
        auto.runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()]


def write_photos(folder, count=2):
    from PIL import Image
    photos = []
    for i in range(count):
        photos.append(folder / f"car{i}.png")
        Image.fromarray(car_picture(i, 1, size=(96, 64))[0]).save(photos[-1])
    return photos


def test_export_keeps_the_file_only_when_every_engine_agrees(tmp_path):
    source = tmp_path / "model.pt"
    torch.save(tiny_checkpoint(), source)
    rows = export.export_onnx_checked(source, tmp_path / "model.onnx", write_photos(tmp_path))
    assert [(row["backend"], row["precision"]) for row in rows] == list(export.PARITY_RUNS)
    assert (tmp_path / "model.onnx").is_file()
    for row in rows:
        if row["precision"] == "fp32":  # like with like: fp32 engines give PyTorch fp32's logits
            assert row["photos"] == 2 and row["max_abs_logit_diff"] < 1e-4 and row["agreement"] > 0.9999
            assert row["dice"] == pytest.approx(1.0, abs=1e-4) and row["passed"]
        elif backends.openvino_native_bf16():
            assert row["passed"] and row["agreement"] >= export.PARITY_TOLERANCE["bf16"]
        else:
            assert "passed" not in row and "no native bf16" in row["skipped"]
    assert sorted(p.name for p in tmp_path.iterdir() if "onnx" in p.name) == ["model.onnx"]  # no candidate left


def test_bf16_is_held_to_bf16s_tolerance_and_fp32_to_fp32s(unet_onnx, tmp_path):
    # PyTorch's bf16 (native or emulated: it runs on every CPU) stands in for an engine's bf16.
    checkpoint, _ = unet_onnx
    photos = write_photos(tmp_path)
    reference = Predictor.from_checkpoint(checkpoint, "cpu", "fp32")
    row = export.parity(reference, Predictor.from_checkpoint(checkpoint, "cpu", "bf16"), photos)
    assert row["precision"] == "bf16" and row["tolerance"] == export.PARITY_TOLERANCE["bf16"] < 0.9999
    assert row["max_abs_logit_diff"] > 1e-4  # really another precision, not fp32 under a bf16 label
    assert row["passed"] and row["agreement"] >= row["tolerance"]
    assert export.parity(reference, reference, photos)["tolerance"] == export.PARITY_TOLERANCE["fp32"]


def test_a_row_outside_its_precisions_tolerance_fails(unet_onnx):
    checkpoint, _ = unet_onnx
    reference = Predictor.from_checkpoint(checkpoint, "cpu", "fp32")
    other = Predictor.from_checkpoint(tiny_checkpoint(seed=3), "cpu", "bf16")  # another model's bf16
    row = export.parity(reference, other, [])
    assert not row["passed"] and "OUTSIDE bf16's tolerance" in export.format_parity(row)


def test_export_refuses_a_graph_that_disagrees_and_leaves_nothing(tmp_path, monkeypatch):
    source = tmp_path / "model.pt"
    torch.save(tiny_checkpoint(), source)
    real_export = backends.export_onnx

    def sabotaged(checkpoint, path):  # another model's weights in the file: plausible, and wrong
        return real_export({**checkpoint, "model": tiny_checkpoint(seed=7)["model"]}, path)

    monkeypatch.setattr(export, "export_onnx", sabotaged)
    with pytest.raises(ValueError, match="disagrees with PyTorch on onnxruntime fp32, openvino fp32"):
        export.export_onnx_checked(source, tmp_path / "model.onnx", [])
    assert not [p for p in tmp_path.iterdir() if "onnx" in p.name]


@pytest.mark.slow
def test_export_main_prints_parity_for_the_bundled_model(tmp_path, capsys):
    export.main([str(REPO_ROOT / "checkpoints" / "carvana_unet.pt"), "--format", "onnx", "--out",
                 str(tmp_path / "bundled.onnx"), "--data-dir", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert "parity on 2 random images only" in out
    native = "yes" if runtime.cpu_has_bf16() else "no"
    assert f"CPU: {runtime.cpu_name()}, native bf16: {native}" in out
    for engine, precision in export.PARITY_RUNS:
        line = next(l for l in out.splitlines() if l.startswith(f"{engine} ({precision})"))
        if precision == "fp32":
            assert "100.0000" in line and "Dice 1.000000" in line and "within fp32's tolerance" in line
        elif backends.openvino_native_bf16():
            assert "within bf16's tolerance" in line
        else:
            assert "not checked: this CPU" in line and "no native bf16" in line
    assert (tmp_path / "bundled.onnx").stat().st_size > 1e6


def test_broken_metadata_and_a_folder_are_named(unet_onnx, tmp_path):
    _, path = unet_onnx
    proto = onnx.load(str(path))
    next(p for p in proto.metadata_props if p.key == backends.METADATA_KEY).value = '{"arch": "unet'
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    with pytest.raises(ValueError, match="broken.onnx: its car_segmentation metadata is not valid JSON"):
        backends.load_source(tmp_path / "broken.onnx")
    with pytest.raises(ValueError, match="is a folder; give the file in it"):
        backends.load_source(tmp_path)


def test_an_onnx_file_named_pt_and_a_checkpoint_named_onnx_are_named_as_what_they_are(unet_onnx, tmp_path,
                                                                                       monkeypatch):
    # load_source decides by the name; the refusal says what the file really is and which name it needs.
    checkpoint, path = unet_onnx
    (tmp_path / "model.pt").write_bytes(path.read_bytes())
    for onnx_installed in (True, False):  # the base install has no onnx package: the first bytes decide
        if not onnx_installed:
            real_find_spec = importlib.util.find_spec
            monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else
                                real_find_spec(name, *a))
        with pytest.raises(ValueError, match=r"model.pt is not a PyTorch checkpoint \(an ONNX model: give it a "
                                             r"\.onnx name"):
            backends.load_source(tmp_path / "model.pt")
    monkeypatch.undo()
    torch.save(checkpoint, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match=r"model.onnx is not a readable ONNX model: it is a PyTorch checkpoint: "
                                         r"give it a \.pt name"):
        backends.load_source(tmp_path / "model.onnx")
    # Other bytes that begin as a protobuf might are not taken for ONNX where onnx can tell.
    (tmp_path / "other.pt").write_bytes(b"\x08\x01\x12\x00" + bytes(range(256)) * 2)
    with pytest.raises(ValueError, match=r"other.pt is not a PyTorch checkpoint \(\d+ bytes of unrecognised data\)"):
        backends.load_source(tmp_path / "other.pt")
