"""Multi-class (car parts) training end to end: the COCO and class-index layouts, mirroring that swaps
left and right, TTA that relabels, exact resume, and every architecture trained from its checkpoint alone."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import train
from conftest import MODEL_SIZE, parts_picture, tiny_config, write_coco_dataset
from carseg.augment import MirrorSwappingSides, build_transform
from dataset import find_class_names, find_samples
from inference import InferenceSpec, Predictor
from carseg.labels import flip_permutation
from model import load_model
from carseg.checkpoint import load_checkpoint
from test_train import assert_same_training

NAMES = ["background", "left_door", "right_door", "wheel"]


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory) -> Path:
    return write_coco_dataset(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def straight(parts_dir, work):
    cfg = tiny_config(parts_dir, work, run_name="straight")
    return cfg, train.train(cfg)


def test_a_coco_folder_trains_a_multiclass_model_that_records_its_classes(straight):
    cfg, summary = straight
    run = Path(summary["run_dir"])
    checkpoint = load_checkpoint(run / "best.pt")
    assert checkpoint["class_names"] == NAMES  # the _background_ category became index 0
    assert checkpoint["model_args"]["out_channels"] == 4
    assert load_model(checkpoint)(torch.rand(1, 3, 48, 64)).shape == (1, 4, 48, 64)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("val_miou_full_res", "val_mdice_full_res", "val_pixel_accuracy_full_res", "val_miou_model_res"):
        assert 0 <= record[key] <= 1, key
    assert summary["best_val_score"] == max(json.loads(line)["val_miou_full_res"]
                                           for line in (run / "metrics.jsonl").read_text().splitlines())
    assert (run / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_of_a_multiclass_run_is_exact(straight, parts_dir, work):
    _, summary = straight
    cfg = tiny_config(parts_dir, work, run_name="extended", epochs=1)
    train.train(cfg)
    run = Path(cfg.out_dir) / "extended"
    train.main(["--resume", str(run / "last.pt"), "--epochs", "2"])
    assert_same_training(run, Path(summary["run_dir"]))


def test_mirroring_turns_a_left_door_into_a_right_door():
    image, _ = parts_picture(0)
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[:, :10] = 1   # left_door at the left edge
    mask[:, -10:] = 2  # right_door at the right edge
    mask[-5:, 40:50] = 3  # wheel
    out = MirrorSwappingSides(flip_permutation(NAMES), p=1.0)(image=image, mask=mask)
    assert np.array_equal(out["image"], image[:, ::-1])
    mirrored = out["mask"]
    assert (mirrored[:, :10] == 1).all()  # the right door, mirrored to the left, is now the *left* door
    assert (mirrored[:, -10:] == 2).all()
    assert np.array_equal(mirrored == 3, (mask == 3)[:, ::-1])  # a wheel stays a wheel


def test_training_augmentation_mirrors_half_the_time_and_always_swaps_sides():
    image, _ = parts_picture(1)
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[:, :48] = 1
    mask[:, 48:] = 2
    transform = build_transform("light", None, NAMES)
    transform.set_random_seed(0)
    for _ in range(40):
        out = transform(image=image, mask=mask)["mask"]
        assert set(np.unique(out)) <= {0, 1, 2}  # nearest-neighbour warps: no blended class indices
        # whatever happened, the left side of the picture is the left door
        assert (out[:, :40] != 2).all() and (out[:, 56:] != 1).all()
    # the geometry was mirrored in about half of the draws: the colours of the photo say so
    flips = [transform(image=image, mask=mask)["image"] for _ in range(40)]
    assert 5 < sum(int(f[:, :48].mean() < f[:, 48:].mean()) != int(image[:, :48].mean() < image[:, 48:].mean())
                   for f in flips) < 35


def test_tta_relabels_the_mirrored_answer():
    """A network that is right about sides answers 'left door' on the left of any photo, mirrored or
    not; TTA must give the same map, not a blend of left and right."""
    def sided_runner(images):  # (B, 3, h, w) -> one-hot logits: left half left_door, right half right_door
        b, _, h, w = images.shape
        logits = torch.full((b, 4, h, w), -10.0)
        logits[:, 1, :, : w // 2] = 10.0
        logits[:, 2, :, w // 2:] = 10.0
        return logits
    sided_runner.device = torch.device("cpu")
    spec = InferenceSpec(MODEL_SIZE, 0.5, {"mean": [0.0] * 3, "std": [1.0] * 3}, tuple(NAMES))
    batch = torch.rand(2, 3, 48, 64)
    plain = Predictor(sided_runner, spec).labels(batch, [(64, 48)] * 2)
    tta = Predictor(sided_runner, spec, tta=True).labels(batch, [(64, 48)] * 2)
    for a, b in zip(plain, tta):
        assert np.array_equal(a, b)
        assert (a[:, :32] == 1).all() and (a[:, 32:] == 2).all()


@pytest.mark.slow
def test_a_class_index_png_folder_with_classes_txt_trains(tmp_path, work):
    root = tmp_path / "plain_parts"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    for i in range(8):
        image, shapes = parts_picture(i)
        mask = Image.new("L", (image.shape[1], image.shape[0]), 0)
        for category, polygon in shapes:
            ImageDraw.Draw(mask).polygon(polygon, fill=category - 1)
        Image.fromarray(image).save(root / "images" / f"view_{i:02d}.png")
        mask.save(root / "masks" / f"view_{i:02d}.png")
    assert find_class_names(root) == NAMES
    cfg = tiny_config(root, work, run_name="plain-parts", epochs=1, group_by="none")
    summary = train.train(cfg)
    assert load_checkpoint(Path(summary["run_dir"]) / "best.pt")["class_names"] == NAMES


def test_bad_annotations_stop_training_before_it_starts_listing_every_problem(tmp_path, work):
    root = write_coco_dataset(tmp_path / "bad", count=6)
    coco = json.loads((root / "annotations.json").read_text())
    coco["annotations"][0]["category_id"] = 99                        # an unknown category
    coco["annotations"][1]["segmentation"] = [[0, 0, 500, 0, 500, 40]]  # a polygon outside the 96x64 image
    (root / "JPEGImages" / coco["images"][2]["file_name"]).unlink()    # an image listed but missing
    (root / "annotations.json").write_text(json.dumps(coco))
    cfg = tiny_config(root, work, run_name="bad")
    with pytest.raises(ValueError) as error:
        train.train(cfg)
    message = str(error.value)
    assert "3 problem(s)" in message and "99" in message and "outside" in message
    assert coco["images"][2]["file_name"] in message
    assert not (Path(cfg.out_dir) / "bad" / "last.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["unet_efficientnet_lite0", "deeplabv3_efficientnet_lite0",
                                  "deeplabv3_mobilenet_v3_large"])
def test_each_architecture_trains_on_parts_and_predicts_from_its_checkpoint(arch, parts_dir, work):
    cfg = tiny_config(parts_dir, work, run_name=f"arch-{arch}", arch=arch, epochs=1, image_width=64, image_height=64,
                      pretrained=False)
    summary = train.train(cfg)
    predictor = Predictor.from_checkpoint(Path(summary["run_dir"]) / "best.pt")
    photo = sorted((parts_dir / "JPEGImages").glob("*.jpg"))[0]
    labels = predictor.predict_labels([photo])[0]
    assert labels.shape == (64, 96) and labels.max() < 4
    assert find_samples(parts_dir)[1] == []


def test_resume_on_data_of_other_classes_is_refused_before_decoding(straight, kaggle_dir, monkeypatch):
    _, summary = straight
    monkeypatch.setattr(train, "build_stores", lambda cfg: pytest.fail("the data was decoded"))
    with pytest.raises(SystemExit, match=r"trained on the classes \['background', 'left_door'.*has \['background', "
                                         r"'car'\]"):
        train.main(["--resume", str(Path(summary["run_dir"]) / "last.pt"), "--data-dir", str(kaggle_dir)])


def test_annotations_that_mark_nothing_are_refused(tmp_path, work):
    root = write_coco_dataset(tmp_path / "empty", count=6)
    coco = json.loads((root / "annotations.json").read_text())
    coco["annotations"] = []
    (root / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="every mask in .* is background: there is nothing to learn"):
        train.train(tiny_config(root, work, run_name="empty"))
