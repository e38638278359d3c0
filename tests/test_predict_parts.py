"""Protects predict.py with a car-parts (multi-class) checkpoint: the palette PNG of class indices, the
whole-car mask, overlay with legend, cutout, classes.txt, and the per-photo failure handling."""
import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import predict
import train
from conftest import parts_picture, tiny_config, write_coco_dataset
from config import PredictConfig
from carseg.images import load_image
from inference import Predictor
from carseg.labels import car_mask
from carseg.labels import palette
from carseg.plots import with_legend
from carseg.rle import rle_decode

CLASS_NAMES = ["background", "left_door", "right_door", "wheel"]  # conftest's PART_CATEGORIES


@pytest.fixture(scope="module")
def parts_checkpoint(tmp_path_factory) -> Path:
    """A tiny U-Net trained on the synthetic parts long enough to find some parts (not to be good)."""
    tmp = tmp_path_factory.mktemp("parts")
    data = write_coco_dataset(tmp / "coco")
    cfg = tiny_config(data, tmp, arch="unet", run_name="parts", epochs=3, batch_size=2, lr=3e-2, warmup_epochs=0.5)
    return Path(train.train(cfg)["run_dir"]) / "best.pt"


@pytest.fixture
def photos(tmp_path) -> Path:
    """Four part photos of three sizes: 96x64 JPEGs, an odd-sized PNG and an EXIF-rotated JPEG."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(parts_picture(20 + i)[0]).save(folder / f"car{i}.jpg", quality=95)
    Image.fromarray(parts_picture(30, size=(101, 67))[0]).save(folder / "odd.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120x80, displayed 80 wide x 120 high
    Image.fromarray(parts_picture(31, size=(120, 80))[0]).save(folder / "rotated.jpg", exif=exif)
    return folder


def predict_parts(checkpoint, photos, out, **options):
    # PyTorch fp32, as the reference Predictor below: files are compared here, engines in test_backends.py
    # (predict.py's own default, OpenVINO's auto, runs bf16 on CPUs that have it natively).
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(out), checkpoint=str(checkpoint), device="cpu",
                        batch_size=3, backend="torch", precision="fp32", **options)
    return predict.predict_files(cfg)


def test_parts_png_holds_the_predictors_class_indices_with_the_palette(parts_checkpoint, photos, tmp_path):
    out = tmp_path / "out"
    written, failures = predict_parts(parts_checkpoint, photos, out, overlay=True, cutout=True,
                                      submission=str(tmp_path / "rle.csv"))
    inputs = sorted(photos.iterdir())
    assert failures == {} and sorted(written) == sorted(out.resolve() / f"{p.stem}_mask.png" for p in inputs)
    expected = Predictor.from_checkpoint(str(parts_checkpoint), "cpu", "fp32", backend="torch").predict_labels(inputs)
    rles = {row["img"]: row["rle_mask"] for row in csv.DictReader((tmp_path / "rle.csv").open())}
    for path, labels in zip(inputs, expected):
        size = ImageOps.exif_transpose(Image.open(path)).size  # upright (width, height)
        parts = Image.open(out / f"{path.stem}_parts.png")
        assert parts.mode == "P" and parts.size == size, path.name
        values = np.asarray(parts)
        assert set(np.unique(values).tolist()) <= set(range(len(CLASS_NAMES))), path.name
        assert np.array_equal(values, labels), path.name
        assert np.array_equal(np.reshape(parts.getpalette(), (-1, 3))[:len(CLASS_NAMES)], palette(len(CLASS_NAMES)))
        mask = Image.open(out / f"{path.stem}_mask.png")
        assert mask.mode == "L" and np.array_equal(np.asarray(mask), car_mask(labels)), path.name
        assert np.array_equal(rle_decode(rles[path.name], mask.size[::-1]) * 255, np.asarray(mask)), path.name
        cutout = Image.open(out / f"{path.stem}_cutout.png")
        assert cutout.mode == "RGBA" and cutout.size == size
        rgba, car = np.asarray(cutout), np.asarray(mask) > 0
        assert np.array_equal(rgba[..., 3], np.asarray(mask))  # a parts model's cutout is its whole car, hard-edged
        assert np.array_equal(rgba[car, :3], load_image(path)[0][car]) and not rgba[~car, :3].any()
        legend = with_legend(np.zeros((0, predict.LEGEND_WIDTHS[0], 3), np.uint8), CLASS_NAMES, palette(4),
                             predict.legend_classes(labels, 4))  # photos narrower than LEGEND_WIDTHS[0]: shrunk
        overlay = Image.open(out / f"{path.stem}_overlay.jpg")
        legend_height = round(legend.shape[0] * size[0] / legend.shape[1])
        assert overlay.mode == "RGB" and overlay.size == (size[0], size[1] + legend_height)
    assert len(np.unique(np.concatenate([labels.ravel() for labels in expected]))) >= 3  # not checked on empty maps
    assert (out / "classes.txt").read_text() == "".join(f"{name}\n" for name in CLASS_NAMES)
    names = {f"{p.stem}{suffix}" for p in inputs for suffix in predict.OUTPUT_SUFFIXES}
    assert sorted(p.name for p in out.iterdir()) == sorted(names | {"classes.txt", "quality.csv"})


def test_a_corrupt_photo_is_reported_and_the_others_written(parts_checkpoint, photos, tmp_path, caplog):
    bad = photos / "broken.jpg"
    bad.write_bytes((photos / "car0.jpg").read_bytes()[:300])  # truncated inside the compressed data
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        predict.main([str(photos), "--out-dir", str(out), "--checkpoint", str(parts_checkpoint), "--device", "cpu",
                      "--batch-size", "2"])
    assert exit_info.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    assert "wrote masks and part maps (classes.txt) for 4 photo(s)" in caplog.text
    assert "1 input(s) failed" in caplog.text
    good = [p.stem for p in photos.iterdir() if p != bad]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}{suffix}" for stem in good for suffix in ("_mask.png", "_parts.png")] + ["classes.txt", "quality.csv"])


def test_an_input_a_part_map_would_replace_is_refused_before_the_model_loads(parts_checkpoint, photos, monkeypatch):
    monkeypatch.setattr(predict.Predictor, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    shutil.copy(photos / "odd.png", photos / "car0_parts.png")  # as if a first run wrote into the input folder
    with pytest.raises(ValueError, match="refusing to write over input car0_parts.png"):
        predict_parts(parts_checkpoint, photos, photos)
    (photos / "car0_parts.png").unlink()
    (photos / "classes.txt").write_text("not an image, but named as an input")
    with pytest.raises(ValueError, match="refusing to write over input classes.txt"):
        predict.predict_files(PredictConfig(inputs=[str(photos / "car1.jpg"), str(photos / "classes.txt")],
                                            out_dir=str(photos), checkpoint=str(parts_checkpoint), device="cpu"))


@pytest.mark.parametrize("width", [20, 128, 512, 640, 2000])
def test_the_legend_is_drawn_at_its_own_size_only_for_ordinary_widths(width):
    # 512 and 640 wide: exactly plots.with_legend. 2000: the 640 legend enlarged, so its text keeps its
    # share of the photo. 20 (narrower than one swatch, where plots raises): a shrunk legend, not an error.
    overlay = np.full((50, width, 3), 100, np.uint8)
    result = predict.legend_under(overlay, CLASS_NAMES, palette(4), [0, 1, 3])
    drawn = int(np.clip(width, *predict.LEGEND_WIDTHS))
    own = with_legend(np.zeros((0, drawn, 3), np.uint8), CLASS_NAMES, palette(4), [1, 3])
    assert result.shape == (50 + round(own.shape[0] * width / own.shape[1]), width, 3)
    assert np.array_equal(result[:50], overlay)
    if predict.LEGEND_WIDTHS[0] <= width <= predict.LEGEND_WIDTHS[1]:
        assert np.array_equal(result, with_legend(overlay, CLASS_NAMES, palette(4), [1, 3]))


def test_the_legend_leaves_out_classes_on_a_few_stray_pixels():
    # 200 x 200 = 40000 pixels; LEGEND_MIN_SHARE 1e-4 of them is 4: a 4-pixel class is listed, a 3-pixel one not.
    assert predict.LEGEND_MIN_SHARE == 1e-4
    labels = np.zeros((200, 200), np.uint8)
    labels[:50] = 1
    labels[199, :4] = 2
    labels[198, :3] = 3
    assert predict.legend_classes(labels, 5).tolist() == [0, 1, 2]


def test_a_threshold_for_a_parts_model_is_refused_before_anything_is_written(parts_checkpoint, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(photo)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--threshold 0.4: the checkpoint is a 4-class parts model"):
        predict.main([str(photo), "--checkpoint", str(parts_checkpoint), "--out-dir", str(out), "--threshold", "0.4"])
    assert not out.exists() or not any(out.iterdir())
