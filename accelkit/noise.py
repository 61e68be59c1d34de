"""Per-sample noise: sample i's Gaussian noise depends on (seed, i) alone.

Every stage that draws starting noise (sample, couple, eval) takes it from :func:`sample_noise`, so a result is the
same whatever the batch size, the number of shards or processes, the device, and whether a job was interrupted and
resumed: sample i is always drawn from its own generator, seeded with a 64-bit hash of (seed, i).

The hash is SplitMix64 (Steele, Lea & Flood 2014), a bijective mixer of 64-bit integers; two rounds over the seed
and the index give well-separated generator seeds for neighbouring (seed, i) pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """One SplitMix64 output for the 64-bit state ``z``."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` under run seed ``seed`` (a non-negative 63-bit integer)."""
    if index < 0:
        raise ValueError(f"sample index {index}: expected a non-negative integer")
    return splitmix64(splitmix64(int(seed) & _MASK64) ^ int(index)) >> 1


def sample_noise(
    seed: int,
    indices: Tensor | range | Sequence[int] | Iterable[int],
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Standard normal noise of shape ``(len(indices), *shape)``; row j is drawn from the generator of
    ``(seed, indices[j])`` alone.

    Drawn on the CPU in float32 and then moved, so the same (seed, i) gives the same noise on every device.
    """
    if isinstance(indices, Tensor):
        indices = indices.reshape(-1).tolist()
    idx = [int(i) for i in indices]
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(idx), *shape), dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for row, i in enumerate(idx):
        g.manual_seed(sample_seed(seed, i))
        out[row] = torch.randn(shape, generator=g, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


__all__ = ["sample_noise", "sample_seed", "splitmix64"]
