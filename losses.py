"""Differentiable training objectives on logits: BCE-with-logits plus soft Dice for the binary car
mask, cross-entropy plus multi-class soft Dice for car parts.

All are computed in fp32 whatever the autocast dtype: a bf16 sum over 150 k pixels loses the
low bits that make up the Dice gradient near convergence.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged over the batch; targets may be soft (in [0, 1]).

    `eps` smooths the ratio so an empty target with an empty prediction has loss 0, not 0/0.
    """
    probs = torch.sigmoid(logits.float()).flatten(1)    # (B, H*W)
    targets = targets.float().flatten(1)
    intersection = (probs * targets).sum(1)
    total = probs.sum(1) + targets.sum(1)
    return (1.0 - (2.0 * intersection + eps) / (total + eps)).mean()


def boundary_weights(targets: torch.Tensor, weight: float, radius: int = 2) -> torch.Tensor:
    """Per-pixel weights 1 + weight near the mask's edge, scaled to mean 1 in each image.

    A pixel is near the edge when its (2 * radius + 1)^2 window holds both car and background (or a
    soft boundary value). With radius 2 that band is 2-3 % of a 480x320 Carvana sample but holds
    nearly all of its error, so an unweighted loss spends most of its signal on pixels already right.
    """
    local = F.avg_pool2d(targets, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    near = (local > 1e-6) & (local < 1 - 1e-6)
    weights = 1.0 + weight * near.float()
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits (edge pixels weighted up by boundary_weight) + dice_weight * soft Dice, in fp32."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, boundary_weight: float = 0.0):
        super().__init__()
        self.bce_weight, self.dice_weight, self.boundary_weight = bce_weight, dice_weight, boundary_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            weights = boundary_weights(targets, self.boundary_weight) if self.boundary_weight else None
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits, targets, weight=weights)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, targets)
        return loss


def _class_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Check (B, C, H, W) logits against (B, H, W) integer class indices in [0, C); return them as int64.

    Raises ValueError on a shape mismatch, float targets or an index outside [0, C). The range check
    costs one device sync, but an index of C or more (a 255 "void" label, a mask of the wrong data
    set) would otherwise be a CUDA device-side assert that kills the process, or a wrong loss.
    """
    if logits.ndim != 4 or targets.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"expected logits (B, C, H, W) and targets (B, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class indices, got {targets.dtype}")
    low, high = torch.aminmax(targets)
    low, high = low.item(), high.item()
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"target class indices must lie in [0, {logits.shape[1]}), found [{low}, {high}]")
    return targets.long()


def multiclass_soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0,
                              ignore_background: bool = False) -> torch.Tensor:
    """1 - soft Dice of the softmax probabilities, per class over the whole batch, averaged over classes.

    logits (B, C, H, W) of any float dtype (upcast to fp32), targets (B, H, W) integer indices in
    [0, C) -> scalar fp32. For each class c: (2 * sum(p_c * t_c) + eps) / (sum(p_c) + sum(t_c) + eps),
    sums over B, H and W. The mean is over all C classes (1..C-1 with `ignore_background`), not only
    those in the batch's targets: a class absent from the batch then scores 1 - eps / (sum(p_c) + eps),
    about 0 when the net predicts none of it and rising with the mass it wrongly predicts, so false
    parts are still penalised; `eps` keeps that case 0 instead of 0/0. Sums over the whole batch (not
    per image) because a small part (a mirror, a light) is missing from most images, and a per-image
    mean would be dominated by those near-empty terms. Raises ValueError as `_class_targets` does.
    """
    return _multiclass_soft_dice(logits, _class_targets(logits, targets), eps, ignore_background)


def _multiclass_soft_dice(logits, targets, eps=1.0, ignore_background=False):
    """multiclass_soft_dice_loss on targets already checked by `_class_targets` (one range check per step)."""
    probs = torch.softmax(logits.float(), dim=1)                       # (B, C, H, W)
    # fp32 one-hot, already (B, C, H, W): F.one_hot would give int64 (B, H, W, C), twice the memory, to permute
    one_hot = torch.zeros_like(probs).scatter_(1, targets[:, None], 1.0)
    intersection = (probs * one_hot).sum((0, 2, 3))                    # (C,)
    total = probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
    dice = (2.0 * intersection + eps) / (total + eps)
    if ignore_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


class CEDiceLoss(nn.Module):
    """ce_weight * cross-entropy + dice_weight * multi-class soft Dice, in fp32.

    forward: logits (B, C, H, W), targets (B, H, W) int64 class indices -> scalar fp32. Cross-entropy
    gives every pixel a gradient from the start; Dice keeps the small parts from being drowned by the
    background and body panels, which hold most pixels. A weight of 0 switches its term off.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _class_targets(logits, targets)
        logits = logits.float()
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits, targets)
        if self.dice_weight:
            loss = loss + self.dice_weight * _multiclass_soft_dice(logits, targets)
        return loss
