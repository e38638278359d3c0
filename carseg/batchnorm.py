"""BatchNorm statistics recomputed for the weights at hand ("precise BN", Wu & Johnson 2021).

BatchNorm's running statistics are an average over the last few dozen training batches, taken while
the weights moved. With a high learning rate they no longer match the weights at the end of the
epoch, and validation Dice swings from epoch to epoch (to 0.47-0.75 in this project's early runs).
Recomputing them with the weights at hand on batches drawn like the training batches removes that
mismatch.
"""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from carseg import distributed, runtime


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, batches, device, precision, channels_last=True, world=distributed.SOLO) -> int:
    """Replace every BatchNorm's running mean/var by their exact average over `batches` of images.

    Under torchrun each process may pass its own share of the batches: the statistics are then
    averaged over all processes' batches, weighted by batch count, which is what one process seeing
    every batch computes. Returns the number of images used on all processes together; a model
    without BatchNorm, or no images anywhere, is left as it is.
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
        count = _average_over_processes(norms, count, world)
    finally:
        for bn, momentum, state in zip(norms, momenta, saved):
            bn.momentum = momentum
            if count == 0:  # nothing was seen (or the first batch failed): keep the old statistics
                bn.load_state_dict(state)
        model.train(was_training)
    return count


def _average_over_processes(norms, count: int, world) -> int:
    """Make every process's running statistics the batch-weighted mean over all processes; returns the
    images counted on all of them. One all-reduce for all layers."""
    if not world.distributed:
        return count
    batches = [bn.num_batches_tracked.double().reshape(1) for bn in norms]
    flat = torch.cat([torch.cat([bn.running_mean.double() * n, bn.running_var.double() * n, n])
                      for bn, n in zip(norms, batches)] + [torch.tensor([float(count)], device=batches[0].device)])
    distributed.all_sum(flat, world)
    offset = 0
    for bn in norms:
        channels = len(bn.running_mean)
        mean, var, total = flat[offset:offset + channels], flat[offset + channels:offset + 2 * channels], \
            flat[offset + 2 * channels]
        if total > 0:  # zero only where no process saw a batch, and then count is 0 too
            bn.running_mean.copy_(mean / total)
            bn.running_var.copy_(var / total)
            bn.num_batches_tracked.fill_(int(total.item()))
        offset += 2 * channels + 1
    return int(flat[-1].item())


class _AllSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum taken on every process is the sum of
    every process's gradient (torch.distributed.nn.functional.all_reduce does this too, but is deprecated)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllSum.forward(ctx, grad)


class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every process's batch, for DDP on CPUs (Gloo).

    PyTorch's SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU",
    torch 2.14), so a CPU run under torchrun would otherwise normalise over each process's share of
    the batch and train differently from one process with the global batch. This computes the same
    statistics through autograd-aware all-reduces, whose backward sums the
    gradients of the statistics over the processes as SyncBatchNorm's does. Two reductions per layer
    (the mean, then the squared deviations from it) keep the variance free of E[x^2] - E[x]^2
    cancellation. In eval mode, or outside a process group, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(x)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = _AllSum.apply(x.new_tensor([x.numel() / x.shape[1]]))
        mean = _AllSum.apply(x.sum(dims)) / count
        centred = x - mean.reshape(shape)
        var = _AllSum.apply(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self._track(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        return out * self.weight.reshape(shape) + self.bias.reshape(shape) if self.affine else out

    @torch.no_grad()
    def _track(self, mean, unbiased_var):
        """Running statistics as BatchNorm2d keeps them: an EMA, or a cumulative mean when momentum is None."""
        self.num_batches_tracked += 1
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def synchronise(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` with every BatchNorm normalising over the global batch: PyTorch's SyncBatchNorm on GPUs,
    GlooSyncBatchNorm (2-d BatchNorm only) on CPUs. Parameters and buffers are kept, not copied."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            synced = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())  # before the Parameters are shared: loads need no grad
            if child.affine:
                synced.weight, synced.bias = child.weight, child.bias
            setattr(model, name, synced.to(child.weight.device if child.affine else child.running_mean.device))
        else:
            synchronise(child, device)
    return model

