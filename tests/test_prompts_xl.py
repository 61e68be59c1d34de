"""Prompts for SDXL- and SD3-style pipelines: `accelkit sample PIPE --prompt ... --negative-prompt ... --guidance 7.5
--solver dpm++2m --nfe 8` equals diffusers' StableDiffusionXLPipeline / StableDiffusion3Pipeline called with the
same prompts, guidance, DPM-Solver++(2M) scheduler and initial latents (tiny random-weight pipelines with a
tokenizer vocabulary the suite writes)."""

import pytest
import tiny_models
from conftest import run_in_process
from safetensors.torch import load_file

from accelkit.noise import sample_noise

PROMPTS = ["a photo of a cat", "a red house"]
NEGATIVE = "blurry ugly"


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_models.sdxl_text_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_models.sd3_text_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "prompts"


def prompt_args(prompts=PROMPTS, negative=NEGATIVE):
    args = [a for p in prompts for a in ("--prompt", p)]
    return args + (["--negative-prompt", negative] if negative is not None else [])


def sample(monkeypatch, capsys, out, *args):
    code, _, err = run_in_process(monkeypatch, capsys, "sample", *[str(a) for a in args], "-o", out)
    assert code == 0, err
    return load_file(out)["samples"]


def test_sdxl_prompted_sample_equals_stable_diffusion_xl_pipeline(sdxl, tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionXLPipeline

    from accelkit.export.exporter import stock_scheduler
    from accelkit.models.loading import load_teacher

    common = ["--guidance", "7.5", "--solver", "dpm++2m", "--nfe", "8", "--grid", "uniform", "-n", "2"]
    ours = sample(monkeypatch, capsys, tmp_path / "ours.safetensors", sdxl, *prompt_args(), *common)
    zero_null = sample(monkeypatch, capsys, tmp_path / "zero.safetensors", sdxl, *prompt_args(negative=None), *common)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    scheduler, grid = stock_scheduler(load_teacher(sdxl), "dpm++2m", 8)
    assert grid == pytest.approx([1 - i / 8 for i in range(9)])
    pipe.scheduler = scheduler
    latents = sample_noise(0, range(2), (4, 8, 8))
    kw = dict(guidance_scale=7.5, num_inference_steps=8, latents=latents, height=8, width=8, output_type="latent",
              return_dict=False)
    theirs = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, **kw)[0]
    theirs_zero = pipe(prompt=PROMPTS, **kw)[0]  # force_zeros_for_empty_prompt: zero embeddings as the null
    print(f"SDXL: accelkit --prompt against StableDiffusionXLPipeline: {rel(ours, theirs):.1e}; without a "
          f"negative prompt: {rel(zero_null, theirs_zero):.1e}")
    assert rel(ours, theirs) < 1e-4
    assert rel(zero_null, theirs_zero) < 1e-4
    assert rel(theirs_zero, theirs) > 1e-3  # the negative prompt matters
    # the size conditioning matters: other time_ids give another image
    other = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, original_size=(16, 16), target_size=(16, 16), **kw)[0]
    assert rel(other, theirs) > 1e-4


def sd3_dpm_scheduler(shift: float = 3.0):
    """diffusers' DPM-Solver++(2M) for flow models (flow sigmas with SD3's shift), with its grid as times.

    diffusers' flow-sigma DPM-Solver rounds the network's timesteps 1000 sigma down to integers (999 for sigma
    0.99967) while stepping with the unrounded sigmas; the network is evaluated here at 1000 sigma itself, as
    FlowMatchEulerDiscreteScheduler (SD3's own scheduler) does, so that one ODE is solved."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                            lower_order_final=False, final_sigmas_type="zero")
    rounded = scheduler.set_timesteps

    def unrounded(*args, **kwargs):  # the pipeline calls set_timesteps itself
        rounded(*args, **kwargs)
        scheduler.timesteps = scheduler.sigmas[:-1] * scheduler.config.num_train_timesteps

    scheduler.set_timesteps = unrounded
    scheduler.set_timesteps(8)
    return scheduler, [float(s) for s in scheduler.sigmas]


def test_sd3_prompted_sample_equals_stable_diffusion_3_pipeline(sd3, tmp_path, monkeypatch, capsys, cache):
    from diffusers import StableDiffusion3Pipeline

    scheduler, grid = sd3_dpm_scheduler()
    common = ["--guidance", "7.5", "--solver", "dpm++2m", "--nfe", "8", "--grid", ",".join(map(repr, grid)), "-n", "2"]
    ours = sample(monkeypatch, capsys, tmp_path / "ours.safetensors", sd3, *prompt_args(), *common)

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3)
    pipe.scheduler = scheduler
    latents = sample_noise(0, range(2), (4, 8, 8))
    kw = dict(guidance_scale=7.5, num_inference_steps=8, latents=latents, height=8, width=8, output_type="latent",
              return_dict=False)
    theirs = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, **kw)[0]
    print(f"SD3: accelkit --prompt against StableDiffusion3Pipeline: {rel(ours, theirs):.1e}")
    assert rel(ours, theirs) < 1e-4
    assert rel(pipe(prompt=PROMPTS, **kw)[0], theirs) > 1e-3  # the negative prompt matters
    # SD3's own scheduler, FlowMatchEulerDiscreteScheduler (shift 3), against accelkit's Euler on its grid
    from accelkit.export.exporter import stock_scheduler
    from accelkit.models.loading import load_teacher

    euler, euler_grid = stock_scheduler(load_teacher(sd3), "euler", 8)
    ours_euler = sample(monkeypatch, capsys, tmp_path / "euler.safetensors", sd3, *prompt_args(), "--guidance", "7.5",
                        "--solver", "euler", "--nfe", "8", "--grid", ",".join(map(repr, euler_grid)), "-n", "2")
    pipe.scheduler = euler
    theirs_euler = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, **kw)[0]
    print(f"SD3 Euler against FlowMatchEulerDiscreteScheduler: {rel(ours_euler, theirs_euler):.1e}")
    assert rel(ours_euler, theirs_euler) < 1e-4
    # the T5 part matters too: the encodings are CLIP tokens then 256 T5 tokens
    enc = load_file(next(cache.glob("*.safetensors")))["encoder_hidden_states"]
    assert enc.shape == (3, 16 + 256, 16) and enc[:, 16:].abs().sum() > 0
