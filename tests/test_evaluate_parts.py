"""evaluate.py on car-parts (multi-class) checkpoints: every report, exact scores from stand-in networks
whose answers are known, and the refusals (other classes in the data, --threshold)."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import train
from conftest import IMAGE_SIZE, PART_CATEGORIES, tiny_config, write_coco_dataset, write_kaggle_dataset
from dataset import decode_sample, find_samples, image_to_tensor
from inference import Predictor

CLASS_NAMES = ["background", "left_door", "right_door", "wheel"]
REPORTS = ("summary.json", "per_class.csv", "per_image.csv", "confusion.png", "worst.png", "samples.png")
IMAGES = 12  # write_coco_dataset's default count

# Every synthetic photo (96x64) holds the same shapes, shifted: left door x 8..48, y 12..50 (40 x 38 =
# 1520 px) and right door x 48..88 (1520 px), with the wheel, x 38..58, y 40..56 (20 x 16 = 320 px),
# painted over both, taking 10 x 10 = 100 px from each door. No shift reaches an edge.
LEFT_DOOR, RIGHT_DOOR, WHEEL = 1520 - 100, 1520 - 100, 20 * 16
PIXELS = IMAGE_SIZE[0] * IMAGE_SIZE[1]
BACKGROUND = PIXELS - LEFT_DOOR - RIGHT_DOOR - WHEEL


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory) -> Path:
    return write_coco_dataset(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def checkpoint(parts_dir, tmp_path_factory) -> Path:
    """best.pt of a 1-epoch tiny U-Net whose input size is the photos' own, so that full and model
    resolution are the same pixels and a perfect model-resolution answer is perfect at full resolution."""
    cfg = tiny_config(parts_dir, tmp_path_factory.mktemp("work"), arch="unet", run_name="parts", epochs=1,
                      image_width=IMAGE_SIZE[0], image_height=IMAGE_SIZE[1])
    return Path(train.train(cfg)["run_dir"]) / "best.pt"


def argv(checkpoint, data_dir, out_dir, *more) -> list:
    return ["--checkpoint", str(checkpoint), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--device", "cpu", "--cache-dir", "", *more]


def test_main_writes_every_report_and_prints_the_class_table(checkpoint, parts_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    summary = evaluate.main(argv(checkpoint, parts_dir, out))
    for name in REPORTS:
        assert (out / name).is_file(), name
    assert not (out / "threshold_sweep.png").exists()  # argmax: no threshold to sweep
    for name in ("confusion.png", "worst.png", "samples.png"):
        assert Image.open(out / name).format == "PNG", name

    stored = json.loads((out / "summary.json").read_text())
    assert stored["class_names"] == CLASS_NAMES and "threshold" not in stored and "sweep" not in stored
    assert stored["full_res"] == summary["full_res"] and stored["model_res"] == summary["model_res"]
    assert np.array(stored["full_res"]["confusion"]).sum() == stored["images"] * PIXELS
    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASS_NAMES
    for row in rows:
        scores = stored["full_res"]["per_class"][row["class"]]
        assert (number(row["iou"]), number(row["dice"])) == (scores["iou"], scores["dice"])  # exact, not approx
        assert (int(row["true_pixels"]), int(row["predicted_pixels"])) == (scores["pixels"], scores["predicted"])

    with open(out / "per_image.csv") as f:
        images = list(csv.DictReader(f))
    assert len(images) == stored["images"] > 0 and set(images[0]) == {"name", "group", "miou_full_res"}
    mious = [number(r["miou_full_res"]) for r in images]
    assert mious == sorted(mious, key=lambda v: (v is None, v or 0.0))  # worst first
    assert [w["name"] for w in stored["worst"]] == [r["name"] for r in images][:len(stored["worst"])]

    printed = capsys.readouterr().out
    lines = printed.splitlines()
    table = [next(line for line in lines if line.split()[:1] == [name]) for name in CLASS_NAMES]
    assert len({line.index(".") for line in table}) == 1  # the IoU column lines up
    assert lines.index(table[0]) > lines.index(table[-1])  # the background comes after the parts
    assert "mean IoU over the 3 parts" in printed and "pixel accuracy" in printed


def number(cell: str):
    return None if cell == "" else float(cell)


# ---------------------------------------------------------------- exact scores from stand-in networks

class AnswerRunner:
    """Stands in for the network: for each image it knows, the logits `answer(small mask)` gives, where
    the small mask is the class map of that image at the model's input size."""

    def __init__(self, predictor: Predictor, data_dir, answer):
        self.device, self.precision, self.answers = predictor.device, predictor.precision, {}
        for sample in find_samples(data_dir)[0]:
            image, small_mask, _, _ = decode_sample(sample, predictor.input_size, len(CLASS_NAMES))
            key = image_to_tensor(image, predictor.spec.normalization).numpy().tobytes()
            self.answers[key] = answer(torch.from_numpy(small_mask).long())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.answers[image.numpy().tobytes()] for image in images])


def stand_in_network(monkeypatch, data_dir, answer):
    """Make every Predictor built from a checkpoint answer with an AnswerRunner."""
    real = Predictor.from_checkpoint.__func__

    def from_checkpoint(cls, *args, **kwargs):
        predictor = real(cls, *args, **kwargs)
        predictor.runner = AnswerRunner(predictor, data_dir, answer)
        return predictor

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(from_checkpoint))


def truth(mask: torch.Tensor) -> torch.Tensor:
    return 10.0 * F.one_hot(mask, len(CLASS_NAMES)).permute(2, 0, 1).float()


def all_left_door(mask: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(len(CLASS_NAMES), *mask.shape)
    logits[CLASS_NAMES.index("left_door")] = 10.0
    return logits


def test_the_true_masks_score_miou_1(checkpoint, parts_dir, tmp_path, monkeypatch):
    stand_in_network(monkeypatch, parts_dir, truth)
    summary = evaluate.main(argv(checkpoint, parts_dir, tmp_path / "eval", "--split", "all"))
    assert summary["images"] == IMAGES
    for res in ("full_res", "model_res"):
        scores = summary[res]
        assert scores["miou"] == scores["mdice"] == scores["background_iou"] == scores["pixel_accuracy"] == 1.0, res
        assert {n: s["iou"] for n, s in scores["per_class"].items()} == dict.fromkeys(CLASS_NAMES, 1.0), res
    assert [w["miou_full_res"] for w in summary["worst"]] == [1.0] * 8


def test_everything_one_part_scores_what_the_geometry_says(checkpoint, parts_dir, tmp_path, monkeypatch):
    stand_in_network(monkeypatch, parts_dir, all_left_door)
    out = tmp_path / "eval"
    summary = evaluate.main(argv(checkpoint, parts_dir, out, "--split", "all"))
    left = LEFT_DOOR / PIXELS  # every pixel predicted left door: TP = the left door, FP = the rest, FN = 0
    for res in ("full_res", "model_res"):
        scores = summary[res]
        per_class = scores["per_class"]
        assert per_class["left_door"]["iou"] == pytest.approx(left, abs=1e-12)
        assert per_class["left_door"]["dice"] == pytest.approx(2 * LEFT_DOOR / (LEFT_DOOR + PIXELS), abs=1e-12)
        assert [per_class[n]["iou"] for n in ("background", "right_door", "wheel")] == [0.0, 0.0, 0.0]
        assert [per_class[n]["pixels"] for n in CLASS_NAMES] == [IMAGES * n for n in (BACKGROUND, LEFT_DOOR,
                                                                                      RIGHT_DOOR, WHEEL)]
        assert per_class["left_door"]["predicted"] == IMAGES * PIXELS
        assert scores["miou"] == pytest.approx(left / 3, abs=1e-12)  # the background is not among the parts
        assert scores["pixel_accuracy"] == pytest.approx(left, abs=1e-12)
    with open(out / "per_image.csv") as f:
        assert [float(r["miou_full_res"]) for r in csv.DictReader(f)] == pytest.approx([left / 3] * IMAGES, abs=1e-12)


# ---------------------------------------------------------------- refusals

def rewrite_categories(data_dir: Path, names: dict) -> Path:
    """Rename categories of a COCO folder by id: {category id: new name}."""
    path = data_dir / "annotations.json"
    coco = json.loads(path.read_text())
    coco["categories"] = [{**c, "name": names.get(c["id"], c["name"])} for c in PART_CATEGORIES]
    path.write_text(json.dumps(coco))
    return data_dir


@pytest.mark.parametrize("other, difference", [
    ("renamed", r"only in the data: \['tyre'\]; only in the checkpoint: \['wheel'\]"),
    ("reordered", r"the same names in another order \(class 1 is 'right_door' there, 'left_door' here\)"),
    ("binary", r"only in the data: \['car'\]; only in the checkpoint: \['left_door', 'right_door', 'wheel'\]")])
def test_data_with_other_classes_is_refused_naming_both(checkpoint, tmp_path, monkeypatch, other, difference):
    if other == "binary":
        data_dir = write_kaggle_dataset(tmp_path / "kaggle", cars=["aaaaaaaaaa01"], views=1)
    else:
        names = {4: "tyre"} if other == "renamed" else {2: "right_door", 3: "left_door"}
        data_dir = rewrite_categories(write_coco_dataset(tmp_path / "coco", count=2), names)
    monkeypatch.setattr(evaluate, "prepare_store", lambda *a, **k: pytest.fail("decoded before checking the classes"))
    with pytest.raises(SystemExit) as refused:
        evaluate.main(argv(checkpoint, data_dir, tmp_path / "eval"))
    message = str(refused.value)
    assert f"data folder {data_dir}" in message and f"checkpoint {checkpoint}" in message
    assert re.search(difference, message), message


def test_a_threshold_is_refused_for_a_parts_checkpoint(checkpoint, parts_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("scored despite --threshold"))
    with pytest.raises(SystemExit, match=r"--threshold 0\.5: .* 4-class parts model; .*argmax"):
        evaluate.main(argv(checkpoint, parts_dir, tmp_path / "eval", "--threshold", "0.5"))
