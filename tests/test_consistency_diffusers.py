"""Consistency students of a diffusers teacher in plain diffusers: an LCM-LoRA of a tiny text-conditioned SD1.5-style
pipeline (UNet2DConditionModel + CLIP text encoder, random weights) changes only its adapted layers, its exported LoRA
loads into `StableDiffusionPipeline` with `load_lora_weights` and, with the stock LCMScheduler the export writes,
gives accelkit's samples to 1e-5 relative; the exported diffusers folder of the student does the same; a student with
Song et al.'s EDM boundary, which no stock scheduler runs, exports accelkit's own scheduler, which reproduces its
samples at 1 step and at 3 re-noising steps."""

import json

import pytest
import tiny_models
import torch
from safetensors.torch import load_file

from accelkit.consistency import Parameterisation, lcm_grid
from accelkit.evaluation import sample_batched
from accelkit.models.loading import load_teacher, read_safetensors_metadata
from accelkit.noise import sample_noise
from accelkit.stages.consistency import ConsistencyRecipe, run_consistency
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.teacher import Condition

pytest.importorskip("peft")

PROMPTS = ["a photo of a cat", "a red house"]
GUIDANCE = 3.0
LOOP = {"steps": 12, "lr": 3e-3, "warmup_steps": 0, "checkpoint_every": 0}


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD1.5-style pipeline, its prompted couplings (guidance's null: the empty prompt) and LCM-LoRA students
    at one guidance scale: LCM's boundary (auto for this DDPM teacher) recorded at 2 steps, and Song et al.'s EDM
    boundary at 1 step."""
    from accelkit.prompts import prompt_conditions_file

    root = tmp_path_factory.mktemp("lcm-sd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELKIT_CACHE", str(root / "cache"))
        pipe = tiny_models.sd15_text_pipeline(root / "pipe")
        conditions = prompt_conditions_file(pipe, PROMPTS, None)
        couple = run_couple(CoupleRecipe(teacher=str(pipe), n=32, solver="dpm++2m", nfe=4, micro_batch=32,
                                         shard_size=32, conditions=str(conditions)), root / "couple")
    common = dict(source=str(couple), method="lcm", guidance=GUIDANCE, discretisation=10, batch_size=8, device="cpu")
    lora = {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    lcm = run_consistency(ConsistencyRecipe(**common, sampling_nfe=2, loop={**LOOP, "lora": lora}), root / "lcm-lora")
    edm = run_consistency(ConsistencyRecipe(**common, boundary="edm", loop={**LOOP, "lora": lora}), root / "edm-lora")
    embeds = load_file(conditions)["encoder_hidden_states"]
    return {"pipe": pipe, "lcm": lcm, "edm": edm, "embeds": embeds}


def latents_and_embeds(sd, n=4):
    embeds = sd["embeds"][torch.arange(n) % len(PROMPTS)]
    return sample_noise(0, range(n), (4, 8, 8)), embeds


def accelkit_samples(student_path, nfe=None):
    """accelkit's samples of the student with its recorded sampler (at ``nfe`` steps on LCM's grid if given)."""
    model = load_teacher(student_path)
    sampling = json.loads((student_path / "manifest.json").read_text())["summary"]["sampling"]
    nfe = nfe or sampling["nfe"]
    grid = sampling["grid"] if nfe == sampling["nfe"] else lcm_grid(model.schedule, nfe)
    return model, sampling, grid


def pipeline_samples(pipe, latents, embeds, nfe, noise=None, monkeypatch=None):
    """The plain StableDiffusionPipeline at guidance 1 (the student is one evaluation per step) from the same latents
    and prompt embeddings; ``noise`` (a function of the step) replaces LCMScheduler's re-noising draws."""
    if noise is not None:
        import diffusers.schedulers.scheduling_lcm as lcm

        calls = iter(range(nfe))
        monkeypatch.setattr(lcm, "randn_tensor", lambda shape, **kw: noise(next(calls)).to(kw.get("dtype")))
    return pipe(prompt_embeds=embeds, latents=latents.clone(), num_inference_steps=nfe, guidance_scale=1.0,
                output_type="latent", height=8, width=8, return_dict=False)[0]


def test_lcm_lora_changes_only_adapted_layers_and_its_lora_file_runs_in_plain_diffusers(sd, tmp_path, monkeypatch,
                                                                                      capsys):
    from conftest import run_in_process
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from accelkit.solvers.consistency import fresh_noise

    student = load_teacher(sd["lcm"])
    base = load_teacher(sd["pipe"])
    assert Parameterisation.of(student).lcm and student.guidance_scale == 1.0
    a, b = base.network.state_dict(), student.network.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.rsplit(".", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0")) for k in changed)

    code, stdout, err = run_in_process(monkeypatch, capsys, "export", sd["lcm"], "--format", "lora",
                                       "-o", tmp_path / "lcm-lora.safetensors")
    assert code == 0, err
    assert "scheduler LCMScheduler" in err, err
    path = tmp_path / "lcm-lora.safetensors"
    meta = read_safetensors_metadata(path)
    assert meta["accelkit.scheduler"] == "LCMScheduler" and meta["accelkit.solver"] == "consistency"
    config = json.loads(meta["accelkit.scheduler_config"])
    assert config["timestep_scaling"] == 10.0 and config["original_inference_steps"] == 50

    pipe = StableDiffusionPipeline.from_pretrained(sd["pipe"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(config)
    pipe.load_lora_weights(str(path))
    latents, embeds = latents_and_embeds(sd)
    cond = Condition(encoder_hidden_states=embeds)
    for nfe in (1, 2, 4):
        model, sampling, grid = accelkit_samples(sd["lcm"], nfe)
        ours = sample_batched(model, latents, sampling["solver"], nfe, grid=grid, cond=cond)
        noise = (lambda k: fresh_noise(latents, k)) if nfe > 1 else None
        theirs = pipeline_samples(pipe, latents, embeds, nfe, noise, monkeypatch)
        print(f"LCM-LoRA in plain diffusers at {nfe} step(s): relative difference {rel(theirs, ours):.1e}")
        assert rel(theirs, ours) < 1e-5, (nfe, rel(theirs, ours))
    unet_only = pipeline_samples(StableDiffusionPipeline.from_pretrained(
        sd["pipe"], safety_checker=None, requires_safety_checker=False, scheduler=LCMScheduler.from_config(config)),
        latents, embeds, 1)
    assert rel(unet_only, ours) > 1e-3  # the LoRA matters


def test_diffusers_folder_of_a_consistency_student_carries_a_stock_lcm_scheduler(sd, tmp_path, monkeypatch, capsys):
    """export --format diffusers: the merged student with LCMScheduler in scheduler/; the folder's pipeline (with the
    teacher's text encoder) reproduces accelkit's samples with the recorded sampler (2 steps on LCM's grid) given the
    same re-noising draws."""
    from conftest import run_in_process
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from accelkit.solvers.consistency import fresh_noise

    code, stdout, err = run_in_process(monkeypatch, capsys, "export", sd["lcm"], "--format", "diffusers",
                                       "-o", tmp_path / "folder")
    assert code == 0, err
    folder = tmp_path / "folder"
    record = json.loads((folder / "accelkit_export.json").read_text())
    assert record["scheduler"] == "LCMScheduler" and "re-noising draws" in record["lcm_noise"]
    scheduler = LCMScheduler.from_pretrained(folder / "scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(sd["pipe"], unet=UNet2DConditionModel.from_pretrained(
        folder / "unet"), scheduler=scheduler, safety_checker=None, requires_safety_checker=False)
    latents, embeds = latents_and_embeds(sd)
    model, sampling, grid = accelkit_samples(sd["lcm"])
    assert sampling["solver"] == "consistency" and sampling["nfe"] == 2 and grid == lcm_grid(model.schedule, 2)
    ours = sample_batched(model, latents, "consistency", 2, grid=grid, cond=Condition(encoder_hidden_states=embeds))
    theirs = pipeline_samples(pipe, latents, embeds, 2, lambda k: fresh_noise(latents, k), monkeypatch)
    print(f"exported diffusers folder (LCMScheduler) against accelkit sample: {rel(theirs, ours):.1e}")
    assert rel(theirs, ours) < 1e-5


def test_an_edm_boundary_student_exports_accelkits_scheduler_which_reproduces_its_samples(sd, tmp_path, monkeypatch,
                                                                                        capsys):
    """Song et al.'s c_skip / c_out (boundary edm) is no LCMScheduler step: the export says so and writes
    AccelkitScheduler, whose pipeline reproduces accelkit's samples at 1 step and at 3 re-noising steps."""
    from conftest import run_in_process
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from accelkit.export.scheduler import AccelkitScheduler

    code, _, err = run_in_process(monkeypatch, capsys, "export", sd["edm"], "--format", "diffusers",
                                  "-o", tmp_path / "folder")
    assert code == 0, err
    assert "scheduler AccelkitScheduler" in err, err
    folder = tmp_path / "folder"
    assert json.loads((folder / "accelkit_export.json").read_text())["scheduler"] == "AccelkitScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(sd["pipe"], unet=UNet2DConditionModel.from_pretrained(
        folder / "unet"), scheduler=AccelkitScheduler.from_pretrained(folder / "scheduler"), safety_checker=None,
        requires_safety_checker=False)
    latents, embeds = latents_and_embeds(sd)
    model, sampling, grid = accelkit_samples(sd["edm"])
    assert sampling["nfe"] == 1
    cond = Condition(encoder_hidden_states=embeds)
    ours = sample_batched(model, latents, sampling["solver"], 1, grid=grid, cond=cond)
    theirs = pipeline_samples(pipe, latents, embeds, 1)
    print(f"EDM-boundary student through AccelkitScheduler: {rel(theirs, ours):.1e}")
    assert rel(theirs, ours) < 1e-5

    # at 3 steps the sampler re-noises: AccelkitScheduler draws the fresh noise as accelkit does (seeded by each
    # sample's starting latents), so the plain pipeline gives accelkit's samples without any patching
    code, _, err = run_in_process(monkeypatch, capsys, "export", sd["edm"], "--format", "diffusers", "--nfe", "3",
                                  "-o", tmp_path / "folder3")
    assert code == 0, err
    scheduler = AccelkitScheduler.from_pretrained(tmp_path / "folder3" / "scheduler")
    assert any(v != 0 for row in scheduler.config.noise_coefficients for v in row)
    pipe.scheduler = scheduler
    ours = sample_batched(model, latents, "consistency", 3, cond=cond)
    theirs = pipeline_samples(pipe, latents, embeds, 3)
    print(f"EDM-boundary student at 3 re-noising steps through AccelkitScheduler: {rel(theirs, ours):.1e}")
    assert rel(theirs, ours) < 1e-5
