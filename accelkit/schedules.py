"""Noise schedules on accelkit's one time axis.

Every schedule describes the forward process

    x_t = alpha(t) * x0 + sigma(t) * eps,        t in [0, 1], t = 0 data, t = 1 noise,

and gives alpha, sigma, their time derivatives, the log signal-to-noise ratio
lambda(t) = log(alpha^2 / sigma^2) and its inverse. All time-axis arithmetic runs in float64; callers cast the
coefficients to the data's dtype at the last moment. The data end (sigma = 0, lambda = +inf) and the noise end
(alpha = 0, lambda = -inf) are handled without NaN.

Schedules with the same log-SNR range are related exactly by a scale-time transformation (see
:func:`scale_time_map`): x_B(r) = s(r) x_A(t(r)) with lambda_A(t(r)) = lambda_B(r).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

F64 = torch.float64


def as_time(t: Tensor | float, device: torch.device | str | None = None) -> Tensor:
    """``t`` as a float64 tensor (on ``device`` if given)."""
    if isinstance(t, Tensor):
        return t.to(dtype=F64, device=device if device is not None else t.device)
    return torch.as_tensor(t, dtype=F64, device=device)


class Schedule:
    """Base class: subclasses define ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma`` and ``t_of_log_snr``."""

    name: str = "schedule"
    #: True when alpha^2 + sigma^2 = 1 (the prior at t = 1 is then a unit Gaussian, as diffusers samples it).
    variance_preserving: bool = False

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = 2 (log alpha - log sigma); +inf where sigma = 0, -inf where alpha = 0."""
        t = as_time(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """The inverse of :meth:`log_snr`, clamped to [0, 1] outside the schedule's range."""
        raise NotImplementedError

    def prior_std(self) -> float:
        """Standard deviation of the Gaussian that sampling starts from at t = 1."""
        if self.variance_preserving:
            return 1.0
        t1 = torch.ones((), dtype=F64)
        return float(torch.sqrt(self.alpha(t1) ** 2 + self.sigma(t1) ** 2))

    def config(self) -> dict[str, Any]:
        """A JSON-able description; :func:`schedule_from_config` inverts it."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self.config()))


class LinearSchedule(Schedule):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t (Liu et al. 2022; Lipman et al. 2022)."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t).clone()

    def d_alpha(self, t):
        return torch.full_like(as_time(t), -1.0)

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))

    def t_of_log_snr(self, lam):
        # alpha / sigma = exp(lam / 2) = (1 - t) / t  =>  t = sigmoid(-lam / 2)
        return torch.sigmoid(-0.5 * as_time(lam))


class CosineSchedule(Schedule):
    """Continuous variance-preserving cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

    name = "vp-cosine"
    variance_preserving = True

    def alpha(self, t):
        t = as_time(t)
        # cos(pi/2) is 6e-17 in float64: make the noise end exact.
        return torch.where(t >= 1.0, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))

    def sigma(self, t):
        t = as_time(t)
        return torch.where(t <= 0.0, torch.zeros_like(t), torch.sin(0.5 * math.pi * t))

    def d_alpha(self, t):
        return -0.5 * math.pi * self.sigma(t)

    def d_sigma(self, t):
        return 0.5 * math.pi * self.alpha(t)

    def t_of_log_snr(self, lam):
        # tan(pi t / 2) = sigma / alpha = exp(-lam / 2)
        return torch.atan(torch.exp(-0.5 * as_time(lam))) * (2.0 / math.pi)


class EDMSchedule(Schedule):
    """EDM / variance exploding with sigma linear in t: alpha = 1, sigma = sigma_max * t (Karras et al. 2022)."""

    name = "edm"

    def __init__(self, sigma_max: float = 80.0):
        self.sigma_max = float(sigma_max)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_max * as_time(t)

    def d_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t):
        return torch.full_like(as_time(t), self.sigma_max)

    def t_of_log_snr(self, lam):
        return (torch.exp(-0.5 * as_time(lam)) / self.sigma_max).clamp(0.0, 1.0)

    def config(self):
        return {"name": self.name, "sigma_max": self.sigma_max}


class VESchedule(Schedule):
    """Variance exploding, geometric (Song et al. 2021): alpha = 1, sigma = s_min (s_max / s_min)^t.

    The data end is sigma = sigma_min, not 0: solvers finish there and return the x0 prediction.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(self._log_ratio * as_time(t))

    def d_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t):
        return self._log_ratio * self.sigma(t)

    def t_of_log_snr(self, lam):
        log_sigma = -0.5 * as_time(lam)
        return ((log_sigma - math.log(self.sigma_min)) / self._log_ratio).clamp(0.0, 1.0)

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


def ddpm_alphas_cumprod(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> Tensor:
    """alphas_cumprod exactly as diffusers' DDPM-family schedulers compute them (float32 betas, then cumprod)."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    else:
        raise ValueError(
            f"beta_schedule {beta_schedule!r}: expected one of linear, scaled_linear, squaredcos_cap_v2"
        )
    return torch.cumprod(1.0 - betas, dim=0)


class DiscreteVPSchedule(Schedule):
    """A DDPM schedule of N training steps, made continuous by interpolating log(alpha) linearly in t.

    Training step k (0-based) sits at t_k = (k + 1) / N with alpha_k^2 = alphas_cumprod[k]; the extra node t = 0 has
    alpha = 1, sigma = 0 (the data). Between nodes log(alpha) is linear in t, as DPM-Solver's NoiseScheduleVP does.
    A network trained on this schedule takes the timestep k = t N - 1 (see :class:`accelkit.teacher.TimeInput`).
    """

    name = "vp-discrete"
    variance_preserving = True

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
    ):
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        acp = ddpm_alphas_cumprod(beta_schedule, self.num_train_timesteps, beta_start, beta_end).to(F64)
        self.alphas_cumprod = acp
        self._t_nodes = torch.linspace(0.0, 1.0, self.num_train_timesteps + 1, dtype=F64)
        self._log_alpha = torch.cat([torch.zeros(1, dtype=F64), 0.5 * torch.log(acp)])
        self._slopes = torch.diff(self._log_alpha) / torch.diff(self._t_nodes)
        self._on_device: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(t nodes, log alpha, slopes) on ``device``, copied there once (no host-to-device copy per call)."""
        if device not in self._on_device:
            self._on_device[device] = tuple(v.to(device) for v in (self._t_nodes, self._log_alpha, self._slopes))
        return self._on_device[device]

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_train_timesteps
        idx = torch.clamp(torch.floor(t * n).long(), 0, n - 1)
        return idx, t - self._tables(t.device)[0][idx]

    def log_alpha(self, t: Tensor) -> Tensor:
        t = as_time(t).clamp(0.0, 1.0)
        idx, frac = self._segment(t)
        _, log_alpha, slopes = self._tables(t.device)
        return log_alpha[idx] + slopes[idx] * frac

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def d_alpha(self, t):
        t = as_time(t).clamp(0.0, 1.0)
        idx, _ = self._segment(t)
        return self.alpha(t) * self._tables(t.device)[2][idx]

    def d_sigma(self, t):
        # sigma^2 = 1 - alpha^2  =>  d sigma = -alpha d alpha / sigma  (+inf at t = 0, never NaN)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def log_snr(self, t):
        la = self.log_alpha(t)
        return 2.0 * la - torch.log(-torch.expm1(2.0 * la))

    def t_of_log_snr(self, lam):
        lam = as_time(lam)
        # alpha^2 = sigmoid(lam)  =>  log alpha = -softplus(-lam) / 2; then invert the piecewise-linear log alpha.
        la = -0.5 * torch.nn.functional.softplus(-lam)
        nodes, log_alpha, _ = self._tables(lam.device)
        neg = -log_alpha  # increasing in t
        target = torch.minimum(torch.maximum(-la, neg[0]), neg[-1])
        idx = torch.clamp(torch.searchsorted(neg, target.contiguous(), right=True) - 1, 0, self.num_train_timesteps - 1)
        frac = (target - neg[idx]) / (neg[idx + 1] - neg[idx])
        return nodes[idx] + frac * (nodes[idx + 1] - nodes[idx])

    def timestep_t(self, timestep: Tensor | float) -> Tensor:
        """The continuous t of a (possibly fractional) training timestep k: t = (k + 1) / N."""
        return (as_time(timestep) + 1.0) / self.num_train_timesteps

    def config(self):
        return {
            "name": self.name,
            "beta_schedule": self.beta_schedule,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }


_SCHEDULES: dict[str, type[Schedule]] = {
    "linear": LinearSchedule,
    "vp-cosine": CosineSchedule,
    "edm": EDMSchedule,
    "ve": VESchedule,
    "vp-discrete": DiscreteVPSchedule,
}

#: Names accepted on the command line (``rescale --to``), with the schedule each stands for.
SCHEDULE_NAMES = ("linear", "vp-cosine", "edm", "ve", "vp-linear", "vp-scaled-linear", "vp-squaredcos")


def schedule_from_config(cfg: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.config`."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in _SCHEDULES:
        raise ValueError(f"schedule name {name!r}: expected one of {', '.join(_SCHEDULES)}")
    return _SCHEDULES[name](**cfg)


def schedule_from_name(name: str) -> Schedule:
    """A schedule from a short name: linear, vp-cosine, edm, ve, vp-linear, vp-scaled-linear, vp-squaredcos."""
    aliases = {
        "vp-linear": ("linear", 0.0001, 0.02),
        "vp-scaled-linear": ("scaled_linear", 0.00085, 0.012),
        "vp-squaredcos": ("squaredcos_cap_v2", 0.0001, 0.02),
    }
    if name in aliases:
        kind, b0, b1 = aliases[name]
        return DiscreteVPSchedule(kind, 1000, b0, b1)
    if name in ("linear", "vp-cosine", "edm", "ve"):
        return _SCHEDULES[name]()
    raise ValueError(f"schedule {name!r}: expected one of {', '.join(SCHEDULE_NAMES)}")


def scale_time_map(source: Schedule, target: Schedule, r: Tensor) -> tuple[Tensor, Tensor]:
    """The scale-time transformation from ``source`` to ``target`` at target times ``r``.

    Returns (t, s) with lambda_source(t) = lambda_target(r) and s = sigma_target(r) / sigma_source(t), so that
    x_target(r) = s x_source(t) describes the same ODE solution (Shaul et al. 2023; Lipman et al. 2024, sec. 4.8).
    s is computed as sqrt((alpha_T^2 + sigma_T^2) / (alpha_S^2 + sigma_S^2)), equal to the sigma ratio and the alpha
    ratio wherever those are defined, and finite at both ends.
    """
    r = as_time(r)
    t = source.t_of_log_snr(target.log_snr(r))
    num = target.alpha(r) ** 2 + target.sigma(r) ** 2
    den = source.alpha(t) ** 2 + source.sigma(t) ** 2
    return t, torch.sqrt(num / den)
