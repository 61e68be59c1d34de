"""Quality metrics: error to a reference endpoint and distances between sample sets.

* RMSE and PSNR of samples against the teacher's ODE endpoint from the same noise;
* sliced Wasserstein-2 distance (Rabin et al. 2011; Bonneel et al. 2015)
  SW2(P, Q)^2 = E_theta W2(theta.P, theta.Q)^2, theta uniform on the sphere, each 1-D W2 from sorted projections;
* MMD^2 with a Gaussian kernel (Gretton et al. 2012), the unbiased U-statistic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rmse(x: Tensor, ref: Tensor) -> float:
    """Root mean squared error over every element."""
    return float(torch.sqrt(torch.mean((x.double() - ref.double()) ** 2)))


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for data in an interval of width ``data_range`` ([-1, 1] by default)."""
    mse = float(torch.mean((x.double() - ref.double()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size sample sets (rows are samples), seeded projections."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta.to(x.device), dim=0)
    py, _ = torch.sort(y @ theta.to(y.device), dim=0)
    return float(torch.sqrt(torch.mean((px - py) ** 2)))


def mmd(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with the Gaussian kernel exp(-|a - b|^2 / (2 h^2)); h defaults to the median distance."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy) ** 2
    if bandwidth is None:
        bandwidth = float(torch.sqrt(torch.median(d2[d2 > 0]) / 2))
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())
