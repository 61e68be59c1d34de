"""Few-step ODE solvers over the teacher interface.

``solve(teacher, x_init, solver="euler", nfe=8)`` integrates the probability-flow ODE dx/dt = teacher.velocity(x, t)
from t = 1 (noise) to t = 0 (data) in exactly ``nfe`` network evaluations. This first version has the Euler method
on a uniform or user-given grid; the other solvers and grids extend the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import AccelkitError
from ..teacher import Condition, Teacher

SOLVER_NAMES = ("euler",)
GRID_NAMES = ("uniform",)


def make_grid(grid: str | Sequence[float], nfe_steps: int, t_max: float = 1.0, t_min: float = 0.0) -> Tensor:
    """Times t_0 = t_max > ... > t_n = t_min (float64) for ``nfe_steps`` steps, or a user list checked for order."""
    if isinstance(grid, str):
        if grid not in GRID_NAMES:
            raise AccelkitError(f"unknown grid {grid!r}: expected one of {', '.join(GRID_NAMES)} or a list of times")
        return torch.linspace(t_max, t_min, nfe_steps + 1, dtype=torch.float64)
    ts = torch.as_tensor(list(grid), dtype=torch.float64)
    if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()):
        raise AccelkitError(f"grid {list(grid)}: expected a strictly decreasing list of at least two times in [0, 1]")
    if ts[0] > 1 or ts[-1] < 0:
        raise AccelkitError(f"grid {list(grid)}: times must lie in [0, 1]")
    return ts


@torch.no_grad()
def solve(teacher: Teacher, x_init: Tensor, solver: str = "euler", nfe: int = 8,
          grid: str | Sequence[float] = "uniform", cond: Condition | None = None) -> Tensor:
    """Integrate from ``x_init`` at the grid's first time to its last in exactly ``nfe`` teacher evaluations.

    Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i).
    """
    if solver not in SOLVER_NAMES:
        raise AccelkitError(f"unknown solver {solver!r}: expected one of {', '.join(SOLVER_NAMES)}")
    if nfe < 1:
        raise AccelkitError(f"NFE {nfe}: expected at least 1")
    ts = make_grid(grid, nfe).to(x_init.device)
    if len(ts) - 1 != nfe:
        raise AccelkitError(f"grid has {len(ts) - 1} steps but NFE is {nfe}")
    x = x_init
    for i in range(nfe):
        v = teacher.velocity(x, ts[i].expand(x.shape[0]), cond)
        x = x + (ts[i + 1] - ts[i]).to(x.dtype) * v
    return x


__all__ = ["solve", "make_grid", "SOLVER_NAMES", "GRID_NAMES"]
