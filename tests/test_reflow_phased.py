"""`accelkit reflow --phases K` (PeRFlow / phased rectified diffusion): the window targets are exact on an analytic
teacher, K = 1 is the unphased method, K = 2 and 4 students beat their teacher at K NFE on a 2-D set, an eps teacher
stays eps, and the artifact records the K-step grid it is sampled on."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_eval import json_rows
from test_reflow import best_teacher_sw, reflow, sw, teacher_and_couplings

from accelkit.data import load_dataset
from accelkit.models.analytic import gaussian_mixture_2d
from accelkit.models.loading import load_teacher
from accelkit.objectives import DenoisingObjective
from accelkit.phased import PhaseWindows, on_window_line, window_boundaries
from accelkit.schedules import LinearSchedule, schedule_from_name
from accelkit.solvers import solve
from accelkit.stages.reflow import ReflowRecipe


@pytest.mark.parametrize("schedule", ["linear", "vp-scaled-linear", "vp-cosine"])
def test_window_line_passes_through_the_noised_start_and_the_teachers_window_end(schedule):
    """x_s = alpha_s x0* + sigma_s eps and x_e = the teacher's solve lie on alpha x0^ + sigma eps^, and one DDIM step
    (Euler on the linear schedule) with the constant target from x_s lands on x_e."""
    sched = schedule_from_name(schedule)
    teacher = gaussian_mixture_2d(sched)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x0 = solve(teacher, teacher.prior_sample(eps), "dpm++2m", nfe=32)
    windows = PhaseWindows(teacher, 4, "dpm++2m", 16)
    b = windows.boundaries
    assert torch.equal(b, window_boundaries(sched, 4)) and float(b[0]) == 1.0 and float(b[-1]) == 0.0
    t = torch.rand(64, generator=g, dtype=torch.float64)
    x0h, epsh = windows.straight_pairs(x0, eps, t)
    k = windows.window_of(t)
    for i in range(64):
        s, e = b[k[i]], b[k[i] + 1]
        assert e < t[i] <= s
        xs = sched.alpha(s) * x0[i] + sched.sigma(s) * eps[i]
        xe = solve(teacher, xs[None], "dpm++2m", 16, grid="uniform", t_max=float(s), t_min=float(e))[0]
        torch.testing.assert_close(on_window_line(x0h[i:i + 1], epsh[i:i + 1], s, sched)[0], xs)
        torch.testing.assert_close(on_window_line(x0h[i:i + 1], epsh[i:i + 1], e, sched)[0], xe)
        step = "euler" if schedule == "linear" else "ddim"
        # a model whose output is the window's target everywhere is the window line: one first-order step is exact
        target_model = _ConstantPair(sched, x0h[i], epsh[i])
        torch.testing.assert_close(solve(target_model, xs[None], step, 1, grid=[float(s), float(e)])[0], xe)


class _ConstantPair(torch.nn.Module):
    """A teacher predicting the same (x0^, eps^) everywhere (the target of a phased student inside one window)."""

    def __init__(self, schedule, x0, eps):
        super().__init__()
        self.schedule, self.sample_shape, self.x0, self.eps = schedule, (2,), x0, eps

    def denoise(self, x, t, cond=None):
        return self.x0.expand_as(x), self.eps.expand_as(x)

    def predict_x0(self, x, t, cond=None):
        return self.denoise(x, t, cond)[0]

    def velocity(self, x, t, cond=None):
        x0, eps = self.denoise(x, t, cond)
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1]
        return self.schedule.d_alpha(tt) * x0 + self.schedule.d_sigma(tt) * eps


def test_an_eps_target_is_constant_in_its_window_and_the_start_share_is_exact():
    """Phased rectified diffusion keeps an eps model an eps model: its regression target is eps^ at every t of the
    window; the training times put start_share of the batch at its window's start and leave the rest alone."""
    sched = schedule_from_name("vp-scaled-linear")
    teacher = gaussian_mixture_2d(sched)
    x0 = torch.randn(5, 2, dtype=torch.float64)
    eps = torch.randn(5, 2, dtype=torch.float64)
    windows = PhaseWindows(teacher, 2, "dpm++2m", 8)
    outputs = []
    for t in (0.55, 0.7, 0.99):
        tt = torch.full((5,), t, dtype=torch.float64)
        x0h, epsh = windows.straight_pairs(x0, eps, tt)
        seen: dict = {}
        objective = DenoisingObjective(sched, "eps", lambda net, x, tau, c, seen=seen: seen.setdefault("x", x) * 0)
        objective.loss(torch.nn.Identity(), {"x": x0h, "eps": epsh, "t": tt})
        outputs.append(epsh)
        torch.testing.assert_close(seen["x"], on_window_line(x0h, epsh, tt, sched))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])
    t = torch.tensor([0.2, 0.5, 0.7, 1.0, 0.3], dtype=torch.float64)
    u = torch.tensor([0.1, 0.9, 0.6, 0.2, 0.49], dtype=torch.float64)
    assert windows.snap_to_starts(t, u).tolist() == [0.5, 0.5, 0.7, 1.0, 0.5]


# --------------------------------------------------------------------------------------------- trained students


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    root = tmp_path_factory.mktemp("phased")
    train, couple = teacher_and_couplings(root, "flow")
    data = load_dataset("moons", 2000, seed=11).samples
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    return root, train, couple, data, noise


def test_phases_1_is_the_unphased_method(moons):
    """Same weights, same artifact identity (default path), and a 1-step Euler recommendation."""
    root, _, couple, _, _ = moons
    plain = reflow(couple, root / "plain", "rectified-flow", steps=30)
    one = reflow(couple, root / "one", "rectified-flow", steps=30, phases=1, phase_nfe=3)
    a, b = load_file(plain / "teacher.safetensors"), load_file(one / "teacher.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kw = dict(couplings=str(couple), method="rectified-flow", batch_size=256, device="cpu", eval_samples=500,
              loop={"steps": 30, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 0})
    assert ReflowRecipe(**kw).identity_dict() == ReflowRecipe(**kw, phases=1, phase_nfe=3).identity_dict()
    assert ReflowRecipe(**kw).identity_dict() != ReflowRecipe(**kw, phases=2).identity_dict()
    summary = json.loads((one / "manifest.json").read_text())["summary"]
    assert summary["phases"] == 1 and summary["sampling"] == {"solver": "euler", "nfe": 1, "grid": [1.0, 0.0]}


@pytest.mark.slow
@pytest.mark.parametrize("phases", [2, 4])
def test_phased_student_beats_the_teacher_at_k_nfe(moons, phases):
    root, train, couple, data, noise = moons
    out = reflow(couple, root / f"k{phases}", "rectified-flow", steps=200, phases=phases, phase_nfe=4)
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    rec = summary["sampling"]
    assert rec == {"solver": "euler", "nfe": phases, "grid": [1 - i / phases for i in range(phases + 1)]}
    teacher, student = load_teacher(train), load_teacher(out)
    sliced_w2 = sw(student, noise, data, "euler", phases)
    t_best = best_teacher_sw(teacher, noise, data, phases)
    converged = sw(teacher, noise, data, "dpm++2m", 32)
    # observed: K = 2: 0.082 against the teacher's best 0.28 (midpoint); K = 4: 0.070 against 0.115 (midpoint);
    # the teacher's converged ODE 0.069, which no student of it can beat by much
    assert sliced_w2 < 0.7 * t_best, (sliced_w2, t_best)
    assert sliced_w2 < 1.5 * converged, (sliced_w2, converged)


def test_rectified_diffusion_phased_keeps_an_eps_teacher_eps(tmp_path, cli):
    train, couple = teacher_and_couplings(tmp_path, "eps", "vp-scaled-linear", steps=30)
    out = reflow(couple, tmp_path / "reflow", "rectified-diffusion", steps=20, phases=2, phase_nfe=2)
    student = load_teacher(out)
    assert student.prediction == "eps" and student.time_input.kind == "discrete"
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["sampling"] == {"solver": "ddim", "nfe": 2, "grid": [1.0, 0.5, 0.0]}
    # accelkit eval on the recommended grid: the runs whose step count fits it, the same samples as solve()
    grid = ",".join(str(v) for v in summary["sampling"]["grid"])
    r = cli("eval", out, "--solver", "ddim,heun", "--nfe", "2,4", "--grid", grid, "-n", "50", "--reference-nfe", "4",
            "--json", env={"OMP_NUM_THREADS": "1"})
    rows = json_rows(r)
    assert [(row["solver"], row["nfe"]) for row in rows] == [("ddim", 2), ("heun", 2)], r.stderr  # 2 steps each
    assert "left out" in r.stderr and rows[0]["curvature"] is not None and rows[0]["straightness"] is not None
    from accelkit.noise import sample_noise

    noise = sample_noise(0, range(50), (2,))
    ref = solve(student, student.prior_sample(noise), "heun", 4)
    x = solve(student, student.prior_sample(noise), "ddim", 2, grid=summary["sampling"]["grid"])
    assert rows[0]["rmse"] == pytest.approx(float((x - ref).pow(2).mean().sqrt()), rel=1e-4)
    bad = cli("eval", out, "--grid", "1,0.7,0.8,0", "-n", "10", env={"OMP_NUM_THREADS": "1"})
    assert bad.returncode == 2 and "decreasing" in bad.stderr and "Traceback" not in bad.stderr


def test_linear_windows_are_equal_in_t_and_discrete_ones_on_the_grid():
    assert window_boundaries(LinearSchedule(), 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    sched = schedule_from_name("vp-scaled-linear")
    b = window_boundaries(sched, 3)
    n = sched.num_train_timesteps
    assert torch.equal(b * n, torch.round(b * n)) and float(b[0]) == 1.0 and float(b[-1]) == 0.0


def test_toy2d_perflow_recipe_runs_end_to_end(cli, tmp_path):
    """recipes/toy2d-perflow.yaml, shrunk by --set: a 4-window student whose recommended grid eval takes."""
    import os

    from conftest import REPO

    shrink = ["train.loop.steps=60", "train.network.hidden=32", "train.network.depth=1", "train.eval_samples=0",
              "couple.n=256", "couple.shard_size=256", "couple.micro_batch=256", "reflow.loop.steps=20",
              "reflow.eval_samples=50", "reflow.batch_size=64", "reflow.phase_nfe=2", "train.device=cpu",
              "reflow.device=cpu"]
    args = [a for s in shrink for a in ("--set", s)]
    r = cli("run", os.path.join(REPO, "recipes", "toy2d-perflow.yaml"), *args, cwd=str(tmp_path),
            env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    (student,) = list((tmp_path / "runs").glob("reflow-*"))
    manifest = json.loads((student / "manifest.json").read_text())
    assert manifest["recipe"]["phases"] == 4 and manifest["status"] == "complete"
    rec = manifest["summary"]["sampling"]
    assert rec == {"solver": "euler", "nfe": 4, "grid": [1.0, 0.75, 0.5, 0.25, 0.0]}
    env = {"OMP_NUM_THREADS": "1"}
    given = cli("eval", student, "--solver", rec["solver"], "--nfe", str(rec["nfe"]), "--grid",
                ",".join(map(str, rec["grid"])), "-n", "20", "--reference-nfe", "4", "--json", env=env)
    teacher_path = next((tmp_path / "runs").glob("train-*"))
    named = cli("eval", student, teacher_path, "--solver", "euler,dpm++2m", "--nfe", "4,8", "--grid", "recommended",
                "-n", "20", "--reference-nfe", "4", "--json", env=env)
    rows = json_rows(named)
    assert [(r["solver"], r["nfe"]) for r in rows] == [("euler", 4), ("dpm++2m", 4)] * 2  # student, then teacher
    assert rows[0]["rmse"] == json_rows(given)[0]["rmse"]
    s = cli("sample", student, "--solver", "euler", "--nfe", "4", "--grid", "recommended", "-n", "8", "-o",
            tmp_path / "s.safetensors", env=env)
    assert s.returncode == 0, s.stderr
    bad = cli("sample", teacher_path, "--grid", "recommended", "-o", tmp_path / "t.png", env=env)
    assert bad.returncode == 2 and "records no recommended grid" in bad.stderr and "Traceback" not in bad.stderr


PHASED_TINY = ["--phases", "2", "--phase-nfe", "2", "--batch-size", "64", "--steps", "150", "--set",
               "reflow.loop.checkpoint_every=10", "--set", "reflow.eval_samples=0", "--device", "cpu"]


@pytest.mark.slow
def test_phased_kill9_then_same_command_equals_uninterrupted(moons, tmp_path):
    """The window solves are deterministic functions of the batch (pairs and times from the checkpointed sampler),
    so a phased run killed with -9 and run again ends with the uninterrupted run's weights."""
    from conftest import assert_same_tensors, kill9_during, run_cli

    couple = moons[2]
    env1 = {"OMP_NUM_THREADS": "1"}
    full = run_cli("reflow", couple, *PHASED_TINY, "-o", tmp_path / "full", env=env1)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    kill9_during(["reflow", couple, *PHASED_TINY, "-o", out], out / "checkpoint" / "latest.json")
    resumed = run_cli("reflow", couple, *PHASED_TINY, "-o", out, env=env1)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert_same_tensors(tmp_path / "full" / "teacher.safetensors", out / "teacher.safetensors", "after kill -9")


def test_bad_phase_settings_are_one_line_errors(moons, cli, tmp_path):
    couple = moons[2]
    cases = [(("--phases", "0"), "reflow.phases"), (("--phases", "2", "--set", "reflow.phase_solver=rk45"), "rk45"),
             (("--phases", "2", "--phase-nfe", "0"), "reflow.phase_nfe")]
    for args, expected in cases:
        r = cli("reflow", couple, *args, "--dry-run", "-o", tmp_path / "x", env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
