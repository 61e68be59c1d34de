"""`accelkit sample PIPE --prompt ...`: prompts encoded offline with the pipeline's own tokenizer and text encoder
give the same image as diffusers' StableDiffusionPipeline with the same prompt, guidance, scheduler and latents;
encodings are cached by content; bad input is one line."""

import shutil

import pytest
import tiny_models
import torch
from conftest import run_in_process
from safetensors.torch import load_file

from accelkit.noise import sample_noise

PROMPTS = ["a photo of a cat", "a red house"]
NEGATIVE = "blurry ugly"


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return tiny_models.sd15_text_pipeline(tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "prompts"


def test_prompted_sample_equals_stable_diffusion_pipeline(sd15, tmp_path, monkeypatch, capsys, cache):
    from diffusers import StableDiffusionPipeline

    from accelkit.export.exporter import stock_scheduler
    from accelkit.models.loading import load_teacher

    args = ["sample", sd15, *[a for p in PROMPTS for a in ("--prompt", p)], "--negative-prompt", NEGATIVE,
            "--guidance", "7.5", "--solver", "dpm++2m", "--nfe", "8", "--grid", "uniform", "-n", "2"]
    code, _, err = run_in_process(monkeypatch, capsys, *args, "-o", tmp_path / "ours.safetensors")
    assert code == 0, err
    ours = load_file(tmp_path / "ours.safetensors")["samples"]

    # diffusers' own pipeline: the same prompts, guidance, DPM-Solver++(2M) settings and initial latents
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    scheduler, grid = stock_scheduler(load_teacher(sd15), "dpm++2m", 8)
    assert grid == pytest.approx([1 - i / 8 for i in range(9)])  # the uniform grid accelkit ran on
    pipe.scheduler = scheduler
    latents = sample_noise(0, range(2), (4, 8, 8))
    theirs = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, guidance_scale=7.5, num_inference_steps=8,
                  latents=latents, height=8, width=8, output_type="latent", return_dict=False)[0]
    print(f"accelkit --prompt against StableDiffusionPipeline: {rel(ours, theirs):.1e}")
    assert rel(ours, theirs) < 1e-4
    unguided = pipe(prompt=PROMPTS, guidance_scale=7.5, num_inference_steps=8, latents=latents, height=8, width=8,
                    output_type="latent", return_dict=False)[0]
    assert rel(unguided, theirs) > 1e-3  # the negative prompt matters

    # the encodings were cached; a second run reads them and does not load the text encoder
    assert len(list(cache.glob("*.safetensors"))) == 1
    import accelkit.prompts

    def no_encoder(*a, **k):
        raise AssertionError("the text encoder was loaded although the encoding is cached")

    monkeypatch.setattr(accelkit.prompts, "_load_encoder", no_encoder)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")
    code, _, err = run_in_process(monkeypatch, capsys, *[a for a in args if a not in PROMPTS and a != "--prompt"],
                                  "--prompts", prompts_file, "-o", tmp_path / "again.safetensors")
    assert code == 0, err
    assert torch.equal(load_file(tmp_path / "again.safetensors")["samples"], ours)


def test_bad_prompt_input_is_one_line(sd15, tmp_path, monkeypatch, capsys):
    no_text = tiny_models.sd_like_pipeline(tmp_path / "no-text")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(sd15, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    ddpm = tiny_models.ddpm_pipeline(tmp_path / "ddpm")
    out = tmp_path / "out" / "x.safetensors"
    cases = [
        ((no_text, "--prompt", "a cat"), "has no text_encoder"),
        ((no_tokenizer, "--prompt", "a cat"), "tokenizer: missing"),
        ((ddpm, "--prompt", "a cat"), "takes no text"),
        ((sd15, "--negative-prompt", "ugly"), "--negative-prompt: needs --prompt"),
        ((sd15, "--prompts", tmp_path / "none.txt"), "--prompts"),
    ]
    for args, expected in cases:
        code, stdout, err = run_in_process(monkeypatch, capsys, "sample", *args, "--nfe", "2", "-n", "1", "-o", out)
        assert code == 2 and stdout == "" and not out.exists(), (args, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and expected in err, (args, err)


@pytest.mark.slow
def test_couple_with_prompts_makes_the_pairs_sample_draws(sd15, tmp_path, monkeypatch, capsys):
    """couple --prompts FILE --negative-prompt: the couplings' endpoints are the prompted, guided samples of
    `accelkit sample` with the same prompts (the negative prompt is the couplings' null as well)."""
    from accelkit.couplings import open_couplings

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    common = ["--guidance", "7.5", "--solver", "dpm++2m", "--nfe", "4", "--grid", "uniform"]
    code, stdout, err = run_in_process(monkeypatch, capsys, "couple", sd15, "--prompts", prompts_file,
                                       "--negative-prompt", NEGATIVE, *common, "-n", "3", "--seed", "0",
                                       "-o", tmp_path / "couple")
    assert code == 0, err
    pairs = open_couplings(stdout.strip())[:]
    code, _, err = run_in_process(monkeypatch, capsys, "sample", sd15, "--prompts", prompts_file, "--negative-prompt",
                                  NEGATIVE, *common, "-n", "3", "--seed", "0", "-o", tmp_path / "s.safetensors")
    assert code == 0, err
    sampled = load_file(tmp_path / "s.safetensors")["samples"]
    assert torch.allclose(pairs["noise"], sample_noise(0, range(3), (4, 8, 8)))
    assert rel(pairs["sample"], sampled) < 1e-5, rel(pairs["sample"], sampled)
    # without the negative prompt the null is the empty prompt: other pairs, another artifact
    code, stdout2, err = run_in_process(monkeypatch, capsys, "couple", sd15, "--prompts", prompts_file, *common,
                                        "-n", "3", "--seed", "0", "-o", tmp_path / "couple2")
    assert code == 0, err
    assert rel(open_couplings(stdout2.strip())[:]["sample"], pairs["sample"]) > 1e-3
