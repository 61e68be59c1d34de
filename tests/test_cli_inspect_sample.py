"""accelkit inspect and accelkit sample as a user runs them: outputs, conditioning, guidance and bad input."""

import json
import shutil

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

from accelkit.models.builtin import MLP, builtin_call
from accelkit.models.loading import load_teacher, read_safetensors, save_teacher
from accelkit.noise import sample_noise
from accelkit.schedules import LinearSchedule
from accelkit.solvers import solve
from accelkit.teacher import Condition, NetworkTeacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    mlp = NetworkTeacher(MLP(dim=2, hidden=16, depth=1), builtin_call, "flow", LinearSchedule(), (2,))
    save_teacher(mlp, root / "mlp.safetensors")
    tiny_models.ddpm_pipeline(root / "ddpm")
    tiny_models.sd_like_pipeline(root / "sd")
    tiny_models.sd3_like_pipeline(root / "sd3-vae", vae=True)
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file

    save_file({"encoder_hidden_states": torch.randn(3, 4, 12, generator=g)}, root / "cond.safetensors")
    return root


def test_inspect_table_json_and_stdin(cli, files):
    out = cli("inspect", files / "mlp.safetensors")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(files / "mlp.safetensors")
    assert "accelkit.MLP" in out.stderr and "flow" in out.stderr and "unconditional" in out.stderr
    out = cli("inspect", "--json", input=f"{files / 'ddpm'}\n")
    assert out.returncode == 0, out.stderr
    desc = json.loads(out.stdout)
    teacher = load_teacher(files / "ddpm")
    assert desc["parameters"] == sum(p.numel() for p in teacher.network.parameters())
    assert desc["architecture"] == "diffusers.UNet2DModel" and desc["prediction_type"] == "eps"
    assert desc["schedule"]["name"] == "vp-discrete" and desc["sample_shape"] == [1, 8, 8]
    assert desc["conditioning"] == {"kind": "none"} and desc["dtype"] == "float32"


def test_sample_png_grid_and_scatter(cli, files, tmp_path):
    out = cli("sample", files / "ddpm", "--nfe", "2", "-n", "5", "-o", tmp_path / "grid.png")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "grid.png")
    img = Image.open(tmp_path / "grid.png")
    assert img.mode == "L" and img.size == (3 * 48 + 4 * 2, 2 * 48 + 3 * 2)  # 3 x 2 tiles of 8 px enlarged 6 x
    out = cli("sample", files / "mlp.safetensors", "--nfe", "4", "-n", "200", "-o", tmp_path / "points.png")
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "points.png").format == "PNG"
    out = cli("sample", files / "mlp.safetensors", "-n", "2", "-o", tmp_path / "points.png")
    assert out.returncode == 2 and "exists" in out.stderr and "--force" in out.stderr


@pytest.mark.slow
def test_sample_tensors_equal_solver_and_do_not_depend_on_batch_size(cli, files, tmp_path):
    for b in (2, 5):
        out = cli("sample", files / "ddpm", "--solver", "dpm++2m", "--grid", "logsnr", "--nfe", "3", "-n", "5",
                  "--seed", "11", "--batch-size", str(b), "-o", tmp_path / f"b{b}.safetensors")
        assert out.returncode == 0, out.stderr
    s2, meta = read_safetensors(tmp_path / "b2.safetensors")
    s5, _ = read_safetensors(tmp_path / "b5.safetensors")
    assert json.loads(meta["settings"])["seed"] == 11
    assert torch.allclose(s2["samples"], s5["samples"], rtol=1e-4, atol=1e-4)  # batched kernels round differently
    teacher = load_teacher(files / "ddpm")
    ref = solve(teacher, sample_noise(11, range(5), (1, 8, 8)), solver="dpm++2m", nfe=3, grid="logsnr")
    assert torch.allclose(s5["samples"], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_text_guidance(cli, files, tmp_path):
    """UNet2DConditionModel with text embeddings: guidance 1 is exactly the unguided conditional ODE; 7.5 is the
    guided one against zero embeddings."""
    res = {}
    for w in ("1", "7.5"):
        out = cli("sample", files / "sd", "--nfe", "2", "-n", "3", "--guidance", w, "--cond",
                  files / "cond.safetensors", "-o", tmp_path / f"w{w}.safetensors")
        assert out.returncode == 0, out.stderr
        res[w] = read_safetensors(tmp_path / f"w{w}.safetensors")[0]["samples"]
    teacher = load_teacher(files / "sd")
    cond = Condition(encoder_hidden_states=read_safetensors(files / "cond.safetensors")[0]["encoder_hidden_states"])
    noise = sample_noise(0, range(3), (3, 8, 8))
    assert torch.equal(res["1"], solve(teacher, noise, nfe=2, cond=cond))
    guided = solve(teacher.with_guidance(7.5), noise, nfe=2, cond=cond)
    assert torch.allclose(res["7.5"], guided, atol=1e-5)
    assert (res["7.5"] - res["1"]).abs().max() > 1e-2


@pytest.mark.slow
def test_latent_pipeline_png_is_decoded_by_its_vae(cli, files, tmp_path):
    """... on the shifted grid with the scheduler's shift (3), as the SD3 pipeline samples."""
    out = cli("sample", files / "sd3-vae", "--nfe", "2", "-n", "2", "--grid", "shift", "-o", tmp_path / "grid.png")
    assert out.returncode == 0, out.stderr
    from accelkit.images import image_grid
    from accelkit.models.diffusers_models import decode_latents, load_vae

    teacher = load_teacher(files / "sd3-vae")
    assert teacher.info["vae"] == str(files / "sd3-vae" / "vae")
    latents = solve(teacher, sample_noise(0, range(2), (4, 8, 8)), nfe=2, grid="shift", shift=3.0)
    expected = image_grid(decode_latents(load_vae(files / "sd3-vae" / "vae"), latents))
    got = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def bad(files):
    root = files / "bad"
    root.mkdir()
    data = (files / "mlp.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) - 100])
    torch.save({"w": torch.zeros(2)}, root / "model.ckpt")
    (root / "notamodel").mkdir()
    (root / "notamodel" / "readme.txt").write_text("hello")
    shutil.copytree(files / "ddpm", root / "mismatch")
    cfg = json.loads((root / "mismatch" / "unet" / "config.json").read_text())
    (root / "mismatch" / "unet" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [8, 24]}))
    shutil.copytree(files / "ddpm", root / "unknown")
    (root / "unknown" / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "FancyNet"}))
    return root


@pytest.mark.parametrize("args, message", [
    (("inspect", "{bad}/missing.safetensors"), "missing.safetensors: no such file"),
    (("inspect", "{bad}/cut.safetensors"), "cut.safetensors: not a readable safetensors file"),
    (("inspect", "{bad}/model.ckpt"), "model.ckpt: pickled checkpoint refused"),
    (("inspect", "{bad}/notamodel"), "notamodel: not a model"),
    (("inspect", "{bad}/mismatch"), "do not match the config: key 'down_blocks"),
    (("inspect", "{bad}/unknown"), "unknown architecture 'FancyNet'"),
    (("sample", "{files}/ddpm", "--solver", "nosuch", "-o", "{out}"), "--solver 'nosuch': unknown solver"),
    (("sample", "{files}/ddpm", "--nfe", "0", "-o", "{out}"), "--nfe 0: expected at least 1"),
    (("sample", "{files}/ddpm", "--nfe", "2", "--grid", "0.3,0.8,0", "-o", "{out}"), "strictly decreasing"),
    (("sample", "{bad}/model.ckpt", "-o", "{out}"), "pickled checkpoint refused"),
], ids=["missing", "truncated", "pickle", "not-a-model", "mismatch", "unknown-arch", "solver", "nfe0", "grid",
        "sample-pickle"])
def test_bad_input_one_line_exit_2(cli, files, bad, tmp_path, args, message):
    out_file = tmp_path / "out.png"
    args = [a.format(bad=bad, files=files, out=out_file) for a in args]
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], out.stderr
    assert "Traceback" not in out.stderr and not [ln for ln in lines if ln.startswith("error")][1:]
    assert not out_file.exists() and out.stdout == ""


def test_debug_shows_traceback(cli, bad):
    out = cli("--debug", "inspect", bad / "mismatch")
    assert out.returncode != 0 and "Traceback" in out.stderr and "AccelkitError" in out.stderr
