"""Training data from a folder of images, in pixels or, for a latent teacher, encoded once with its VAE and cached.

A folder's images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``, found recursively, in sorted path order) are
read with Pillow, converted to RGB (or to grayscale for a one-channel teacher), resized on their shorter side to
the resolution and centre-cropped, as diffusers' text-to-image training examples do (bilinear resize, centre crop),
and scaled from [0, 255] to [-1, 1].

For a latent teacher (a pipeline folder with ``vae/``) the resolution is the latent size times the VAE's scale
factor 2^(len(block_out_channels) - 1), and each image becomes the latent

    z = (E(x).mean - shift_factor) * scaling_factor,

the mean of the VAE's posterior rather than a draw from it, so that the latents are a function of the files alone
and can be cached (diffusers' examples draw a new posterior sample every step; for SD's VAE its standard deviation
is small next to the latent's). The inverse is :func:`accelkit.models.diffusers_models.decode_latents`.

The latents are cached by content: ``<cache>/latents/<sha256>.safetensors``, the hash over the image files' bytes and
relative paths, the VAE folder's files and the resolution, so that training runs and epochs read the tensor instead
of running the encoder. The cache is ``$ACCELKIT_CACHE`` or ``~/.cache/accelkit``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import AccelkitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_FORMAT = "accelkit.latents/1"


def cache_root() -> Path:
    return Path(os.environ.get("ACCELKIT_CACHE") or Path.home() / ".cache" / "accelkit")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` in sorted path order; a one-line error when there are none."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AccelkitError(f"data {folder}: a folder with no images ({', '.join(IMAGE_SUFFIXES)}); expected a "
                            "folder of images, a built-in data set or a .safetensors/.npy file")
    return files


def read_image(path: Path, size: tuple[int, int] | None, channels: int) -> Tensor:
    """One image as a (channels, H, W) tensor in [-1, 1]: shorter side resized to fit ``size``, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if size is not None and image.size != (size[1], size[0]):
                h, w = size
                scale = max(h / image.height, w / image.width)
                resized = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
                image = image.resize(resized, Image.Resampling.BILINEAR)
                left, top = (image.width - w) // 2, (image.height - h) // 2
                image = image.crop((left, top, left + w, top + h))
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise AccelkitError(f"{path}: not a readable image ({' '.join(str(e).split())})") from None
    x = torch.from_numpy(pixels.copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0


def read_image_folder(folder: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3) -> Tensor:
    """The folder's images as one (n, channels, H, W) tensor in [-1, 1]. Without ``size`` every image must have the
    size of the first (a one-line error names the first that does not)."""
    files = image_files(folder)
    images = [read_image(files[0], size, channels)]
    for path in files[1:]:
        x = read_image(path, size, channels)
        if x.shape != images[0].shape:
            raise AccelkitError(f"{path}: an image of {x.shape[2]}x{x.shape[1]} pixels, but {files[0].name} has "
                                f"{images[0].shape[2]}x{images[0].shape[1]}; give images of one size, or train a "
                                "teacher with a resolution (a latent or image model) that they are resized to")
        images.append(x)
    return torch.stack(images).contiguous()


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)


def _folder_digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def latents_key(folder: Path, files: list[Path], vae_dir: Path, size: tuple[int, int]) -> str:
    """The cache key of ``folder``'s images encoded by the VAE in ``vae_dir`` at ``size`` (a sha256)."""
    from .artifacts import content_hash

    record = {"format": CACHE_FORMAT, "images": _folder_digest(files, folder), "vae": content_hash(vae_dir),
              "size": list(size)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: Tensor, batch_size: int = 8) -> Tensor:
    """Latents (vae.encode(x).mean - shift_factor) * scaling_factor of images in [-1, 1], in batches, float32."""
    scale = float(vae.config.get("scaling_factor") or 1.0)
    shift = float(vae.config.get("shift_factor") or 0.0)
    param = next(vae.parameters())
    out = []
    for x in images.split(batch_size):
        posterior = vae.encode(x.to(param.device, param.dtype)).latent_dist
        out.append(((posterior.mean - shift) * scale).float().cpu())
    return torch.cat(out)


def latent_image_folder(folder: str | os.PathLike, vae_dir: str | os.PathLike, latent_shape: tuple[int, ...],
                        allow_pickle: bool = False, vae_config: str | os.PathLike | None = None) -> Tensor:
    """The folder's images as latents of ``latent_shape`` (C, h, w) of the VAE in ``vae_dir`` (a diffusers VAE
    folder, or an original single file with its VAE config folder ``vae_config``): read from the cache, else resized
    to (h, w) times the VAE's scale factor, encoded and cached."""
    from .artifacts import save_safetensors
    from .models.diffusers_models import load_vae
    from .models.loading import read_safetensors

    folder, vae_dir = Path(folder), Path(vae_dir)
    files = image_files(folder)
    config_dir = Path(vae_config) if vae_config is not None else vae_dir
    if not (config_dir / "config.json").is_file():
        raise AccelkitError(f"data {folder}: the teacher's VAE {vae_dir} has no config.json to read its scale factor "
                            "from; expected a diffusers VAE folder or an original single file with its config")
    config = json.loads((config_dir / "config.json").read_text())
    factor = vae_scale_factor(config)
    size = (latent_shape[1] * factor, latent_shape[2] * factor)
    key = latents_key(folder, files, vae_dir, size)
    cached = cache_root() / "latents" / f"{key}.safetensors"
    if cached.is_file():
        try:
            latents = read_safetensors(cached)[0]["latents"]
            if tuple(latents.shape[1:]) == tuple(latent_shape):
                return latents
        except (AccelkitError, KeyError):
            pass  # a damaged cache entry is encoded again
    vae = load_vae(vae_dir, allow_pickle=allow_pickle, config=vae_config)
    channels = int(config.get("in_channels", 3))
    latents = encode_images(vae, read_image_folder(folder, size, channels))
    if tuple(latents.shape[1:]) != tuple(latent_shape):
        raise AccelkitError(f"data {folder}: the VAE in {vae_dir} encodes {size[1]}x{size[0]} images to latents of "
                            f"shape {list(latents.shape[1:])}, but the teacher's samples are {list(latent_shape)}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(cached, {"latents": latents.contiguous()},
                     {"format": CACHE_FORMAT, "images": str(folder.resolve()), "count": str(len(files))})
    return latents


def training_images(folder: str | os.PathLike, teacher, allow_pickle: bool = False):
    """A folder of images as training data for ``teacher``: latents of its VAE for a latent teacher, else pixels at
    its sample shape (channels, H, W). Returns an :class:`accelkit.data.DataSet`."""
    from .data import DataSet

    shape = tuple(teacher.sample_shape)
    vae_dir = getattr(teacher, "info", {}).get("vae")
    info = {"kind": "image-folder", "path": str(Path(folder).resolve()), "count": len(image_files(folder))}
    if vae_dir:
        x = latent_image_folder(folder, vae_dir, shape, allow_pickle=allow_pickle,
                                vae_config=getattr(teacher, "info", {}).get("vae_config"))
        info.update({"encoded_with": str(vae_dir), "latents": "posterior mean x scaling_factor"})
    elif len(shape) == 3 and shape[0] in (1, 3):
        x = read_image_folder(folder, (shape[1], shape[2]), shape[0])
    else:
        raise AccelkitError(f"data {folder}: a folder of images, but the teacher's samples have shape {list(shape)} "
                            "and it has no VAE to encode them; expected an image or latent teacher")
    return DataSet(str(folder), x, info)


__all__ = ["IMAGE_SUFFIXES", "image_files", "read_image", "read_image_folder", "encode_images",
           "latent_image_folder", "training_images", "vae_scale_factor", "latents_key"]
