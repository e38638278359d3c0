"""BatchNorm statistics recomputed for the weights at hand ("precise BN", Wu & Johnson 2021).

BatchNorm's running statistics are an average over the last few dozen training batches, taken while
the weights moved. With a high learning rate they no longer match the weights at the end of the
epoch, and validation Dice swings from epoch to epoch (to 0.47-0.75 in this project's early runs).
Recomputing them with the weights at hand on batches drawn like the training batches removes that
mismatch.
"""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import runtime


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
