"""train: a small diffusion or flow-matching teacher trained from scratch, as an artifact that loads as a teacher.

The network is accelkit's built-in MLP (vector data such as the 2-D toy sets) or SmallUNet (images), trained by
:class:`accelkit.training.Trainer` on a :class:`accelkit.objectives.DenoisingObjective`:

* ``objective: flow``: flow matching on the linear schedule x_t = (1 - t) x0 + t eps, the network predicts the
  velocity eps - x0, t ~ U(0, 1) (Lipman et al. 2022; Liu et al. 2022);
* ``objective: eps``: DDPM noise prediction on a discrete VP schedule of 1000 steps (``vp-linear`` betas by default),
  the network takes the step k = t N - 1 (Ho et al. 2020).

The artifact holds ``teacher.safetensors`` (accelkit's teacher format: the EMA weights, with the architecture,
network config, prediction type, schedule and timestep input in the header, so ``load_teacher`` rebuilds it) and
``history.json`` (the logged losses and metrics). On the 2-D sets the summary reports the sliced Wasserstein distance
of the teacher's samples (Euler, 64 steps) to held-out data, next to the untrained network's. While it runs, training
checkpoints live in ``checkpoint/``; run the same command again after a crash or kill to resume exactly; they are
removed once the artifact is complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..artifacts import Artifact, open_on_rank0
from ..console import log
from ..data import DATA_NAMES, TOY_2D, BatchSampler, DataSet, load_dataset, seeded_generator, stream_seed
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage
from ..training import LOOP_EXECUTION_FIELDS, LoopConfig, Trainer, init_distributed, resolve_device

KIND = "train"
OBJECTIVES = {"flow": ("flow", "linear"), "eps": ("eps", "vp-linear")}
#: Loop settings that change how the job runs, not its result: left out of the artifact identity.


class NetworkSettings(BaseModel):
    """The built-in network: ``auto`` picks accelkit.MLP for vectors and accelkit.SmallUNet for images."""

    model_config = ConfigDict(extra="forbid")
    architecture: Literal["auto", "accelkit.MLP", "accelkit.SmallUNet"] = "auto"
    hidden: int = Field(256, ge=1, description="MLP width")
    depth: int = Field(4, ge=1, description="MLP residual blocks")
    fourier_features: int = Field(0, ge=0, description="MLP: n > 0 feeds it Fourier features sin / cos(pi base 2^k x), "
                                  "k < n, beside x (sharp edges in 2-D data); 0: x alone")
    fourier_base: float = Field(0.5, gt=0, description="MLP: the lowest Fourier frequency, in half-cycles per unit")
    base: int = Field(32, ge=8, description="SmallUNet channels at the first level (a multiple of 8)")
    mults: list[int] = Field(default_factory=lambda: [1, 2], description="SmallUNet channel multipliers per level")


def default_loop() -> LoopConfig:
    return LoopConfig(steps=3000, lr=1e-3, warmup_steps=100, ema_rates=[0.999], checkpoint_every=500)


class TrainRecipe(StageRecipe):
    """train: a small diffusion / flow-matching teacher trained from scratch on a data set."""

    input_fields = ("data",)
    execution_fields = frozenset({"device", "eval_samples"})

    data: str = Field("checkerboard", description=f"one of {', '.join(DATA_NAMES)} or a .safetensors/.npy file")
    data_size: int = Field(100_000, ge=16, description="points drawn for a 2-D toy set")
    objective: Literal["flow", "eps"] = Field("flow", description="flow: flow matching (linear schedule); eps: "
                                                                   "DDPM noise prediction (discrete VP schedule)")
    schedule: Literal["linear", "vp-linear", "vp-scaled-linear", "vp-squaredcos"] | None = Field(
        None, description="noise schedule; default linear for flow, vp-linear for eps")
    batch_size: int = Field(256, ge=1, description="global batch size (over all processes)")
    seed: int = Field(0, ge=0, description="seeds the initial weights, the data order and the noise")
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    loop: LoopConfig = Field(default_factory=default_loop)
    eval_samples: int = Field(2000, ge=0, description="2-D sets: samples for the final sliced Wasserstein check")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @field_validator("data")
    @classmethod
    def _known_data(cls, v: str) -> str:
        if v not in DATA_NAMES and not v.endswith((".safetensors", ".npy")):
            raise ValueError(f"expected one of {', '.join(DATA_NAMES)} or a .safetensors/.npy file")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not (v in ("auto", "cpu", "cuda") or v.startswith("cuda:")):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainRecipe:
        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        if self.objective == "flow" and self.schedule not in (None, "linear"):
            raise ValueError(f"objective flow trains on the linear schedule, not {self.schedule}")
        if self.objective == "eps" and self.schedule == "linear":
            raise ValueError("objective eps trains on a discrete VP schedule (vp-linear, vp-scaled-linear, "
                             "vp-squaredcos), not linear")
        return self

    @property
    def data_is_file(self) -> bool:
        return self.data not in DATA_NAMES

    def inputs(self) -> dict[str, str]:
        return {"data": self.data} if self.data_is_file else {}

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        if not self.data_is_file:
            d["data"] = self.data  # a named set is part of the recipe, a file enters through its content hash
        else:
            d.pop("data_size", None)
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        if not self.network.fourier_features:  # recipes from before the option keep their identity
            d["network"] = {k: v for k, v in d["network"].items() if k not in ("fourier_features", "fourier_base")}
        return d

    @property
    def schedule_name(self) -> str:
        return self.schedule or OBJECTIVES[self.objective][1]


# ------------------------------------------------------------------------------------------------------- building


def build_teacher_network(recipe: TrainRecipe, sample_shape: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    """(architecture, config) of the network for data of ``sample_shape``.

    The sinusoidal time embedding wants timestep inputs of order 1000: a continuous-time (flow) network takes t
    scaled by 1000, a DDPM network its step number 0..999 as it is.
    """
    net = recipe.network
    arch = net.architecture
    if arch == "auto":
        arch = "accelkit.MLP" if len(sample_shape) == 1 else "accelkit.SmallUNet"
    time_scale = 1000.0 if recipe.objective == "flow" else 1.0
    if arch == "accelkit.MLP":
        if len(sample_shape) != 1:
            raise AccelkitError(f"network accelkit.MLP takes vectors; data {recipe.data} has samples of shape "
                                f"{list(sample_shape)} (use accelkit.SmallUNet or auto)")
        config = {"dim": sample_shape[0], "hidden": net.hidden, "depth": net.depth, "time_scale": time_scale,
                  "num_classes": 0}
        if net.fourier_features:
            config.update({"fourier_features": net.fourier_features, "fourier_base": net.fourier_base})
        return arch, config
    if len(sample_shape) != 3:
        raise AccelkitError(f"network accelkit.SmallUNet takes images (C x H x W); data {recipe.data} has samples "
                            f"of shape {list(sample_shape)}")
    if net.base % 8:
        raise AccelkitError(f"network.base {net.base}: expected a multiple of 8 (GroupNorm groups)")
    return arch, {"channels": sample_shape[0], "base": net.base, "mults": list(net.mults), "time_scale": time_scale,
                  "num_classes": 0}


def make_teacher(network: torch.nn.Module, recipe: TrainRecipe, sample_shape: tuple[int, ...], info: dict[str, Any]):
    from ..models.builtin import builtin_call
    from ..schedules import schedule_from_name
    from ..teacher import NetworkTeacher, TimeInput

    schedule = schedule_from_name(recipe.schedule_name)
    prediction = OBJECTIVES[recipe.objective][0]
    time_input = TimeInput.for_schedule(schedule)
    return NetworkTeacher(network, builtin_call, prediction, schedule, sample_shape, time_input, info=info)


@torch.no_grad()
def sample_2d(teacher, n: int, seed: int, device: torch.device, nfe: int = 64) -> torch.Tensor:
    """n samples of a 2-D teacher by Euler on ``nfe`` uniform steps, from noise of a generator seeded by ``seed``."""
    from ..solvers import solve

    noise = torch.randn(n, *teacher.sample_shape, generator=seeded_generator(seed, 4))
    x1 = teacher.prior_sample(noise.to(device))
    return solve(teacher, x1, solver="euler", nfe=nfe).cpu()


def sliced_wasserstein_to(teacher, held_out: torch.Tensor, seed: int, device: torch.device) -> float:
    from ..metrics import sliced_wasserstein

    return sliced_wasserstein(sample_2d(teacher, len(held_out), seed, device), held_out, seed=seed)


# ----------------------------------------------------------------------------------------------------------- run


def run_train(recipe: TrainRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the teacher of ``recipe``; returns the artifact directory."""
    from ..models.builtin import build_network
    from ..objectives import DenoisingObjective

    device = resolve_device(recipe.device)
    rank, world = init_distributed(device)
    art, path, state, _ = open_on_rank0(rank, output, KIND, recipe, force=force, seeds={"seed": recipe.seed})
    try:
        if state == "complete":
            if rank == 0:
                log(f"train: reusing the complete artifact {path}")
            return path
        if recipe.batch_size % (world * recipe.loop.grad_accum):
            raise AccelkitError(f"batch_size {recipe.batch_size} does not split over {world} processes x "
                                f"grad_accum {recipe.loop.grad_accum}")
        ds = load_dataset(recipe.data, recipe.data_size, recipe.seed)
        shape = ds.sample_shape
        arch, net_config = build_teacher_network(recipe, shape)
        torch.manual_seed(stream_seed(recipe.seed, 3))
        network = build_network(arch, net_config)
        initial = {k: v.clone() for k, v in network.state_dict().items()}
        teacher = make_teacher(network, recipe, shape, {})
        objective = DenoisingObjective(teacher.schedule, teacher.prediction, teacher.call, teacher.time_input)
        sampler = BatchSampler(ds.samples, recipe.batch_size, recipe.seed, rank, world,
                               noise=objective.noise_fn(shape))
        from .student import fit_in_artifact

        fit_in_artifact(art, path, rank, network, objective.loss, sampler, recipe.loop, device,
                        lambda trainer, logs, seconds: finish(art, recipe, ds, trainer, initial, arch, net_config,
                                                              logs, seconds, world, device))
        return path
    finally:
        if art is not None:
            art.close()


def finish(art: Artifact, recipe: TrainRecipe, ds: DataSet, trainer: Trainer, initial: dict[str, torch.Tensor],
           arch: str, net_config: dict[str, Any], logs: dict[str, float], seconds: float, world: int,
           device: torch.device) -> None:
    """Write teacher.safetensors (EMA weights) and history.json, evaluate a 2-D teacher, mark the artifact complete."""
    from ..models.builtin import build_network
    from ..models.loading import ARTIFACT_TEACHER_FILE, save_teacher

    ema_rate = trainer.ema.rates[0] if trainer.ema.rates else None
    network = build_network(arch, net_config)
    network.load_state_dict(trainer.ema_weights(ema_rate))
    info = {"trained_by": "accelkit train", "data": ds.name, "objective": recipe.objective, "steps": trainer.step,
            "weights": f"ema {ema_rate}" if ema_rate is not None else "raw", "seed": recipe.seed}
    teacher = make_teacher(network.to(device).eval(), recipe, ds.sample_shape, info)
    summary: dict[str, Any] = {
        "data": ds.name, "data_info": ds.info, "sample_shape": list(ds.sample_shape), "architecture": arch,
        "network_config": net_config, "parameters": sum(p.numel() for p in network.parameters()),
        "objective": recipe.objective, "prediction_type": teacher.prediction, "schedule": teacher.schedule.config(),
        "steps": trainer.step, "final_loss": logs.get("loss"), "weights": info["weights"], "processes": world,
        "seconds_last_run": round(seconds, 3),
    }
    if ds.name in TOY_2D and recipe.eval_samples > 1:
        held_out = load_dataset(ds.name, recipe.eval_samples, recipe.seed + 1).samples
        untrained = build_network(arch, net_config)
        untrained.load_state_dict(initial)
        before = make_teacher(untrained.to(device).eval(), recipe, ds.sample_shape, {})
        summary["sliced_wasserstein"] = {
            "teacher": sliced_wasserstein_to(teacher, held_out, recipe.seed, device),
            "untrained": sliced_wasserstein_to(before, held_out, recipe.seed, device),
            "samples": recipe.eval_samples, "solver": "euler", "nfe": 64,
        }
        sw = summary["sliced_wasserstein"]
        log(f"train: sliced Wasserstein to held-out data {sw['teacher']:.4f} (untrained network: "
            f"{sw['untrained']:.4f})")
    teacher.network.cpu()
    art.write_with(ARTIFACT_TEACHER_FILE, lambda tmp: save_teacher(teacher, tmp))
    art.write_json("history.json", trainer.history)
    art.progress = {"step": trainer.step, "steps": recipe.loop.steps}
    art.complete(summary)


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, TrainRecipe)
    return run_train(recipe, output, force)


register_stage(KIND, TrainRecipe, _run)

__all__ = ["TrainRecipe", "NetworkSettings", "run_train", "KIND"]
