"""Differentiable training objectives on logits: BCE-with-logits plus soft Dice.

Both are computed in fp32 whatever the autocast dtype: a bf16 sum over 150 k pixels loses the
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
