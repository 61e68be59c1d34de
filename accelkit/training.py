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
Rank 0 writes the checkpoint's shared files, every rank writes its own random-generator state.

A non-finite loss or gradient norm stops training with :class:`TrainingDiverged`, before the optimizer step, so the
last checkpoint on disk stays a good one.
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
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
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


class Trainer:
    """Trains ``model`` on ``loss_fn(model, batch)`` for ``config.steps`` optimizer steps; see the module docstring.

    ``data`` yields this rank's batch of each step (a tensor, or a dict/list of tensors batched along dim 0), which
    the trainer splits into ``config.grad_accum`` micro-batches; ``loss_fn`` returns the micro-batch's mean loss.
    ``checkpoint_dir`` (optional) is where checkpoints go; :meth:`fit` resumes from the latest one found there.
    ``validate_fn(trainer)`` runs every ``config.validate_every`` steps and at the end; its metrics are logged.
    ``on_log(step, values)`` receives logged values (rank 0), e.g. for a metrics file or a progress display.
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
        if config.lora is not None:
            model = apply_lora(model, config.lora)
        self.model = model.to(self.device)
        self.module: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.loss_fn, self.data, self.validate_fn, self.on_log = loss_fn, data, validate_fn, on_log
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress and self.rank == 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise AccelkitError("the model has no trainable parameters")
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.RAdam
        kw: dict[str, Any] = {"decoupled_weight_decay": True} if config.optimizer == "radam" else {}
        self.optimizer = opt_cls(params, lr=config.lr_at(0), betas=tuple(config.betas), eps=config.eps,
                                 weight_decay=config.weight_decay, **kw)
        self.ema = EMA(self.model, config.ema_rates, config.ema_warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = 0
        self.recent_losses: deque[float] = deque(maxlen=16)
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self._checkpointer: Checkpointer | None = None
        self._stop: int | None = None  # the signal that stops every rank, once the ranks agreed on it
        self._save_due = False

    # --------------------------------------------------------------------------------------------------- weights

    def ema_weights(self, rate: float | None = None) -> dict[str, Tensor]:
        """The model's state dict averaged at ``rate`` (default: the first EMA rate; no EMA: the raw weights)."""
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
        if self.rank == 0:
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
                "optimizer": opt_plain, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "recent_losses": list(self.recent_losses), "ema_rates": self.ema.rates, "history": self.history,
                "ema_updates": self.ema.updates,
                "config": self.config.model_dump(mode="json"), "time": time.time(),
            }
            atomic_write_json(tmp / "state.json", state)  # written last: the checkpoint is complete once it exists
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_json(root / "latest.json", {"checkpoint": name, "step": self.step})
            self._prune(root, keep=name)
        self._barrier()
        self.last_checkpoint = final
        return final

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
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise AccelkitError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]}): was it made by another recipe?")
        if [float(r) for r in state["ema_rates"]] != self.ema.rates:
            raise AccelkitError(f"{path}: checkpoint has EMA rates {state['ema_rates']}, this run {self.ema.rates}")
        self.ema.load_tensors(_load_tensors(path / "ema.safetensors"))
        opt = join_state(state["optimizer"], _load_tensors(path / "optimizer.safetensors"))
        opt["state"] = {int(k): v for k, v in opt["state"].items()}
        for group in opt["param_groups"]:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        self.optimizer.load_state_dict(opt)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
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
        cfg = self.config
        micro = _split_batch(_to_device(batch, self.device), cfg.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        extra: dict[str, Tensor] = {}
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1 or self.world == 1
            ctx = self.module.no_sync() if not sync else nullcontext()
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
        # One reduction and one host sync per step carry the loss, the logged values, the gradient norm, the signal
        # that arrived (if any) and rank 0's checkpoint timer, so that every rank agrees on all of them.
        keys = sorted(extra)
        ck = self._checkpointer
        signum = float(ck.signum or 0) if ck is not None else 0.0
        timer = float(ck is not None and self.rank == 0 and ck.due())
        norm = [grad_norm_t.detach().float().reshape(())] if grad_norm_t is not None else []
        packed = torch.cat([torch.stack([total, *[extra[k].to(self.device) for k in keys], *norm]),
                            torch.tensor([signum, timer], device=self.device)])
        if self.world > 1:
            torch.distributed.all_reduce(packed)
            packed[:-2] /= self.world
        values = packed.tolist()
        loss_value = values[0]
        if values[-2] > 0:
            self._stop = int(ck.signum) if ck is not None and ck.signum else signal.SIGTERM
        self._save_due = values[-1] > 0 or self._stop is not None
        if not math.isfinite(loss_value):
            self._diverged(f"loss = {loss_value}")
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        grad_norm = values[-3] if grad_norm_t is not None else None
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
    "LoopConfig", "LoraSettings", "Trainer", "EMA", "TrainingDiverged", "LossFn",
    "ValidateFn", "ResumableIterator", "init_distributed", "default_device", "apply_lora", "merge_lora",
    "rng_state", "set_rng_state",
]
