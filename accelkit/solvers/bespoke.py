"""Bespoke scale-time solvers (Shaul et al. 2023, "Bespoke Solvers for Generative Flow Models", arXiv 2310.19075).

A base solver (RK1 = Euler or RK2 = midpoint) takes n uniform steps h = 1/n in r in [0, 1] on the transformed path

    x_bar(r) = s_r x(t_r),   d x_bar / dr = u_bar_r(x_bar) = (ds_r / s_r) x_bar + s_r dt_r u_{t_r}(x_bar / s_r),

where u_t is the teacher's ODE velocity dx/dt and t_r, s_r are learned at the nodes the base solver visits. In
accelkit's convention t runs from t_0 = t_max (noise) down to t_n = t_min (data), so dt_r < 0.

RK1 step i, written back in x (x_i = x_bar_i / s_i):

    x_{i+1} = ((s_i + h ds_i) / s_{i+1}) x_i + (h dt_i s_i / s_{i+1}) u_{t_i}(x_i).

RK2 (midpoint in r; m = i + 1/2):

    x_m     = ((s_i + (h/2) ds_i) / s_m) x_i + ((h/2) dt_i s_i / s_m) u_{t_i}(x_i),
    x_{i+1} = (s_i / s_{i+1}) x_i + (h / s_{i+1}) (ds_m x_m + s_m dt_m u_{t_m}(x_m)).

Parameters (float64): the node times t_k through positive increments (softmax of ``log_increments`` times
t_0 - t_n, so t is monotone and both ends are fixed), the speeds dt_k < 0 at the evaluation nodes, the scales s_k > 0
at every node but the first (s_0 = 1) and the free rates ds_k at the evaluation nodes: 4n entries with
4n - 1 degrees of freedom for RK1 (the increments sum to t_0 - t_n), 8n with 8n - 1 for RK2.

Initialisation at the identity transform (s = 1, ds = 0) and at the base solver's own grid (dt_i = (t_{i+1} - t_i)
/ h, the RK2 midpoints at the middle of each interval) makes the learned solver exactly the plain base solver.

Loss: the paper's upper bound on the global error. With the step map x_bar_{i+1} = phi_i(x_bar_i) of Lipschitz
constant L_i (the teacher's velocity assumed L_u-Lipschitz, L_u = 1 as in the paper),

    RK1:  L_i = 1 + h (|ds_i| / s_i + |dt_i| L_u),
    RK2:  L_i = 1 + h l_m (1 + (h/2) l_i),  l_k = |ds_k| / s_k + |dt_k| L_u,

and the local errors d_i = || x_bar(r_{i+1}) - phi_i(x_bar(r_i)) || of each step started on the ground-truth path,

    || x_n - x(t_n) || = || x_bar_n - x_bar(1) || / s_n  <=  (1 / s_n) sum_{i=0}^{n-1} M_i d_i,
    M_i = prod_{j=i+1}^{n-1} L_j,

which :meth:`ScaleTimeSolver.bound_loss` averages over a batch of ground-truth paths (norms as root mean squares
over the sample's elements, so the bound is on the RMSE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import AccelkitError
from ..teacher import Condition, Teacher

F64 = torch.float64
BASES = ("rk1", "rk2")


@dataclass
class ScaleTimeNodes:
    """t, dt, s, ds at every node the base solver visits (k = 0, 1, ... n for RK1; 0, 1/2, 1, ... n for RK2); dt
    and ds are defined at the evaluation nodes only (all but the last)."""

    t: Tensor
    dt: Tensor
    s: Tensor
    ds: Tensor


class ScaleTimeSolver(nn.Module):
    """The learned parameters of a bespoke RK1 / RK2 solver of ``n`` steps; see the module docstring.

    ``grid``: the base solver's n + 1 times from t_max to t_min (the initial t_i). NFE is n for RK1, 2n for RK2.
    """

    def __init__(self, base: str, grid: Tensor, lipschitz: float = 1.0):
        super().__init__()
        if base not in BASES:
            raise AccelkitError(f"bespoke base {base!r}: expected one of {', '.join(BASES)}")
        grid = torch.as_tensor(grid, dtype=F64).detach().cpu()
        if grid.ndim != 1 or len(grid) < 2 or not bool((grid[1:] < grid[:-1]).all()):
            raise AccelkitError("bespoke grid: expected at least two strictly decreasing times")
        self.base, self.n, self.lipschitz = base, len(grid) - 1, float(lipschitz)
        nodes = grid if base == "rk1" else _interleave_midpoints(grid)
        self.register_buffer("t_ends", torch.stack([grid[0], grid[-1]]))
        span = float(grid[0] - grid[-1])
        increments = -(nodes.diff())
        evals = len(nodes) - 1
        speed = (grid[:-1] - grid[1:]) * self.n  # -dt_i = (t_i - t_{i+1}) / h
        if base == "rk2":
            speed = speed.repeat_interleave(2)
        self.log_increments = nn.Parameter(torch.log(increments / span))
        self.log_speed = nn.Parameter(torch.log(speed / span))
        self.log_scale = nn.Parameter(torch.zeros(evals, dtype=F64))
        self.scale_rate = nn.Parameter(torch.zeros(evals, dtype=F64))

    @property
    def nfe(self) -> int:
        return self.n if self.base == "rk1" else 2 * self.n

    @property
    def h(self) -> float:
        return 1.0 / self.n

    def nodes(self) -> ScaleTimeNodes:
        t0, tn = self.t_ends[0], self.t_ends[1]
        frac = torch.softmax(self.log_increments, 0).cumsum(0)
        t = torch.cat([t0.reshape(1), t0 - (t0 - tn) * frac[:-1], tn.reshape(1)])
        dt = -(t0 - tn) * torch.exp(self.log_speed)
        s = torch.cat([torch.ones(1, dtype=F64, device=t.device), torch.exp(self.log_scale)])
        return ScaleTimeNodes(t, dt, s, self.scale_rate)

    # ---------------------------------------------------------------------------------------------------- sampling

    def step(self, teacher: Teacher, x: Tensor, i: int, nodes: ScaleTimeNodes, cond: Condition | None = None
             ) -> Tensor:
        """One base-solver step from x at node i (in x, not x_bar): x_{i+1}."""
        h, b = self.h, x.shape[0]
        t, dt, s, ds = nodes.t, nodes.dt, nodes.s, nodes.ds

        def c(v: Tensor) -> Tensor:
            return v.to(dtype=x.dtype)

        if self.base == "rk1":
            u = teacher.velocity(x, t[i].expand(b), cond)
            return c((s[i] + h * ds[i]) / s[i + 1]) * x + c(h * dt[i] * s[i] / s[i + 1]) * u
        k, m, e = 2 * i, 2 * i + 1, 2 * i + 2  # node indices of x_i, the midpoint and x_{i+1}
        u = teacher.velocity(x, t[k].expand(b), cond)
        x_mid = c((s[k] + 0.5 * h * ds[k]) / s[m]) * x + c(0.5 * h * dt[k] * s[k] / s[m]) * u
        u_mid = teacher.velocity(x_mid, t[m].expand(b), cond)
        return c(s[k] / s[e]) * x + c(h / s[e]) * (c(ds[m]) * x_mid + c(s[m] * dt[m]) * u_mid)

    def sample(self, teacher: Teacher, x: Tensor, cond: Condition | None = None) -> Tensor:
        """Integrate from x at t_max to t_min in :attr:`nfe` teacher evaluations."""
        nodes = self.nodes()
        for i in range(self.n):
            x = self.step(teacher, x, i, nodes, cond)
        return x

    # -------------------------------------------------------------------------------------------------------- loss

    def step_lipschitz(self, nodes: ScaleTimeNodes) -> Tensor:
        """L_i of each step map x_bar_i -> x_bar_{i+1} (module docstring)."""
        h, lu = self.h, self.lipschitz
        l_eval = nodes.ds.abs() / nodes.s[:-1] + nodes.dt.abs() * lu
        if self.base == "rk1":
            return 1.0 + h * l_eval
        return 1.0 + h * l_eval[1::2] * (1.0 + 0.5 * h * l_eval[0::2])

    def bound_loss(self, teacher: Teacher, path: Callable[[Tensor], Tensor], cond: Condition | None = None
                   ) -> Tensor:
        """The bound (1 / s_n) sum_i M_i d_i on the RMSE at t_min, averaged over the batch of ground-truth paths
        ``path(t)`` (a differentiable function of the time giving the batch's states at t)."""
        nodes = self.nodes()
        stride = 1 if self.base == "rk1" else 2
        lips = self.step_lipschitz(nodes)
        # M_i = prod_{j > i} L_j: reversed cumulative product, shifted by one
        later = torch.cat([torch.flip(torch.cumprod(torch.flip(lips[1:], [0]), 0), [0]),
                           torch.ones(1, dtype=F64, device=lips.device)])
        total = 0.0
        for i in range(self.n):
            x_i = path(nodes.t[stride * i])
            x_next = path(nodes.t[stride * (i + 1)])
            err = self.step(teacher, x_i, i, nodes, cond) - x_next
            rms = err.double().flatten(1).pow(2).mean(1).add(1e-30).sqrt()
            total = total + later[i] * nodes.s[stride * (i + 1)] * rms
        return (total / nodes.s[-1]).mean()

    def describe(self) -> dict[str, list[float]]:
        with torch.no_grad():
            nd = self.nodes()
        return {"t": nd.t.tolist(), "dt": nd.dt.tolist(), "s": nd.s.tolist(), "ds": nd.ds.tolist()}


def _interleave_midpoints(grid: Tensor) -> Tensor:
    mids = 0.5 * (grid[:-1] + grid[1:])
    out = torch.empty(2 * len(grid) - 1, dtype=F64)
    out[0::2], out[1::2] = grid, mids
    return out


def bespoke_steps(base: str, nfe: int) -> int:
    """Steps n that ``nfe`` evaluations buy: n = NFE for RK1, NFE / 2 for RK2 (which needs an even NFE)."""
    if base == "rk2":
        if nfe % 2 or nfe < 2:
            raise AccelkitError(f"--nfe {nfe} with --base rk2: expected an even NFE of at least 2 (two evaluations "
                                "per step)")
        return nfe // 2
    if nfe < 1:
        raise AccelkitError(f"--nfe {nfe}: expected at least 1")
    return nfe


def parameter_count(base: str, n: int) -> int:
    """Degrees of freedom of a bespoke solver of n steps: 4n - 1 (RK1), 8n - 1 (RK2)."""
    return (4 if base == "rk1" else 8) * n - 1


__all__ = ["ScaleTimeSolver", "ScaleTimeNodes", "BASES", "bespoke_steps", "parameter_count"]
