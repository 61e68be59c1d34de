"""What every solver shares: the :class:`Solver` interface, the registry of solvers by name, and the schedule's
alpha, sigma and log-SNR on a time grid.

A solver integrates the probability-flow ODE of a :class:`~accelkit.teacher.Teacher` along a decreasing time grid
t_0 = t_max > ... > t_N = t_min in exactly ``nfe`` teacher evaluations. Its only knob for the grid is
:meth:`Solver.steps`, the number of grid intervals N that ``nfe`` evaluations buy. Everything a step needs that does
not depend on x is computed on the host before the loop and moved to the data's device once, so that the loop has
no host synchronisation and can be captured by CUDA graphs or ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AccelkitError
from ..schedules import Schedule
from ..teacher import Condition, Teacher


class Solver:
    """A fixed-step ODE solver. Subclasses set :attr:`name` and implement :meth:`sample`."""

    name: str = "solver"

    def steps(self, nfe: int) -> int:
        """Grid intervals N that take exactly ``nfe`` teacher evaluations (one per step for single-stage methods)."""
        return nfe

    def sample(self, teacher: Teacher, x: Tensor, ts: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
        """Integrate from ``x`` at ``ts[0]`` to ``ts[-1]`` along the grid ``ts`` (float64, on the host: coefficients
        are computed from it before the loop, and it is moved to x's device once)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@dataclass
class GridNodes:
    """alpha, sigma and lam = log(alpha / sigma) at the grid times, float64 on the host (for coefficients).

    ``lam`` is half the schedule's log-SNR: DPM-Solver and UniPC step in lambda = log(alpha / sigma).
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor

    @staticmethod
    def of(schedule: Schedule, ts: Tensor) -> GridNodes:
        t = ts.detach().to(torch.float64)
        return GridNodes(t, schedule.alpha(t), schedule.sigma(t), 0.5 * schedule.log_snr(t))

    def finite_history(self, i: int) -> int:
        """How many grid points before i in a row have finite log-SNR (a point at alpha = 0 carries no slope)."""
        k = 0
        while i - 1 - k >= 0 and math.isfinite(float(self.lam[i - 1 - k])):
            k += 1
        return k

    def multistep_orders(self, order: int, lower_order_final: bool = False) -> list[int]:
        """The order of each step of a multistep method in log-SNR.

        Warm-up: step i uses at most i + 1 points (fewer where earlier points sit at lambda = -inf). A step that ends
        at lambda = +inf (sigma = 0, the data end) is first order: its result is the x0 prediction, as DPM-Solver++
        and diffusers do, since higher-order differences over an infinite log-SNR step are undefined. With
        ``lower_order_final`` the order is also capped by the steps left (diffusers' UniPC rule).
        """
        n = len(self.t) - 1
        orders = []
        for i in range(n):
            p = min(order, 1 + self.finite_history(i))
            if not math.isfinite(float(self.lam[i])) or math.isinf(float(self.lam[i + 1])):
                p = 1
            if lower_order_final:
                p = min(p, n - i)
            orders.append(p)
        return orders


def on_device(values: list[float] | Tensor, x: Tensor) -> Tensor:
    """Host-side float64 coefficients as one tensor of x's dtype on x's device (moved once, before the loop).

    To a CUDA device through pinned memory without blocking: a copy from pageable memory would make the host wait
    for the GPU to finish its queued work at every solve.
    """
    return host_to_device(torch.as_tensor(values, dtype=torch.float64), x.device).to(dtype=x.dtype)


def host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` (a CPU tensor: the time grid, coefficients) on ``device``, without a host sync on CUDA."""
    if device.type == "cuda":
        return host.pin_memory().to(device=device, non_blocking=True)
    return host.to(device=device)


# ---------------------------------------------------------------------------------------------------------------
# Registry: solvers by name, so that learned solvers (bespoke) plug into solve() beside the built-in ones.

SolverFactory = Callable[[], Solver]
_REGISTRY: dict[str, Solver | SolverFactory] = {}


def register_solver(name: str, solver: Solver | SolverFactory, overwrite: bool = False) -> None:
    """Make ``solver`` (an instance, or a zero-argument factory such as a class) available to ``solve`` by name."""
    if not overwrite and name in _REGISTRY:
        raise ValueError(f"solver name {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = solver


def solver_names() -> tuple[str, ...]:
    """Every registered solver name, built-in ones first."""
    return tuple(_REGISTRY)


def is_solver(name: str) -> bool:
    """True for a registered solver name or the path of a learned solver (a ``bespoke`` artifact)."""
    from .learned import is_learned_solver
    from .parallel import is_parallel_spec

    return name in _REGISTRY or is_parallel_spec(name) or is_learned_solver(name)


def get_solver(solver: str | Solver) -> Solver:
    """A solver from its registered name, the path of a learned solver (a ``bespoke`` artifact, see
    :mod:`.learned`), or the solver object itself."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver not in _REGISTRY:
        from .learned import is_learned_solver, load_learned_solver
        from .parallel import is_parallel_spec, parse_parallel

        if is_parallel_spec(solver):
            return parse_parallel(solver)

        if is_learned_solver(solver):
            return load_learned_solver(solver)
    if not isinstance(solver, str) or solver not in _REGISTRY:
        raise AccelkitError(f"unknown solver {solver!r}: expected one of {', '.join(_REGISTRY)}, the path of a "
                            "bespoke artifact, or a Solver object")
    entry = _REGISTRY[solver]
    return entry if isinstance(entry, Solver) else entry()
