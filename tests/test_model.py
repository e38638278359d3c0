"""Protects the U-Net's shapes for any input size, its gradients, and safe checkpoint save/load."""
import os
import shlex

import pytest
import torch

from model import CHECKPOINT_FORMAT, UNet, load_checkpoint


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("height, width", [(33, 47), (64, 48), (48, 64), (17, 9)])
def test_output_has_the_input_height_and_width(bilinear, depth, height, width):
    model = UNet(base_channels=4, depth=depth, bilinear=bilinear).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, height, width))
    assert logits.shape == (1, 1, height, width)


@pytest.mark.parametrize("variant", [{"space_to_depth": 2}, {"refine_channels": 4}])
@pytest.mark.parametrize("height, width", [(64, 64), (33, 47), (17, 9)])
def test_finer_than_grid_variants_keep_the_input_size(variant, height, width):
    model = UNet(base_channels=4, depth=2, bilinear=True, **variant).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, height, width)).shape == (2, 1, height, width)


def test_space_to_depth_unfolds_each_logit_to_its_own_pixel():
    # With the U-Net body replaced by an identity, fold -> 1x1 conv -> unfold must put output channel
    # k of grid cell (i, j) at pixel (2i + k // 2, 2j + k % 2): the layout pixel_unshuffle read it from.
    model = UNet(base_channels=4, depth=1, space_to_depth=2)
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    folded = model._fold(images)
    assert folded.shape == (2, 12, 2, 3)
    assert folded[0, 0, 1, 2] == images[0, 0, 2, 4] and folded[0, 3, 1, 2] == images[0, 0, 3, 5]
    assert torch.equal(model._unfold(folded, (4, 6)), images)
    assert torch.equal(model._unfold(model._fold(images[..., :3, :5]), (3, 5)), images[..., :3, :5])


def test_untrained_refine_head_is_bilinear_upsampling_of_the_half_size_answer():
    # The head's last layer starts at zero, so before training the model must equal the plain U-Net run
    # on the 2x2-averaged photo, its logits upsampled: the refinement can only add to that answer.
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, bilinear=True, refine_channels=4).eval()
    plain = UNet(base_channels=4, depth=2, bilinear=True).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("refine.")})
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        half = plain(torch.nn.functional.avg_pool2d(images, 2))
        expected = torch.nn.functional.interpolate(half, size=(32, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(images), expected)


def test_refine_head_sees_the_full_size_image():
    # Two photos with the same 2x2 averages differ only in detail the U-Net body cannot see: once the
    # head has weights, its answers must differ.
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, bilinear=True, refine_channels=4).eval()
    torch.nn.init.normal_(model.refine.fuse[-1].weight)
    images = torch.rand(1, 3, 16, 16)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 8) * 0.1
    with torch.no_grad():
        assert torch.allclose(torch.nn.functional.avg_pool2d(images + checker, 2),
                              torch.nn.functional.avg_pool2d(images, 2), atol=1e-6)
        assert not torch.allclose(model(images + checker), model(images), atol=1e-4)


def test_refine_and_space_to_depth_cannot_be_combined():
    with pytest.raises(ValueError, match="cannot be combined"):
        UNet(base_channels=4, depth=2, space_to_depth=2, refine_channels=4)


def test_out_channels_and_batch_are_kept():
    model = UNet(in_channels=3, out_channels=2, base_channels=4, depth=2).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 3, 20, 28)).shape == (3, 2, 20, 28)


@pytest.mark.parametrize("bilinear, refine_channels", [(False, 0), (True, 0), (True, 4)])
def test_backward_gives_finite_gradients_everywhere(bilinear, refine_channels):
    model = UNet(base_channels=4, depth=2, bilinear=bilinear, refine_channels=refine_channels)
    model(torch.rand(2, 3, 33, 47)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("bilinear, space_to_depth, refine_channels", [(False, 1, 0), (True, 1, 0), (True, 2, 0),
                                                                       (True, 1, 8)])
def test_model_args_rebuild_an_identical_architecture(bilinear, space_to_depth, refine_channels):
    model = UNet(base_channels=4, depth=3, bilinear=bilinear, space_to_depth=space_to_depth,
                 refine_channels=refine_channels)
    twin = UNet(**model.model_args)
    a, b = model.state_dict(), twin.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


def checkpoint_of(model) -> dict:
    return {"format_version": CHECKPOINT_FORMAT, "model_args": model.model_args, "model": model.state_dict()}


def test_saved_checkpoint_reproduces_outputs_exactly(tmp_path):
    model = UNet(base_channels=4, depth=2)
    model(torch.rand(4, 3, 32, 32))  # a training-mode pass moves BatchNorm running stats off their defaults
    model.eval()
    path = tmp_path / "model.pt"
    torch.save(checkpoint_of(model), path)
    restored = UNet.from_checkpoint(load_checkpoint(path)).eval()
    images = torch.rand(2, 3, 33, 47)
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))


def test_checkpoints_from_before_space_to_depth_still_load():
    model = UNet(base_channels=4, depth=2)
    checkpoint = checkpoint_of(model)
    del checkpoint["model_args"]["space_to_depth"], checkpoint["model_args"]["refine_channels"]
    restored = UNet.from_checkpoint(checkpoint)
    assert restored.space_to_depth == 1 and restored.refine is None


def test_from_checkpoint_gives_fp32_weights_from_bf16_ones():
    model = UNet(base_channels=4, depth=2)
    checkpoint = checkpoint_of(model)
    checkpoint["model"] = {k: v.bfloat16() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    restored = UNet.from_checkpoint(checkpoint)
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
