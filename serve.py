"""Cut cars out of photos in a web page and a REST API, on this machine and offline.

    python serve.py                    # then open http://127.0.0.1:8000/ (API docs at /docs)
    curl -F image=@car.jpg -F background=white -F format=jpeg http://127.0.0.1:8000/api/segment -o car_cut.jpg

The model is loaded once at start-up and warmed with one forward pass. Requests take turns on one
worker thread, which decodes, runs the model, composites and encodes one photo at a time: memory
holds one photo's arrays however many requests arrive (the network itself uses every core). At most
--max-queue requests wait behind the running one (more are answered 503) and a request unanswered
after --timeout seconds is answered 504. Answers are at the photo's own, EXIF-upright resolution.
"""
import base64
import dataclasses
import difflib
import errno
import hashlib
import inspect
import ipaddress
import json
import logging
import os
import re
import socket
import time
import unicodedata
from contextlib import asynccontextmanager
from pathlib import Path

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi_offline import FastAPIOffline
    from pydantic import TypeAdapter, ValidationError
    from starlette.datastructures import FormData, QueryParams, UploadFile
except ModuleNotFoundError as missing:  # the base install (requirements.txt) has no web application
    raise SystemExit(f"serve.py needs {missing.name}, which the base install leaves out: "
                     "pip install -r requirements-deploy.txt") from None

from carseg import images
from carseg.atomic import shown
from backends import load_source
from config import QUALITY_FLAG, VERSION, ServeConfig, parse_config
from carseg.segmenter import Options, Segmenter, ServeError, check_options, probe
from inference import Predictor
from router import Router, resolve_checkpoints

log = logging.getLogger("serve")
PAGE = Path(__file__).resolve().parent / "web" / "index.html"
CONFIG_ENV = "CARSEG_SERVE_CONFIG"  # the ServeConfig as JSON, for worker processes (--workers > 1)
FORM_ALLOWANCE = 64 * 1024  # bytes of multipart framing and form fields allowed on top of --max-upload-mb
WORKER_START_S = 300  # seconds a --workers process may take to start (an ONNX export on first use included)
OPTIONS = TypeAdapter(Options)  # validates /api/segment's options as FastAPI would have (same messages)
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(Options))
FIELDS = ("image",) + OPTION_NAMES  # everything /api/segment reads; anything else is refused
NOT_A_FILE = "image: send the photo as a file (multipart form field 'image' with a file name)"


def download_name(filename: str | None, output: str, fmt: str) -> str:
    """A safe file name for Content-Disposition: the upload's stem in [A-Za-z0-9._-], at most 60
    characters (accents dropped, any folder part removed); never used as a path here."""
    stem = re.split(r"[/\\]", filename or "")[-1].rsplit(".", 1)[0]
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:60].rstrip("._-") or "image"
    return f"{stem}_{output}.{'jpg' if fmt == 'jpeg' else fmt}"


# ---------------------------------------------------------------- the application

SEGMENT_DOC = """Send one photo (multipart field `image`: JPEG, PNG or WebP); get back one image at the
photo's own, EXIF-upright resolution (or the crop of it), with headers X-Process-Time-Ms,
X-Image-Width, X-Image-Height (of the returned image), X-Crop-Box (x0,y0,x1,y1 in the photo, when
cropped), X-Quality (the answer's quality score, 0-1: below /api/health's quality_flag the cutout
deserves a look; docs/everyday.md), X-Model (the model that answered: with the bundled pair, the
studio or the everyday model, chosen per photo) and Content-Disposition.

- output: `mask` (grey alpha: soft 0-255 or hard 0/255), `cutout` (the car over `background`),
  `overlay` (the photo with the car tinted, or its parts coloured), `parts` (palette PNG of class
  indices; car-parts models only).
- format: png, webp or jpeg (parts: png).
- background (cutout only): transparent, white, blur or #rrggbb.
- threshold (car/background models: mask, cutout, overlay): a number between 0 and 1, the probability
  above which a pixel is car; default the model's.
- edges (mask and cutout; overlay too on car/background models): soft (anti-aliased) or hard.
- crop (every output): `true` or `false`, crop to the car plus a small margin.

Each option may be given as a form field (`-F output=mask`, as listed below) or as a query parameter
(`/api/segment?output=mask`), with the same values. Names and values are case-sensitive; crop is
`true` or `false` (not `True`, `yes` or `1`). An unknown option, one given twice, in both places,
empty or as a file is refused with 422 naming it, never ignored; so is an option given a value other
than its default where it changes nothing (`background=white` with `output=mask`). At its default,
any option passes with any output.

Errors are JSON `{"detail": "..."}`: 413 upload or image too large, 415 not a JPEG/PNG/WebP, 422 bad
option or corrupt image, 503 busy, 504 timed out, 500 internal error."""


def load_segmenter(cfg: ServeConfig) -> Segmenter:
    """The checkpoint's model loaded (once) and warmed, on its worker thread, for these options."""
    paths = resolve_checkpoints(cfg.checkpoint)
    sources = [load_source(path) for path in paths]
    predictors = [Predictor.from_checkpoint(source, cfg.device, cfg.precision, cfg.tta, None, cfg.backend, Path(path).stem)
                  for source, path in zip(sources, paths)]
    predictor = predictors[0] if len(predictors) == 1 else Router(*predictors)
    # shown(): a file name's bytes that are not UTF-8 would make every /api/health answer a 500.
    about = {"model": " + ".join(shown(Path(path).name) for path in paths),
             "arch": " + ".join(shown(source["arch"]) for source in sources), "max_upload_mb": cfg.max_upload_mb,
             "max_pixels": cfg.max_pixels, "version": VERSION}
    return Segmenter(predictor, about, cfg.max_queue, QUALITY_FLAG)


def create_app(cfg: ServeConfig, segmenter: Segmenter | None = None) -> FastAPI:
    """The web application; the model (unless `segmenter` is given) is loaded at start-up."""
    docs = segment_openapi()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.segmenter = segmenter or load_segmenter(cfg)
        document_threshold(docs, app.state.segmenter.info["threshold"])
        log.info("serving %s (%s, %s %s on %s)", *(app.state.segmenter.info[k] for k in
                                                   ("model", "arch", "backend", "precision", "device")))
        yield
        app.state.segmenter.executor.shutdown(wait=False, cancel_futures=True)

    # fastapi-offline: /docs and /redoc with Swagger UI and ReDoc served from the package, not a CDN.
    app = FastAPIOffline(title="Car cutout", version=VERSION, lifespan=lifespan,
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
             response_class=Response, responses={200: {"content": {t: {} for t in images.MEDIA_TYPES.values()}}},
             openapi_extra=docs)(_segment_route(cfg))
    return app


def _segment_route(cfg: ServeConfig):
    """The /api/segment handler for this configuration."""
    # The handler reads the form and the query string itself: FastAPI's own parameters would let the
    # last of a repeated field win, ignore unknown ones and read an option from one place only.
    async def segment(request: Request):
        started = time.monotonic()
        segmenter = request.app.state.segmenter
        async with request.form() as form:  # closes every uploaded file on the way out
            values = option_values(form, request.query_params)
            options = check_options(validated(values), segmenter.multiclass)
            data, filename = await read_upload(form.getlist("image"))
        probe(data, cfg.max_pixels)
        try:
            body, (width, height), box, quality, model = await segmenter.run(data, options, started + cfg.timeout)
        except ServeError:
            raise
        except Exception:
            log.exception("segment failed")  # the traceback stays in the server's log
            raise ServeError(500, "internal error") from None
        name = download_name(filename, options.output, options.format)
        headers = {"X-Process-Time-Ms": str(round(1000 * (time.monotonic() - started))),
                   "X-Image-Width": str(width), "X-Image-Height": str(height),
                   "X-Quality": f"{quality:.4f}", "X-Model": shown(model),
                   "Content-Disposition": f'inline; filename="{name}"',
                   "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if box is not None:
            headers["X-Crop-Box"] = ",".join(map(str, box))
        return Response(body, media_type=images.MEDIA_TYPES[options.format], headers=headers)
    return segment


def option_values(form: FormData, query: QueryParams) -> dict:
    """{name: text} of the options given as form fields or query parameters; ServeError 422 naming one
    that is unknown, given twice or in both places, empty, or a file (never a silent choice or default)."""
    values = {}
    for place, items in (("the query string", query.multi_items()), ("the form", form.multi_items())):
        seen = set()
        for name, value in items:
            if name == "image" and place == "the form":
                continue  # the photo: read_upload's
            check_name(name, place)
            if name in seen:
                raise ServeError(422, f"{name}: given more than once in {place}; give each option once")
            if name in values:
                raise ServeError(422, f"{name}: given both in the query string and in the form; give it once")
            if not isinstance(value, str):
                raise ServeError(422, f"{name}: a file was sent; send the option as text")
            if not value:
                raise ServeError(422, f"{name}: empty; give a value or leave {name} out for its default")
            seen.add(name)
            values[name] = value
    return values


def check_name(name: str, place: str):
    """ServeError 422 unless `name` is an option (`image` only as a form field), suggesting the closest one."""
    if name == "image" and place == "the query string":
        raise ServeError(422, NOT_A_FILE + ", not in the query string")
    if name in OPTION_NAMES:
        return
    shown = name if re.fullmatch(r"[\w.-]{1,40}", name) else repr(name[:40] + ("..." if len(name) > 40 else ""))
    # Names are case-sensitive (as form field names are): `Output` is refused, not a second spelling.
    close = [f for f in FIELDS if f.lower() == name.lower()] or difflib.get_close_matches(name, FIELDS, 1)
    guess = f"did you mean {close[0]}? " if close else ""
    raise ServeError(422, f"{shown}: unknown option in {place}; {guess}valid: {', '.join(FIELDS)}")


def validated(values: dict) -> Options:
    """The options' values checked for type and range (in the words of FastAPI's own validation);
    the ones not given take their defaults."""
    try:
        return OPTIONS.validate_python(values)
    except ValidationError as err:
        raise ServeError(422, "; ".join(_problem(error) for error in err.errors())) from None


async def read_upload(images: list) -> tuple:
    """(bytes, client file name) of the one `image` field; ServeError 422 when it is missing, repeated,
    not a file or empty."""
    if not images:
        raise ServeError(422, "image: missing; send the photo as the multipart form field 'image'")
    if len(images) > 1:  # else one of them would silently be the photo
        raise ServeError(422, "image: send one photo per request")
    image = images[0]
    if not isinstance(image, UploadFile):  # a text field, or a file part without a file name
        raise ServeError(422, NOT_A_FILE)
    data = await image.read()
    if not data:
        raise ServeError(422, "image: the file is empty (0 bytes)")
    return data, image.filename


def segment_openapi() -> dict:
    """/api/segment's fields for /docs, which FastAPI cannot see in a handler that reads them itself.
    The options are listed once, as form fields: Swagger UI's "Try it out" sends every form field it
    shows, so options listed as query parameters too would only ever clash (SEGMENT_DOC says both work)."""
    options = {}
    for name, schema in OPTIONS.json_schema()["properties"].items():
        schema = next((s for s in schema.pop("anyOf", []) if s.get("type") != "null"), {}) | schema
        if schema.get("default", "") is None:  # threshold: absent means the model's (document_threshold)
            del schema["default"]
        options[name] = schema
    form = {"image": {"type": "string", "format": "binary", "description": "the photo: JPEG, PNG or WebP"}, **options}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["image"], "properties": form}}}}}


def document_threshold(docs: dict, threshold: float | None):
    """Show the served model's threshold as the default in /docs, where "Try it out" sends every form
    field shown, empty ones included (refused): a car/background model's own threshold gives the answer
    of sending none; a parts model takes none, so the field is not shown."""
    fields = docs["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    if threshold is None:
        fields.pop("threshold", None)
    else:
        fields["threshold"]["default"] = threshold


def _add_error_handlers(app: FastAPI):
    """Every error is JSON {"detail": "..."} naming the problem; never a traceback."""
    @app.exception_handler(ServeError)
    async def refused(request: Request, err: ServeError):
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = [_problem(error) for error in err.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def _problem(error: dict) -> str:
    """One validation error (FastAPI's, or validated()'s) in the API's words (not pydantic's class names)."""
    return f"{error['loc'][-1]}: {error['msg']}"


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


def listen_addresses(host: str, port: int) -> list:
    """The addresses uvicorn will listen on for --host/--port, each found free by binding it as uvicorn
    will (SO_REUSEADDR; IPv6 sockets IPv6 only), so that a port in use is said before the model loads
    rather than after. ValueError for an empty host (asyncio's "every address": 0.0.0.0 and ::), a
    host that is no address of this machine, or a port in use."""
    if not host.strip():
        raise ValueError("--host is empty, which would listen on every address (0.0.0.0 and ::): give "
                         "127.0.0.1 (this machine only, the default), or 0.0.0.0 to be reached from other machines")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: not an address this machine can listen on ({err.strerror})") from None
    addresses = []
    for family, kind, proto, _, address in dict.fromkeys(found):  # each once: getaddrinfo may repeat one
        with socket.socket(family, kind, proto) as probe_socket:
            probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe_socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe_socket.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ValueError(f"--port {port} is in use; choose another with --port") from None
                raise ValueError(f"cannot listen on --host {host} --port {port}: {err.strerror}") from None
        addresses.append(address[0])
    return addresses


def warn_if_reachable(host: str, addresses: list):
    """A warning in the log when the server listens on more than this machine's loopback."""
    outside = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if outside:
        where = ", ".join("every address" if ipaddress.ip_address(a.split("%")[0]).is_unspecified else a
                          for a in outside)
        log.warning("--host %s listens on %s: the page and the API (which ask for no password) can be reached "
                    "from other machines, not only this one; --host 127.0.0.1 keeps them to this machine", host, where)


def serve(cfg: ServeConfig):
    """Load the model, then answer requests until interrupted (uvicorn)."""
    import uvicorn
    warn_if_reachable(cfg.host, listen_addresses(cfg.host, cfg.port))  # before the model's seconds of loading
    paths = resolve_checkpoints(cfg.checkpoint)
    if len(paths) == 1:  # the newest run's best.pt, fixed now, so every worker serves the same model
        cfg = dataclasses.replace(cfg, checkpoint=paths[0])
    common = {"host": cfg.host, "port": cfg.port, "log_config": None, "access_log": False}
    try:
        if cfg.workers == 1:
            uvicorn.run(create_app(cfg, load_segmenter(cfg)), **common)
            return
        for path in paths:
            load_source(path)  # fail here, once, rather than in every worker
        os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))
        if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:  # recent uvicorn only
            # A worker importing torch and loading the model answers no health check for a while: uvicorn's
            # default 5 s had slow laptops restart workers that were only starting.
            common["timeout_worker_healthcheck"] = WORKER_START_S
        uvicorn.run("serve:app_from_environment", factory=True, workers=cfg.workers, **common)
    except SystemExit as stop:
        if stop.code == uvicorn.config.STARTUP_FAILURE:  # its own exit 3, after logging why (the port taken since...)
            raise ValueError(f"the server did not start on --host {cfg.host} --port {cfg.port}: the error above "
                             "says why") from None
        raise


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_config(ServeConfig, argv, description=__doc__.splitlines()[0])
    try:
        serve(cfg)
    except (OSError, ValueError) as err:  # no checkpoint, a backend this machine cannot run, a port in use...
        raise SystemExit(f"error: {shown(err)}")


if __name__ == "__main__":
    main()
