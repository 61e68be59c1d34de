"""Original (LDM-layout) single-file checkpoints: a file written from the tiny SD1.5 pipeline (the keys converted to
the original names) loads, offline, with every tensor of the UNet, the VAE and the text encoder equal to the
pipeline folder's (and to diffusers' own StableDiffusionPipeline.from_single_file); inspect says what it found; the
shipped SD1.5 / SD2 / SDXL configs build the published architectures; bad input is one line."""

import json

import pytest
import tiny_models
import torch
from conftest import run_in_process
from safetensors.torch import load_file, save_file

from accelkit.errors import AccelkitError


def assert_equal_state(mine, ref, what):
    a, b = mine.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(tiny SD1.5 pipeline folder, its original single file, its config files without weights)."""
    root = tmp_path_factory.mktemp("original")
    pipe = tiny_models.sd15_text_pipeline(root / "pipe")
    single = tiny_models.write_original_single_file(pipe, root / "sd15-original.safetensors")
    return pipe, single, tiny_models.config_only_copy(pipe, root / "config")


def test_original_single_file_loads_the_same_weights_as_the_folder(original, monkeypatch):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from accelkit.models.diffusers_models import load_vae
    from accelkit.models.loading import load_teacher
    from accelkit.models.original_layout import load_original_text_encoder, original_layout_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, single, config = original
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in load_file(single))
    layout = original_layout_of(single)
    assert layout.family == "sd15" and sorted(layout.components) == ["text_encoder", "unet", "vae"]

    folder = load_teacher(pipe)
    teacher = load_teacher(single, config=config)  # config files only: every weight comes from the single file
    assert_equal_state(teacher.network, folder.network, "unet")
    assert (teacher.prediction, teacher.schedule, teacher.time_input, teacher.sample_shape) == \
        (folder.prediction, folder.schedule, folder.time_input, folder.sample_shape)
    assert teacher.info["layout"] == "ldm" and teacher.info["family"] == "sd15"
    vae = load_vae(teacher.info["vae"], config=teacher.info["vae_config"])
    assert_equal_state(vae, AutoencoderKL.from_pretrained(pipe / "vae"), "vae")
    text = load_original_text_encoder(single, config)
    assert_equal_state(text, CLIPTextModel.from_pretrained(pipe / "text_encoder"), "text_encoder")
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    cond = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    from accelkit.teacher import Condition

    with torch.no_grad():
        assert torch.equal(teacher.velocity(x, t, Condition(encoder_hidden_states=cond)),
                           folder.velocity(x, t, Condition(encoder_hidden_states=cond)))

    # diffusers' own single-file loader, given the same local config folder, reads the same tensors
    ref = StableDiffusionPipeline.from_single_file(str(single), config=str(config), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    for name, mine in (("unet", teacher.network), ("vae", vae), ("text_encoder", text)):
        assert_equal_state(mine, getattr(ref, name), f"from_single_file {name}")


def test_inspect_says_layout_family_and_components(original, monkeypatch, capsys):
    _, single, config = original
    code, out, err = run_in_process(monkeypatch, capsys, "inspect", single, "--config", config, "--json")
    assert code == 0, err
    desc = json.loads(out)
    assert desc["layout"] == "ldm" and desc["family"] == "sd15" and desc["format"].startswith("original")
    assert desc["components"] == ["text_encoder", "unet", "vae"] and desc["vae"] == str(single)
    assert desc["parameters"] == sum(v.numel() for k, v in load_file(single).items()
                                     if k.startswith("model.diffusion_model."))
    code, out, err = run_in_process(monkeypatch, capsys, "inspect", single, "--config", config)
    assert code == 0 and "sd15" in err and "text_encoder, unet, vae" in err, err


@pytest.mark.parametrize("family,unet_m,vae_m,text_m", [("sd15", 859.52, 83.65, 123.06),
                                                       ("sd2", 865.91, 83.65, 340.39),
                                                       ("sdxl", 2567.46, 83.65, 123.06)])
def test_shipped_configs_are_the_published_architectures(family, unet_m, vae_m, text_m):
    """The shipped config folders build the published networks (parameter counts in millions, on the meta
    device), and an original file of that family (its keys from the built network) is read with them: detection
    from the keys, conversion and the key/shape checks of a full load (structure only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from accelkit.models.loading import structure_only
    from accelkit.models.original_layout import CONFIGS_DIR, detect_original_layout, unet_state_dict

    folder = CONFIGS_DIR / family
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig(**json.loads((folder / "text_encoder" / "config.json").read_text())))
    for net, millions in ((unet, unet_m), (vae, vae_m), (text, text_m)):
        assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    original = tiny_models._ldm_unet(unet.state_dict(), 2)
    if family == "sd2":
        original["cond_stage_model.model.positional_embedding"] = torch.empty(77, 1024, device="meta")
    layout = detect_original_layout({k: tuple(v.shape) for k, v in original.items()})
    assert layout.family == family
    with structure_only():
        state = unet_state_dict(original, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def test_bad_single_files_are_one_line(original, tmp_path, monkeypatch, capsys):
    pipe, single, config = original
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(unknown))
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(flux))
    no_unet_config = tmp_path / "not-a-pipeline"
    no_unet_config.mkdir()
    wrong_size = tiny_models.config_only_copy(pipe, tmp_path / "wrong")
    cfg = json.loads((wrong_size / "unet" / "config.json").read_text())
    (wrong_size / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 16}))
    out = tmp_path / "out" / "x.safetensors"
    cases = [
        ((unknown,), "unknown single-file layout"),
        ((flux,), "a Flux transformer original single file"),
        ((single, "--config", no_unet_config), "expected a diffusers pipeline folder"),
        ((single, "--config", wrong_size), "do not match the config"),
        ((single,), "has shape"),  # the shipped SD1.5 config is not the tiny pipeline's size
        ((single, "--config", config, "--prompt", "a cat"), "holds no tokenizer"),
    ]
    for args, expected in cases:
        code, stdout, err = run_in_process(monkeypatch, capsys, "sample", *args, "--nfe", "2", "-n", "1", "-o", out)
        assert code == 2 and stdout == "" and not out.exists() and not out.parent.exists(), (args, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and expected in err, (args, err)
    with pytest.raises(AccelkitError, match="holds no VAE"):
        from accelkit.models.original_layout import load_original_vae

        no_vae = tmp_path / "unet-only.safetensors"
        save_file({k: v for k, v in load_file(single).items() if k.startswith("model.")}, str(no_vae))
        load_original_vae(no_vae, config / "vae")


def test_a_folder_of_images_encodes_with_the_vae_inside_a_single_file(original, tmp_path, monkeypatch):
    """`--data DIR` for a single-file teacher: the latents of the file's VAE equal those of the folder's VAE."""
    import numpy as np
    from PIL import Image

    from accelkit.image_folder import training_images
    from accelkit.models.loading import load_teacher

    monkeypatch.setenv("ACCELKIT_CACHE", str(tmp_path / "cache"))
    pipe, single, config = original
    folder_teacher, file_teacher = load_teacher(pipe), load_teacher(single, config=config)
    images = tmp_path / "images"
    images.mkdir()
    size = 8 * 2 ** (len(json.loads((pipe / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3)).astype(np.uint8)).save(images / f"{k}.png")
    a = training_images(images, folder_teacher).samples
    b = training_images(images, file_teacher).samples
    assert a.shape == (3, *folder_teacher.sample_shape) and torch.allclose(a, b, atol=1e-6)
