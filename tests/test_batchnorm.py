"""Protects recomputed BatchNorm statistics, against hand-computed batch averages."""
import pytest
import torch

from carseg.batchnorm import recompute_batchnorm


def test_recomputed_batchnorm_statistics_are_the_exact_batch_averages():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    batches = [torch.full((2, 1, 2, 2), 1.0), torch.arange(8.0).reshape(2, 1, 2, 2)]
    seen = recompute_batchnorm(model, batches, torch.device("cpu"), "fp32", channels_last=False)
    assert seen == 4
    bn = model[1]
    # batch 1: mean 1, variance 0; batch 2: mean 3.5, unbiased variance of 0..7 = 6
    assert bn.running_mean.item() == pytest.approx((1.0 + 3.5) / 2)
    assert bn.running_var.item() == pytest.approx((0.0 + 6.0) / 2)
    assert bn.momentum == 0.1 and not model.training  # settings and mode are put back


def test_recompute_batchnorm_without_images_keeps_the_old_statistics():
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.fill_(3.0)
    assert recompute_batchnorm(bn, [], torch.device("cpu"), "fp32") == 0
    assert torch.equal(bn.running_mean, torch.full((2,), 3.0))
