"""Ground truth for the shortcut and MeanFlow targets on the analytic Gaussian-mixture teacher (no student needed):
the exact flow's two half jumps make the exact shortcut of twice the size at every level, the exact average velocity
has MeanFlow loss 0, the JVP target equals a central finite difference, and any teacher reads as the same
linear-path velocity after the scale-time transformation."""

import pytest
import torch

from accelkit.linear_path import guided_velocity, linear_path_record, linear_path_teacher
from accelkit.meanflow import (
    average_velocity_derivative,
    draw_time_pairs,
    exact_average_velocity,
    meanflow_loss,
    meanflow_target,
)
from accelkit.models.analytic import gaussian_mixture_2d
from accelkit.schedules import LinearSchedule, schedule_from_name
from accelkit.shortcut import draw_consistency_times, exact_shortcut, self_consistency_target, step_sizes

F64 = torch.float64


@pytest.fixture(scope="module")
def ring():
    return gaussian_mixture_2d(LinearSchedule())


def marginal(teacher, t: float, n: int = 24, seed: int = 0):
    """n points of the linear path's marginal at time t: (1 - t) x0 + t eps."""
    g = torch.Generator().manual_seed(seed)
    x0 = teacher.sample_data(n, g)
    eps = torch.randn(n, 2, generator=g, dtype=F64)
    return (1 - t) * x0 + t * eps


def scalar_shortcut(teacher):
    """s(z, t, d) of the exact flow, for batches that share one t and one d."""

    def step(z, t, d):
        assert bool((t == t[0]).all()) and bool((d == d[0]).all())
        return exact_shortcut(teacher, z, float(t[0]), float(d[0]))

    return step


def test_two_exact_half_jumps_equal_the_exact_shortcut_of_twice_the_size_at_every_level(ring):
    step = scalar_shortcut(ring)
    for d in step_sizes(6)[1:]:  # targets at 2d = 1, 1/2, ..., 1/32
        for j in sorted({2, int(round(1 / d))}):  # the lowest and the highest t on d's grid
            t = j * d
            z = marginal(ring, t, seed=j)
            tt, dd = torch.full((z.shape[0],), t, dtype=F64), torch.full((z.shape[0],), d, dtype=F64)
            target = self_consistency_target(step, z, tt, dd, clip=None)
            exact = exact_shortcut(ring, z, t, 2 * d)
            assert torch.allclose(target, exact, atol=1e-7, rtol=0), (d, t, float((target - exact).abs().max()))
    # the check can fail: on this curved flow one jump of size d is not the shortcut of size 2d
    z = marginal(ring, 1.0)
    assert float((exact_shortcut(ring, z, 1.0, 0.5) - exact_shortcut(ring, z, 1.0, 1.0)).abs().max()) > 0.1


def exact_u(teacher):
    """u*(z, r, t) from high-accuracy solves, for batches that share one r and one t."""

    def u(z, r, t):
        assert bool((t == t[0]).all()) and bool((r == r[0]).all())
        return exact_average_velocity(teacher, z, float(r[0]), float(t[0]))

    return u


def test_the_exact_average_velocity_has_meanflow_loss_zero(ring):
    u_star = exact_u(ring)
    for r, t in ((0.0, 1.0), (0.3, 0.8), (0.0, 0.4), (0.6, 0.6)):
        z = marginal(ring, t, seed=int(10 * t))
        rr, tt = torch.full((z.shape[0],), r, dtype=F64), torch.full((z.shape[0],), t, dtype=F64)
        v = ring.velocity(z, tt)
        u, target = meanflow_target(u_star, z, rr, tt, v, derivative="finite-difference", fd_step=1e-4)
        assert float((u - target).abs().max()) < 1e-6, (r, t)
        loss = meanflow_loss(u_star, z, rr, tt, v, derivative="finite-difference", fd_step=1e-4, power=0.0)
        assert float(loss) < 1e-12, (r, t, float(loss))
        if r < t:  # the teacher's velocity (a student at its start) is not the average velocity: loss far from 0
            bad = meanflow_loss(lambda z, r, t: ring.velocity(z, t), z, rr, tt, v, derivative="finite-difference",
                                fd_step=1e-4, power=0.0)
            assert float(bad) > 1e-2, (r, t, float(bad))
    # one jump with the exact average velocity lands where the teacher's ODE does
    z = marginal(ring, 1.0)
    from accelkit.solvers.reference import reference_solve

    end = reference_solve(ring, z, 1.0, 0.0, rtol=1e-11, atol=1e-11)
    assert torch.allclose(z - exact_average_velocity(ring, z, 0.0, 1.0), end, atol=1e-9)


class AverageVelocityMLP(torch.nn.Module):
    """u(z, r, t): an MLP on (z, t, t - r), the paper's (t, t - r) conditioning."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.SiLU(), torch.nn.LayerNorm(64),
                                       torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))

    def forward(self, z, r, t):
        x = torch.cat([z, t[:, None].to(z.dtype), (t - r)[:, None].to(z.dtype)], dim=1)
        return self.net(x)


def test_jvp_target_equals_a_central_finite_difference_and_the_fallback_is_close():
    net = AverageVelocityMLP()
    net64 = AverageVelocityMLP().double()
    net64.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 2, generator=g)
    r, t = draw_time_pairs(g, 256, interval_share=1.0)
    v = torch.randn(256, 2, generator=g)
    u, jvp_target = meanflow_target(net, z, r.float(), t.float(), v, derivative="jvp")  # fp32
    assert u.requires_grad and not jvp_target.requires_grad
    _, fd_target = meanflow_target(net64, z.double(), r, t, v.double(), derivative="finite-difference", fd_step=1e-5)
    rel = float((jvp_target.double() - fd_target).norm() / fd_target.norm())
    assert rel < 1e-4, rel
    _, dudt = average_velocity_derivative(net, z, r.float(), t.float(), v, derivative="jvp")
    _, dudt_fd64 = average_velocity_derivative(net64, z.double(), r, t, v.double(), derivative="finite-difference",
                                               fd_step=1e-5)
    assert float((dudt.double() - dudt_fd64).norm() / dudt_fd64.norm()) < 1e-4
    # the fallback a network without forward-mode derivatives gets: fp32, step 1e-3
    _, fallback = meanflow_target(net, z, r.float(), t.float(), v, derivative="finite-difference", fd_step=1e-3)
    assert float((fallback.double() - fd_target).norm() / fd_target.norm()) < 1e-2
    # gradients reach the weights through the JVP's primal output
    meanflow_loss(net, z, r.float(), t.float(), v).backward()
    assert net.net[0].weight.grad is not None and float(net.net[0].weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("schedule", ["vp-cosine", "edm", "vp-linear"])
def test_any_teacher_is_the_same_linear_path_velocity_after_rescaling(schedule):
    """The ring mixture under another schedule, rescaled to the linear path, has the linear teacher's velocity."""
    exact = gaussian_mixture_2d(LinearSchedule())
    other = gaussian_mixture_2d(schedule_from_name(schedule))
    lin = linear_path_teacher(other)
    assert lin is not other and lin.schedule.name == "linear"
    assert "rescaled from" in linear_path_record(other)["conversion"]
    for t in (0.05, 0.3, 0.7, 0.95):
        z = marginal(exact, t, n=64)
        tt = torch.full((64,), t, dtype=F64)
        a, b = lin.velocity(z, tt), exact.velocity(z, tt)
        tol = 1e-3 if schedule == "vp-linear" else 1e-8  # the discrete schedule's log-SNR is piecewise linear
        assert torch.allclose(a, b, atol=tol, rtol=0), (schedule, t, float((a - b).abs().max()))
    assert linear_path_teacher(exact) is exact
    assert linear_path_record(exact)["conversion"].startswith("none")


def test_guided_velocity_is_affine_in_the_scale_per_sample():
    """v_null + g (v_cond - v_null) with g per sample; g = 1 is the conditional velocity."""
    from accelkit.models.builtin import MLP, builtin_call
    from accelkit.teacher import Condition, NetworkTeacher

    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1, num_classes=3)
    teacher = NetworkTeacher(net, builtin_call, "flow", LinearSchedule(), (2,),
                             null_condition=Condition(class_labels=torch.tensor([3])))
    z, t = torch.randn(6, 2), torch.rand(6, dtype=F64)
    cond = Condition(class_labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    g = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.5, 4.0], dtype=F64)
    with torch.no_grad():
        v = guided_velocity(teacher, z, t, cond, g)
        v_c = teacher.velocity(z, t, cond)
        v_u = teacher.velocity(z, t, Condition(class_labels=torch.full((6,), 3)))
        for i, gi in enumerate(g.tolist()):
            assert torch.allclose(v[i], (teacher.with_guidance(gi).velocity(z, t, cond))[i], atol=1e-5)
    assert torch.allclose(v[0], v_u[0], atol=1e-6) and torch.allclose(v[1], v_c[1], atol=1e-6)


def test_training_draws_sit_on_the_levels_grids_and_pairs_are_ordered():
    g = torch.Generator().manual_seed(0)
    t, d = draw_consistency_times(g, 20000, 7)
    assert set(torch.log2(d).round().tolist()) == {-k for k in range(1, 8)}
    assert bool((t - 2 * d >= -1e-12).all()) and bool((t <= 1 + 1e-12).all())
    assert torch.allclose(t / d, (t / d).round())
    assert {float(x) for x in t[d == 0.5]} == {1.0}  # the coarsest target (2d = 1) jumps from noise to data
    r, tt = draw_time_pairs(g, 1000, interval_share=0.25)
    assert bool((tt >= r).all()) and int((tt != r).sum()) == 250
