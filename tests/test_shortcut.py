"""`accelkit shortcut`: shortcut-model and MeanFlow students of a 2-D teacher start as the teacher bit for bit, beat
the teacher's best solver at 1, 2 and 4 evaluations, record their sampler for `sample`, resume exactly after
kill -9, convert a teacher on another schedule to the linear path, and refuse bad input with one line."""

import json

import pytest
import torch
from conftest import assert_same_tensors, kill9_during, run_cli

from accelkit.data import BatchSampler, load_dataset
from accelkit.evaluation import sample_batched
from accelkit.extra_inputs import attach_extra_inputs, with_extra_inputs
from accelkit.metrics import sliced_wasserstein
from accelkit.models.builtin import MLP, builtin_call
from accelkit.models.loading import load_teacher, save_teacher
from accelkit.objectives import DenoisingObjective
from accelkit.schedules import LinearSchedule
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.stages.shortcut import ShortcutRecipe, run_shortcut, student_inputs
from accelkit.teacher import NetworkTeacher
from accelkit.training import LoopConfig, Trainer

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
#: Both students are anchored to the teacher's velocity (a distillation; on 300 steps the data's eps - x0 is too
#: noisy: shortcut 0.24 / 0.23 at 1 / 2 jumps against 0.13 / 0.12). MeanFlow as a distillation of the teacher
#: (recipes/toy2d-shortcut.yaml): times uniform, half the pairs with r != t, adaptive weight p = 0.5 (the paper's
#: defaults need far longer on this budget).
MEANFLOW_DISTILL = dict(anchor="teacher", times="uniform", interval_share=0.5, adaptive_power=0.5, loop={"lr": 2e-3})
SOLVERS = ("euler", "dpm++2m", "ipndm", "unipc", "heun", "midpoint")


def flow_teacher(path, steps=400, hidden=64, depth=2, time_scale=1.0, schedule=None, prediction="flow"):
    """A flow-matching MLP on two moons. Its time features are smooth in t (time_scale 1): a network whose velocity
    wiggles at the time embedding's top frequency gives MeanFlow's JVP mostly that wiggle (docs/benchmarks.md)."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=hidden, depth=depth, time_scale=time_scale)
    schedule = schedule or LinearSchedule()
    objective = DenoisingObjective(schedule, prediction, builtin_call)
    data = load_dataset("moons", 50_000, seed=0).samples
    trainer = Trainer(net, objective.loss, BatchSampler(data, 256, 0, noise=objective.noise_fn((2,))),
                      LoopConfig(steps=steps, lr=2e-3, warmup_steps=20, lr_schedule="cosine", checkpoint_every=0),
                      device="cpu", progress=False)
    trainer.fit()
    net.load_state_dict(trainer.ema_weights())
    return save_teacher(NetworkTeacher(net.eval(), builtin_call, prediction, schedule, (2,)), path)


def student(couple, out, method, steps=300, **kw):
    loop = {"steps": steps, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 0, **kw.pop("loop", {})}
    recipe = ShortcutRecipe(source=str(couple), method=method, batch_size=256, device="cpu", eval_samples=500,
                            finest_steps=64, loop=loop, **kw)
    return run_shortcut(recipe, out)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    root = tmp_path_factory.mktemp("moons")
    teacher = flow_teacher(root / "teacher.safetensors")
    couple = run_couple(CoupleRecipe(teacher=str(teacher), n=4096, solver="dpm++2m", nfe=32, micro_batch=512,
                                     shard_size=4096, batch_size=4096), root / "couple")
    return root, teacher, couple


@pytest.fixture(scope="module")
def students(moons):
    root, _, couple = moons
    return {"shortcut": student(couple, root / "shortcut", "shortcut", anchor="teacher"),
            "meanflow": student(couple, root / "meanflow", "meanflow", **MEANFLOW_DISTILL)}


@pytest.fixture(scope="module")
def fresh():
    data = load_dataset("moons", 2000, seed=11).samples
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    return data, noise


def sw(model, noise, data, solver, nfe):
    return sliced_wasserstein(sample_batched(model, noise, solver, nfe), data)


def best_teacher_sw(teacher, noise, data, nfe):
    return min(sw(teacher, noise, data, s, nfe) for s in SOLVERS if not (s in ("heun", "midpoint") and nfe < 2))


def test_students_start_as_the_teacher_bit_for_bit_and_stay_close_at_the_finest_step(moons, students):
    """Zero-initialised inputs: at the start the student's velocity at d = 1/64 (and at r = t) is the teacher's,
    bit for bit; after training it is still close there (it is anchored to the flow)."""
    _, teacher_path, couple = moons
    teacher = load_teacher(teacher_path)
    g = torch.Generator().manual_seed(5)
    z, t = torch.randn(512, 2, generator=g), torch.rand(512, generator=g, dtype=torch.float64)
    v = teacher.velocity(z, t)
    for method, name, value in (("shortcut", "step_size", 1.0 / 64), ("meanflow", "interval", 0.0)):
        recipe = ShortcutRecipe(source=str(couple), method=method, finest_steps=64)
        start = attach_extra_inputs(load_teacher(teacher_path), student_inputs(recipe))
        for d in (value, 0.5, 1.0):  # every value of the input
            assert torch.equal(start.velocity(z, t, with_extra_inputs(None, **{name: torch.full((512,), d)})), v)
        trained = load_teacher(students[method])
        vs = trained.velocity(z, t, with_extra_inputs(None, **{name: torch.full((512,), value)}))
        rel = float((vs - v).norm() / v.norm())
        print(f"{method}: relative distance to the teacher's velocity at the finest step after training {rel:.3f}")
        assert 0 < rel < 0.25, (method, rel)  # observed 0.05 (shortcut), 0.1 (meanflow)


def test_shortcut_and_meanflow_beat_the_teachers_best_solver_at_1_2_4_steps(moons, students, fresh):
    _, teacher_path, _ = moons
    data, noise = fresh
    teacher = load_teacher(teacher_path)
    errors = {}
    for method in ("shortcut", "meanflow"):
        model = load_teacher(students[method])
        errors[method] = [sw(model, noise, data, method, n) for n in (1, 2, 4)]
    for i, nfe in enumerate((1, 2, 4)):
        best = best_teacher_sw(teacher, noise, data, nfe)
        print(f"NFE {nfe}: teacher's best {best:.3f}, shortcut {errors['shortcut'][i]:.3f}, "
              f"meanflow {errors['meanflow'][i]:.3f}")
        # observed: teacher's best 1.12 / 0.27 / 0.120 (its converged ODE: 0.094), shortcut 0.125 / 0.119 / 0.104,
        # meanflow 0.127 / 0.123 / 0.102: at 4 NFE the teacher is within 0.026 of its own floor
        margin = {1: 0.3, 2: 0.7, 4: 0.92}[nfe]
        for method in ("shortcut", "meanflow"):
            assert errors[method][i] < margin * best, (method, nfe, errors[method][i], best)
    s1, s2, s4 = errors["shortcut"]
    assert s4 < s1 and s2 <= 1.05 * s1 and s4 <= 1.05 * s2, errors["shortcut"]  # error falls with the steps


@pytest.mark.slow
def test_the_artifact_records_its_sampler_and_sample_uses_it(moons, students, cli, tmp_path):
    _, _, couple = moons
    for method in ("shortcut", "meanflow"):
        out = students[method]
        summary = json.loads((out / "manifest.json").read_text())["summary"]
        assert summary["sampling"]["solver"] == method and summary["sampling"]["nfe"] == 1
        assert summary["linear_path"]["conversion"].startswith("none")
        q = summary["quality"]
        assert q["student"]["1"] < 0.5 * q["teacher_dpm++2m"]["1"], q
        if method == "meanflow":
            assert summary["derivative"] == "jvp"
        explicit = cli("sample", out, "--solver", method, "--nfe", "1", "-n", "8",
                       "-o", tmp_path / f"e-{method}.safetensors", env=ONE_THREAD)
        assert explicit.returncode == 0, explicit.stderr
        r = cli("sample", out, "-n", "8", "-o", tmp_path / f"d-{method}.safetensors", env=ONE_THREAD)
        assert r.returncode == 0 and f"using {method} at 1 NFE" in r.stderr, r.stderr
        from safetensors.torch import load_file

        assert torch.equal(load_file(tmp_path / f"d-{method}.safetensors")["samples"],
                           load_file(tmp_path / f"e-{method}.safetensors")["samples"])
    # the single-file export carries the student's extra inputs and its sampler; couple jumps as it does
    exported = tmp_path / "student.safetensors"
    assert cli("export", out, "-o", exported, "--format", "safetensors", env=ONE_THREAD).returncode == 0
    r = cli("sample", exported, "-n", "8", "-o", tmp_path / "x.safetensors", env=ONE_THREAD)
    assert r.returncode == 0 and "using meanflow at 1 NFE" in r.stderr, r.stderr
    assert torch.equal(load_file(tmp_path / "x.safetensors")["samples"], load_file(tmp_path / "d-meanflow.safetensors")
                       ["samples"])
    r = cli("couple", out, "-n", "8", "--micro-batch", "8", "--shard-size", "8", "-o", tmp_path / "pairs",
            env=ONE_THREAD)
    assert r.returncode == 0 and "using meanflow at 1 NFE" in r.stderr, r.stderr
    assert json.loads((tmp_path / "pairs" / "manifest.json").read_text())["recipe"]["solver"] == "meanflow"



RESUME = ["--batch-size", "64", "--steps", "120", "--set", "shortcut.loop.checkpoint_every=10",
          "--set", "shortcut.eval_samples=0", "--set", "shortcut.finest_steps=16", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["shortcut", "meanflow"])
def test_kill9_then_same_command_equals_uninterrupted(moons, tmp_path, method):
    """shortcut from the couplings (path on stdin); meanflow from the teacher with --data."""
    _, teacher, couple = moons
    source = [str(couple)] if method == "shortcut" else [str(teacher), "--data", "moons",
                                                          "--set", "shortcut.data_size=4096"]
    args = ["--method", method, *RESUME]
    full = run_cli("shortcut", *source, *args, "-o", tmp_path / "full", env=ONE_THREAD)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    if method == "shortcut":
        delay = kill9_during(["shortcut", *args, "-o", out], out / "checkpoint" / "latest.json", stdin=f"{couple}\n")
        resumed = run_cli("shortcut", "-", *args, "-o", out, input=f"{couple}\n", env=ONE_THREAD)
    else:
        delay = kill9_during(["shortcut", *source, *args, "-o", out], out / "checkpoint" / "latest.json")
        resumed = run_cli("shortcut", *source, *args, "-o", out, env=ONE_THREAD)
    step = json.loads((out / "checkpoint" / "latest.json").read_text())["step"] if (out / "checkpoint").exists() \
        else None
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out)
    assert "resumed from" in resumed.stderr, f"killed after {delay:.2f}s but did not resume"
    assert_same_tensors(tmp_path / "full" / "teacher.safetensors", out / "teacher.safetensors",
                        f"{method} after kill -9 (delay {delay:.2f}s, step {step})")


def test_bad_input_is_one_line_exit_2_and_writes_nothing(moons, cli, tmp_path):
    _, teacher, couple = moons
    cases = [
        (("shortcut", couple, "--set", "shortcut.finest_steps=100"), "power of two"),
        (("shortcut", couple, "--guidance-range", "1,4"), "unconditional"),
        (("shortcut", teacher), "--data"),
    ]
    for i, (args, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = cli(*args, "-o", out, env=ONE_THREAD)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists(), args
    # the same checks in the recipe and the stage, without a process each
    from accelkit.errors import AccelkitError

    for bad, expected in (({"nfe": 3}, "power of two"), ({"guidance_range": (4.0, 1.0)}, "A < B"),
                          ({"method": "consistency"}, "meanflow"), ({"guidance": 1.0, "guidance_range": (1, 2)},
                                                                     "not both")):
        with pytest.raises(ValueError, match=expected):
            ShortcutRecipe(source=str(couple), **bad)
    with pytest.raises(AccelkitError, match="unconditional"):
        run_shortcut(ShortcutRecipe(source=str(couple), guidance=3.0), tmp_path / "g")
    assert not (tmp_path / "g").exists()


class NoForwardMode(torch.autograd.Function):
    """An operation with a backward but no forward-mode derivative (as some fused kernels have)."""

    @staticmethod
    def forward(x):
        return x * 1.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


def test_jvp_on_a_network_without_forward_mode_is_refused_and_auto_falls_back(moons, tmp_path, monkeypatch):
    from accelkit.errors import AccelkitError

    _, _, couple = moons
    forward = MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, *a, **k: NoForwardMode.apply(forward(self, *a, **k)))
    recipe = dict(source=str(couple), method="meanflow", batch_size=32, device="cpu", eval_samples=0,
                  loop={"steps": 2, "checkpoint_every": 0})
    with pytest.raises(AccelkitError, match="no forward-mode derivative.*finite-difference"):
        run_shortcut(ShortcutRecipe(**recipe, derivative="jvp"), tmp_path / "jvp")
    assert not (tmp_path / "jvp").exists()
    out = run_shortcut(ShortcutRecipe(**recipe, derivative="auto"), tmp_path / "auto")
    assert json.loads((out / "manifest.json").read_text())["summary"]["derivative"] == "finite-difference"


def test_a_teacher_on_another_schedule_is_read_on_the_linear_path(tmp_path):
    """An eps teacher on DDPM's discrete schedule: the student keeps its network, schedule and prediction type, loads
    under the transformation to the linear path, starts there as the teacher's linear-path velocity and says so."""
    from accelkit.linear_path import linear_path_teacher
    from accelkit.schedules import schedule_from_name

    path = flow_teacher(tmp_path / "eps.safetensors", steps=5, hidden=16, depth=1,
                        schedule=schedule_from_name("vp-linear"), prediction="eps")
    out = run_shortcut(ShortcutRecipe(source=str(path), data="moons", data_size=256, method="shortcut",
                                      finest_steps=8, batch_size=32, device="cpu", eval_samples=0,
                                      loop={"steps": 3, "checkpoint_every": 0, "lr": 1e-12}), tmp_path / "s")
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert "rescaled from vp-discrete to the linear path" in summary["linear_path"]["conversion"]
    assert summary["prediction_type"] == "eps" and summary["schedule"]["name"] == "vp-discrete"
    loaded = load_teacher(out)
    assert loaded.schedule.name == "linear" and loaded.base.prediction == "eps"
    teacher = linear_path_teacher(load_teacher(path))
    z, t = torch.randn(64, 2), torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    step = with_extra_inputs(None, step_size=torch.full((64,), 1 / 8))
    assert torch.allclose(loaded.velocity(z, t, step), teacher.velocity(z, t), atol=1e-4)  # lr 1e-12: barely moved
    x = sample_batched(loaded, torch.randn(16, 2), "shortcut", 4)
    assert torch.isfinite(x).all()


def test_lora_student_keeps_the_teachers_weights_outside_the_adapted_layers(moons, tmp_path):
    """loop.lora: only the adapted layers and the extra-input embedding change; the adapters are merged, so the
    student has the teacher's keys plus ``accelkit_extra.*``."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    _, teacher, couple = moons
    targets = ["blocks.0.1", "blocks.1.1", "out.1"]
    out = run_shortcut(ShortcutRecipe(source=str(couple), method="shortcut", anchor="teacher", finest_steps=8,
                                      batch_size=64, device="cpu", eval_samples=0,
                                      loop={"steps": 20, "lr": 1e-2, "checkpoint_every": 0,
                                            "lora": {"rank": 4, "target_modules": targets}}), tmp_path / "lora")
    a, b = load_file(teacher), load_file(out / "teacher.safetensors")
    assert set(b) == set(a) | {k for k in b if k.startswith("accelkit_extra.")} and len(b) > len(a)
    adapted = {f"{m}.weight" for m in targets}
    for k in a:
        assert torch.equal(a[k], b[k]) == (k not in adapted), k
    assert "LoRA rank 4 merged" in json.loads((out / "manifest.json").read_text())["summary"]["weights"]


@pytest.mark.slow
def test_toy2d_shortcut_recipe_runs(cli, tmp_path):
    """recipes/toy2d-shortcut.yaml, shrunk by --set: both students are written and record their samplers."""
    import os

    from conftest import REPO

    shrink = ["train.loop.steps=200", "train.network.hidden=32", "train.network.depth=1", "train.eval_samples=0",
              "couple.n=512", "couple.shard_size=512", "couple.micro_batch=256", "shortcut.loop.steps=20",
              "shortcut.eval_samples=64", "shortcut.batch_size=64", "train.device=cpu", "shortcut.device=cpu"]
    args = [a for s in shrink for a in ("--set", s)]
    r = cli("run", os.path.join(REPO, "recipes", "toy2d-shortcut.yaml"), *args, cwd=str(tmp_path), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    made = [json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "runs").glob("shortcut-*")]
    assert sorted(m["summary"]["sampling"]["solver"] for m in made) == ["meanflow", "shortcut"]
    assert all("quality" in m["summary"] for m in made)
