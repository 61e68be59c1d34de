"""Solvers against ground truth: convergence orders on the analytic Gaussian-mixture teacher (exact reference from
scipy's solve_ivp at rtol 1e-10), exact NFE, finite results at the data end, grids and input validation."""

import math

import numpy as np
import pytest
import torch

from accelkit.errors import AccelkitError
from accelkit.models.analytic import gaussian_mixture_2d, gaussian_mixture_images
from accelkit.schedules import CosineSchedule, DiscreteVPSchedule, EDMSchedule, LinearSchedule, VESchedule
from accelkit.solvers import (
    GRID_NAMES,
    SOLVER_NAMES,
    Euler,
    Solver,
    get_solver,
    make_grid,
    register_solver,
    solve,
    solver_grid,
    solver_names,
)
from accelkit.solvers.reference import reference_solve

F64 = torch.float64
T_MIN = 0.02  # the order tests end before the data end, so that no step is lowered there (see test_data_end_*)

# solver: (order attained, NFEs in the asymptotic range, why it differs from the method's nominal order)
ORDERS = {
    "euler": (1, [16, 32, 64], ""),
    "heun": (2, [33, 65, 129], ""),
    "midpoint": (2, [32, 64, 128], ""),
    "dpm++2m": (2, [32, 64, 128], ""),
    "dpm++3m": (2, [128, 256, 512], "nominal 3; the first-order warm-up step has local error O(h^2), which bounds "
                                    "the global order by 2 (visible as ~2.6 at 16-64 NFE, 2.0 from 128 on)"),
    "unipc": (3, [16, 32, 64], "UniP-3 + UniC is order 4 on steady steps; the warm-up step (order 1 + UniC) is "
                               "second order locally, O(h^3), so the global order is 3"),
    "unipc2": (3, [64, 128, 256], "UniP-2 + UniC: order 2 + 1"),
    "ipndm": (2, [16, 32, 64], "AB4 steps are order 4, but the Euler warm-up step bounds the global order by 2"),
    "ipndm-v": (2, [16, 32, 64], "as ipndm (same weights on a uniform grid)"),
}


@pytest.fixture(scope="module", params=[LinearSchedule(), CosineSchedule()], ids=lambda s: s.name)
def problem(request):
    teacher = gaussian_mixture_2d(request.param, modes=4, std=0.5)
    x = teacher.prior_sample(torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0)))
    return teacher, x, reference_solve(teacher, x, 1.0, T_MIN)


def fitted_order(errors, nfes):
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_convergence_order(problem, name):
    teacher, x, ref = problem
    order, nfes, _why = ORDERS[name]
    errors = [float((solve(teacher, x, name, n, grid="uniform", t_min=T_MIN) - ref).norm() / ref.norm())
              for n in nfes]
    slope = fitted_order(errors, nfes)
    assert abs(slope - order) < 0.3, f"{name} on {teacher.schedule.name}: order {slope:.2f}, errors {errors}"


class CountingTeacher(torch.nn.Module):
    """Wraps a teacher and counts its evaluations (every solver goes through denoise)."""

    def __init__(self, teacher):
        super().__init__()
        self.inner, self.calls = teacher, 0
        self.schedule, self.sample_shape = teacher.schedule, teacher.sample_shape

    def denoise(self, x, t, cond=None):
        self.calls += 1
        return self.inner.denoise(x, t, cond)

    def predict_x0(self, x, t, cond=None):
        return self.denoise(x, t, cond)[0]

    def velocity(self, x, t, cond=None):
        from accelkit.teacher import Teacher

        return Teacher.velocity(self, x, t, cond)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_exact_nfe(name):
    teacher = CountingTeacher(gaussian_mixture_2d(LinearSchedule()))
    x = torch.randn(3, 2, dtype=F64)
    for nfe in (1, 2, 3, 4, 5, 8, 11):
        teacher.calls = 0
        solve(teacher, x, name, nfe)
        assert teacher.calls == nfe, f"{name} at NFE {nfe} called the teacher {teacher.calls} times"


SCHEDULES = [LinearSchedule(), CosineSchedule(), EDMSchedule(), VESchedule(), DiscreteVPSchedule("linear"),
             DiscreteVPSchedule("squaredcos_cap_v2")]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name + "-" + getattr(s, "beta_schedule", ""))
def test_data_end_is_finite(schedule):
    """Every solver on every grid reaches t = 0 (sigma = 0, log-SNR = inf) in float32 without NaN."""
    teacher = gaussian_mixture_images(schedule, shape=(1, 4, 4), modes=3)
    x = teacher.prior_sample(torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    for grid in GRID_NAMES:
        for name in SOLVER_NAMES:
            for nfe in (1, 2, 5):
                out = solve(teacher, x, name, nfe, grid=grid)
                assert out.dtype == torch.float32
                assert torch.isfinite(out).all(), f"{name} / {grid} / NFE {nfe} on {schedule!r}"


@pytest.mark.slow
def test_data_end_matches_reference():
    """Ending at sigma = 0 (final step first order: the x0 prediction) still converges to the exact endpoint."""
    teacher = gaussian_mixture_2d(CosineSchedule(), modes=4, std=0.5)
    x = teacher.prior_sample(torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0)))
    ref = teacher.predict_x0(reference_solve(teacher, x, 1.0, 1e-4), torch.tensor(1e-4, dtype=F64))
    for name in ("dpm++2m", "dpm++3m", "unipc", "unipc2"):
        errors = [float((solve(teacher, x, name, n, grid="uniform") - ref).norm() / ref.norm()) for n in (16, 32)]
        assert errors[1] < errors[0] / 2.5 and errors[1] < 1e-2, (name, errors)


def test_grids():
    lin, cos = LinearSchedule(), CosineSchedule()
    assert torch.allclose(make_grid("uniform", 4), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=F64))
    # shift: t' = s t / (1 + (s - 1) t) of the uniform grid
    u = torch.linspace(1, 0, 5, dtype=F64)
    assert torch.allclose(make_grid("shift", 4, shift=3.0), 3 * u / (1 + 2 * u))
    # logsnr on the VE schedule, where lambda is linear in t: the uniform grid
    assert torch.allclose(make_grid("logsnr", 5, schedule=VESchedule()), torch.linspace(1, 0, 6, dtype=F64))
    # edm on EDMSchedule: Karras et al. eq. 5 with sigma in [0.002, 80], then sigma = 0
    n = 6
    i = torch.arange(n, dtype=F64)
    sig = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(make_grid("edm", n, schedule=EDMSchedule()), torch.cat([sig / 80, torch.zeros(1, dtype=F64)]))
    # logsnr on the cosine schedule: evenly spaced lambda between the clipped ends, then the true ends
    ts = make_grid("logsnr", 6, schedule=cos)
    lam = cos.log_snr(ts[1:-1])
    assert ts[0] == 1 and ts[-1] == 0 and torch.allclose(lam.diff(), lam.diff()[0].expand(4))
    # t_min > 0
    ts = make_grid("logsnr", 6, schedule=lin, t_min=1e-3)
    assert float(ts[-1]) == 1e-3 and torch.allclose(lin.log_snr(ts[1:]).diff(), lin.log_snr(ts[1:]).diff()[0].expand(5))


@pytest.mark.parametrize("grid,match", [
    ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
    ([1.0, 0.2, 0.5, 0.0], "strictly decreasing"),
    ([1.2, 0.5, 0.2, 0.0], r"\[0, 1\]"),
    ([1.0, 0.5, 0.2, -0.1], r"\[0, 1\]"),
    ([1.0, 0.5, 0.0], "need 3 steps"),
    ([[1.0, 0.5], [0.2, 0.0]], "flat list"),
])
def test_user_grid_errors(grid, match):
    teacher = gaussian_mixture_2d(LinearSchedule())
    with pytest.raises(AccelkitError, match=match):
        solve(teacher, torch.randn(2, 2, dtype=F64), "euler", 3, grid=grid)


def test_grid_options_need_a_named_grid():
    with pytest.raises(AccelkitError, match="grid options shift"):
        solve(gaussian_mixture_2d(LinearSchedule()), torch.randn(2, 2, dtype=F64), "euler", 2, grid=[1.0, 0.5, 0.0],
              shift=3.0)


def test_user_grid_length_follows_solver():
    teacher = gaussian_mixture_2d(LinearSchedule())
    x = torch.randn(2, 2, dtype=F64)
    # heun at NFE 5: two Heun steps and a final Euler step, 3 intervals
    grid = [1.0, 0.6, 0.25, 0.0]
    assert torch.equal(solver_grid(teacher, "heun", 5, grid), torch.tensor(grid, dtype=F64))
    with pytest.raises(AccelkitError, match="need 3 steps"):
        solve(teacher, x, "heun", 5, grid=[1.0, 0.6, 0.4, 0.25, 0.2, 0.0])
    # a user grid equal to a named one gives the same result
    ts = make_grid("shift", 6, shift=2.0)
    assert torch.equal(solve(teacher, x, "dpm++2m", 6, grid=ts.tolist()), solve(teacher, x, "dpm++2m", 6,
                                                                                 grid="shift", shift=2.0))


@pytest.mark.parametrize("bad,match", [("rk45", "unknown solver 'rk45'"), (0, "unknown solver")])
def test_unknown_solver(bad, match):
    with pytest.raises(AccelkitError, match=match):
        solve(gaussian_mixture_2d(LinearSchedule()), torch.randn(2, 2, dtype=F64), bad, 4)


@pytest.mark.parametrize("nfe", [0, -3, 2.5, True])
def test_bad_nfe(nfe):
    with pytest.raises(AccelkitError, match="NFE"):
        solve(gaussian_mixture_2d(LinearSchedule()), torch.randn(2, 2, dtype=F64), "euler", nfe)


def test_unknown_grid():
    with pytest.raises(AccelkitError, match="unknown grid 'karras'"):
        solve(gaussian_mixture_2d(LinearSchedule()), torch.randn(2, 2, dtype=F64), "euler", 4, grid="karras")


def test_registry_plugs_in_a_solver():
    class PluginEuler(Solver):
        """A solver defined outside accelkit (here it just runs Euler)."""

        name = "test-plugin-euler"

        def steps(self, nfe):
            return nfe

        def sample(self, teacher, x, ts, nfe, cond=None):
            return Euler().sample(teacher, x, ts, nfe, cond)

    register_solver("test-plugin-euler", PluginEuler)
    try:
        assert "test-plugin-euler" in solver_names() and isinstance(get_solver("test-plugin-euler"), PluginEuler)
        teacher = gaussian_mixture_2d(LinearSchedule())
        x = torch.randn(2, 2, dtype=F64)
        assert torch.equal(solve(teacher, x, "test-plugin-euler", 4), solve(teacher, x, "euler", 4))
        assert torch.equal(solve(teacher, x, PluginEuler(), 4), solve(teacher, x, "euler", 4))
        with pytest.raises(ValueError, match="already registered"):
            register_solver("euler", Euler)
    finally:
        from accelkit.solvers import base

        base._REGISTRY.pop("test-plugin-euler", None)


def test_euler_is_the_flow_euler_step():
    """Euler on the linear schedule: x_{i+1} = x_i + (t_{i+1} - t_i) v, v = eps - x0 for a flow teacher."""
    teacher = gaussian_mixture_2d(LinearSchedule())
    x = torch.randn(4, 2, dtype=F64)
    ts = make_grid("uniform", 3)
    y = x
    for i in range(3):
        x0, eps = teacher.denoise(y, ts[i])
        y = y + (ts[i + 1] - ts[i]) * (eps - x0)
    assert torch.allclose(solve(teacher, x, "euler", 3), y, rtol=0, atol=1e-12)
    assert math.isfinite(float(y.norm()))


@pytest.mark.cuda
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_no_host_sync_in_the_step_loop(name):
    """Coefficients are precomputed: the loop runs without any synchronising CUDA call (.item, D2H copies)."""
    teacher = gaussian_mixture_images(DiscreteVPSchedule("linear"), shape=(1, 4, 4), modes=3).to("cuda")
    x = torch.randn(4, 1, 4, 4, device="cuda")
    solve(teacher, x, name, 6)  # first call copies the schedule's tables to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = solve(teacher, x, name, 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_ipndm_variable_step_weights():
    """On a uniform grid they are iPNDM's Adams-Bashforth weights; on any grid they integrate cubics exactly."""
    from accelkit.solvers.ipndm import ADAMS_BASHFORTH, variable_step_weights

    uniform = torch.linspace(1, 0, 11, dtype=F64).tolist()
    for p in range(1, 5):
        assert np.allclose(variable_step_weights(uniform, 5, p), ADAMS_BASHFORTH[p], atol=1e-12)
    ts = make_grid("edm", 10, schedule=EDMSchedule()).tolist()
    c = variable_step_weights(ts, 6, 4)
    q = np.poly1d([2.0, -1.0, 0.5, 3.0])
    exact = np.polyint(q)(ts[7]) - np.polyint(q)(ts[6])
    assert np.isclose((ts[7] - ts[6]) * sum(c[j] * q(ts[6 - j]) for j in range(4)), exact, rtol=1e-9)


@pytest.mark.parametrize("name, local_order", [("dpm++3m", 3), ("dpm++3m-exact", 4)])
def test_dpm_solver_3m_local_error_orders(name, local_order):
    """One third-order step from the exact trajectory (exact states and x0 predictions at three earlier log-SNR
    points spaced h): the local error falls like h^3 for the 3M code's update (diffusers' and the paper's code:
    its D2 weight is half the exact integral's) and like h^4 for ``dpm++3m-exact``."""
    from accelkit.solvers.base import GridNodes

    teacher = gaussian_mixture_2d(LinearSchedule(), modes=4, std=0.5)
    x1 = teacher.prior_sample(torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0)))
    solver = get_solver(name)
    errors = []
    for h in (0.025, 0.0125, 0.00625):
        ts = [1.0 / (1.0 + math.exp(1.0 + k * h)) for k in (-2, -1, 0, 1)]  # linear: lambda = log((1 - t) / t)
        xs = [reference_solve(teacher, x1, 1.0, ts[0])]
        for a, b in zip(ts[:-1], ts[1:], strict=True):
            xs.append(reference_solve(teacher, xs[-1], a, b))
        orders, c = solver.coefficients(GridNodes.of(teacher.schedule, torch.tensor(ts, dtype=F64)))
        assert orders[2] == 3
        m0, m1, m2 = (teacher.predict_x0(xs[k], torch.full((8,), ts[k], dtype=F64)) for k in (2, 1, 0))
        d1_0, d1_1 = (m0 - m1) * c["inv_r1"][2], (m1 - m2) * c["inv_r2"][2]
        d1 = d1_0 + c["q"][2] * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) * c["inv_r12"][2]
        x_next = c["ratio"][2] * xs[2] + c["w0"][2] * m0 + c["w1"][2] * d1 + c["w2"][2] * d2
        errors.append(float((x_next - xs[3]).norm()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(s - local_order) < 0.35 for s in slopes), (name, errors, slopes)


def test_dpm_solver_3m_exact_takes_its_nfe_and_reaches_the_data_end():
    teacher = CountingTeacher(gaussian_mixture_2d(LinearSchedule()))
    x = torch.randn(3, 2, dtype=F64)
    for nfe in (1, 2, 3, 5, 8):
        teacher.calls = 0
        assert torch.isfinite(solve(teacher, x, "dpm++3m-exact", nfe)).all()
        assert teacher.calls == nfe
