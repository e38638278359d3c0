"""Protects the hard-mask scores (Dice, IoU, pooled scores, pixel accuracy) against hand-computed answers."""
import pytest
import torch

from metrics import SegmentationMeter, dice_per_image, iou_per_image


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
