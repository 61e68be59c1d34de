"""Parallel sampling (Picard / ParaDiGMS, Parareal / SRDS): the sequential solver's sample in fewer sequential rounds.

Ground truth is the sequential base solver on the same grid: at tolerance 0 both methods reproduce it (to rounding),
Parareal's first k blocks are exact after k iterations, and a sample does not depend on its batch. Checked on the
analytic Gaussian-mixture teacher (float64) and a small trained flow teacher (float32), and through the CLI.
"""

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from accelkit.errors import AccelkitError
from accelkit.models.analytic import gaussian_mixture_2d
from accelkit.models.loading import load_teacher
from accelkit.schedules import CosineSchedule, LinearSchedule
from accelkit.solvers import get_solver, solve, solver_grid
from accelkit.solvers.parallel import Parareal, Picard, parallel_reports, wrap
from accelkit.stages.train import TrainRecipe, run_train

STEPS = 60


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=[LinearSchedule(), CosineSchedule()], ids=lambda s: s.name)
def analytic(request):
    teacher = gaussian_mixture_2d(request.param)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return teacher, teacher.prior_sample(noise)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small flow teacher on two moons (150 steps) and float32 noise."""
    root = tmp_path_factory.mktemp("parallel")
    path = run_train(TrainRecipe(data="moons", objective="flow", batch_size=128, network={"hidden": 64, "depth": 2},
                                 eval_samples=0, device="cpu",
                                 loop={"steps": 150, "lr": 3e-3, "warmup_steps": 10, "checkpoint_every": 0}),
                     root / "train")
    teacher = load_teacher(str(path))
    noise = torch.randn(24, 2, generator=torch.Generator().manual_seed(1))
    return path, teacher, teacher.prior_sample(noise)


@pytest.mark.parametrize("base", ["euler", "ddim"])
def test_picard_at_tolerance_zero_is_the_sequential_solve(analytic, base):
    teacher, x = analytic
    ref = solve(teacher, x, base, STEPS)
    for window in (4, STEPS):
        with parallel_reports() as reports:
            y = solve(teacher, x, Picard(base, window=window, tol=0.0), STEPS)
        assert rel(y, ref) < 1e-6
        r = reports[-1]
        assert r.rounds <= STEPS and r.sequential_rounds == STEPS and r.nfe >= STEPS
        if window == 4:
            assert r.nfe <= 4 * r.rounds  # at most one window of evaluations per round
    # with a small tolerance and a window covering the grid: the same sample in far fewer rounds
    with parallel_reports() as reports:
        y = solve(teacher, x, Picard(base, window=STEPS, tol=1e-8), STEPS)
    assert rel(y, ref) < 1e-6
    assert reports[-1].rounds <= STEPS // 2, reports[-1]


@pytest.mark.parametrize("base", ["euler", "ddim"])
def test_parareal_is_exact_after_m_iterations_and_its_first_k_blocks_after_k(analytic, base):
    teacher, x = analytic
    ts = solver_grid(teacher, base, STEPS)
    solver = Parareal(base, blocks=6, tol=0.0)
    bounds = solver.boundaries(STEPS)
    assert len(bounds) == 7
    exact = [x] + [solve(teacher, x, base, k, grid=ts[:k + 1]) for k in bounds[1:]]  # sequential at block ends
    for k in (1, 2, 4):
        u = Parareal(base, blocks=6, tol=0.0, iterations=k).block_endpoints(teacher, x, ts)
        for n in range(k + 1):
            assert rel(u[n], exact[n]) < 1e-12, (k, n)  # float64: exact to rounding
        assert rel(u[k + 1], exact[k + 1]) > 1e-10  # not yet exact beyond: the iterations are not trivial
    with parallel_reports() as reports:
        y = solve(teacher, x, solver, STEPS)
    assert rel(y, exact[-1]) < 1e-6
    r = reports[-1]
    assert r.iterations <= 6 and r.sequential_rounds == STEPS


def test_both_reproduce_a_trained_teacher_in_float32(trained):
    _, teacher, x = trained
    for base in ("euler", "ddim"):
        ref = solve(teacher, x, base, 40)
        for solver in (Picard(base, window=8, tol=0.0), Parareal(base, tol=0.0)):
            assert rel(solve(teacher, x, solver, 40), ref) < 1e-6, solver.name
    # the defaults (tol 0.1 / 5e-3) stay close to the sequential sample in fewer rounds
    ref = solve(teacher, x, "euler", 100)
    with parallel_reports() as reports:
        y = solve(teacher, x, "picard:euler:window=32", 100)
    assert rel(y, ref) < 2e-2 and reports[-1].rounds < 50


@pytest.mark.parametrize("spec", ["picard:euler:window=8", "parareal:ddim:blocks=5:tol=1e-3"])
def test_a_sample_does_not_depend_on_its_batch(analytic, trained, spec):
    for teacher, x, atol in ((analytic[0], analytic[1], 1e-12), (trained[1], trained[2], 1e-5)):
        whole = solve(teacher, x, spec, 50)
        alone = torch.cat([solve(teacher, x[i:i + 1], spec, 50) for i in (0, 3, 7)])
        torch.testing.assert_close(alone, whole[[0, 3, 7]], atol=atol, rtol=0)
        part = solve(teacher, x[2:9], spec, 50)
        torch.testing.assert_close(part, whole[2:9], atol=atol, rtol=0)


def test_names_and_bad_options():
    assert get_solver("picard:ddim:window=4:tol=0").name == "picard:ddim:window=4:tol=0.0"
    assert wrap("parareal", "euler", blocks=3) == "parareal:euler:blocks=3"
    assert wrap(None, "dpm++2m") == "dpm++2m"
    for call, words in [(lambda: wrap("picard", "dpm++2m"), "multistep"),
                        (lambda: wrap("picard", "euler", window=0), "window"),
                        (lambda: wrap("picard", "euler", blocks=3), "--blocks"),
                        (lambda: wrap("parareal", "euler", tol=-1.0), "tol"),
                        (lambda: wrap("bogus", "euler"), "picard"),
                        (lambda: wrap(None, "euler", window=4), "--parallel"),
                        (lambda: get_solver("picard:euler:size=3"), "unknown option")]:
        with pytest.raises(AccelkitError, match=words):
            call()


# ------------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_sample_eval_couple_with_parallel(trained, tmp_path):
    path = trained[0]
    seq, par = tmp_path / "seq.safetensors", tmp_path / "par.safetensors"
    assert run_cli("sample", path, "--solver", "euler", "--nfe", "30", "-n", "12", "-o", seq).returncode == 0
    r = run_cli("sample", path, "--solver", "euler", "--nfe", "30", "-n", "12", "--batch-size", "5", "-o", par,
                "--parallel", "picard", "--window", "8", "--tol", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(par)
    assert "sequential rounds (sequential 30)" in r.stderr and r.stderr.count("batch ") >= 3
    torch.testing.assert_close(load_file(par)["samples"], load_file(seq)["samples"], atol=1e-6, rtol=1e-6)

    r = run_cli("eval", path, "--nfe", "30", "-n", "16", "--parallel", "parareal", "--tol", "0", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["solver"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"euler", "parareal:euler:tol=0.0"}
    e, p = rows["euler"], rows["parareal:euler:tol=0.0"]
    assert e["rounds"] == 30 and e["nfe_total"] == 30
    assert p["nfe_total"] > 30 and p["rounds"] > 0 and abs(p["rmse"] - e["rmse"]) < 1e-6

    r = run_cli("couple", path, "-n", "8", "--nfe", "20", "--parallel", "picard", "--tol", "0", "-o",
                tmp_path / "pairs")
    assert r.returncode == 0, r.stderr
    from accelkit.couplings import open_couplings

    pairs = open_couplings(str(tmp_path / "pairs"))
    got = pairs[torch.arange(8)]
    ref = solve(trained[1], trained[1].prior_sample(got["noise"]), "euler", 20)
    torch.testing.assert_close(got["sample"], ref, atol=1e-5, rtol=1e-5)


def test_cli_parallel_refuses_what_it_cannot_wrap(trained, tmp_path):
    from accelkit.stages.bespoke import BespokeRecipe, run_bespoke

    path = trained[0]
    learned = run_bespoke(BespokeRecipe(teacher=str(path), nfe=2, train_samples=8, val_samples=4, path_points=6,
                                        reference="heun", reference_nfe=2, batch_size=8, device="cpu",
                                        loop={"steps": 2, "checkpoint_every": 0}), tmp_path / "solver")
    out = tmp_path / "x.png"
    for args, words in [(("--solver", str(learned), "--parallel", "picard"), "learned solver"),
                        (("--solver", "dpm++2m", "--parallel", "parareal"), "multistep")]:
        r = run_cli("sample", path, "-o", out, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()
    r = run_cli("eval", path, "--solver", str(learned), "--parallel", "picard")
    assert r.returncode == 2 and "learned solver" in r.stderr and r.stdout == ""
