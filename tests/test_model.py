"""Protects the U-Net's shapes for any input size, its gradients, the registry, and safe checkpoint save/load."""
import os
import shlex

import pytest
import torch

from config import BUNDLED_CHECKPOINT
from model import (ARCHITECTURES, CHECKPOINT_FORMAT, UNet, build_model, checkpoint_for, load_checkpoint, load_model,
                   save_checkpoint)


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
    assert checkpoint["format_version"] == CHECKPOINT_FORMAT == 2
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
    assert checkpoint["val_cars"] == ["aaaaaaaaaa01"] and checkpoint["epoch"] == 3
    assert checkpoint["history"] == [{"epoch": 3, "val_dice_model_res": 0.8, "val_dice_full_res": 0.9}]
    assert checkpoint["metrics"] == {"val_dice_model_res": 0.8}
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
    assert checkpoint["config"]["threshold"] == 0.5 and len(checkpoint["val_cars"]) == 8
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


def test_load_checkpoint_refuses_a_pickle_carrying_code(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    model = UNet(base_channels=4, depth=1)
    torch.save({**checkpoint_of(model), "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not marker.exists(), "load_checkpoint executed code from the checkpoint"
    # The payload is real: an unsafe load does run it (so the assertion above means something).
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [
    {"weights": 1},                                                       # not a checkpoint
    {"format_version": 99, "model_args": {}, "model": {}},                # an unknown format
    {"format_version": 2, "arch": "unet", "model_args": {}, "model": {}},  # no config or normalisation
    [1, 2, 3],                                                            # not even a dict
])
def test_load_checkpoint_refuses_non_checkpoints(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_a_bare_state_dict(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(UNet(base_channels=4, depth=1).state_dict(), path)
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(path)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.pt"):
        load_checkpoint(tmp_path / "nothing-here.pt")
