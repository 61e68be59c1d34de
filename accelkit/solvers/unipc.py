"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
arXiv 2302.04867): the multistep predictor UniP-p with the corrector UniC, data prediction, in
lambda = log(alpha / sigma), with B(h) = e^{-h} - 1 (the paper's "bh2").

With m_k = x0_hat at t_k, h = lambda_{i+1} - lambda_i, r_k = (lambda_{i-k} - lambda_i) / h and
D_k = (m_{i-k} - m_i) / r_k (k = 1 .. p-1):

    predictor   x~_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) m_i
                           - alpha_{i+1} B(h) sum_k rho^p_k D_k,
    corrector   x_{i+1}  = (the same first two terms)
                           - alpha_{i+1} B(h) (sum_k rho^c_k D_k + rho^c_p (m(x~_{i+1}, t_{i+1}) - m_i)),

where rho^p solves the (p-1) x (p-1) and rho^c the p x p system R rho = g of Algorithm 2: R_jk = r_k^(j-1) with
r_p = 1, and g_j = j! psi_j / B(h), psi_1 = (e^{-h} - 1) / (-h) - 1, psi_{j+1} = psi_j / (-h) - 1 / (j + 1)!.
rho^p = 1/2 for p = 2 and rho^c = 1/2 for p = 1, as in the paper's code.
The corrector reuses the evaluation at x~_{i+1} that the next predictor needs (the model is not re-evaluated at the
corrected point), so it costs no NFE; the last step has no corrector. UniP-p with UniC has order p + 1; the
first-order warm-up step with its corrector is second order, which bounds UniPC-3 at global order 3.
"""

from __future__ import annotations

import math

import torch

from ..teacher import Condition, Teacher
from .base import GridNodes, Solver, host_to_device, on_device, register_solver


def unipc_rhos(h: float, rks: list[float], order: int) -> tuple[list[float], list[float]]:
    """(rho^p, rho^c) for one step of size h in lambda with the history ratios ``rks`` (r_1 .. r_{p-1})."""
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    r = torch.tensor(list(rks) + [1.0], dtype=torch.float64)
    rows, b = [], []
    for j in range(1, order + 1):
        rows.append(r ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, bb = torch.stack(rows), torch.tensor(b, dtype=torch.float64)
    if order == 1:
        return [], [0.5]
    rho_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bb[:-1]).tolist()
    rho_c = torch.linalg.solve(R, bb).tolist()
    return rho_p, rho_c


class UniPC(Solver):
    """UniPC-p (bh2) with the UniC corrector; ``order`` p = 1, 2 or 3. One evaluation per step.

    ``lower_order_final`` also caps step i's order by the steps left (N - i), diffusers' default rule for few
    steps; without it only the step onto sigma = 0 is lowered (to first order, returning the x0 prediction).
    """

    def __init__(self, order: int = 3, lower_order_final: bool = False):
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order {order}: expected 1, 2 or 3")
        self.order, self.lower_order_final = order, lower_order_final
        self.name = "unipc" if order == 3 else f"unipc{order}"

    def coefficients(self, g: GridNodes):
        """Per-step orders and the predictor / corrector scalars (float64, host)."""
        orders = g.multistep_orders(self.order, self.lower_order_final)
        lam = [float(v) for v in g.lam]
        ratio, w_m, w_b, inv_r, rho_p, rho_c = [], [], [], [], [], []
        for i, p in enumerate(orders):
            h = lam[i + 1] - lam[i]
            alpha_next = float(g.alpha[i + 1])
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            rp, rc = unipc_rhos(h, rks, p)
            ratio.append(float(g.sigma[i + 1] / g.sigma[i]))
            w_m.append(-alpha_next * math.expm1(-h))
            w_b.append(-alpha_next * math.expm1(-h))  # -alpha_{i+1} B(h), bh2
            pad = [0.0] * (2 - len(rks))
            inv_r.append([1.0 / r for r in rks] + pad)
            rho_p.append(rp + [0.0] * (2 - len(rp)))
            rho_c.append(rc[:-1] + [0.0] * (2 - len(rc[:-1])) + [rc[-1]])
        return orders, dict(ratio=ratio, w_m=w_m, w_b=w_b, inv_r=inv_r, rho_p=rho_p, rho_c=rho_c)

    def sample(self, teacher: Teacher, x, ts, nfe, cond: Condition | None = None):
        orders, c = self.coefficients(GridNodes.of(teacher.schedule, ts))
        ratio, w_m, w_b, inv_r, rho_p, rho_c = (on_device(c[k], x) for k in
                                                ("ratio", "w_m", "w_b", "inv_r", "rho_p", "rho_c"))
        t, b = host_to_device(ts, x.device), x.shape[0]
        m: list = []  # x0 predictions at t_i, t_{i-1}, ...
        x_start = x  # x_{i-1}, where the step being corrected started
        for i, p in enumerate(orders):
            m_new = teacher.predict_x0(x, t[i].expand(b), cond)
            if i > 0:  # UniC: correct step i - 1 with the evaluation at its predicted end
                j, pj = i - 1, orders[i - 1]
                d = [(m[k] - m[0]) * inv_r[j, k - 1] for k in range(1, pj)]
                corr = sum((rho_c[j, k - 1] * d[k - 1] for k in range(1, pj)), rho_c[j, 2] * (m_new - m[0]))
                x = ratio[j] * x_start + w_m[j] * m[0] + w_b[j] * corr
            m = [m_new] + m[:2]
            x_start = x
            # UniP: predict step i
            d = [(m[k] - m[0]) * inv_r[i, k - 1] for k in range(1, p)]
            x = ratio[i] * x + w_m[i] * m[0]
            if p > 1:
                x = x + w_b[i] * sum(rho_p[i, k - 1] * d[k - 1] for k in range(1, p))
        return x


register_solver("unipc", lambda: UniPC(3))
register_solver("unipc2", lambda: UniPC(2))
