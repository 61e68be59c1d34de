"""Piecewise (phased) straight paths: the targets of PeRFlow and of phased rectified diffusion.

Split the time range into K windows with boundaries 1 = b_0 > b_1 > ... > b_K = 0 (sampling runs from noise to
data, so window k is [b_k, b_{k-1}] with start s = b_{k-1} and end e = b_k). For a training pair (eps, x0*) of the
couplings and a training time t, take the window that holds t (t in (e, s]) and

1. noise the pair's generated sample with the pair's own noise at the window start, under the teacher's schedule
   (PeRFlow, Yan et al. 2024, "PeRFlow: Piecewise Rectified Flow as Universal Plug-and-Play Accelerator"):

       x_s = alpha(s) x0* + sigma(s) eps;

2. solve the frozen teacher's ODE from x_s at s to e with a few accurate steps (``phase_solver``, ``phase_nfe``,
   on the teacher's default grid between s and e): x_e = ODE_teacher(x_s; s -> e);

3. make the student straight inside the window: find the (x0^, eps^) whose path x_t = alpha(t) x0^ + sigma(t) eps^
   passes through both x_s at s and x_e at e. It is the 2 x 2 linear system per element

       alpha_s x0^ + sigma_s eps^ = x_s,   alpha_e x0^ + sigma_e eps^ = x_e,
       d = alpha_s sigma_e - alpha_e sigma_s,
       x0^  = (sigma_e x_s - sigma_s x_e) / d,    eps^ = (alpha_s x_e - alpha_e x_s) / d,

   and the student's training pair inside the window is (x0^, eps^) instead of (x0*, eps): x_t and the target of
   its prediction type come from :class:`accelkit.objectives.DenoisingObjective` unchanged.

Equivalently, in the coordinates y = x / alpha, r = sigma / alpha of DDIM (Song et al. 2021) the path is the straight
line y = x0^ + r eps^ with constant eps^ = (y_s - y_e) / (r_s - r_e): this is phased rectified diffusion's target
(Wang et al. 2024, "Rectified Diffusion: straightness is not your need"; an eps model regresses the constant eps^ and
stays an eps model) and PeRFlow's (the eps^ for which one DDIM step from x_s lands on x_e). On the linear schedule
(alpha = 1 - t, sigma = t) the same path is the straight line in t between x_s and x_e with velocity
eps^ - x0^ = (x_s - x_e) / (s - e): the rectified-flow form.

One first-order step per window then reproduces the teacher's window solve for a student that has learnt the
target: Euler in t on the linear schedule, DDIM (DPM-Solver++ of order 1, ``ddim``) on others, over the K + 1
boundaries: :func:`recommended_sampling`.

**Training times.** t is drawn from the reflow's time density and picks its window; a share ``start_share`` (0.5 by
default) of the times is moved to its window's start s. The K-step sampler evaluates the student only there, and
there its velocity jumps from the previous window's line to this one's: a network that is smooth in t (the builtin
networks, any continuous-time model) blurs that jump unless the start itself is trained on. A discrete-time network
sees s as one of its N timesteps (PeRFlow's windows own their start, t in (e, s]); on a 2-D teacher, 300 steps with
start_share 0 gave a 2-step student at SW2 0.32 against 0.07 with 0.5 (the teacher's converged ODE: 0.07).

**Window boundaries.** The K-step grid the teacher's solvers use by default for its schedule
(:func:`accelkit.solvers.grids.default_grid`): equal in t for the linear and VP schedules, EDM's rho = 7 spacing for
VE / EDM schedules. On a discrete schedule of N steps they are rounded to its grid t = j / N. K = 1 is the single
window [0, 1], whose straight line is the couplings' own pair: reflow then uses the pairs as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import AccelkitError
from .schedules import DiscreteVPSchedule, Schedule, as_time
from .teacher import Condition, Teacher, broadcast_to


def window_boundaries(schedule: Schedule, phases: int) -> Tensor:
    """The K + 1 decreasing window boundaries 1 = b_0 > ... > b_K = 0 (float64; see the module docstring)."""
    from .solvers.grids import default_grid, make_grid

    if phases < 1:
        raise AccelkitError(f"phases {phases}: expected at least 1")
    b = make_grid(default_grid(schedule), phases, schedule=schedule)
    if isinstance(schedule, DiscreteVPSchedule):
        n = schedule.num_train_timesteps
        b = torch.round(b * n) / n
        if not bool((b[1:] < b[:-1]).all()):
            raise AccelkitError(f"phases {phases}: more windows than the {n} steps of the teacher's discrete schedule")
    return b


def recommended_sampling(schedule: Schedule, phases: int) -> dict:
    """How a phased student is sampled: one first-order step per window, on the window boundaries."""
    solver = "euler" if schedule.name == "linear" else "ddim"
    return {"solver": solver, "nfe": phases,
            "grid": [round(float(v), 10) for v in window_boundaries(schedule, phases)]}


@dataclass
class PhaseWindows:
    """K windows of a teacher's time range and the teacher's solve across each (see the module docstring)."""

    teacher: Teacher
    phases: int
    solver: str = "dpm++2m"
    nfe: int = 8
    start_share: float = 0.5

    def __post_init__(self) -> None:
        self.boundaries = window_boundaries(self.teacher.schedule, self.phases)

    def window_of(self, t: Tensor) -> Tensor:
        """The window k - 1 (0 = the one starting at noise) that holds each t, with t in (b_k, b_{k-1}]; t = 0
        belongs to the last window."""
        t = as_time(t).to(torch.float64).cpu()
        ascending = self.boundaries.flip(0)  # 0 = b_K < ... < b_0 = 1
        j = torch.searchsorted(ascending, t, right=False)  # ascending[j-1] < t <= ascending[j]
        return (self.phases - j).clamp(0, self.phases - 1)

    def snap_to_starts(self, t: Tensor, u: Tensor) -> Tensor:
        """Training times: t where u >= :attr:`start_share`, else the start of t's window (``u`` ~ U(0, 1))."""
        starts = self.boundaries[self.window_of(t)].to(t.dtype)
        return torch.where(u < self.start_share, starts, t)

    @torch.no_grad()
    def straight_pairs(self, x0: Tensor, eps: Tensor, t: Tensor, cond: Condition | None = None
                       ) -> tuple[Tensor, Tensor]:
        """The (x0^, eps^) of each pair's window line through its noised start x_s and the teacher's solve x_e."""
        from .solvers import solve
        from .solvers.grids import default_grid

        schedule = self.teacher.schedule
        window = self.window_of(t)
        out_x0, out_eps = torch.empty_like(x0), torch.empty_like(eps)
        for k in torch.unique(window).tolist():
            rows = (window == k).nonzero().reshape(-1).to(x0.device)
            s, e = self.boundaries[k], self.boundaries[k + 1]
            a_s, s_s, a_e, s_e = (float(v) for v in (schedule.alpha(s), schedule.sigma(s), schedule.alpha(e),
                                                     schedule.sigma(e)))
            x_s = a_s * x0[rows] + s_s * eps[rows]
            c = cond.index(rows) if cond is not None else None
            x_e = solve(self.teacher, x_s, solver=self.solver, nfe=self.nfe, grid=default_grid(schedule),
                        t_max=float(s), t_min=float(e), cond=c)
            d = a_s * s_e - a_e * s_s
            out_x0[rows] = ((s_e * x_s.double() - s_s * x_e.double()) / d).to(x0.dtype)
            out_eps[rows] = ((a_s * x_e.double() - a_e * x_s.double()) / d).to(eps.dtype)
        return out_x0, out_eps


def on_window_line(x0_hat: Tensor, eps_hat: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """x_t = alpha(t) x0^ + sigma(t) eps^ (for tests and plots of the window paths)."""
    t = as_time(t)
    return broadcast_to(schedule.alpha(t), x0_hat) * x0_hat + broadcast_to(schedule.sigma(t), x0_hat) * eps_hat


__all__ = ["PhaseWindows", "window_boundaries", "recommended_sampling", "on_window_line"]
