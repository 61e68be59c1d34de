"""The one training loop every training stage uses (train, reflow, distill, consistency, bespoke).

A :class:`Trainer` minimises ``loss_fn(model, batch)`` over batches from a resumable iterator with AdamW or RAdam,
linear warm-up, gradient clipping, gradient accumulation, mixed precision, exponential moving averages (EMA) of the
weights at one or several rates, validation callbacks, and checkpoints that make a resumed run continue exactly:

    theta_ema <- r theta_ema + (1 - r) theta          (after every optimizer step, for each rate r)

A checkpoint holds the weights, the optimizer state, every EMA, the step, the data cursor and the state of every
random generator (torch CPU and CUDA, Python's ``random``, numpy's global generator, the data sampler's), written as
safetensors (tensors) and JSON (everything else), never pickle. It is written into a temporary directory, fsynced,
renamed into place, and only then named in ``latest.json``: a crash (even ``kill -9``) leaves the previous
checkpoint usable. With deterministic algorithms (the default on CPU) a run killed at any point and resumed ends
with weights equal, bit for bit, to an uninterrupted run's.

Distributed data parallel: under ``torchrun`` the model is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl
on CUDA). The data iterator gives each rank its slice of the same global batch, and DDP averages gradients, so n
processes compute the gradient of the same global-batch mean loss as one process (equal up to float summation order).
Rank 0 writes the checkpoint's shared files, every rank writes its own random-generator state. With ``loop.fsdp``
the model is sharded over the ranks instead (FSDP2, :mod:`accelkit.fsdp`): the same gradient mean, the same
checkpoint files (full tensors gathered for rank 0), and at the end of :meth:`Trainer.fit` the full weights and EMAs
are back in ``trainer.model`` / ``trainer.ema``. ``loop.gradient_checkpointing`` recomputes each block's activations
in the backward pass (:mod:`accelkit.activation_checkpointing`).

A non-finite loss or gradient norm stops training with :class:`TrainingDiverged`, before the optimizer step, so the
last checkpoint on disk stays a good one.

Several networks in one run (a generator and a fake score, a discriminator, an encoder): pass ``groups``, a list of
:class:`ParamGroup` ``(name, module, loss_fn, settings)``, instead of one ``loss_fn``. ``model`` is then the container
of every trained network (e.g. an ``nn.ModuleDict``); each group owns the trainable parameters of its ``module`` (a
submodule of ``model``; groups are disjoint and cover every trainable parameter) and has its own optimizer, learning
rate, betas, weight decay, gradient clipping, update schedule and, optionally, EMA (:class:`GroupSettings`; unset
fields take the loop's value). Frozen networks (a teacher) are not in ``model``: they are plain inputs of the losses.

    step s updates group g  iff  s % g.every == g.offset        (in the order the groups are listed)

so ``every=1`` is every step, ``every=k`` every k-th step, two groups with ``every=2`` and offsets 0 / 1 alternate,
and DMD2's "5 fake-score updates per generator update" is ``fake_score: every=1`` listed after
``generator: every=5``. A step draws one batch; each group due at that step computes ``loss_fn(model, batch)``,
back-propagates with only its own parameters requiring gradients (the other networks pass gradients through to their
inputs, but accumulate none), clips its own gradient norm and takes its optimizer step; the group's learning rate is
its peak ``lr`` times the loop's schedule (warm-up, cosine) at the step. ``config.steps`` counts steps, not updates;
``trainer.updates[name]`` counts each group's optimizer steps. A checkpoint is taken between steps and holds every
network, every group's optimizer, gradient scaler, update count and EMA, so a run killed anywhere (also between one
group's update and the next in the same step) resumes exactly. Under DDP the groups are not wrapped: each group's
gradients are averaged over the ranks with one all-reduce after its backward pass (the same mean as DDP's).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from .artifacts import atomic_write_json, save_safetensors
from .errors import AccelkitError, JobInterrupted
from .jobs import Checkpointer, dist_env, progress_bar

CHECKPOINT_FORMAT = 1


class TrainingDiverged(AccelkitError):
    """The loss or the gradient norm became NaN or infinite; the last checkpoint on disk is still a good one."""


# ---------------------------------------------------------------------------------------------------------- config


class LoraSettings(BaseModel):
    """Low-rank adapters (Hu et al. 2021) through peft: only the adapters train; the base weights stay frozen."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="module names (or a regex) to adapt; diffusers attention projections by default")


#: Loop settings that change how a run executes, not what it computes (checkpoint cadence, logging, activation
#: recomputation, FSDP sharding instead of DDP copies: like the number of processes, they leave the result equal up
#: to float summation order): stages keep them out of their artifacts' identity, so changing one resumes the run.
LOOP_EXECUTION_FIELDS = ("checkpoint_every", "checkpoint_interval_s", "keep_checkpoints", "log_every",
                         "validate_every", "gradient_checkpointing", "fsdp")


class LoopConfig(BaseModel):
    """Settings of the training loop; every training stage's recipe embeds one (``recipe.loop``)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, ge=1, description="optimizer steps in total")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    optimizer: Literal["adamw", "radam"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up from 0 over this many steps")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after warm-up: constant or cosine "
                                                                                 "decay to 0 at the last step")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; null: no clip")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (each batch split in this many)")
    ema_rates: list[float] = Field(default_factory=lambda: [0.999], description="EMA decay rates, each in [0, 1)")
    ema_warmup: bool = Field(True, description="EMA decay min(rate, (1 + k) / (10 + k)) at step k, so the average "
                                               "forgets the initial weights")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype for the forward pass; "
                                                                             "fp16 uses a gradient scaler (CUDA)")
    checkpoint_every: int = Field(500, ge=0, description="checkpoint every this many steps (0: only at the end and "
                                                         "on SIGINT/SIGTERM)")
    checkpoint_interval_s: float = Field(600.0, ge=0, description="also checkpoint when this many seconds passed "
                                                                  "since the last one (0: off)")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep on disk")
    validate_every: int = Field(0, ge=0, description="run the validation callback every this many steps (0: off)")
    log_every: int = Field(50, ge=1)
    deterministic: bool = Field(True, description="torch.use_deterministic_algorithms (exact resume on CPU)")
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = Field(False, description="recompute each block's activations in the backward "
                                                            "pass instead of keeping them: the same gradients, less "
                                                            "memory, one more forward pass (SD-size students)")
    fsdp: bool = Field(False, description="under torchrun: shard weights, gradients, optimizer state and EMA over "
                                          "the processes (FSDP2, accelkit.fsdp) instead of DDP's full copies, for "
                                          "networks that do not fit one GPU with them")

    @field_validator("ema_rates")
    @classmethod
    def _rates_in_range(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"EMA rate {r}: expected a value in [0, 1)")
        if len(set(v)) != len(v):
            raise ValueError(f"EMA rates {v}: expected distinct values")
        return v

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine decay."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(1, self.steps - self.warmup_steps)
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / span)))
        return self.lr


class GroupSettings(BaseModel):
    """How one network of a several-network run trains (see the module docstring); unset fields take the loop's."""

    model_config = ConfigDict(extra="forbid")

    lr: float | None = Field(None, gt=0, description="peak learning rate (null: the loop's lr); the loop's warm-up "
                                                     "and schedule apply")
    betas: tuple[float, float] | None = Field(None, description="Adam betas (null: the loop's)")
    weight_decay: float | None = Field(None, ge=0, description="weight decay (null: the loop's)")
    grad_clip: float | Literal["off"] | None = Field(None, description="clip this group's gradient norm to this "
                                                                       "(null: the loop's grad_clip; off: no clip)")
    every: int = Field(1, ge=1, description="update at the steps s with s % every == offset")
    offset: int = Field(0, ge=0, description="see every; 0 <= offset < every")
    ema: bool = Field(False, description="keep EMAs of this group's weights at the loop's ema_rates")

    @model_validator(mode="after")
    def _offset_below_every(self) -> GroupSettings:
        if self.offset >= self.every:
            raise ValueError(f"offset {self.offset}: expected 0 <= offset < every = {self.every}")
        return self

    def due(self, step: int) -> bool:
        """Whether this group takes an optimizer step at (0-based) step ``step``."""
        return step % self.every == self.offset

    def clip(self, loop: LoopConfig) -> float | None:
        """The gradient-norm bound of this group (None: no clipping)."""
        if self.grad_clip == "off":
            return None
        return loop.grad_clip if self.grad_clip is None else float(self.grad_clip)

    def lr_at(self, loop: LoopConfig, step: int) -> float:
        """This group's learning rate at step ``step``: its peak lr times the loop's schedule at that step."""
        return loop.lr_at(step) if self.lr is None else self.lr * (loop.lr_at(step) / loop.lr)


@dataclass
class ParamGroup:
    """One trained network of a several-network run: ``module`` (a submodule of the trainer's model) is trained on
    ``loss_fn(model, batch)`` (``model``: the whole container) with ``settings``."""

    name: str
    module: nn.Module
    loss_fn: LossFn
    settings: GroupSettings = field(default_factory=GroupSettings)


# --------------------------------------------------------------------------------------------------------- protocols


class ResumableIterator(Protocol):
    """A data iterator whose position can be saved and restored (see :class:`accelkit.data.BatchSampler`)."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: loss_fn(model, batch) -> loss, or (loss, {name: value}) with extra values to log (floats or 0-d tensors).
LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, dict[str, Any]]"]
#: validate_fn(trainer) -> {metric: value}; use ``trainer.ema_weights(rate)`` to evaluate an EMA.
ValidateFn = Callable[["Trainer"], dict[str, float]]


# ------------------------------------------------------------------------------------------------------ distributed


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA, this rank's GPU selected); returns
    (rank, world size); a no-op for a single process."""
    from .jobs import init_distributed as join

    if device.type == "cuda" and dist_env()[1] > 1:
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", 0)))
    return join(str(device))


def resolve_device(name: str) -> torch.device:
    """A recipe's ``device`` (auto, cpu, cuda, cuda:N) as a torch device: auto is CUDA when present (this process's
    LOCAL_RANK under torchrun); CUDA asked for on a machine without it is a one-line error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AccelkitError(f"device {name!r}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def default_device() -> torch.device:
    """This process's device: CUDA (LOCAL_RANK's GPU under torchrun) when present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving averages of a model's trainable parameters at several rates.

    After optimizer step k (1-based), for every rate r: theta_ema <- d theta_ema + (1 - d) theta with d = r, or with
    ``warmup`` d = min(r, (1 + k) / (10 + k)) so that the average forgets the random initial weights early in
    training (the warm-up of the DDPM / score-SDE code bases and diffusers' EMAModel). Averages start at the initial
    weights and are kept in float32.
    """

    def __init__(self, model: nn.Module, rates: list[float], warmup: bool = False):
        self.rates = [float(r) for r in rates]
        self.warmup = warmup
        self.updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow: dict[float, list[Tensor]] = {
            r: [p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad] for r in self.rates
        }

    def decay(self, rate: float, step: int) -> float:
        """The decay d used at (1-based) update ``step`` for ``rate``."""
        return min(rate, (1.0 + step) / (10.0 + step)) if self.warmup else rate

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        params = [p.detach().float() for p in model.parameters() if p.requires_grad]
        for r, shadow in self.shadow.items():
            torch._foreach_lerp_(shadow, params, 1.0 - self.decay(r, self.updates))

    def weights(self, model: nn.Module, rate: float) -> dict[str, Tensor]:
        """The model's state dict with the trainable parameters replaced by their average at ``rate``."""
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n, v in zip(self.names, self.shadow[float(rate)], strict=True):
            sd[n] = v.to(sd[n].dtype).clone()
        return sd

    def tensors(self) -> dict[str, Tensor]:
        return {f"{r!r}/{n}": v for r, shadow in self.shadow.items() for n, v in zip(self.names, shadow, strict=True)}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        for r, shadow in self.shadow.items():
            for i, n in enumerate(self.names):
                key = f"{r!r}/{n}"
                if key not in tensors:
                    raise AccelkitError(f"checkpoint has no EMA at rate {r} for {n}: was it made with other "
                                        f"ema_rates?")
                if hasattr(shadow[i], "device_mesh"):  # sharded (loop.fsdp): this process's part of it
                    from .fsdp import copy_into_shard

                    copy_into_shard(shadow[i], tensors[key])
                else:
                    shadow[i].copy_(tensors[key])


# ------------------------------------------------------------------------------------------------- state as files


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    save_safetensors(path, {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata)


def split_state(obj: Any, tensors: dict[str, Tensor], prefix: str = "") -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}``, collecting it in ``tensors``."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): split_state(v, tensors, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.copy())
        return {"__tensor__": prefix}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def join_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`split_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------- random states


def rng_state() -> dict[str, Any]:
    """The state of every global random generator: torch CPU and CUDA, Python's random, numpy's."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["torch_cuda"]))


# ------------------------------------------------------------------------------------------------------------- LoRA


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on ``settings.target_modules``; only the adapters stay trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise AccelkitError("LoRA training needs peft, which is not installed: pip install 'accelkit[lora]'") from None
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules)
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as e:
        raise AccelkitError(f"LoRA target_modules {settings.target_modules!r} matched nothing usable: {e}") from None
    for name, p in model.named_parameters():  # adapters, and a student's extra-input embedding, train
        p.requires_grad_("lora_" in name or name.split(".")[0] == "accelkit_extra" or ".accelkit_extra." in name)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its base layer (W <- W + scale B A) and put the base layer back in
    its place, so the network has its original modules and state-dict keys again; a model without adapters is
    returned as it is. In place; returns ``model``."""
    names = [name for name, m in model.named_modules() if hasattr(m, "merge") and hasattr(m, "get_base_layer")]
    if not names:
        return model
    for name in sorted(names, key=len, reverse=True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = parent.get_submodule(child)
        layer.merge(safe_merge=True)
        setattr(parent, child, layer.get_base_layer())
    return model


# ----------------------------------------------------------------------------------------------------------- trainer


def _split_batch(batch: Any, parts: int) -> list[Any]:
    """Split a batch (tensor, or dict/list/tuple of tensors batched along dim 0) into ``parts`` micro-batches."""
    if parts == 1:
        return [batch]
    if isinstance(batch, Tensor):
        if batch.shape[0] % parts:
            raise AccelkitError(f"batch of {batch.shape[0]} does not split into grad_accum = {parts} equal "
                                f"micro-batches")
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        split = {k: _split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        split = [_split_batch(v, parts) for v in batch]
        return [type(batch)(v[i] for v in split) for i in range(parts)]
    return [batch] * parts


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _load_optimizer(optimizer: torch.optim.Optimizer, opt: dict[str, Any]) -> None:
    """Load an optimizer state read back from JSON + safetensors (int state keys, tuple betas)."""
    opt["state"] = {int(k): v for k, v in opt["state"].items()}
    for group in opt["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict(opt)


def _make_optimizer(config: LoopConfig, params: list[nn.Parameter], lr: float, betas: tuple[float, float],
                    weight_decay: float) -> torch.optim.Optimizer:
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.RAdam
    kw: dict[str, Any] = {"decoupled_weight_decay": True} if config.optimizer == "radam" else {}
    return opt_cls(params, lr=lr, betas=tuple(betas), eps=config.eps, weight_decay=weight_decay, **kw)


class Trainer:
    """Trains ``model`` on ``loss_fn(model, batch)`` for ``config.steps`` optimizer steps; see the module docstring.

    ``data`` yields this rank's batch of each step (a tensor, or a dict/list of tensors batched along dim 0), which
    the trainer splits into ``config.grad_accum`` micro-batches; ``loss_fn`` returns the micro-batch's mean loss.
    ``checkpoint_dir`` (optional) is where checkpoints go; :meth:`fit` resumes from the latest one found there.
    ``validate_fn(trainer)`` runs every ``config.validate_every`` steps and at the end; its metrics are logged.
    ``on_log(step, values)`` receives logged values (rank 0), e.g. for a metrics file or a progress display.
    ``groups`` (with ``loss_fn=None``): train several networks of ``model``, each on its own loss and schedule (see
    the module docstring); ``trainer.updates[name]`` counts each group's updates, ``trainer.optimizers[name]`` and
    ``trainer.emas[name]`` hold its optimizer and EMA, ``trainer.ema_weights(rate, group=name)`` its averaged weights.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: ResumableIterator | Iterator[Any],
        config: LoopConfig,
        checkpoint_dir: str | Path | None = None,
        validate_fn: ValidateFn | None = None,
        device: torch.device | str | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True,
        groups: list[ParamGroup] | None = None,
    ):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world = init_distributed(self.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise AccelkitError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if groups is not None and (loss_fn is not None or config.lora is not None):
            raise AccelkitError("a Trainer with parameter groups takes its losses from the groups (loss_fn=None) and "
                                "LoRA per network (apply_lora on the module before), not loop.lora")
        if config.lora is not None:
            model = apply_lora(model, config.lora)
        if config.gradient_checkpointing:
            from .activation_checkpointing import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        self.model = model.to(self.device)
        self.module: nn.Module = self.model
        self.groups: list[ParamGroup] = list(groups or [])
        self._sharded: nn.Module | None = None  # loop.fsdp under torchrun: the sharded model while it trains
        if config.fsdp and self.world > 1:
            self._start_fsdp(bool(self.groups))
        if self.groups:
            self._init_groups()
        elif self.world > 1 and self._sharded is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.loss_fn, self.data, self.validate_fn, self.on_log = loss_fn, data, validate_fn, on_log
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress and self.rank == 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise AccelkitError("the model has no trainable parameters")
        if not self.groups:
            self.optimizer = _make_optimizer(config, params, config.lr_at(0), config.betas, config.weight_decay)
        # with groups, this EMA covers no parameters (each group keeps its own in self.emas)
        self.ema = EMA(self.model if not self.groups else nn.Module(), config.ema_rates, config.ema_warmup)
        self._sharded_ema = self.ema if self._sharded is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = 0
        self.recent_losses: deque[float] = deque(maxlen=16)
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self._checkpointer: Checkpointer | None = None
        self._stop: int | None = None  # the signal that stops every rank, once the ranks agreed on it
        self._save_due = False

    def _start_fsdp(self, with_groups: bool) -> None:
        """loop.fsdp: keep a plain copy of the model on the CPU (the full weights come back into it at the end of
        :meth:`fit`) and shard the model over the processes (:mod:`accelkit.fsdp`)."""
        import copy

        from .fsdp import shard

        if with_groups:
            raise AccelkitError("loop.fsdp: not with several networks (parameter groups); train one network or set "
                                "loop.fsdp: false")
        if self.config.validate_every:
            raise AccelkitError(f"loop.fsdp: validation during training (validate_every = "
                                f"{self.config.validate_every}) needs the full weights; set validate_every: 0 (the "
                                f"end-of-run validation still runs)")
        self._plain = copy.deepcopy(self.model.cpu())
        self.model = self.module = self._sharded = shard(self.model.to(self.device))

    def _fsdp_full_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        """loop.fsdp: (weights, EMA tensors, optimizer state) with full tensors, the optimizer state indexed like a
        one-process run's (collective: every process calls it)."""
        from .fsdp import full_optimizer_state, full_tensors

        weights = full_tensors(self._sharded.state_dict())
        ema = full_tensors(self._sharded_ema.tensors())
        named = full_optimizer_state(self._sharded, self.optimizer)
        if self.rank != 0:  # only rank 0 writes (and holds) the whole optimizer state
            return weights, ema, {}
        index = {n: i for i, n in enumerate(n for n, p in self._sharded.named_parameters() if p.requires_grad)}
        opt = {"state": {index[n]: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
                         for n, st in named["state"].items()},
               "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}
        return weights, ema, opt

    def _fsdp_load(self, weights: dict[str, Tensor], opt: dict[str, Any]) -> None:
        """loop.fsdp: load full weights and a one-process-indexed optimizer state into the shards."""
        from .fsdp import load_model_state, load_optimizer_state

        load_model_state(self._sharded, weights)
        names = [n for n, p in self._sharded.named_parameters() if p.requires_grad]
        state = {names[int(i)]: st for i, st in opt["state"].items()}
        groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in opt["param_groups"]]
        load_optimizer_state(self._sharded, self.optimizer, {"state": state, "param_groups": groups})

    def _fsdp_finish(self) -> None:
        """loop.fsdp, at the end of :meth:`fit`: the full weights and EMAs back in the plain model (on the device) and
        a plain EMA, so that rank 0 can write the result as after a one-process run (collective)."""
        weights, ema_tensors, _ = self._fsdp_full_state()
        self._plain.load_state_dict(weights)
        self.model = self._plain.to(self.device)
        ema = EMA(self.model, self.config.ema_rates, self.config.ema_warmup)
        ema.load_tensors(ema_tensors)
        ema.updates = self._sharded_ema.updates
        self.ema = ema

    def _init_groups(self) -> None:
        """Per-group parameters, optimizers, gradient scalers, EMAs and update counts (several-network runs)."""
        cfg = self.config
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
            raise AccelkitError(f"parameter groups {names}: expected distinct, non-empty names without '/'")
        owner: dict[int, str] = {}
        self._group_params: dict[str, list[nn.Parameter]] = {}
        inside = {id(p) for p in self.model.parameters()}
        for g in self.groups:
            params = [p for p in g.module.parameters() if p.requires_grad]
            if not params:
                raise AccelkitError(f"parameter group {g.name!r} has no trainable parameters")
            for p in params:
                if id(p) not in inside:
                    raise AccelkitError(f"parameter group {g.name!r}: its module is not part of the trainer's model")
                if id(p) in owner:
                    raise AccelkitError(f"parameter groups {owner[id(p)]!r} and {g.name!r} share parameters")
                owner[id(p)] = g.name
            self._group_params[g.name] = params
        loose = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in owner]
        if loose:
            raise AccelkitError(f"trainable parameters that no group trains: {loose[:3]}; freeze them "
                                f"(requires_grad_(False)) or give them a group")
        period = math.lcm(*(g.settings.every for g in self.groups))
        idle = [s for s in range(period) if not any(g.settings.due(s) for g in self.groups)]
        if idle:
            raise AccelkitError(f"parameter groups' schedules (every/offset) update nothing at step {idle[0]} "
                                f"(and every {period} steps after): expected at least one group due at every step")
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self.emas: dict[str, EMA] = {}
        self.updates: dict[str, int] = {}
        for g in self.groups:
            st = g.settings
            self.optimizers[g.name] = _make_optimizer(
                cfg, self._group_params[g.name], st.lr_at(cfg, 0), st.betas or cfg.betas,
                cfg.weight_decay if st.weight_decay is None else st.weight_decay)
            self.scalers[g.name] = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
            if st.ema:
                self.emas[g.name] = EMA(g.module, cfg.ema_rates, cfg.ema_warmup)
            self.updates[g.name] = 0

    # --------------------------------------------------------------------------------------------------- weights

    def ema_weights(self, rate: float | None = None, group: str | None = None) -> dict[str, Tensor]:
        """The model's state dict averaged at ``rate`` (default: the first EMA rate; no EMA: the raw weights).

        With parameter groups: the state dict of group ``group``'s module (default: the first group with EMA), its
        trainable parameters averaged at ``rate`` (a group without EMA: its raw weights)."""
        if self.groups:
            if group is None:
                group = next(iter(self.emas), self.groups[0].name)
            module = next((g.module for g in self.groups if g.name == group), None)
            if module is None:
                raise AccelkitError(f"no parameter group {group!r}: expected one of {[g.name for g in self.groups]}")
            if group not in self.emas or not self.config.ema_rates:
                return {k: v.detach().clone() for k, v in module.state_dict().items()}
            return self.emas[group].weights(module, self.config.ema_rates[0] if rate is None else rate)
        if rate is None:
            if not self.ema.rates:
                return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            rate = self.ema.rates[0]
        return self.ema.weights(self.model, rate)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _checkpoint_root(self) -> Path:
        if self.checkpoint_dir is None:
            raise AccelkitError("this trainer has no checkpoint directory")
        return self.checkpoint_dir

    def latest_checkpoint(self) -> Path | None:
        """The directory named by ``latest.json``, if it exists and is complete."""
        if self.checkpoint_dir is None:
            return None
        pointer = self.checkpoint_dir / "latest.json"
        if not pointer.exists():
            return None
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError) as e:
            raise AccelkitError(f"{pointer}: unreadable checkpoint pointer ({e})") from None
        path = self.checkpoint_dir / name
        if not (path / "state.json").exists():
            raise AccelkitError(f"{pointer} names {path}, which is missing or incomplete")
        return path

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step atomically; returns its directory."""
        root = self._checkpoint_root()
        name = f"step-{self.step:09d}"
        final = root / name
        tmp = root / f".{name}.tmp"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        # every rank: its own random-generator and data-iterator state
        rng_tensors: dict[str, Tensor] = {}
        rng_plain = split_state(rng_state(), rng_tensors)
        data_tensors: dict[str, Tensor] = {}
        data_plain = split_state(self.data.state_dict(), data_tensors) if hasattr(self.data, "state_dict") else None
        _save_tensors(tmp / f"rank{self.rank}.safetensors", {**{f"rng.{k}": v for k, v in rng_tensors.items()},
                                                                **{f"data.{k}": v for k, v in data_tensors.items()}})
        atomic_write_json(tmp / f"rank{self.rank}.json", {"rng": rng_plain, "data": data_plain})
        sharded = self._fsdp_full_state() if self._sharded is not None else None  # every rank gathers
        if self.rank == 0 and self.groups:
            _save_tensors(tmp / "model.safetensors", self.model.state_dict())
            groups_plain = self._save_groups(tmp)
        elif self.rank == 0 and sharded is not None:  # loop.fsdp: the same files as a one-process run's
            _save_tensors(tmp / "model.safetensors", sharded[0])
            _save_tensors(tmp / "ema.safetensors", sharded[1], metadata={"rates": json.dumps(self.ema.rates)})
            opt_tensors = {}
            opt_plain = split_state(sharded[2], opt_tensors)
            _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        elif self.rank == 0:
            _save_tensors(tmp / "model.safetensors", self.model.state_dict())
            _save_tensors(tmp / "ema.safetensors", self.ema.tensors(),
                          metadata={"rates": json.dumps(self.ema.rates)})
            opt_tensors: dict[str, Tensor] = {}
            opt_plain = split_state(self.optimizer.state_dict(), opt_tensors)
            _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        self._barrier()
        if self.rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT, "step": self.step, "world_size": self.world,
                "recent_losses": list(self.recent_losses), "ema_rates": self.ema.rates, "history": self.history,
                "config": self.config.model_dump(mode="json"), "time": time.time(),
            }
            if self.groups:
                state["groups"] = groups_plain
            else:
                state.update({"optimizer": opt_plain, "ema_updates": self.ema.updates,
                              "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None})
            atomic_write_json(tmp / "state.json", state)  # written last: the checkpoint is complete once it exists
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_json(root / "latest.json", {"checkpoint": name, "step": self.step})
            self._prune(root, keep=name)
        self._barrier()
        self.last_checkpoint = final
        return final

    def _save_groups(self, tmp: Path) -> dict[str, Any]:
        """Write each group's optimizer (``optimizer-NAME``) and EMA (``ema-NAME``) tensors; returns the JSON part."""
        plain: dict[str, Any] = {}
        for g in self.groups:
            opt_tensors: dict[str, Tensor] = {}
            opt_plain = split_state(self.optimizers[g.name].state_dict(), opt_tensors)
            _save_tensors(tmp / f"optimizer-{g.name}.safetensors", opt_tensors)
            ema = self.emas.get(g.name)
            if ema is not None:
                _save_tensors(tmp / f"ema-{g.name}.safetensors", ema.tensors(),
                              metadata={"rates": json.dumps(ema.rates)})
            scaler = self.scalers[g.name]
            plain[g.name] = {"optimizer": opt_plain, "updates": self.updates[g.name],
                             "ema_updates": ema.updates if ema is not None else None,
                             "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        return plain

    def _load_groups(self, path: Path, state: dict[str, Any]) -> None:
        saved = state.get("groups")
        names = [g.name for g in self.groups]
        if saved is None or list(saved) != names:
            raise AccelkitError(f"{path}: checkpoint has parameter groups {list(saved or [])}, this run {names}")
        for g in self.groups:
            entry = saved[g.name]
            opt = join_state(entry["optimizer"], _load_tensors(path / f"optimizer-{g.name}.safetensors"))
            _load_optimizer(self.optimizers[g.name], opt)
            ema = self.emas.get(g.name)
            if (ema is None) != (entry["ema_updates"] is None):
                raise AccelkitError(f"{path}: group {g.name!r} has EMA {'off' if ema is None else 'on'} in this run, "
                                    f"not in the checkpoint")
            if ema is not None:
                ema.load_tensors(_load_tensors(path / f"ema-{g.name}.safetensors"))
                ema.updates = int(entry["ema_updates"])
            if entry.get("scaler") and self.scalers[g.name].is_enabled():
                self.scalers[g.name].load_state_dict(entry["scaler"])
            self.updates[g.name] = int(entry["updates"])

    def _prune(self, root: Path, keep: str) -> None:
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").exists())
        for old in done[: max(0, len(done) - self.config.keep_checkpoints)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, EMA, scaler, step, data cursor and random generators from ``path``."""
        path = Path(path)
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise AccelkitError(f"{path}: not a readable checkpoint ({e})") from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise AccelkitError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        weights = _load_tensors(path / "model.safetensors")
        if self._sharded is not None:  # loop.fsdp: the plain model checks the names, the shards take the values
            missing, unexpected = self._plain.load_state_dict(weights, strict=False)
        else:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise AccelkitError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]}): was it made by another recipe?")
        if [float(r) for r in state["ema_rates"]] != self.ema.rates:
            raise AccelkitError(f"{path}: checkpoint has EMA rates {state['ema_rates']}, this run {self.ema.rates}")
        if self.groups:
            self._load_groups(path, state)
        else:
            if "optimizer" not in state:
                raise AccelkitError(f"{path}: a checkpoint of a run with parameter groups, this run has none")
            self.ema.load_tensors(_load_tensors(path / "ema.safetensors"))
            opt = join_state(state["optimizer"], _load_tensors(path / "optimizer.safetensors"))
            if self._sharded is not None:
                self._fsdp_load(weights, opt)
            else:
                _load_optimizer(self.optimizer, opt)
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if not self.groups:
            self.ema.updates = int(state.get("ema_updates", self.step))
        self.recent_losses = deque(state.get("recent_losses", []), maxlen=16)
        self.history = list(state.get("history", []))
        rank_file = path / f"rank{self.rank}.json"
        if not rank_file.exists():  # resumed on more processes than saved: start this rank's streams from rank 0's
            rank_file = path / "rank0.json"
        plain = json.loads(rank_file.read_text())
        tensors = _load_tensors(rank_file.with_suffix(".safetensors"))
        set_rng_state(join_state(plain["rng"], {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}))
        if plain["data"] is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(join_state(plain["data"], {k[5:]: v for k, v in tensors.items()
                                                                 if k.startswith("data.")}))
        self.last_checkpoint = path

    def resume(self) -> bool:
        """Load the latest checkpoint in ``checkpoint_dir`` if there is one; True if it did."""
        latest = self.latest_checkpoint()
        if latest is None:
            return False
        self.load_checkpoint(latest)
        return True

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    # -------------------------------------------------------------------------------------------------------- loop

    def _autocast(self):
        if self.config.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on ``batch`` (this rank's part of the global batch); returns the logged values."""
        if self.groups:
            return self._train_step_groups(batch)
        cfg = self.config
        micro = _split_batch(_to_device(batch, self.device), cfg.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        extra: dict[str, Tensor] = {}
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1 or self.world == 1
            ctx = self.module.no_sync() if not sync and self._sharded is None else nullcontext()
            with ctx:
                with self._autocast():
                    out = self.loss_fn(self.module, mb)
                loss, logs = out if isinstance(out, tuple) else (out, {})
                self.scaler.scale(loss / len(micro)).backward()
            total += loss.detach().float() / len(micro)
            for k, v in logs.items():
                extra[k] = extra.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach() / len(micro)
        # Gradient clipping stays on the device (the norm is a tensor: no host sync here).
        grad_norm_t = None
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm_t = nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], cfg.grad_clip)
            if hasattr(grad_norm_t, "full_tensor"):  # loop.fsdp: the norm over every shard
                grad_norm_t = grad_norm_t.full_tensor()
        keys, values, grad_norm = self._reduce_step(total, extra, grad_norm_t, carries_signals=True)
        loss_value = values[0]
        if not math.isfinite(loss_value):
            self._diverged(f"loss = {loss_value}")
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        if grad_norm is not None and not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            self._diverged(f"gradient norm = {grad_norm}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        self.recent_losses.append(loss_value)
        logged = {"loss": loss_value, "lr": cfg.lr_at(self.step - 1),
                  **dict(zip(keys, values[1:1 + len(keys)], strict=True))}
        if grad_norm is not None:
            logged["grad_norm"] = grad_norm
        return logged

    def _train_step_groups(self, batch: Any) -> dict[str, float]:
        """One step of a several-network run: every group due at this step, in order, takes one optimizer step on
        its own loss over ``batch``; logged values are prefixed with the group's name (``loss``: the last one's)."""
        cfg = self.config
        micro = _split_batch(_to_device(batch, self.device), cfg.grad_accum)
        due = [g for g in self.groups if g.settings.due(self.step)]
        logged: dict[str, float] = {}
        for i, g in enumerate(due):
            st, params = g.settings, self._group_params[g.name]
            optimizer, scaler = self.optimizers[g.name], self.scalers[g.name]
            others = [p for h in self.groups if h is not g for p in self._group_params[h.name]]
            self.model.zero_grad(set_to_none=True)
            total = torch.zeros((), device=self.device, dtype=torch.float32)
            extra: dict[str, Tensor] = {}
            for p in others:  # the other networks pass gradients through to their inputs but accumulate none
                p.requires_grad_(False)
            try:
                for mb in micro:
                    with self._autocast():
                        out = g.loss_fn(self.model, mb)
                    loss, logs = out if isinstance(out, tuple) else (out, {})
                    scaler.scale(loss / len(micro)).backward()
                    total += loss.detach().float() / len(micro)
                    for k, v in logs.items():
                        extra[k] = extra.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach() / len(micro)
            finally:
                for p in others:
                    p.requires_grad_(True)
            if self.world > 1:  # average this group's gradients over the ranks: one all-reduce
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([gr.reshape(-1) for gr in grads])
                torch.distributed.all_reduce(flat)
                flat /= self.world
                for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
                    p.grad = chunk.view_as(p).to(p.dtype)
            clip = st.clip(cfg)
            grad_norm_t = None
            if clip is not None:
                scaler.unscale_(optimizer)
                grad_norm_t = nn.utils.clip_grad_norm_(params, clip)
            last = i == len(due) - 1  # the last update of the step carries the signal and the checkpoint timer
            keys, values, grad_norm = self._reduce_step(total, extra, grad_norm_t, carries_signals=last)
            loss_value = values[0]
            if not math.isfinite(loss_value):
                self._diverged(f"{g.name} loss = {loss_value}")
            lr = st.lr_at(cfg, self.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if grad_norm is not None and not math.isfinite(grad_norm) and not scaler.is_enabled():
                self._diverged(f"{g.name} gradient norm = {grad_norm}")
            scaler.step(optimizer)
            scaler.update()
            if g.name in self.emas:
                self.emas[g.name].update(g.module)
            self.updates[g.name] += 1
            logged.update({f"{g.name}/loss": loss_value, f"{g.name}/lr": lr,
                           **{f"{g.name}/{k}": v for k, v in zip(keys, values[1:1 + len(keys)], strict=True)}})
            if grad_norm is not None:
                logged[f"{g.name}/grad_norm"] = grad_norm
            logged["loss"] = loss_value
        self.model.zero_grad(set_to_none=True)
        self.step += 1
        self.recent_losses.append(logged["loss"])
        return logged

    def _reduce_step(self, total: Tensor, extra: dict[str, Tensor], grad_norm_t: Tensor | None,
                     carries_signals: bool) -> tuple[list[str], list[float], float | None]:
        """One reduction and one host sync per update carry the loss, the logged values, the gradient norm and, when
        ``carries_signals``, the signal that arrived (if any) and rank 0's checkpoint timer, so that every rank agrees
        on all of them (and sets the stop / save flags alike). Returns (sorted log keys, values, gradient norm)."""
        keys = sorted(extra)
        ck = self._checkpointer
        signum = float(ck.signum or 0) if ck is not None and carries_signals else 0.0
        timer = float(carries_signals and ck is not None and self.rank == 0 and ck.due())
        norm = [grad_norm_t.detach().float().reshape(())] if grad_norm_t is not None else []
        packed = torch.cat([torch.stack([total, *[extra[k].to(self.device) for k in keys], *norm]),
                            torch.tensor([signum, timer], device=self.device)])
        if self.world > 1:
            torch.distributed.all_reduce(packed)
            packed[:-2] /= self.world
        values = packed.tolist()
        if carries_signals:
            if values[-2] > 0:
                self._stop = int(ck.signum) if ck is not None and ck.signum else signal.SIGTERM
            self._save_due = values[-1] > 0 or self._stop is not None
        return keys, values, (values[-3] if grad_norm_t is not None else None)

    def _diverged(self, what: str) -> None:
        recent = ", ".join(f"{v:.4g}" for v in self.recent_losses) or "none"
        where = (f"the last good checkpoint is {self.last_checkpoint} (step {self._ckpt_step()}); rerun to resume "
                 f"from it, e.g. with a lower learning rate or gradient clipping" if self.last_checkpoint
                 else "no checkpoint was written yet")
        raise TrainingDiverged(f"training diverged at step {self.step + 1}: {what}; recent losses: [{recent}]; "
                               f"{where}")

    def _ckpt_step(self) -> int | None:
        if self.last_checkpoint is None:
            return None
        return int(json.loads((self.last_checkpoint / "state.json").read_text())["step"])

    def _checkpoint_due(self) -> bool:
        if self.checkpoint_dir is None:
            return False
        every = self.config.checkpoint_every
        return bool(every and self.step % every == 0) or self._save_due

    def validate(self) -> dict[str, float]:
        if self.validate_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = {f"val/{k}": float(v) for k, v in self.validate_fn(self).items()}
        finally:
            self.model.train(was_training)
        return metrics

    def fit(self, resume: bool = True) -> dict[str, float]:
        """Train to ``config.steps`` (resuming from the latest checkpoint when ``resume``); returns the last logs.

        Raises :class:`accelkit.errors.JobInterrupted` after checkpointing when SIGINT/SIGTERM arrives (the CLI exits
        with 128 + the signal number), and :class:`TrainingDiverged` on a non-finite loss.
        """
        cfg = self.config
        if resume and self.checkpoint_dir is not None and self.resume() and self.progress:
            from .console import log

            log(f"resumed from {self.last_checkpoint} at step {self.step}")
        self.model.train()
        logs: dict[str, float] = {}
        every = cfg.checkpoint_interval_s if cfg.checkpoint_interval_s > 0 else math.inf
        with Checkpointer(every, what="training") as ckpt, \
                progress_bar(cfg.steps, "train", completed=self.step, unit="step", disable=not self.progress) as bar:
            self._checkpointer = ckpt
            try:
                last_shown = 0.0
                while self.step < cfg.steps:
                    logs = self.train_step(next(self.data))
                    if cfg.validate_every and self.step % cfg.validate_every == 0 and self.step < cfg.steps:
                        logs.update(self.validate())
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log(logs)
                    bar.advance(1)
                    if time.monotonic() - last_shown > 0.2:
                        bar.update(description=f"train loss {logs['loss']:.4g}")
                        last_shown = time.monotonic()
                    if self._stop is not None:
                        path = self.save_checkpoint() if self.checkpoint_dir is not None else None
                        where = f"; checkpoint {path}" if path else ""
                        raise JobInterrupted(f"training stopped by {signal.Signals(self._stop).name} after step "
                                             f"{self.step}{where}; run the same command again to resume", self._stop)
                    if self.step < cfg.steps and self._checkpoint_due():
                        self.save_checkpoint()
                        ckpt.saved()
            finally:
                self._checkpointer = None
        if self._sharded is not None:
            self._fsdp_finish()
        if self.validate_fn is not None:
            logs.update(self.validate())
            self._log(logs)
        if self.checkpoint_dir is not None and (self.last_checkpoint is None or self._ckpt_step() != self.step):
            self.save_checkpoint()
        return logs

    def _log(self, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        entry = {"step": self.step, **values}
        self.history.append(entry)
        if self.on_log is not None:
            self.on_log(self.step, entry)


__all__ = [
    "LoopConfig", "LoraSettings", "Trainer", "EMA", "GroupSettings", "ParamGroup", "TrainingDiverged", "LossFn",
    "ValidateFn", "ResumableIterator", "init_distributed", "default_device", "resolve_device", "apply_lora",
    "merge_lora",
    "rng_state", "set_rng_state",
]
