"""Metrics on inputs with known answers."""

import math

import torch

from accelkit.metrics import mmd, psnr, rmse, sliced_wasserstein


def test_identical_sets_have_zero_distance():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x.clone()) == 0.0
    assert abs(mmd(x, x[torch.randperm(500)])) < 1e-2
    assert rmse(x, x) == 0.0 and psnr(x, x) == math.inf


def test_sliced_wasserstein_of_a_shift_is_closed_form():
    """Shifting a set by m moves every projection by theta.m, so SW2^2 = mean (theta.m)^2 -> |m|^2 / d."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 3, generator=g)
    m = torch.tensor([0.6, -0.2, 0.9])
    sw = sliced_wasserstein(x, x + m, projections=20000)
    assert abs(sw - float(m.norm()) / math.sqrt(3)) < 0.01


def test_rmse_and_psnr():
    x = torch.zeros(10, 4)
    assert abs(rmse(x, x + 0.5) - 0.5) < 1e-12
    assert abs(psnr(x, x + 0.5, data_range=2.0) - 10 * math.log10(4 / 0.25)) < 1e-9


def test_mmd_separates_distributions():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g)
    assert mmd(a, b + 2.0) > 10 * abs(mmd(a, b))
