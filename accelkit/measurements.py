"""Reading and writing the images, masks and measurements of ``accelkit restore`` (PNG or safetensors).

* Images: a ``.png`` holds one image (grayscale or RGB; alpha dropped), read to [-1, 1] as (1, C, H, W); a
  ``.safetensors`` file holds a batch (N, C, H, W) (or one (C, H, W) image) under the key asked for or as its only
  tensor. PNG output of several images is a grid for viewing (as ``accelkit sample`` writes), of one image that image.
* Masks (1 = observed, 0 = missing): a named mask, which names the *hidden* part (``bottom-half``, ``top-half``,
  ``left-half``, ``right-half``, ``center``: the central square of half the side, ``random:P``: each pixel hidden
  with probability P, image i's pattern from (seed, i)), or a file: PNG (white = observed) or safetensors.
* A measurement file (``restore --degrade``): safetensors with ``y``, ``mask`` for inpainting and ``clean`` (the
  reference), and the operator's settings in the header (``accelkit.measurement``: task, factor, blur, noise_std,
  seed), so ``restore`` needs only ``--input``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import AccelkitError

MASK_NAMES = ("bottom-half", "top-half", "left-half", "right-half", "center")
MEASUREMENT_KEY = "accelkit.measurement"
IMAGE_SUFFIXES = (".png", ".safetensors")


def _suffix(path: str | Path, what: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise AccelkitError(f"{what} {path}: expected a .png or .safetensors file")
    return suffix


def read_png(path: str | Path) -> Tensor:
    """One PNG image as (1, C, H, W) float32 in [-1, 1] (C = 1 for grayscale, 3 for colour)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("1", "L", "LA", "I", "I;16") else im.convert("RGB")
            a = np.asarray(im, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise AccelkitError(f"{path}: not a readable PNG image ({e})") from None
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(a / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def read_tensors(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    from .models.loading import read_safetensors

    p = Path(path)
    if not p.is_file():
        raise AccelkitError(f"{what} {path}: no such file")
    tensors, meta = read_safetensors(str(p))
    if not tensors:
        raise AccelkitError(f"{what} {path}: holds no tensors")
    return tensors, meta or {}


def read_images(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> Tensor:
    """A batch of images (N, C, H, W) float32 from a PNG (N = 1) or a safetensors file (key from ``keys``, else its
    only tensor)."""
    if _suffix(path, what) == ".png":
        if not Path(path).is_file():
            raise AccelkitError(f"{what} {path}: no such file")
        return read_png(path)
    tensors, _ = read_tensors(path, what)
    key = next((k for k in keys if k in tensors), None)
    if key is None:
        if len(tensors) != 1:
            raise AccelkitError(f"{what} {path}: holds tensors {sorted(tensors)}; expected one of "
                                f"{', '.join(keys) or 'a single tensor'}")
        key = next(iter(tensors))
    x = tensors[key]
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or not x.is_floating_point():
        raise AccelkitError(f"{what} {path}: tensor {key!r} has shape {list(x.shape)} and dtype {x.dtype}; expected "
                            "floating-point images (N, C, H, W)")
    return x.float().contiguous()


def named_mask(name: str, count: int, image_shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """A named mask (see the module doc) of shape (1 or count, 1, H, W), 1 = observed."""
    _, h, w = image_shape
    m = torch.ones(1, 1, h, w)
    if name == "bottom-half":
        m[..., h // 2:, :] = 0
    elif name == "top-half":
        m[..., : h - h // 2, :] = 0
    elif name == "left-half":
        m[..., :, : w - w // 2] = 0
    elif name == "right-half":
        m[..., :, w // 2:] = 0
    elif name == "center":
        m[..., h // 4: h // 4 + max(h // 2, 1), w // 4: w // 4 + max(w // 2, 1)] = 0
    elif name.startswith("random:"):
        try:
            p = float(name.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if not 0.0 <= p < 1.0:
            raise AccelkitError(f"--mask {name}: expected random:P with a hidden fraction P in [0, 1)")
        from .noise import sample_seed

        rows = []
        for i in range(count):
            g = torch.Generator().manual_seed(sample_seed(seed, i))
            rows.append((torch.rand(1, h, w, generator=g) >= p).float())
        m = torch.stack(rows)
    else:
        raise AccelkitError(f"--mask {name!r}: expected a .png / .safetensors file or one of "
                            f"{', '.join(MASK_NAMES)}, random:P")
    return m


def read_mask(spec: str, count: int, image_shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """The mask of ``spec`` (a name or a file) for ``count`` images of ``image_shape`` (C, H, W): (1 or count, 1 or C,
    H, W) float32 of 0 / 1; an AccelkitError naming the file and both shapes when they do not match."""
    if not spec.lower().endswith(IMAGE_SUFFIXES):
        return named_mask(spec, count, image_shape, seed)
    if Path(spec).suffix.lower() == ".png":
        if not Path(spec).is_file():
            raise AccelkitError(f"--mask {spec}: no such file")
        m = (read_png(spec).mean(1, keepdim=True) > 0.0).float()
    else:
        tensors, _ = read_tensors(spec, "--mask")
        key = "mask" if "mask" in tensors else (next(iter(tensors)) if len(tensors) == 1 else None)
        if key is None:
            raise AccelkitError(f"--mask {spec}: holds tensors {sorted(tensors)}; expected one named 'mask'")
        m = tensors[key].float()
        while m.ndim < 4:
            m = m.unsqueeze(0)
        m = (m != 0).float()
    c, h, w = image_shape
    if m.ndim != 4 or tuple(m.shape[-2:]) != (h, w) or m.shape[1] not in (1, c) or m.shape[0] not in (1, count):
        raise AccelkitError(f"--mask {spec}: shape {list(m.shape)} does not match {count} image(s) of shape "
                            f"{[c, h, w]}; expected (H, W) = ({h}, {w}) with 1 or {c} channels and 1 or {count} masks")
    return m


def read_measurement(path: str | Path) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Any]]:
    """(y, mask or None, clean reference or None, recorded settings) of a measurement file or a PNG."""
    if _suffix(path, "--input") == ".png":
        return read_images(path, "--input"), None, None, {}
    tensors, meta = read_tensors(path, "--input")
    y = read_images(path, "--input", ("y",))
    settings = json.loads(meta[MEASUREMENT_KEY]) if MEASUREMENT_KEY in meta else {}
    mask = tensors["mask"].float() if "mask" in tensors else None
    clean = tensors["clean"].float() if "clean" in tensors else None
    return y, mask, clean, settings


def image_bytes(images: Tensor, suffix: str, tensors: dict[str, Tensor] | None = None,
                metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a .png (one image as it is, several as a grid) or a .safetensors file (``tensors``, default
    ``{"images": images}``, with ``metadata``)."""
    if suffix == ".safetensors":
        from .artifacts import safetensors_bytes

        return safetensors_bytes({k: v.contiguous() for k, v in (tensors or {"images": images}).items()},
                                 metadata or {})
    from .images import image_grid, png_bytes, to_uint8

    if images.shape[1] not in (1, 3):
        raise AccelkitError(f"a PNG holds 1- or 3-channel images; these have {images.shape[1]} channels: write "
                            ".safetensors instead")
    return png_bytes(to_uint8(images)[0] if images.shape[0] == 1 else image_grid(images))


__all__ = ["MASK_NAMES", "read_png", "read_images", "read_mask", "named_mask", "read_measurement", "image_bytes",
           "MEASUREMENT_KEY", "IMAGE_SUFFIXES"]
