"""Protects what the model predicts with: the weight average and recomputed BatchNorm statistics, by hand."""
import pytest
import torch

from averaging import WeightEMA, recompute_batchnorm


def test_decay_ramps_up_to_its_ceiling():
    ema = WeightEMA(torch.nn.Linear(1, 1), decay=0.99)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(100) == pytest.approx(101 / 110)
    assert ema.decay_at(10_000) == 0.99


def test_update_is_a_lerp_towards_the_trained_weights_and_copies_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 6.0]]))
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(step=1000)  # decay_at(1000) = 0.5: halfway
    assert torch.equal(ema.model[0].weight, torch.tensor([[2.0, 4.0]]))
    assert torch.equal(ema.model[1].running_mean, torch.tensor([2.0]))
    assert ema.model[1].num_batches_tracked.item() == 7
    ema.update(step=1000)
    assert torch.equal(ema.model[0].weight, torch.tensor([[2.5, 5.0]]))


def test_the_average_is_a_separate_frozen_copy():
    model = torch.nn.Linear(2, 1)
    ema = WeightEMA(model, decay=0.9)
    assert ema.model is not model and not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(ema.model.weight, model.weight)


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
