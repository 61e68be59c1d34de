"""`accelkit score-distill` (vsd, dmd, dmd2, sim) and `accelkit adversarial` (ladd): exact-gradient ground truth on
the analytic mixture, 1-step generators as good as the teacher's full ODE on an 8-mode ring, mode coverage, the
recorded K-step sampler, exact kill -9 resume of the two-time-scale run, an informative discriminator, bad input."""

import json
import math

import pytest
import torch
from conftest import assert_same_tensors, kill9_during, run_cli

from accelkit.data import load_dataset
from accelkit.evaluation import sample_batched
from accelkit.generator import generate, generator_times
from accelkit.metrics import sliced_wasserstein
from accelkit.models.analytic import GaussianMixtureTeacher, gaussian_mixture_2d
from accelkit.models.loading import load_teacher
from accelkit.schedules import schedule_from_name
from accelkit.score_distill import distribution_matching_loss, sim_loss
from accelkit.solvers import solve
from accelkit.stages.adversarial import AdversarialRecipe, run_adversarial
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.stages.score_distill import ScoreDistillRecipe, run_score_distill
from accelkit.stages.train import TrainRecipe, run_train

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SOLVERS = ("euler", "dpm++2m", "ipndm", "unipc")
MODES = 8


# ------------------------------------------------------------------------------------------ exact ground truth


def analytic_setup(n=512):
    schedule = schedule_from_name("linear")
    teacher = gaussian_mixture_2d(schedule)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    exact = solve(teacher, teacher.prior_sample(z), solver="dpm++2m", nfe=64)  # the teacher's ODE map of z
    t = 0.02 + 0.96 * torch.rand(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return schedule, teacher, exact, t, eps


LOSSES = {
    "dmd": lambda x, t, e, real, fake: distribution_matching_loss(x, t, e, real, fake)[0],
    "sim": lambda x, t, e, real, fake: sim_loss(x, t, e, real, fake)[0],
    "sim-l2": lambda x, t, e, real, fake: sim_loss(x, t, e, real, fake, distance="l2")[0],
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_gradient_vanishes_at_the_exact_map_and_points_back_for_a_shift(loss):
    schedule, teacher, exact, t, eps = analytic_setup()
    x = exact.clone().requires_grad_(True)
    LOSSES[loss](x, t, eps, teacher, teacher).backward()  # fake score = the exact score of G's law = the teacher's
    assert float(x.grad.abs().max()) < 1e-12
    shift = torch.tensor([0.4, -0.3], dtype=torch.float64)
    shifted_law = GaussianMixtureTeacher(teacher.means + shift, teacher.variances, None, schedule)
    x = (exact + shift).requires_grad_(True)
    LOSSES[loss](x, t, eps, teacher, shifted_law).backward()
    descent = -x.grad.sum(0)
    assert float(descent @ shift) < 0, (descent, shift)  # gradient descent moves G's samples back against the shift
    cos = float(descent @ -shift / (descent.norm() * shift.norm()))
    assert cos > 0.8, cos


def test_backward_simulation_runs_the_generators_own_steps():
    schedule, teacher, _, _, _ = analytic_setup()
    times = generator_times(schedule, 4)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = generate(teacher, z, times)
    assert torch.allclose(full, solve(teacher, teacher.prior_sample(z), "euler", 4, grid=times), atol=1e-10)
    stop = torch.arange(64) % 4
    mixed = generate(teacher, z, times, stop=stop)
    for k in range(4):  # row i stops at its step k_i: the x0 prediction at the generator's own state there
        x = teacher.prior_sample(z[stop == k])
        if k:
            x = solve(teacher, x, "euler", k, grid=times[: k + 1])
        assert torch.allclose(mixed[stop == k], teacher.predict_x0(x, times[k]), atol=1e-10)


# ----------------------------------------------------------------------------------------- trained generators


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """A small MLP flow teacher on the 8-mode ring (trained here) and 2048 couplings of its ODE."""
    root = tmp_path_factory.mktemp("ring")
    train = run_train(TrainRecipe(data="gaussian-mixture", objective="flow", batch_size=256,
                                  network={"hidden": 64, "depth": 2}, eval_samples=0, device="cpu",
                                  loop={"steps": 600, "lr": 3e-3, "warmup_steps": 20, "lr_schedule": "cosine",
                                        "checkpoint_every": 0}), root / "train")
    couple = run_couple(CoupleRecipe(teacher=str(train), n=2048, solver="dpm++2m", nfe=16, micro_batch=1024,
                                     shard_size=2048, batch_size=2048), root / "couple")
    data = load_dataset("gaussian-mixture", 2000, seed=11).samples
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    teacher = load_teacher(train)
    ode = sliced_wasserstein(sample_batched(teacher, noise, "dpm++2m", 32), data)
    one = min(sliced_wasserstein(sample_batched(teacher, noise, s, 1), data) for s in SOLVERS)
    return {"root": root, "train": train, "couple": couple, "data": data, "noise": noise, "ode": ode, "one": one}


def coverage(x: torch.Tensor) -> float:
    """The share of the ring's modes holding at least half their fair share of the samples."""
    ang = torch.arange(MODES, dtype=torch.float32) * (2 * math.pi / MODES)
    centres = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    nearest = torch.cdist(x.float(), centres).argmin(1)
    counts = torch.bincount(nearest, minlength=MODES).float()
    return float((counts >= 0.5 * len(x) / MODES).float().mean())


FAST_FAKE = {"fake_score": {"lr": 5e-3}}
RUNS = {
    "dmd2": dict(method="dmd2", ratio=5, steps_=500, **FAST_FAKE),
    # dmd2's GAN heads on the fake score's features, judging against the ring's data (as ladd's below)
    "dmd2-gan": dict(method="dmd2", ratio=5, steps_=500, gan_weight=3e-3, gan_weight_fake=0.1, data="gaussian-mixture",
                     discriminator={"logit_mean": -2.0, "logit_std": 2.0, "width": 256, "depth": 3, "held_out": 8192},
                     **FAST_FAKE),
    "dmd": dict(method="dmd", steps_=250, **FAST_FAKE),
    "dmd-no-regression": dict(method="dmd", regression_weight=0.0, steps_=250, **FAST_FAKE),
    "vsd": dict(method="vsd", ratio=2, steps_=300, **FAST_FAKE),  # LoRA rank 8: one update per generator's lags
    "sim": dict(method="sim", steps_=250, **FAST_FAKE),
    # real side: the data set. Heads of depth 3 (one hidden layer cannot draw the boundary on a small MLP's 2-D
    # features), noise levels t = sigmoid(-2 + 2 n) (both near-clean and blurred inputs; LADD's m = 1 is for
    # high-resolution latents), two time scales (5 head updates per generator update, heads' lr 2e-3, generator's
    # 3e-4): docs/score_distill.md, "What the held-out accuracy against the generator shows"
    "ladd": dict(method="ladd", steps_=500, data="gaussian-mixture", ratio=5, generator={"lr": 3e-4},
                 disc={"lr": 2e-3}, discriminator={"logit_mean": -2.0, "logit_std": 2.0, "width": 256, "depth": 3,
                                                   "held_out": 8192}),
}


def train_generator(ring, name):
    kw = dict(RUNS[name])
    steps = kw.pop("steps_")
    loop = {"steps": steps, "lr": 1e-3, "checkpoint_every": 0, "ema_rates": [0.99], "log_every": 10}
    if kw["method"] == "ladd":
        loop.update(betas=[0.0, 0.99], validate_every=20)
        return run_adversarial(AdversarialRecipe(source=str(ring["train"]), batch_size=256, device="cpu", loop=loop,
                                                 **kw), ring["root"] / name)
    if "data" in kw:
        loop.update(validate_every=20)
    return run_score_distill(ScoreDistillRecipe(source=str(ring["train" if "data" in kw else "couple"]),
                                                batch_size=256, device="cpu", loop=loop, **kw), ring["root"] / name)


def has_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


@pytest.fixture(scope="module")
def generators(ring):
    out = {name: train_generator(ring, name) for name in RUNS if name != "vsd" or has_peft()}
    quality = {}
    for name, path in out.items():
        summary = json.loads((path / "manifest.json").read_text())["summary"]
        rec = summary["sampling"]
        x = sample_batched(load_teacher(path), ring["noise"], rec["solver"], rec["nfe"])
        quality[name] = (sliced_wasserstein(x, ring["data"]), coverage(x), summary)
    print({k: (round(v[0], 4), v[1]) for k, v in quality.items()}, "teacher ODE", ring["ode"], "1 NFE", ring["one"])
    return out, quality


@pytest.mark.parametrize("name", ["dmd2", "dmd2-gan", "dmd", "vsd", "sim", "ladd"])
def test_one_step_generator_matches_the_teachers_ode_and_covers_the_modes(generators, ring, name):
    if name == "vsd" and not has_peft():
        pytest.skip("vsd's LoRA fake score needs peft")
    sw, cov, summary = generators[1][name]
    # observed (2-core VM): every method 0.15-0.19 against the teacher's ODE 0.16 and its best 1-NFE solver 1.3
    assert sw < 1.5 * ring["ode"], (name, sw, ring["ode"])
    assert sw < 0.3 * ring["one"], (name, sw, ring["one"])
    assert cov >= 7 / 8, (name, cov)
    assert summary["sampling"] == {"solver": "euler", "nfe": 1, "grid": [1.0, 0.0]}
    assert summary["generator_steps"] == 1


def test_regression_loss_and_coverage_are_reported(generators):
    with_reg, without = generators[1]["dmd"], generators[1]["dmd-no-regression"]
    print(f"dmd coverage with regression {with_reg[1]}, without {without[1]} (SW2 {with_reg[0]:.3f} / "
          f"{without[0]:.3f})")
    assert with_reg[2]["regression_weight"] == 0.25 and without[2]["regression_weight"] == 0.0
    assert with_reg[1] >= 7 / 8


def test_update_counts_follow_the_ratio(generators):
    s = generators[1]["dmd2"][2]
    assert s["updates"] == {"fake_score": 500, "generator": 100} and s["ratio"] == 5


def test_discriminator_is_informative_and_not_saturated(generators):
    """Through the run (every 20 steps), on a held-out batch of 8192 samples per side (real: fresh draws of the ring,
    never in a training batch; +-0.004 at chance): the heads tell real samples from the generator they train
    strictly between 0.5 and 0.95 (informative, not saturated) and from the teacher's own 1-step samples strictly
    between 0.55 and 0.95. Observed with recipe seeds 0 / 1 / 2: against the generator 0.520..0.895 /
    0.505..0.899 / 0.522..0.906 (high while the generator is still the teacher's 1-step map, lowest at about step
    200, rising to 0.61-0.68 at the end as the heads resolve the data's narrower modes), against the teacher's 1-step
    samples 0.65..0.92. With the couplings as the real side, heads of depth 1 or one update per generator update,
    the accuracy against the generator sits at 0.47-0.52 after the first 30 steps (docs/score_distill.md)."""
    out = generators[0]["ladd"]
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    against_generator = summary["disc_accuracy_through_run"]
    against_teacher = summary["disc_accuracy_vs_teacher_samples_through_run"]
    assert summary["disc_held_out"]["samples_per_side"] == 8192
    assert summary["disc_held_out"]["real"] == "fresh gaussian-mixture draws", summary["disc_held_out"]
    print(f"held-out accuracy vs the generator {min(against_generator):.3f}..{max(against_generator):.3f}, vs the "
          f"teacher's 1-step samples {min(against_teacher):.3f}..{max(against_teacher):.3f}")
    assert len(against_teacher) == 25 and len(against_generator) == len(against_teacher)
    assert all(0.55 < a < 0.95 for a in against_teacher), against_teacher
    assert all(0.5 < a < 0.95 for a in against_generator), against_generator
    history = json.loads((out / "history.json").read_text())
    assert max(h["discriminator/d_acc"] for h in history if "discriminator/d_acc" in h) < 0.95
    assert all(math.isfinite(v) for h in history for k, v in h.items() if k.endswith("loss"))


def test_dmd2_gan_heads_are_informative_and_not_saturated(generators):
    """dmd2's GAN heads (on the fake score network's features, trained with it; the discriminator loss weighted 0.1
    in the fake score's loss) on the same kind of held-out batch as ladd's (8192 per side, fresh draws of the ring):
    strictly between 0.5 and 0.95 through the run (observed with recipe seeds 0 / 1 / 2: 0.523..0.861 /
    0.503..0.836 / 0.519..0.856; with the discriminator loss weighted 0.01, DMD2's default here, seed 0 touched 0.500,
    and with the couplings as the real side and depth-1 heads 0.486..0.573, 0.50-0.52 after step 20)."""
    summary = json.loads((generators[0]["dmd2-gan"] / "manifest.json").read_text())["summary"]
    accs = summary["disc_accuracy_through_run"]
    assert summary["disc_held_out"] == {"samples_per_side": 8192, "real": "fresh gaussian-mixture draws"}
    print(f"dmd2 GAN heads' held-out accuracy {min(accs):.3f}..{max(accs):.3f}")
    assert len(accs) == 25 and all(0.5 < a < 0.95 for a in accs), accs
    history = json.loads((generators[0]["dmd2-gan"] / "history.json").read_text())
    assert all(math.isfinite(h["fake_score/d_loss"]) for h in history if "fake_score/d_loss" in h)


# ------------------------------------------------------------------------------------------------ CLI, resume


def distill_args(ring, out, steps=30):
    return ["score-distill", ring["couple"], "--method", "dmd2", "--steps", "2", "--ratio", "3", "--train-steps",
            str(steps), "--batch-size", "64", "--lr", "1e-3", "--set", "score_distill.gan_weight=3e-3",
            "--set", "score_distill.loop.checkpoint_every=4", "--set", "score_distill.loop.ema_rates=[0.9]",
            "--set", "score_distill.loop.checkpoint_interval_s=0", "-o", out]


@pytest.mark.slow
def test_kill9_resume_of_the_two_time_scale_gan_run_is_exact(ring, tmp_path):
    """Generator every 3rd step, fake score + GAN heads every step, checkpoints every 4 steps (so between generator
    updates): kill -9 at a random moment and resume gives the uninterrupted run's generator bit for bit, and the same
    per-step losses of every network."""
    full = tmp_path / "full"
    r = run_cli(*distill_args(ring, full), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(full)
    killed = tmp_path / "killed"
    kill9_during(distill_args(ring, killed), killed / "checkpoint" / "latest.json", max_delay=1.0, env=ONE_THREAD)
    r = run_cli(*distill_args(ring, killed), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert_same_tensors(full / "teacher.safetensors", killed / "teacher.safetensors", "after kill -9 and resume")
    h_full, h_killed = (json.loads((p / "history.json").read_text()) for p in (full, killed))
    assert h_full == h_killed and any("fake_score/d_loss" in h for h in h_full)
    summary = json.loads((full / "manifest.json").read_text())["summary"]
    assert summary["updates"] == {"fake_score": 30, "generator": 10}
    # the 2-step generator's sampler is recorded and `accelkit sample` takes it without flags
    assert summary["sampling"] == {"solver": "euler", "nfe": 2, "grid": [1.0, 0.5, 0.0]}
    r = run_cli("sample", full, "-n", "16", "--seed", "4", "-o", tmp_path / "s.safetensors", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    from accelkit.noise import sample_noise

    got = next(iter(load_file(tmp_path / "s.safetensors").values()))
    student = load_teacher(full)
    want = solve(student, student.prior_sample(sample_noise(4, list(range(16)), (2,))), "euler", 2,
                 grid=[1.0, 0.5, 0.0])
    assert torch.allclose(got, want, atol=1e-5)


def test_bad_input_is_one_line_exit_2_nothing_written(ring, tmp_path):
    out = tmp_path / "out"
    r = run_cli("score-distill", ring["couple"], "--method", "dmd2", "--ratio", "0", "-o", out, env=ONE_THREAD)
    assert r.returncode == 2, r.stderr
    assert "ratio" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags,sets,match", [
    ({"method": "vsd"}, ["score_distill.gan_weight=0.01"], "only dmd2 has a GAN term"),
    ({"method": "dmd2", "steps": 0}, [], "steps"),
    ({"method": "sim"}, ["score_distill.regression_weight=0.5"], "only dmd has the regression loss"),
    ({"method": "dmd2"}, ["score_distill.t_min=0.9", "score_distill.t_max=0.5"], "t_min 0.9 must be below"),
])
def test_bad_recipe_values_are_clear_errors(ring, flags, sets, match):
    from accelkit.errors import AccelkitError
    from accelkit.recipes import resolve_stage

    with pytest.raises(AccelkitError, match=match) as info:
        resolve_stage("score_distill", None, {"source": str(ring["couple"]), **flags}, sets)
    assert "\n" not in str(info.value)


def test_sources_that_cannot_serve_the_method_are_refused(ring, tmp_path):
    from accelkit.errors import AccelkitError

    out = tmp_path / "out"
    with pytest.raises(AccelkitError, match="regresses on couplings pairs"):
        run_score_distill(ScoreDistillRecipe(source=str(ring["train"]), method="dmd", device="cpu"), out)
    with pytest.raises(AccelkitError, match="needs real samples"):
        run_adversarial(AdversarialRecipe(source=str(ring["train"]), device="cpu"), out)
    assert not out.exists()


@pytest.mark.slow
def test_steps_the_discrete_grid_cannot_take(tmp_path):
    from tiny_models import ddpm_pipeline

    from accelkit.errors import AccelkitError

    pipe = ddpm_pipeline(tmp_path / "ddpm")
    out = tmp_path / "out"
    with pytest.raises(AccelkitError, match="--steps 1001: the generator's time grid cannot take it"):
        run_score_distill(ScoreDistillRecipe(source=str(pipe), method="dmd2", steps=1001, device="cpu"), out)
    assert not out.exists()


def test_a_teacher_alone_is_a_source_and_noise_batches_resume_exactly(ring, tmp_path):
    """Score distillation needs no data: from the teacher alone the batches are seeded draws (NoiseBatches), whose
    state is a counter, so a restored iterator continues with the same draws."""
    from accelkit.stages.student import NoiseBatches

    out = run_score_distill(ScoreDistillRecipe(source=str(ring["train"]), method="sim", batch_size=64, device="cpu",
                                               loop={"steps": 12, "lr": 1e-3, "checkpoint_every": 0}), tmp_path / "a")
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["updates"] == {"fake_score": 12, "generator": 12} and summary["sampling"]["nfe"] == 1

    def draw(g, n):
        return {"z": torch.randn(n, 2, generator=g)}

    a = NoiseBatches(8, 3, 0, 1, draw)
    first = [next(a)["z"] for _ in range(5)]
    b = NoiseBatches(8, 3, 0, 1, draw)
    b.load_state_dict(json.loads(json.dumps({"batches": 2})))
    assert all(torch.equal(next(b)["z"], want) for want in first[2:])
    halves = [next(NoiseBatches(8, 3, r, 2, draw))["z"] for r in range(2)]
    assert torch.equal(torch.cat(halves), first[0])  # two ranks' slices are the one-process batch
