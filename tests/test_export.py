"""`accelkit export`: a teacher, a rescaled teacher and a reflow student, exported as a diffusers folder and as one
.safetensors file, sample with plain diffusers (from_pretrained + a plain loop, and DDPMPipeline) exactly as accelkit
samples them; the single file's header reads back; outputs are never overwritten without --force."""

import hashlib
import importlib
import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import run_in_process
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel
from safetensors.torch import load_file
from tiny_models import ddpm_pipeline, tiny_unet2d, write_pipeline

from accelkit.errors import AccelkitError
from accelkit.evaluation import sample_batched
from accelkit.export.exporter import export
from accelkit.models.loading import load_teacher, read_safetensors_metadata
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.stages.reflow import ReflowRecipe, run_reflow
from accelkit.stages.rescale import RescaleRecipe, run_rescale
from accelkit.teacher import NetworkTeacher, RescaledTeacher

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NOISE = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def plain_diffusers_samples(folder, noise):
    """What a diffusers user writes: the model and the scheduler from_pretrained, then the usual loop."""
    index = json.loads((folder / "model_index.json").read_text())
    library, name = index["scheduler"]
    scheduler_class = getattr(diffusers if library == "diffusers" else importlib.import_module(library), name)
    scheduler = scheduler_class.from_pretrained(folder / "scheduler")
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    nfe = json.loads((folder / "accelkit_export.json").read_text())["nfe"]
    scheduler.set_timesteps(nfe)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers have neither of these
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scale(x, t), t).sample, t, x).prev_sample
    return x, type(scheduler).__name__


def check_round_trip(source, out_dir, expected_teacher, expected_scheduler, **kw):
    """Export ``source`` both ways; diffusers and the single file reloaded into accelkit sample like the source."""
    folder, sampling = export(source, out_dir / "diffusers", "diffusers", **kw)
    ours = sample_batched(load_teacher(source), NOISE, sampling.solver, sampling.nfe, grid=sampling.grid)
    theirs, scheduler = plain_diffusers_samples(folder, NOISE)
    assert scheduler == expected_scheduler
    assert rel(theirs, ours) < 1e-5, f"diffusers vs accelkit: {rel(theirs, ours):.2e}"
    back = load_teacher(folder)
    assert type(back) is expected_teacher
    assert rel(sample_batched(back, NOISE, sampling.solver, sampling.nfe, grid=sampling.grid), ours) < 1e-6

    file, same = export(source, out_dir / "model.safetensors", "safetensors", **kw)
    assert same == sampling
    meta = read_safetensors_metadata(file)
    assert meta["accelkit.solver"] == sampling.solver and int(meta["accelkit.nfe"]) == sampling.nfe
    assert json.loads(meta["accelkit.grid"]) == sampling.grid
    assert meta["accelkit.scheduler"] == expected_scheduler
    single = load_teacher(file)
    assert type(single) is expected_teacher
    again = sample_batched(single, NOISE, sampling.solver, sampling.nfe, grid=sampling.grid)
    assert torch.equal(again, ours), "the single file samples differently from its source"
    print(f"{source.name}: {sampling.solver} {sampling.nfe} NFE, {expected_scheduler}: max relative difference "
          f"{rel(theirs, ours):.1e}")
    return folder, file, sampling, ours


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    return ddpm_pipeline(tmp_path_factory.mktemp("ddpm") / "teacher")


def test_teacher_exports_with_a_stock_dpm_solver_and_samples_identically(ddpm, tmp_path):
    folder, _, sampling, ours = check_round_trip(ddpm, tmp_path, NetworkTeacher, "DPMSolverMultistepScheduler")
    assert (sampling.solver, sampling.nfe, sampling.origin) == ("dpm++2m", 8, "teacher default")
    assert sampling.grid == [1 - i / 8 for i in range(9)]  # trailing spacing at 8 of 1000 steps: uniform in t
    # the whole pipeline as a user runs it: DDPMPipeline draws randn from the generator, returns x / 2 + 1/2 in [0, 1]
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "DDPMPipeline"
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=8, output_type="np",
                  return_dict=False)[0]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = sample_batched(load_teacher(ddpm), noise, "dpm++2m", 8, grid=sampling.grid)
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - expected).max() < 1e-5


@pytest.mark.parametrize("solver,nfe,scheduler", [("unipc2", 5, "UniPCMultistepScheduler"),
                                                  ("heun", 5, "AccelkitScheduler")])
def test_teacher_with_another_solver(ddpm, tmp_path, solver, nfe, scheduler):
    _, _, sampling, _ = check_round_trip(ddpm, tmp_path, NetworkTeacher, scheduler, solver=solver, nfe=nfe)
    assert sampling.origin == "teacher default with user overrides"


def test_rescaled_teacher_samples_identically_through_accelkit_scheduler(ddpm, tmp_path):
    rescaled = run_rescale(RescaleRecipe(teacher=str(ddpm), to="linear"), tmp_path / "rescale")
    folder, file, sampling, _ = check_round_trip(rescaled, tmp_path, RescaledTeacher, "AccelkitScheduler",
                                                 solver="euler", nfe=6)
    assert sampling.grid_name == "uniform"
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "AccelkitScheduler" and len(config["timesteps"]) == 6
    assert config["sampler"]["schedule"] == {"name": "linear"}
    # the network's timesteps are the source's (fractional) training steps of t(r), not r
    assert config["timesteps"][0] == pytest.approx(999.0) and config["timesteps"][1] != pytest.approx(5 / 6 * 1000)
    # DDPMPipeline calls neither scale_model_input nor init_noise_sigma: the scheduler keeps the network's input
    pipe = DiffusionPipeline.from_pretrained(folder)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=6, output_type="np",
                  return_dict=False)[0]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = sample_batched(load_teacher(rescaled), noise, "euler", 6, grid=sampling.grid)
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - expected).max() < 1e-5
    with pytest.raises(ValueError, match="exported for 6"):
        pipe.scheduler.set_timesteps(50)
    assert json.loads(read_safetensors_metadata(file)["accelkit.schedule"]) == {"name": "linear"}


@pytest.fixture(scope="module")
def flow_student(tmp_path_factory):
    """A tiny rectified-flow student of a tiny diffusers flow-matching UNet: 32 couplings, 3 training steps."""
    root = tmp_path_factory.mktemp("flow")
    unet = tiny_unet2d()
    teacher = write_pipeline(root / "teacher", "DDPMPipeline", "unet", unet, FlowMatchEulerDiscreteScheduler())
    couple = run_couple(CoupleRecipe(teacher=str(teacher), n=32, solver="euler", nfe=4, micro_batch=16,
                                     shard_size=32, batch_size=32), root / "couple")
    return run_reflow(ReflowRecipe(couplings=str(couple), batch_size=16, device="cpu", eval_samples=0,
                                   loop={"steps": 3, "lr": 1e-3, "warmup_steps": 0, "checkpoint_every": 0}),
                      root / "reflow")


def test_reflow_student_exports_with_euler_at_few_nfe(flow_student, tmp_path):
    _, file, sampling, _ = check_round_trip(flow_student, tmp_path / "a", NetworkTeacher, "AccelkitScheduler",
                                            nfe=2, grid="uniform")
    assert (sampling.solver, sampling.nfe, sampling.grid) == ("euler", 2, [1.0, 0.5, 0.0])
    meta = read_safetensors_metadata(file)
    assert meta["modelspec.prediction_type"] == "flow" and meta["modelspec.architecture"].endswith("/reflow")
    assert meta["accelkit.recipe_hash"] == json.loads((flow_student / "manifest.json").read_text())["identity"]
    # the student records its own sampler (summary.sampling: euler, 1 NFE, grid [1, 0]); that uniform grid is
    # FlowMatchEulerDiscreteScheduler's own, so the stock scheduler is used
    _, _, one, _ = check_round_trip(flow_student, tmp_path / "b", NetworkTeacher, "FlowMatchEulerDiscreteScheduler")
    assert (one.solver, one.nfe, one.grid) == ("euler", 1, [1.0, 0.0])


def test_cli_single_file_inspect_and_overwrite(ddpm, tmp_path, cli, monkeypatch, capsys):
    out = tmp_path / "t.safetensors"
    r = cli("export", ddpm, "-o", out, "--format", "safetensors", "--nfe", "4", env=ONE_THREAD)  # the real CLI
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    meta = read_safetensors_metadata(out)
    assert meta["modelspec.hash_sha256"].startswith("0x") and meta["modelspec.resolution"] == "8x8"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["format"] == "accelkit.teacher/1"
    assert all(isinstance(v, str) for v in meta.values())
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[8 + n:]).hexdigest()
    r = cli("inspect", out, "--json", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    desc = json.loads(r.stdout)
    assert desc["metadata"]["accelkit.nfe"] == "4" and desc["metadata"]["accelkit.solver"] == "dpm++2m"
    assert desc["metadata"]["modelspec.hash_sha256"] == meta["modelspec.hash_sha256"]
    code, _, err = run_in_process(monkeypatch, capsys, "inspect", out)
    assert code == 0 and "modelspec.prediction_type" in err and "accelkit.grid" in err

    before = out.read_bytes()
    code, stdout, err = run_in_process(monkeypatch, capsys, "export", ddpm, "-o", out, "--format", "safetensors",
                                       "--nfe", "2")
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1 and stdout == ""
    assert out.read_bytes() == before
    code, stdout, err = run_in_process(monkeypatch, capsys, "export", ddpm, "-o", out, "--nfe", "2", "--force")
    assert code == 0, err
    assert read_safetensors_metadata(out)["accelkit.nfe"] == "2"

    folder = tmp_path / "d"
    assert run_in_process(monkeypatch, capsys, "export", ddpm, "-o", folder)[0] == 0
    stamp = (folder / "unet" / "config.json").stat().st_mtime_ns
    code, _, err = run_in_process(monkeypatch, capsys, "export", ddpm, "-o", folder, "--solver", "euler")
    assert code == 2 and "--force" in err
    assert (folder / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert json.loads((folder / "accelkit_export.json").read_text())["solver"] == "dpm++2m"
    code, stdout, err = run_in_process(monkeypatch, capsys, "export", ddpm, "-o", folder, "--solver", "euler",
                                       "--force")
    assert code == 0 and stdout.strip() == str(folder), err
    assert json.loads((folder / "accelkit_export.json").read_text())["solver"] == "euler"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    code, _, err = run_in_process(monkeypatch, capsys, "export", ddpm, "-o", tmp_path / "h.safetensors", "--dtype",
                                  "fp16")
    assert code == 0, err
    assert {v.dtype for v in load_file(tmp_path / "h.safetensors").values()} == {torch.float16}


def test_atomic_directory_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    from accelkit.artifacts import atomic_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with pytest.raises(Exception, match="--force"), atomic_directory(out):
        pass
    with atomic_directory(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_bad_input_is_one_line_exit_2(ddpm, tmp_path, monkeypatch, capsys):
    from accelkit.models.builtin import MLP
    from accelkit.models.loading import save_teacher
    from accelkit.schedules import LinearSchedule
    from accelkit.teacher import TimeInput

    mlp = MLP(dim=2, hidden=8, depth=1)
    builtin = save_teacher(NetworkTeacher(mlp, lambda *a: None, "flow", LinearSchedule(), (2,), TimeInput()),
                           tmp_path / "mlp.safetensors")
    cases = [
        (("export", tmp_path / "missing", "-o", tmp_path / "a"), "no such file"),
        (("export", builtin, "-o", tmp_path / "b", "--format", "diffusers"), "--format safetensors"),
        (("export", ddpm, "-o", tmp_path / "c", "--format", "onnx"), "diffusers, safetensors, lora or kohya"),
        (("export", ddpm, "-o", tmp_path / "d", "--solver", "rk45"), "unknown"),
        (("export", ddpm, "-o", tmp_path / "e", "--nfe", "0"), "--nfe"),
        (("export", ddpm, "-o", tmp_path / "f", "--grid", "1,0.5,0"), "steps"),
    ]
    for args, expected in cases:
        code, stdout, err = run_in_process(monkeypatch, capsys, *args)
        assert code == 2 and stdout == "", (args, err)
        assert expected in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert not (tmp_path / "b").exists()
    # without --format an accelkit network exports as one file by itself (in the -o folder, named after its source)
    code, stdout, err = run_in_process(monkeypatch, capsys, "export", builtin, "-o", tmp_path / "b")
    assert code == 0 and stdout.strip() == str(tmp_path / "b" / "mlp.safetensors"), err
    assert load_teacher(tmp_path / "b" / "mlp.safetensors").info["architecture"] == "accelkit.MLP"
    # the builtin MLP exports as one file, which loads back
    code, _, err = run_in_process(monkeypatch, capsys, "export", builtin, "-o", tmp_path / "mlp-out.safetensors",
                                  "--format", "safetensors")
    assert code == 0, err
    back = load_teacher(tmp_path / "mlp-out.safetensors")
    x = torch.randn(4, 2)
    assert torch.equal(back.network(x, torch.full((4,), 0.5)), mlp.eval()(x, torch.full((4,), 0.5)))


def test_model_without_a_stock_pipeline_exports_its_components(tmp_path):
    """A class-conditional UNet2DModel: no diffusers pipeline runs it, so no model_index.json; unet/ and scheduler/
    load on their own, and accelkit loads the folder back."""
    from diffusers import DDIMScheduler

    source = write_pipeline(tmp_path / "cls", "DDPMPipeline", "unet", tiny_unet2d(num_class_embeds=3),
                            DDIMScheduler(clip_sample=False))
    folder, sampling = export(source, tmp_path / "out", "diffusers", nfe=4)
    assert not (folder / "model_index.json").exists()
    assert json.loads((folder / "accelkit_export.json").read_text())["pipeline"] is None
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")
    labels = torch.tensor([0, 2, 1])
    scheduler.set_timesteps(4)
    x = NOISE.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    from accelkit.teacher import Condition

    cond = Condition(class_labels=labels)
    ours = sample_batched(load_teacher(source), NOISE, sampling.solver, 4, cond=cond, grid=sampling.grid)
    assert rel(x, ours) < 1e-5
    back = sample_batched(load_teacher(folder), NOISE, sampling.solver, 4, cond=cond, grid=sampling.grid)
    assert torch.equal(back, ours)


def test_recorded_sampler_wins_and_distill_artifacts_are_students(flow_student, tmp_path):
    """An artifact's summary.sampling is the default; a distill artifact holding teacher.safetensors is a student."""
    import shutil

    from accelkit.export.exporter import open_source, resolve_sampling

    art = tmp_path / "distill-x"
    shutil.copytree(flow_student, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["kind"] = "distill"
    manifest["summary"] = {}
    (art / "manifest.json").write_text(json.dumps(manifest))
    sampling = resolve_sampling(open_source(art))
    assert (sampling.solver, sampling.nfe, sampling.grid) == ("euler", 2, [1.0, 0.5, 0.0])
    assert sampling.origin == "distill student (default)"
    manifest["summary"] = {"sampling": {"solver": "heun", "nfe": 3, "grid": [1.0, 0.4, 0.0]}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    sampling = resolve_sampling(open_source(art))
    assert (sampling.solver, sampling.nfe, sampling.grid) == ("heun", 3, [1.0, 0.4, 0.0])
    assert sampling.origin == "recorded by the distill artifact"
    heun5 = resolve_sampling(open_source(art), nfe=5)  # the recorded grid has 2 steps: heun at 5 NFE needs 3
    assert heun5.grid == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0], abs=1e-15) and heun5.grid_name == "uniform"
    check_round_trip(art, tmp_path, NetworkTeacher, "AccelkitScheduler")


def test_an_unregistered_solver_object_exports_through_its_coefficients(ddpm, tmp_path):
    """A learned solver (here: a stand-in that scales Heun's correction, registered under no name) exports with no
    scheduler code of its own; the single file carries its AccelkitScheduler config, which replays it too."""
    from accelkit.export.scheduler import AccelkitScheduler
    from accelkit.solvers import Heun, solve

    class Damped(Heun):
        name = "damped-heun"

        def sample(self, teacher, x, ts, nfe, cond=None):
            h, b = ts.diff().tolist(), x.shape[0]
            for i in range(len(h)):
                d = teacher.velocity(x, ts[i].expand(b).to(x.device), cond)
                x_next = x + h[i] * d
                if i < len(h) - 1:
                    d2 = teacher.velocity(x_next, ts[i + 1].expand(b).to(x.device), cond)
                    x_next = x + h[i] * (0.4 * d + 0.6 * d2)
                x = x_next
            return x

    solver = Damped()
    folder, sampling = export(ddpm, tmp_path / "f", "diffusers", solver=solver, nfe=5)
    assert sampling.solver == "damped-heun" and sampling.grid_name == "uniform"
    teacher = load_teacher(ddpm)
    ours = solve(teacher, teacher.prior_sample(NOISE), solver, 5, grid=sampling.grid)
    theirs, scheduler = plain_diffusers_samples(folder, NOISE)
    assert scheduler == "AccelkitScheduler" and rel(theirs, ours) < 1e-5
    file, _ = export(ddpm, tmp_path / "f.safetensors", "safetensors", solver=solver, nfe=5)
    config = json.loads(read_safetensors_metadata(file)["accelkit.scheduler_config"])
    replay = AccelkitScheduler(**config)
    replay.set_timesteps(5)
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    x = NOISE * replay.init_noise_sigma
    with torch.no_grad():
        for t in replay.timesteps:
            x = replay.step(unet(x, t).sample, t, x).prev_sample
    assert torch.equal(x, theirs)


def test_bespoke_solver_artifact_exports_with_its_teacher(ddpm, tmp_path):
    """A learned solver (runs/bespoke-...) travels with its teacher: plain diffusers with AccelkitScheduler gives the
    samples accelkit gives with that solver; a solver trained for another teacher is refused."""
    from accelkit.cli.main import app  # noqa: F401  (registers the stages)
    from accelkit.pipeline import run_stage
    from accelkit.recipes import validate_stage
    from accelkit.solvers import get_solver

    recipe = validate_stage("bespoke", {"teacher": str(ddpm), "nfe": 4, "kind": "bns", "train_samples": 32,
                                        "val_samples": 16, "batch_size": 16, "loop": {"steps": 5},
                                        "reference": "dpm++2m", "reference_nfe": 4})
    art = run_stage("bespoke", recipe, tmp_path / "bespoke")
    folder, sampling = export(ddpm, tmp_path / "out", "diffusers", solver=str(art))
    assert sampling.nfe == 4 and sampling.solver_object is not None
    ours = sample_batched(load_teacher(ddpm), NOISE, get_solver(str(art)), 4)
    theirs, scheduler = plain_diffusers_samples(folder, NOISE)
    assert scheduler == "AccelkitScheduler" and rel(theirs, ours) < 1e-5
    other = ddpm_pipeline(tmp_path / "other", "v_prediction")  # another teacher: refused
    with pytest.raises(AccelkitError, match="teacher"):
        export(other, tmp_path / "o2", "diffusers", solver=str(art))
    assert not (tmp_path / "o2").exists()
