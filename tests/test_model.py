"""Protects the U-Net's shapes for any input size, its gradients, the registry, and safe checkpoint save/load."""
import argparse
import os
import pickle
import re
import shlex
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from config import BUNDLED_CHECKPOINT
from conftest import REPO_ROOT
from model import ARCHITECTURES, UNet, build_model, load_model
from carseg.checkpoint import CHECKPOINT_FORMAT, checkpoint_for, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("height, width", [(33, 47), (64, 48), (48, 64), (17, 9)])
def test_output_has_the_input_height_and_width(bilinear, depth, height, width):
    model = UNet(base_channels=4, depth=depth, bilinear=bilinear).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, height, width))
    assert logits.shape == (1, 1, height, width)


def test_out_channels_and_batch_are_kept():
    model = UNet(in_channels=3, out_channels=2, base_channels=4, depth=2).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 3, 20, 28)).shape == (3, 2, 20, 28)


@pytest.mark.parametrize("bilinear", [False, True])
def test_backward_gives_finite_gradients_everywhere(bilinear):
    model = UNet(base_channels=4, depth=2, bilinear=bilinear)
    model(torch.rand(2, 3, 33, 47)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("bilinear", [False, True])
def test_model_args_rebuild_an_identical_architecture(bilinear):
    model = UNet(base_channels=4, depth=3, bilinear=bilinear)
    twin = build_model(model.arch, **model.model_args)
    a, b = model.state_dict(), twin.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


def test_the_registry_knows_the_unet_and_names_unknown_architectures():
    assert ARCHITECTURES["unet"] is UNet
    with pytest.raises(ValueError, match="'resnet9000'.*registered: deeplabv3_efficientnet_lite0, .*unet"):
        build_model("resnet9000")


TRAIN_CONFIG = {"image_width": 32, "image_height": 32, "threshold": 0.5, "data_dir": "/home/someone/carvana",
                "cache_dir": "/home/someone/.cache", "out_dir": "/home/someone/runs", "resume": "", "epochs": 3}


def checkpoint_of(model) -> dict:
    return checkpoint_for(model, TRAIN_CONFIG)


def test_a_checkpoint_is_self_describing_and_holds_no_path_of_the_machine(tmp_path):
    model = UNet(base_channels=4, depth=2)
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_of(model))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format_version"] == CHECKPOINT_FORMAT == 3
    assert checkpoint["arch"] == "unet" and checkpoint["model_args"] == model.model_args
    assert checkpoint["normalization"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert checkpoint["config"] == {"image_width": 32, "image_height": 32, "threshold": 0.5, "epochs": 3}
    assert "/home/someone" not in repr({k: v for k, v in checkpoint.items() if k != "model"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_a_checkpoint_needs_what_inference_reads():
    with pytest.raises(ValueError, match="threshold"):
        checkpoint_for(UNet(base_channels=4, depth=1), {"image_width": 32, "image_height": 32})


def test_saved_checkpoint_reproduces_outputs_exactly(tmp_path):
    model = UNet(base_channels=4, depth=2)
    model(torch.rand(4, 3, 32, 32))  # a training-mode pass moves BatchNorm running stats off their defaults
    model.eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_of(model))
    restored = load_model(load_checkpoint(path)).eval()
    images = torch.rand(2, 3, 33, 47)
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))


def format_1_checkpoint(model) -> dict:
    """A checkpoint as train.py wrote it before the model registry (format 1)."""
    return {"format_version": 1, "model_args": {**model.model_args, "space_to_depth": 1, "refine_channels": 0},
            "model": model.state_dict(), "threshold": 0.4,
            "config": {"data_dir": "/home/someone/carvana", "width": 64, "height": 32, "threshold": 0.4,
                       "ema_decay": 0.0, "cache_dir": ".cache", "out_dir": "checkpoints", "resume": ""},
            "val_cars": ["aaaaaaaaaa01"], "epoch": 3, "global_step": 12, "best_val_dice": 0.9,
            "metrics": {"val_dice": 0.8}, "history": [{"epoch": 3, "val_dice": 0.8, "val_dice_full": 0.9}]}


def test_format_1_checkpoints_load_as_the_current_format(tmp_path):
    model = UNet(base_channels=4, depth=2, bilinear=True).eval()
    torch.save(format_1_checkpoint(model), tmp_path / "old.pt")
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint["format_version"] == CHECKPOINT_FORMAT and checkpoint["arch"] == "unet"
    assert checkpoint["model_args"] == model.model_args
    assert checkpoint["config"] == {"image_width": 64, "image_height": 32, "threshold": 0.4, "ema_decay": 0.0}
    assert "threshold" not in checkpoint  # stored once, in the config
    assert checkpoint["val_groups"] == ["aaaaaaaaaa01"] and checkpoint["epoch"] == 3
    assert checkpoint["best_val_score"] == 0.9 and "val_cars" not in checkpoint and "best_val_dice" not in checkpoint
    assert checkpoint["history"] == [{"epoch": 3, "val_dice_model_res": 0.8, "val_dice_full_res": 0.9}]
    assert checkpoint["metrics"] == {"val_dice_model_res": 0.8}
    images = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(load_model(checkpoint).eval()(images), model(images))


def test_format_2_checkpoints_load_with_todays_names(tmp_path):
    # Format 2 named the split's groups after cars and the best score after Dice, for parts models too.
    model = UNet(base_channels=4, depth=2).eval()
    old = {**checkpoint_for(model, {"image_width": 64, "image_height": 32, "threshold": 0.5}), "format_version": 2,
           "val_cars": ["aaaaaaaaaa01"], "train_cars": ["aaaaaaaaaa02"], "best_val_dice": 0.97, "epoch": 2}
    torch.save(old, tmp_path / "format2.pt")
    checkpoint = load_checkpoint(tmp_path / "format2.pt")
    assert checkpoint["format_version"] == CHECKPOINT_FORMAT == 3
    assert (checkpoint["val_groups"], checkpoint["train_groups"]) == (["aaaaaaaaaa01"], ["aaaaaaaaaa02"])
    assert checkpoint["best_val_score"] == 0.97 and not {"val_cars", "train_cars", "best_val_dice"} & set(checkpoint)
    images = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(load_model(checkpoint).eval()(images), model(images))


def test_format_1_checkpoints_of_removed_variants_are_refused_by_name(tmp_path):
    checkpoint = format_1_checkpoint(UNet(base_channels=4, depth=2))
    checkpoint["model_args"]["space_to_depth"] = 2
    torch.save(checkpoint, tmp_path / "s2d.pt")
    with pytest.raises(ValueError, match="s2d.pt.*space_to_depth=2"):
        load_checkpoint(tmp_path / "s2d.pt")


def test_the_bundled_checkpoint_loads_in_the_current_format():
    checkpoint = load_checkpoint(BUNDLED_CHECKPOINT)
    assert checkpoint["arch"] == "unet" and checkpoint["format_version"] == CHECKPOINT_FORMAT
    assert (checkpoint["config"]["image_width"], checkpoint["config"]["image_height"]) == (480, 320)
    assert checkpoint["config"]["threshold"] == 0.5 and len(checkpoint["val_groups"]) == 8
    assert not any(key in checkpoint["config"] for key in ("data_dir", "cache_dir", "out_dir", "resume"))
    model = load_model(checkpoint)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_weights_that_do_not_fit_the_architecture_are_a_clear_error():
    checkpoint = checkpoint_of(UNet(base_channels=4, depth=2))
    checkpoint["model_args"]["base_channels"] = 8
    with pytest.raises(ValueError, match="weights do not fit its unet"):
        load_model(checkpoint)


@pytest.mark.parametrize("key, value", [("threshold", 1.5), ("threshold", "0.5"), ("image_width", 0)])
def test_impossible_inference_options_are_refused(tmp_path, key, value):
    checkpoint = checkpoint_of(UNet(base_channels=2, depth=1))
    checkpoint["config"][key] = value
    torch.save(checkpoint, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt holds an impossible"):
        load_checkpoint(tmp_path / "odd.pt")


def test_load_model_gives_fp32_weights_from_bf16_ones():
    model = UNet(base_channels=4, depth=2)
    checkpoint = checkpoint_of(model)
    checkpoint["model"] = {k: v.bfloat16() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    restored = load_model(checkpoint)
    assert all(p.dtype == torch.float32 for p in restored.parameters())


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def assert_no_unsafe_advice(message: str):
    """PyTorch's own refusal advises re-loading with weights_only=False ("will likely succeed"): never pass it on."""
    assert "weights_only" not in message and "likely succeed" not in message and "trusted source" not in message


def test_load_checkpoint_refuses_a_pickle_carrying_code(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    model = UNet(base_channels=4, depth=1)
    torch.save({**checkpoint_of(model), "extra": Payload(marker)}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert not marker.exists(), "load_checkpoint executed code from the checkpoint"
    message = str(err.value)
    assert re.fullmatch(rf"checkpoint {re.escape(str(path))} holds Python objects other than tensors and plain data "
                        r"\((posix|nt|os)\.system\): not a checkpoint this project wrote; nothing in it was run",
                        message)
    assert_no_unsafe_advice(message)
    # The payload is real: an unsafe load does run it (so the assertions above mean something).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_checkpoint_names_the_pickled_object_it_refuses(tmp_path):
    path = tmp_path / "with_args.pt"  # torchvision's references pickle their argparse.Namespace into checkpoints
    torch.save({**checkpoint_of(UNet(base_channels=4, depth=1)), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match=r"with_args\.pt holds Python objects other than tensors and plain data "
                                         r"\(argparse\.Namespace\)") as err:
        load_checkpoint(path)
    assert_no_unsafe_advice(str(err.value))


def write_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a model")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's note on the plain pickle below
@pytest.mark.parametrize("name, write, found", [
    ("notes.pt", lambda p: p.write_text("this is not a checkpoint\n"),
     "a text file beginning 'this is not a checkpoint'"),
    ("empty.pt", lambda p: p.write_bytes(b""), "an empty file"),
    ("noise.pt", lambda p: p.write_bytes(bytes(range(1, 128)) * 3), "381 bytes of unrecognised data"),
    ("photo.pt", lambda p: Image.new("RGB", (8, 8)).save(p, format="JPEG"), "a JPEG image"),
    ("bundle.pt", write_zip, "a zip archive holding readme.txt"),
    ("pickled.pt", lambda p: p.write_bytes(pickle.dumps({"model": 1}, protocol=4)),
     "a Python pickle, not written by torch.save"),
])
def test_files_that_are_no_checkpoint_are_called_that(tmp_path, name, write, found):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path} is not a PyTorch checkpoint ({found})"


def test_random_bytes_are_no_checkpoint(tmp_path):
    for seed in range(5):
        path = tmp_path / f"random{seed}.pt"
        path.write_bytes(np.random.default_rng(seed).bytes(2000))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a PyTorch checkpoint \(") as err:
            load_checkpoint(path)
        assert_no_unsafe_advice(str(err.value))


def test_a_folder_is_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))} is not a PyTorch checkpoint: it is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("content, reason", [
    ({"weights": 1}, "it has no format_version; its keys: weights"),
    ({"format_version": 99, "model_args": {}, "model": {}}, "its format_version is 99; this version reads 1 to 3"),
    ({"format_version": 3, "arch": "unet", "model_args": {}, "model": {}}, "it lacks normalization, config; its keys: "
                                                                           "format_version, arch, model_args, model"),
    ({"format_version": 1}, "it lacks arch, model_args, model, normalization, config; its keys: format_version"),
    ([1, 2, 3], "it holds a list, not a dict"),
])
def test_load_checkpoint_refuses_non_checkpoints(tmp_path, content, reason):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"checkpoint {path} is not a train.py checkpoint (format 3): {reason}"


def test_load_checkpoint_refuses_a_bare_state_dict(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(UNet(base_channels=4, depth=1).state_dict(), path)
    with pytest.raises(ValueError, match=r"state\.pt is not a train.py checkpoint \(format 3\): it is a bare "
                                         r"state_dict \(\d+ tensors\)"):
        load_checkpoint(path)


def test_no_script_loads_a_user_file_with_torch_load_directly():
    """Checkpoints given by users go through checkpoint.load_checkpoint (backends.load_source calls it), whose
    refusals say what the file is; encoders.py loads only the ImageNet weights installed with the package."""
    sources = [p for p in [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("carseg/*.py"), *REPO_ROOT.glob("scripts/*.py")]
               if "torch.load(" in p.read_text(encoding="utf-8")]
    assert sorted(p.name for p in sources) == ["checkpoint.py", "encoders.py"]


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.pt"):
        load_checkpoint(tmp_path / "nothing-here.pt")
