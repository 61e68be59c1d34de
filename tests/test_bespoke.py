"""`accelkit bespoke`: learned solvers (bespoke scale-time, BNS) start exactly at their base solvers, beat the best
standard solver at the same NFE on an exact (analytic) teacher, improve with NFE, resume exactly after kill -9, and
are refused for a teacher they were not trained for."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_tensors, kill9_during, run_cli
from safetensors.torch import load_file

from accelkit.models.analytic import gaussian_mixture_2d
from accelkit.models.builtin import MLP, builtin_call
from accelkit.models.loading import load_teacher, save_teacher
from accelkit.noise import sample_noise
from accelkit.schedules import CosineSchedule, LinearSchedule
from accelkit.solvers import get_solver, solve, solver_grid
from accelkit.solvers.bespoke import ScaleTimeSolver
from accelkit.solvers.bns import NonStationarySolver, trace_linear_solver
from accelkit.stages.bespoke import (
    STANDARD_SOLVERS,
    GroundTruthPaths,
    compute_paths,
    default_loop,
    fit_solver,
    initial_solver,
    keep_better,
    path_times,
)
from accelkit.teacher import NetworkTeacher

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
#: Training settings of the quality tests (a few seconds per solver on one core).
TRAIN = {"bespoke": {"steps": 150, "lr": 0.1}, "bns": {"steps": 150, "lr": 0.03}}
#: A learned solver must beat the best of the standard solvers at its NFE by at least this factor in held-out RMSE.
MARGIN = 0.85


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()], ids=["linear", "cosine"])
def test_identity_init_is_exactly_the_base_solver(schedule):
    teacher = gaussian_mixture_2d(schedule)
    x = teacher.prior_sample(torch.randn(256, 2, generator=torch.Generator().manual_seed(1)))
    for base, name, nfe in (("rk1", "euler", 5), ("rk2", "midpoint", 6)):
        module = ScaleTimeSolver(base, solver_grid(teacher, name, nfe))
        with torch.no_grad():
            assert torch.equal(module.sample(teacher, x), solve(teacher, x, name, nfe)), base
    # a non-stationary solver traced from a standard solver is that solver (float32 rounding of x apart)
    for name in ("euler", "heun", "dpm++2m", "unipc", "ipndm"):
        module = NonStationarySolver(*trace_linear_solver(teacher, name, 6), (1e-3, 1.0))
        with torch.no_grad():
            diff = (module.sample(teacher, x) - solve(teacher, x, name, 6)).abs().max()
        assert diff < 1e-5, (name, float(diff))


@pytest.fixture(scope="module")
def gmm_paths():
    """The 8-Gaussian ring under the linear schedule (exact velocity) and 768 ground-truth paths from DOP853:
    512 to train on, 256 held out."""
    teacher = gaussian_mixture_2d(LinearSchedule())
    noise = sample_noise(0, range(768), (2,))
    paths = compute_paths(teacher, noise, path_times(1.0, 0.0, 48), "adaptive", tol=1e-8)
    train = GroundTruthPaths(paths.times, paths.x[:512], paths.v[:512])
    val = GroundTruthPaths(paths.times, paths.x[512:], paths.v[512:])
    return teacher, train, val


def best_standard(teacher, val, nfe):
    from accelkit.metrics import rmse

    scores = {}
    for s in STANDARD_SOLVERS:
        if s in ("heun", "midpoint") and nfe < 2:
            continue
        scores[s] = rmse(solve(teacher, val.noise_state, s, nfe), val.endpoint)
    name = min(scores, key=scores.get)
    return name, scores[name]


_TRAINED: dict = {}


def trained(gmm_paths, kind, nfe, settings=None):
    """(held-out RMSE of the trained solver, of its start) — trained once per (kind, NFE) in this module."""
    from accelkit.metrics import rmse

    if (kind, nfe) not in _TRAINED:
        teacher, train, val = gmm_paths
        module, _ = initial_solver(kind, teacher, nfe, "rk2" if kind == "bespoke" else None, "best", 1.0, val)
        with torch.no_grad():
            start = rmse(module.sample(teacher, val.noise_state), val.endpoint)
        loop = default_loop().model_copy(update={**(settings or TRAIN[kind]), "checkpoint_every": 0})
        trainer = fit_solver(module, kind, teacher, train, None, loop, batch_size=64, seed=0, progress=False)
        with torch.no_grad():
            final = rmse(trainer.model.solver.sample(teacher, val.noise_state), val.endpoint)
        _TRAINED[(kind, nfe)] = (final, start)
    return _TRAINED[(kind, nfe)]


@pytest.mark.parametrize("kind", ["bespoke", "bns"])
@pytest.mark.parametrize("nfe", [4, 6, 8])
def test_learned_solver_beats_the_best_standard_solver(gmm_paths, kind, nfe):
    teacher, _, val = gmm_paths
    name, best = best_standard(teacher, val, nfe)
    final, start = trained(gmm_paths, kind, nfe)
    ratio = final / best
    print(f"{kind} NFE {nfe}: held-out RMSE {final:.4g} (start {start:.4g}), best standard {name} {best:.4g}, "
          f"ratio {ratio:.3f}")
    assert ratio < MARGIN, f"{kind} at NFE {nfe}: RMSE {final:.4g} vs {name} {best:.4g} (ratio {ratio:.3f})"
    if kind == "bns":
        assert start <= best * (1 + 1e-6), "BNS starts at the best standard solver"


@pytest.mark.slow
def test_learned_solvers_at_nfe_10(gmm_paths):
    """At NFE 10 the midpoint rule is already close to what the bespoke error bound can buy on this teacher (a
    smaller step size is needed, and the gain is smaller); BNS, trained on the endpoint error itself, still gains
    several times."""
    teacher, _, val = gmm_paths
    name, best = best_standard(teacher, val, 10)
    bespoke = trained(gmm_paths, "bespoke", 10, {"steps": 300, "lr": 0.02})[0] / best
    bns = trained(gmm_paths, "bns", 10, {"steps": 300, "lr": 0.03})[0] / best
    print(f"NFE 10: bespoke / {name} {bespoke:.3f}, bns / {name} {bns:.3f}")
    assert bespoke < 0.95 and bns < 0.5, (bespoke, bns)


@pytest.mark.slow
def test_learned_solvers_on_an_image_teacher():
    """8x8 images: the analytic mixture of four Gaussian images (exact velocity), paths from DOP853. BNS beats the
    best standard solver; the bespoke bound, loose here (it falls while the midpoint rule's own error does not), may
    not: the solver the stage keeps is then its start, never worse."""
    from accelkit.metrics import rmse
    from accelkit.models.analytic import gaussian_mixture_images

    teacher = gaussian_mixture_images(LinearSchedule())
    paths = compute_paths(teacher, sample_noise(1, range(384), (1, 8, 8)), path_times(1.0, 0.0, 32), "adaptive",
                          tol=1e-7)
    train = GroundTruthPaths(paths.times, paths.x[:256], paths.v[:256])
    val = GroundTruthPaths(paths.times, paths.x[256:], paths.v[256:])
    name, best = best_standard(teacher, val, 10)
    for kind in ("bespoke", "bns"):
        module, _ = initial_solver(kind, teacher, 10, "rk2" if kind == "bespoke" else None, "best", 1.0, val)
        start_state = {k: v.clone() for k, v in module.state_dict().items()}
        loop = default_loop().model_copy(update={**TRAIN[kind], "checkpoint_every": 0})
        trainer = fit_solver(module, kind, teacher, train, None, loop, batch_size=64, seed=0, progress=False)
        solver, trained_rmse, start_rmse, kept = keep_better(trainer.model.solver, start_state, teacher, val)
        with torch.no_grad():
            ratio = rmse(solver.sample(teacher, val.noise_state), val.endpoint) / best
        print(f"8x8 images, NFE 10: {kind} / {name} = {ratio:.3f} (trained {trained_rmse / best:.3f}, "
              f"start {start_rmse / best:.3f})")
        assert ratio <= start_rmse / best + 1e-9
        if kind == "bns":
            assert ratio < MARGIN, (kind, ratio)


def test_bespoke_error_falls_as_nfe_grows(gmm_paths):
    errors = [trained(gmm_paths, "bespoke", nfe)[0] for nfe in (4, 6, 8)]
    print("bespoke held-out RMSE at NFE 4, 6, 8:", [f"{e:.4g}" for e in errors])
    assert errors[0] > errors[1] > errors[2], errors


def test_the_start_is_kept_when_training_made_it_worse(gmm_paths):
    teacher, _, val = gmm_paths
    module, _ = initial_solver("bespoke", teacher, 8, "rk2", "best", 1.0, val)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.log_scale.add_(0.3)  # a "trained" solver that is worse than the midpoint rule it started from
    solver, trained_rmse, start_rmse, kept = keep_better(module, start, teacher, val)
    assert kept and start_rmse < trained_rmse
    assert all(torch.equal(solver.state_dict()[k], start[k]) for k in start)
    solver, *_, kept = keep_better(solver, {k: v + 0.3 if k == "log_scale" else v for k, v in start.items()},
                                   teacher, val)
    assert not kept


# ------------------------------------------------------------------------------------------------------------ CLI


def mlp_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_teacher(NetworkTeacher(MLP(dim=2, hidden=32, depth=2), builtin_call, "flow", LinearSchedule(), (2,)), path)
    return path


SMALL = ["--train-samples", "64", "--val-samples", "32", "--batch-size", "32", "--device", "cpu",
         "--set", "bespoke.path_points=12", "--set", "bespoke.reference=heun", "--set", "bespoke.reference_nfe=3"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bespoke-cli")
    teacher = mlp_teacher(root / "teacher.safetensors", 0)
    other = mlp_teacher(root / "other.safetensors", 1)
    out = run_cli("bespoke", teacher, "--nfe", "4", "--steps", "20", *SMALL, "-o", root / "solver", env=ONE_THREAD)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(root / "solver")
    return teacher, other, root / "solver"


def test_artifact_records_kind_base_nfe_and_teacher(cli_run):
    teacher, _, solver = cli_run
    from accelkit.artifacts import content_hash

    config = json.loads((solver / "solver.json").read_text())
    assert (config["kind"], config["base"], config["nfe"]) == ("bespoke", "rk2", 4)
    assert config["teacher_sha256"] == content_hash(teacher)
    assert config["teacher"] == str(Path(teacher).resolve())
    assert set(load_file(solver / "solver.safetensors")) >= {"log_increments", "log_speed", "log_scale", "scale_rate"}
    summary = json.loads((solver / "manifest.json").read_text())["summary"]
    assert summary["cost"]["training_teacher_evaluations"] == 20 * 32 * 4
    assert summary["val_rmse"] == min(summary["val_rmse_trained"], summary["val_rmse_initial"])
    assert summary["kept"] == ("initial" if summary["val_rmse_initial"] < summary["val_rmse_trained"] else "trained")


def test_sample_and_eval_take_the_artifact_as_solver(cli_run, tmp_path):
    teacher, _, solver = cli_run
    out = run_cli("sample", teacher, "--solver", solver, "-n", "8", "-o", tmp_path / "s.safetensors")
    assert out.returncode == 0, out.stderr
    got = load_file(tmp_path / "s.safetensors")
    x = next(iter(got.values()))
    t = load_teacher(teacher)
    want = solve(t, t.prior_sample(sample_noise(0, range(8), (2,))), get_solver(str(solver)), 4)
    assert torch.allclose(x, want, atol=1e-6)
    ev = run_cli("eval", teacher, "--solver", f"euler,{solver}", "--nfe", "4", "-n", "64", "--json",
                 "--reference-nfe", "20")
    assert ev.returncode == 0, ev.stderr
    rows = json.loads(ev.stdout)
    assert {r["solver"] for r in rows} == {"euler", str(solver)}


def test_solver_of_another_teacher_is_refused_unless_forced(cli_run, tmp_path):
    _, other, solver = cli_run
    out = run_cli("sample", other, "--solver", solver, "-n", "4", "-o", tmp_path / "s.safetensors")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "content hash" in out.stderr and "--force" in out.stderr
    assert not (tmp_path / "s.safetensors").exists()
    forced = run_cli("sample", other, "--solver", solver, "-n", "4", "-o", tmp_path / "s.safetensors", "--force")
    assert forced.returncode == 0, forced.stderr
    # the same check behind `accelkit eval --solver` (and its --force), and the NFE a learned solver takes
    from accelkit.errors import AccelkitError
    from accelkit.solvers.learned import check_solver_teacher

    with pytest.raises(AccelkitError, match="content hash"):
        check_solver_teacher(solver, other)
    check_solver_teacher(solver, other, force=True)
    check_solver_teacher(solver, cli_run[0])
    with pytest.raises(AccelkitError, match="trained for NFE 4"):
        get_solver(str(solver)).steps(6)


def test_kill9_then_same_command_equals_uninterrupted(cli_run, tmp_path):
    teacher = cli_run[0]
    args = ["--nfe", "4", "--kind", "bns", "--steps", "60", *SMALL, "--set", "bespoke.loop.checkpoint_every=3"]
    full = run_cli("bespoke", teacher, *args, "-o", tmp_path / "full", env=ONE_THREAD)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    delay = kill9_during(["bespoke", teacher, *args, "-o", out], out / "checkpoint" / "latest.json")
    step = json.loads((out / "checkpoint" / "latest.json").read_text())["step"]
    resumed = run_cli("bespoke", teacher, *args, "-o", out, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr, f"killed at step >= {step} after {delay:.2f}s but did not resume"
    assert_same_tensors(tmp_path / "full" / "solver.safetensors", out / "solver.safetensors",
                        f"after kill -9 at step >= {step} (delay {delay:.2f}s)")


def test_trains_on_couplings_with_trajectories(cli_run, tmp_path):
    from accelkit.stages.bespoke import BespokeRecipe, couplings_paths, run_bespoke
    from accelkit.stages.couple import CoupleRecipe, run_couple

    teacher, other, _ = cli_run
    couple = run_couple(CoupleRecipe(teacher=str(teacher), n=96, solver="dpm++2m", nfe=16, save_trajectory=6,
                                     micro_batch=32, shard_size=96, batch_size=96), tmp_path / "couple")
    t = load_teacher(teacher)
    paths = couplings_paths(t, str(couple), 96, torch.device("cpu"))
    assert paths.x.shape == (96, 8, 2) and float(paths.times[0]) == 1.0 and float(paths.times[-1]) == 0.0
    recipe = BespokeRecipe(teacher=str(teacher), couplings=str(couple), nfe=3, train_samples=64, val_samples=32,
                           batch_size=32, device="cpu", loop={"steps": 5, "checkpoint_every": 0})
    out = run_bespoke(recipe, tmp_path / "solver")
    assert json.loads((out / "solver.json").read_text())["base"] == "rk1"
    from accelkit.errors import AccelkitError

    with pytest.raises(AccelkitError, match="content hashes differ"):
        run_bespoke(recipe.model_copy(update={"teacher": str(other)}), tmp_path / "other")


def test_bad_input_is_one_line_exit_2(cli_run, cli):
    teacher = cli_run[0]
    out = cli("bespoke", teacher, "--nfe", "5", "--base", "rk2")
    assert out.returncode == 2 and "even NFE" in out.stderr and out.stderr.strip().count("\n") == 0
    from pydantic import ValidationError

    from accelkit.stages.bespoke import BespokeRecipe

    for bad in ({"kind": "bns", "init": "rk45"}, {"kind": "bns", "base": "rk2"}, {"nfe": 0}):
        with pytest.raises(ValidationError):
            BespokeRecipe(**{"teacher": str(teacher), "nfe": 4, **bad})


@pytest.mark.slow
def test_toy2d_bespoke_recipe(cli, tmp_path):
    """recipes/toy2d-bespoke.yaml, shrunk by --set: train -> couple with trajectories -> bespoke and BNS solvers,
    each never worse than its start and BNS better than every standard solver at NFE 8 on held-out paths."""
    shrink = ["train.loop.steps=300", "train.network.hidden=64", "train.network.depth=2", "train.eval_samples=0",
              "train.device=cpu", "couple.n=512", "couple.shard_size=512", "couple.save_trajectory=24",
              "stages[2].bespoke.train_samples=384", "stages[2].bespoke.val_samples=128",
              "stages[3].bespoke.train_samples=384", "stages[3].bespoke.val_samples=128",
              "stages[2].bespoke.loop.steps=100", "stages[3].bespoke.loop.steps=100",
              "stages[2].bespoke.device=cpu", "stages[3].bespoke.device=cpu"]
    args = [a for s in shrink for a in ("--set", s)]
    r = cli("run", os.path.join(REPO, "recipes", "toy2d-bespoke.yaml"), *args, cwd=str(tmp_path), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    solvers = {m["summary"]["kind"]: m["summary"] for m in
               (json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "runs").glob("bespoke-*"))}
    assert set(solvers) == {"bespoke", "bns"}
    for s in solvers.values():
        print(s["kind"], "ratio to the best standard solver", s["ratio_to_best_standard"])
        assert s["val_rmse"] <= s["val_rmse_initial"]
    assert solvers["bns"]["ratio_to_best_standard"] < 1.0


def test_a_failed_adaptive_reference_is_a_one_line_error_naming_the_fix(monkeypatch):
    """DOP853 gives up on a stiff teacher ("step size less than spacing"): the stage says which setting avoids it."""
    import accelkit.solvers.reference as ref
    from accelkit.errors import AccelkitError
    from accelkit.stages.bespoke import compute_paths

    def stiff(*args, **kwargs):
        raise ref.ReferenceSolveFailed("Required step size is less than spacing between numbers.")

    monkeypatch.setattr(ref, "reference_solve", stiff)
    teacher = gaussian_mixture_2d(LinearSchedule())
    with pytest.raises(AccelkitError, match=r"bespoke\.reference=dpm\+\+2m") as e:
        compute_paths(teacher, torch.randn(4, 2, dtype=torch.float64), torch.linspace(1, 0, 3, dtype=torch.float64))
    assert "\n" not in str(e.value) and "spacing" in str(e.value)
    # the fixed-step reference it points to works on the same teacher
    paths = compute_paths(teacher, torch.randn(4, 2, dtype=torch.float64), torch.linspace(1, 0, 3, dtype=torch.float64),
                          reference="dpm++2m")
    assert torch.isfinite(paths.x).all()
