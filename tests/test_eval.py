"""accelkit eval: known inputs give known numbers (Frechet distance in closed form, RMSE 0 against the teacher's own
couplings, zero straightness for a straight field), --json on stdout only, bad inputs one line and exit 2."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_couple import mlp_teacher, unet_teacher

from accelkit.evaluation import evaluate, sample_with_straightness
from accelkit.metrics import feature_statistics, frechet_distance, sliced_wasserstein
from accelkit.models.analytic import gaussian_mixture_2d
from accelkit.schedules import LinearSchedule
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.teacher import Teacher, broadcast_to

# ------------------------------------------------------------------------------------------- distances, closed form


def random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_identical_sample_sets_are_at_distance_zero():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sliced_wasserstein(x, x.clone()) == 0.0
    mu, cov = feature_statistics(x)
    assert abs(frechet_distance(mu, cov, *feature_statistics(x.clone()))) < 1e-10
    assert frechet_distance(mu, cov, *feature_statistics(x + 0.5)) == pytest.approx(6 * 0.25, rel=1e-9)


def test_frechet_distance_of_a_shifted_gaussian_is_the_squared_shift():
    cov = random_spd(5, 1)
    mu = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5], dtype=torch.float64)
    assert frechet_distance(mu, cov, mu + d, cov) == pytest.approx(float(d @ d), rel=1e-9, abs=1e-9)


def test_frechet_distance_of_diagonal_covariances_matches_the_closed_form():
    a = torch.tensor([0.5, 1.0, 4.0, 9.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 1.0, 0.25], dtype=torch.float64)
    mu1, mu2 = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0.0, -2.0, 0.0], dtype=torch.float64)
    expected = float((mu1 - mu2) @ (mu1 - mu2) + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_general_covariances_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    c1, c2 = random_spd(6, 3), random_spd(6, 4)
    cross = float(sqrtm((c1 @ c2).numpy()).real.trace())
    expected = float(torch.trace(c1) + torch.trace(c2)) - 2 * cross
    z = torch.zeros(6, dtype=torch.float64)
    assert frechet_distance(z, c1, z, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(z, c1, z, c2) == pytest.approx(frechet_distance(z, c2, z, c1), rel=1e-8)


# ------------------------------------------------------------------------------------------------------ straightness


class StraightTeacher(Teacher):
    """Data = one point ``mu`` under the linear schedule: x0_hat = mu everywhere, so every ODE path is the straight
    line from its noise to mu, travelled at constant speed (Liu et al.'s straightness is exactly 0)."""

    def __init__(self):
        super().__init__()
        self.schedule = LinearSchedule()
        self.sample_shape = (2,)
        self.mu = torch.tensor([1.5, -0.5], dtype=torch.float64)

    def denoise(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        a, s = broadcast_to(self.schedule.alpha(t), x), broadcast_to(self.schedule.sigma(t), x)
        x0 = self.mu.to(x.dtype).expand_as(x)
        return x0, (x - a * x0) / s


@pytest.mark.parametrize("solver,nfe", [("euler", 4), ("heun", 6), ("dpm++2m", 5), ("euler", 1)])
def test_a_straight_field_has_zero_straightness(solver, nfe):
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, s = sample_with_straightness(StraightTeacher(), noise, solver, nfe, batch_size=20)
    assert torch.allclose(x, torch.tensor([1.5, -0.5], dtype=torch.float64).expand_as(x), atol=1e-9)
    assert 0.0 <= s < 1e-18


def test_a_curved_field_has_positive_straightness_that_batches_do_not_change():
    teacher = gaussian_mixture_2d(LinearSchedule())
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, s = sample_with_straightness(teacher, noise, "euler", 16, batch_size=128)
    _, s_batched = sample_with_straightness(teacher, noise, "euler", 16, batch_size=30)
    assert s > 1e-3
    assert s_batched == pytest.approx(s, rel=1e-12)
    rows = evaluate(teacher, noise, noise, ["euler"], [16], straightness=True)
    assert rows[0].straightness == pytest.approx(s, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    teacher = mlp_teacher(root / "mlp.safetensors")
    couplings = run_couple(CoupleRecipe(teacher=str(teacher), n=64, solver="heun", nfe=40, micro_batch=16,
                                        shard_size=32), output=root / "couple")
    return root, teacher, Path(couplings)


def json_rows(proc):
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # nothing but the JSON on stdout
    return json.loads(lines[0])


def test_eval_against_own_couplings_is_exact_and_euler_converges(setup, tmp_path):
    root, teacher, couplings = setup
    plot = tmp_path / "q.png"
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(teacher.read_bytes())
    rows = json_rows(run_cli("eval", teacher, copy, teacher, "--reference", couplings, "--solver", "heun,euler",
                             "--nfe", "40,1,2,4,8", "-n", "48", "--batch-size", "16", "--data", "moons", "--json",
                             "--plot", plot))
    heun = {r["nfe"]: r for r in rows if r["solver"] == "heun"}
    assert heun[40]["rmse"] < 1e-6 and (heun[40]["psnr"] is None or heun[40]["psnr"] > 100)
    euler = [next(r["rmse"] for r in rows if r["solver"] == "euler" and r["nfe"] == k) for k in (1, 2, 4, 8)]
    assert euler[0] > euler[1] > euler[2] > euler[3] > 0
    assert len(rows) == 2 * 2 * 5  # 2 models (a repeated path counts once) x 2 solvers x 5 NFEs
    first, second = rows[:10], rows[10:]
    assert [r["rmse"] for r in first] == [r["rmse"] for r in second]  # the same noise for every model
    assert all(r["sliced_w2"] > 0 and r["mmd2"] is not None and r["frechet"] is None for r in rows)
    assert all(r["straightness"] >= 0 and r["samples_per_s"] > 0 for r in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_without_reference_uses_the_first_model_solved_accurately(setup):
    root, teacher, couplings = setup
    proc = run_cli("eval", teacher, "--solver", "euler", "--nfe", "2", "-n", "16", "--reference-nfe", "40",
                   "--seed", "0", "--json")
    row = json_rows(proc)[0]
    assert "mlp.safetensorssolvedwithheunat40NFE" in "".join(proc.stderr.split())  # the title may wrap anywhere
    # the couplings were drawn from noise (seed 0, i) too, with heun at 40 NFE: the same reference
    with_ref = json_rows(run_cli("eval", teacher, "--solver", "euler", "--nfe", "2", "-n", "16", "--reference",
                                 couplings, "--json"))[0]
    assert row["rmse"] == pytest.approx(with_ref["rmse"], rel=1e-5)


def test_image_frechet_distance_on_pixels_equals_an_identity_feature_network(tmp_path):
    teacher = unet_teacher(tmp_path / "unet.safetensors")
    ident = torch.jit.script(torch.nn.Flatten())
    ident.save(str(tmp_path / "flat.pt"))
    args = ("eval", teacher, "--solver", "euler", "--nfe", "1", "-n", "24", "--reference-nfe", "2", "--data",
            "digits", "--json")
    pixels = json_rows(run_cli(*args, "--features", "pixels"))[0]
    feats = json_rows(run_cli(*args, "--features", tmp_path / "flat.pt"))[0]
    assert pixels["frechet"] > 0 and pixels["sliced_w2"] is None
    assert feats["frechet"] == pytest.approx(pixels["frechet"], rel=1e-6)
    # on digits the default is the shipped digits classifier's features, a different (and smaller-scale) distance
    default, builtin = (json_rows(run_cli(*args, *extra))[0] for extra in ((), ("--features", "builtin:digits")))
    assert default["frechet"] == builtin["frechet"] and default["frechet"] != pytest.approx(pixels["frechet"])


def run_in_process(args, monkeypatch, capsys):
    """The console-script entry in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from accelkit.cli.main import run

    monkeypatch.setattr("sys.argv", ["accelkit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        run()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_bad_inputs_are_one_line_errors(setup, tmp_path, monkeypatch, capsys):
    root, teacher, couplings = setup
    (tmp_path / "notes.txt").write_text("hello")
    unet = unet_teacher(tmp_path / "unet.safetensors")
    cases = [
        (("eval", teacher, "--solver", "rk99"), "rk99"),
        (("eval", teacher, "--nfe", "1,x"), "--nfe"),
        (("eval", teacher, "--nfe", "0"), "--nfe"),
        (("eval", tmp_path / "notes.txt"), "notes.txt"),
        (("eval", couplings), "couple"),
        (("eval", teacher, "--reference", teacher), "--reference"),
        (("eval", unet, "--reference", couplings, "-n", "4"), "shape"),
        (("eval", teacher, "--reference", couplings, "-n", "1000"), "64"),
        (("eval", teacher, "--features", tmp_path / "notes.txt", "-n", "4"), "TorchScript"),
        (("eval", teacher, "--data", "digits", "-n", "4"), "shape"),
    ]
    for k, (args, needle) in enumerate(cases):
        if k < 2:  # the real command line, as a user runs it
            proc = run_cli(*args)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        else:
            code, out, err = run_in_process(args, monkeypatch, capsys)
        assert code == 2, (args, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, err)
        assert "Traceback" not in err


def test_class_conditional_couplings_pass_their_labels(tmp_path, monkeypatch, capsys):
    teacher = unet_teacher(tmp_path / "unet.safetensors", num_classes=3)
    (tmp_path / "labels.json").write_text("[2, 0, 1]")
    couplings = run_couple(CoupleRecipe(teacher=str(teacher), n=8, solver="euler", nfe=3, micro_batch=4,
                                        shard_size=8, conditions=str(tmp_path / "labels.json")),
                           output=tmp_path / "couple")
    code, out, err = run_in_process(("eval", teacher, "--reference", couplings, "-n", "8", "--nfe", "3",
                                     "--solver", "euler", "--batch-size", "4", "--json"), monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)[0]["rmse"] < 1e-5  # the endpoints of labels 2, 0, 1, 2, ...: the same labels were used


def test_distances_default_to_the_data_set_of_a_train_artifact(tmp_path, monkeypatch, capsys):
    from accelkit.stages.train import TrainRecipe, run_train
    from accelkit.training import LoopConfig

    train = run_train(TrainRecipe(data="rings", data_size=256, batch_size=64, eval_samples=0, device="cpu",
                                  loop=LoopConfig(steps=5, lr=1e-3, checkpoint_every=5)), output=tmp_path / "train")
    code, out, err = run_in_process(("eval", train, "-n", "32", "--nfe", "2", "--solver", "euler",
                                     "--reference-nfe", "4", "--json"), monkeypatch, capsys)
    assert code == 0, err
    assert "SW2, MMD² to rings" in " ".join(err.split())
    from accelkit.data import load_dataset
    from accelkit.evaluation import sample_batched
    from accelkit.models.loading import load_teacher
    from accelkit.noise import sample_noise

    x = sample_batched(load_teacher(train), sample_noise(0, range(32), (2,)), "euler", 2)
    data = load_dataset("rings", size=32, seed=0).samples
    assert json.loads(out)[0]["sliced_w2"] == pytest.approx(sliced_wasserstein(x, data), rel=1e-5)


def test_model_path_from_stdin_and_n_defaults_to_the_couplings_size(setup):
    root, teacher, couplings = setup
    rows = json_rows(run_cli("eval", "--reference", couplings, "--nfe", "40", "--solver", "heun", "--batch-size",
                             "16", "--json", input=f"{teacher}\n"))
    assert len(rows) == 1 and rows[0]["rmse"] < 1e-6
    code = run_cli("eval", teacher, "--reference", couplings, "--nfe", "1", "--solver", "euler", "--json")
    assert code.returncode == 0, code.stderr
    assert "n = 64" in code.stderr


def test_a_model_that_records_its_sampler_is_evaluated_with_it(setup, tmp_path):
    """Without --solver, a student's recorded sampler (summary.sampling) is its row's solver, the teacher beside it
    keeps euler / dpm++2m; --solver wins over the record."""
    from accelkit.artifacts import Artifact
    from accelkit.models.loading import load_teacher, save_teacher

    root, teacher, couplings = setup
    with Artifact.open(tmp_path / "student", "reflow", {"what": "a stand-in student"}) as art:
        art.write_with("teacher.safetensors", lambda tmp: save_teacher(load_teacher(teacher), tmp))
        art.complete({"sampling": {"solver": "heun", "nfe": 4, "grid": None}})
    rows = json_rows(run_cli("eval", teacher, tmp_path / "student", "--reference", couplings, "--nfe", "2,4",
                             "-n", "16", "--json"))
    by_model = {}
    for r in rows:
        by_model.setdefault(r["method"], set()).add(r["solver"])
    assert by_model == {str(teacher): {"euler", "dpm++2m"}, str(tmp_path / "student"): {"heun"}}
    forced = json_rows(run_cli("eval", tmp_path / "student", "--reference", couplings, "--nfe", "2", "-n", "16",
                               "--solver", "euler", "--json"))
    assert [r["solver"] for r in forced] == ["euler"]
