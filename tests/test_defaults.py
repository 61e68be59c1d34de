"""What a first use hits: float32 on the CPU for half-precision checkpoints (as diffusers), `inspect` reading only
headers, `--device cuda` without CUDA, and `export` choosing the single-file format for accelkit's own networks."""

import json
import resource
import time

import pytest
import tiny_models
import torch
from conftest import run_in_process

from accelkit.errors import AccelkitError
from accelkit.models.loading import load_teacher


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def fp16_ddpm(tmp_path_factory):
    """A DDPM pipeline whose UNet is stored in float16 (as hub checkpoints often are)."""
    from diffusers import DDPMScheduler

    folder = tmp_path_factory.mktemp("fp16") / "ddpm"
    unet = tiny_models.tiny_unet2d().half()
    return tiny_models.write_pipeline(folder, "DDPMPipeline", "unet", unet,
                                      DDPMScheduler(clip_sample=False))


def test_half_precision_checkpoint_runs_in_float32_on_the_cpu_like_diffusers(fp16_ddpm, tmp_path, monkeypatch,
                                                                             capsys):
    from diffusers import UNet2DModel

    from accelkit.evaluation import sample_batched
    from accelkit.export.exporter import stock_scheduler

    teacher = load_teacher(fp16_ddpm)
    assert {p.dtype for p in teacher.network.parameters()} == {torch.float32}
    assert {p.dtype for p in load_teacher(fp16_ddpm, dtype=None).network.parameters()} == {torch.float16}
    assert {p.dtype for p in load_teacher(fp16_ddpm, dtype="fp16").network.parameters()} == {torch.float16}

    # diffusers' own loop on the fp16 file loaded as float32 (from_pretrained's default), DPM-Solver++(2M), 8 steps
    scheduler, grid = stock_scheduler(teacher, "dpm++2m", 8)
    unet = UNet2DModel.from_pretrained(fp16_ddpm / "unet")
    assert unet.dtype == torch.float32
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    ours = sample_batched(teacher, noise, "dpm++2m", 8, grid=grid)
    assert rel(ours, x) < 1e-5, rel(ours, x)

    # the command line: the default is the float32 run; --dtype fp16 runs the stored half precision
    from safetensors.torch import load_file

    out = {}
    for name, extra in (("auto", ()), ("fp32", ("--dtype", "fp32")), ("fp16", ("--dtype", "fp16"))):
        code, _, err = run_in_process(monkeypatch, capsys, "sample", fp16_ddpm, "--solver", "dpm++2m", "--nfe", "4",
                                      "-n", "3", "-o", tmp_path / f"{name}.safetensors", *extra)
        assert code == 0, err
        out[name] = load_file(tmp_path / f"{name}.safetensors")["samples"]
    assert torch.equal(out["auto"], out["fp32"])
    assert not torch.equal(out["auto"], out["fp16"]) and rel(out["fp16"], out["auto"]) < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["sample", "couple", "eval"])
def test_device_cuda_without_cuda_is_a_one_line_error(fp16_ddpm, tmp_path, monkeypatch, capsys, command):
    args = {"sample": ("sample", fp16_ddpm, "--device", "cuda", "-o", tmp_path / "x.png"),
            "couple": ("couple", fp16_ddpm, "--device", "cuda", "-n", "4", "-o", tmp_path / "x"),
            "eval": ("eval", fp16_ddpm, "--device", "cuda", "--nfe", "2", "--plot", tmp_path / "x.png")}[command]
    code, stdout, err = run_in_process(monkeypatch, capsys, *args)
    assert code == 2 and stdout == "", err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "--device cuda: CUDA is not available" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []


def sparse_pipeline(folder):
    """A pipeline folder holding an SD1.5-size UNet2DConditionModel (860 M parameters, 3.4 GB in float32) whose
    weights file is a real safetensors header followed by a hole: the file's size is that of the weights, but no
    byte of them is written (a sparse file)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    (folder / "unet").mkdir(parents=True)
    unet.save_config(folder / "unet")
    header, offset = {}, 0
    for name, p in unet.state_dict().items():
        size = p.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, sum(p.numel() for p in unet.parameters()), weights.stat().st_size


def test_inspect_reads_headers_only(tmp_path, monkeypatch, capsys):
    folder, n_params, size = sparse_pipeline(tmp_path / "sd15")
    assert size > 3e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    teacher = load_teacher(folder, device="meta")
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    desc = teacher.describe()
    assert desc["parameters"] == n_params and desc["dtype"] == "float32"
    assert all(p.is_meta for p in teacher.network.parameters())
    assert grown_mib < 1000, f"peak memory grew by {grown_mib:.0f} MiB: the weights were read"
    assert elapsed < 10, f"{elapsed:.1f} s"  # about 1 s on an idle 2-core VM; reading the 3.4 GB would be far more
    code, stdout, err = run_in_process(monkeypatch, capsys, "inspect", folder, "--json")
    assert code == 0, err
    assert json.loads(stdout)["parameters"] == n_params
    print(f"inspect of a {size / 1e9:.1f} GB checkpoint: {elapsed:.2f} s, peak memory +{grown_mib:.0f} MiB")
    # the checks of a full load hold: a config that does not match the weights' shapes is named
    bad_folder, _, _ = sparse_pipeline(tmp_path / "bad")
    config = json.loads((bad_folder / "unet" / "config.json").read_text())
    (bad_folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 3}))
    with pytest.raises(AccelkitError, match="key 'conv_in.weight' has shape"):
        load_teacher(bad_folder, device="meta")


def test_export_picks_safetensors_for_accelkit_networks(tmp_path, monkeypatch, capsys):
    from accelkit.models.builtin import MLP, builtin_call
    from accelkit.models.loading import save_teacher
    from accelkit.schedules import LinearSchedule
    from accelkit.teacher import NetworkTeacher

    torch.manual_seed(0)
    path = save_teacher(NetworkTeacher(MLP(dim=2, hidden=8, depth=1), builtin_call, "flow", LinearSchedule(), (2,)),
                        tmp_path / "toy.safetensors")
    code, stdout, err = run_in_process(monkeypatch, capsys, "export", path, "-o", tmp_path / "out")
    assert code == 0, err
    written = tmp_path / "out" / "toy.safetensors"
    assert stdout.strip() == str(written)
    x = torch.randn(5, 2)
    assert torch.equal(load_teacher(written).denoise(x, 0.5)[0], load_teacher(path).denoise(x, 0.5)[0])


@pytest.mark.slow
def test_null_class_is_guidances_null_and_is_recorded(tmp_path, monkeypatch, capsys):
    """--null-class N on a class-conditional UNet2DModel trained with a null class: the same samples as the null
    condition given as a tensor file, N recorded in the output; bad values are one-line errors."""
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file, save_file

    from accelkit.models.loading import read_safetensors_metadata

    folder = tiny_models.write_pipeline(tmp_path / "class", "DDPMPipeline", "unet", tiny_models.tiny_unet2d(4),
                                        DDPMScheduler(clip_sample=False))
    save_file({"class_labels": torch.tensor([3])}, tmp_path / "null.safetensors")
    common = ["sample", folder, "--label", "0,1", "--guidance", "3", "--solver", "dpm++2m", "--nfe", "4", "-n", "2"]
    code, _, err = run_in_process(monkeypatch, capsys, *common, "--null-class", "3", "-o", tmp_path / "a.safetensors")
    assert code == 0, err
    code, _, err = run_in_process(monkeypatch, capsys, *common, "--null-cond", tmp_path / "null.safetensors", "-o",
                                  tmp_path / "b.safetensors")
    assert code == 0, err
    a = load_file(tmp_path / "a.safetensors")["samples"]
    assert torch.equal(a, load_file(tmp_path / "b.safetensors")["samples"])
    code, _, err = run_in_process(monkeypatch, capsys, *common, "--null-class", "2", "-o", tmp_path / "c.safetensors")
    assert code == 0 and not torch.equal(load_file(tmp_path / "c.safetensors")["samples"], a), err
    settings = json.loads(read_safetensors_metadata(tmp_path / "a.safetensors")["settings"])
    assert settings["null_class"] == 3
    for extra, expected in ((("--null-class", "4"), "--null-class 4: expected a class label in 0..3"),
                            (("--null-class", "-1"), "--null-class -1"),
                            (("--null-class", "3", "--null-cond", tmp_path / "null.safetensors"), "not both")):
        out = tmp_path / "bad.safetensors"
        code, stdout, err = run_in_process(monkeypatch, capsys, *common, *extra, "-o", out)
        assert code == 2 and stdout == "" and not out.exists(), err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and expected in err, err
    text_model = tiny_models.sd_like_pipeline(tmp_path / "text")
    code, _, err = run_in_process(monkeypatch, capsys, "sample", text_model, "--null-class", "1", "-o",
                                  tmp_path / "d.safetensors")
    assert code == 2 and "takes no class labels" in err and not (tmp_path / "d.safetensors").exists(), err
