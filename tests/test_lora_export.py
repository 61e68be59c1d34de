"""A LoRA student exports as a LoRA file: diffusers / peft keys that `pipe.load_lora_weights` loads into the plain
diffusers pipeline (the same samples as accelkit's merged student), and sd-scripts' kohya layout; both carry the
sampler and load back into accelkit on their base teacher."""

import json
import re

import pytest
import tiny_models
import torch
from conftest import run_in_process
from safetensors.torch import load_file

from accelkit.evaluation import sample_batched
from accelkit.models.loading import load_teacher, read_safetensors_metadata
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.stages.reflow import ReflowRecipe, run_reflow

pytest.importorskip("peft")


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """A tiny SD-style teacher (UNet2DConditionModel, eps, scaled-linear betas), its couplings, and two
    rectified-diffusion students: LoRA adapters on the attention projections, and full weights."""
    root = tmp_path_factory.mktemp("lora")
    teacher = tiny_models.sd_like_pipeline(root / "sd")
    couple = run_couple(CoupleRecipe(teacher=str(teacher), n=64, solver="dpm++2m", nfe=8, micro_batch=64,
                                     shard_size=64), root / "couple")
    loop = {"steps": 12, "lr": 3e-3, "warmup_steps": 0, "checkpoint_every": 0}
    lora = run_reflow(ReflowRecipe(couplings=str(couple), method="rectified-diffusion", batch_size=16, device="cpu",
                                   eval_samples=0, loop={**loop, "lora": {"rank": 4}}), root / "reflow-lora")
    full = run_reflow(ReflowRecipe(couplings=str(couple), method="rectified-diffusion", batch_size=16, device="cpu",
                                   eval_samples=0, loop=loop), root / "reflow-full")
    return teacher, lora, full


NOISE = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def test_diffusers_lora_loads_into_the_plain_pipeline_and_samples_like_the_merged_student(students, tmp_path,
                                                                                            monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    teacher, lora, _ = students
    code, stdout, err = run_in_process(monkeypatch, capsys, "export", lora, "--format", "lora", "--solver", "dpm++2m",
                                       "--nfe", "2", "-o", tmp_path / "student-lora.safetensors")
    assert code == 0, err
    path = tmp_path / "student-lora.safetensors"
    assert stdout.strip() == str(path)
    tensors, meta = load_file(path), read_safetensors_metadata(path)
    assert all(re.fullmatch(r"unet\..+\.lora_[AB]\.weight", k) for k in tensors), list(tensors)[:3]
    assert {k.split(".")[-3] for k in tensors} <= {"to_q", "to_k", "to_v", "0"}  # the adapted projections only
    assert meta["accelkit.solver"] == "dpm++2m" and json.loads(meta["accelkit.nfe"]) == 2
    assert meta["lora_rank"] == "4" and meta["base_model"] == str(teacher.resolve())

    # accelkit's merged student, with the sampler it records
    student = load_teacher(lora)
    grid = json.loads(meta["accelkit.grid"])
    ours = sample_batched(student, NOISE, "dpm++2m", 2, grid=grid)

    # plain diffusers: the teacher's UNet, the LoRA loaded by the pipeline, the stock scheduler the export names
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    from accelkit.export.exporter import stock_scheduler

    assert meta["accelkit.scheduler"] == "DPMSolverMultistepScheduler"
    scheduler, stock_grid = stock_scheduler(student, "dpm++2m", 2)
    assert stock_grid == pytest.approx(grid)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    before = pipe(prompt_embeds=torch.zeros(3, 1, 12), latents=NOISE.clone(), num_inference_steps=2,
                  guidance_scale=1.0, output_type="latent", height=64, width=64, return_dict=False)[0]
    pipe.load_lora_weights(str(path))
    theirs = pipe(prompt_embeds=torch.zeros(3, 1, 12), latents=NOISE.clone(), num_inference_steps=2,
                  guidance_scale=1.0, output_type="latent", height=64, width=64, return_dict=False)[0]
    print(f"diffusers + load_lora_weights against accelkit's merged student: {rel(theirs, ours):.1e} "
          f"(the teacher without the LoRA: {rel(before, ours):.1e})")
    assert rel(theirs, ours) < 1e-5
    assert rel(before, ours) > 1e-3  # the LoRA is what makes the difference

    # the file loads back into accelkit on its base and samples like the student
    back = load_teacher(path)
    assert rel(sample_batched(back, NOISE, "dpm++2m", 2, grid=grid), ours) < 1e-5


def sd_scripts_names(unet) -> set[str]:
    """sd-scripts' names of the layers its LoRA network adapts in a UNet: for every module of a target class
    (Transformer2DModel, ResnetBlock2D, ...; the conv ones with conv_dim) and every Linear / Conv2d inside it,
    'lora_unet' + '.' + module name + '.' + child name, with every '.' replaced by '_'."""
    names = set()
    for name, module in unet.named_modules():
        if type(module).__name__ in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d") and child_name:
                    names.add(("lora_unet" + "." + name + "." + child_name).replace(".", "_"))
    return names


def test_kohya_layout_has_sd_scripts_names_and_round_trips(students, tmp_path, monkeypatch, capsys):
    teacher, lora, _ = students
    code, stdout, err = run_in_process(monkeypatch, capsys, "export", lora, "--format", "kohya", "-o", tmp_path)
    assert code == 0, err
    path = tmp_path / "reflow-lora-kohya.safetensors"
    assert stdout.strip() == str(path)
    tensors, meta = load_file(path), read_safetensors_metadata(path)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    allowed = sd_scripts_names(load_teacher(teacher).network)
    assert stems and stems <= allowed, sorted(stems - allowed)[:3]
    for stem in stems:
        down, up, alpha = (tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"],
                           tensors[f"{stem}.alpha"])
        assert down.shape[0] == up.shape[1] == 4 and alpha.ndim == 0
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    # the sampler the student artifact records travels in the header
    recorded = json.loads((lora / "manifest.json").read_text())["summary"]["sampling"]
    solver, nfe = meta["accelkit.solver"], json.loads(meta["accelkit.nfe"])
    assert (solver, nfe) == (recorded["solver"], recorded["nfe"])

    # round trip: accelkit loads the base, adds the factors; `sample FILE` uses the recorded sampler
    grid = json.loads(meta["accelkit.grid"])
    ours = sample_batched(load_teacher(lora), NOISE, solver, nfe, grid=grid)
    back = load_teacher(path)
    assert back.info["lora_layout"] == "kohya"
    assert rel(sample_batched(back, NOISE, solver, nfe, grid=grid), ours) < 1e-5
    code, _, err = run_in_process(monkeypatch, capsys, "sample", path, "-n", "2", "-o", tmp_path / "s.safetensors")
    assert code == 0 and f"records its sampler; using {solver} at {nfe} NFE" in err, err
    code, stdout, err = run_in_process(monkeypatch, capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(stdout)["metadata"]["accelkit.solver"] == solver, err


def test_lora_export_of_a_full_weight_student_or_a_teacher_is_a_one_line_error(students, tmp_path, monkeypatch,
                                                                               capsys):
    teacher, _, full = students
    for source, expected in ((full, "full-weight reflow artifact (no loop.lora)"), (teacher, "a teacher has no LoRA")):
        for layout in ("lora", "kohya"):
            out = tmp_path / f"{layout}.safetensors"
            code, stdout, err = run_in_process(monkeypatch, capsys, "export", source, "--format", layout, "-o", out)
            assert code == 2 and stdout == "" and not out.exists(), err
            assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []
