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


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance of feature rows, float64: the Gaussian that the Frechet distance compares."""
    f = features.reshape(features.shape[0], -1).double()
    if f.shape[0] < 2:
        raise ValueError(f"feature statistics need at least 2 samples, got {f.shape[0]}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet (Wasserstein-2) distance squared between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982; the
    FID of Heusel et al. 2017 on Inception features):

        d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2).

    The trace of the cross term is computed through the symmetric matrix cov1^1/2 cov2 cov1^1/2, whose square root
    comes from an eigendecomposition (its eigenvalues are those of cov1 cov2, clipped at 0 against round-off).
    """
    mu1, mu2 = torch.as_tensor(mu1).double().reshape(-1), torch.as_tensor(mu2).double().reshape(-1)
    cov1, cov2 = torch.as_tensor(cov1).double(), torch.as_tensor(cov2).double()
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance: shapes {tuple(mu1.shape)}, {tuple(cov1.shape)} and {tuple(mu2.shape)}, "
                         f"{tuple(cov2.shape)} do not describe two Gaussians of one dimension")

    def psd_sqrt(m: Tensor) -> Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    s1 = psd_sqrt(cov1)
    cross = torch.linalg.eigvalsh(s1 @ ((cov2 + cov2.T) / 2) @ s1).clamp(min=0).sqrt().sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)
    return max(d2, 0.0)


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0, std: float = 1.5) -> float:
    """Mean structural similarity of image batches (N, C, H, W) (Wang, Bovik, Sheikh & Simoncelli 2004):

        SSIM = (2 mu_x mu_y + c1) (2 s_xy + c2) / ((mu_x^2 + mu_y^2 + c1) (s_x^2 + s_y^2 + c2)),

    local statistics under a Gaussian window of ``std`` = 1.5 pixels, 11 wide or the image size if smaller (odd),
    valid positions only, c1 = (0.01 L)^2, c2 = (0.03 L)^2 for the data range L; averaged over positions, channels
    and images.
    """
    x, ref = x.double(), ref.double()
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two image batches of one shape (N, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(ref.shape)}")
    size = min(11, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(d**2) / (2 * std**2))
    g = g / g.sum()
    c = x.shape[1]
    window = (g[:, None] * g[None, :]).expand(c, 1, size, size).to(x.device)

    def filt(v: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(v, window, groups=c)

    mx, my = filt(x), filt(ref)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(ref * ref) - my**2, filt(x * ref) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())
