"""Protects serve.py and carseg/cutout.py: each output at the photo's own size, mode and values (the same masks
as predict.py's), options read alike from the form and the query string (unknown, repeated, conflicting,
empty ones refused), each refusal with its status and message, safe file names, /api/health, each answer's
quality score and answering model (one model, or the studio/everyday pair behind a router.Router), concurrent
requests, the busy and timeout answers, and an offline page under a strict Content-Security-Policy."""
import base64
import hashlib
import io
import itertools
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from carseg import cutout, images, segmenter
import router
import serve
from config import QUALITY_FLAG, VERSION, ServeConfig
from inference import Predictor
from carseg.labels import car_mask
from carseg.labels import palette
from model import UNet
from carseg.checkpoint import checkpoint_for, save_checkpoint

PARTS = ["background", "left_door", "right_door", "wheel"]
SAFE_NAME = re.compile(r'inline; filename="[A-Za-z0-9._-]{1,80}"')


# ---------------------------------------------------------------- synthetic photos and models

def car_photo(size=(96, 64)):
    """A drawn car (red body and cabin, grey windows, black wheels) on a light studio background:
    (RGB uint8 (H, W, 3), its silhouette bool (H, W)). The bundled model finds it with IoU ~0.99."""
    w, h = size
    photo, silhouette = Image.new("RGB", size, (236, 236, 240)), Image.new("L", size, 0)
    draw, shape = ImageDraw.Draw(photo), ImageDraw.Draw(silhouette)
    for canvas, fill in ((draw, (150, 20, 30)), (shape, 255)):
        canvas.rounded_rectangle((0.12 * w, 0.45 * h, 0.88 * w, 0.72 * h), radius=int(0.06 * h), fill=fill)
        canvas.polygon([(0.3 * w, 0.46 * h), (0.38 * w, 0.3 * h), (0.62 * w, 0.3 * h), (0.72 * w, 0.46 * h)], fill=fill)
    draw.polygon([(0.33 * w, 0.45 * h), (0.4 * w, 0.33 * h), (0.6 * w, 0.33 * h), (0.68 * w, 0.45 * h)], fill=(60, 70, 80))
    for cx in (0.28, 0.72):
        wheel = (cx * w - 0.098 * h, 0.62 * h, cx * w + 0.098 * h, 0.816 * h)
        draw.ellipse(wheel, fill=(25, 25, 25))
        shape.ellipse(wheel, fill=255)
    return np.asarray(photo), np.asarray(silhouette) > 0


def encoded(array, fmt="PNG", exif_orientation=None, **options) -> bytes:
    """An image file's bytes; with exif_orientation, a JPEG stored as given with that EXIF tag."""
    buffer = io.BytesIO()
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A 60-byte PNG claiming width x height pixels: its header and a few bytes of pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(bytes(16))) + chunk(b"IEND", b"")


def tiny_checkpoint(path: Path, class_names=None, threshold=0.5) -> Path:
    """A randomly initialised 4-channel U-Net at 64x48 (binary, or one channel per class)."""
    torch.manual_seed(3)
    model = UNet(out_channels=len(class_names) if class_names else 1, base_channels=4, depth=2)
    extra = {"class_names": class_names} if class_names else {}
    save_checkpoint(path, checkpoint_for(model, {"image_width": 64, "image_height": 48, "threshold": threshold}, **extra))
    return path


def config(checkpoint, **overrides) -> ServeConfig:
    values = {"checkpoint": str(checkpoint), "backend": "torch", "device": "cpu", "precision": "fp32",
              "max_upload_mb": 0.25, "max_pixels": 1_000_000, "timeout": 30.0, "max_queue": 16}
    return ServeConfig(**{**values, **overrides})


def post(client, data, name="car.png", **fields):
    return client.post("/api/segment", files={"image": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def image_of(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    return {"binary": tiny_checkpoint(tmp / "tiny.pt"), "parts": tiny_checkpoint(tmp / "parts.pt", PARTS)}


@pytest.fixture(scope="module")
def client(checkpoints):
    with TestClient(serve.create_app(config(checkpoints["binary"]))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def parts_client(checkpoints):
    with TestClient(serve.create_app(config(checkpoints["parts"]))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    """The upload used against the tiny models: an EXIF-rotated JPEG stored 96x64, upright 64x96."""
    path = tmp_path_factory.mktemp("photo") / "car.jpg"
    path.write_bytes(encoded(car_photo()[0], "JPEG", exif_orientation=6, quality=95))
    return path


def reference(checkpoint, photo_file):
    """What predict.py computes for the photo: (car probability float32 (H, W), hard mask, class map)."""
    predictor = Predictor.from_checkpoint(str(checkpoint), "cpu", "fp32", backend="torch")
    image, size = predictor.read(photo_file)
    probs = predictor.probs(predictor.preprocess([image]))[0]
    car = Predictor.upsample(probs[:1], size).numpy()
    labels = predictor.predict_labels([photo_file])[0] if predictor.spec.multiclass else None
    return (1 - car if labels is not None else car), predictor.predict([photo_file])[0], labels


# ---------------------------------------------------------------- cutout.py on hand-made arrays

def test_soft_alpha_ramps_around_the_threshold_and_hard_alpha_thresholds():
    prob = np.array([[0.0, 0.25, 0.4999, 0.5, 0.6, 0.75, 1.0]], np.float32)
    assert cutout.soft_alpha(prob, 0.5).tolist() == [[0, 0, 127, 128, 179, 255, 255]]
    assert cutout.hard_alpha(prob, 0.5).tolist() == [[0, 0, 0, 0, 255, 255, 255]]
    opaque = np.zeros_like(prob, bool)
    opaque[0, 0] = True
    assert cutout.soft_alpha(prob, 0.5, opaque)[0, 0] == 255


def test_composite_keeps_the_car_drops_the_background_and_refills_edge_colours():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:] = (0, 0, 255)          # blue background
    image[:, :15] = (255, 0, 0)     # red car on the left
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, :15] = 255
    alpha[:, 15] = 128              # an edge column, photographed as a red/blue mix
    image[:, 15] = (128, 0, 127)
    rgba = cutout.composite(image, alpha)
    assert rgba.shape == (20, 30, 4) and np.array_equal(rgba[..., 3], alpha)
    assert np.array_equal(rgba[:, :15, :3], image[:, :15]) and not rgba[:, 16:].any()
    assert (rgba[:, 15, 0] > 200).all() and (rgba[:, 15, 2] < 60).all()  # the car's red, not the blue mix
    white = cutout.composite(image, alpha, cutout.WHITE)
    assert white.shape == (20, 30, 3) and (white[:, 16:] == 255).all()
    assert np.array_equal(white[:, :15], image[:, :15])


def test_strips_give_the_whole_photos_answer(monkeypatch):
    image, silhouette = car_photo((120, 90))
    alpha = cv2.GaussianBlur(silhouette.astype(np.uint8) * 255, (5, 5), 0)
    whole = [cutout.composite(image, alpha), cutout.composite(image, alpha, (9, 99, 199)), cutout.tint(image, alpha)]
    monkeypatch.setattr(cutout, "STRIP_ROWS", 7)
    strips = [cutout.composite(image, alpha), cutout.composite(image, alpha, (9, 99, 199)), cutout.tint(image, alpha)]
    assert all(np.array_equal(a, b) for a, b in zip(whole, strips))


def test_crop_box_is_the_car_plus_a_margin_inside_the_photo():
    alpha = np.zeros((100, 200), np.uint8)
    alpha[40:60, 50:150] = 200
    alpha[10, 10] = 127  # not car: under 128
    assert cutout.crop_box(alpha) == (47, 37, 153, 63)  # 3 % of 100 px = 3 px around
    alpha[:5, 195:] = 255
    assert cutout.crop_box(alpha) == (46, 0, 200, 64)  # now 150 px wide: 4 px around, cut at the edges
    assert cutout.crop_box(np.zeros((4, 4), np.uint8)) is None


def test_the_blurred_background_leaves_the_car_out_of_its_blur():
    image = np.full((200, 300, 3), 250, np.uint8)
    image[60:140, 100:200] = 0
    alpha = np.zeros((200, 300), np.uint8)
    alpha[60:140, 100:200] = 255
    background = cutout.blurred_background(image, alpha)
    assert background.shape == image.shape
    assert background[100, 95].min() >= 240  # beside the black car: still the white wall, no dark glow
    assert cv2.GaussianBlur(image, (0, 0), 12)[100, 95].min() < 200  # where a plain blur would smear it


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_encode_writes_each_format_at_its_size(fmt):
    grey, rgb = np.arange(60, dtype=np.uint8).reshape(6, 10), np.full((6, 10, 3), 77, np.uint8)
    mask = Image.open(io.BytesIO(images.encode(grey, fmt)))
    assert mask.format == fmt.upper() and mask.size == (10, 6)
    if fmt != "jpeg":  # lossless: values kept (WebP stores grey as RGB)
        assert np.array_equal(np.asarray(mask.convert("L")), grey)
    assert Image.open(io.BytesIO(images.encode(rgb, fmt))).size == (10, 6)
    if fmt == "jpeg":
        with pytest.raises(ValueError, match="alpha"):
            images.encode(np.zeros((6, 10, 4), np.uint8), fmt)
    parts = Image.open(io.BytesIO(images.encode(grey % 4, "png", palette(4))))
    assert parts.mode == "P" and np.array_equal(np.asarray(parts), grey % 4)


# ---------------------------------------------------------------- /api/segment with a tiny model

@pytest.mark.parametrize("fields, mode", [
    ({"output": "mask"}, "L"), ({"output": "mask", "format": "webp"}, "RGB"),
    ({"output": "cutout"}, "RGBA"), ({"output": "cutout", "format": "webp"}, "RGBA"),
    ({"output": "cutout", "background": "white", "format": "jpeg"}, "RGB"),
    ({"output": "cutout", "background": "blur"}, "RGB"), ({"output": "overlay", "format": "jpeg"}, "RGB")])
def test_each_output_is_the_upright_photos_size(client, photo_file, fields, mode):
    response = post(client, photo_file.read_bytes(), "car.jpg", **fields)
    image = image_of(response)
    assert image.mode == mode and image.size == (64, 96)  # stored 96x64 with EXIF orientation 6
    assert image.format == fields.get("format", "png").upper()
    assert response.headers["x-image-width"] == "64" and response.headers["x-image-height"] == "96"
    assert int(response.headers["x-process-time-ms"]) >= 0
    assert response.headers["content-type"] == images.MEDIA_TYPES[fields.get("format", "png")]


def test_masks_are_predict_pys_hard_and_anti_aliased_soft(client, checkpoints, photo_file):
    prob, expected, _ = reference(checkpoints["binary"], photo_file)
    hard = np.asarray(image_of(post(client, photo_file.read_bytes(), output="mask", edges="hard")))
    assert set(np.unique(hard).tolist()) <= {0, 255} and np.array_equal(hard, expected)
    soft = np.asarray(image_of(post(client, photo_file.read_bytes(), output="mask")))
    assert np.array_equal(soft, cutout.soft_alpha(prob, 0.5))
    assert np.array_equal(soft >= 128, prob >= 0.5)
    cut = np.asarray(image_of(post(client, photo_file.read_bytes(), output="cutout")))
    assert np.array_equal(cut[..., 3], soft)  # the cutout's alpha is the mask


def test_backgrounds_fill_where_the_mask_is_empty(client, photo_file):
    data = photo_file.read_bytes()
    alpha = np.asarray(image_of(post(client, data, output="mask")))
    for background, colour in (("white", (255, 255, 255)), ("#123456", (0x12, 0x34, 0x56))):
        out = np.asarray(image_of(post(client, data, output="cutout", background=background)))
        assert (out[alpha == 0] == colour).all(), background
    photo = segmenter.decode(data)[0]
    out = np.asarray(image_of(post(client, data, output="cutout", background="white")))
    assert np.array_equal(out[alpha == 255], photo[alpha == 255])


def test_threshold_moves_the_hard_mask(client, photo_file):
    data = photo_file.read_bytes()
    low, high = (np.asarray(image_of(post(client, data, output="mask", edges="hard", threshold=t))) for t in (0.3, 0.7))
    assert (low >= high).all()


def test_crop_returns_the_cars_box(client, photo_file):
    data = photo_file.read_bytes()
    alpha = np.asarray(image_of(post(client, data, output="mask")))
    box = cutout.crop_box(alpha)
    response = post(client, data, output="mask", crop="true")
    cropped = np.asarray(image_of(response))
    if box is None:  # a random model may find no car: then the whole photo comes back
        assert "x-crop-box" not in response.headers and cropped.shape == alpha.shape
        return
    x0, y0, x1, y1 = box
    assert response.headers["x-crop-box"] == f"{x0},{y0},{x1},{y1}"
    assert np.array_equal(cropped, alpha[y0:y1, x0:x1])


def test_identical_concurrent_requests_get_identical_answers(client, photo_file):
    data = photo_file.read_bytes()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(client, data, output="cutout", background="blur"), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.content for r in responses}) == 1


# ---------------------------------------------------------------- refusals

def refused(response, status: int, *words):
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "Traceback" not in response.text
    for word in words:
        assert word.lower() in detail.lower(), (word, detail)
    return detail


def test_uploads_over_the_limit_are_refused_before_they_are_read(client):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    refused(post(client, encoded(noise)), 413, "max-upload-mb")  # Content-Length says so

    def chunks():  # no Content-Length: counted while received
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(400):
            yield bytes(1024)
    response = client.post("/api/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    refused(response, 413, "max-upload-mb")


@pytest.mark.parametrize("data, status, words", [
    (b"this is not an image", 415, ["JPEG, PNG or WebP"]),
    (encoded(car_photo()[0], "GIF"), 415, ["GIF"]),
    (encoded(car_photo()[0], "BMP"), 415, ["BMP"]),
    (png_header(100_000, 100_000), 413, ["pixels"]),   # Pillow's own bomb limit, from the header alone
    (png_header(2000, 1000), 413, ["2000x1000", "1000000"]),  # over --max-pixels
    (encoded(car_photo((300, 200))[0], "JPEG")[:1500], 422, ["truncated"]),
    (b"", 422, ["empty"]),
])
def test_what_is_not_a_usable_photo_is_refused_naming_the_problem(client, data, status, words):
    refused(post(client, data), status, *words)


@pytest.mark.parametrize("fields, words", [
    ({"output": "cutouts"}, ["output"]), ({"format": "gif"}, ["format"]), ({"background": "red"}, ["background"]),
    ({"background": "#12345"}, ["background"]), ({"threshold": 1.5}, ["threshold"]), ({"threshold": 0}, ["threshold"]),
    ({"threshold": "abc"}, ["threshold"]), ({"edges": "blurry"}, ["edges"]), ({"crop": "maybe"}, ["crop"]),
    ({"format": "jpeg"}, ["jpeg has no alpha channel"]), ({"output": "parts"}, ["parts", "car/background"]),
])
def test_bad_options_are_refused_naming_the_option(client, photo_file, fields, words):
    refused(post(client, photo_file.read_bytes(), **fields), 422, *words)


# ---------------------------------------------------------------- options from the form or the query string

VALID = "valid: image, output, format, background, threshold, edges, crop"


def send(client, data, place, fields, files=()):
    """POST the photo with `fields` as form fields (place "form") or query parameters (place "query");
    a list value repeats the field."""
    files = [("image", ("car.jpg", data, "image/jpeg")), *files]
    if place == "form":
        return client.post("/api/segment", files=files, data=fields)
    return client.post("/api/segment", files=files, params=fields)


@pytest.mark.parametrize("fields, mode", [
    ({"output": "mask"}, "L"), ({"output": "mask", "edges": "hard", "threshold": "0.4"}, "L"),
    ({"output": "cutout"}, "RGBA"), ({"output": "overlay", "format": "jpeg"}, "RGB"),
    ({"output": "cutout", "background": "#123456", "format": "webp", "crop": "true"}, "RGB")])
def test_options_in_the_query_string_give_the_forms_answer(client, photo_file, fields, mode):
    data = photo_file.read_bytes()
    by_form, by_query = send(client, data, "form", fields), send(client, data, "query", fields)
    assert image_of(by_form).mode == image_of(by_query).mode == mode  # ?output=mask is a mask, not the cutout
    assert by_form.headers["content-type"] == by_query.headers["content-type"] == \
        images.MEDIA_TYPES[fields.get("format", "png")]
    assert by_query.content == by_form.content
    names = list(fields)
    mixed = client.post("/api/segment", files={"image": ("car.jpg", data)},
                        params={k: fields[k] for k in names[::2]}, data={k: fields[k] for k in names[1::2]})
    assert image_of(mixed).mode == mode and mixed.content == by_form.content


def test_parts_asked_in_the_query_string_are_the_forms(parts_client, photo_file):
    data = photo_file.read_bytes()
    by_query = send(parts_client, data, "query", {"output": "parts"})
    by_form = send(parts_client, data, "form", {"output": "parts"})
    assert image_of(by_query).mode == "P" and by_query.content == by_form.content


@pytest.mark.parametrize("name, in_query, in_form", [
    ("output", "mask", "cutout"), ("output", "mask", "mask"), ("format", "png", "webp"),
    ("background", "white", "blur"), ("threshold", "0.3", "0.3"), ("edges", "hard", "soft"), ("crop", "true", "false")])
def test_an_option_in_both_the_query_string_and_the_form_is_refused(client, photo_file, name, in_query, in_form):
    response = client.post("/api/segment", files={"image": ("car.jpg", photo_file.read_bytes())},
                           params={name: in_query}, data={name: in_form})
    detail = refused(response, 422, "both", "query string", "form")
    assert detail.startswith(f"{name}: ")  # even when both say the same: one place per option


@pytest.mark.parametrize("place", ["form", "query"])
@pytest.mark.parametrize("name, guess", [
    ("ouput", "output"), ("bakground", "background"), ("fromat", "format"), ("treshold", "threshold"),
    ("edge", "edges"), ("Output", "output"), ("CROP", "crop"), ("images", "image"), ("colour", None), ("", None)])
def test_unknown_options_are_refused_naming_them_and_the_valid_ones(client, photo_file, place, name, guess):
    detail = refused(send(client, photo_file.read_bytes(), place, {name: "white"}), 422, "unknown option", VALID)
    assert detail.startswith(f"{name or repr(name)}: ")
    assert (f"did you mean {guess}?" in detail) if guess else ("did you mean" not in detail)


def test_an_unknown_file_field_is_refused_too(client, photo_file):
    data = photo_file.read_bytes()
    detail = refused(send(client, data, "form", {}, files=[("photo", ("b.jpg", data))]), 422, "unknown option", VALID)
    assert detail.startswith("photo: ")


@pytest.mark.parametrize("place", ["form", "query"])
@pytest.mark.parametrize("name, values", [
    ("output", ["mask", "cutout"]), ("output", ["mask", "mask"]), ("format", ["png", "webp"]),
    ("background", ["white", "blur"]), ("threshold", ["0.3", "0.7"]), ("edges", ["hard", "soft"]),
    ("crop", ["true", "false"])])
def test_a_repeated_option_is_refused(client, photo_file, place, name, values):
    detail = refused(send(client, photo_file.read_bytes(), place, {name: values}), 422, "more than once")
    assert detail.startswith(f"{name}: ")


@pytest.mark.parametrize("place", ["form", "query"])
@pytest.mark.parametrize("fields, words", [
    ({"output": "cutouts"}, ["output"]), ({"format": "gif"}, ["format"]), ({"background": "red"}, ["background"]),
    ({"threshold": "1.5"}, ["threshold"]), ({"threshold": "abc"}, ["threshold"]), ({"edges": "blurry"}, ["edges"]),
    ({"crop": "maybe"}, ["crop"]), ({"format": "jpeg"}, ["jpeg has no alpha channel"]),
    ({"output": ""}, ["output", "empty"]), ({"crop": ""}, ["crop", "empty"]),
    ({"background": ""}, ["background", "empty"])])
def test_bad_option_values_get_one_message_wherever_they_are_given(client, photo_file, place, fields, words):
    detail = refused(send(client, photo_file.read_bytes(), place, fields), 422, *words)
    assert detail == send(client, photo_file.read_bytes(), "form", fields).json()["detail"]


def test_a_file_in_an_option_field_or_the_photo_in_the_query_string_is_refused(client, photo_file):
    data = photo_file.read_bytes()
    refused(send(client, data, "form", {}, files=[("output", ("mask.txt", b"mask"))]), 422, "output", "file")
    refused(send(client, data, "query", {"image": "car.jpg"}), 422, "image", "as a file", "query string")
    refused(client.post("/api/segment", params={"output": "mask"}), 422, "image: missing")


def test_query_parameters_are_harmless_on_the_other_routes(client):
    # GETs that change nothing: a cache-buster or a tracking parameter must not break them.
    assert client.get("/api/health", params={"_": "123"}).json()["status"] == "ok"
    assert client.get("/", params={"utm_source": "mail"}).status_code == 200


def test_the_api_documents_both_places_and_the_refusals(client, parts_client):
    operation = client.get("/openapi.json").json()["paths"]["/api/segment"]["post"]
    for words in ("form field", "query parameter", "unknown option", "given twice", "in both places", "422"):
        assert words in operation["description"], words
    # Listed once, as form fields: Swagger UI's "Try it out" sends each form field, so query parameters
    # listed too would always clash; it also sends each shown default, so defaults are the server's own.
    assert "parameters" not in operation
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    assert ", ".join(form["properties"]) == VALID[len("valid: "):]
    defaults = {name: field.get("default") for name, field in form["properties"].items()}
    assert defaults == {"image": None, "output": "cutout", "format": "png", "background": "transparent",
                        "threshold": 0.5, "edges": "soft", "crop": False}  # 0.5: the tiny checkpoint's
    assert form["properties"]["output"]["enum"] == ["mask", "cutout", "overlay", "parts"]
    parts = parts_client.get("/openapi.json").json()["paths"]["/api/segment"]["post"]
    assert "threshold" not in parts["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


def test_a_request_without_the_image_field_is_refused(client):
    refused(client.post("/api/segment", data={"output": "mask"}), 422, "image")
    refused(client.post("/api/segment", data={"image": "not a file"}), 422, "image")


def test_an_unexpected_failure_is_a_plain_500_without_details(client, photo_file, monkeypatch):
    def broken(*args):
        raise RuntimeError("secret /home/user/internals")
    monkeypatch.setattr(client.app.state.segmenter, "segment", broken)
    detail = refused(post(client, photo_file.read_bytes()), 500)
    assert detail == "internal error"


@pytest.mark.parametrize("filename, expected", [
    ("voiture été.jpg", "voiture_ete_cutout.png"), ("../../etc/passwd", "passwd_cutout.png"),
    ("C:\\Users\\me\\car.photo.JPG", "car.photo_cutout.png"), ('a"b\r\nc.jpg', "a_b_c_cutout.png"),
    (".hidden", "image_cutout.png"), ("", "image_cutout.png"), ("x" * 300 + ".png", "x" * 60 + "_cutout.png"),
])
def test_file_names_are_reduced_to_safe_characters(filename, expected):
    assert serve.download_name(filename, "cutout", "png") == expected


def test_the_uploads_name_never_reaches_a_header_unsanitised(client, photo_file):
    for name in ("../../etc/passwd", 'quo"te\n.png', "車の写真.jpg", "y" * 500):
        response = post(client, photo_file.read_bytes(), name)
        assert SAFE_NAME.fullmatch(response.headers["content-disposition"]), response.headers["content-disposition"]
    assert post(client, photo_file.read_bytes(), "../../etc/passwd", format="webp").headers[
        "content-disposition"] == 'inline; filename="passwd_cutout.webp"'


# ---------------------------------------------------------------- health, page, busy and timeouts

def test_health_describes_the_model_without_paths(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny.pt"
    assert (health["arch"], health["backend"], health["precision"], health["device"]) == ("unet", "torch", "fp32", "cpu")
    assert health["classes"] == ["background", "car"] and health["multiclass"] is False
    assert health["palette"] == ["#000000", "#e6194b"] and health["input_size"] == [64, 48]
    assert health["version"] == VERSION and health["uptime_s"] >= 0 and health["max_upload_mb"] == 0.25


def test_the_page_is_offline_under_a_strict_content_security_policy(client):
    response = client.get("/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    script = re.search(r"<script>(.*?)</script>", response.text, re.DOTALL).group(1)
    assert base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() in policy
    assert not re.search(r"https?://", response.text)
    for hook in ("file-input", "result-cutout", "download-cutout", "download-mask", "status", "time", "quality",
                 "quality-warning"):
        assert f'data-testid="{hook}"' in response.text
    assert client.get("/docs").status_code == 200 and "/api/segment" in client.get("/openapi.json").text


def test_busy_and_timed_out_requests_get_503_and_504(checkpoints, photo_file, monkeypatch):
    stopped = threading.Event()

    def slow(data, options, cancelled):
        time.sleep(0.6)
        if cancelled.is_set():
            stopped.set()
        return serve.Segmenter.segment(segmenter, data, options, cancelled)
    with TestClient(serve.create_app(config(checkpoints["binary"], timeout=0.3, max_queue=0))) as test_client:
        segmenter = test_client.app.state.segmenter
        monkeypatch.setattr(segmenter, "segment", slow)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, test_client, photo_file.read_bytes())
            time.sleep(0.1)
            second = pool.submit(post, test_client, photo_file.read_bytes())
            refused(second.result(), 503, "busy")
            refused(first.result(), 504, "timed out")
        assert stopped.wait(2)  # the timed-out job saw its flag and stopped
        deadline = time.monotonic() + 2
        while segmenter.pending and time.monotonic() < deadline:  # its callback runs on the server's loop
            time.sleep(0.01)
        assert segmenter.pending == 0


# ---------------------------------------------------------------- a car-parts model

def test_a_parts_model_returns_predict_pys_class_map_and_whole_car_mask(parts_client, checkpoints, photo_file):
    _, _, labels = reference(checkpoints["parts"], photo_file)
    data = photo_file.read_bytes()
    parts = image_of(post(parts_client, data, output="parts"))
    assert parts.mode == "P" and parts.size == (64, 96) and np.array_equal(np.asarray(parts), labels)
    assert np.array_equal(np.reshape(parts.getpalette(), (-1, 3))[:4], palette(4))
    hard = np.asarray(image_of(post(parts_client, data, output="mask", edges="hard")))
    assert np.array_equal(hard, car_mask(labels))
    soft = np.asarray(image_of(post(parts_client, data, output="mask")))
    assert ((soft == 255) >= ((hard == 255) & (labels == 0))).all()  # holes between parts stay opaque
    assert image_of(post(parts_client, data, output="overlay")).size == (64, 96)
    refused(post(parts_client, data, output="mask", threshold=0.4), 422, "threshold")
    refused(post(parts_client, data, output="parts", format="webp"), 422, "png")
    health = parts_client.get("/api/health").json()
    assert health["multiclass"] is True and health["classes"] == PARTS and len(health["palette"]) == 4


# ---------------------------------------------------------------- the bundled model on a drawn car

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "carvana_unet.pt"


@pytest.fixture(scope="module")
def bundled():
    if not BUNDLED.is_file():
        pytest.skip("the bundled checkpoints/carvana_unet.pt is absent")
    with TestClient(serve.create_app(config(BUNDLED, max_upload_mb=5.0))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def car():
    return car_photo((600, 400))


class TestBundledModel:
    def test_the_mask_finds_the_drawn_car_with_soft_edges_only_at_its_outline(self, bundled, car):
        photo, silhouette = car
        soft = np.asarray(image_of(post(bundled, encoded(photo), output="mask")))
        car_pixels = soft >= 128
        assert (car_pixels & silhouette).sum() / (car_pixels | silhouette).sum() > 0.95
        partial = (soft > 0) & (soft < 255)
        outline = cv2.morphologyEx(car_pixels.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((9, 9), np.uint8)) > 0
        assert partial.any() and not (partial & ~outline).any()  # no semi-transparent patch inside or outside

    def test_a_white_cutout_keeps_the_car_and_whitens_the_rest(self, bundled, car):
        photo, silhouette = car
        out = np.asarray(image_of(post(bundled, encoded(photo), output="cutout", background="white", format="png")))
        inner = cv2.erode(silhouette.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        outer = cv2.dilate(silhouette.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
        assert np.abs(out[inner].astype(int) - photo[inner]).max() <= 2 and (out[outer] == 255).all()

    def test_crop_and_exif_rotation_follow_the_car(self, bundled, car):
        photo, silhouette = car
        response = post(bundled, encoded(photo), output="cutout", crop="true")
        x0, y0, x1, y1 = map(int, response.headers["x-crop-box"].split(","))
        ys, xs = np.nonzero(silhouette)
        assert abs(x0 - (xs.min() - 14)) <= 3 and abs(x1 - (xs.max() + 15)) <= 3  # 3 % of 456 px = 14 px
        assert abs(y0 - (ys.min() - 14)) <= 3 and abs(y1 - (ys.max() + 15)) <= 3
        assert image_of(response).size == (x1 - x0, y1 - y0)
        rotated = np.asarray(image_of(post(bundled, encoded(photo, "JPEG", exif_orientation=6, quality=95),
                                           "car.jpg", output="mask"))) >= 128
        upright = np.rot90(silhouette, -1)  # orientation 6: shown turned 90 degrees clockwise
        assert rotated.shape == upright.shape and (rotated & upright).sum() / (rotated | upright).sum() > 0.9

    def test_the_answers_quality_score_is_the_bundled_models_own(self, bundled, car):
        data = encoded(car[0])
        quality, model = scored(post(bundled, data, output="mask"))
        expected = answer_for(bundled.app.state.segmenter.predictor, data)
        assert model == "carvana_unet" == expected.model and f"{quality:.4f}" == f"{expected.quality:.4f}"
        assert 0 < quality < 1  # a car found, with some unsure pixels at its outline

    @pytest.mark.slow
    def test_the_pages_cutout_is_predict_pys_cutout(self, bundled, car, tmp_path):
        # One way to cut a car out: predict.py --cutout writes what the API's default cutout answers.
        import predict
        from config import PredictConfig
        photo, _ = car
        (tmp_path / "car.png").write_bytes(encoded(photo))
        predict.predict_files(PredictConfig(inputs=[str(tmp_path / "car.png")], out_dir=str(tmp_path / "out"),
                                            checkpoint=str(BUNDLED), backend="torch", precision="fp32", cutout=True))
        written = np.asarray(Image.open(tmp_path / "out" / "car_cutout.png"))
        answered = np.asarray(image_of(post(bundled, encoded(photo), output="cutout")))
        assert written.shape == answered.shape == (400, 600, 4)
        assert np.array_equal(written, answered)


def test_the_api_documentation_is_served_from_here_too(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert not re.search(r"(src|href)=['\"]?https?://", html), page  # Swagger UI / ReDoc without a CDN
        for asset in re.findall(r"(?:src|href)=['\"]?(/[^'\" >]+)", html):
            assert client.get(asset).status_code == 200, asset


def test_one_photo_per_request_and_no_pydantic_words(client, photo_file):
    data = photo_file.read_bytes()
    response = client.post("/api/segment", files=[("image", ("a.png", data)), ("image", ("b.png", data))])
    assert response.status_code == 422 and response.json()["detail"] == "image: send one photo per request"
    response = client.post("/api/segment", data={"image": "hello"})
    assert response.status_code == 422
    assert response.json()["detail"] == "image: send the photo as a file (multipart form field 'image' with a file name)"
    response = post(client, data, background="x" * 100_000)
    assert response.status_code == 422 and len(response.content) < 200  # the value is not echoed in full


# ---------------------------------------------------------------- options that would change nothing

@pytest.mark.parametrize("fields, words", [
    ({"output": "mask", "background": "#ff0000"}, ["background #ff0000", "output cutout only", "not to output mask"]),
    ({"output": "mask", "background": "white"}, ["background white", "cutout only"]),
    ({"output": "overlay", "background": "blur"}, ["background blur", "cutout only", "not to output overlay"]),
])
def test_an_option_that_would_change_nothing_is_refused_saying_where_it_applies(client, photo_file, fields, words):
    detail = refused(post(client, photo_file.read_bytes(), **fields), 422, *words)
    assert detail.startswith(f"{next(iter(set(fields) - {'output'}))} ")


@pytest.mark.parametrize("fields, words", [
    ({"output": "parts", "edges": "hard"}, ["edges hard", "output mask and cutout only", "car-parts",
                                            "not to output parts"]),
    ({"output": "overlay", "edges": "hard"}, ["edges hard", "mask and cutout only", "not to output overlay"]),
    ({"output": "parts", "background": "white"}, ["background white", "cutout only", "not to output parts"]),
    ({"output": "mask", "threshold": "0.4"}, ["threshold", "car/background models"]),
])
def test_a_parts_model_refuses_what_its_outputs_do_not_use(parts_client, photo_file, fields, words):
    refused(post(parts_client, photo_file.read_bytes(), **fields), 422, *words)


def test_crop_applies_to_every_output_of_a_parts_model(parts_client, photo_file):
    data = photo_file.read_bytes()
    box = cutout.crop_box(np.asarray(image_of(post(parts_client, data, output="mask"))))
    for output in ("mask", "cutout", "overlay", "parts"):
        response = post(parts_client, data, output=output, crop="true")
        size = image_of(response).size
        if box is None:  # a random model may find no car: the whole photo then
            assert size == (64, 96) and "x-crop-box" not in response.headers
        else:
            assert response.headers["x-crop-box"] == ",".join(map(str, box))
            assert size == (box[2] - box[0], box[3] - box[1])


@pytest.mark.parametrize("model", ["binary", "parts"])
def test_swaggers_try_it_out_works_for_every_output_with_the_other_fields_at_their_defaults(
        client, parts_client, photo_file, model):
    # "Try it out" sends every form field /docs shows, with its default unless changed (booleans as "false").
    test_client = {"binary": client, "parts": parts_client}[model]
    form = test_client.get("/openapi.json").json()["paths"]["/api/segment"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    defaults = {name: str(field["default"]).lower() if isinstance(field["default"], bool) else str(field["default"])
                for name, field in form.items() if name != "image"}
    outputs = ("mask", "cutout", "overlay", "parts") if model == "parts" else ("mask", "cutout", "overlay")
    for output in outputs:
        response = send(test_client, photo_file.read_bytes(), "form", {**defaults, "output": output})
        assert response.status_code == 200, (output, response.text)


PAGE_SOURCE = Path(serve.PAGE).read_text(encoding="utf-8")


@pytest.mark.parametrize("model", ["binary", "parts"])
def test_every_request_the_page_makes_is_accepted(client, parts_client, photo_file, model):
    # web/index.html's calls of segment(): each photo's mask (and parts), then the two downloads with the
    # options shown (it offers jpeg only on a background).
    for call in ('segment(item.file, { output: "mask", edges: "soft" })', 'segment(item.file, { output: "parts" })',
                 '{ output, format: "png", edges: opts.edges, crop: opts.crop } : { output, ...opts }'):
        assert call in PAGE_SOURCE, f"the page's requests changed: update this test ({call})"
    test_client, data = {"binary": client, "parts": parts_client}[model], photo_file.read_bytes()
    requests = [{"output": "mask", "edges": "soft"}] + ([{"output": "parts"}] if model == "parts" else [])
    for edges, crop in itertools.product(("soft", "hard"), ("true", "false")):
        requests.append({"output": "mask", "format": "png", "edges": edges, "crop": crop})
        for background, fmt in itertools.product(("transparent", "white", "blur", "#2e7dd7"), ("png", "webp", "jpeg")):
            if not (background == "transparent" and fmt == "jpeg"):
                requests.append({"output": "cutout", "background": background, "edges": edges, "crop": crop,
                                 "format": fmt})
    for fields in requests:
        assert send(test_client, data, "form", fields).status_code == 200, fields


@pytest.mark.parametrize("value", ["yes", "on", "1", "TRUE", "True", "no", "0", "False"])
def test_crop_is_true_or_false_in_lower_case_as_every_value_is_case_sensitive(client, photo_file, value):
    detail = refused(post(client, photo_file.read_bytes(), output="mask", crop=value), 422, "true or false")
    assert detail.startswith("crop: ")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e400", "abc", "0", "1", "-0.2", "1.5"])
def test_a_threshold_that_is_no_number_between_0_and_1_is_refused_saying_so(client, photo_file, value):
    detail = refused(post(client, photo_file.read_bytes(), output="mask", threshold=value), 422)
    assert detail == f"threshold: must be a number between 0 and 1 (0 and 1 excluded); got {value!r}"


def test_health_shows_a_checkpoint_name_that_is_not_utf8(tmp_path):
    path = tiny_checkpoint(tmp_path / os.fsdecode(b"c\xff.pt"))
    with TestClient(serve.create_app(config(path))) as test_client:
        response = test_client.get("/api/health")
    assert response.status_code == 200 and response.json()["model"] == "c\ufffd.pt"


# ---------------------------------------------------------------- each answer's quality score and model

SCORE = re.compile(r"[01]\.\d{4}")  # X-Quality: a number 0-1 with 4 decimals


def answer_for(predictor, data: bytes):
    """The inference.Answer the served predictor (a Predictor or a Router) gives an upload."""
    upload = io.BytesIO(data)
    upload.name = "upload"
    return predictor.answer([predictor.read(upload)[0]])[0]


def scored(response) -> tuple:
    """(X-Quality as a float, X-Model) of a 200 answer, the score checked to be a number in [0, 1]."""
    assert response.status_code == 200, response.text
    score = response.headers["x-quality"]
    assert SCORE.fullmatch(score) and 0 <= float(score) <= 1, score
    return float(score), response.headers["x-model"]


def on_backdrop(colour) -> bytes:
    """The drawn car 96x64 with its light studio background painted `colour`, as a PNG."""
    photo, silhouette = car_photo()
    photo = photo.copy()
    photo[~silhouette] = colour
    return encoded(photo)


@pytest.mark.parametrize("fields", [{"output": "mask"}, {"output": "cutout", "background": "white"},
                                    {"output": "overlay", "format": "jpeg"}, {"output": "mask", "crop": "true"}])
def test_every_answer_says_its_quality_score_and_the_model_that_gave_it(client, photo_file, fields):
    data = photo_file.read_bytes()
    quality, model = scored(post(client, data, "car.jpg", **fields))
    expected = answer_for(client.app.state.segmenter.predictor, data)
    assert model == "tiny" == expected.model  # the checkpoint's file stem, as in /api/health's "model": tiny.pt
    assert f"{quality:.4f}" == f"{expected.quality:.4f}"


def test_the_quality_score_is_the_models_own_and_a_doubtful_answer_scores_below_the_flag(tmp_path, photo_file):
    # An untrained model whose probabilities on this photo all lie within 0.436-0.444, served with a
    # threshold of 0.44: it finds a "car", and is unsure of every pixel of it.
    checkpoint = tiny_checkpoint(tmp_path / "unsure.pt", threshold=0.44)
    data = photo_file.read_bytes()
    with TestClient(serve.create_app(config(checkpoint))) as test_client:
        quality, model = scored(post(test_client, data, "car.jpg", output="mask"))
        flag = test_client.get("/api/health").json()["quality_flag"]
    expected = Predictor.from_checkpoint(str(checkpoint), "cpu", "fp32", backend="torch")
    image, _ = expected.read(photo_file)
    assert f"{quality:.4f}" == f"{expected.quality(expected.probs(expected.preprocess([image])))[0]:.4f}"
    assert model == "unsure" and 0 < quality < flag


def test_a_parts_models_answers_are_scored_too(parts_client, photo_file):
    data = photo_file.read_bytes()
    for output in ("parts", "mask"):
        quality, model = scored(post(parts_client, data, "car.jpg", output=output))
        assert model == "parts" and f"{quality:.4f}" == f"{answer_for(parts_client.app.state.segmenter.predictor, data).quality:.4f}"


def test_health_reports_the_quality_flag_and_no_model_list_for_a_single_model(client, parts_client):
    for test_client in (client, parts_client):
        health = test_client.get("/api/health").json()
        assert health["quality_flag"] == QUALITY_FLAG and 0 < health["quality_flag"] < 1
        assert "models" not in health  # one model answers everything


@pytest.fixture(scope="module")
def pair_client(tmp_path_factory):
    """The server with a router.Router over two tiny car/background models, as serve.py runs the bundled
    pair: "studio" (threshold 0.5, finds no car in the drawn photos: quality 0) and "street" (the same
    weights at threshold 0.44: a doubtful car, quality > 0), so each answer's score shows whose it is."""
    tmp = tmp_path_factory.mktemp("pair")
    studio = Predictor.from_checkpoint(str(tiny_checkpoint(tmp / "studio.pt")), "cpu", "fp32", backend="torch")
    street = Predictor.from_checkpoint(str(tiny_checkpoint(tmp / "street.pt", threshold=0.44)), "cpu", "fp32",
                                       backend="torch")
    about = {"model": "studio.pt + street.pt", "arch": "unet + unet", "max_upload_mb": 0.25,
             "max_pixels": 1_000_000, "version": VERSION}
    pair = serve.Segmenter(router.Router(studio, street), about, 16, QUALITY_FLAG)
    with TestClient(serve.create_app(config(tmp / "studio.pt"), pair)) as test_client:
        yield test_client


def test_with_the_pair_health_lists_both_models_studio_first(pair_client):
    health = pair_client.get("/api/health").json()
    assert health["models"] == [{"name": "studio", "input_size": [64, 48]}, {"name": "street", "input_size": [64, 48]}]
    assert health["quality_flag"] == QUALITY_FLAG and health["model"] == "studio.pt + street.pt"


def test_with_the_pair_each_answer_names_the_model_the_router_chose(pair_client, monkeypatch):
    pair = pair_client.app.state.segmenter.predictor
    studio_photo, street_photo = on_backdrop((236, 236, 240)), on_backdrop((40, 110, 50))  # grey studio, green park

    def answer(data):
        quality, model = scored(post(pair_client, data, output="mask"))
        expected = answer_for(pair, data)
        assert (model, f"{quality:.4f}") == (expected.model, f"{expected.quality:.4f}")
        assert model in [m["name"] for m in pair_client.get("/api/health").json()["models"]]
        return model, quality

    model, quality = answer(street_photo)
    assert model == "street" and quality > 0  # no backdrop: never asked of the studio model
    model, quality = answer(studio_photo)
    assert model == "street" and quality > 0  # asked of the studio model first, which is unsure (quality 0)
    monkeypatch.setattr(router, "STUDIO_QUALITY", 0.0)  # now every studio answer is kept
    model, quality = answer(studio_photo)
    assert model == "studio" and quality == 0


# ---------------------------------------------------------------- where serve.py listens

@pytest.fixture
def no_model(monkeypatch):
    """serve.py's model loading and uvicorn replaced: the calls uvicorn.run got (none if it stopped before)."""
    import uvicorn
    calls = []
    monkeypatch.setattr(serve, "load_segmenter", lambda cfg: pytest.fail("the model was loaded"))
    monkeypatch.setattr(serve, "create_app", lambda cfg, segmenter=None: "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))
    return calls


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused_before_the_model_loads(no_model, host):
    with pytest.raises(SystemExit, match=r"^error: --host is empty, which would listen on every address"):
        serve.main(["--host", host, "--checkpoint", "unused.pt"])
    assert not no_model


def test_a_port_in_use_is_refused_before_the_model_loads(no_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            serve.main(["--port", str(port), "--checkpoint", "unused.pt"])
    assert stop.value.code == f"error: --port {port} is in use; choose another with --port" and not no_model


def test_uvicorns_own_startup_failure_is_an_error_line(monkeypatch, no_model):
    import uvicorn
    monkeypatch.setattr(serve, "load_segmenter", lambda cfg: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: sys.exit(3))  # as when the port was taken meanwhile
    with pytest.raises(SystemExit, match=r"^error: the server did not start on --host 127.0.0.1 --port 0"):
        serve.main(["--port", "0", "--checkpoint", "unused.pt"])


@pytest.mark.parametrize("host, reachable", [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True)])
def test_listening_beyond_the_loopback_is_allowed_with_a_warning(monkeypatch, no_model, caplog, host, reachable):
    monkeypatch.setattr(serve, "load_segmenter", lambda cfg: None)
    with caplog.at_level(logging.WARNING, logger="serve"):
        serve.main(["--host", host, "--port", "0", "--checkpoint", "unused.pt"])
    assert no_model[0]["host"] == host
    assert ("can be reached from other machines" in caplog.text) is reachable
    if reachable:
        assert "--host 0.0.0.0 listens on every address" in caplog.text
