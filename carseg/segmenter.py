"""The served model: one photo's upload checked, decoded, segmented, composited and encoded.

serve.py owns the web side (routes, limits on the request, error answers); this module owns what
happens to a photo once it has arrived. A `Segmenter` holds the model (loaded once, warmed) and the
one worker thread all photo work runs on, so memory holds one photo's arrays however many requests
wait, and requests that waited too long are dropped before they start.
"""
import asyncio
import dataclasses
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from carseg import cutout, runtime
from carseg.atomic import shown
from carseg.images import DECODE_ERRORS, encode, load_image
from carseg.labels import car_mask, palette
from carseg.plots import parts_overlay

JPEG_KINDS = ("JPEG", "MPO")  # MPO: the multi-picture JPEG many cameras and phones write
ACCEPTED = JPEG_KINDS + ("PNG", "WEBP")  # decoded formats accepted, by Pillow's name
LARGE_PHOTO = 12_000_000  # pixels; after a larger photo the freed memory is handed back to the kernel
BACKGROUND = re.compile(r"transparent|white|blur|#[0-9a-fA-F]{6}")
OUTPUTS = ("mask", "cutout", "overlay", "parts")


class ServeError(Exception):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Cancelled(Exception):
    """A job whose request has already been answered 504."""


def _boolean(value, handler):
    """crop's values: true or false, case-sensitive as every other option's values are (pydantic alone
    also took yes, on, 1, TRUE...: spellings the other options do not get)."""
    if isinstance(value, bool) or value in ("true", "false"):
        return handler(value == "true" if isinstance(value, str) else value)
    raise PydanticCustomError("boolean", "use true or false (lower case)")


def _threshold(value, handler):
    """threshold's value, or one message for every way of missing it (nan and inf included: pydantic
    said "Input should be less than 1" of nan)."""
    try:
        return handler(value)
    except ValidationError:
        given = value if not isinstance(value, str) or len(value) <= 20 else value[:20] + "..."
        raise PydanticCustomError("threshold", "must be a number between 0 and 1 (0 and 1 excluded); got {given}",
                                  {"given": repr(given)}) from None


@dataclasses.dataclass(frozen=True)
class Options:
    """One /api/segment request's options, named as on the wire (form fields or query parameters): their
    types, ranges and defaults, which serve.py validates against (pydantic) and documents in /docs."""
    output: Annotated[Literal["mask", "cutout", "overlay", "parts"], Field(
        description="mask (grey alpha), cutout (the car over background), overlay (the photo with the car "
                    "tinted or its parts coloured), parts (palette PNG of class indices; car-parts models)")] = "cutout"
    format: Annotated[Literal["png", "webp", "jpeg"], Field(description="the returned file's format")] = "png"
    background: Annotated[str, Field(description="cutout only: transparent, white, blur or #rrggbb")] = "transparent"
    threshold: Annotated[Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None, WrapValidator(_threshold),
                         Field(description="car/background models only (mask, cutout, overlay): probability above "
                                           "which a pixel is car; default the model's")] = None
    edges: Annotated[Literal["soft", "hard"], Field(description="the mask's edge, soft (anti-aliased) or hard: mask "
                                                    "and cutout, and overlay on car/background models")] = "soft"
    crop: Annotated[bool, WrapValidator(_boolean), Field(description="true or false: crop to the car plus a small "
                                                         "margin (every output)")] = False


# ---------------------------------------------------------------- decoding uploads

def probe(data: bytes, max_pixels: int):
    """Refuse an upload from its header alone, before any pixel is decoded: ServeError 415 for anything
    but a JPEG, PNG or WebP (by content, not by name), 413 beyond max_pixels, 422 for a broken header."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind, (width, height) = img.format, img.size
    except Image.DecompressionBombError:
        raise ServeError(413, f"image has too many pixels; the limit is {max_pixels}")
    except UnidentifiedImageError:
        raise ServeError(415, "not an image this server reads: send a JPEG, PNG or WebP")
    except DECODE_ERRORS as err:
        raise ServeError(422, f"corrupt image header: {err}")
    if kind not in ACCEPTED:
        raise ServeError(415, f"{kind} images are not accepted: send a JPEG, PNG or WebP")
    if width * height > max_pixels:
        raise ServeError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


def decode(data: bytes, read=load_image) -> tuple:
    """Upload bytes -> read(file) (default: (upright RGB uint8 (H, W, 3), the upright full (W, H))).

    read: the model's Predictor.read (or a Router's), the decoding predict.py gives a file (a JPEG at a
    reduced DCT scale, then area-averaged), so the server's masks are predict.py's. ServeError 422 for
    a corrupt or truncated file.
    """
    upload = io.BytesIO(data)
    upload.name = "upload"  # what load_image's messages call it
    try:
        return read(upload)
    except ValueError as err:  # truncated or corrupt data shows up only when decoding
        raise ServeError(422, f"corrupt or truncated image: {err}") from None


def check_options(options: Options, multiclass: bool) -> Options:
    """The options, or ServeError 422 naming the one that cannot be honoured (each one's type and range
    are already checked by serve.py): an option given a value other than its default where it changes
    nothing (background on a mask...) is refused, never ignored; at its default it passes with any
    output, since /docs' "Try it out" and the page send every field they show."""
    if not BACKGROUND.fullmatch(options.background):
        shown = options.background if len(options.background) <= 40 else options.background[:40] + "..."
        raise ServeError(422, f"background {shown!r}: use transparent, white, blur or a colour #rrggbb")
    if options.output == "parts" and not multiclass:
        raise ServeError(422, "output parts needs a car-parts (multi-class) model; this server's model is "
                              "car/background: use mask, cutout or overlay")
    if options.output == "parts" and options.format != "png":
        raise ServeError(422, f"format {options.format}: output parts is a palette PNG of class indices; use png")
    if options.threshold is not None and options.output not in outputs_changed_by("threshold", multiclass):
        raise ServeError(422, "threshold applies to car/background models; this parts model takes each "
                              "pixel's most probable class: leave threshold out")
    defaults = Options()
    for name in ("background", "edges"):
        value = getattr(options, name)
        if value != getattr(defaults, name) and options.output not in outputs_changed_by(name, multiclass):
            raise ServeError(422, not_applied(name, value, options.output, multiclass, getattr(defaults, name)))
    if options.format == "jpeg" and options.output == "cutout" and options.background == "transparent":
        raise ServeError(422, "jpeg has no alpha channel; choose a background or png/webp")
    return options


def outputs_changed_by(name: str, multiclass: bool) -> tuple:
    """The outputs whose answer an option changes, for a car-parts model or a car/background one."""
    if name == "background":
        return ("cutout",)
    if name == "edges":  # a parts model's overlay and parts draw its class map, which has no soft edge
        return ("mask", "cutout") if multiclass else ("mask", "cutout", "overlay")
    if name == "threshold":
        return () if multiclass else ("mask", "cutout", "overlay")
    return OUTPUTS  # output, format (parts: png only) and crop (every answer is cropped to the car)


def not_applied(name: str, value, output: str, multiclass: bool, default) -> str:
    """Why `name`'s value is refused with this output, and where it does apply."""
    outputs = outputs_changed_by(name, multiclass)
    where = " and ".join(filter(None, (", ".join(outputs[:-1]), outputs[-1])))
    parts_model = " with this car-parts model (its overlay and parts draw the class map)"
    return (f"{name} {value}: applies to output {where} only{parts_model if multiclass and name == 'edges' else ''}, "
            f"not to output {output}; leave {name} out or give its default, {default}")


# ---------------------------------------------------------------- the model and its queue

class Segmenter:
    """The loaded model, what /api/health says about it, and the one thread all its work runs on.

    predictor: an inference.Predictor, or a router.Router choosing one of two per photo (serve.py
    builds it from the checkpoints); about: what health
    reports besides the model's own facts (its file name, architecture, the limits, the version);
    max_queue: requests that may wait behind the running one before more are answered 503.
    """

    def __init__(self, predictor, about: dict, max_queue: int, quality_flag: float = 0.5):
        self.predictor = predictor
        spec = predictor.spec
        self.multiclass, self.colours = spec.multiclass, palette(len(spec.class_names))
        self.info = {"status": "ok", **about, "backend": predictor.backend, "precision": predictor.precision,
                     "device": str(predictor.device), "classes": [shown(name) for name in spec.class_names],
                     "multiclass": spec.multiclass, "palette": ["#" + bytes(c).hex() for c in self.colours],
                     "input_size": list(spec.input_size), "threshold": None if spec.multiclass else spec.threshold,
                     "tta": predictor.tta, "quality_flag": quality_flag}
        if hasattr(predictor, "models"):  # a Router: both models, each photo answered by one
            self.info["models"] = predictor.models()
        self.max_waiting = max_queue
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.pending = 0  # accepted jobs not finished, the running one included; changed on the event loop only
        self.started = time.monotonic()
        self.executor.submit(self.warm_up).result()

    def warm_up(self):
        """One forward pass on a blank image (per model), so the first request does not pay for the backend's set-up."""
        self.predictor.warm_up()

    def health(self) -> dict:
        return {**self.info, "uptime_s": round(time.monotonic() - self.started, 1)}

    async def run(self, data: bytes, options: Options, deadline: float):
        """segment() on the model's thread: ServeError 503 when max_queue requests already wait,
        504 at `deadline` (time.monotonic()), after which the job stops at its next step."""
        if self.pending > self.max_waiting:
            raise ServeError(503, f"busy: {self.pending} requests are ahead of this one; try again shortly")
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self.executor, self.segment, data, options, cancelled)
        self.pending += 1
        future.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ServeError(504, "timed out: the server is overloaded or the photo too large; try again "
                                  "or send a smaller photo") from None
        finally:
            if not future.done():
                cancelled.set()

    def _finished(self, future):
        self.pending -= 1
        if not future.cancelled():
            future.exception()  # retrieved here, so a timed-out job's Cancelled is not logged as unhandled

    def segment(self, data: bytes, options: Options, cancelled: threading.Event):
        """One request's answer, on the model's thread: (file bytes, (width, height) of the image in it,
        crop box or None, the inference.Answer's quality score, the name of the model that answered)."""
        _stop_if(cancelled)  # it waited in the queue past its deadline: nobody is waiting for it any more
        small, full_size = decode(data, self.predictor.read)
        answer = self.predictor.answer([small])[0]
        _stop_if(cancelled)
        prob, labels = self.full_size_maps(answer.probs, full_size)
        alpha = self.alpha(prob, labels, options, answer.threshold)
        del prob
        image = decode(data)[0] if options.output in ("cutout", "overlay") else None
        _stop_if(cancelled)
        box = cutout.crop_box(alpha) if options.crop else None
        if box is not None:
            x0, y0, x1, y1 = box
            alpha, labels, image = (None if a is None else a[y0:y1, x0:x1] for a in (alpha, labels, image))
        array, colours = self.render(options, alpha, labels, image)
        body, size = encode(array, options.format, colours), (array.shape[1], array.shape[0])
        del small, alpha, labels, image, array
        if full_size[0] * full_size[1] > LARGE_PHOTO:
            runtime.release_freed_memory()  # else the process keeps the largest photo's arrays resident for good
        return body, size, box, answer.quality, answer.model

    def full_size_maps(self, probs, full_size):
        """Model probabilities (C, h, w) -> the car probability float32 (H, W) at full_size=(W, H) and,
        for a parts model, the class map uint8 (H, W) (else None)."""
        if not self.multiclass:
            return self.predictor.upsample(probs[:1], full_size).cpu().numpy(), None
        car = 1.0 - self.predictor.upsample(probs[:1], full_size)  # channel 0 is the background
        return car.cpu().numpy(), self.predictor.class_map(probs, full_size).to(torch.uint8).cpu().numpy()

    def alpha(self, prob, labels, options: Options, threshold: float) -> np.ndarray:
        """The car's alpha uint8 (H, W): a parts model's hard mask is its whole car (labels.car_mask,
        holes between parts filled), and its soft edges keep those holes opaque. threshold: the answering
        model's, unless the request gives one."""
        threshold = threshold if options.threshold is None else options.threshold
        if labels is None:
            return cutout.soft_alpha(prob, threshold) if options.edges == "soft" else cutout.hard_alpha(prob, threshold)
        whole = car_mask(labels)
        if options.edges == "hard":
            return whole
        return cutout.soft_alpha(prob, 0.5, opaque=(whole > 0) & (labels == 0))

    def render(self, options: Options, alpha, labels, image):
        """The output's pixels and, for a palette image, its colours: (array, colours or None)."""
        if options.output == "mask":
            return alpha, None
        if options.output == "parts":
            return labels, self.colours
        if options.output == "overlay":
            return (parts_overlay(image, labels, self.colours) if self.multiclass else cutout.tint(image, alpha)), None
        if options.background == "transparent":
            return cutout.composite(image, alpha), None
        if options.background == "blur":
            return cutout.composite(image, alpha, cutout.blurred_background(image, alpha)), None
        colour = cutout.WHITE if options.background == "white" else tuple(bytes.fromhex(options.background[1:]))
        return cutout.composite(image, alpha, colour), None


def _stop_if(cancelled: threading.Event):
    if cancelled.is_set():
        raise Cancelled("the request timed out")
