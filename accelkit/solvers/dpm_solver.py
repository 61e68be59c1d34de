"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", arXiv 2211.01095), data prediction in lambda = log(alpha / sigma) (half the log-SNR).

With m = x0_hat and h_i = lambda_{i+1} - lambda_i, the exact solution of the ODE from t_i to t_{i+1} is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + sigma_{i+1} int_{lambda_i}^{lambda_{i+1}} e^lambda m(lambda) d lambda,

and the solver replaces m by its polynomial through the last 1, 2 or 3 points. With E = e^{-h} - 1 and
r_k = h_{i-k} / h_i (earlier step sizes):

    order 1 (DDIM):  x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} E m_i
    order 2 (2M):    D = m_i + (m_i - m_{i-1}) / (2 r_1)                          (Algorithm 2)
                     x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} E D
    order 3 (3M):    D1_0 = (m_i - m_{i-1}) / r_1,  D1_1 = (m_{i-1} - m_{i-2}) / r_2,
                     D1 = D1_0 + r_1 / (r_1 + r_2) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r_1 + r_2),
                     x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} E m_i
                               + alpha_{i+1} (E / h + 1) D1 - alpha_{i+1} ((E + h) / h^2 - 1/2) D2.

The 3M update is the one of the paper's code and of diffusers (``dpm++3m`` equals diffusers'
``DPMSolverMultistepScheduler(solver_order=3)``). Its second-difference term is half the exact one: by Taylor
expansion D1 = h m' + O(h^3) and D2 = h^2 m'' / 2 + O(h^3), while the exact integral of the quadratic term is
alpha_{i+1} (1 - 2 (E + h) / h^2) D2, so the 3M step has local error O(h^3) (a second-order method) where the exact
coefficient gives O(h^4). ``dpm++3m-exact`` (``exact_phi=True``) uses the exact integrals of the interpolating
polynomial on every step, (E / h + 1) D1_0 on second-order steps and the coefficient above on third-order ones
(tests/test_solvers.py::test_dpm_solver_3m_local_error_orders measures both).

Warm-up with lower orders; the final step onto sigma = 0 (lambda = +inf) is first order and returns the x0 prediction
(see :meth:`GridNodes.multistep_orders`).
"""

from __future__ import annotations

import math

from ..teacher import Condition, Teacher
from .base import GridNodes, Solver, host_to_device, on_device, register_solver


class DPMSolverPP(Solver):
    """DPM-Solver++(2M) (``order=2``) or (3M) (``order=3``); one evaluation per step."""

    def __init__(self, order: int = 2, exact_phi: bool = False):
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order {order}: expected 1, 2 or 3")
        self.order = order
        #: the exact integrals of the interpolating polynomial: on second-order steps alpha_{i+1} (E / h + 1) D1_0
        #: instead of Algorithm 2's midpoint form (diffusers' solver_type "heun" against "midpoint"), on third-order
        #: steps the exact weight of D2 (twice the 3M code's; see the module docstring)
        self.exact_phi = exact_phi
        self.name = (f"dpm++{order}m" if order > 1 else "ddim") + ("-exact" if exact_phi and order == 3 else "")

    def coefficients(self, g: GridNodes) -> tuple[list[int], dict[str, list[float]]]:
        """Per-step orders and the scalars of the update above (float64, host)."""
        orders = g.multistep_orders(self.order)
        c = {k: [] for k in ("ratio", "w0", "w1", "w2", "inv_r1", "inv_r2", "q", "inv_r12")}
        lam = [float(v) for v in g.lam]
        for i, p in enumerate(orders):
            h = lam[i + 1] - lam[i]
            alpha_next = float(g.alpha[i + 1])
            e = math.expm1(-h)
            c["ratio"].append(float(g.sigma[i + 1] / g.sigma[i]))
            c["w0"].append(-alpha_next * e)
            r1 = (lam[i] - lam[i - 1]) / h if p >= 2 else 1.0
            r2 = (lam[i - 1] - lam[i - 2]) / h if p >= 3 else 1.0
            c["inv_r1"].append(1.0 / r1)
            c["inv_r2"].append(1.0 / r2)
            c["q"].append(r1 / (r1 + r2))
            c["inv_r12"].append(1.0 / (r1 + r2))
            if p == 2 and self.exact_phi:
                c["w1"].append(alpha_next * (e / h + 1.0))
                c["w2"].append(0.0)
            elif p == 2:
                c["w1"].append(-0.5 * alpha_next * e)  # D - m_i = (m_i - m_{i-1}) / (2 r_1) = D1_0 / 2
                c["w2"].append(0.0)
            elif p == 3:
                c["w1"].append(alpha_next * (e / h + 1.0))
                c["w2"].append(-alpha_next * ((e + h) / h**2 - 0.5) * (2.0 if self.exact_phi else 1.0))
            else:
                c["w1"].append(0.0)
                c["w2"].append(0.0)
        return orders, c

    def sample(self, teacher: Teacher, x, ts, nfe, cond: Condition | None = None):
        orders, c = self.coefficients(GridNodes.of(teacher.schedule, ts))
        ratio, w0, w1, w2, inv_r1, inv_r2, q, inv_r12 = (on_device(c[k], x) for k in
                                                         ("ratio", "w0", "w1", "w2", "inv_r1", "inv_r2", "q",
                                                          "inv_r12"))
        t, b = host_to_device(ts, x.device), x.shape[0]
        m = []  # x0 predictions, newest first
        for i, p in enumerate(orders):
            m = [teacher.predict_x0(x, t[i].expand(b), cond)] + m[:2]
            x_next = ratio[i] * x + w0[i] * m[0]
            if p >= 2:
                d1_0 = (m[0] - m[1]) * inv_r1[i]
                if p == 2:
                    x_next = x_next + w1[i] * d1_0
                else:
                    d1_1 = (m[1] - m[2]) * inv_r2[i]
                    d1 = d1_0 + q[i] * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) * inv_r12[i]
                    x_next = x_next + w1[i] * d1 + w2[i] * d2
            x = x_next
        return x


register_solver("dpm++2m", lambda: DPMSolverPP(2))
register_solver("dpm++3m", lambda: DPMSolverPP(3))
register_solver("dpm++3m-exact", lambda: DPMSolverPP(3, exact_phi=True))  # third order (see the module docstring)
register_solver("ddim", lambda: DPMSolverPP(1))  # first order: DDIM, eta = 0 (Euler on the linear schedule)
