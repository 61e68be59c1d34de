"""Analytic teachers: Gaussian-mixture data with the exact posterior mean under any schedule.

Data x0 ~ sum_k w_k N(mu_k, diag(v_k)). Under x_t = a x0 + s eps, component k gives x_t ~ N(a mu_k, a^2 v_k + s^2),
and by Gaussian conditioning

    E[x0  | x_t, k] = mu_k + a v_k / (a^2 v_k + s^2) (x_t - a mu_k),
    E[eps | x_t, k] =        s     / (a^2 v_k + s^2) (x_t - a mu_k),

mixed with the posterior responsibilities p(k | x_t). Both are finite at both ends of time (s = 0 or a = 0), so the
teacher has no network error anywhere: solver orders, ``rescale`` and students are checked against exact answers.
Everything is computed in float64 and cast back to the input's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..schedules import Schedule, as_time
from ..teacher import Teacher


class GaussianMixtureTeacher(Teacher):
    """Exact denoiser for a mixture of diagonal Gaussians over samples of shape ``sample_shape``.

    ``means``: (K, *sample_shape); ``variances``: (K, *sample_shape) or (K,) for isotropic components;
    ``weights``: (K,), normalised here.
    """

    def __init__(self, means: Tensor, variances: Tensor, weights: Tensor | None, schedule: Schedule):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        k = means.shape[0]
        self.sample_shape = tuple(means.shape[1:])
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.ndim == 1:
            variances = variances.reshape(k, *([1] * len(self.sample_shape))).expand_as(means)
        f64 = torch.float64
        weights = torch.ones(k, dtype=f64) if weights is None else torch.as_tensor(weights, dtype=f64)
        if (variances <= 0).any() or (weights < 0).any():
            raise ValueError("mixture variances must be positive and weights non-negative")
        self.register_buffer("means", means.reshape(k, -1).clone())
        self.register_buffer("variances", variances.reshape(k, -1).clone())
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.schedule = schedule

    def denoise(self, x: Tensor, t: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        shape, dtype = x.shape, x.dtype
        z = x.reshape(shape[0], 1, -1).to(torch.float64)  # (B, 1, D)
        t = as_time(t, x.device)
        a = self.schedule.alpha(t).reshape(-1, 1, 1)
        s = self.schedule.sigma(t).reshape(-1, 1, 1)
        mu, v = self.means[None], self.variances[None]  # (1, K, D)
        var_t = a**2 * v + s**2  # (B|1, K, D)
        resid = z - a * mu  # (B, K, D)
        log_lik = -0.5 * ((resid**2 / var_t) + torch.log(2 * math.pi * var_t)).sum(-1) + self.log_weights
        resp = torch.softmax(log_lik, dim=1).unsqueeze(-1)  # (B, K, 1)
        x0 = (resp * (mu + a * v / var_t * resid)).sum(1)
        eps = (resp * (s / var_t * resid)).sum(1)
        return x0.reshape(shape).to(dtype), eps.reshape(shape).to(dtype)

    def flow_map(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """The exact probability-flow ODE map from time t to time s (per sample) of a single Gaussian
        (:func:`gaussian_flow_map`); a mixture of several has no closed form."""
        if self.means.shape[0] != 1:
            raise ValueError(f"the exact ODE map is closed-form for one Gaussian, not {self.means.shape[0]}")
        mu = self.means[0].reshape(self.sample_shape)
        v = self.variances[0].reshape(self.sample_shape)
        return gaussian_flow_map(mu, v, self.schedule, x, t, s)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples of the data distribution (float64)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        x = self.means[k] + self.variances[k].sqrt() * noise
        return x.reshape(n, *self.sample_shape)

    def linear_gaussian_posterior(self, h: Tensor, y: Tensor, noise_std: float) -> tuple[Tensor, Tensor, Tensor]:
        """The exact posterior of x0 given y = H x0 + n, n ~ N(0, noise_std^2 I), for a dense H (m x D), float64:
        a mixture with weights pi_k prop. to w_k N(y; H mu_k, H V_k H^T + s^2 I), means m_k = mu_k + V_k H^T
        (H V_k H^T + s^2 I)^-1 (y - H mu_k) and covariances C_k = V_k - V_k H^T (H V_k H^T + s^2 I)^-1 H V_k.
        Returns (weights (K,), means (K, D), covariances (K, D, D)) for one flat measurement y (m,)."""
        h, y = h.to(torch.float64), y.to(torch.float64).reshape(-1)
        means, log_w = [], []
        covs = []
        for mu, var, lw in zip(self.means, self.variances, self.log_weights, strict=True):
            v = torch.diag(var)
            s = h @ v @ h.T + noise_std**2 * torch.eye(h.shape[0], dtype=torch.float64)
            gain = v @ h.T @ torch.linalg.inv(s)
            r = y - h @ mu
            means.append(mu + gain @ r)
            covs.append(v - gain @ h @ v)
            log_w.append(lw + torch.distributions.MultivariateNormal(h @ mu, covariance_matrix=s).log_prob(y))
        return torch.softmax(torch.stack(log_w), 0), torch.stack(means), torch.stack(covs)

    def config(self) -> dict[str, Any]:
        return {"schedule": self.schedule.config(), "sample_shape": list(self.sample_shape),
                "components": int(self.means.shape[0])}

    def describe(self):
        d = super().describe()
        d.update({"kind": "analytic", "architecture": "GaussianMixture", "prediction_type": "exact",
                  "components": int(self.means.shape[0]), "parameters": 0, "dtype": "float64",
                  "conditioning": "none"})
        return d


def gaussian_flow_map(mean: Tensor, variance: Tensor | float, schedule: Schedule, x: Tensor, t: Tensor,
                      s: Tensor) -> Tensor:
    """The exact probability-flow ODE map x_t -> x_s for data N(mean, diag(variance)) (variance 0: a point mass).

    Under x_t = a_t x0 + s_t eps the marginal is N(a_t mean, a_t^2 v + s_t^2) per coordinate, and the ODE moves every
    point at the same standardised position along it:

        x_s = a_s mean + sqrt(a_s^2 v + s_s^2) / sqrt(a_t^2 v + s_t^2) (x_t - a_t mean).

    Float64 in, per-sample times t, s (or scalars); affine in x_t, so composing two maps is the map of the whole
    interval up to rounding."""
    from ..teacher import broadcast_to

    z = x.to(torch.float64)
    t, s = as_time(t, x.device), as_time(s, x.device)
    mean = torch.as_tensor(mean, dtype=torch.float64, device=x.device)
    v = torch.as_tensor(variance, dtype=torch.float64, device=x.device)
    a_t, s_t = broadcast_to(schedule.alpha(t), z), broadcast_to(schedule.sigma(t), z)
    a_s, s_s = broadcast_to(schedule.alpha(s), z), broadcast_to(schedule.sigma(s), z)
    ratio = torch.sqrt(a_s**2 * v + s_s**2) / torch.sqrt(a_t**2 * v + s_t**2)
    return (a_s * mean + ratio * (z - a_t * mean)).to(x.dtype)


def gaussian_mixture_2d(
    schedule: Schedule, modes: int = 8, radius: float = 2.0, std: float = 0.15
) -> GaussianMixtureTeacher:
    """A ring of ``modes`` isotropic Gaussians in 2-D: the standard toy analytic teacher."""
    ang = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixtureTeacher(means, torch.full((modes,), std**2, dtype=torch.float64), None, schedule)


def gaussian_mixture_images(
    schedule: Schedule, shape: tuple[int, int, int] = (1, 8, 8), modes: int = 4, std: float = 0.2, seed: int = 0
) -> GaussianMixtureTeacher:
    """A mixture of ``modes`` Gaussians around smooth random images in [-1, 1] (seeded)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    base = torch.randn(modes, c, max(h // 2, 1), max(w // 2, 1), generator=g, dtype=torch.float64)
    means = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).tanh()
    variances = (std * (0.5 + torch.rand(modes, c, h, w, generator=g, dtype=torch.float64))) ** 2
    weights = 0.5 + torch.rand(modes, generator=g, dtype=torch.float64)
    return GaussianMixtureTeacher(means, variances, weights, schedule)
