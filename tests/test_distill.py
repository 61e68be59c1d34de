"""`accelkit distill`: direct students beat their teacher's best solver at 1-2 NFE, progressive rounds halve the steps
and keep the quality, the progressive target makes one step land on two teacher steps, a run killed with kill -9
resumes to the same weights, bad input is a one-line error."""

import json
import os

import pytest
import torch
from conftest import REPO, assert_same_tensors, kill9_during, run_cli
from test_reflow import SOLVERS, teacher_and_couplings

from accelkit.data import load_dataset
from accelkit.evaluation import sample_batched
from accelkit.metrics import rmse, sliced_wasserstein
from accelkit.models.loading import load_teacher
from accelkit.schedules import schedule_from_name
from accelkit.stages.distill import DistillRecipe, ddim_step, progressive_target, run_distill, student_grid
from accelkit.teacher import NetworkTeacher, broadcast_to

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def distill(couple, out, method, nfe, steps, **kw):
    recipe = DistillRecipe(couplings=str(couple), method=method, nfe=nfe, batch_size=256, device="cpu",
                           eval_samples=500, loop={"steps": steps, "lr": 1e-3, "warmup_steps": 20,
                                                   "checkpoint_every": 0}, **kw)
    return run_distill(recipe, out)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """A flow-matching MLP teacher on two moons and 4096 couplings from its ODE (as in test_reflow)."""
    root = tmp_path_factory.mktemp("distill")
    return teacher_and_couplings(root, "flow")


@pytest.fixture(scope="module")
def held_out(flow):
    """Fresh noise (not in the couplings), the teacher's ODE endpoint from it (the couplings' sampler, DPM-Solver++
    at 32 NFE) and fresh data: the ground truth a student is measured against."""
    teacher = load_teacher(flow[0])
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3))
    endpoint = sample_batched(teacher, noise, "dpm++2m", 32)
    data = load_dataset("moons", 1000, seed=11).samples
    return noise, endpoint, data


def best_teacher_rmse(teacher, noise, endpoint, nfe):
    return min(rmse(sample_batched(teacher, noise, s, nfe), endpoint) for s in SOLVERS
               if not (s in ("heun", "midpoint") and nfe < 2))


def test_direct_student_beats_the_teachers_best_solver_at_1_and_2_nfe(flow, held_out, tmp_path):
    train, couple = flow
    noise, endpoint, data = held_out
    teacher = load_teacher(train)
    converged_sw = sliced_wasserstein(endpoint, data)
    for nfe in (1, 2):
        out = distill(couple, tmp_path / f"direct{nfe}", "direct", nfe, steps=200)
        summary = json.loads((out / "manifest.json").read_text())["summary"]
        assert summary["sampling"] == {"solver": "euler", "nfe": nfe, "grid": student_grid(nfe).tolist()}
        student = load_teacher(out)
        assert student.info["sampling"]["nfe"] == nfe and student.prediction == "flow"
        s = rmse(sample_batched(student, noise, "euler", nfe), endpoint)
        t = best_teacher_rmse(teacher, noise, endpoint, nfe)
        # observed (200 steps): student 0.035 / 0.017 against the teacher's best 0.80 / 0.16 (RMSE to its endpoint)
        assert s < 0.25 * t, (nfe, s, t)
        s_sw = sliced_wasserstein(sample_batched(student, noise, "euler", nfe), data)
        assert s_sw < 1.5 * converged_sw, (nfe, s_sw, converged_sw)
        q = summary["quality"]
        assert q["student"][str(nfe)] < 0.1 * q["teacher"][str(nfe)], q


def test_progressive_halves_the_steps_and_keeps_the_quality(flow, held_out, tmp_path):
    train, couple = flow
    noise, endpoint, _ = held_out
    out = distill(couple, tmp_path / "prog", "progressive", 1, steps=100, start_nfe=8)
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["nfe_per_round"] == [8, 4, 2, 1]
    assert [(r["teacher_nfe"], r["nfe"]) for r in summary["rounds"]] == [(8, 4), (4, 2), (2, 1)]
    # each round's student at N against its teacher at 2N on the recorded couplings: within 1.5x
    for r in summary["rounds"]:
        assert r["rmse"] < 1.5 * r["teacher_rmse"], r
    # and on held-out noise, recomputed from the round files: the chain 8 -> 4 -> 2 -> 1 loses at most 1.5x a round
    teacher = load_teacher(train)
    models = [(8, teacher)] + [(n, load_teacher(out / f"round-{i}.safetensors")) for i, n in enumerate((4, 2, 1), 1)]
    errors = [rmse(sample_batched(m, noise, "euler", n, grid=student_grid(n)), endpoint) for n, m in models]
    for prev, cur in zip(errors, errors[1:], strict=False):
        assert cur < 1.5 * prev, errors  # observed about 0.18 in every round
    one_step = rmse(sample_batched(load_teacher(out), noise, "euler", 1), endpoint)
    assert one_step == pytest.approx(errors[-1])
    assert one_step < 0.5 * best_teacher_rmse(teacher, noise, endpoint, 1), one_step
    # the ddim solver the manifest would name on other schedules is Euler's update on this linear one
    torch.testing.assert_close(sample_batched(teacher, noise[:200], "ddim", 4),
                               sample_batched(teacher, noise[:200], "euler", 4), atol=1e-5, rtol=0)
    history = json.loads((out / "history.json").read_text())
    assert sorted({e["round"] for e in history}) == [1, 2, 3]


def test_progressive_on_the_teachers_data(flow, held_out, tmp_path):
    """--data: the round's x_t from the data the teacher was trained on (two moons) instead of the couplings."""
    train, couple = flow
    noise, endpoint, _ = held_out
    out = distill(couple, tmp_path / "data", "progressive", 2, steps=100, start_nfe=4, data="moons", data_size=4096)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["data"] == "moons" and manifest["summary"]["nfe_per_round"] == [4, 2]
    teacher, student = load_teacher(train), load_teacher(out)
    t4 = rmse(sample_batched(teacher, noise, "euler", 4), endpoint)
    s2 = rmse(sample_batched(student, noise, "euler", 2), endpoint)
    t2 = rmse(sample_batched(teacher, noise, "euler", 2), endpoint)
    assert s2 < 1.5 * t4 and s2 < 0.75 * t2, (s2, t4, t2)  # observed on the couplings: 0.34, 0.34, 0.65


@pytest.mark.parametrize("schedule", ["linear", "vp-cosine", "vp-linear"])
def test_progressive_target_makes_one_student_step_land_on_two_teacher_steps(schedule):
    """One DDIM step from z_t with x0 = x~ (and the eps it implies) reaches the teacher's two-step z_t''."""
    sched = schedule_from_name(schedule)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2)).double()

    def call(network, x, t, cond):
        return network(torch.cat([x, t.to(x.dtype)[:, None] / 1000.0], dim=1))

    teacher = NetworkTeacher(net, call, "v", sched, (2,))  # v: finite x0 and eps at alpha = 0 too
    g = torch.Generator().manual_seed(0)
    nfe = 4
    t = torch.randint(1, nfe + 1, (64,), generator=g).double() / nfe
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    target, weight = progressive_target(teacher, z, t, nfe)
    t_end = (t - 1.0 / nfe).clamp(min=0.0)
    two_steps = ddim_step(teacher, ddim_step(teacher, z, t, t - 0.5 / nfe), t - 0.5 / nfe, t_end)
    a, s = sched.alpha(t), sched.sigma(t)
    eps = (z - broadcast_to(a, z) * target) / broadcast_to(s, z)
    one_step = broadcast_to(sched.alpha(t_end), z) * target + broadcast_to(sched.sigma(t_end), z) * eps
    torch.testing.assert_close(one_step, two_steps, atol=1e-9, rtol=1e-9)
    assert torch.all(weight >= 1.0) and torch.allclose(weight, torch.clamp((a / s) ** 2, min=1.0))


TINY = ["--method", "progressive", "--start-nfe", "4", "--nfe", "1", "--batch-size", "64", "--steps", "60",
        "--set", "distill.loop.checkpoint_every=5", "--set", "distill.eval_samples=100", "--device", "cpu"]


def test_kill9_then_same_command_equals_uninterrupted(flow, tmp_path):
    couple = flow[1]
    full = run_cli("distill", couple, *TINY, "-o", tmp_path / "full", env=ONE_THREAD)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    # the couplings path comes in on stdin, as in `accelkit couple T | accelkit distill`; killed in round 1, between
    # the rounds or in round 2 (about 1 s each)
    delay = kill9_during(["distill", *TINY, "-o", out], out / "checkpoint" / "round-1" / "latest.json",
                         max_delay=1.5, stdin=f"{couple}\n")
    resumed = run_cli("distill", "-", *TINY, "-o", out, input=f"{couple}\n", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out)
    assert_same_tensors(tmp_path / "full" / "teacher.safetensors", out / "teacher.safetensors",
                        f"after kill -9 (delay {delay:.2f}s)")
    m_full = json.loads((tmp_path / "full" / "manifest.json").read_text())["summary"]
    m_killed = json.loads((out / "manifest.json").read_text())["summary"]
    assert m_full["rounds"] == m_killed["rounds"] and m_killed["nfe_per_round"] == [4, 2, 1]


def test_bad_input_is_one_line_exit_2(flow, cli, tmp_path):
    train, couple = flow
    cases = [
        (("distill", couple, "--method", "direct", "--nfe", "3", "-o", tmp_path / "a"), "expected one of 1, 2, 4"),
        (("distill", couple, "--start-nfe", "12", "--nfe", "2", "-o", tmp_path / "b"), "power of two"),
        (("distill", train, "-o", tmp_path / "e"), "expected a 'couple' artifact"),
    ]
    for args, expected in cases:
        r = cli(*args, env=ONE_THREAD)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / args[-1]).exists()
    # the same checks in the recipe, without a process each
    from pydantic import ValidationError

    for kw, expected in [({"nfe": 2, "start_nfe": 2}, "power of two"), ({"nfe": 1, "start_nfe": 6}, "power of two"),
                         ({"method": "direct", "nfe": 8}, "expected one of 1, 2, 4"),
                         ({"method": "consistency"}, "progressive"),
                         ({"method": "direct", "data": "moons"}, "applies to --method progressive"),
                         ({"data": "nowhere.txt"}, "safetensors")]:
        with pytest.raises(ValidationError, match=expected):
            DistillRecipe(couplings=str(couple), **kw)
    assert DistillRecipe(couplings=str(couple), nfe=2, start_nfe=16).round_nfes() == [8, 4, 2]


@pytest.mark.slow
def test_toy2d_distill_recipe_runs(cli, tmp_path):
    """recipes/toy2d-distill.yaml, shrunk by --set: the 1-step student of an 8-step teacher, round by round."""
    shrink = ["train.loop.steps=300", "train.network.hidden=64", "train.network.depth=2", "train.eval_samples=0",
              "couple.n=1024", "couple.shard_size=1024", "couple.micro_batch=256", "distill.loop.steps=100",
              "distill.eval_samples=300", "distill.batch_size=128", "train.device=cpu", "distill.device=cpu"]
    args = [a for s in shrink for a in ("--set", s)]
    r = cli("run", os.path.join(REPO, "recipes", "toy2d-distill.yaml"), *args, cwd=str(tmp_path), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    (art,) = (tmp_path / "runs").glob("distill-*")
    summary = json.loads((art / "manifest.json").read_text())["summary"]
    assert summary["nfe_per_round"] == [8, 4, 2, 1] and (tmp_path / r.stdout.strip()).resolve() == art.resolve()
    q = summary["quality"]
    assert q["student"]["1"] < 0.5 * q["teacher"]["1"], q
