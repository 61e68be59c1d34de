"""Gradient (activation) checkpointing for the trained network: less activation memory, the same gradients.

Chen et al. (2016), "Training Deep Nets with Sublinear Memory Cost": the forward pass keeps only the inputs of each
block and the backward pass recomputes the block's activations from them before differentiating it. The loss and
the gradients are those of the plain network (the same operations on the same values; recomputation replays the
random-generator state too), the activation memory of B blocks drops to the block inputs plus one block's
activations, and each step pays about one more forward pass. This is what makes an SD-size student (with the frozen
teacher beside it) fit on one GPU.

* diffusers networks (UNet2DConditionModel, SD3Transformer2DModel, ...): their own ``enable_gradient_checkpointing``
  (``torch.utils.checkpoint`` around each ResNet / transformer block);
* accelkit's built-in networks: ``torch.utils.checkpoint`` around each residual block (the MLP's blocks, the
  SmallUNet's ResBlocks).

Only a forward pass with gradients enabled checkpoints; evaluation (``torch.no_grad``) runs the plain blocks.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import AccelkitError


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's own forward under ``torch.utils.checkpoint`` when gradients are on (bound to the block as a method,
    so that a deep copy of the network calls its own blocks)."""
    forward = type(self).forward.__get__(self)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def builtin_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of every accelkit built-in network inside ``model``."""
    from .models.builtin import MLP, ResBlock

    blocks: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, MLP):
            blocks.extend(m.blocks)
        elif isinstance(m, ResBlock):
            blocks.append(m)
    return blocks


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Turn on gradient checkpointing in every network inside ``model`` (in place); returns how many diffusers
    networks and built-in blocks it acts on. A model with neither is a one-line error."""
    count = 0
    try:
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        ModelMixin = ()  # noqa: N806
    inside: set[int] = set()  # modules of a diffusers network already counted (its transformer blocks are networks)
    for m in model.modules():
        if id(m) in inside:
            continue
        if ModelMixin and isinstance(m, ModelMixin) and getattr(m, "_supports_gradient_checkpointing", False):
            if not m.is_gradient_checkpointing:
                m.enable_gradient_checkpointing()
            inside.update(id(sub) for sub in m.modules())
            count += 1
    for block in builtin_blocks(model):
        if not getattr(block, "_accelkit_checkpointed", False):
            block.forward = types.MethodType(_checkpointed_forward, block)
            block._accelkit_checkpointed = True
        count += 1
    if not count:
        raise AccelkitError(f"loop.gradient_checkpointing: the {type(model).__name__} being trained has no network "
                            f"that supports it (diffusers networks and accelkit's built-in ones do); set it to false")
    return count


__all__ = ["enable_gradient_checkpointing", "builtin_blocks"]
