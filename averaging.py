"""What the model predicts with, as opposed to what the optimizer last left: an exponential moving
average (EMA) of the weights, and BatchNorm statistics recomputed for the weights at hand.

BatchNorm's running statistics are an average over the last few dozen training batches, taken while
the weights moved. With a high learning rate they no longer match the weights at the end of the
epoch, and validation Dice swings from epoch to epoch. Recomputing them with the weights at hand on
batches drawn like the training batches ("precise BN", Wu & Johnson 2021) removes that mismatch.
"""
import copy

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import runtime


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        """Average `model` (the uncompiled module being trained) from its current weights on."""
        self.decay, self.source = decay, model
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        # Ramp the decay up (as timm does), so the random initial weights are forgotten quickly.
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int):
        """Fold in the trained model's weights after optimisation step `step` (1 is the first)."""
        ema, new = self.model.state_dict(), self.source.state_dict()
        floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([ema[k] for k in floats], [new[k] for k in floats], 1.0 - self.decay_at(step))
        for k, v in ema.items():
            if not v.dtype.is_floating_point:  # e.g. BatchNorm's num_batches_tracked
                v.copy_(new[k])


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, batches, device, precision, channels_last=True) -> int:
    """Replace every BatchNorm's running mean/var by their exact average over `batches` of images.

    Returns the number of images used; a model without BatchNorm, or no images, is left as it is.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return 0
    was_training, momenta = model.training, [bn.momentum for bn in norms]
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in norms]
    count = 0
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # None = a cumulative average over all batches seen, not an EMA
        model.train()
        for images in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with runtime.autocast(device, precision):
                model(images)
            count += len(images)
    finally:
        for bn, momentum, state in zip(norms, momenta, saved):
            bn.momentum = momentum
            if count == 0:  # nothing was seen (or the first batch failed): keep the old statistics
                bn.load_state_dict(state)
        model.train(was_training)
    return count
