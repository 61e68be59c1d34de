"""DPM-Solver-v3 and ``accelkit solver-stats``: exact reductions, statistics against closed forms, and the gain over
DPM-Solver++ and UniPC on a trained image teacher's own ODE."""

import json

import pytest
import torch
from conftest import run_cli

from accelkit.metrics import rmse
from accelkit.models.analytic import GaussianMixtureTeacher, gaussian_mixture_images
from accelkit.models.builtin import SmallUNet, builtin_call
from accelkit.models.loading import load_teacher, save_teacher
from accelkit.schedules import CosineSchedule, LinearSchedule, schedule_from_name
from accelkit.solvers import solve
from accelkit.solvers.dpm_solver import DPMSolverPP
from accelkit.solvers.dpm_solver_v3 import DPMSolverV3, EmpiricalStatistics, compute_statistics
from accelkit.teacher import NetworkTeacher

F64 = torch.float64


@pytest.mark.parametrize("schedule", [CosineSchedule(), LinearSchedule()], ids=lambda s: s.name)
def test_with_dpm_solver_pp_statistics_it_is_dpm_solver_pp(schedule):
    """l = 1, s = b = 0: the predictor is DPM-Solver++ in its exact-integral form (first order: DDIM; second order:
    the exact-phi 2M; third order: ``dpm++3m-exact``, not diffusers' 3M, whose D2 weight is half the exact one)."""
    teacher = gaussian_mixture_images(schedule)
    x = teacher.prior_sample(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64))
    stats = EmpiricalStatistics.dpm_solver_pp(64)
    for order in (1, 2, 3):
        for nfe in (3, 5, 8):
            got = solve(teacher, x, DPMSolverV3(stats, order, corrector=False), nfe)
            ref = solve(teacher, x, DPMSolverPP(order, exact_phi=True), nfe)
            assert float((got - ref).norm() / ref.norm()) < 1e-6, (order, nfe)
    # the third-order predictor converges at order 3 (checked on a grid that stops short of sigma = 0)
    ref = solve(teacher, x, "dpm++3m", 400, grid="logsnr", t_min=0.02)
    errors = [rmse(solve(teacher, x, DPMSolverV3(stats, 3, corrector=False), n, grid="logsnr", t_min=0.02), ref)
              for n in (20, 40)]
    assert errors[0] / errors[1] > 7.0


def test_l_is_the_jacobian_diagonal_in_closed_form():
    """For one Gaussian N(mu, diag(v)), eps(x) = sigma (x - alpha mu) / (alpha^2 v + sigma^2): l = sigma^2 /
    (alpha^2 v + sigma^2) exactly (Hutchinson's estimate is exact for a diagonal Jacobian)."""
    sched = CosineSchedule()
    var = 0.1 + torch.rand(1, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    teacher = GaussianMixtureTeacher(torch.full((1, 1, 3, 3), 0.3, dtype=F64), var, None, sched)
    stats = compute_statistics(teacher, torch.randn(4, 1, 3, 3, dtype=F64), points=5, segment_nfe=2)
    t = sched.t_of_log_snr(2 * stats.lam)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    torch.testing.assert_close(stats.l, s**2 / (a**2 * var.reshape(1, -1) + s**2), atol=1e-10, rtol=0)
    assert stats.lam[0] < stats.lam[-1] and stats.s.shape == stats.b.shape == (5, 9)


# ------------------------------------------------------------------------------------------ a trained teacher


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    from accelkit.stages.train import TrainRecipe, run_train

    root = tmp_path_factory.mktemp("v3")
    path = run_train(TrainRecipe(data="digits", objective="eps", batch_size=64, network={"base": 16, "mults": [1, 2]},
                                 eval_samples=0, device="cpu",
                                 loop={"steps": 200, "lr": 2e-3, "warmup_steps": 20, "checkpoint_every": 0}),
                     root / "train")
    return path, load_teacher(str(path))


@pytest.mark.slow
def test_teacher_statistics_beat_dpm_solver_pp_and_unipc_on_digits(digits_teacher):
    _, teacher = digits_teacher
    stats = compute_statistics(teacher, torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
                               points=40)
    x = teacher.prior_sample(torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(9)))
    ref = solve(teacher, x, "heun", 301)
    v3 = DPMSolverV3(stats)
    for nfe in (5, 6, 8):
        ours = rmse(solve(teacher, x, v3, nfe), ref)
        others = {s: rmse(solve(teacher, x, s, nfe), ref) for s in ("dpm++2m", "dpm++3m", "unipc", "unipc2")}
        assert ours < 0.85 * min(others.values()), (nfe, ours, others)
    # float32 network: with DPM-Solver++'s statistics, DPM-Solver++ to 1e-6
    pp = EmpiricalStatistics.dpm_solver_pp(64)
    got = solve(teacher, x, DPMSolverV3(pp, 2, corrector=False), 8)
    want = solve(teacher, x, DPMSolverPP(2, exact_phi=True), 8)
    assert float((got - want).norm() / want.norm()) < 1e-6


# ----------------------------------------------------------------------------------------------------------- CLI


def unet_eps_teacher(path, seed: int):
    torch.manual_seed(seed)
    net = SmallUNet(channels=1, base=8, mults=(1, 2))
    save_teacher(NetworkTeacher(net, builtin_call, "eps", schedule_from_name("vp-linear"), (1, 8, 8)), path)
    return path


def test_stats_artifact_is_a_solver_for_its_own_teacher_only(tmp_path):
    from accelkit.errors import AccelkitError
    from accelkit.solvers import get_solver
    from accelkit.solvers.learned import check_solver_teacher
    from accelkit.stages.solver_stats import SolverStatsRecipe, run_solver_stats

    teacher = unet_eps_teacher(tmp_path / "t.safetensors", 0)
    other = unet_eps_teacher(tmp_path / "o.safetensors", 1)
    art = run_solver_stats(SolverStatsRecipe(teacher=str(teacher), samples=8, points=6, val_samples=0, device="cpu"),
                           tmp_path / "stats")
    solver = get_solver(str(art))
    assert isinstance(solver, DPMSolverV3) and solver.stats.l.shape == (6, 64)
    check_solver_teacher(str(art), str(teacher))
    with pytest.raises(AccelkitError, match="--force"):
        check_solver_teacher(str(art), str(other))
    check_solver_teacher(str(art), str(other), force=True)
    x = torch.randn(3, 1, 8, 8)
    t = load_teacher(str(teacher))
    assert torch.isfinite(solve(t, x, solver, 4)).all()
    with pytest.raises(AccelkitError, match="the teacher.s have 4"):
        solve(t, torch.randn(3, 1, 2, 2), solver, 4)
    with pytest.raises(ValueError, match="samples"):
        SolverStatsRecipe(teacher=str(teacher), samples=1)


@pytest.mark.slow
def test_cli_solver_stats_artifact_samples_with_dpm_solver_v3(tmp_path):
    teacher = unet_eps_teacher(tmp_path / "t.safetensors", 0)
    other = unet_eps_teacher(tmp_path / "o.safetensors", 1)
    r = run_cli("solver-stats", teacher, "--samples", "16", "--points", "8", "--val-samples", "4", "--device", "cpu",
                "-o", tmp_path / "stats")
    assert r.returncode == 0, r.stderr
    art = tmp_path / "stats"
    assert r.stdout.strip() == str(art)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["kind"] == "solver-stats" and set(manifest["summary"]["val_rmse"]) == {"5", "6", "8", "10"}
    out = tmp_path / "s.safetensors"
    r = run_cli("sample", teacher, "--solver", art, "--nfe", "5", "-n", "4", "-o", out, "--grid", "logsnr")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    from accelkit.solvers import get_solver

    got = load_file(out)["samples"]
    t = load_teacher(str(teacher))
    from accelkit.noise import sample_noise

    want = solve(t, t.prior_sample(sample_noise(0, range(4), (1, 8, 8))), get_solver(str(art)), 5, grid="logsnr")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    r = run_cli("sample", other, "--solver", art, "-o", tmp_path / "x.png")
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
    r = run_cli("solver-stats", teacher, "--samples", "1", "-o", tmp_path / "bad")
    assert r.returncode == 2 and "samples" in r.stderr and not (tmp_path / "bad").exists()
