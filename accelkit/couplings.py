"""Reading a ``couple`` artifact: random access to (noise, sample[, conditioning, trajectory]) rows and seeded,
shuffled, resumable batches for the training stages (reflow, distillation).

Shards are memory-mapped through safetensors; each shard's sha256 is checked against the manifest the first time it
is touched, so a damaged shard stops training with a clear error (``accelkit couple --repair`` regenerates it).

Batches: epoch e visits the rows in the order of a permutation drawn from a generator seeded with (seed, e); global
batch b takes the next ``batch_size`` rows, crossing into the next epoch when one runs out; rank r of ``world`` keeps
the r-th equal slice. The whole sampler state is the cursor ``{"batches", "epoch", "position"}``, so a resumed
training run reads exactly the batches an uninterrupted one would, whatever the number of processes.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .artifacts import Artifact
from .errors import AccelkitError


def _generator(*keys: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1))


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

    def sampler(self, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1) -> CouplingBatches:
        """Infinite, seeded, resumable shuffled batches (see the module docstring)."""
        return CouplingBatches(self, batch_size, seed, rank, world)


class CouplingBatches:
    """Iterator of shuffled batches over :class:`Couplings`; state is :meth:`state_dict` / :meth:`load_state_dict`."""

    def __init__(self, data: Couplings, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1 or batch_size % world:
            raise AccelkitError(f"batch size {batch_size}: expected a positive multiple of the {world} process(es)")
        self.data, self.batch_size, self.seed, self.rank, self.world = data, batch_size, seed, rank, world
        self.batches = self.epoch = self.position = 0
        self._perm: Tensor | None = None
        self._perm_epoch = -1

    def permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(len(self.data), generator=_generator(self.seed, 0xC0, epoch))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def _global_indices(self) -> Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            take = self.permutation(self.epoch)[self.position:self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(self.data):
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(parts)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        per = self.batch_size // self.world
        idx = self._global_indices()[self.rank * per:(self.rank + 1) * per]
        self.batches += 1
        return self.data.get(idx)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "size": len(self.data)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("size", len(self.data))):
            if key in state and int(state[key]) != mine:
                raise AccelkitError(f"cannot resume the couplings sampler: checkpoint has {key} = {state[key]}, "
                                    f"this run has {mine}")
        self.batches, self.epoch, self.position = int(state["batches"]), int(state["epoch"]), int(state["position"])


def open_couplings(path: str | os.PathLike, verify: bool = True, keys: Sequence[str] | None = None) -> Couplings:
    """Open a complete ``couple`` artifact for reading (see :class:`Couplings`)."""
    return Couplings(path, verify, keys)


__all__ = ["Couplings", "CouplingBatches", "open_couplings"]
