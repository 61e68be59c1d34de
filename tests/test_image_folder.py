"""`--data DIR` of images: pixels in [-1, 1] at the teacher's resolution (shorter side resized, centre crop), or for a
latent teacher the VAE posterior's mean times its scaling factor, equal to diffusers' own preprocessing and encoder;
encoded once and cached by content; a training stage trains on it end to end; bad folders are one line."""

import json

import numpy as np
import pytest
import tiny_models
import torch
from conftest import run_in_process
from PIL import Image

from accelkit.errors import AccelkitError
from accelkit.image_folder import read_image_folder, training_images


def two_block_vae():
    """Scale factor 2: 16x16 images -> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.7, shift_factor=0.1)


@pytest.fixture(scope="module")
def latent_pipe(tmp_path_factory):
    """An unconditional latent DDIM pipeline: a 4-channel 8x8 UNet2DModel and the two-block VAE."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    return tiny_models.write_pipeline(tmp_path_factory.mktemp("ldm") / "pipe", "LDMPipeline", "unet", unet,
                                      DDIMScheduler(clip_sample=False), two_block_vae())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six 16x16 RGB images (random smooth colours) in a folder with a subfolder, and one 24x16 image elsewhere."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "set" / "more").mkdir(parents=True)
    for k in range(6):
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        pixels = np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))
        Image.fromarray(pixels).save(root / "set" / ("more" if k % 2 else ".") / f"{k}.png")
    wide = np.zeros((16, 24, 3), dtype=np.uint8)
    wide[:, 4:20] = 200  # a bright centre 16 wide between dark 4-pixel bands
    (root / "wide").mkdir()
    Image.fromarray(wide).save(root / "wide" / "wide.png")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latents"


def test_latents_equal_diffusers_preprocessing_and_encoder_and_are_cached(latent_pipe, images, cache, monkeypatch):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from accelkit.models.loading import load_teacher

    teacher = load_teacher(latent_pipe)
    assert tuple(teacher.sample_shape) == (4, 8, 8)
    ds = training_images(images / "set", teacher)
    files = sorted((images / "set").rglob("*.png"))
    vae = AutoencoderKL.from_pretrained(latent_pipe / "vae")
    x = VaeImageProcessor(vae_scale_factor=2).preprocess([Image.open(f).convert("RGB") for f in files])
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    assert ds.samples.shape == (6, 4, 8, 8)
    assert float((ds.samples - want).abs().max()) < 1e-5
    assert len(list(cache.glob("*.safetensors"))) == 1

    def no_vae(*a, **k):
        raise AssertionError("the cached latents should have been read")

    monkeypatch.setattr("accelkit.models.diffusers_models.load_vae", no_vae)
    assert torch.equal(training_images(images / "set", teacher).samples, ds.samples)


def test_pixels_are_resized_on_the_shorter_side_and_centre_cropped(images):
    x = read_image_folder(images / "wide", size=(8, 8))  # 24x16 -> 12x8, crop the centre 8 columns
    assert x.shape == (1, 3, 8, 8)
    # the dark side bands are cropped away (a squashing resize would keep 1.3 dark columns at each side): only the
    # bilinear filter's blend reaches the edge columns; inside it is the bright 200 / 127.5 - 1 = 0.57
    assert float(x[..., 1:-1].min()) > 0.56 and float(x.min()) > 0.3
    native = read_image_folder(images / "set")
    assert native.shape == (6, 3, 16, 16) and -1.0 <= float(native.min()) and float(native.max()) <= 1.0


def test_a_training_stage_trains_on_an_encoded_image_folder(latent_pipe, images, tmp_path, monkeypatch, capsys,
                                                            cache):
    out = tmp_path / "ect"
    code, stdout, err = run_in_process(monkeypatch, capsys, "consistency", latent_pipe, "--method", "ect", "--data",
                                       images / "set", "--steps", "3", "--batch-size", "4", "--device", "cpu",
                                       "-o", out, "--set", "consistency.loop.checkpoint_every=0")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["inputs"]["data"]["path"] == str(images / "set")  # the folder's content is in the identity
    assert len(list(cache.glob("*.safetensors"))) == 1  # encoded once, for the whole run


def test_bad_image_folders_are_one_line(latent_pipe, images, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(AccelkitError, match="no images"):
        read_image_folder(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("set/0.png", "wide/wide.png"):
        (mixed / name.replace("/", "-")).write_bytes((images / name).read_bytes())
    with pytest.raises(AccelkitError, match="one size"):
        read_image_folder(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0.png").write_bytes(b"not a png")
    code, _, err = run_in_process(monkeypatch, capsys, "consistency", latent_pipe, "--method", "ect", "--data",
                                  broken, "--steps", "2", "--device", "cpu", "-o", tmp_path / "out")
    assert code == 2 and "0.png: not a readable image" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
