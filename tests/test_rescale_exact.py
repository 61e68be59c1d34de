"""`rescale` is exact: the teacher's ODE under its own schedule and the rescaled teacher's ODE under the new one
reach the same x0 from corresponding noise (both solved at high accuracy with scipy's solve_ivp)."""

import numpy as np
import pytest
import torch

from accelkit.models.analytic import gaussian_mixture_2d, gaussian_mixture_images
from accelkit.schedules import (
    CosineSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    LinearSchedule,
    Schedule,
    scale_time_map,
)
from accelkit.solvers.reference import reference_solve
from accelkit.teacher import RescaledTeacher, Teacher

F64 = torch.float64


def ode_solve(teacher: Teacher, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """Integrate dx/dt from t0 to t1 at rtol 1e-10 (in log-SNR for the discrete VP schedule; see reference_solve)."""
    return reference_solve(teacher, x, t0, t1)


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
