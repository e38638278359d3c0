"""Two models, and per photo the one that knows its kind: the studio model or the everyday model.

The studio model (checkpoints/carvana_unet.pt) learnt the Carvana turntable only and paints much of a
street as car; the everyday model (checkpoints/everyday.pt) cuts cars out of streets, yards and car
parks but is less exact on the turntable. predict.py and serve.py run both through a `Router` by
default, so nobody has to know which kind of photo they hold:

1. a photo whose frame is mostly light grey (STUDIO_BACKDROP: the share of a 32x32 thumbnail's outer
   ring with saturation < 0.12 and value > 0.55; every Carvana photo has >= 0.62, most street photos
   < 0.3) is a studio candidate and goes to the studio model first;
2. its answer is kept when the studio model is sure of it (Predictor.quality >= STUDIO_QUALITY:
   a sharp outline); a doubtful answer, and every photo that is no studio candidate, goes to the
   everyday model, whose answer is kept.

Both thresholds were set on training photos only; how often each kind of held-out photo is routed
wrongly, and what that costs, is measured in docs/everyday.md.
"""
import cv2
import numpy as np

from carseg.images import load_image_sizes
from config import BUNDLED_CHECKPOINT, BUNDLED_EVERYDAY_CHECKPOINT, resolve_checkpoint
from inference import Predictor

THUMBNAIL = 32   # side of the thumbnail whose outer ring the backdrop test reads
RING = 4         # width of that ring, in thumbnail pixels
GREY = (0.12, 0.55)  # (max saturation, min value) of a backdrop pixel, HSV in [0, 1]
STUDIO_BACKDROP = 0.6  # share of the ring that is backdrop: at or above, the studio model answers first
STUDIO_QUALITY = 0.405  # studio answers at or above this quality are kept (calibrated on training photos: docs/everyday.md)


def backdrop_share(image: np.ndarray) -> float:
    """Share of a photo's outer ring (uint8 RGB (h, w, 3), any size) that looks like a studio backdrop:
    light and nearly colourless. 0.98 for the median Carvana photo, 0.29 for the median car-parts photo."""
    small = cv2.resize(image, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV).astype(np.float32) / 255.0
    ring = np.ones((THUMBNAIL, THUMBNAIL), bool)
    ring[RING:-RING, RING:-RING] = False
    grey = (hsv[..., 1] < GREY[0]) & (hsv[..., 2] > GREY[1])
    return float(grey[ring].mean())


class Router:
    """A studio and an everyday Predictor (binary car models) behind the Predictor calls predict.py
    and serve.py make: read, answer, warm_up, describe. See the module docstring for the choice."""

    def __init__(self, studio: Predictor, everyday: Predictor):
        for predictor in (studio, everyday):
            if predictor.spec.multiclass:
                raise ValueError(f"{predictor.name}: a car-parts model cannot be routed; give car/background models")
        self.studio, self.everyday = studio, everyday
        self.name = f"{studio.name}+{everyday.name}"

    @classmethod
    def from_checkpoints(cls, studio, everyday, device="cpu", precision="fp32", tta=False, threshold=None,
                         backend="torch") -> "Router":
        """Both models with the same options (see Predictor.from_checkpoint)."""
        return cls(*(Predictor.from_checkpoint(path, device, precision, tta, threshold, backend)
                     for path in (studio, everyday)))

    # What the callers read of a Predictor: the studio model's facts, as the first model asked.
    spec = property(lambda self: self.studio.spec)
    threshold = property(lambda self: self.studio.threshold)
    input_size = property(lambda self: self.studio.input_size)
    device = property(lambda self: self.studio.device)
    precision = property(lambda self: self.studio.precision)
    backend = property(lambda self: self.studio.backend)
    tta = property(lambda self: self.studio.tta)
    upsample, class_map = staticmethod(Predictor.upsample), staticmethod(Predictor.class_map)  # as every Predictor's

    def describe(self) -> str:
        return f"{self.studio.name} for studio photos, {self.everyday.name} for the others; {self.studio.describe()}"

    def models(self) -> list:
        """[{name, input_size}] of both models, studio first (for /api/health)."""
        return [{"name": p.name, "input_size": list(p.input_size)} for p in (self.studio, self.everyday)]

    def read(self, path):
        """One decode at both models' input sizes: ((studio image, everyday image), full (width, height)).

        A JPEG is decoded at the reduced scale that covers both sizes (images.load_image_sizes): for
        Carvana's 1918x1280 the scale the studio model alone reads (1/2), so its pixels are predict.py's
        with --checkpoint; elsewhere a finer one, area-averaged to the same size."""
        images, full_size = load_image_sizes(path, [self.studio.input_size, self.everyday.input_size])
        return tuple(images), full_size

    def warm_up(self):
        self.studio.warm_up()
        self.everyday.warm_up()

    def answer(self, images) -> list:
        """Photos as `read` gives them -> one inference.Answer per photo, from the model chosen for it."""
        answers = [None] * len(images)
        candidates = [i for i, (small, _) in enumerate(images) if backdrop_share(small) >= STUDIO_BACKDROP]
        if candidates:
            for i, answer in zip(candidates, self.studio.answer([images[i][0] for i in candidates])):
                if answer.quality >= STUDIO_QUALITY:
                    answers[i] = answer
        rest = [i for i, answer in enumerate(answers) if answer is None]
        if rest:
            for i, answer in zip(rest, self.everyday.answer([images[i][1] for i in rest])):
                answers[i] = answer
        return answers


def resolve_checkpoints(checkpoint: str) -> list:
    """The --checkpoint option of predict.py and serve.py as the model files to load: [it] when given;
    else the bundled studio and everyday models where both are installed; else [resolve_checkpoint('')]."""
    if not checkpoint and BUNDLED_CHECKPOINT.is_file() and BUNDLED_EVERYDAY_CHECKPOINT.is_file():
        return [str(BUNDLED_CHECKPOINT), str(BUNDLED_EVERYDAY_CHECKPOINT)]
    return [resolve_checkpoint(checkpoint)]


def load_predictor(checkpoints: list, device="cpu", precision="fp32", tta=False, threshold=None, backend="torch"):
    """A Predictor for one checkpoint, a Router for two (studio, everyday): see resolve_checkpoints."""
    if len(checkpoints) == 1:
        return Predictor.from_checkpoint(checkpoints[0], device, precision, tta, threshold, backend)
    return Router.from_checkpoints(*checkpoints, device, precision, tta, threshold, backend)
