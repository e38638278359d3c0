"""Cut cars out of photos in a web page and a REST API, on this machine and offline.

    python serve.py                    # then open http://127.0.0.1:8000/ (API docs at /docs)
    curl -F image=@car.jpg -F background=white -F format=jpeg http://127.0.0.1:8000/api/segment -o car_cut.jpg

The model is loaded once at start-up and warmed with one forward pass. Requests take turns on one
worker thread, which decodes, runs the model, composites and encodes one photo at a time: memory
holds one photo's arrays however many requests arrive (the network itself uses every core). At most
--max-queue requests wait behind the running one (more are answered 503) and a request unanswered
after --timeout seconds is answered 504. Answers are at the photo's own, EXIF-upright resolution.
"""
import asyncio
import base64
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import os
import re
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

import cutout
from backends import load_source
from config import VERSION, ServeConfig, parse_config, resolve_checkpoint
from dataset import DECODE_ERRORS, load_image
from inference import Predictor, car_mask
from labels import palette
from plots import parts_overlay

log = logging.getLogger("serve")
PAGE = Path(__file__).resolve().parent / "web" / "index.html"
CONFIG_ENV = "CARSEG_SERVE_CONFIG"  # the ServeConfig as JSON, for worker processes (--workers > 1)
JPEG_KINDS = ("JPEG", "MPO")  # MPO: the multi-picture JPEG many cameras and phones write
ACCEPTED = JPEG_KINDS + ("PNG", "WEBP")  # decoded formats accepted, by Pillow's name
FORM_ALLOWANCE = 64 * 1024  # bytes of multipart framing and form fields allowed on top of --max-upload-mb
WORKER_START_S = 300  # seconds a --workers process may take to start (an ONNX export on first use included)
BACKGROUND = re.compile(r"transparent|white|blur|#[0-9a-fA-F]{6}")


class ServeError(Exception):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Cancelled(Exception):
    """A job whose request has already been answered 504."""


@dataclasses.dataclass(frozen=True)
class Options:
    """One /api/segment request's checked form fields."""
    output: str
    format: str
    background: str
    threshold: float | None
    edges: str
    crop: bool


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


def decode(data: bytes, size=None) -> tuple:
    """Upload bytes -> (upright RGB uint8 (H, W, 3), at size=(w, h) if given; the upright full (W, H)).

    dataset.load_image, the decoding predict.py gives a file (a JPEG at a reduced DCT scale, then
    area-averaged), so the server's masks are predict.py's. ServeError 422 for a corrupt or truncated file.
    """
    upload = io.BytesIO(data)
    upload.name = "upload"  # what load_image's messages call it
    try:
        return load_image(upload, size)
    except ValueError as err:  # truncated or corrupt data shows up only when decoding
        raise ServeError(422, f"corrupt or truncated image: {err}") from None


def check_options(options: Options, multiclass: bool) -> Options:
    """The options, or ServeError 422 naming the one that cannot be honoured (Literal-typed fields
    are already checked by FastAPI)."""
    if not BACKGROUND.fullmatch(options.background):
        raise ServeError(422, f"background {options.background!r}: use transparent, white, blur or a colour #rrggbb")
    if options.output == "parts" and not multiclass:
        raise ServeError(422, "output parts needs a car-parts (multi-class) model; this server's model is "
                              "car/background: use mask, cutout or overlay")
    if options.output == "parts" and options.format != "png":
        raise ServeError(422, f"format {options.format}: output parts is a palette PNG of class indices; use png")
    if options.threshold is not None and multiclass:
        raise ServeError(422, "threshold applies to car/background models; this parts model takes each "
                              "pixel's most probable class")
    if options.format == "jpeg" and options.output == "cutout" and options.background == "transparent":
        raise ServeError(422, "jpeg has no alpha channel; choose a background or png/webp")
    return options


def download_name(filename: str | None, output: str, fmt: str) -> str:
    """A safe file name for Content-Disposition: the upload's stem in [A-Za-z0-9._-], at most 60
    characters (accents dropped, any folder part removed); never used as a path here."""
    stem = re.split(r"[/\\]", filename or "")[-1].rsplit(".", 1)[0]
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:60].rstrip("._-") or "image"
    return f"{stem}_{output}.{'jpg' if fmt == 'jpeg' else fmt}"


# ---------------------------------------------------------------- the model and its queue

class Segmenter:
    """The loaded model, what /api/health says about it, and the one thread all its work runs on."""

    def __init__(self, cfg: ServeConfig):
        path = resolve_checkpoint(cfg.checkpoint)
        source = load_source(path)
        self.predictor = Predictor.from_checkpoint(source, cfg.device, cfg.precision, cfg.tta, None,
                                                   backend=cfg.backend)
        spec = self.predictor.spec
        self.multiclass, self.colours = spec.multiclass, palette(len(spec.class_names))
        self.info = {"status": "ok", "model": Path(path).name, "arch": source["arch"],
                     "backend": self.predictor.backend, "precision": self.predictor.precision,
                     "device": str(self.predictor.device), "classes": list(spec.class_names),
                     "multiclass": spec.multiclass, "palette": ["#" + bytes(c).hex() for c in self.colours],
                     "input_size": list(spec.input_size), "threshold": None if spec.multiclass else spec.threshold,
                     "tta": cfg.tta, "max_upload_mb": cfg.max_upload_mb, "max_pixels": cfg.max_pixels,
                     "version": VERSION}
        self.max_waiting = cfg.max_queue
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.pending = 0  # accepted jobs not finished, the running one included; changed on the event loop only
        self.started = time.monotonic()
        self.executor.submit(self.warm_up).result()

    def warm_up(self):
        """One forward pass on a blank image, so the first request does not pay for the backend's set-up."""
        width, height = self.predictor.input_size
        self.predictor.probs(self.predictor.preprocess([np.zeros((height, width, 3), np.uint8)]))

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
        crop box or None)."""
        _stop_if(cancelled)  # it waited in the queue past its deadline: nobody is waiting for it any more
        small, full_size = decode(data, self.predictor.input_size)
        probs = self.predictor.probs(self.predictor.preprocess([small]))[0]
        _stop_if(cancelled)
        prob, labels = self.full_size_maps(probs, full_size)
        alpha = self.alpha(prob, labels, options)
        del probs, prob
        image = decode(data)[0] if options.output in ("cutout", "overlay") else None
        _stop_if(cancelled)
        box = cutout.crop_box(alpha) if options.crop else None
        if box is not None:
            x0, y0, x1, y1 = box
            alpha, labels, image = (None if a is None else a[y0:y1, x0:x1] for a in (alpha, labels, image))
        array, colours = self.render(options, alpha, labels, image)
        return cutout.encode(array, options.format, colours), (array.shape[1], array.shape[0]), box

    def full_size_maps(self, probs, full_size):
        """Model probabilities (C, h, w) -> the car probability float32 (H, W) at full_size=(W, H) and,
        for a parts model, the class map uint8 (H, W) (else None)."""
        if not self.multiclass:
            return Predictor.upsample(probs[:1], full_size).cpu().numpy(), None
        car = 1.0 - Predictor.upsample(probs[:1], full_size)  # channel 0 is the background
        return car.cpu().numpy(), Predictor.class_map(probs, full_size).to(torch.uint8).cpu().numpy()

    def alpha(self, prob, labels, options: Options) -> np.ndarray:
        """The car's alpha uint8 (H, W): a parts model's hard mask is its whole car (inference.car_mask,
        holes between parts filled), and its soft edges keep those holes opaque."""
        threshold = self.predictor.threshold if options.threshold is None else options.threshold
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


# ---------------------------------------------------------------- the application

SEGMENT_DOC = """Send one photo (multipart field `image`: JPEG, PNG or WebP); get back one image at the
photo's own, EXIF-upright resolution (or the crop of it), with headers X-Process-Time-Ms,
X-Image-Width, X-Image-Height (of the returned image), X-Crop-Box (x0,y0,x1,y1 in the photo, when
cropped) and Content-Disposition.

- output: `mask` (grey alpha: soft 0-255 or hard 0/255), `cutout` (the car over `background`),
  `overlay` (the photo with the car tinted, or its parts coloured), `parts` (palette PNG of class
  indices; car-parts models only).
- format: png, webp or jpeg. background (cutout only): transparent, white, blur or #rrggbb.
- threshold (0-1, car/background models): probability above which a pixel is car; default the model's.
- edges: soft (anti-aliased) or hard. crop: crop to the car plus a small margin.

Errors are JSON `{"detail": "..."}`: 413 upload or image too large, 415 not a JPEG/PNG/WebP, 422 bad
option or corrupt image, 503 busy, 504 timed out, 500 internal error."""


def create_app(cfg: ServeConfig, segmenter: Segmenter | None = None) -> FastAPI:
    """The web application; the model (unless `segmenter` is given) is loaded at start-up."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.segmenter = segmenter or Segmenter(cfg)
        log.info("serving %s (%s, %s %s on %s)", *(app.state.segmenter.info[k] for k in
                                                   ("model", "arch", "backend", "precision", "device")))
        yield
        app.state.segmenter.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Car cutout", version=VERSION, lifespan=lifespan,
                  description="Cut cars out of photos with this project's segmentation models, offline.")
    page = PAGE.read_text(encoding="utf-8")
    limit_mb = f"{cfg.max_upload_mb:g}"
    app.add_middleware(BodyLimit, limit=round(cfg.max_upload_mb * 2 ** 20) + FORM_ALLOWANCE,
                       detail=f"upload too large: the limit is {limit_mb} MB (--max-upload-mb)")
    app.add_middleware(RequestLog)
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, summary="The cutout web page", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": content_security_policy(page),
                                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/api/health", summary="The server and its model",
             description="status, model file name, arch, backend, precision, device, classes, multiclass, "
                         "palette (hex colour per class), input_size [w, h], version, uptime_s and the limits.")
    async def health(request: Request):
        return request.app.state.segmenter.health()

    app.post("/api/segment", summary="Cut the car out of one photo", description=SEGMENT_DOC,
             response_class=Response, responses={200: {"content": {t: {} for t in cutout.MEDIA_TYPES.values()}}},
             )(_segment_route(cfg))
    return app


def _segment_route(cfg: ServeConfig):
    """The /api/segment handler for this configuration."""
    async def segment(
            request: Request,
            image: Annotated[UploadFile | None, File(description="the photo: JPEG, PNG or WebP")] = None,
            output: Annotated[Literal["mask", "cutout", "overlay", "parts"], Form()] = "cutout",
            fmt: Annotated[Literal["png", "webp", "jpeg"], Form(alias="format")] = "png",
            background: Annotated[str, Form(description="transparent, white, blur or #rrggbb")] = "transparent",
            threshold: Annotated[float | None, Form(gt=0, lt=1, description="car/background models only")] = None,
            edges: Annotated[Literal["soft", "hard"], Form()] = "soft",
            crop: Annotated[bool, Form(description="crop to the car plus a small margin")] = False):
        started = time.monotonic()
        segmenter = request.app.state.segmenter
        data, filename = await read_upload(image)
        options = check_options(Options(output, fmt, background, threshold, edges, crop), segmenter.multiclass)
        probe(data, cfg.max_pixels)
        try:
            body, (width, height), box = await segmenter.run(data, options, started + cfg.timeout)
        except ServeError:
            raise
        except Exception:
            log.exception("segment failed")  # the traceback stays in the server's log
            raise ServeError(500, "internal error") from None
        headers = {"X-Process-Time-Ms": str(round(1000 * (time.monotonic() - started))),
                   "X-Image-Width": str(width), "X-Image-Height": str(height),
                   "Content-Disposition": f'inline; filename="{download_name(filename, output, fmt)}"',
                   "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if box is not None:
            headers["X-Crop-Box"] = ",".join(map(str, box))
        return Response(body, media_type=cutout.MEDIA_TYPES[fmt], headers=headers)
    return segment


async def read_upload(image: UploadFile | None) -> tuple:
    """(bytes, client file name) of the `image` field; ServeError 422 when it is missing or empty."""
    if image is None:
        raise ServeError(422, "image: missing; send the photo as the multipart form field 'image'")
    try:
        data = await image.read()
    finally:
        await image.close()
    if not data:
        raise ServeError(422, "image: the file is empty (0 bytes)")
    return data, image.filename


def _add_error_handlers(app: FastAPI):
    """Every error is JSON {"detail": "..."} naming the problem; never a traceback."""
    @app.exception_handler(ServeError)
    async def refused(request: Request, err: ServeError):
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = [f"{error['loc'][-1]}: {error['msg']}" for error in err.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def content_security_policy(page: str) -> str:
    """Nothing from anywhere but this server; the page's own inline <script> and <style> by hash."""
    def hashes(tag):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)
    return (f"default-src 'self'; script-src {hashes('script') or chr(39) + 'none' + chr(39)}; "
            f"style-src {hashes('style') or chr(39) + 'none' + chr(39)}; img-src 'self' blob:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ---------------------------------------------------------------- middleware

class TooLarge(HTTPException):
    """Raised while receiving a body over the limit; an HTTPException so FastAPI answers it as given."""


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, judged from Content-Length before reading any
    and by counting while receiving (chunked uploads), so an oversized body is never buffered."""

    def __init__(self, app, limit: int, detail: str):
        self.app, self.limit, self.detail = app, limit, detail

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise TooLarge(413, self.detail)
            return message

        async def watching_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, counting_receive, watching_send)
        except TooLarge:
            if started:
                raise
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)


class RequestLog:
    """ASGI middleware: one log line per request (method, path, status, milliseconds); no query, no body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, watching_send)
        finally:
            log.info("%s %s %d %.0f ms", scope["method"], ascii(scope["path"])[1:-1], status,
                     1000 * (time.perf_counter() - started))


# ---------------------------------------------------------------- running

def app_from_environment() -> FastAPI:
    """The app for a uvicorn worker process (--workers > 1), configured by $CARSEG_SERVE_CONFIG."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))


def serve(cfg: ServeConfig):
    """Load the model, then answer requests until interrupted (uvicorn)."""
    import uvicorn
    cfg = dataclasses.replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))
    common = {"host": cfg.host, "port": cfg.port, "log_config": None, "access_log": False}
    if cfg.workers == 1:
        uvicorn.run(create_app(cfg, Segmenter(cfg)), **common)
        return
    load_source(cfg.checkpoint)  # fail here, once, rather than in every worker
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:  # recent uvicorn only
        # A worker importing torch and loading the model answers no health check for a while: uvicorn's
        # default 5 s had slow laptops restart workers that were only starting.
        common["timeout_worker_healthcheck"] = WORKER_START_S
    uvicorn.run("serve:app_from_environment", factory=True, workers=cfg.workers, **common)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_config(ServeConfig, argv, description=__doc__.splitlines()[0])
    try:
        serve(cfg)
    except (OSError, ValueError) as err:  # no checkpoint, a backend this machine cannot run...
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
