"""`accelkit consistency`: the parameterisation's exact boundary, CD / ECT / SCT targets against the analytic teacher,
2-D students that beat their teacher at 1-2 NFE, multistep ECT / SCT improving with steps, PCM at M NFE, the recorded
sampler, exact resume after kill -9, one-line errors."""

import json
import math

import pytest
import torch
from conftest import assert_same_tensors, kill9_during, run_cli

from accelkit.consistency import (
    Parameterisation,
    consistency_function,
    exact_consistency_function,
    per_sample_distance,
    reference_x0_estimate,
    sct_target_point,
    teacher_step,
)
from accelkit.data import load_dataset
from accelkit.evaluation import sample_batched
from accelkit.metrics import sliced_wasserstein
from accelkit.models.analytic import GaussianMixtureTeacher
from accelkit.models.loading import load_teacher
from accelkit.schedules import EDMSchedule, LinearSchedule, schedule_from_name
from accelkit.solvers import solve
from accelkit.stages.consistency import ConsistencyRecipe, run_consistency, teacher_grid
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.stages.train import TrainRecipe, run_train

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SOLVERS = ("euler", "dpm++2m", "ipndm", "unipc", "heun", "midpoint")
F64 = torch.float64


def broad_mixture(schedule):
    """Two wide Gaussians in 2-D (a smooth ODE, so an accurate solve is cheap)."""
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64)
    return GaussianMixtureTeacher(means, torch.tensor([0.3, 0.2], dtype=F64), torch.tensor([0.4, 0.6]), schedule)


# ----------------------------------------------------------------------------------------------- parameterisation


@pytest.mark.parametrize("schedule", [LinearSchedule(), schedule_from_name("vp-linear"), EDMSchedule()],
                         ids=lambda s: s.name)
def test_boundary_holds_exactly_for_any_network_and_the_student_starts_as_the_teacher(schedule):
    """f(x, t_min) = x / alpha(t_min) whatever the network predicts; far from t_min f is the teacher's x0."""
    from accelkit.models.builtin import MLP
    from accelkit.teacher import NetworkTeacher

    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1)
    param = Parameterisation(schedule)
    assert math.isclose(float(param.edm_sigma(torch.tensor(param.t_min, dtype=F64))), 0.002, rel_tol=1e-9)
    x = torch.randn(64, 2)
    for prediction in ("eps", "x0", "v", "flow"):
        model = NetworkTeacher(net, lambda n, x, t, c: n(x, t), prediction, schedule, (2,))
        alpha_min = float(schedule.alpha(torch.tensor(param.t_min, dtype=F64)))
        f = consistency_function(model, param, x, torch.tensor(param.t_min, dtype=F64))
        assert torch.allclose(f, x / alpha_min, rtol=1e-6, atol=1e-7), prediction
        t = torch.tensor(0.9, dtype=F64)
        f = consistency_function(model, param, x, t)
        assert torch.allclose(f, model.predict_x0(x, t), rtol=1e-3, atol=1e-3), prediction


def test_exact_consistency_function_has_zero_cd_loss_and_a_perturbed_one_does_not():
    """Ground truth from the analytic teacher: f* = its ODE solved to t_min. On every interval of a CD grid, f* at
    x_{t_n} equals f* at the teacher's accurate step to t_{n+1} (loss -> 0 as the step gets exact); a perturbed f
    does not."""
    teacher = broad_mixture(LinearSchedule())
    param = Parameterisation(teacher.schedule)
    grid = teacher_grid(teacher.schedule, 6, param.t_min)
    g = torch.Generator().manual_seed(0)
    x0 = teacher.sample_data(128, g)
    eps = torch.randn(128, 2, generator=g, dtype=F64)
    losses, perturbed = {}, []
    for n in (1, 3):
        t, s = float(grid[n]), float(grid[n + 1])
        x_t = (1 - t) * x0 + t * eps
        f_t = exact_consistency_function(teacher, param, x_t, t, nfe=200)
        for k in (2, 8, 32):
            x_phi = teacher_step(teacher, x_t, torch.full((128,), t, dtype=F64), torch.full((128,), s, dtype=F64),
                                 solver="dpm++3m", nfe=k)
            f_s = exact_consistency_function(teacher, param, x_phi, s, nfe=200)
            losses[n, k] = float(per_sample_distance(f_t - f_s, "l2").mean())
        wrong = f_s + 0.05 * torch.sin(3 * x_phi)
        perturbed.append(float(per_sample_distance(f_t - wrong, "l2").mean()))
    print("CD loss of the exact consistency function (interval, teacher NFE): ", losses, "perturbed:", perturbed)
    # observed: 7e-5, 2e-7, 5e-9 at k = 2, 8, 32 (fourth order), perturbed 1e-3
    for n in (1, 3):
        assert losses[n, 2] > 30 * losses[n, 8] and losses[n, 8] > 10 * losses[n, 32], losses
        assert losses[n, 32] < 1e-7, losses
    assert min(perturbed) > 1e4 * max(losses[1, 32], losses[3, 32]), (perturbed, losses)


def test_sct_reference_estimate_converges_to_the_posterior_mean_and_lowers_the_target_variance():
    """SCT's x0bar over a reference batch (the x0 that made x_t plus n - 1 data samples) -> E[x0 | x_t] (the analytic
    teacher's x0) like 1 / sqrt(n); its target point has lower variance about the exact conditional mean than ECT's
    single-sample target at the same (t, r)."""
    teacher = broad_mixture(LinearSchedule())
    sch = teacher.schedule
    t, r = 0.6, 0.45
    g = torch.Generator().manual_seed(1)
    b = 256
    x0 = teacher.sample_data(b, g)
    eps = torch.randn(b, 2, generator=g, dtype=F64)
    x_t = (1 - t) * x0 + t * eps
    tt = torch.full((b,), t, dtype=F64)
    exact = teacher.predict_x0(x_t, tt)
    errors = {}
    for n in (16, 64, 256, 1024):
        errs = []
        for _rep in range(4):
            est = torch.empty_like(x_t)
            for i in range(b):  # each x_t with its own reference batch: its x0 and n - 1 fresh samples
                ref = torch.cat([x0[i:i + 1], teacher.sample_data(n - 1, g)])
                est[i] = reference_x0_estimate(x_t[i:i + 1], torch.tensor([1 - t], dtype=F64),
                                               torch.tensor([t], dtype=F64), ref)[0]
            errs.append(float(((est - exact) ** 2).sum(1).mean()))
        errors[n] = math.sqrt(sum(errs) / len(errs))
    print("SCT x0 error by reference size", errors)
    ns = sorted(errors)
    assert all(errors[a] > errors[c] for a, c in zip(ns, ns[1:], strict=False)), errors
    slope = math.log(errors[1024] / errors[16]) / math.log(1024 / 16)
    assert -0.7 < slope < -0.35, (slope, errors)  # 1 / sqrt(n): -0.5
    # target variance about E[x_r | x_t] = the DDIM step of the exact posterior mean
    rr = torch.full((b,), r, dtype=F64)
    centre = (1 - r) * exact + r * (x_t - (1 - t) * exact) / t
    ect = (1 - r) * x0 + r * eps
    sct = sct_target_point(x_t, tt, rr, sch, torch.cat([x0, teacher.sample_data(b, g)]))
    v_ect = float(((ect - centre) ** 2).sum(1).mean())
    v_sct = float(((sct - centre) ** 2).sum(1).mean())
    print(f"target variance: sct {v_sct:.4g}, ect {v_ect:.4g}, ratio {v_sct / v_ect:.3f}")
    assert v_sct < 0.5 * v_ect, (v_sct, v_ect)


# --------------------------------------------------------------------------------------------------- 2-D students


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small flow teacher on two moons, its couplings, fresh data and seeded noise."""
    root = tmp_path_factory.mktemp("consistency")
    train = run_train(TrainRecipe(data="moons", objective="flow", batch_size=256, network={"hidden": 64, "depth": 2},
                                  eval_samples=0, device="cpu",
                                  loop={"steps": 300, "lr": 2e-3, "warmup_steps": 20, "lr_schedule": "cosine",
                                        "checkpoint_every": 0}), root / "train")
    couple = run_couple(CoupleRecipe(teacher=str(train), n=2048, solver="dpm++2m", nfe=16, micro_batch=512,
                                     shard_size=2048, batch_size=2048), root / "couple")
    data = load_dataset("moons", 2000, seed=11).samples
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    teacher = load_teacher(train)
    best = {n: min(sliced_wasserstein(sample_batched(teacher, noise, s, n), data)
                   for s in SOLVERS if not (s in ("heun", "midpoint") and n < 2)) for n in (1, 2, 4)}
    return {"root": root, "train": train, "couple": couple, "data": data, "noise": noise, "best": best, "runs": {}}


RUNS = {
    "cd": dict(method="cd", steps=300),
    "pcm2": dict(method="pcm", phases=2, steps=300),
    "pcm4": dict(method="pcm", phases=4, steps=300),
    "ect": dict(method="ect", steps=500, stage_steps=250, data="moons"),
    "sct": dict(method="sct", steps=500, stage_steps=250, data="moons"),
}


def student(toy, name):
    if name not in toy["runs"]:
        kw = dict(RUNS[name])
        steps = kw.pop("steps")
        source = str(toy["train"]) if "data" in kw else str(toy["couple"])
        recipe = ConsistencyRecipe(source=source, batch_size=256, device="cpu", data_size=20000,
                                   loop={"steps": steps, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 0}, **kw)
        toy["runs"][name] = run_consistency(recipe, toy["root"] / name)
    return toy["runs"][name]


def sw_recorded(toy, name, nfe):
    """Sliced W2 to fresh data of the student's recorded sampler at ``nfe`` steps (its own grid for that NFE)."""
    out = student(toy, name)
    sampling = json.loads((out / "manifest.json").read_text())["summary"]["sampling"]
    model = load_teacher(out)
    grid = sampling["grid"] if nfe == sampling["nfe"] else None
    x = sample_batched(model, toy["noise"], sampling["solver"], nfe, grid=grid)
    return sliced_wasserstein(x, toy["data"])


@pytest.mark.parametrize("name", ["cd", "ect", "sct"])
def test_students_beat_the_teachers_best_solver_at_1_and_2_nfe(toy, name):
    ratios = {}
    for nfe in (1, 2):
        s = sw_recorded(toy, name, nfe)
        ratios[nfe] = s / toy["best"][nfe]
        # observed ratios to the teacher's best (1.15 / 0.28 SW2) at 1 / 2 NFE: cd 0.12 / 0.39, ect 0.14 / 0.45,
        # sct 0.13 / 0.39
        assert s < 0.6 * toy["best"][nfe], (name, nfe, s, toy["best"][nfe])
    print(name, "student / teacher's best SW2 at 1, 2 NFE:", ratios)


@pytest.mark.parametrize("name", ["ect", "sct"])
def test_consistency_tuning_improves_from_1_to_2_to_4_steps(toy, name):
    sw = [sw_recorded(toy, name, n) for n in (1, 2, 4)]
    print(name, "SW2 at 1, 2, 4 steps (tcd):", sw)
    assert sw[0] > sw[1] > sw[2] and sw[2] < 0.8 * sw[0], sw


@pytest.mark.parametrize("name,phases", [("pcm2", 2), ("pcm4", 4)])
def test_pcm_beats_the_teacher_at_m_nfe_with_one_jump_per_phase(toy, name, phases):
    out = student(toy, name)
    sampling = json.loads((out / "manifest.json").read_text())["summary"]["sampling"]
    assert sampling["solver"] == "euler" and sampling["nfe"] == phases and len(sampling["grid"]) == phases + 1
    s = sw_recorded(toy, name, phases)
    print(name, f"SW2 {s:.3f} against the teacher's best {toy['best'][phases]:.3f} at {phases} NFE")
    assert s < 0.75 * toy["best"][phases], (s, toy["best"][phases])


def test_sample_uses_the_recorded_sampler_without_flags(toy, cli, tmp_path):
    out = student(toy, "cd")
    r = cli("sample", out, "-n", "16", "-o", tmp_path / "s.safetensors", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "using consistency at 1 NFE" in r.stderr, r.stderr
    from safetensors.torch import load_file

    got = load_file(tmp_path / "s.safetensors")["samples"]
    from accelkit.noise import sample_noise

    model = load_teacher(out)
    want = solve(model, sample_noise(0, list(range(16)), (2,)), solver="consistency", nfe=1, grid=[1.0, 0.0])
    assert torch.allclose(got, want, atol=1e-5)


def test_multistep_sampling_does_not_depend_on_the_batch(toy):
    model = load_teacher(student(toy, "cd"))
    noise = toy["noise"][:64]
    whole = solve(model, noise, solver="consistency", nfe=3)
    parts = torch.cat([solve(model, noise[i:i + 16], solver="consistency", nfe=3) for i in range(0, 64, 16)])
    assert torch.allclose(whole, parts, atol=1e-6)
    assert not torch.allclose(whole, solve(model, noise, solver="tcd", nfe=3), atol=1e-3)


# ---------------------------------------------------------------------------------------------- resume and errors


TINY = ["--batch-size", "64", "--steps", "200", "--set", "consistency.loop.checkpoint_every=10", "--device", "cpu"]


@pytest.mark.parametrize("method", [pytest.param("cd", marks=pytest.mark.slow),
                                    pytest.param("ect", marks=pytest.mark.slow),
                                    pytest.param("sct", marks=pytest.mark.slow),
                                    pytest.param("pcm", marks=pytest.mark.slow),
                                    pytest.param("pcm-adv", marks=pytest.mark.slow)])
def test_kill9_then_same_command_equals_uninterrupted(toy, tmp_path, method):
    """Killed at a random point after the first checkpoint and run again: the weights (and for cd the EMA target
    that shaped them) equal an uninterrupted run's bit for bit."""
    source = toy["train"] if method in ("ect", "sct") else toy["couple"]
    extra = ["--data", "moons", "--set", "consistency.data_size=4096"] if method in ("ect", "sct") else []
    if method == "pcm-adv":  # the discriminator heads and their optimizer resume too
        method, extra = "pcm", ["--set", "consistency.adversarial_weight=0.1", "--set", "consistency.disc.lr=0.001"]
    args = ["consistency", "--method", method, *extra, *TINY]
    full = run_cli(*args[:1], source, *args[1:], "-o", tmp_path / "full", env=ONE_THREAD)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    delay = kill9_during([*args, "-o", out], out / "checkpoint" / "latest.json", stdin=f"{source}\n")
    step = json.loads((out / "checkpoint" / "latest.json").read_text())["step"]
    resumed = run_cli(*args[:1], "-", *args[1:], "-o", out, input=f"{source}\n", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out)
    assert "resumed from" in resumed.stderr, f"killed at step >= {step} after {delay:.2f}s but did not resume"
    assert_same_tensors(tmp_path / "full" / "teacher.safetensors", out / "teacher.safetensors",
                        f"after kill -9 at step >= {step} (delay {delay:.2f}s)")


def test_bad_input_is_one_line_exit_2_and_writes_nothing(toy, cli, tmp_path):
    train, couple = toy["train"], toy["couple"]
    cases = [
        (("consistency", couple, "--method", "rcm"), "cd"),
        (("consistency", couple, "--method", "lcm", "--guidance-range", "1,4"), "unconditional"),
        (("consistency", couple, "--method", "pcm", "--phases", "3"), "does not divide"),
        (("consistency", train, "--method", "ect"), "needs --data"),
    ]
    for i, (args, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = cli(*args, "-o", out, env=ONE_THREAD)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists(), args


# ------------------------------------------------------------------------------------------------------------ LCM


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory):
    """A flow teacher on two overlapping 2-D classes, trained with a null class (label 2, 20 % of the batches'
    labels), and its unguided couplings with labels 0, 1, 0, 1, ..."""
    from accelkit.models.builtin import MLP, builtin_call
    from accelkit.models.loading import save_teacher
    from accelkit.teacher import NetworkTeacher

    root = tmp_path_factory.mktemp("lcm")
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=64, depth=2, num_classes=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-0.6, 0.0], [0.6, 0.0]])
    for _ in range(600):
        labels = torch.randint(0, 2, (256,), generator=g)
        x0 = centres[labels] + 0.45 * torch.randn(256, 2, generator=g)
        eps = torch.randn(256, 2, generator=g)
        t = torch.rand(256, 1, generator=g)
        shown = torch.where(torch.rand(256, generator=g) < 0.2, torch.full_like(labels, 2), labels)
        out = net((1 - t) * x0 + t * eps, t[:, 0], shown)
        loss = ((out - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    file = save_teacher(NetworkTeacher(net, builtin_call, "flow", LinearSchedule(), (2,)), root / "teacher.safetensors")
    (root / "labels.json").write_text(json.dumps([0, 1]))
    couple = run_couple(CoupleRecipe(teacher=str(file), n=2048, solver="dpm++2m", nfe=16, micro_batch=512,
                                     shard_size=2048, batch_size=2048, conditions=str(root / "labels.json")),
                        root / "couple")
    return root, file, couple


@pytest.mark.slow
def test_lcm_student_follows_the_guided_teacher_at_its_embedded_scale(class_teacher):
    """LCM with the guidance scale as an input (g in [1, 4]): at g = 2.5 and 4 the student's 2-step samples are
    closer to the teacher's guided samples at that g (32-NFE solve) than to its unguided ones; at g = 1 the other way
    round."""
    from accelkit.teacher import Condition

    root, file, couple = class_teacher
    out = run_consistency(ConsistencyRecipe(source=str(couple), method="lcm", guidance_range=(1.0, 4.0),
                                            batch_size=256, device="cpu",
                                            loop={"steps": 400, "lr": 1e-3, "warmup_steps": 20,
                                                  "checkpoint_every": 0}), root / "lcm")
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["guidance"]["range"] == [1.0, 4.0] and summary["guidance"]["input"] == "guidance"
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    cond = Condition(class_labels=torch.arange(1000) % 2)

    def teacher_samples(g):
        return sample_batched(load_teacher(file, guidance=g), noise, "dpm++2m", 32, cond=cond)

    reference = {g: teacher_samples(g) for g in (1.0, 2.5, 4.0)}
    student_model = load_teacher(out)
    for g in (1.0, 2.5, 4.0):
        student_model.guidance_scale = g
        x = sample_batched(student_model, noise, "consistency", 2, cond=cond)
        to_guided = sliced_wasserstein(x, reference[g])
        other = reference[1.0] if g != 1.0 else reference[4.0]
        to_other = sliced_wasserstein(x, other)
        print(f"lcm g={g}: SW2 to the teacher at g {to_guided:.3f}, to the teacher at the other end {to_other:.3f}")
        # observed: g = 1: 0.088 against 0.378; g = 2.5: 0.055 against 0.260; g = 4: 0.082 against 0.400
        assert to_guided < 0.7 * to_other, (g, to_guided, to_other)


@pytest.mark.slow
def test_guided_distillation_follows_the_guided_teacher_and_beats_it_at_2_nfe(class_teacher):
    """distill --method guided (Meng et al.): stage one's student, with g as an input, gives in one evaluation the
    teacher's guided x0 (two g values, stated tolerance); after the progressive round 4 -> 2 the 2-step student at g
    is closer to the teacher's 32-NFE guided solve than the teacher itself with 2 NFE at that g."""
    from accelkit.metrics import rmse
    from accelkit.stages.distill import DistillRecipe, run_distill
    from accelkit.teacher import Condition

    root, file, couple = class_teacher
    out = run_distill(DistillRecipe(couplings=str(couple), method="guided", guidance_range=(1.0, 4.0), start_nfe=4,
                                    nfe=2, batch_size=256, device="cpu", eval_samples=0,
                                    loop={"steps": 400, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 0}),
                      root / "guided")
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["nfe_per_round"] == [4, 2] and summary["guidance"]["range"] == [1.0, 4.0]
    g = torch.Generator().manual_seed(7)
    x = 1.2 * torch.randn(2000, 2, generator=g)
    t = 0.05 + 0.9 * torch.rand(2000, generator=g, dtype=F64)
    cond = Condition(class_labels=torch.arange(2000) % 2)
    stage_one = load_teacher(out / "round-1.safetensors")
    for scale in (2.0, 3.5):
        want = load_teacher(file, guidance=scale).predict_x0(x, t, cond)
        stage_one.guidance_scale = scale
        got = stage_one.predict_x0(x, t, cond)
        rel = rmse(got, want) / float(want.pow(2).mean().sqrt())
        print(f"guided stage one at g={scale}: relative RMSE to the teacher's guided x0 {rel:.4f}")
        assert rel < 0.15, (scale, rel)  # observed 0.068 (g = 2) and 0.096 (g = 3.5) after 400 steps
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    labels = Condition(class_labels=torch.arange(1000) % 2)
    student_model = load_teacher(out)
    for scale in (2.0, 3.5):
        teacher = load_teacher(file, guidance=scale)
        endpoint = sample_batched(teacher, noise, "dpm++2m", 32, cond=labels)
        t2 = min(rmse(sample_batched(teacher, noise, s, 2, cond=labels), endpoint) for s in ("euler", "dpm++2m",
                                                                                              "ipndm", "heun"))
        student_model.guidance_scale = scale
        s2 = rmse(sample_batched(student_model, noise, summary["sampling"]["solver"], 2, cond=labels,
                                 grid=summary["sampling"]["grid"]), endpoint)
        print(f"guided 2-step student at g={scale}: RMSE {s2:.4f} against the teacher's best 2-NFE {t2:.4f}")
        assert s2 < 0.75 * t2, (scale, s2, t2)  # observed 0.130 / 0.202 (g = 2), 0.114 / 0.293 (g = 3.5)


@pytest.mark.slow
def test_lcm_lora_changes_only_adapted_layers_and_distils_its_one_scale(class_teacher):
    """LCM-LoRA (Luo et al.): one guidance scale distilled through LoRA adapters (no guidance input), merged into the
    teacher's weights: same keys, only the adapted layers change, and the 2-step student is closer to the teacher's
    guided samples at that scale than to its unguided ones."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from accelkit.teacher import Condition

    root, file, couple = class_teacher
    targets = ["inp", "blocks.0.1", "blocks.0.3", "blocks.1.1", "blocks.1.3", "out.1"]
    out = run_consistency(ConsistencyRecipe(source=str(couple), method="lcm", guidance=3.0, batch_size=256,
                                            device="cpu",
                                            loop={"steps": 300, "lr": 3e-3, "warmup_steps": 20, "checkpoint_every": 0,
                                                  "lora": {"rank": 8, "target_modules": targets}}), root / "lcm-lora")
    a = load_file(file)
    b = {k: v for k, v in load_file(out / "teacher.safetensors").items() if not k.startswith("accelkit.null")}
    assert a.keys() == b.keys()
    adapted = {f"{m}.weight" for m in targets}
    for k in a:
        assert torch.equal(a[k], b[k]) == (k not in adapted), k
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    cond = Condition(class_labels=torch.arange(1000) % 2)
    x = sample_batched(load_teacher(out), noise, "consistency", 2, cond=cond)
    guided = sample_batched(load_teacher(file, guidance=3.0), noise, "dpm++2m", 32, cond=cond)
    plain = sample_batched(load_teacher(file), noise, "dpm++2m", 32, cond=cond)
    to_guided, to_plain = sliced_wasserstein(x, guided), sliced_wasserstein(x, plain)
    print(f"lcm-lora g=3: SW2 to the guided teacher {to_guided:.3f}, to the unguided {to_plain:.3f}")
    assert to_guided < 0.7 * to_plain, (to_guided, to_plain)


@pytest.mark.slow
def test_lcm_kill9_then_same_command_equals_uninterrupted(class_teacher, tmp_path):
    """LCM with the guidance input: the EMA target and the guidance embedding resume bit for bit."""
    couple = class_teacher[2]
    args = ["consistency", "--method", "lcm", "--guidance-range", "1,4", *TINY]
    full = run_cli(*args[:1], couple, *args[1:], "-o", tmp_path / "full", env=ONE_THREAD)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    kill9_during([*args[:1], couple, *args[1:], "-o", out], out / "checkpoint" / "latest.json")
    resumed = run_cli(*args[:1], couple, *args[1:], "-o", out, env=ONE_THREAD)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert_same_tensors(tmp_path / "full" / "teacher.safetensors", out / "teacher.safetensors", "lcm after kill -9")


@pytest.mark.slow
def test_export_keeps_the_one_step_sampler_and_refuses_a_re_noising_one(toy, cli, tmp_path):
    """A 1-step consistency student exports as one file whose recorded sampler reproduces accelkit's samples; the
    re-noising multistep sampler has no fixed linear form, so exporting it at 2 NFE is a one-line error."""
    from safetensors.torch import load_file

    out = student(toy, "cd")
    r = cli("export", out, "-o", tmp_path / "s.safetensors", "--format", "safetensors", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    a = cli("sample", out, "-n", "16", "-o", tmp_path / "a.safetensors", env=ONE_THREAD)
    b = cli("sample", tmp_path / "s.safetensors", "-n", "16", "-o", tmp_path / "b.safetensors", env=ONE_THREAD)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert torch.allclose(load_file(tmp_path / "a.safetensors")["samples"],
                          load_file(tmp_path / "b.safetensors")["samples"], atol=1e-6)
    r = cli("export", out, "-o", tmp_path / "t.safetensors", "--format", "safetensors", "--nfe", "2", env=ONE_THREAD)
    assert r.returncode == 2 and "no fixed linear form" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.slow
def test_ect_in_bf16_stays_finite_and_beats_the_teacher_at_1_nfe(toy):
    """ECT's fp16 runs go NaN (locuslab/ect#12); bf16 autocast trains with finite losses and a useful student."""
    out = run_consistency(ConsistencyRecipe(source=str(toy["train"]), data="moons", data_size=20000, method="ect",
                                            stage_steps=250, batch_size=256, device="cpu",
                                            loop={"steps": 300, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 0,
                                                  "precision": "bf16"}), toy["root"] / "ect-bf16")
    losses = [e["loss"] for e in json.loads((out / "history.json").read_text())]
    assert losses and all(math.isfinite(v) for v in losses)
    x = solve(load_teacher(out), toy["noise"], solver="tcd", nfe=1)
    s = sliced_wasserstein(x, toy["data"])
    assert s < 0.6 * toy["best"][1], (s, toy["best"][1])  # observed 0.29 against 1.15


@pytest.mark.slow
def test_lcm_lora_exports_as_a_lora_file_that_samples_like_the_student(class_teacher, cli, tmp_path):
    """The LCM-LoRA student as a LoRA file (accelkit/export/lora.py: the factors of its difference to the teacher):
    `accelkit sample FILE` adds them to the base and samples with the recorded sampler, as the student does."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    root, file, couple = class_teacher
    out = root / "lcm-lora"
    if not (out / "teacher.safetensors").exists():
        pytest.skip("needs the LCM-LoRA student of test_lcm_lora_changes_only_adapted_layers_and_distils_its_scale")
    r = cli("export", out, "-o", tmp_path / "lcm.safetensors", "--format", "lora", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    a = cli("sample", out, "-n", "32", "--label", "0", "-o", tmp_path / "a.safetensors", env=ONE_THREAD)
    b = cli("sample", tmp_path / "lcm.safetensors", "-n", "32", "--label", "0", "-o", tmp_path / "b.safetensors",
            env=ONE_THREAD)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    x, y = load_file(tmp_path / "a.safetensors")["samples"], load_file(tmp_path / "b.safetensors")["samples"]
    assert float((x - y).norm() / x.norm()) < 1e-5


@pytest.mark.slow
def test_pcm_adversarial_term_trains_stably_and_does_not_hurt(toy):
    """PCM with its adversarial term (heads on the frozen teacher's features, hinge loss, two parameter groups of one
    Trainer; real side: the couplings' samples noised to s', each side with its own noise): every loss finite, the
    heads' accuracy on a held-out batch (2048 per side, real: fresh teacher samples) recorded every 10 steps and
    never saturated (below 0.95), and the 2-phase student no worse than the same run without the term (observed SW2
    0.109 with it, 0.131 without). The held-out accuracy stays at 0.48-0.52: the student's noised jumps and the
    teacher's marginal at s' are too close for the heads (with the target side, or one shared noise, as before:
    0.49-0.51), so "strictly above 0.5" does not hold on this 2-D teacher (docs/score_distill.md)."""
    out = run_consistency(ConsistencyRecipe(source=str(toy["couple"]), method="pcm", phases=2, adversarial_weight=0.1,
                                            adversarial_real="data", disc={"lr": 1e-3}, batch_size=256, device="cpu",
                                            loop={"steps": 300, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 0,
                                                  "log_every": 10, "validate_every": 10}), toy["root"] / "pcm2-adv")
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    history = json.loads((out / "history.json").read_text())
    for key in ("discriminator/loss", "student/loss", "student/adv_loss"):
        assert all(math.isfinite(h[key]) for h in history if key in h), key
    adversarial = summary["adversarial"]
    assert adversarial["real_side"] == "data" and adversarial["disc_held_out"]["samples_per_side"] == 2048
    accs = adversarial["disc_accuracy_through_run"]
    assert len(accs) == 30 and max(accs) < 0.95, accs
    train_accs = adversarial["disc_train_batch_accuracy_through_run"]
    assert max(train_accs) < 0.95, train_accs
    model = load_teacher(out)
    with_adv = sliced_wasserstein(sample_batched(model, toy["noise"], "euler", 2, grid=summary["sampling"]["grid"]),
                                  toy["data"])
    without = sw_recorded(toy, "pcm2", 2)
    print(f"pcm 2 phases: SW2 {with_adv:.3f} with the adversarial term, {without:.3f} without; heads' held-out "
          f"accuracy {min(accs):.3f}..{max(accs):.3f}")
    assert with_adv < 1.1 * without, (with_adv, without)
