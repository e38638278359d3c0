"""Protects the handling of awkward files: oversized images, odd colour modes, unusual paths, JPEGs lacking an end."""
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from conftest import MODEL_SIZE, car_picture, write_kaggle_dataset
from dataset import find_samples, prepare_store
from carseg import images
from carseg.images import load_image


def test_pixel_limit_refuses_an_image_before_decoding_it(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)  # Pillow itself would only warn up to 2x its limit
    with pytest.raises(ValueError, match=r"big\.png: image too large \(20x20 pixels\)"):
        load_image(path)
    with pytest.raises(ValueError, match="too large"):
        dataset.load_mask(path)


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "LA", "I;16"])
def test_colour_modes_decode_to_rgb(tmp_path, mode):
    image, _ = car_picture(0, 1, size=(40, 30))
    img = Image.fromarray(image)
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(image[..., 0].astype(np.uint16) * 257)
    path = tmp_path / f"photo.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    array, full_size = load_image(path, MODEL_SIZE)
    assert array.shape == (MODEL_SIZE[1], MODEL_SIZE[0], 3) and array.dtype == np.uint8
    assert full_size == (40, 30)
    assert array.std() > 5  # the picture survived, not a blank conversion


def test_paths_with_spaces_and_non_ascii_characters(tmp_path):
    root = write_kaggle_dataset(tmp_path / "my data" / "Carvana ünïcode 車")
    samples, problems = find_samples(root)
    assert problems == [] and len(samples) == 12
    store = prepare_store(samples, MODEL_SIZE, cache_dir=str(tmp_path / "cache dir é"))
    assert len(store) == 12
    renamed = tmp_path / "voiture é 1.jpg"
    shutil.copy(samples[0].image, renamed)
    assert load_image(renamed, MODEL_SIZE)[0].shape == (MODEL_SIZE[1], MODEL_SIZE[0], 3)


def test_empty_image_folder_is_a_problem(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train_masks").mkdir()
    samples, problems = find_samples(tmp_path)
    assert samples == [] and len(problems) == 1 and "no images" in problems[0]


@pytest.mark.parametrize("name", ["..jpg", "-rf.jpg", "a,b.jpg", "line\nbreak.jpg", " .jpg", "x.y.z.jpg"])
def test_output_names_stay_inside_the_output_folder(tmp_path, name):
    import csv

    import predict
    import train
    from config import PredictConfig
    from conftest import tiny_config
    data = write_kaggle_dataset(tmp_path / "data")
    summary = train.train(tiny_config(data, tmp_path, epochs=1))
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((data / "train").glob("*.jpg"))[0], photos / name)
    out = tmp_path / "out"
    written, failures = predict.predict_files(PredictConfig(
        inputs=[str(photos / name)], out_dir=str(out), checkpoint=str(Path(summary["run_dir"]) / "best.pt"),
        device="cpu", cutout=True, submission=str(tmp_path / "sub.csv")))
    assert failures == {} and len(written) == 1
    produced = [p for p in tmp_path.rglob("*") if p.is_file() and ("_mask.png" in p.name or "_cutout" in p.name)]
    assert produced and all(p.resolve().parent == out.resolve() for p in produced)
    rows = list(csv.reader((tmp_path / "sub.csv").open(newline="")))
    assert rows[1][0] == name and len(rows) == 2


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR",  # found by test_fuzz: Pillow raised
                                  b"GIF89a\x01\x00"])                            # a bare ValueError / struct.error
def test_corrupt_headers_are_reported_with_the_file_name(tmp_path, data):
    path = tmp_path / "header_mask.png"
    path.write_bytes(data)
    for loader in (load_image, dataset.load_mask):
        with pytest.raises(ValueError, match="header_mask.png"):
            loader(path)


def test_a_dataset_photo_lacking_its_jpeg_end_marker_is_decoded_not_listed_as_a_problem(tmp_path, caplog):
    root = write_kaggle_dataset(tmp_path / "data")
    photo = sorted((root / "train").glob("*.jpg"))[0]
    photo.write_bytes(photo.read_bytes()[:-2])  # FF D9 dropped, as some cameras and upload tools do
    samples, problems = find_samples(root)
    with caplog.at_level(logging.WARNING, logger="dataset"):
        store = prepare_store(samples, MODEL_SIZE)
    assert problems == [] and len(store) == len(samples)
    warnings = [r.getMessage() for r in caplog.records if "end marker" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{photo.name}: the JPEG lacks its end marker")


def test_an_upload_lacking_its_jpeg_end_marker_is_read_and_each_one_warned_about(caplog):
    """serve.py decodes uploads as file objects all named "upload": each is another file, so each is warned about."""
    image, _ = car_picture(0, 1, size=(96, 64))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG")
    expected = load_image(io.BytesIO(buffer.getvalue()), MODEL_SIZE)[0]
    with caplog.at_level(logging.WARNING, logger="dataset"):
        for _ in range(2):
            upload = io.BytesIO(buffer.getvalue()[:-2])
            upload.name = "upload"
            assert np.array_equal(load_image(upload, MODEL_SIZE)[0], expected)
    assert sum(r.getMessage().startswith("upload: the JPEG lacks its end marker") for r in caplog.records) == 2
