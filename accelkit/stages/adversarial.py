"""adversarial: a K-step generator from the teacher's weights, trained against a discriminator on the frozen teacher's
features (LADD; Sauer et al. 2024, "Fast high-resolution image synthesis with latent adversarial diffusion
distillation").

Two parameter groups of the one :class:`accelkit.training.Trainer`:

* ``discriminator``: trainable heads on the frozen teacher's features at noised inputs
  (:class:`accelkit.discriminator.FeatureDiscriminator`; the noise level t = sigmoid(m + s n), skewed to high noise
  with m = 1), on the non-saturating loss L_D = E softplus(-D(x_real,t)) + E softplus(D(x_fake,t)) plus the
  approximated R1 penalty r1_weight E ||D(x_real,t) - D(x_real,t + r1_scale n)||^2 (Seaweed-APT);
* ``generator``: the teacher's network as a K-step generator on fixed times (:mod:`accelkit.generator`, backward
  simulation for K > 1), updated once every ``ratio`` steps on L_G = E softplus(-D(x_fake,t)); no distillation
  loss (LADD).

Real samples x_real are the data set's (``--data``) or the couplings' teacher samples (SOURCE a couple artifact).
The artifact is the generator's first EMA with its K-step sampler recorded in ``summary.sampling``; the summary also
reports the discriminator's accuracy on a held-out batch (``discriminator.held_out`` per side, draws of another seed,
real samples in no training batch: fresh draws of a built-in 2-D set or fresh teacher ODE samples with the
couplings' solver, :func:`accelkit.stages.generator_student.held_out_real`; ``disc_held_out`` says which) against the
generator's samples (``disc_accuracy``, and at every ``loop.validate_every`` steps that are also log steps:
``disc_accuracy_through_run``) and against the frozen teacher's own K-step samples
(``disc_accuracy_vs_teacher_samples_through_run``: what a working discriminator recognises as fake).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..recipes import StageRecipe, register_stage
from ..training import LOOP_EXECUTION_FIELDS, GroupSettings, LoopConfig, ParamGroup, Trainer
from . import student as students
from .generator_student import (
    DiscriminatorSettings,
    check_before_training,
    draw_fn,
    finish_generator,
    held_out_batch,
    held_out_summary,
    open_run,
)

KIND = "adversarial"


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=1e-4, betas=(0.0, 0.99), ema_rates=[0.999], checkpoint_every=500,
                      grad_clip=10.0)


class AdversarialRecipe(students.SourceRecipe):
    """adversarial: a K-step generator trained against heads on the frozen teacher's features (LADD)."""

    execution_fields = frozenset({"device"})

    method: Literal["ladd"] = Field("ladd", description="ladd")
    steps: int = Field(1, ge=1, description="K: the generator's steps (its fixed times, the teacher's default grid)")
    ratio: int = Field(1, ge=1, description="discriminator updates per generator update")
    t_min: float = Field(0.02, ge=0, lt=1, description="(unused by ladd; the draws' shared range)")
    t_max: float = Field(0.98, gt=0, le=1, description="(unused by ladd; the draws' shared range)")
    generator: GroupSettings = Field(default_factory=GroupSettings, description="generator optimizer settings "
                                                                                "(every/offset come from ratio)")
    disc: GroupSettings = Field(default_factory=GroupSettings, description="discriminator heads' optimizer settings")
    discriminator: DiscriminatorSettings = Field(default_factory=DiscriminatorSettings)
    batch_size: int = Field(256, ge=2, description="global batch size (over all processes; >= 2)")
    seed: int = Field(0, ge=0, description="seeds every draw of the run")
    loop: LoopConfig = Field(default_factory=default_loop)
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> AdversarialRecipe:
        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        return self

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        return d


def run_adversarial(recipe: AdversarialRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the generator of ``recipe``; returns the artifact directory."""
    from .. import discriminator as gan
    from ..generator import generate, generator_times
    from ..objectives import DenoisingObjective, condition_of
    from ..score_distill import noised

    checked: dict[str, Any] = {}

    def check(r: students.StudentRun) -> None:
        checked["cond"] = check_before_training(recipe, r, needs_real=True, needs_pairs=False)
        checked["times"] = generator_times(r.start.schedule, recipe.steps)

    run = open_run(KIND, recipe, output, force, check)
    art, path, device = run.art, run.path, run.device
    try:
        if run.complete:
            return path
        generator, frozen = run.start, run.reference
        cond_info, times = checked["cond"], checked["times"]
        frozen.guidance_scale = 1.0
        frozen.to(device)
        objective = DenoisingObjective(frozen.schedule, frozen.prediction, frozen.call, frozen.time_input)
        draw = draw_fn(recipe, frozen, objective, times, cond_info)
        held_out = held_out_batch(recipe, run, draw)
        probe = (noised(frozen.schedule, held_out["probe"], held_out["t_d"][:len(held_out["probe"])],
                        held_out["eps_d_real"][:len(held_out["probe"])]), held_out["t_d"][:len(held_out["probe"])],
                 None)
        disc = gan.FeatureDiscriminator(frozen, recipe.discriminator.layers, recipe.discriminator.width,
                                        probe=probe, seed=recipe.seed, depth=recipe.discriminator.depth)
        model = nn.ModuleDict({"generator": generator.network, "discriminator": disc})
        batches = run.batches(recipe.batch_size, recipe.seed, noise=draw)
        multi = len(times) > 2
        settings = recipe.discriminator

        def samples(b: dict[str, Tensor]) -> Tensor:
            return generate(generator, b["z"], times, condition_of(b), stop=b["k"] if multi else None)

        def logits(x: Tensor, b: dict[str, Tensor], eps_key: str) -> tuple[Tensor, Tensor]:
            xt = noised(frozen.schedule, x, b["t_d"], b[eps_key])
            return disc(xt, b["t_d"], condition_of(b)), xt

        def disc_loss(m: nn.Module, b: dict[str, Tensor]):
            with torch.no_grad():
                x = samples(b)
            real_logits, real_xt = logits(students.clean_samples(b), b, "eps_d_real")
            fake_logits, _ = logits(x, b, "eps_d")
            loss = gan.discriminator_loss(real_logits, fake_logits)
            logs = {"d_acc": torch.tensor(gan.accuracy(real_logits.detach(), fake_logits.detach()))}
            if settings.r1_weight > 0:
                r1 = gan.approximate_r1(disc, real_xt, b["t_d"], condition_of(b), real_logits, settings.r1_scale,
                                        b["r1"])
                loss = loss + settings.r1_weight * r1
                logs["r1"] = r1.detach()
            return loss, logs

        def generator_loss(m: nn.Module, b: dict[str, Tensor]):
            fake_logits, _ = logits(samples(b), b, "eps_d")
            return gan.generator_gan_loss(fake_logits), {}

        ratio = recipe.ratio
        groups = [
            ParamGroup("discriminator", disc, disc_loss, recipe.disc.model_copy(update={"every": 1, "offset": 0})),
            ParamGroup("generator", model["generator"], generator_loss,
                       recipe.generator.model_copy(update={"every": ratio, "offset": ratio - 1, "ema": True})),
        ]

        with torch.no_grad():  # the frozen teacher's own K-step samples: fakes a working discriminator spots
            start_fakes = generate(frozen, held_out["z"], times, condition_of(held_out))

        def validate(tr: Trainer) -> dict[str, float]:  # the discriminator on a batch it never trains on
            real_logits, _ = logits(held_out["real"], held_out, "eps_d_real")
            fake_logits, _ = logits(samples(held_out), held_out, "eps_d")
            start_logits, _ = logits(start_fakes, held_out, "eps_d")
            return {"disc_accuracy": gan.accuracy(real_logits, fake_logits),
                    "disc_accuracy_teacher_samples": gan.accuracy(real_logits, start_logits)}

        def finish(trainer: Trainer, logs: dict[str, float], seconds: float) -> None:
            against_teacher = [h["val/disc_accuracy_teacher_samples"] for h in trainer.history
                               if "val/disc_accuracy_teacher_samples" in h]
            finish_generator(art, recipe, run, trainer, logs, seconds, "accelkit adversarial",
                             {"ratio": ratio, **held_out_summary(trainer, logs, held_out),
                              "disc_accuracy_vs_teacher_samples_through_run": against_teacher})

        students.fit_in_artifact(art, path, run.rank, model, None, batches, recipe.loop, device, finish,
                                 groups=groups, validate_fn=validate)
        return path
    finally:
        run.close()


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, AdversarialRecipe)
    return run_adversarial(recipe, output, force)


register_stage(KIND, AdversarialRecipe, _run)

__all__ = ["AdversarialRecipe", "run_adversarial", "KIND"]
