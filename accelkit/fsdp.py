"""Fully sharded data parallel training (FSDP2: ``torch.distributed.fsdp.fully_shard``) for the one :class:`Trainer`.

Zhao et al. (2023), "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel": each of the n processes keeps
1/n of every parameter, of its gradient, of the optimizer's moments and of the EMAs; a block's full parameters are
all-gathered just before its forward (and again for its backward) and freed after, and the gradients are
reduce-scattered (averaged) so that each process updates its own shard. Per process the memory of weights + gradients
+ optimizer state + EMA falls from about 4 + 2 x (AdamW) full copies to 1/n of them, plus one block's full weights:
a teacher-size student that does not fit one GPU with its copies trains on several. The gradient is the same mean
over the global batch as under DDP, so n processes follow the one-process run up to float summation order.

Sharding units: each block of the network (every module held in an ``nn.ModuleList`` that is not inside another
unit: diffusers' down / up blocks and transformer blocks, the built-in networks' residual blocks) and the root (the
rest). Checkpoints hold the full (gathered) tensors in the same files as a one-process run's, so a run can resume on
any number of processes; gathering and loading are collective, every process calls them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that become their own sharding unit: modules in an ``nn.ModuleList``, outermost first."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or not isinstance(m, nn.ModuleList):
            continue
        for block in m:
            units.append(block)
            inside.update(id(sub) for sub in block.modules())
    return units


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` (on this process's device, inside a process group) over every process, in place."""
    from torch.distributed.fsdp import fully_shard

    for block in shard_units(model):
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded one, on the CPU (collective); a plain tensor as it is."""
    return t.full_tensor().cpu() if is_sharded(t) else t


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`full` of every value (collective: every process calls it, in the same order)."""
    return {k: full(v) for k, v in tensors.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with full tensors on the CPU, keyed by parameter name, on rank 0 (other ranks get an
    empty dict: no process but rank 0 ever holds the whole state; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load full tensors into the sharded ``model`` (each process keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a :func:`full_optimizer_state` (read back from JSON + safetensors) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    for group in state["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def copy_into_shard(shard_tensor: Tensor, whole: Tensor) -> None:
    """Copy the whole tensor ``whole`` into the sharded tensor ``shard_tensor`` (this process's part of it)."""
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(whole.to(shard_tensor.device, shard_tensor.dtype), shard_tensor.device_mesh,
                             shard_tensor.placements, src_data_rank=None)  # every process holds ``whole``
    shard_tensor.to_local().copy_(part.to_local())


__all__ = ["shard", "shard_units", "is_sharded", "full", "full_tensors", "full_optimizer_state", "load_model_state",
           "load_optimizer_state", "copy_into_shard"]
