"""`rescale` is exact: the teacher's ODE under its own schedule and the rescaled teacher's ODE under the new one
reach the same x0 from corresponding noise (both solved at high accuracy with scipy's solve_ivp)."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from accelkit.models.analytic import gaussian_mixture_2d, gaussian_mixture_images
from accelkit.schedules import (
    CosineSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    LinearSchedule,
    Schedule,
    scale_time_map,
)
from accelkit.teacher import RescaledTeacher, Teacher

F64 = torch.float64


def ode_solve(teacher: Teacher, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """Integrate dx/dt from t0 to t1 at rtol 1e-10.

    For the discrete VP schedule, whose log(alpha) has a kink at every training step in t (an adaptive solver in t
    crawls across 1000 kinks), integrate with log-SNR as the variable instead, dx/dlambda = v / (dlambda/dt): in
    lambda the field is smooth.
    """
    shape, sch = x.shape, teacher.schedule
    if not isinstance(sch, DiscreteVPSchedule):

        def g(t, y):
            xt = torch.from_numpy(y).reshape(shape)
            return teacher.velocity(xt, torch.tensor(t, dtype=F64)).reshape(-1).numpy()

        sol = solve_ivp(g, (t0, t1), x.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-10)
        assert sol.success
        return torch.from_numpy(sol.y[:, -1]).reshape(shape)

    def f(lam, y):
        t = sch.t_of_log_snr(torch.tensor(lam, dtype=F64))
        dlam_dt = 2 * (sch.d_alpha(t) / sch.alpha(t) - sch.d_sigma(t) / sch.sigma(t))
        xt = torch.from_numpy(y).reshape(shape)
        return (teacher.velocity(xt, t) / dlam_dt).reshape(-1).numpy()

    lam0, lam1 = (float(sch.log_snr(torch.tensor(v, dtype=F64))) for v in (t0, t1))
    sol = solve_ivp(f, (lam0, lam1), x.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-10)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def overlap_start(src: Schedule, dst: Schedule) -> float:
    """The largest target time whose log-SNR the source schedule reaches (1 when the ranges match)."""
    lam_src_min = src.log_snr(torch.ones((), dtype=F64))
    lam_dst_min = dst.log_snr(torch.ones((), dtype=F64))
    if lam_dst_min >= lam_src_min:
        return 1.0
    return float(dst.t_of_log_snr(lam_src_min))


PAIRS = [
    (LinearSchedule(), CosineSchedule()),
    (CosineSchedule(), LinearSchedule()),
    (LinearSchedule(), EDMSchedule()),
    (DiscreteVPSchedule("linear"), LinearSchedule()),
    (DiscreteVPSchedule("scaled_linear", 1000, 0.00085, 0.012), CosineSchedule()),
]


@pytest.mark.parametrize("src,dst", PAIRS, ids=lambda s: s.name)
def test_rescaled_teacher_reaches_same_x0(src, dst):
    base = gaussian_mixture_2d(src, modes=6, std=0.2)
    rescaled = RescaledTeacher(base, dst)
    r_start, r_end = overlap_start(src, dst), 1e-3
    t_start, s_start = scale_time_map(src, dst, torch.tensor(r_start, dtype=F64))
    t_end, s_end = scale_time_map(src, dst, torch.tensor(r_end, dtype=F64))
    g = torch.Generator().manual_seed(0)
    x_a = base.prior_sample(torch.randn(8, 2, generator=g, dtype=F64))  # state of A at t_start
    x_b = s_start * x_a  # the corresponding state of B at r_start

    end_a = ode_solve(base, x_a, float(t_start), float(t_end))
    end_b = ode_solve(rescaled, x_b, r_start, r_end)
    x0_a = base.predict_x0(end_a, t_end)
    x0_b = rescaled.predict_x0(end_b, torch.tensor(r_end, dtype=F64))
    rel = (x0_a - x0_b).norm() / x0_a.norm()
    assert rel < 1e-4, f"relative x0 difference {rel:.2e}"
    # and the states themselves correspond: x_B = s x_A
    assert torch.allclose(end_b, s_end * end_a, rtol=1e-5, atol=1e-6)


def test_rescaled_images_teacher_under_edm():
    base = gaussian_mixture_images(CosineSchedule(), shape=(1, 4, 4), modes=3)
    rescaled = RescaledTeacher(base, EDMSchedule(80.0))
    r0 = overlap_start(base.schedule, rescaled.schedule)
    t0, s0 = scale_time_map(base.schedule, rescaled.schedule, torch.tensor(r0, dtype=F64))
    x_a = torch.randn(2, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    t_end = scale_time_map(base.schedule, rescaled.schedule, torch.tensor(1e-3, dtype=F64))[0]
    end_a = ode_solve(base, x_a, float(t0), float(t_end))
    end_b = ode_solve(rescaled, s0 * x_a, r0, 1e-3)
    x0_a = base.predict_x0(end_a, t_end)
    x0_b = rescaled.predict_x0(end_b, torch.tensor(1e-3, dtype=F64))
    assert float((x0_a - x0_b).norm() / x0_a.norm()) < 1e-4
    assert np.isfinite(end_b.numpy()).all()
