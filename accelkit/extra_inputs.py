"""Extra inputs of a student network, through one zero-initialised embedding added to its time embedding.

Several methods give the teacher's network one more input: LCM's guidance scale w (Luo et al. 2023), a shortcut
model's step size d (Frans et al. 2024), MeanFlow's second time r (Geng et al. 2025), QAC's code y (seed 002). All
of them enter the same way, as in diffusers' ``time_cond_proj_dim`` and in the papers: a small embedding of the input
is added to the network's time embedding,

    emb'(t, c) = emb(t, c) + sum_k  W2_k SiLU(W1_k phi_k(v_k)),        W2_k = 0 at initialisation,

with phi_k sinusoidal features of a scalar input (value times ``scale``, the features of
:func:`accelkit.models.builtin.timestep_embedding`) or the vector itself. Because every W2_k starts at zero, the
student's outputs equal the teacher's bit for bit until training moves them, whatever the input values.

The embedding is the submodule ``network.accelkit_extra``, so it is trained, averaged (EMA), checkpointed and saved
with the network's state dict; forward hooks on the architecture's time-embedding module(s) add its output. The
values travel in the condition, ``cond.extra[name]`` (shape (B,) for a scalar, (B, dim) for a vector): the teacher's
network call is wrapped (:class:`ExtraInputCall`) so that it takes them out of the condition, hands them to the
embedding and calls the network. A missing value falls back to the input's default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import AccelkitError

EMBEDDING_ATTR = "accelkit_extra"
HEADER_KEY = "extra_inputs"


@dataclass(frozen=True)
class ExtraInput:
    """One extra input: ``scalar`` (one value per sample, embedded through sinusoidal features of value * scale) or
    ``vector`` (``dim`` values per sample, taken as they are). ``default`` fills a scalar input the caller leaves
    out (None: the input is required)."""

    name: str
    kind: Literal["scalar", "vector"] = "scalar"
    dim: int = 1
    scale: float = 1000.0
    default: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("scalar", "vector"):
            raise ValueError(f"extra input {self.name!r}: kind {self.kind!r}, expected 'scalar' or 'vector'")
        if self.kind == "scalar" and self.dim != 1:
            raise ValueError(f"extra input {self.name!r}: a scalar input has dim 1, not {self.dim}")
        if self.dim < 1:
            raise ValueError(f"extra input {self.name!r}: dim {self.dim}, expected >= 1")

    def config(self) -> dict[str, Any]:
        return asdict(self)


class ExtraInputEmbedding(nn.Module):
    """sum_k W2_k SiLU(W1_k phi_k(v_k)) over the inputs, W2_k zero-initialised; ``width`` is the time embedding's."""

    def __init__(self, inputs: Sequence[ExtraInput], width: int, features: int = 128, seed: int = 0):
        super().__init__()
        names = [spec.name for spec in inputs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"extra inputs {names}: expected at least one, with distinct names")
        self.inputs = tuple(inputs)
        self.width, self.features = int(width), int(features)
        self.mlps = nn.ModuleDict()
        generator = torch.Generator().manual_seed(int(seed))  # the first layers' draw: seeded, not the global RNG
        for spec in self.inputs:
            fin = self.features if spec.kind == "scalar" else spec.dim
            mlp = nn.Sequential(nn.Linear(fin, self.width), nn.SiLU(), nn.Linear(self.width, self.width))
            with torch.no_grad():  # nn.Linear's default init, U(-1/sqrt(fin), 1/sqrt(fin)), from the seeded generator
                bound = 1.0 / fin**0.5
                mlp[0].weight.copy_(torch.rand(mlp[0].weight.shape, generator=generator) * 2 * bound - bound)
                mlp[0].bias.copy_(torch.rand(mlp[0].bias.shape, generator=generator) * 2 * bound - bound)
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            self.mlps[spec.name] = mlp
        self._values: dict[str, Tensor] | None = None

    def features_of(self, spec: ExtraInput, value: Tensor) -> Tensor:
        from .models.builtin import timestep_embedding

        dtype = self.mlps[spec.name][0].weight.dtype
        if spec.kind == "scalar":
            return timestep_embedding(value.reshape(-1).float() * spec.scale, self.features).to(dtype)
        return value.reshape(value.shape[0], spec.dim).to(dtype)

    def embed(self, values: Mapping[str, Tensor]) -> Tensor:
        """The summed embedding (B, width) of a value for every input."""
        out = None
        for spec in self.inputs:
            e = self.mlps[spec.name](self.features_of(spec, values[spec.name]))
            out = e if out is None else out + e
        assert out is not None
        return out

    def current(self, batch: int, device: torch.device) -> Tensor:
        """The embedding of the values being fed (:func:`feeding`), or of the defaults outside a feed."""
        values = self._values if self._values is not None else complete_values(self.inputs, {}, batch, device)
        return self.embed(values)


class _AddExtraEmbedding:
    """Forward hook: adds the embedding's output to the time embedding. A callable object (not a closure), so
    ``copy.deepcopy`` of the network points the copy's hook at the copy's embedding."""

    def __init__(self, embedding: ExtraInputEmbedding):
        self.embedding = embedding

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        extra = self.embedding.current(output.shape[0], output.device)
        if extra.shape[0] != output.shape[0]:
            raise AccelkitError(f"extra inputs {[s.name for s in self.embedding.inputs]}: values for "
                                f"{extra.shape[0]} samples, but the network runs {output.shape[0]}")
        return output + extra.to(output.dtype)


def _time_embedding_modules(network: nn.Module) -> tuple[list[nn.Module], int]:
    """The modules whose output is the network's time embedding, and its width."""
    from .models.builtin import MLP, SmallUNet

    if isinstance(network, MLP | SmallUNet):
        return [network.emb], int(network.emb.dim)
    name = type(network).__name__
    if name in ("UNet2DModel", "UNet2DConditionModel") and hasattr(network, "time_embedding"):
        return [network.time_embedding], int(network.time_embedding.linear_2.out_features)
    if name == "DiTTransformer2DModel":
        mods = [block.norm1.emb for block in network.transformer_blocks]
        return mods, int(mods[0].timestep_embedder.linear_2.out_features)
    if name == "SD3Transformer2DModel":
        return [network.time_text_embed], int(network.time_text_embed.timestep_embedder.linear_2.out_features)
    raise AccelkitError(f"a {name} network has no time embedding accelkit knows how to add an extra input to "
                        "(expected accelkit.MLP, accelkit.SmallUNet, or diffusers UNet2DModel, UNet2DConditionModel, "
                        "DiTTransformer2DModel, SD3Transformer2DModel)")


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def embedding_of(network: nn.Module) -> ExtraInputEmbedding | None:
    emb = getattr(unwrap(network), EMBEDDING_ATTR, None)
    return emb if isinstance(emb, ExtraInputEmbedding) else None


def extra_inputs_of(network: nn.Module) -> tuple[ExtraInput, ...]:
    """The extra inputs of ``network`` (empty without any)."""
    emb = embedding_of(network)
    return emb.inputs if emb is not None else ()


def attach_to_network(network: nn.Module, inputs: Sequence[ExtraInput], seed: int = 0) -> ExtraInputEmbedding:
    """Give ``network`` the extra inputs (in place): the zero-initialised embedding and its hooks. ``seed`` draws
    the first layers (the same seed gives the same student start in every process and run)."""
    if embedding_of(network) is not None:
        raise AccelkitError(f"this network already has extra inputs {[s.name for s in extra_inputs_of(network)]}")
    modules, width = _time_embedding_modules(network)
    param = next(network.parameters(), None)
    emb = ExtraInputEmbedding(inputs, width, seed=seed)
    if param is not None:
        emb.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    setattr(network, EMBEDDING_ATTR, emb)
    for module in modules:
        module.register_forward_hook(_AddExtraEmbedding(emb))
    return emb


def complete_values(inputs: Sequence[ExtraInput], given: Mapping[str, Any], batch: int,
                    device: torch.device) -> dict[str, Tensor]:
    """A (B,) or (B, dim) tensor for every input: the given value (a float or a 0-dim tensor is broadcast), else
    the input's default; a required input left out is a one-line error."""
    out: dict[str, Tensor] = {}
    for spec in inputs:
        v = given.get(spec.name)
        if v is None:
            if spec.default is None:
                raise AccelkitError(f"this student takes the extra input {spec.name!r} and none was given "
                                    f"(expected a {spec.kind} value per sample)")
            v = spec.default
        t = torch.as_tensor(v, device=device)
        if spec.kind == "scalar":
            t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(-1)
        elif t.ndim == 1:
            t = t.expand(batch, spec.dim)
        if t.shape[0] != batch:
            raise AccelkitError(f"extra input {spec.name!r}: {t.shape[0]} values for a batch of {batch}")
        out[spec.name] = t
    return out


@contextmanager
def feeding(network: nn.Module, values: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, ``network``'s extra-input embedding sees ``values``."""
    emb = embedding_of(network)
    if emb is None:
        yield
        return
    previous, emb._values = emb._values, dict(values)
    try:
        yield
    finally:
        emb._values = previous


class ExtraInputCall:
    """A NetworkFn wrapper: takes the extra inputs' values out of ``cond.extra``, feeds them to the embedding and
    calls the network's own function with the rest of the condition."""

    def __init__(self, base: Any):
        self.base = base

    def __call__(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        from .teacher import Condition

        inputs = extra_inputs_of(network)
        if not inputs:
            return self.base(network, x, timestep, cond)
        given: dict[str, Tensor] = {}
        if cond is not None and any(s.name in cond.extra for s in inputs):
            given = {s.name: cond.extra[s.name] for s in inputs if s.name in cond.extra}
            rest = {k: v for k, v in cond.extra.items() if k not in given}
            cond = Condition(cond.class_labels, cond.encoder_hidden_states, cond.encoder_attention_mask,
                             cond.pooled_projections, rest)
            if not cond.tensors():
                cond = None
        values = complete_values(inputs, given, x.shape[0], x.device)
        with feeding(network, values):
            return self.base(network, x, timestep, cond)


def base_call(call: Any) -> Any:
    return call.base if isinstance(call, ExtraInputCall) else call


def attach_extra_inputs(teacher: Any, inputs: Sequence[ExtraInput], seed: int = 0) -> Any:
    """Give a :class:`accelkit.teacher.NetworkTeacher` the extra ``inputs`` (in place; returns it); ``seed`` draws
    the embedding's first layers (pass the recipe's seed)."""
    attach_to_network(teacher.network, inputs, seed)
    teacher.call = ExtraInputCall(base_call(teacher.call))
    return teacher


def with_extra_inputs(cond: Any, **values: Tensor | float) -> Any:
    """``cond`` (or an empty condition) with ``values`` added to ``cond.extra``; a float becomes a tensor of the
    condition's batch size when it has one, else a 0-dim tensor (broadcast at the call)."""
    from .teacher import Condition

    cond = cond if cond is not None else Condition()
    batch = cond.batch_size()
    extra = dict(cond.extra)
    for name, v in values.items():
        t = torch.as_tensor(v)
        if t.ndim == 0 and batch is not None:
            t = t.expand(batch)
        extra[name] = t
    return Condition(cond.class_labels, cond.encoder_hidden_states, cond.encoder_attention_mask,
                     cond.pooled_projections, extra)


def header_value(network: nn.Module) -> str | None:
    """The ``extra_inputs`` header value of a saved network (None without extra inputs)."""
    inputs = extra_inputs_of(network)
    return json.dumps([s.config() for s in inputs], sort_keys=True) if inputs else None


def inputs_from_header(value: str, source: str = "") -> list[ExtraInput]:
    try:
        return [ExtraInput(**d) for d in json.loads(value)]
    except (TypeError, ValueError) as e:
        raise AccelkitError(f"{source}: bad 'extra_inputs' header value ({e})") from e


__all__ = ["ExtraInput", "ExtraInputEmbedding", "ExtraInputCall", "attach_extra_inputs", "attach_to_network",
           "extra_inputs_of", "with_extra_inputs", "feeding", "complete_values", "unwrap", "embedding_of",
           "header_value", "inputs_from_header", "base_call"]
