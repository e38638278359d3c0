"""Protects the hard-mask scores (Dice, IoU, pooled scores, pixel accuracy; the multi-class confusion
matrix and mIoU) against hand-computed answers."""
import json

import numpy as np
import pytest
import torch

from metrics import ConfusionMeter, SegmentationMeter, confusion_from, dice_per_image, iou_per_image


def t(rows):
    """A (1, H, W) bool mask from nested lists."""
    return torch.tensor(rows, dtype=torch.bool)[None]


# 2x2: intersection 2, |pred| 3, |true| 3 -> Dice 4/6, IoU 2/4; TP 2, TN 0 -> accuracy 2/4.
PRED_2 = [[1, 0], [1, 1]]
TRUE_2 = [[1, 1], [0, 1]]
# 4x4: pred = left two columns (8 px), true = top-left 3x3 (9 px): intersection 6 ->
# Dice 12/17, IoU 6/11; FP 2, FN 3, TN 16-6-2-3 = 5 -> correct 11.
PRED_4 = [[1, 1, 0, 0]] * 4
TRUE_4 = [[1, 1, 1, 0]] * 3 + [[0, 0, 0, 0]]


@pytest.mark.parametrize("pred, true, dice, iou", [
    (PRED_2, TRUE_2, 4 / 6, 2 / 4),
    (PRED_4, TRUE_4, 12 / 17, 6 / 11),
    (TRUE_4, TRUE_4, 1.0, 1.0),
    ([[1, 1], [0, 0]], [[0, 0], [1, 1]], 0.0, 0.0),
])
def test_dice_and_iou_hand_computed(pred, true, dice, iou):
    got_dice, got_iou = dice_per_image(t(pred), t(true)), iou_per_image(t(pred), t(true))
    assert got_dice.dtype == torch.float64 and got_dice.shape == (1,)
    assert got_dice.item() == pytest.approx(dice, abs=1e-12)
    assert got_iou.item() == pytest.approx(iou, abs=1e-12)


def test_float_01_masks_score_like_bool_masks():
    pred, true = t(PRED_4).float(), t(TRUE_4).float()
    assert dice_per_image(pred, true).item() == pytest.approx(12 / 17, abs=1e-12)


def test_empty_truth_and_empty_prediction_is_perfect():
    empty = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert dice_per_image(empty, empty).item() == 1.0
    assert iou_per_image(empty, empty).item() == 1.0


def test_any_predicted_pixel_on_empty_truth_scores_zero():
    empty = torch.zeros(1, 3, 3, dtype=torch.bool)
    one = empty.clone()
    one[0, 1, 1] = True
    assert dice_per_image(one, empty).item() == 0.0
    assert iou_per_image(one, empty).item() == 0.0
    assert dice_per_image(empty, one).item() == 0.0  # missing a car entirely also scores 0


def test_per_image_mean_differs_from_pooled_dice():
    # Image A: 16 true pixels, all predicted -> Dice 1. Image B: 1 true pixel, none predicted -> Dice 0.
    # Mean per image = (1 + 0) / 2 = 0.5; pooled: I = 16, |P| = 16, |T| = 17 -> 32 / 33.
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    true = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0], true[0] = True, True
    true[1, 2, 2] = True
    assert dice_per_image(pred, true).tolist() == [1.0, 0.0]
    scores = SegmentationMeter()
    scores.update(pred, true)
    result = scores.compute()
    assert result["dice"] == pytest.approx(0.5, abs=1e-12)
    assert result["dice_pooled"] == pytest.approx(32 / 33, abs=1e-12)
    assert result["iou_pooled"] == pytest.approx(16 / 17, abs=1e-12)  # |A∪B| = 16 + 17 - 16
    assert result["pixel_accuracy"] == pytest.approx(31 / 32, abs=1e-12)  # one false negative in 32 pixels


def test_meter_over_two_batches_equals_one_batch():
    pred = torch.rand(6, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    true = torch.rand(6, 5, 7, generator=torch.Generator().manual_seed(2)) > 0.4
    whole, parts = SegmentationMeter(), SegmentationMeter()
    whole.update(pred, true)
    parts.update(pred[:2], true[:2])
    parts.update(pred[2:], true[2:])
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    assert a["images"] == 6


def test_pixel_accuracy_hand_computed():
    scores = SegmentationMeter()
    scores.update(t(PRED_2), t(TRUE_2))
    assert scores.compute()["pixel_accuracy"] == pytest.approx(2 / 4, abs=1e-12)


def test_images_of_different_sizes_in_successive_updates():
    scores = SegmentationMeter()
    first = scores.update(t(PRED_2), t(TRUE_2))     # a 2x2 image
    second = scores.update(t(PRED_4), t(TRUE_4))    # then a 4x4 one
    assert first.item() == pytest.approx(4 / 6) and second.item() == pytest.approx(12 / 17)
    result = scores.compute()
    assert result["images"] == 2
    assert result["dice"] == pytest.approx((4 / 6 + 12 / 17) / 2, abs=1e-12)
    assert result["iou"] == pytest.approx((2 / 4 + 6 / 11) / 2, abs=1e-12)
    # pooled: I = 2 + 6 = 8, |P| = 3 + 8 = 11, |T| = 3 + 9 = 12 -> Dice 16/23, IoU 8/15
    assert result["dice_pooled"] == pytest.approx(16 / 23, abs=1e-12)
    assert result["iou_pooled"] == pytest.approx(8 / 15, abs=1e-12)
    # correct pixels 2 + 11 out of 4 + 16
    assert result["pixel_accuracy"] == pytest.approx(13 / 20, abs=1e-12)


def test_compute_before_update_is_an_error():
    with pytest.raises(ValueError, match="before any update"):
        SegmentationMeter().compute()


# ---- multi-class (car parts): the confusion matrix and the scores read from it ----

# 3 classes on a 2x3 image; (true, predicted) pairs, row by row: (0,0) (0,1) (1,1) / (1,1) (2,2) (2,0)
TRUE_3 = [[0, 0, 1], [1, 2, 2]]
PRED_3 = [[0, 1, 1], [1, 2, 0]]
CONFUSION_3 = [[1, 1, 0],   # true 0: once right, once called 1
               [0, 2, 0],   # true 1: both right
               [1, 0, 1]]   # true 2: once right, once called 0
NAMES_3 = ["background", "door", "wheel"]


def test_confusion_matrix_by_hand():
    got = confusion_from(np.array(PRED_3), np.array(TRUE_3), 3)
    assert got.dtype == np.int64 and got.shape == (3, 3)
    assert got.tolist() == CONFUSION_3


def test_confusion_meter_scores_by_hand():
    meter = ConfusionMeter(3)
    meter.update(torch.tensor(PRED_3), torch.tensor(TRUE_3))
    result = meter.compute(NAMES_3)
    # TP = diagonal (1, 2, 1); true pixels = row sums (2, 2, 2); predicted = column sums (2, 3, 1)
    expected = {"background": (1 / 3, 1 / 2, 2, 2),   # IoU 1 / (2 + 2 - 1), Dice 2*1 / (2 + 2)
                "door": (2 / 3, 4 / 5, 2, 3),         # IoU 2 / (2 + 3 - 2), Dice 2*2 / (2 + 3)
                "wheel": (1 / 2, 2 / 3, 2, 1)}        # IoU 1 / (2 + 1 - 1), Dice 2*1 / (2 + 1)
    assert list(result["per_class"]) == NAMES_3
    for name, (iou, dice, pixels, predicted) in expected.items():
        scores = result["per_class"][name]
        assert scores["iou"] == pytest.approx(iou, abs=1e-12), name
        assert scores["dice"] == pytest.approx(dice, abs=1e-12), name
        assert (scores["pixels"], scores["predicted"]) == (pixels, predicted), name
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-12)    # parts only: 7/12
    assert result["mdice"] == pytest.approx((4 / 5 + 2 / 3) / 2, abs=1e-12)   # 11/15
    assert result["background_iou"] == pytest.approx(1 / 3, abs=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6, abs=1e-12)        # trace 4 of 6 pixels
    assert result["confusion"] == CONFUSION_3
    assert json.loads(json.dumps(result)) == result  # plain Python numbers, ready for an evaluation report


def test_a_class_absent_from_truth_and_prediction_is_none_and_left_out_of_the_means():
    meter = ConfusionMeter(4)
    meter.update(np.array(PRED_3), np.array(TRUE_3))
    result = meter.compute(NAMES_3 + ["mirror"])
    assert result["per_class"]["mirror"] == {"iou": None, "dice": None, "pixels": 0, "predicted": 0}
    assert result["miou"] == pytest.approx(7 / 12, abs=1e-12)    # as with 3 classes, not (2/3 + 1/2 + 0) / 3
    assert result["mdice"] == pytest.approx(11 / 15, abs=1e-12)
    assert result["confusion"] == [row + [0] for row in CONFUSION_3] + [[0, 0, 0, 0]]


def test_a_class_only_predicted_scores_zero_and_counts_in_the_mean():
    # truth (1, 1), prediction (1, 3): door IoU 1 / (1 + 2 - 1) = 1/2; mirror IoU 0 / (0 + 1 - 0) = 0;
    # wheel (2) absent from both -> None; background absent from both -> None
    meter = ConfusionMeter(4)
    meter.update(torch.tensor([1, 3]), torch.tensor([1, 1]))
    result = meter.compute(["background", "door", "wheel", "mirror"])
    assert result["per_class"]["mirror"]["iou"] == 0.0 and result["per_class"]["wheel"]["iou"] is None
    assert result["miou"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-12)
    assert result["background_iou"] is None
    assert result["pixel_accuracy"] == pytest.approx(1 / 2, abs=1e-12)


def test_two_updates_equal_one_update_on_the_concatenation():
    rng = np.random.default_rng(0)
    pred, true = rng.integers(0, 5, (2, 6, 7)), rng.integers(0, 5, (2, 6, 7))
    whole, parts = ConfusionMeter(5), ConfusionMeter(5)
    whole.update(np.concatenate(list(pred)), np.concatenate(list(true)))
    parts.update(pred[0], true[0])
    parts.update(torch.from_numpy(pred[1]), torch.from_numpy(true[1]))   # numpy then torch
    names = [f"class{i}" for i in range(5)]
    assert whole.compute(names) == parts.compute(names)
    assert np.array_equal(whole.confusion, parts.confusion) and whole.confusion.sum() == 2 * 6 * 7


@pytest.mark.parametrize("convert", [
    np.array, lambda a: np.array(a, np.uint8), torch.tensor, lambda a: torch.tensor(a, dtype=torch.uint8),
    lambda a: np.fliplr(np.array(a)[:, ::-1]),  # a negative-stride view of the same values
])
def test_numpy_and_torch_inputs_give_the_same_confusion(convert):
    assert confusion_from(convert(PRED_3), convert(TRUE_3), 3).tolist() == CONFUSION_3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_confusion_of_cuda_tensors():
    assert confusion_from(torch.tensor(PRED_3).cuda(), torch.tensor(TRUE_3).cuda(), 3).tolist() == CONFUSION_3


@pytest.mark.parametrize("pred, true, match", [
    ([[0, 3]], [[0, 1]], r"\[0, 3\)"),          # class 3 of 3 would land in the next row
    ([[0, 1]], [[255, 1]], r"\[0, 3\)"),        # a "void" label
    ([[0, -1]], [[0, 1]], r"\[0, 3\)"),
    ([[0, 1, 1]], [[0, 1]], "shapes differ"),
])
def test_bad_class_maps_raise_value_error(pred, true, match):
    with pytest.raises(ValueError, match=match):
        ConfusionMeter(3).update(np.array(pred), np.array(true))


def test_float_class_maps_raise_value_error():
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_from(np.zeros((2, 2)), np.zeros((2, 2), np.int64), 3)
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_from(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2), 3)


def test_confusion_meter_misuse_raises_value_error():
    with pytest.raises(ValueError, match="before update"):
        ConfusionMeter(3).compute(NAMES_3)
    meter = ConfusionMeter(3)
    meter.update(np.array(PRED_3), np.array(TRUE_3))
    with pytest.raises(ValueError, match="3 distinct class names"):
        meter.compute(NAMES_3[:2])
    with pytest.raises(ValueError, match="3 distinct class names"):
        meter.compute(["a", "a", "b"])
    with pytest.raises(ValueError, match="at least 2"):
        ConfusionMeter(1)
