"""Training data: toy 2-D sets, small image sets, tensor files, and a seeded, resumable, rank-sharded sampler.

Data sets are tensors of samples (rows along dim 0):

* ``checkerboard``, ``moons``, ``rings``, ``gaussian-mixture``: 2-D point clouds drawn from a seeded generator,
  scaled to roughly unit standard deviation (the usual toy targets of flow-matching papers);
* ``digits``: scikit-learn's 1797 8x8 digits (shipped with scikit-learn), scaled from [0, 16] to [-1, 1], 1x8x8;
* ``fashion-mnist``: the 60000 28x28 training images from /usr/share/datasets/fashion-mnist (Debian package
  ``dataset-fashion-mnist``), scaled to [-1, 1], 1x28x28;
* a path to a ``.safetensors`` file (one tensor, or the tensor named ``data``) or a ``.npy`` file;
* a folder of images (:mod:`accelkit.image_folder`): RGB in [-1, 1] at their own size, or, for a stage that starts
  from a teacher, at the teacher's resolution and, for a latent teacher, encoded with its VAE once and cached.

:class:`BatchSampler` draws batches in epochs of random permutations. Its randomness comes from the seed and the
batch number alone (a generator seeded with (seed, epoch) for the permutation and with (seed, batch) for the noise a
training objective draws), so its whole state is a cursor: a resumed run draws exactly the batches an uninterrupted
one would, and every rank of a distributed run draws the same global batch and keeps its own slice, so the batches
do not depend on the number of processes.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import AccelkitError

TOY_2D = ("checkerboard", "moons", "rings", "gaussian-mixture")
IMAGE_SETS = ("digits", "fashion-mnist")
DATA_NAMES = TOY_2D + IMAGE_SETS
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def stream_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hash): independent streams."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seeded_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*keys))


# ----------------------------------------------------------------------------------------------------------- 2-D sets


def checkerboard(n: int, generator: torch.Generator, squares: int = 4) -> Tensor:
    """Uniform on the dark squares of a ``squares`` x ``squares`` board on [-2, 2]^2."""
    cell = 4.0 / squares
    i = torch.randint(0, squares, (n,), generator=generator)
    j = torch.randint(0, squares // 2, (n,), generator=generator) * 2 + (i % 2)
    u = torch.rand(n, 2, generator=generator)
    xy = torch.stack([i, j], dim=1).float() + u
    return xy * cell - 2.0


def checkerboard_share(x: Tensor, squares: int = 4) -> float:
    """The fraction of 2-D points on the dark squares of :func:`checkerboard`'s board (1 for its data; about 0.5
    for points spread over the board regardless of colour; points off the board count as misses)."""
    cell = 4.0 / squares
    ij = torch.floor((x.double() + 2.0) / cell)
    on_board = ((ij >= 0) & (ij < squares)).all(dim=1)
    dark = (ij[:, 0] - ij[:, 1]).remainder(2) == 0
    return float((on_board & dark).double().mean())


def moons(n: int, generator: torch.Generator, noise: float = 0.05) -> Tensor:
    """Two interleaved half circles (as scikit-learn's make_moons), centred and scaled to about unit std."""
    upper = torch.rand(n, generator=generator) < 0.5
    a = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, torch.cos(a), 1.0 - torch.cos(a))
    y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
    xy = torch.stack([x, y], dim=1) + noise * torch.randn(n, 2, generator=generator)
    return (xy - torch.tensor([0.5, 0.25])) * 2.0


def rings(n: int, generator: torch.Generator, radii: tuple[float, ...] = (0.5, 1.25, 2.0),
          noise: float = 0.04) -> Tensor:
    """Concentric circles, points spread uniformly in arc length, with Gaussian radial noise."""
    r = torch.tensor(radii)
    k = torch.multinomial(r / r.sum(), n, replacement=True, generator=generator)
    a = torch.rand(n, generator=generator) * 2 * math.pi
    rad = r[k] + noise * torch.randn(n, generator=generator)
    return torch.stack([rad * torch.cos(a), rad * torch.sin(a)], dim=1)


def gaussian_mixture_2d(n: int, generator: torch.Generator, modes: int = 8, radius: float = 2.0,
                        std: float = 0.15) -> Tensor:
    """``modes`` equal isotropic Gaussians on a circle of ``radius`` (the analytic teacher's standard toy)."""
    k = torch.randint(0, modes, (n,), generator=generator)
    a = 2 * math.pi * k.float() / modes
    centres = torch.stack([torch.cos(a), torch.sin(a)], dim=1) * radius
    return centres + std * torch.randn(n, 2, generator=generator)


TOY_SAMPLERS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "checkerboard": checkerboard, "moons": moons, "rings": rings, "gaussian-mixture": gaussian_mixture_2d,
}


# -------------------------------------------------------------------------------------------------------- image sets


def digits() -> Tensor:
    """scikit-learn's 8x8 digits as (1797, 1, 8, 8) float32 in [-1, 1] (pixel values 0..16 mapped linearly)."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)  # (1797, 8, 8), values 0..16
    return torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not: magic (0, 0, dtype code, ndim), big-endian sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise AccelkitError(f"{path}: not an IDX file (bad magic number)")
    codes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in codes:
        raise AccelkitError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=codes[raw[2]], offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise AccelkitError(f"{path}: IDX header says shape {shape} but holds {data.size} values (truncated file?)")
    return data.reshape(shape)


def fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_DIR) -> Tensor:
    """Fashion-MNIST images as (N, 1, 28, 28) float32 in [-1, 1]; ``split`` is ``train`` (60000) or ``test``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise AccelkitError(f"fashion-mnist split {split!r}: expected train or test")
    root = Path(root)
    candidates = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-images-idx3-ubyte"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise AccelkitError(f"Fashion-MNIST not found at {candidates[0]}: install it with "
                            f"`apt-get install dataset-fashion-mnist`")
    images = read_idx(path).astype(np.float32)
    return torch.from_numpy(images / 127.5 - 1.0).unsqueeze(1)


# ------------------------------------------------------------------------------------------------------- tensor files


def tensor_file(path: Path | str) -> Tensor:
    """A data set stored as one tensor: ``.safetensors`` (the only tensor, or the one named ``data``) or ``.npy``.

    Pickled files are never read (``.npy`` with ``allow_pickle=False``).
    """
    path = Path(path)
    if not path.exists():
        raise AccelkitError(f"data file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise AccelkitError(f"{path}: not a readable safetensors file ({e})") from None
        if len(tensors) == 1:
            x = next(iter(tensors.values()))
        elif "data" in tensors:
            x = tensors["data"]
        else:
            raise AccelkitError(f"{path}: holds tensors {sorted(tensors)}; expected one tensor or one named 'data'")
    elif path.suffix == ".npy":
        try:
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise AccelkitError(f"{path}: not a plain numeric .npy array ({e})") from None
    else:
        raise AccelkitError(f"data file {path}: expected a .safetensors or .npy file")
    if x.ndim < 2 or x.shape[0] < 1:
        raise AccelkitError(f"{path}: expected samples along dim 0 (shape N x ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise AccelkitError(f"{path}: expected floating-point samples, got {x.dtype}")
    return x.float().contiguous()


# ---------------------------------------------------------------------------------------------------------- data sets


@dataclass
class DataSet:
    """Samples as one tensor plus where they came from (recorded in the artifact manifest)."""

    name: str
    samples: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    def __len__(self) -> int:
        return self.samples.shape[0]


def load_dataset(name: str, size: int = 100_000, seed: int = 0) -> DataSet:
    """A data set by name (see :data:`DATA_NAMES`) or path; ``size`` and ``seed`` draw the 2-D sets."""
    if name in TOY_SAMPLERS:
        if size < 1:
            raise AccelkitError(f"data size {size}: expected a positive number of points")
        x = TOY_SAMPLERS[name](size, seeded_generator(seed, 0xDA7A))
        return DataSet(name, x.float().contiguous(), {"kind": "toy-2d", "size": size, "seed": seed})
    if name == "digits":
        return DataSet(name, digits(), {"kind": "image", "source": "sklearn.datasets.load_digits", "range": [-1, 1]})
    if name == "fashion-mnist":
        return DataSet(name, fashion_mnist("train"), {"kind": "image", "source": str(FASHION_MNIST_DIR),
                                                      "split": "train", "range": [-1, 1]})
    path = Path(name)
    if path.is_dir():
        from .image_folder import image_files, read_image_folder

        return DataSet(str(path), read_image_folder(path), {"kind": "image-folder", "path": str(path.resolve()),
                                                            "count": len(image_files(path)), "range": [-1, 1]})
    if path.suffix in (".safetensors", ".npy") or path.exists():
        return DataSet(str(path), tensor_file(path), {"kind": "file", "path": str(path.resolve())})
    raise AccelkitError(f"data {name!r}: expected one of {', '.join(DATA_NAMES)}, a .safetensors/.npy file "
                        "or a folder of images")


# ------------------------------------------------------------------------------------------------------------ sampler


class BatchSampler:
    """Infinite, seeded, resumable batches of ``batch_size`` samples, sharded over ``world`` ranks.

    Epoch e visits the data in the order of a permutation drawn from a generator seeded with (seed, e); the global
    batch b takes the next ``batch_size`` indices (crossing into the next epoch when one runs out) and rank r keeps
    the r-th of ``world`` equal slices. ``noise(generator, n)`` (optional) draws per-sample randomness for the
    global batch, such as the time and the noise of a diffusion objective, from a generator seeded with (seed, b);
    each rank keeps its slice of it too. Each batch is a dict with ``x`` and whatever ``noise`` returns.

    State (:meth:`state_dict`): the number of batches drawn, the epoch and the position in it; nothing else.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        noise: Callable[[torch.Generator, int], dict[str, Tensor]] | None = None,
        rows: dict[str, Tensor] | None = None,
    ):
        if batch_size < 1:
            raise AccelkitError(f"batch size {batch_size}: expected at least 1")
        if batch_size % world:
            raise AccelkitError(f"batch size {batch_size} does not split over {world} processes: "
                                f"use a multiple of {world}")
        self.data, self.batch_size, self.seed = data, int(batch_size), int(seed)
        self.rank, self.world, self.noise = rank, world, noise
        self.rows = dict(rows or {})  # per-row tensors of R rows: data row i takes row i mod R (e.g. cond.<field>)
        self.batches = 0
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | None = None
        self._perm_epoch = -1

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(len(self.data), generator=seeded_generator(self.seed, 1, epoch))
            self._perm_epoch = epoch
        return self._perm

    def _global_indices(self) -> Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            perm = self._permutation(self.epoch)
            take = perm[self.position:self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(parts)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> dict[str, Tensor]:
        lo = self.rank * (self.batch_size // self.world)
        hi = lo + self.batch_size // self.world
        idx = self._global_indices()[lo:hi]
        batch = {"x": self.data[idx]}
        batch.update({k: v[idx % len(v)] for k, v in self.rows.items()})
        if self.noise is not None:
            extra = self.noise(seeded_generator(self.seed, 2, self.batches), self.batch_size)
            batch.update({k: v[lo:hi] for k, v in extra.items()})
        self.batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "size": len(self.data)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "size"):
            if key in state and int(state[key]) != getattr(self, key if key != "size" else "_size"):
                raise AccelkitError(f"cannot resume the data sampler: checkpoint has {key} = {state[key]}, "
                                    f"this run has {getattr(self, key if key != 'size' else '_size')}")
        self.batches, self.epoch, self.position = int(state["batches"]), int(state["epoch"]), int(state["position"])

    @property
    def _size(self) -> int:
        return len(self.data)


__all__ = [
    "DATA_NAMES", "TOY_2D", "IMAGE_SETS", "DataSet", "load_dataset", "BatchSampler", "checkerboard", "moons",
    "rings", "gaussian_mixture_2d", "digits", "fashion_mnist", "read_idx", "tensor_file", "stream_seed",
    "seeded_generator",
]
