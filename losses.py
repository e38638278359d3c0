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


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits + dice_weight * soft Dice loss, in fp32."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits, targets)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, targets)
        return loss
