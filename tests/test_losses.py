"""Protects the losses (soft Dice, BCE + Dice; multi-class Dice, CE + Dice) against hand-computed values,
dtype drift and NaN gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import BCEDiceLoss, CEDiceLoss, boundary_weights, multiclass_soft_dice_loss, soft_dice_loss

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def img(rows):
    """(1, 1, H, W) float tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_perfect_prediction_has_zero_dice_loss():
    targets = img([[1, 0, 1], [0, 1, 1]])
    logits = (targets * 2 - 1) * 30.0  # +30 on car, -30 on background
    assert soft_dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("eps, expected", [
    # probs [[.75, .5], [.25, .5]], targets [[1, 1], [0, 0]]: I = 1.25, sum(p) = 2, sum(t) = 2
    (1.0, 1 - (2 * 1.25 + 1) / (4 + 1)),   # 0.3
    (0.0, 1 - (2 * 1.25) / 4),             # 0.375
    (0.5, 1 - (2 * 1.25 + 0.5) / 4.5),     # 1/3
])
def test_soft_dice_hand_computed_2x2(eps, expected):
    logits = img([[LN3, 0.0], [-LN3, 0.0]])
    targets = img([[1, 1], [0, 0]])
    assert soft_dice_loss(logits, targets, eps=eps).item() == pytest.approx(expected, abs=1e-6)


def test_soft_dice_is_the_mean_of_per_image_losses():
    # image 1: the 2x2 case above (0.3); image 2: probs all 0.5, empty target: (0 + 1) / (2 + 0 + 1) -> 1 - 1/3
    logits = torch.cat([img([[LN3, 0.0], [-LN3, 0.0]]), img([[0.0, 0.0], [0.0, 0.0]])])
    targets = torch.cat([img([[1, 1], [0, 0]]), img([[0, 0], [0, 0]])])
    assert soft_dice_loss(logits, targets).item() == pytest.approx((0.3 + 2 / 3) / 2, abs=1e-6)


def test_empty_target_and_empty_prediction_has_zero_loss():
    targets = torch.zeros(2, 1, 4, 4)
    logits = torch.full((2, 1, 4, 4), -30.0)
    assert soft_dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert BCEDiceLoss()(logits, targets).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bce_weight, dice_weight", [(1.0, 1.0), (0.7, 1.3), (1.0, 0.0), (0.0, 2.0)])
def test_bce_dice_is_the_weighted_sum_of_its_parts(bce_weight, dice_weight):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 6, generator=g) * 3
    targets = (torch.rand(3, 1, 5, 6, generator=g) > 0.5).float()
    expected = bce_weight * F.binary_cross_entropy_with_logits(logits, targets) \
        + dice_weight * soft_dice_loss(logits, targets)
    got = BCEDiceLoss(bce_weight, dice_weight)(logits, targets)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_loss_is_fp32_for_bf16_logits():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 1, 8, 8, generator=g) * 2).bfloat16()
    targets = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).bfloat16()
    loss = BCEDiceLoss()(logits, targets)
    assert loss.dtype == torch.float32
    assert soft_dice_loss(logits, targets).dtype == torch.float32
    # The upcast is exact, so the bf16 loss equals the fp32 loss of the same (bf16-rounded) values.
    assert torch.equal(loss, BCEDiceLoss()(logits.float(), targets.float()))


@pytest.mark.parametrize("scale", [50.0, 1e4])
def test_gradient_is_finite_at_large_logits(scale):
    targets = img([[1, 0], [0, 1]])
    # right and wrong answers, both saturated
    logits = (img([[1, -1], [1, -1]]) * scale).requires_grad_()
    loss = BCEDiceLoss()(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_soft_targets_are_accepted():
    # logits 0 -> p = 0.5 against targets 0.5: BCE = ln 2 per pixel; Dice: I = 4 * 0.25 = 1,
    # sum(p) = sum(t) = 2 -> 1 - (2 + 1) / (4 + 1) = 0.4
    logits = torch.zeros(1, 1, 2, 2)
    targets = torch.full((1, 1, 2, 2), 0.5)
    assert soft_dice_loss(logits, targets).item() == pytest.approx(0.4, abs=1e-6)
    assert BCEDiceLoss()(logits, targets).item() == pytest.approx(math.log(2) + 0.4, abs=1e-6)


def test_boundary_weights_by_hand():
    # One row, car from column 3 on. With radius 1, only columns 2 and 3 see both classes in their
    # 3-wide window (the window is cut, not zero-padded, at the image's ends).
    targets = img([[0, 0, 0, 1, 1, 1, 1]])
    weights = boundary_weights(targets, weight=3.0, radius=1)
    raw = torch.tensor([1, 1, 4, 4, 1, 1, 1], dtype=torch.float32)
    assert torch.allclose(weights[0, 0, 0], raw / raw.mean())
    # radius 2 (the default) widens the band to columns 1..4
    raw = torch.tensor([1, 4, 4, 4, 4, 1, 1], dtype=torch.float32)
    assert torch.allclose(boundary_weights(targets, 3.0)[0, 0, 0], raw / raw.mean())


def test_boundary_weights_treat_soft_pixels_as_edge_and_keep_each_image_mean_one():
    targets = torch.cat([img([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.4]]),   # one soft pixel
                         img([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])])   # no edge at all
    weights = boundary_weights(targets, weight=2.0, radius=1)
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(2))
    assert torch.equal(weights[1], torch.ones(1, 2, 6))
    near = weights[0, 0] > weights[0, 0].min()
    assert near.tolist() == [[False] * 4 + [True] * 2, [False] * 4 + [True] * 2]


def test_boundary_weighted_bce_by_hand():
    # logits 0 everywhere -> BCE ln 2 per pixel whatever the target, so the weighted mean is still ln 2;
    # with logits ln 3 on the edge pixels only, their BCE changes and enters with weight 4/mean.
    targets = img([[0, 0, 0, 1, 1, 1, 1]])
    assert BCEDiceLoss(1.0, 0.0, boundary_weight=3.0)(torch.zeros_like(targets), targets).item() \
        == pytest.approx(math.log(2), abs=1e-6)
    logits = img([[0, LN3, LN3, LN3, LN3, 0, 0]])      # p = 0.75 on columns 1..4 (the radius-2 band)
    per_pixel = [math.log(2), -math.log(0.25), -math.log(0.25), -math.log(0.75), -math.log(0.75),
                 math.log(2), math.log(2)]
    w = [1, 4, 4, 4, 4, 1, 1]
    expected = sum(a * b for a, b in zip(w, per_pixel)) / sum(w)
    assert BCEDiceLoss(1.0, 0.0, boundary_weight=3.0)(logits, targets).item() == pytest.approx(expected, abs=1e-6)


# ---- multi-class (car parts): cross-entropy + soft Dice over class-index targets ----

# A 2x2 image with 3 classes: class 0 on the top row, class 1 and 2 one pixel each.
PARTS = torch.tensor([[[0, 0], [1, 2]]])


def perfect_logits(targets, num_classes, scale=40.0):
    """(B, C, H, W) logits with +scale on each pixel's true class and 0 elsewhere."""
    return F.one_hot(targets, num_classes).permute(0, 3, 1, 2).float() * scale


@pytest.mark.parametrize("num_classes", [3, 5])  # 5: classes 3 and 4 absent, and predicted absent
def test_multiclass_dice_of_a_perfect_prediction_is_zero(num_classes):
    logits = perfect_logits(PARTS, num_classes)
    assert multiclass_soft_dice_loss(logits, PARTS).item() == pytest.approx(0.0, abs=1e-6)
    assert multiclass_soft_dice_loss(logits, PARTS, ignore_background=True).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("eps, ignore_background, expected", [
    # Uniform logits: p = 1/3 on each of the 4 pixels. N = 4, true counts n = (2, 1, 1).
    # Class c: I = n_c / 3, sum(p) = 4/3, sum(t) = n_c.
    # eps 1: class 0 (2/3*2 + 1) / (4/3 + 2 + 1) = 7/13; classes 1, 2: (2/3 + 1) / (4/3 + 1 + 1) = 1/2
    (1.0, False, 1 - (7 / 13 + 1 / 2 + 1 / 2) / 3),   # 19/39
    # eps 0: class 0 (4/3) / (10/3) = 2/5; classes 1, 2: (2/3) / (7/3) = 2/7
    (0.0, False, 1 - (2 / 5 + 2 / 7 + 2 / 7) / 3),     # 71/105
    (1.0, True, 1 - (1 / 2 + 1 / 2) / 2),              # background left out: 1/2
])
def test_multiclass_dice_of_uniform_logits_by_hand(eps, ignore_background, expected):
    logits = torch.zeros(1, 3, 2, 2)
    got = multiclass_soft_dice_loss(logits, PARTS, eps=eps, ignore_background=ignore_background)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_a_class_absent_from_the_targets_is_still_penalised_for_predicted_mass():
    # All 4 pixels class 0, uniform over 2 classes (p = 1/2):
    # class 0: (2*2 + 1) / (2 + 4 + 1) = 5/7; class 1 (absent): (0 + 1) / (2 + 0 + 1) = 1/3
    targets = torch.zeros(1, 2, 2, dtype=torch.long)
    got = multiclass_soft_dice_loss(torch.zeros(1, 2, 2, 2), targets)
    assert got.item() == pytest.approx(1 - (5 / 7 + 1 / 3) / 2, abs=1e-6)  # 10/21


def test_multiclass_dice_pools_the_whole_batch():
    # Sums over B, H and W: two images in a batch score as one image of both side by side.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    targets = torch.randint(0, 4, (2, 3, 5), generator=g)
    side_by_side = multiclass_soft_dice_loss(torch.cat(list(logits), 2)[None], torch.cat(list(targets), 1)[None])
    assert multiclass_soft_dice_loss(logits, targets).item() == pytest.approx(side_by_side.item(), abs=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_multiclass_gradient_flows_and_is_finite(scale):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 3, 3, generator=g) * scale).requires_grad_()
    targets = torch.randint(0, 4, (2, 3, 3), generator=g)
    loss = CEDiceLoss()(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_multiclass_losses_are_fp32_for_bf16_logits():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 5, 4, 4, generator=g) * 2).bfloat16()
    targets = torch.randint(0, 5, (2, 4, 4), generator=g)
    for loss_fn in (multiclass_soft_dice_loss, CEDiceLoss()):
        loss = loss_fn(logits, targets)
        assert loss.dtype == torch.float32
        assert torch.equal(loss, loss_fn(logits.float(), targets))  # the upcast is exact


@pytest.mark.parametrize("ce_weight, dice_weight", [(1.0, 1.0), (0.4, 1.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_ce_dice_is_the_weighted_sum_of_its_parts(ce_weight, dice_weight):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 5, 4, generator=g) * 3
    targets = torch.randint(0, 6, (3, 5, 4), generator=g)
    ce, dice = F.cross_entropy(logits, targets), multiclass_soft_dice_loss(logits, targets)
    got = CEDiceLoss(ce_weight, dice_weight)(logits, targets)
    assert got.item() == pytest.approx(ce_weight * ce.item() + dice_weight * dice.item(), abs=1e-6)
    if dice_weight == 0:
        assert torch.equal(got, ce_weight * ce)  # the Dice term is off, not merely small


def test_uint8_targets_are_accepted():
    targets = PARTS.to(torch.uint8)
    assert CEDiceLoss()(torch.zeros(1, 3, 2, 2), targets).item() == pytest.approx(
        CEDiceLoss()(torch.zeros(1, 3, 2, 2), PARTS).item(), abs=1e-7)


@pytest.mark.parametrize("targets, match", [
    (torch.tensor([[[0, 0], [1, 3]]]), r"\[0, 3\)"),          # class 3 of 3
    (torch.tensor([[[0, 255], [1, 2]]]), r"\[0, 3\)"),        # a "void" label
    (torch.tensor([[[0, -1], [1, 2]]]), r"\[0, 3\)"),
    (PARTS.float(), "integer class indices"),
    (PARTS[:, :1], "targets"),                                # (1, 1, 2) vs logits (1, 3, 2, 2)
])
def test_bad_class_targets_raise_value_error(targets, match):
    for loss_fn in (multiclass_soft_dice_loss, CEDiceLoss()):
        with pytest.raises(ValueError, match=match):
            loss_fn(torch.zeros(1, 3, 2, 2), targets)
