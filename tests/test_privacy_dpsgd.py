"""Opacus DP-SGD is plain SGD when its noise and clipping are switched off, and clips when they are not."""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Flatten(), torch.nn.Linear(12, 1))


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 20, (16, 3), generator=g), torch.randn(16, 1, generator=g)


def _step(model, optimizer, x, y):
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_dp_sgd_without_noise_and_clipping_equals_plain_sgd_on_the_same_batch():
    x, y = _batch()
    plain = _model(0)
    _step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), x, y)

    private = GradSampleModule(_model(0))
    opt = DPOptimizer(torch.optim.SGD(private.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=len(x))
    _step(private, opt, x, y)

    for a, b in zip(plain.parameters(), private._module.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(plain.parameters(), _model(0).parameters(), strict=False))
    assert moved > 1e-3  # the step did something, so equality is not vacuous


def test_dp_sgd_clipping_bounds_every_per_sample_gradient():
    x, y = _batch()
    private = GradSampleModule(_model(0))
    c = 0.05
    opt = DPOptimizer(torch.optim.SGD(private.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=len(x))
    opt.zero_grad()
    torch.nn.functional.mse_loss(private(x), y, reduction="sum").backward()
    opt.pre_step()
    # the summed clipped gradient (before division by the batch size) has norm <= n * C
    total = torch.sqrt(sum((p.grad * len(x)).pow(2).sum() for p in private.parameters()))
    assert float(total) <= len(x) * c * (1 + 1e-5)
    raw = GradSampleModule(_model(0))
    torch.nn.functional.mse_loss(raw(x), y, reduction="sum").backward()
    per_sample = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in raw.parameters()))
    assert float(per_sample.min()) > c  # every sample really was clipped
