"""Prompts for SDXL- and SD3-style pipelines: `accelkit sample PIPE --prompt ... --negative-prompt ... --guidance 7.5
--solver dpm++2m --nfe 8` equals diffusers' StableDiffusionXLPipeline / StableDiffusion3Pipeline called with the
same prompts, guidance, DPM-Solver++(2M) scheduler and initial latents (tiny random-weight pipelines with a
tokenizer vocabulary the suite writes)."""

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
    with capsys.disabled():  # the measured numbers, on the terminal with -s
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
    with capsys.disabled():  # the measured numbers, on the terminal with -s
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
    with capsys.disabled():  # the measured numbers, on the terminal with -s
        print(f"SD3 Euler against FlowMatchEulerDiscreteScheduler: {rel(ours_euler, theirs_euler):.1e}")
    assert rel(ours_euler, theirs_euler) < 1e-4
    # the T5 part matters too: the encodings are CLIP tokens then 256 T5 tokens
    enc = load_file(next(cache.glob("*.safetensors")))["encoder_hidden_states"]
    assert enc.shape == (3, 16 + 256, 16) and enc[:, 16:].abs().sum() > 0


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return tiny_models.sd15_text_pipeline(tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sd15", "sdxl", "sd3"])
def test_couple_prompts_then_reflow_lora_student(layout, request, tmp_path, monkeypatch, capsys):
    """couple PIPE --prompts FILE --negative-prompt ... --guidance 7.5 stores the prompts' encodings (and SDXL's
    time_ids) as the pairs' conditions; a reflow LoRA student trains on them end to end (only the adapted attention
    projections change); prompted through its pipeline's text encoders (`sample STUDENT --prompts FILE`, found
    through the artifacts' recorded inputs) it sees exactly the conditions it was trained on."""
    pytest.importorskip("peft")
    from safetensors import safe_open
    from safetensors.torch import save_file

    from accelkit.couplings import open_couplings

    pipe = request.getfixturevalue(layout)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    n = 4
    code, stdout, err = run_in_process(monkeypatch, capsys, "couple", pipe, "--prompts", prompts_file,
                                       "--negative-prompt", NEGATIVE, "--guidance", "7.5", "--solver", "dpm++2m",
                                       "--nfe", "4", "-n", n, "-o", tmp_path / "couple")
    assert code == 0, err
    pairs = open_couplings(stdout.strip())[:]
    fields = {"encoder_hidden_states"} | ({"pooled_projections"} if layout != "sd15" else set()) | (
        {"time_ids"} if layout == "sdxl" else set())
    assert {f"cond.{f}" for f in fields} == {k for k in pairs if k.startswith("cond.")}, sorted(pairs)
    # sample i took prompt i mod 2: rows 0 and 2 are the same prompt, rows 0 and 1 are not
    ehs = pairs["cond.encoder_hidden_states"]
    assert torch.equal(ehs[0], ehs[2]) and not torch.equal(ehs[0], ehs[1])
    if layout == "sdxl":
        assert pairs["cond.time_ids"].tolist() == [[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]] * n  # (H, W, 0, 0, H, W)

    method = "rectified-flow" if layout == "sd3" else "rectified-diffusion"
    code, stdout, err = run_in_process(monkeypatch, capsys, "reflow", tmp_path / "couple", "--method", method,
                                       "--steps", "10", "--batch-size", "4", "--lr", "1e-3",
                                       "--set", "reflow.eval_samples=0", "--set", "reflow.loop.lora.rank=4",
                                       "--set", "reflow.loop.log_every=5", "-o", tmp_path / "reflow")
    assert code == 0, err
    component = "transformer" if layout == "sd3" else "unet"
    base = load_file(pipe / component / "diffusion_pytorch_model.safetensors")
    changed = []
    with safe_open(str(tmp_path / "reflow" / "teacher.safetensors"), "pt") as f:
        for k in f.keys():
            name = next((k[len(p):] for p in ("", "network.") if k[len(p):] in base and k.startswith(p)), None)
            if name is not None and not torch.equal(f.get_tensor(k), base[name]):
                changed.append(name)
    assert changed and all(any(t in c for t in ("to_q", "to_k", "to_v", "to_out.0")) for c in changed), changed

    conditions = tmp_path / "conditions.safetensors"
    save_file({k[len("cond."):]: v[:2].contiguous() for k, v in pairs.items() if k.startswith("cond.")}, conditions)
    args = ["--solver", "euler", "--nfe", "2", "-n", str(n)]
    prompted = sample(monkeypatch, capsys, tmp_path / "p.safetensors", tmp_path / "reflow", "--prompts", prompts_file,
                      *args)
    given = sample(monkeypatch, capsys, tmp_path / "c.safetensors", tmp_path / "reflow", "--cond", conditions, *args)
    assert torch.equal(prompted, given)
    assert rel(prompted, sample(monkeypatch, capsys, tmp_path / "t.safetensors", pipe, "--prompts", prompts_file,
                                *args)) > 1e-4  # the student is not its teacher


def test_training_stage_takes_prompts_for_a_teacher_with_data(sd15, tmp_path, monkeypatch, capsys):
    """consistency PIPE --data LATENTS --prompts FILE --negative-prompt ... --method lcm --guidance 3: data row i is
    conditioned on prompt i mod P and the negative prompt is the guided teacher's null. The student equals the one
    trained with --conditions FILE holding diffusers' own StableDiffusionPipeline.encode_prompt embeddings; other
    prompts train another student; a couple artifact as SOURCE refuses prompts (they belong to couple)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    data = tmp_path / "latents.safetensors"
    save_file({"x": torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(5))}, data)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    common = ["consistency", sd15, "--data", data, "--method", "lcm", "--guidance", "3", "--steps", "3",
              "--batch-size", "4", "--lr", "1e-3"]

    def student(out, *args):
        code, stdout, err = run_in_process(monkeypatch, capsys, *common, *args, "-o", tmp_path / out)
        assert code == 0, err
        return load_file(tmp_path / out / "teacher.safetensors")

    prompted = student("prompted", "--prompts", prompts_file, "--negative-prompt", NEGATIVE)

    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, [NEGATIVE] * 2)
    conditions = tmp_path / "diffusers-conditions.safetensors"
    save_file({"encoder_hidden_states": embeds.contiguous(), "null.encoder_hidden_states": negative[:1].contiguous()},
              conditions)
    given = student("given", "--conditions", conditions)
    other = student("other", "--prompt", "a blue tree", "--prompt", "a dog", "--negative-prompt", NEGATIVE)
    diff = max(float((prompted[k] - given[k]).abs().max()) for k in prompted)
    moved = max(float((prompted[k] - other[k]).abs().max()) for k in prompted)
    with capsys.disabled():  # the measured numbers, on the terminal with -s
        print(f"consistency --prompts against --conditions of diffusers' encode_prompt: max weight difference "
              f"{diff:.1e}; other prompts: {moved:.1e}")
    assert diff < 1e-5 and moved > 1e-4

    code, stdout, err = run_in_process(monkeypatch, capsys, "couple", sd15, "--prompts", prompts_file, "--nfe", "2",
                                       "-n", "2", "-o", tmp_path / "couple")
    assert code == 0, err
    code, stdout, err = run_in_process(monkeypatch, capsys, "consistency", tmp_path / "couple", "--prompt", "a cat",
                                       "--steps", "2", "-o", tmp_path / "refused")
    assert code == 2 and stdout == "" and not (tmp_path / "refused").exists()
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "couple artifact" in err, err


def test_bad_prompt_input_is_one_line_exit_2_nothing_written(sdxl, sd3, tmp_path, monkeypatch, capsys):
    """--prompt for a model with no text encoder, a pipeline folder missing a tokenizer, an unreadable tokenizer: one
    line, exit 2, no output and no artifact, for sample, couple and a training stage."""
    import shutil

    no_text = tiny_models.sd3_like_pipeline(tmp_path / "sd3-no-text")
    no_tokenizer_2 = tmp_path / "sdxl-no-tokenizer-2"
    shutil.copytree(sdxl, no_tokenizer_2)
    shutil.rmtree(no_tokenizer_2 / "tokenizer_2")
    no_tokenizer_3 = tmp_path / "sd3-no-tokenizer-3"
    shutil.copytree(sd3, no_tokenizer_3)
    shutil.rmtree(no_tokenizer_3 / "tokenizer_3")
    bad_tokenizer = tmp_path / "sd3-bad-tokenizer"
    shutil.copytree(sd3, bad_tokenizer)
    for f in (bad_tokenizer / "tokenizer_3").iterdir():
        f.write_text("not a tokenizer")
    ddpm = tiny_models.ddpm_pipeline(tmp_path / "ddpm")
    out = tmp_path / "out"
    cases = [
        (no_text, "has no text_encoder"),
        (no_tokenizer_2, "tokenizer_2: missing"),
        (no_tokenizer_3, "tokenizer_3: missing"),
        (bad_tokenizer, "not a readable tokenizer"),
        (ddpm, "takes no text"),
    ]
    for model, expected in cases:
        for command in (["sample", model, "--prompt", "a cat", "--nfe", "2", "-n", "1", "-o", out / "s.safetensors"],
                        ["couple", model, "--prompt", "a cat", "--nfe", "2", "-n", "2", "-o", out / "couple"],
                        ["shortcut", model, "--data", tmp_path / "none.safetensors", "--prompt", "a cat", "-o",
                         out / "shortcut"]):
            code, stdout, err = run_in_process(monkeypatch, capsys, *command)
            assert code == 2 and stdout == "" and not out.exists(), (command, err)
            assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and expected in err, (command, err)
    assert not (tmp_path / "cache" / "prompts").exists() or not any((tmp_path / "cache" / "prompts").iterdir())


def test_condition_rows_follow_the_sample_index_over_batches_and_processes():
    """A training stage's conditions of R rows: data row i (BatchSampler) and draw i (NoiseBatches, a teacher alone)
    take row i mod R, and the slices of two processes make up the one-process batch."""
    from accelkit.data import BatchSampler
    from accelkit.stages.student import NoiseBatches

    rows = {"cond.encoder_hidden_states": torch.arange(3.0).reshape(3, 1, 1).expand(3, 2, 4).clone()}
    data = torch.arange(10.0).reshape(10, 1) * 100

    def noise(g, n):
        return {"z": torch.randn(n, 2, generator=g)}

    for batch in (next(iter(BatchSampler(data, 4, seed=1, rows=rows))), ):
        index = (batch["x"][:, 0] / 100).long()
        assert torch.equal(batch["cond.encoder_hidden_states"][:, 0, 0], (index % 3).float())
    one = NoiseBatches(4, 1, 0, 1, noise, rows=rows)
    two = [NoiseBatches(4, 1, r, 2, noise, rows=rows) for r in range(2)]
    for b in range(3):
        full = next(one)
        halves = [next(t) for t in two]
        assert torch.equal(full["cond.encoder_hidden_states"][:, 0, 0], torch.arange(4 * b, 4 * b + 4.0) % 3)
        for k in full:
            assert torch.equal(full[k], torch.cat([h[k] for h in halves])), k


@pytest.mark.slow
def test_score_distill_from_a_teacher_alone_takes_prompts(sd15, tmp_path, monkeypatch, capsys):
    """score-distill PIPE --prompts FILE (no data, no couplings): the draws are conditioned on the prompts (other
    prompts train another generator); without them a text teacher is refused in one line."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    args = ["score-distill", sd15, "--method", "vsd", "--steps", "1", "--train-steps", "2", "--batch-size", "2"]
    code, stdout, err = run_in_process(monkeypatch, capsys, *args, "--prompts", prompts_file, "--negative-prompt",
                                       NEGATIVE, "-o", tmp_path / "sd")
    assert code == 0, err
    code, stdout, err = run_in_process(monkeypatch, capsys, *args, "--prompt", "a blue tree", "--negative-prompt",
                                       NEGATIVE, "-o", tmp_path / "other")
    assert code == 0, err
    a, b = (load_file(tmp_path / d / "teacher.safetensors") for d in ("sd", "other"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-6  # the prompts reached the training steps
    code, stdout, err = run_in_process(monkeypatch, capsys, *args, "-o", tmp_path / "refused")
    assert code == 2 and not (tmp_path / "refused").exists() and "--prompt" in err, err
