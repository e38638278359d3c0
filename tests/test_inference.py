"""Protects the one inference path: TTA, thresholds, normalisation, upsampling before thresholding, and
that every script reaches checkpoints through it (imports flow one way)."""
import ast

import numpy as np
import pytest
import torch

from backends import TorchRunner
from conftest import REPO_ROOT
from inference import InferenceSpec, Predictor
from model import UNet
from carseg.checkpoint import checkpoint_for

CPU = torch.device("cpu")


def predictor_of(model, tta=False, threshold=None, normalization=None, size=(24, 16)):
    spec = InferenceSpec(size, 0.5, normalization or UNet.normalization)
    return Predictor(TorchRunner(model.eval(), CPU, "fp32"), spec, tta, threshold)


def test_flip_tta_averages_the_prediction_of_the_mirrored_image():
    model = UNet(base_channels=4, depth=2).eval()
    images = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1)).flip(-1)) / 2
    got = predictor_of(model, tta=True).logits(images)
    assert torch.allclose(got, expected, atol=1e-5)
    plain = predictor_of(model).logits(images)
    assert not torch.allclose(got, plain, atol=1e-5)  # the model is not mirror-symmetric, so TTA changes it
    symmetric = torch.cat([images[..., :12], images[..., :12].flip(-1)], dim=-1)
    answer = predictor_of(model, tta=True).logits(symmetric)
    assert torch.allclose(answer, answer.flip(-1), atol=1e-5)  # a mirror-symmetric photo gets a symmetric mask


class FixedLogits(torch.nn.Module):
    """Logits +4 in the left half of a 4-column input, -4 in the right half, whatever the image."""

    def forward(self, images):
        logits = torch.full((images.shape[0], 1, images.shape[2], images.shape[3]), -4.0)
        logits[..., : images.shape[3] // 2] = 4.0
        return logits


def test_masks_upsample_probabilities_to_each_full_size_then_threshold():
    predictor = predictor_of(FixedLogits(), size=(4, 2))
    masks = predictor.masks(torch.zeros(2, 3, 2, 4), [(8, 4), (6, 3)])
    # bilinear upsampling of a step edge between columns 1 and 2 of 4 puts it halfway across the full width
    assert [m.shape for m in masks] == [(4, 8), (3, 6)] and all(m.dtype == np.uint8 for m in masks)
    assert np.array_equal(masks[0], np.repeat([[255] * 4 + [0] * 4], 4, axis=0))
    assert np.array_equal(masks[1], np.repeat([[255] * 3 + [0] * 3], 3, axis=0))


class FixedProbs(torch.nn.Module):
    """One row of four pixels with probabilities 0.2, 0.4, 0.6 and 0.8, whatever the image."""

    def forward(self, images):
        return torch.logit(torch.tensor([0.2, 0.4, 0.6, 0.8])).expand(images.shape[0], 1, 1, 4)


def test_the_threshold_is_the_checkpoints_unless_overridden():
    model = UNet(base_channels=2, depth=1)
    checkpoint = checkpoint_for(model, {"image_width": 8, "image_height": 8, "threshold": 0.3})
    assert Predictor.from_checkpoint(checkpoint).threshold == 0.3
    assert Predictor.from_checkpoint(checkpoint, threshold=0.7).threshold == 0.7
    runner, spec = TorchRunner(FixedProbs(), CPU, "fp32"), InferenceSpec((4, 1), 0.3, UNet.normalization)
    images = torch.zeros(1, 3, 1, 4)
    assert Predictor(runner, spec).masks(images, [(4, 1)])[0].tolist() == [[0, 255, 255, 255]]
    assert Predictor(runner, spec, threshold=0.7).masks(images, [(4, 1)])[0].tolist() == [[0, 0, 0, 255]]


def test_from_a_path_and_from_a_dict_give_the_same_masks(tmp_path):
    from carseg.checkpoint import save_checkpoint
    model = UNet(base_channels=4, depth=2)
    model(torch.rand(2, 3, 16, 16))  # move the BatchNorm statistics off their defaults
    checkpoint = checkpoint_for(model, {"image_width": 24, "image_height": 16, "threshold": 0.5})
    save_checkpoint(tmp_path / "m.pt", checkpoint)
    images = torch.rand(2, 3, 16, 24)
    a = Predictor.from_checkpoint(checkpoint).masks(images, [(48, 32)] * 2)
    b = Predictor.from_checkpoint(str(tmp_path / "m.pt")).masks(images, [(48, 32)] * 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert Predictor.from_checkpoint(checkpoint).input_size == (24, 16)


def test_preprocess_applies_the_checkpoints_normalisation():
    image = np.array([[[255, 0, 51]]], dtype=np.uint8)  # one pixel: r = 1.0, g = 0.0, b = 0.2
    plain = predictor_of(UNet(base_channels=2, depth=1)).preprocess([image])
    assert plain.shape == (1, 3, 1, 1) and plain.flatten().tolist() == pytest.approx([1.0, 0.0, 0.2])
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    normalised = predictor_of(UNet(base_channels=2, depth=1), normalization=imagenet).preprocess([image])
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    assert normalised.flatten().tolist() == pytest.approx(expected, abs=1e-6)


class RecordsLayout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append(images.is_contiguous(memory_format=torch.channels_last))
        return images[:, :1]


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_runner_uses_the_memory_format_it_is_given(channels_last):
    model = RecordsLayout()
    TorchRunner(model, CPU, "fp32", channels_last)(torch.rand(1, 3, 4, 4))
    assert model.seen == [channels_last]


# The project's modules, lowest layer first: each may import only modules listed before it. The
# support package comes first and imports only itself; the scripts at the top level stand on it, and
# the lab instruments under scripts/ on everything.
PACKAGE = ["runtime", "distributed", "atomic", "labels", "rle", "jpeg", "images", "quality", "augment", "plots", "cutout",
           "encoders", "checkpoint", "batchnorm", "submission", "inputs", "everyday", "teacher", "segmenter"]
TOP = ["config", "metrics", "losses", "model", "dataset", "backends", "inference", "router", "evaluate", "train", "predict",
       "export", "serve"]
SCRIPTS = ["bench", "loadtest", "make_everyday_data", "everyday_eval", "route_study", "versus_rembg"]
LAYERS = [f"carseg.{name}" for name in PACKAGE] + TOP + SCRIPTS
FILES = {**{f"carseg.{name}": REPO_ROOT / "carseg" / f"{name}.py" for name in PACKAGE},
         **{name: REPO_ROOT / f"{name}.py" for name in TOP}, **{name: REPO_ROOT / "scripts" / f"{name}.py" for name in SCRIPTS}}


def project_imports(path):
    """The project modules `path` imports, as LAYERS names them ("from carseg import a, b" is carseg.a, carseg.b)."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "carseg":
            names |= {f"carseg.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names & set(LAYERS)


def test_imports_flow_one_way_and_only_inference_reaches_the_network_for_the_scripts():
    assert sorted(p.stem for p in REPO_ROOT.glob("*.py")) == sorted(TOP)  # the root is the table of contents
    assert sorted(p.stem for p in (REPO_ROOT / "carseg").glob("*.py")) == sorted(PACKAGE + ["__init__"])
    for module in LAYERS:
        allowed = set(LAYERS[:LAYERS.index(module)])
        imports = project_imports(FILES[module])
        assert imports <= allowed, f"{module} imports {imports - allowed}"
        if module.startswith("carseg."):
            assert all(name.startswith("carseg.") for name in imports), f"{module} imports {imports}"
    assert "evaluate" not in project_imports(REPO_ROOT / "predict.py")
    for script in ("evaluate", "predict", "export"):
        assert "inference" in project_imports(REPO_ROOT / f"{script}.py"), script


@pytest.mark.slow
@pytest.mark.parametrize("full_size", [(4000, 3000), (71, 97), (200, 300)])
def test_class_map_in_bands_takes_the_argmax_of_the_bilinear_upsampling(full_size, monkeypatch):
    import inference
    monkeypatch.setattr(inference, "CLASS_MAP_BAND", 5000)  # force bands even for the small sizes
    probs = torch.rand(19, 48, 64, generator=torch.Generator().manual_seed(0)).softmax(0)
    w, h = full_size
    expected = torch.nn.functional.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
    got = Predictor.class_map(probs, full_size)
    assert got.shape == (h, w)
    assert (got == expected).float().mean().item() > 0.99999  # equal but for float-rounding ties


def test_quality_counts_unsure_pixels_per_outline_pixel_by_hand():
    predictor = Predictor(lambda images: images, InferenceSpec((10, 10), 0.5, {"mean": [0] * 3, "std": [1] * 3}))
    probs = torch.zeros(3, 1, 10, 10)
    probs[0, 0, 3:7, 3:7] = 1.0                    # a sharp 4x4 car: no unsure pixel
    probs[1, 0, 3:7, 3:7] = 0.6                    # its ring of 12 pixels unsure (0.6 is still car)...
    probs[1, 0, 4:6, 4:6] = 1.0                    # ...around 4 sure ones
    # the outline (3x3 dilation minus erosion) of a 4x4 square: 6x6 - 2x2 = 32 pixels
    sharp, ringed, empty = predictor.quality(probs)
    assert sharp == pytest.approx(1.0)
    assert ringed == pytest.approx(1 / (1 + 12 / 32))
    assert empty == 0.0                            # no car found: nothing to trust
    blob = probs[:1].clone()
    blob[0, 0, 0, 0] = 0.3                         # an unsure speck away from the car lowers the score too
    assert predictor.quality(blob)[0] == pytest.approx(1 / (1 + 1 / 32))


def test_quality_is_measured_against_the_checkpoints_reference():
    spec = InferenceSpec((10, 10), 0.5, {"mean": [0] * 3, "std": [1] * 3}, quality_reference=12 / 32)
    predictor = Predictor(lambda images: images, spec)
    probs = torch.zeros(2, 1, 10, 10)
    probs[:, 0, 3:7, 3:7] = 0.6
    probs[:, 0, 4:6, 4:6] = 1.0                    # 12 unsure pixels on a 32-pixel outline: u = 12/32
    probs[1, 0, 0, 0:6] = 0.3                      # six more: u = 18/32
    typical, worse = predictor.quality(probs)
    assert typical == pytest.approx(0.5)           # as sure as the reference photo
    assert worse == pytest.approx(1 / (1 + 18 / 12))
    assert predictor.unsure_per_edge(probs).tolist() == pytest.approx([12 / 32, 18 / 32])
