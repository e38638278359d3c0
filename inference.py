"""Checkpoint in, masks out: the project's one inference path.

A `Predictor` is built from a checkpoint (a path or a loaded dict), a device, a precision, flip TTA
on or off and an optional threshold override. It is the only reader of a checkpoint's inference
metadata (architecture and weights through `model.load_model`, input size, threshold,
normalisation) and owns every step between a decoded photo and its full-size mask: reading a photo
at the model's input size, preprocessing a batch, logits, probabilities upsampled to each photo's
own size, and hard masks. evaluate.py (and through it train.py's validation), predict.py, export.py
and scripts/bench.py all go through it.

The network itself runs behind a *runner* (backends.py): a callable taking a preprocessed batch
(B, 3, h, w) to fp32 logits (B, C, h, w), on PyTorch, ONNX Runtime or OpenVINO. Everything else,
TTA included, is the same code whichever backend runs the network.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from carseg import runtime
from backends import load_source, make_runner
from dataset import image_to_tensor
from carseg.images import load_image
from carseg.labels import BINARY_CLASSES, car_mask, flip_permutation, is_multiclass

UNSURE = (0.1, 0.9)  # car probabilities the quality score counts as unsure
CLASS_MAP_BAND = 1 << 26  # class-probability values class_map upsamples at a time (256 MB of float32)


@dataclass(frozen=True)
class Answer:
    """One photo's answer, from the model that gave it (a Router picks one of two per photo)."""
    probs: torch.Tensor  # (C, h, w) probabilities at that model's input size
    quality: float       # Predictor.quality: near 0.65 for a sharp outline, lower for a doubtful one
    model: str           # the name of the model that answered (its checkpoint's file stem)
    threshold: float     # that model's threshold (binary models)


@dataclass(frozen=True)
class InferenceSpec:
    """What a checkpoint says about running its model, as plain data."""
    input_size: tuple   # (width, height) of the images the model sees
    threshold: float    # binary models: probability above which a pixel is car
    normalization: dict  # {"mean": [r, g, b], "std": [r, g, b]} applied to images in [0, 1]
    class_names: tuple = tuple(BINARY_CLASSES)  # index 0 the background; more than two: a multi-class model
    quality_reference: float | None = None  # the median photo's unsure pixels per outline pixel (see quality)

    @classmethod
    def from_config(cls, config: dict, normalization: dict, class_names=BINARY_CLASSES,
                    quality_reference=None) -> "InferenceSpec":
        """From training options (a TrainConfig as a dict), the model's normalisation and its classes."""
        return cls((config["image_width"], config["image_height"]), config["threshold"], normalization,
                   tuple(class_names), quality_reference)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "InferenceSpec":
        return cls.from_config(checkpoint["config"], checkpoint["normalization"], checkpoint["class_names"],
                               checkpoint.get("quality_reference"))

    @property
    def multiclass(self) -> bool:
        """One output channel per class (softmax, argmax) rather than one car channel (sigmoid, threshold)."""
        return is_multiclass(self.class_names)


class Predictor:
    """Full-resolution masks from one model: see the module docstring.

    runner: a callable (B, 3, h, w) preprocessed images -> (B, C, h, w) fp32 logits (see TorchRunner).
    spec: the checkpoint's input size, threshold and normalisation.
    tta: also run the mirrored images and average the two answers' logits (2x compute).
    threshold: overrides spec.threshold when given.
    name: what logs, quality.csv and the API call this model (from_checkpoint: the file's stem).
    """

    def __init__(self, runner, spec: InferenceSpec, tta: bool = False, threshold: float | None = None,
                 name: str = "model"):
        self.runner, self.spec, self.tta, self.name = runner, spec, tta, name
        self.threshold = spec.threshold if threshold is None else threshold
        # In a mirrored photo the left door is the right door: mirrored answers are relabelled back.
        self.mirrored_classes = torch.from_numpy(flip_permutation(spec.class_names)) if spec.multiclass else None

    @classmethod
    def from_checkpoint(cls, checkpoint, device="cpu", precision="fp32", tta=False, threshold=None,
                        backend="torch", name=None) -> "Predictor":
        """A Predictor for a checkpoint (a .pt path or loaded dict, or an exported .onnx path).

        device, precision and backend take the scripts' option values ('auto' included; see
        backends.make_runner). Raises FileNotFoundError or ValueError naming what is wrong.
        """
        source = checkpoint if isinstance(checkpoint, dict) else load_source(checkpoint)
        runner = make_runner(source, backend, device, precision)
        name = name or ("model" if isinstance(checkpoint, dict) else Path(checkpoint).stem)
        return cls(runner, InferenceSpec.from_checkpoint(source), tta, threshold, name)

    @property
    def input_size(self) -> tuple:
        """(width, height) of the model's input."""
        return self.spec.input_size

    @property
    def device(self) -> torch.device:
        """Where logits and probabilities live."""
        return self.runner.device

    @property
    def precision(self) -> str:
        """The precision the network runs in: fp32, bf16 or fp16."""
        return self.runner.precision

    @property
    def backend(self) -> str:
        """What runs the network: torch, onnxruntime or openvino (a runner without the attribute: its class name)."""
        return getattr(self.runner, "backend", type(self.runner).__name__)

    def describe(self) -> str:
        """What runs the network, for logs: 'backend openvino, bf16 on cpu (<CPU name>, native bf16: yes)'.

        On a CPU, whether bf16 is native decides what --precision auto became, so it is said too.
        """
        where = f" ({runtime.cpu_description()})" if self.device.type == "cpu" else ""
        return f"backend {self.backend}, {self.precision} on {self.device}{where}"

    def read(self, path):
        """Decode a photo upright at the model's input size: (uint8 (h, w, 3), full (width, height)).

        Raises ValueError naming the file when it cannot be read (see images.load_image).
        """
        return load_image(path, self.input_size)

    def preprocess(self, images) -> torch.Tensor:
        """uint8 (h, w, 3) images at the input size -> one float32 batch (B, 3, h, w), normalised."""
        return torch.stack([image_to_tensor(image, self.spec.normalization) for image in images])

    def warm_up(self):
        """One forward pass on a blank image, so the first photo does not pay for the backend's set-up."""
        width, height = self.input_size
        self.probs(self.preprocess([torch.zeros((height, width, 3), dtype=torch.uint8).numpy()]))

    def answer(self, images) -> list:
        """Decoded photos (what `read` gives, at the input size) -> one Answer per photo."""
        probs = self.probs(self.preprocess(images))
        return [Answer(prob, quality, self.name, self.threshold) for prob, quality in zip(probs, self.quality(probs))]

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch (B, 3, h, w) -> fp32 logits (B, C, h, w) on self.device (TTA averaged)."""
        if not self.tta:
            return self.runner(batch)
        plain, mirrored = self.runner(torch.cat([batch, batch.flip(-1)])).chunk(2)
        mirrored = mirrored.flip(-1)
        if self.mirrored_classes is not None:  # channel c of the mirror answer is class perm[c] here
            mirrored = mirrored[:, self.mirrored_classes.to(mirrored.device)]
        return (plain + mirrored) / 2

    def probs(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> probabilities (B, C, h, w): sigmoid of the car channel, or softmax over classes."""
        logits = self.logits(batch)
        return logits.softmax(1) if self.spec.multiclass else torch.sigmoid(logits)

    def car_channel(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, C, h, w) -> the car's probability (B, h, w): the car channel of a binary
        model, one minus the background's of a parts model."""
        return 1.0 - probs[:, 0] if self.spec.multiclass else probs[:, 0]

    def unsure_per_edge(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, C, h, w) at the input size -> u (B,): the pixels the model is unsure of (car
        probability between UNSURE[0] and UNSURE[1]) per pixel of the predicted car's outline (the mask
        dilated minus eroded by one pixel); inf where no car (or nothing but car) is found."""
        car = self.car_channel(probs).float()
        mask = (car > self.threshold).float()[:, None]
        outline = F.max_pool2d(mask, 3, 1, 1) - (1 - F.max_pool2d(1 - mask, 3, 1, 1))  # dilated minus eroded
        unsure = ((car > UNSURE[0]) & (car < UNSURE[1])).flatten(1).sum(1).float()
        edge = outline.flatten(1).sum(1)
        return torch.where(edge > 0, unsure / edge.clamp(min=1), torch.full_like(edge, float("inf")))

    def quality(self, probs: torch.Tensor) -> list:
        """A score in [0, 1] per photo from the model's own probabilities (B, C, h, w) at its input size:
        1 / (1 + u / r), u = unsure_per_edge, r the checkpoint's quality_reference (the median u of its
        validation photos; 1 for a checkpoint without one); 0 where no car (or nothing but car) is found.

        A photo the model is as sure of as of its median validation photo scores 0.5; a sharper outline
        more, a blurred outline or unsure blobs away from it less. Why this measure, and how well it
        ranks photos by their true quality: docs/everyday.md.
        """
        scale = self.spec.quality_reference or 1.0
        return (1.0 / (1.0 + self.unsure_per_edge(probs) / scale)).tolist()

    @staticmethod
    def upsample(probs: torch.Tensor, full_size) -> torch.Tensor:
        """Probabilities (1, h, w) -> (H, W) at full_size=(W, H), bilinear: threshold *after* this.

        Thresholding first and resizing a hard mask would lose the sub-pixel boundary the model drew.
        """
        w, h = full_size
        return F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]

    @staticmethod
    def class_map(probs: torch.Tensor, full_size) -> torch.Tensor:
        """Class probabilities (C, h, w) -> the most probable class per pixel, int64 (H, W) at
        full_size=(W, H), taken after bilinear upsampling of the probabilities (as `upsample` does for
        one channel).

        Up to CLASS_MAP_BAND values in one F.interpolate; beyond, in bands of rows (the same pixels to
        float rounding, 1.5x slower): all C channels at full size at once would be 4*C bytes per pixel,
        0.9 GB for a 12-megapixel photo and the 19 car-parts classes. Bilinear is separable: the columns
        are upsampled for all h source rows (C, h, W), then each band of output rows blends its two
        source rows and takes the argmax.
        """
        w, h = full_size
        if probs.shape[0] * w * h <= CLASS_MAP_BAND:
            return F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
        wide = F.interpolate(probs[None].float(), size=(probs.shape[1], w), mode="bilinear", align_corners=False)[0]
        # F.interpolate's source row for output row y (align_corners=False): (y + 0.5) * h_in / h - 0.5, clamped
        source = ((torch.arange(h, device=probs.device, dtype=torch.float64) + 0.5) * (probs.shape[1] / h) - 0.5)
        source = source.clamp(min=0)
        top = source.floor().long().clamp(max=probs.shape[1] - 1)
        bottom = (top + 1).clamp(max=probs.shape[1] - 1)
        weight = (source - top).float()[:, None]
        labels = torch.empty((h, w), dtype=torch.long, device=probs.device)
        rows = max(1, CLASS_MAP_BAND // (probs.shape[0] * w))
        for start in range(0, h, rows):
            band = slice(start, start + rows)
            blended = torch.lerp(wide[:, top[band]], wide[:, bottom[band]], weight[band])
            labels[band] = blended.argmax(0)
        return labels

    def labels(self, batch: torch.Tensor, full_sizes) -> list:
        """Preprocessed batch -> one uint8 class-index map (H, W) per image at its full_size=(W, H),
        indexing spec.class_names (binary models: 0 background, 1 car)."""
        return [full_size_labels(prob, size, self.threshold) for prob, size in zip(self.probs(batch), full_sizes)]

    def car_probs(self, batch: torch.Tensor, full_sizes) -> list:
        """Preprocessed batch of a car/background model -> each photo's car probability, float32 numpy
        (H, W) at its full_size=(W, H): what `masks` thresholds, for soft-edged cutouts (cutout.soft_alpha)."""
        return [self.upsample(prob, size).cpu().numpy() for prob, size in zip(self.probs(batch), full_sizes)]

    def masks(self, batch: torch.Tensor, full_sizes) -> list:
        """Preprocessed batch -> one uint8 0/255 car mask (H, W) per image, each at its full_size=(W, H).

        A multi-class model's car mask is the union of its classes with its holes filled (see car_mask).
        """
        labels = self.labels(batch, full_sizes)
        return [car_mask(m) for m in labels] if self.spec.multiclass else [m * 255 for m in labels]

    def predict_labels(self, paths) -> list:
        """Photos on disk -> their full-size uint8 class-index maps (one batch; ValueError names an unreadable file)."""
        decoded = [self.read(path) for path in paths]
        return self.labels(self.preprocess([image for image, _ in decoded]), [size for _, size in decoded])

    def predict(self, paths) -> list:
        """Photos on disk -> their uint8 0/255 full-size masks (one batch; ValueError names an unreadable file)."""
        decoded = [self.read(path) for path in paths]
        return self.masks(self.preprocess([image for image, _ in decoded]), [size for _, size in decoded])


def full_size_labels(probs: torch.Tensor, full_size, threshold: float):
    """One photo's probabilities (C, h, w) at its model's size -> its uint8 class-index map (H, W) at
    full_size=(W, H): a binary model's 0/1 car mask thresholded after upsampling, a parts model's argmax."""
    if probs.shape[0] == 1:
        return (Predictor.upsample(probs, full_size) > threshold).to(torch.uint8).cpu().numpy()
    return Predictor.class_map(probs, full_size).to(torch.uint8).cpu().numpy()
