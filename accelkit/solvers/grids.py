"""Time grids t_0 = t_max > t_1 > ... > t_N = t_min for fixed-step solvers.

* ``uniform``  uniform in t.
* ``logsnr``   uniform in the log-SNR lambda(t) (DPM-Solver's "logSNR" spacing; Lu et al. 2022).
* ``edm``      uniform in phi^(1/rho) with rho = 7, where phi = sigma / alpha is the schedule's noise level as a
  variance-exploding sigma (Karras et al. 2022, eq. 5; k-diffusion and diffusers' Karras sigmas use the same phi
  for VP models). For the EDM and VE schedules (alpha = 1) phi is sigma itself.
* ``shift``    uniform in t, then t' = s t / (1 + (s - 1) t), the timestep shift of SD3 / Flux (Esser et al. 2024),
  ``shift`` s = 3 by default.
* a user list: checked for strict decrease, range [0, 1] and length N + 1.

``logsnr`` and ``edm`` need finite end values: where the schedule's lambda is infinite at an end (alpha = 0 at
t = 1 for the linear and cosine schedules, sigma = 0 at t = 0), the spacing runs to ``sigma_max`` = 80 / from
``sigma_min`` = 0.002 (EDM's range, in phi) and the true end is reached in one extra interval, as EDM appends
sigma = 0. Passing ``sigma_min`` / ``sigma_max`` explicitly clips the spacing range to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import AccelkitError
from ..schedules import EDMSchedule, Schedule, VESchedule

F64 = torch.float64
GRID_NAMES = ("uniform", "logsnr", "edm", "shift")


def default_grid(schedule: Schedule | None) -> str:
    """The grid used when none is given: EDM's rho = 7 for VE / EDM schedules, uniform in t otherwise."""
    return "edm" if isinstance(schedule, EDMSchedule | VESchedule) else "uniform"


def make_grid(
    grid: str | Sequence[float] | Tensor,
    steps: int,
    t_max: float = 1.0,
    t_min: float = 0.0,
    schedule: Schedule | None = None,
    shift: float = 3.0,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """The ``steps + 1`` decreasing times (float64, on the host) of a named grid, or a checked user list."""
    if not isinstance(grid, str):
        return check_user_grid(grid, steps)
    if grid not in GRID_NAMES:
        raise AccelkitError(f"unknown grid {grid!r}: expected one of {', '.join(GRID_NAMES)} or a list of times")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise AccelkitError(f"grid range t_max={t_max}, t_min={t_min}: expected 0 <= t_min < t_max <= 1")
    if grid == "uniform":
        ts = torch.linspace(t_max, t_min, steps + 1, dtype=F64)
    elif grid == "shift":
        if not shift > 0:
            raise AccelkitError(f"shift {shift}: expected a positive number")
        def unshift(t: float) -> float:
            return t / (shift - (shift - 1.0) * t)

        u = torch.linspace(unshift(t_max), unshift(t_min), steps + 1, dtype=F64)
        ts = shift * u / (1.0 + (shift - 1.0) * u)
    else:
        if schedule is None:
            raise AccelkitError(f"grid {grid!r} needs the teacher's schedule")
        ts = _noise_level_grid(grid, steps, t_max, t_min, schedule, rho, sigma_min, sigma_max)
    ts[0], ts[-1] = t_max, t_min
    if not bool((ts[1:] < ts[:-1]).all()):
        raise AccelkitError(f"grid {grid!r} with {steps} steps on {schedule!r} has repeated times: use fewer steps "
                            f"or another grid")
    return ts


def _noise_level_grid(grid, steps, t_max, t_min, schedule, rho, sigma_min, sigma_max) -> Tensor:
    """``logsnr`` / ``edm``: even spacing of lambda or phi^(1/rho) between the (clipped) end noise levels."""
    ends = torch.tensor([t_max, t_min], dtype=F64)
    lam_hi_noise, lam_lo_noise = (float(v) for v in schedule.log_snr(ends))  # lambda at t_max, at t_min
    lam_start = lam_hi_noise if math.isfinite(lam_hi_noise) else -2.0 * math.log(80.0)
    lam_end = lam_lo_noise if math.isfinite(lam_lo_noise) else -2.0 * math.log(0.002)
    if sigma_max is not None:
        lam_start = max(lam_start, -2.0 * math.log(sigma_max))
    if sigma_min is not None:
        lam_end = min(lam_end, -2.0 * math.log(sigma_min))
    extra_start, extra_end = lam_start != lam_hi_noise, lam_end != lam_lo_noise
    core = steps - int(extra_start) - int(extra_end)
    if core < 1 or not lam_start < lam_end:
        return torch.linspace(t_max, t_min, steps + 1, dtype=F64)
    if grid == "logsnr":
        lams = torch.linspace(lam_start, lam_end, core + 1, dtype=F64)
    else:  # edm: phi = exp(-lambda / 2), spaced evenly in phi^(1/rho)
        hi, lo = math.exp(-lam_start / (2 * rho)), math.exp(-lam_end / (2 * rho))
        phis = torch.linspace(hi, lo, core + 1, dtype=F64) ** rho
        lams = -2.0 * torch.log(phis)
    ts = schedule.t_of_log_snr(lams)
    parts = ([torch.tensor([t_max], dtype=F64)] if extra_start else []) + [ts] + \
        ([torch.tensor([t_min], dtype=F64)] if extra_end else [])
    return torch.cat(parts)


def check_user_grid(grid: Sequence[float] | Tensor, steps: int) -> Tensor:
    """A user's list of times as float64, or an AccelkitError naming what is wrong with it."""
    try:
        ts = torch.as_tensor(grid if isinstance(grid, Tensor) else list(grid), dtype=F64).detach().cpu()
    except (TypeError, ValueError) as e:
        raise AccelkitError(f"grid {grid!r}: expected a list of times in [0, 1] ({e})") from None
    shown = [round(float(v), 6) for v in ts.reshape(-1)][:12]
    if ts.ndim != 1 or len(ts) < 2:
        raise AccelkitError(f"grid {shown}: expected a flat list of at least two times")
    if not bool(torch.isfinite(ts).all()) or float(ts.max()) > 1.0 or float(ts.min()) < 0.0:
        raise AccelkitError(f"grid {shown}: every time must lie in [0, 1]")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise AccelkitError(f"grid {shown}: expected strictly decreasing times (from noise t=1 to data t=0), "
                            f"without repeats")
    if len(ts) != steps + 1:
        raise AccelkitError(f"grid of {len(ts)} times ({len(ts) - 1} steps): this solver and NFE need {steps} steps, "
                            f"i.e. {steps + 1} times")
    return ts
