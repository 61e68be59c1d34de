"""Image grids as PNG (Pillow): samples in [-1, 1], one tile per sample, row by row."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8, clipped."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, ncols: int | None = None, min_tile: int = 48, pad: int = 2) -> np.ndarray:
    """A (rows x cols) grid of the images as one uint8 array (H, W, C); small images are enlarged (nearest) so a
    tile is at least ``min_tile`` pixels wide; tiles are separated by ``pad`` white pixels."""
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = tiles[i]
    return grid


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W, 1|3|4) array."""
    from PIL import Image

    if array.shape[-1] == 1:
        array = array[..., 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
