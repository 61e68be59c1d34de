"""Improved PNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator" (DEIS),
arXiv 2204.13902, sec. 5 / App. "iPNDM"): Adams-Bashforth on the velocity in t, with lower-order warm-up.

    x_{i+1} = x_i + h_i sum_{j=0}^{p-1} c_j v(x_{i-j}, t_{i-j}),

p = min(4, i + 1). ``ipndm`` uses the fixed Adams-Bashforth weights of the paper, c = (1), (3, -1)/2,
(23, -16, 5)/12, (55, -59, 37, -9)/24, exact for equal steps. ``ipndm-v`` uses the variable-step weights
c_j = (1/h_i) int_{t_i}^{t_{i+1}} l_j(t) dt of the Lagrange basis l_j through t_i, ..., t_{i-p+1}; they equal the
fixed ones on a uniform grid and keep the order on any grid. The first-order warm-up step has local error O(h^2),
so both attain global order 2 (the AB4 steps are fourth order).
"""

from __future__ import annotations

import numpy as np

from ..teacher import Condition, Teacher
from .base import Solver, host_to_device, on_device, register_solver

ADAMS_BASHFORTH = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def variable_step_weights(ts: list[float], i: int, p: int) -> list[float]:
    """Adams-Bashforth weights for the step t_i -> t_{i+1} through the nodes t_i, t_{i-1}, ..., t_{i-p+1}.

    With t = t_i + s h and s_j = (t_{i-j} - t_i) / h, the weights integrate every polynomial of degree < p exactly:
    sum_j c_j s_j^k = int_0^1 s^k ds = 1 / (k + 1), k = 0 .. p-1 (a Vandermonde system).
    """
    h = ts[i + 1] - ts[i]
    s = np.array([(ts[i - j] - ts[i]) / h for j in range(p)])
    vandermonde = s[None, :] ** np.arange(p)[:, None]
    return np.linalg.solve(vandermonde, 1.0 / np.arange(1, p + 1)).tolist()


class IPNDM(Solver):
    """iPNDM of order up to ``order`` (4), fixed (paper) or ``variable_step`` Adams-Bashforth weights."""

    def __init__(self, order: int = 4, variable_step: bool = False):
        if order not in ADAMS_BASHFORTH:
            raise ValueError(f"iPNDM order {order}: expected 1 to 4")
        self.order, self.variable_step = order, variable_step
        self.name = "ipndm-v" if variable_step else "ipndm"

    def weights(self, ts: list[float]) -> list[list[float]]:
        """Per step, the weights c_0..c_3 (zero-padded) of the last four velocities."""
        out = []
        for i in range(len(ts) - 1):
            p = min(self.order, i + 1)
            c = variable_step_weights(ts, i, p) if self.variable_step else ADAMS_BASHFORTH[p]
            out.append(list(c) + [0.0] * (4 - p))
        return out

    def sample(self, teacher: Teacher, x, ts, nfe, cond: Condition | None = None):
        h, c = on_device(ts.diff(), x), on_device(self.weights(ts.tolist()), x)
        t, b = host_to_device(ts, x.device), x.shape[0]
        v = []  # velocities, newest first
        for i in range(len(ts) - 1):
            v = [teacher.velocity(x, t[i].expand(b), cond)] + v[:3]
            x = x + h[i] * sum(c[i, j] * v[j] for j in range(len(v)))
        return x


register_solver("ipndm", IPNDM)
register_solver("ipndm-v", lambda: IPNDM(variable_step=True))
