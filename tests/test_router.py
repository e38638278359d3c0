"""Protects the per-photo choice between the studio and the everyday model (router.py) and the quality
table predict.py writes beside its masks (carseg/quality.py), on hand-made photos and stand-in models
whose answers are known."""
import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import router
from carseg import quality
from carseg.checkpoint import checkpoint_for, save_checkpoint
from carseg.images import load_image, load_image_sizes
from config import PredictConfig
from conftest import car_picture
from inference import Answer, Predictor
from model import UNet

GREY, GREEN = (200, 200, 200), (40, 140, 60)


def framed(ring_colour, inside=(120, 30, 30), side=64) -> np.ndarray:
    """A photo whose outer eighth (the router's ring) is ring_colour and whose middle is `inside`."""
    image = np.full((side, side, 3), ring_colour, np.uint8)
    image[side // 8:-side // 8, side // 8:-side // 8] = inside
    return image


def test_backdrop_share_reads_the_ring_light_grey_is_backdrop_and_colour_or_dark_is_not():
    assert router.backdrop_share(framed(GREY)) == 1.0
    assert router.backdrop_share(framed(GREEN)) == 0.0
    assert router.backdrop_share(framed((60, 60, 60))) == 0.0  # grey but dark: a night street, not a studio
    half = framed(GREY)
    half[:, 32:] = GREEN  # the right half of the ring is a hedge: 48 of the ring's 96 cells per side pair
    assert router.backdrop_share(half) == pytest.approx(0.5)
    assert router.backdrop_share(framed(GREY, inside=GREEN)) == 1.0  # the middle is never read


class StandIn:
    """A Predictor's place in the Router: answers every photo with the quality its pixel (0, 0, 0) holds / 255."""

    def __init__(self, name):
        self.name, self.asked = name, []
        self.spec = SimpleNamespace(multiclass=False)
        self.threshold, self.input_size = 0.5, (64, 64)

    def answer(self, images):
        self.asked.append(len(images))
        return [Answer(torch.zeros(1, 4, 4), image[0, 0, 0] / 255, self.name, 0.5) for image in images]


def photo(ring, quality_byte):
    image = framed(ring)
    image[0, 0, 0] = quality_byte  # read by StandIn as the quality its answer has; one ring cell of 96
    return image, image


def test_a_studio_photo_the_studio_model_is_sure_of_stays_with_it_and_every_other_goes_to_the_everyday_model():
    studio, street = StandIn("studio"), StandIn("everyday")
    sure, unsure = round(255 * 0.7), round(255 * 0.3)
    images = [photo(GREY, sure), photo(GREEN, sure), photo(GREY, unsure), photo(GREY, sure)]
    answers = router.Router(studio, street).answer(images)
    assert [a.model for a in answers] == ["studio", "everyday", "everyday", "studio"]  # in the photos' order
    assert studio.asked == [3] and street.asked == [2]  # one batch per model; the green one never asked of studio
    assert answers[2].quality == pytest.approx(0.3, abs=0.01)  # the everyday model's own answer and score


def test_the_router_refuses_a_parts_model():
    parts = StandIn("parts")
    parts.spec = SimpleNamespace(multiclass=True)
    with pytest.raises(ValueError, match="parts: a car-parts model cannot be routed"):
        router.Router(StandIn("studio"), parts)


def test_one_decode_gives_each_size_what_load_image_gives_it_where_one_jpeg_scale_serves_both(tmp_path):
    rng = np.random.default_rng(0)
    for width, same in ((1918, True), (1920, False)):  # Carvana's 1918: 1/2 for both; 1920 alone: 1/4 for 480x320
        path = tmp_path / f"photo{width}.jpg"
        Image.fromarray(rng.integers(0, 255, (1280, width, 3), dtype=np.uint8)).save(path, quality=90)
        (studio, street), full_size = load_image_sizes(path, [(480, 320), (384, 384)])
        assert full_size == (width, 1280)
        assert np.array_equal(street, load_image(path, (384, 384))[0])
        alone = load_image(path, (480, 320))[0]
        assert np.array_equal(studio, alone) == same
        assert np.abs(studio.astype(int) - alone).mean() < 1.5  # else the finer scale, area-averaged: nearly alike


# ---------------------------------------------------------------- the quality table

def test_update_keeps_rows_of_masks_still_there_and_replaces_rewritten_ones(tmp_path):
    (tmp_path / "a_mask.png").write_bytes(b"x")
    (tmp_path / "b_mask.png").write_bytes(b"x")
    first = [quality.row(Path("a.jpg"), tmp_path / "a_mask.png", "studio", 0.61, 0.5),
             quality.row(Path("b.jpg"), tmp_path / "b_mask.png", "everyday", 0.31, 0.5),
             quality.row(Path("gone.jpg"), tmp_path / "gone_mask.png", "studio", 0.6, 0.5)]
    quality.update(tmp_path, first, [tmp_path / f"{n}_mask.png" for n in ("a", "b", "gone")])
    again = [quality.row(Path("b.jpg"), tmp_path / "b_mask.png", "studio", 0.66, 0.5)]
    rows = quality.read(quality.update(tmp_path, again, [tmp_path / "b_mask.png"]))
    assert [(r["photo"], r["model"], r["quality"], r["flagged"]) for r in rows] == [
        ("b.jpg", "studio", "0.6600", "no"), ("a.jpg", "studio", "0.6100", "no")]  # gone_mask.png is gone
    # a resumed run (a reused, then b predicted) writes the rows in its input order, as one run would
    rows = quality.read(quality.update(tmp_path, again, [tmp_path / "a_mask.png", tmp_path / "b_mask.png"]))
    assert [r["photo"] for r in rows] == ["a.jpg", "b.jpg"]
    assert first[1]["flagged"] == "yes"


def test_a_users_own_quality_csv_is_refused_and_kept(tmp_path):
    (tmp_path / "quality.csv").write_text("my,own,numbers\n1,2,3\n")
    with pytest.raises(ValueError, match="not a quality table of predict.py"):
        quality.refuse_foreign(tmp_path)
    assert (tmp_path / "quality.csv").read_text() == "my,own,numbers\n1,2,3\n"
    (tmp_path / "quality.csv").unlink()
    quality.refuse_foreign(tmp_path)  # none: nothing to refuse


def tiny(path, seed):
    torch.manual_seed(seed)
    save_checkpoint(path, checkpoint_for(UNet(base_channels=4, depth=2),
                                         {"image_width": 64, "image_height": 48, "threshold": 0.5}))
    return str(path)


def test_predict_without_checkpoint_routes_with_the_bundled_pair_and_writes_each_photos_row(tmp_path, monkeypatch, caplog):
    studio, street = tiny(tmp_path / "studio.pt", 0), tiny(tmp_path / "street.pt", 1)
    monkeypatch.setattr(router, "BUNDLED_CHECKPOINT", Path(studio))
    monkeypatch.setattr(router, "BUNDLED_EVERYDAY_CHECKPOINT", Path(street))
    photos = tmp_path / "photos"
    photos.mkdir()
    grey = framed(GREY)
    grey[8:-8, 8:-8] = car_picture(0, 1, size=(48, 48))[0]
    Image.fromarray(grey).save(photos / "studio.png")
    Image.fromarray(framed(GREEN)).save(photos / "street.png")
    cfg = PredictConfig(inputs=[str(photos)], out_dir=str(tmp_path / "out"), device="cpu", backend="torch",
                        precision="fp32", flag_below=1.0)  # every score is below 1: all flagged
    with caplog.at_level(logging.INFO):
        written, failures = predict.predict_files(cfg)
    assert failures == {} and len(written) == 2
    with open(tmp_path / "out" / "quality.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["mask"] for r in rows] == ["street_mask.png", "studio_mask.png"]  # input order
    assert rows[0]["model"] == "street"  # no backdrop: never asked of the studio model
    assert rows[1]["model"] in ("studio", "street")  # an untrained studio model may be unsure: then street
    assert all(0 <= float(r["quality"]) <= 1 and r["flagged"] == "yes" for r in rows)
    assert "2 of 2 photo(s) below --flag-below 1" in caplog.text and "look at" in caplog.text
    assert "studio for studio photos, street for the others" in caplog.text


def test_the_routed_answer_is_the_chosen_models_own_mask(tmp_path):
    studio = Predictor.from_checkpoint(tiny(tmp_path / "studio.pt", 0), "cpu", "fp32")
    street = Predictor.from_checkpoint(tiny(tmp_path / "street.pt", 1), "cpu", "fp32")
    path = tmp_path / "street.png"
    Image.fromarray(framed(GREEN)).save(path)
    images, _ = router.Router(studio, street).read(path)
    routed = router.Router(studio, street).answer([images])[0]
    alone = street.answer([street.read(path)[0]])[0]
    assert routed.model == "street" and torch.equal(routed.probs, alone.probs) and routed.quality == alone.quality


def test_a_resumed_run_rebuilds_the_rows_of_the_masks_it_reuses_from_the_masks_themselves(tmp_path):
    studio = tiny(tmp_path / "studio.pt", 0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(framed(GREEN if i % 2 else GREY)).save(photos / f"p{i}.png")
    out = tmp_path / "out"

    def run(**options):
        cfg = PredictConfig(inputs=[str(photos)], out_dir=str(out), checkpoint=studio, device="cpu", backend="torch",
                            precision="fp32", **options)
        return predict.predict_files(cfg)
    run()
    whole = (out / "quality.csv").read_bytes()
    text = quality.row_from_mask(photos / "p1.png", out / "p1_mask.png", 0.25)
    assert text == quality.read(out / "quality.csv")[1]  # the mask carries its own row
    (out / "quality.csv").unlink()  # as a run killed before its end leaves it
    (out / "p2_mask.png").unlink()
    run(skip_existing=True)
    assert (out / "quality.csv").read_bytes() == whole  # p0, p1 reused, p2 predicted: the table one run writes
