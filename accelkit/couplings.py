"""Reading a ``couple`` artifact: random access to (noise, sample[, conditioning, trajectory]) rows and seeded,
shuffled, resumable batches for the training stages (reflow, distillation).

Shards are memory-mapped through safetensors; each shard's sha256 is checked against the manifest the first time it
is touched, so a damaged shard stops training with a clear error (``accelkit couple --repair`` regenerates it).

Batches come from the training loop's :class:`accelkit.data.BatchSampler`: epoch e visits the rows in the order of a
permutation drawn from a generator seeded with (seed, e); global batch b takes the next ``batch_size`` rows, crossing
into the next epoch when one runs out; rank r of ``world`` keeps the r-th equal slice. The whole sampler state is
the cursor ``{"batches", "epoch", "position"}``, so a resumed training run reads exactly the batches an
uninterrupted one would, whatever the number of processes.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .artifacts import Artifact
from .data import BatchSampler, seeded_generator
from .errors import AccelkitError


class Couplings:
    """A complete ``couple`` artifact, read-only.

    ``len(c)`` rows; ``c[i]`` / ``c[indices]`` -> dict of tensors (``index``, ``noise``, ``sample``, ``cond.*``,
    ``trajectory``; ``trajectory_times`` is :attr:`trajectory_times`). ``verify``: check each shard's hash on first
    use (default True).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, keys: Sequence[str] | None = None):
        self.artifact = Artifact.read(path, "couple")
        self.path = Path(path)
        summary = self.artifact.manifest["summary"]
        self.shards: list[dict[str, Any]] = summary["shards"]
        self.starts = [s["start"] for s in self.shards]
        self.n = int(summary["samples"])
        self.sample_shape = tuple(summary["sample_shape"])
        all_keys = [k for k in summary["keys"] if k != "trajectory_times"]
        if keys is not None:
            missing = sorted(set(keys) - set(all_keys))
            if missing:
                raise AccelkitError(f"{self.path}: couplings have no {missing[0]!r}; they have {', '.join(all_keys)}")
        self.keys = list(keys) if keys is not None else all_keys
        self.verify = verify
        self._checked: set[str] = set()
        self._handles: dict[str, Any] = {}
        self.trajectory_times: Tensor | None = None
        if "trajectory_times" in summary["keys"]:
            self.trajectory_times = self._open(self.shards[0]["file"]).get_tensor("trajectory_times")

    def __len__(self) -> int:
        return self.n

    @property
    def recipe(self) -> dict[str, Any]:
        return self.artifact.recipe

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._handles:
            if self.verify and name not in self._checked:
                self.artifact.check_file(name)
                self._checked.add(name)
            self._handles[name] = safe_open(str(self.path / name), "pt")
        return self._handles[name]

    def _rows(self, shard: int, local: Tensor) -> dict[str, Tensor]:
        f = self._open(self.shards[shard]["file"])
        out = {}
        for key in self.keys:
            sl = f.get_slice(key)
            lo, hi = int(local.min()), int(local.max()) + 1
            block = sl[lo:hi]
            out[key] = block[local - lo]
        return out

    def __getitem__(self, idx: int | slice | Tensor | Sequence[int]) -> dict[str, Tensor]:
        if isinstance(idx, int):
            return {k: v[0] for k, v in self.get(torch.tensor([idx])).items()}
        if isinstance(idx, slice):
            idx = torch.arange(self.n)[idx]
        return self.get(torch.as_tensor(idx, dtype=torch.int64))

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        """Rows ``indices`` (any order, repeats allowed), in that order."""
        indices = indices.reshape(-1)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.n):
            raise IndexError(f"couplings index out of range [0, {self.n})")
        shard_of = torch.tensor([bisect.bisect_right(self.starts, int(i)) - 1 for i in indices], dtype=torch.int64)
        out: dict[str, Tensor] = {}
        for s in torch.unique(shard_of).tolist():
            where = (shard_of == s).nonzero().reshape(-1)
            rows = self._rows(s, indices[where] - self.starts[s])
            for k, v in rows.items():
                if k not in out:
                    out[k] = torch.empty((len(indices), *v.shape[1:]), dtype=v.dtype)
                out[k][where] = v
        return out

    def sampler(self, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                noise: Callable[[torch.Generator, int], dict[str, Tensor]] | None = None) -> CouplingBatches:
        """Infinite, seeded, resumable shuffled batches (see the module docstring); ``noise(generator, n)`` adds
        per-sample draws (e.g. the training times) from a generator seeded with (seed, batch), as in
        :class:`accelkit.data.BatchSampler`."""
        return CouplingBatches(self, batch_size, seed, rank, world, noise)


class CouplingBatches(BatchSampler):
    """:class:`accelkit.data.BatchSampler` over couplings rows: the same seeded epochs, cursor and rank slices; each
    batch is the dict of this rank's rows (``index``, ``noise``, ``sample``, ...)."""

    def __init__(self, data: Couplings, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 noise: Callable[[torch.Generator, int], dict[str, Tensor]] | None = None):
        super().__init__(data, batch_size, seed, rank, world, noise)  # type: ignore[arg-type]  (len and rows only)

    def __next__(self) -> dict[str, Tensor]:
        per = self.batch_size // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        idx = self._global_indices()[lo:hi]
        batch = self.data.get(idx)
        if self.noise is not None:
            extra = self.noise(seeded_generator(self.seed, 2, self.batches), self.batch_size)
            batch.update({k: v[lo:hi] for k, v in extra.items()})
        self.batches += 1
        return batch


def open_couplings(path: str | os.PathLike, verify: bool = True, keys: Sequence[str] | None = None) -> Couplings:
    """Open a complete ``couple`` artifact for reading (see :class:`Couplings`)."""
    return Couplings(path, verify, keys)


__all__ = ["Couplings", "CouplingBatches", "open_couplings"]
