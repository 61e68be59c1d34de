"""Quality against NFE: every (teacher, solver, NFE) run on the same noise and compared with

* the teacher's own ODE endpoint from that noise (RMSE, PSNR), solved at high accuracy, and
* a sample of the data (sliced Wasserstein-2 and MMD^2, see :mod:`accelkit.metrics`) when one is given.

The evaluation draws nothing at random itself: noise and reference come from the caller (seeded), so two runs on
the same inputs print the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from . import metrics
from .solvers import solve
from .teacher import Condition, Teacher


@dataclass
class QualityRow:
    """One method at one NFE."""

    method: str
    solver: str
    nfe: int
    rmse: float
    psnr: float
    sliced_w2: float | None
    mmd2: float | None
    samples_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sample_batched(teacher: Teacher, noise: Tensor, solver: str, nfe: int, cond: Condition | None = None,
                   batch_size: int = 4096, **solve_kw) -> Tensor:
    """``solve`` from ``teacher.prior_sample(noise)`` in batches of ``batch_size`` rows."""
    out = []
    for i in range(0, noise.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        c = cond.index(sl) if cond is not None else None
        out.append(solve(teacher, teacher.prior_sample(noise[sl]), solver=solver, nfe=nfe, cond=c, **solve_kw))
    return torch.cat(out)


def evaluate(teacher: Teacher, noise: Tensor, reference: Tensor, solvers: Sequence[str], nfes: Sequence[int],
             data: Tensor | None = None, method: str = "teacher", cond: Condition | None = None,
             batch_size: int = 4096) -> list[QualityRow]:
    """Rows of :class:`QualityRow` for every solver at every NFE on ``noise`` against ``reference`` endpoints."""
    rows = []
    for solver in solvers:
        for nfe in nfes:
            start = time.perf_counter()
            x = sample_batched(teacher, noise, solver, nfe, cond, batch_size)
            seconds = max(time.perf_counter() - start, 1e-9)
            sw = mm = None
            if data is not None:
                n = min(len(x), len(data))
                sw = metrics.sliced_wasserstein(x[:n], data[:n])
                mm = metrics.mmd(x[:n], data[:n])
            rows.append(QualityRow(method, solver, int(nfe), metrics.rmse(x, reference), metrics.psnr(x, reference),
                                   sw, mm, len(x) / seconds))
    return rows


@torch.no_grad()
def straightness(teacher: Teacher, noise: Tensor, nfe: int = 64, cond: Condition | None = None) -> float:
    """Trajectory straightness (Liu et al. 2022, "Flow straight and fast", eq. for S(Z)) of ``teacher``'s ODE:

        S = int_0^1 E || (x_1 - x_0) - v(x_t, t) ||^2 dt,

    along the teacher's own trajectories from x_1 = prior_sample(noise) to their endpoints x_0, t from 1 (noise) to
    0 (data), v = dx/dt. Euler on ``nfe`` uniform steps gives the trajectory and a left Riemann sum the integral;
    the squared norm is averaged over the elements (so 2-D and image values compare per dimension). S = 0 exactly
    when every trajectory is a straight line travelled at constant speed, which one Euler step then solves exactly.
    """
    ts = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    x = teacher.prior_sample(noise)
    x1 = x
    velocities = []
    for k in range(nfe):
        t = ts[k].expand(x.shape[0]).to(x.device)
        v = teacher.velocity(x, t, cond).to(x.dtype)
        velocities.append(v)
        x = x + (ts[k + 1] - ts[k]).item() * v
    chord = x1 - x  # (x_1 - x_0) / (1 - 0)
    dims = tuple(range(1, x.ndim))
    gaps = [((chord - v).double() ** 2).mean(dim=dims) for v in velocities]
    return float(sum(g.mean() for g in gaps) / nfe)


def print_quality_table(rows: Sequence[QualityRow], title: str = "quality against NFE") -> None:
    """A rich table of ``rows`` on stderr."""
    from rich.table import Table

    from .console import err

    table = Table(title=title)
    for col in ("solver", "NFE", "RMSE", "PSNR", "SW2", "MMD²", "samp/s"):
        table.add_column(col, justify="left" if col == "solver" else "right")

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    methods = {r.method for r in rows}
    for r in rows:
        name = r.solver if len(methods) == 1 or r.method == "teacher" else f"{r.solver} ({r.method})"
        table.add_row(name, str(r.nfe), fmt(r.rmse, ".4f"), fmt(r.psnr, ".1f"), fmt(r.sliced_w2, ".4f"),
                      fmt(r.mmd2, ".5f"), fmt(r.samples_per_s, ".0f"))
    err.print(table)
