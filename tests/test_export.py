"""Protects export.py: the shipped model is plain data, fp16, smaller, and predicts like its source."""
from pathlib import Path

import pytest
import torch

import export
import train
from conftest import tiny_config, write_kaggle_dataset
from model import load_model
from carseg.checkpoint import load_checkpoint


def test_export_writes_a_slim_fp16_checkpoint_that_predicts_the_same(tmp_path):
    data = write_kaggle_dataset(tmp_path / "data")
    run = Path(train.train(tiny_config(data, tmp_path, epochs=1))["run_dir"])
    out = tmp_path / "ship" / "model.pt"
    export.main([str(run / "last.pt"), "--out", str(out)])
    slim = torch.load(out, weights_only=True)
    assert "optimizer" not in slim and slim["val_groups"] == load_checkpoint(run / "last.pt")["val_groups"]
    assert all(v.dtype == torch.float16 for v in slim["model"].values() if v.is_floating_point())
    assert out.stat().st_size < (run / "last.pt").stat().st_size / 2
    images = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        a = load_model(load_checkpoint(run / "last.pt")).eval()(images)
        b = load_model(load_checkpoint(out)).eval()(images)
    assert torch.allclose(a, b, atol=0.05)


def test_export_refuses_to_write_over_the_training_checkpoint_it_reads(tmp_path):
    data = write_kaggle_dataset(tmp_path / "data")
    run = Path(train.train(tiny_config(data, tmp_path, epochs=1))["run_dir"])
    before = (run / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match="optimizer state"):
        export.main([str(run / "last.pt"), "--out", str(run / "last.pt")])
    assert (run / "last.pt").read_bytes() == before


def test_a_parts_model_exports_with_its_classes_beside_its_source_by_default(tmp_path, monkeypatch):
    from conftest import write_coco_dataset
    data = write_coco_dataset(tmp_path / "coco")
    run = Path(train.train(tiny_config(data, tmp_path, epochs=1))["run_dir"])
    # Stand-ins, so that a regression to the old default (the bundled model) writes over no tracked file.
    monkeypatch.setattr(export, "BUNDLED_PARTS_CHECKPOINT", tmp_path / "checkpoints" / "carparts.pt")
    export.main([str(run / "best.pt")])
    assert not (tmp_path / "checkpoints" / "carparts.pt").exists()
    slim = load_checkpoint(run / "best.slim.pt")
    assert slim["class_names"] == ["background", "left_door", "right_door", "wheel"]
    assert slim["model_args"]["out_channels"] == 4


def tiny_source(path: Path) -> Path:
    """An untrained tiny checkpoint at `path`: the refusals below come before any export."""
    from model import UNet
    from carseg.checkpoint import checkpoint_for, save_checkpoint
    save_checkpoint(path, checkpoint_for(UNet(base_channels=4, depth=2),
                                         {"image_width": 64, "image_height": 48, "threshold": 0.5}))
    return path


@pytest.mark.parametrize("extra, message", [
    (["--out", "x.onnx"], r"--out .*x.onnx: --format pt writes a PyTorch checkpoint, whose name must end in .pt or "
                          r".pth, .*use --out .*x.pt, or --format onnx for a .onnx file"),
    (["--format", "onnx", "--out", "y.pt"], r"--out .*y.pt: --format onnx writes an ONNX model, whose name must end "
                                            r"in .onnx, .*use --out .*y.onnx, or --format pt for a .pt file"),
    (["--out", "model"], r"--out .*model: --format pt .* use --out .*model.pt$"),
    (["--out", "folder", "--overwrite"], r"--out .*folder is a folder: give the file's name, e.g. --out "
                                         r".*folder/model.slim.pt"),
    (["--format", "onnx", "--out", "folder"], r"--out .*folder is a folder: .*folder/model.onnx"),
])
def test_an_out_whose_name_does_not_fit_the_format_or_that_is_a_folder_is_refused_before_any_work(
        tmp_path, monkeypatch, extra, message):
    # Every script decides by the name whether a file is ONNX: x.onnx holding a checkpoint loaded as neither.
    source = tiny_source(tmp_path / "model.pt")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    for work in ("export_checkpoint", "export_onnx_main"):
        monkeypatch.setattr(export, work, lambda *a: pytest.fail("exported before the refusal"))
    with pytest.raises(SystemExit, match=message):
        export.main([str(source), *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "model.pt"]
    assert not any((tmp_path / "folder").iterdir())


def test_a_pth_name_is_a_checkpoint_too(tmp_path):
    source = tiny_source(tmp_path / "model.pt")
    export.main([str(source), "--out", str(tmp_path / "ship.pth")])
    assert load_checkpoint(tmp_path / "ship.pth")["model_args"]["base_channels"] == 4
