"""What the stages that train a K-step generator from a teacher share (``score_distill``, ``adversarial``): opening
the run from any SOURCE (a couple artifact, a teacher with data, a teacher alone), the checks of what a method needs
from it, the per-sample draws of a step (all from the batch's seeded generator, so resume and DDP are exact), and the
end: the generator's EMA written as the artifact's teacher with its K-step sampler recorded in ``summary.sampling``
(:mod:`accelkit.generator`). The discriminator's settings (:mod:`accelkit.discriminator`) live here too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..console import log
from ..errors import AccelkitError
from ..training import LoraSettings, Trainer
from . import student as students


class DiscriminatorSettings(BaseModel):
    """The heads on a network's features (:mod:`accelkit.discriminator`) and the noise levels they judge at."""

    model_config = ConfigDict(extra="forbid")
    layers: list[str] | Literal["auto"] = Field("auto", description="module names whose outputs the heads read")
    width: int = Field(64, ge=1, description="hidden width of each head")
    depth: int = Field(1, ge=1, description="hidden layers of each head's MLP (2 for a 2-D teacher's plain features)")
    logit_mean: float = Field(1.0, description="noise levels t = sigmoid(m + s n): m (> 0 skews to high noise)")
    logit_std: float = Field(1.0, gt=0, description="noise levels: s")
    r1_weight: float = Field(0.0, ge=0, description="weight of the approximated R1 penalty (0: off)")
    r1_scale: float = Field(0.01, gt=0, description="approximated R1: the perturbation's standard deviation")
    held_out: int = Field(2048, ge=16, description="samples per side of the held-out batch the discriminator's "
                                                   "accuracy is measured on (validate steps); 2048: +-0.008 at chance")


def lora_targets(network: nn.Module, settings: LoraSettings | None) -> LoraSettings:
    """The fake score's LoRA: ``settings`` as given when its targets exist; else every linear / conv layer."""
    names = {n for n, _ in network.named_modules()}
    if settings is not None and isinstance(settings.target_modules, str):
        return settings
    if settings is not None and any(n.endswith(t) for t in settings.target_modules for n in names):
        return settings
    layers = [n for n, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    base = settings or LoraSettings(rank=8, alpha=8.0)
    return base.model_copy(update={"target_modules": layers})


def draw_fn(recipe, teacher, objective, times: Tensor, conditioning: dict):
    """Every per-sample draw of a step, from the batch's seeded generator (see the module docstring)."""
    from ..objectives import sample_times

    shape = tuple(teacher.sample_shape)
    k_steps = len(times) - 1
    discrete = objective.discrete
    n_train = getattr(teacher.schedule, "num_train_timesteps", None)
    disc = getattr(recipe, "discriminator", None)

    def snap(t: Tensor) -> Tensor:
        if not discrete:
            return t
        return ((torch.ceil(t * n_train) - 1).clamp(0, n_train - 1) + 1) / n_train

    def draw(g: torch.Generator, n: int) -> dict[str, Tensor]:
        out = {"z": torch.randn(n, *shape, generator=g),
               "k": torch.randint(0, k_steps, (n,), generator=g),
               "t_dm": snap(recipe.t_min + (recipe.t_max - recipe.t_min) * torch.rand(n, generator=g,
                                                                                     dtype=torch.float64)),
               "eps_dm": torch.randn(n, *shape, generator=g),
               "t_fake": objective.draw_times(g, n),
               "eps_fake": torch.randn(n, *shape, generator=g)}
        if disc is not None:
            out["t_d"] = snap(sample_times("logit-normal", g, n, disc.logit_mean, disc.logit_std).clamp(1e-3, 1.0))
            out["eps_d"] = torch.randn(n, *shape, generator=g)
            out["eps_d_real"] = torch.randn(n, *shape, generator=g)
            out["r1"] = torch.randn(n, *shape, generator=g)
        if conditioning.get("kind") == "class" and conditioning.get("num_classes") and conditioning.get("draw"):
            out["cond.class_labels"] = torch.randint(0, int(conditioning["num_classes"]), (n,), generator=g)
        return out

    return draw


def open_run(stage: str, recipe, output: Path | None, force: bool,
             check: Callable[[students.StudentRun], None] | None = None) -> students.StudentRun:
    """The run of a score-distillation / adversarial recipe: couplings or teacher + data through
    :func:`students.begin_source_run`, a teacher alone through :func:`students.begin_data_free_run`; ``check(run)``
    runs before the artifact is opened (bad input writes nothing)."""
    if students.is_couplings(recipe.source) or recipe.data is not None:
        return students.begin_source_run(stage, recipe, output, force, check=check)
    return students.begin_data_free_run(stage, recipe, output, force, check=check)


def check_before_training(recipe, run: students.StudentRun, needs_real: bool, needs_pairs: bool) -> dict:
    """What the method needs from SOURCE (a one-line error otherwise); returns the teacher's conditioning info."""
    cond_info = dict(run.start.info.get("conditioning", {"kind": "none"}))
    has_cond = (run.couplings is not None and any(k.startswith("cond.") for k in run.couplings.keys)) or \
        run.conditions is not None
    if needs_pairs and run.couplings is None:
        raise AccelkitError(f"{recipe.source}: method {recipe.method} regresses on couplings pairs; give a couple "
                            f"artifact as SOURCE (or regression_weight 0)")
    if needs_real and run.couplings is None and run.data is None:
        raise AccelkitError(f"{recipe.source}: the GAN term needs real samples: give --data or a couple artifact")
    if cond_info.get("kind") not in (None, "none", "class") and not has_cond:
        raise AccelkitError(f"{recipe.source}: a {cond_info.get('kind')}-conditioned teacher needs its conditions: "
                            f"give a couple artifact made with them as SOURCE, or --prompt / --conditions")
    cond_info["draw"] = cond_info.get("kind") == "class" and not has_cond
    return cond_info


def held_out_real(recipe, run: students.StudentRun, n: int, seed: int) -> tuple[Tensor | None, str]:
    """``n`` real samples that no training batch holds, for the discriminator's held-out accuracy, and what they
    are: fresh draws of a built-in 2-D data set (another seed than the run's), or, with couplings as the real set,
    fresh samples of the teacher's ODE with the couplings' own solver, NFE and grid (i.i.d. draws of the law the
    couplings' samples come from). (None, why) where neither exists (a data file, conditioned or guided couplings):
    the caller then judges the training rows."""
    from ..data import TOY_SAMPLERS, load_dataset, seeded_generator
    from ..evaluation import sample_batched

    if run.data is not None:
        if recipe.data in TOY_SAMPLERS:
            return load_dataset(recipe.data, n, seed=seed).samples.float(), f"fresh {recipe.data} draws"
        return None, "training rows (a data file has no held-out split)"
    if run.couplings is None:
        return None, "no real set"
    made = run.couplings.artifact.manifest["recipe"]
    if made.get("guidance") not in (None, 1, 1.0) or made.get("conditions") or any(
            k.startswith("cond.") for k in run.couplings.keys):
        return None, "training rows (conditioned or guided couplings)"
    teacher = run.reference
    scale = teacher.guidance_scale
    teacher.guidance_scale = 1.0
    try:
        noise = torch.randn(n, *teacher.sample_shape, generator=seeded_generator(seed, 0x4E1D))
        with torch.no_grad():
            x = sample_batched(teacher, noise.to(run.device), made["solver"], int(made["nfe"]),
                               **({"grid": made["grid"]} if made.get("grid") else {}))
    finally:
        teacher.guidance_scale = scale
    return x.float(), f"fresh teacher samples ({made['solver']}, {made['nfe']} NFE, as the couplings)"


def cond_fields(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k.startswith("cond.")}


def finish_generator(art, recipe, run: students.StudentRun, trainer: Trainer, logs: dict[str, float],
                     seconds: float, trained_by: str, extra: dict[str, Any]) -> None:
    """Write the generator (its first EMA) as the artifact's teacher with its K-step sampler; complete."""
    from ..generator import generator_sampling

    network = copy.deepcopy(run.start.network)
    network.load_state_dict(trainer.ema_weights(group="generator"))
    network.eval().requires_grad_(False)
    rate = trainer.config.ema_rates[0] if trainer.config.ema_rates else None
    weights = f"ema {rate}" if rate is not None else "raw"
    info = {"trained_by": trained_by, "method": recipe.method, "steps": trainer.step, "weights": weights,
            "seed": recipe.seed, "source": str(recipe.source), "generator_steps": recipe.steps}
    model = students.student_of(run.reference, network, info)
    summary: dict[str, Any] = {
        "method": recipe.method, "generator_steps": recipe.steps,
        "sampling": generator_sampling(model.schedule, recipe.steps),
        "prediction_type": model.prediction, "schedule": model.schedule.config(),
        "sample_shape": list(model.sample_shape), "steps": trainer.step, "updates": dict(trainer.updates),
        "final_loss": logs.get("loss"), "weights": weights, "processes": run.world,
        "seconds_last_run": round(seconds, 3), **extra,
    }
    log(f"{trained_by.split()[-1]}: {recipe.method} generator at {recipe.steps} step(s), updates {trainer.updates}")
    art.progress = {"step": trainer.step, "steps": recipe.loop.steps}
    students.save_student(art, model, trainer.history, summary)


def held_out_batch(recipe, run: students.StudentRun, draw) -> dict[str, Any]:
    """The discriminator's held-out check: draws of another seed than the run's (generator noise, noise levels,
    noises; ``discriminator.held_out`` of each) and real samples no training batch holds (``real``: see
    :func:`held_out_real`; the training rows where none exist, said in ``real_is``), plus 256 more real samples
    (``probe``) whose features fix the heads' per-channel standardisation."""
    n = recipe.discriminator.held_out
    b = next(run.batches(n, recipe.seed + 7919, noise=draw, whole=True))  # the same on every process
    out: dict[str, Any] = {k: v.to(run.device) if isinstance(v, Tensor) else v for k, v in b.items()}
    fresh, what = held_out_real(recipe, run, n + 256, recipe.seed + 7919)
    if fresh is None:
        rows = students.clean_samples(out).float()
        fresh = torch.cat([rows, rows[:256]])
    out["real"], out["probe"], out["real_is"] = fresh[:n].to(run.device), fresh[n:].to(run.device), what
    return out


def held_out_summary(trainer: Trainer, logs: dict[str, float], held_out: dict[str, Any]) -> dict[str, Any]:
    """The summary's record of the heads' held-out check: the last accuracy, every one through the run (the validate
    steps' ``val/disc_accuracy``) and what the held-out batch was."""
    return {"disc_accuracy": logs.get("val/disc_accuracy"),
            "disc_held_out": {"samples_per_side": len(held_out["real"]), "real": held_out["real_is"]},
            "disc_accuracy_through_run": [h["val/disc_accuracy"] for h in trainer.history
                                          if "val/disc_accuracy" in h]}


__all__ = ["DiscriminatorSettings", "held_out_real", "held_out_batch", "held_out_summary", "lora_targets", "draw_fn",
           "open_run", "check_before_training", "cond_fields", "finish_generator"]
