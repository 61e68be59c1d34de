"""score_distill: a K-step generator from the teacher's weights, trained by VSD, DMD, DMD2 or SIM.

The losses and their papers are in :mod:`accelkit.score_distill`, the K-step generator on fixed times (and its
backward simulation) in :mod:`accelkit.generator`, the GAN heads of dmd2 in :mod:`accelkit.discriminator`. This
stage wires them into the one :class:`accelkit.training.Trainer` as two parameter groups:

* ``fake_score``: a copy of the teacher (all weights, or LoRA adapters with ``fake_lora``; vsd: LoRA on every
  linear / conv layer unless given) trained by the teacher's denoising objective on the generator's detached samples,
  unguided; with dmd2's GAN (``gan_weight`` > 0) also its heads and the discriminator loss (``gan_weight_fake``);
* ``generator``: the teacher's network, updated once every ``ratio`` steps (after that step's fake-score update:
  DMD2's 5 fake-score updates per generator update is ``ratio: 5``) on

  - ``vsd`` / ``dmd2``: the distribution-matching loss (+ ``gan_weight`` x the non-saturating GAN loss for dmd2);
  - ``dmd``: the same plus ``regression_weight`` x the regression of G(z) on the couplings' teacher ODE samples x*
    (pseudo-Huber, or the mean squared feature distance under ``features``); SOURCE must be a couple artifact;
  - ``sim``: SIM's surrogate (``distance`` pseudo-huber or l2, ``sim_alpha``).

The real score is the frozen teacher at guidance scale ``guidance`` (default: the couplings' scale, else 1). SOURCE
is a couple artifact (its noise/sample pairs and conditions), a teacher with ``--data`` (its samples are the real
samples of the GAN term), or a teacher alone (noise only; class labels drawn uniformly for a class model). Every
random draw (generator noise, backward-simulation step, noise levels, noises) comes from the batch's seeded
generator, so a resumed run (kill -9 included, between the two groups' updates too) continues exactly.

The artifact's ``teacher.safetensors`` is the generator (its first EMA), with the teacher's prediction type and
schedule; its summary records ``sampling`` (the K-step sampler on its fixed times) for ``accelkit sample``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..recipes import StageRecipe, register_stage
from ..training import LOOP_EXECUTION_FIELDS, GroupSettings, LoopConfig, LoraSettings, ParamGroup, Trainer
from . import student as students
from .generator_student import (
    DiscriminatorSettings,
    check_before_training,
    cond_fields,
    draw_fn,
    finish_generator,
    held_out_batch,
    held_out_summary,
    lora_targets,
    open_run,
)

KIND = "score_distill"


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=1e-4, warmup_steps=0, ema_rates=[0.999], checkpoint_every=500, grad_clip=10.0)


class ScoreDistillRecipe(students.SourceRecipe):
    """score_distill: a K-step generator trained by VSD, DMD, DMD2 or SIM against the frozen teacher."""

    execution_fields = frozenset({"device"})

    method: Literal["vsd", "dmd", "dmd2", "sim"] = Field("dmd2", description="vsd, dmd, dmd2 or sim")
    steps: int = Field(1, ge=1, description="K: the generator's steps (its fixed times, the teacher's default grid)")
    guidance: float | None = Field(None, gt=0, description="the real score's guidance scale (None: the couplings', "
                                                           "else 1)")
    ratio: int | None = Field(None, ge=1, description="fake-score updates per generator update (None: 5 for dmd2, "
                                                      "1 otherwise)")
    regression_weight: float | None = Field(None, ge=0, description="dmd: weight of the regression on couplings "
                                                                   "(None: 0.25)")
    features: str | None = Field(None, description="dmd: a feature network (accelkit.features spec) for the "
                                                   "regression distance; None: pseudo-Huber on the samples")
    gan_weight: float = Field(0.0, ge=0, description="dmd2: the generator's GAN weight (0: no GAN; DMD2 3e-3)")
    gan_weight_fake: float = Field(1e-2, ge=0, description="dmd2: the fake score's discriminator-loss weight")
    t_min: float = Field(0.02, ge=0, lt=1, description="distribution matching: lowest noise level")
    t_max: float = Field(0.98, gt=0, le=1, description="distribution matching: highest noise level")
    distance: Literal["pseudo-huber", "l2"] = Field("pseudo-huber", description="sim: the distance d")
    huber_c: float | None = Field(None, gt=0, description="sim: pseudo-Huber c (None: 0.00054 sqrt(D))")
    sim_alpha: float = Field(1.0, description="sim: SiD's alpha ((1 - alpha) ||u||^2 added; 1: SIM alone)")
    fake_lora: LoraSettings | None = Field(None, description="LoRA fake score (vsd: on by default)")
    generator: GroupSettings = Field(default_factory=GroupSettings, description="generator optimizer settings "
                                                                                "(every/offset come from ratio)")
    fake_score: GroupSettings = Field(default_factory=GroupSettings, description="fake score optimizer settings")
    discriminator: DiscriminatorSettings = Field(default_factory=DiscriminatorSettings)
    batch_size: int = Field(256, ge=1, description="global batch size (over all processes)")
    seed: int = Field(0, ge=0, description="seeds every draw of the run")
    loop: LoopConfig = Field(default_factory=default_loop)
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> ScoreDistillRecipe:
        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min {self.t_min} must be below t_max {self.t_max}")
        if self.gan_weight > 0 and self.method != "dmd2":
            raise ValueError(f"gan_weight {self.gan_weight}: only dmd2 has a GAN term (method {self.method}); "
                             f"use 0")
        if self.method != "dmd" and (self.regression_weight or self.features):
            raise ValueError(f"regression_weight / features: only dmd has the regression loss (method "
                             f"{self.method})")
        if self.method == "dmd" and self.regression_weight is None:
            self.regression_weight = 0.25
        if self.ratio is None:
            self.ratio = 5 if self.method == "dmd2" else 1
        return self

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        return d


# ------------------------------------------------------------------------------------------------------- set-up


# ----------------------------------------------------------------------------------------------------------- run


def run_score_distill(recipe: ScoreDistillRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the generator of ``recipe``; returns the artifact directory."""
    from ..discriminator import FeatureDiscriminator, accuracy, discriminator_loss, generator_gan_loss
    from ..generator import generate, generator_times
    from ..objectives import DenoisingObjective, condition_of
    from ..score_distill import distribution_matching_loss, fake_score_loss, noised, regression_to_couplings, sim_loss
    from ..training import apply_lora

    gan = recipe.method == "dmd2" and recipe.gan_weight > 0
    checked: dict[str, Any] = {}

    def check(r: students.StudentRun) -> None:
        checked["cond"] = check_before_training(recipe, r, needs_real=gan,
                                                needs_pairs=recipe.method == "dmd" and bool(recipe.regression_weight))
        checked["times"] = generator_times(r.start.schedule, recipe.steps)

    run = open_run(KIND, recipe, output, force, check)
    art, path, device = run.art, run.path, run.device
    try:
        if run.complete:
            return path
        generator, real = run.start, run.reference
        cond_info, times = checked["cond"], checked["times"]
        if recipe.guidance is not None:
            real.guidance_scale = float(recipe.guidance)
        real.to(device)
        fake_net = copy.deepcopy(generator.network)
        lora = recipe.fake_lora if recipe.method != "vsd" else lora_targets(fake_net, recipe.fake_lora)
        if lora is not None:
            fake_net = apply_lora(fake_net, lora_targets(fake_net, lora))
        fake = students.student_of(real, fake_net)
        fake_part = nn.ModuleDict({"network": fake_net})
        objective = DenoisingObjective(real.schedule, real.prediction, real.call, real.time_input)
        draw = draw_fn(recipe, real, objective, times, cond_info)
        disc, held_out = None, None
        if gan:  # the heads' feature standardisation from 256 real rows of another seed, noised at drawn levels
            probe_rows = next(run.batches(256, recipe.seed + 7919, noise=draw, whole=True))  # the same on every process
            x_probe = students.clean_samples(probe_rows).float().to(device)
            probe = (noised(real.schedule, x_probe, probe_rows["t_d"].to(device), probe_rows["eps_d_real"].to(device)),
                     probe_rows["t_d"].to(device), None)
            disc = FeatureDiscriminator(fake, recipe.discriminator.layers, recipe.discriminator.width, probe=probe,
                                        seed=recipe.seed, depth=recipe.discriminator.depth)
            fake_part["heads"] = disc
            held_out = held_out_batch(recipe, run, draw)
        model = nn.ModuleDict({"generator": generator.network, "fake_score": fake_part})
        features = None
        if recipe.features:
            from ..features import feature_network

            features = feature_network(recipe.features, str(device))
        batches = (run.batches(recipe.batch_size, recipe.seed, noise=draw)
                   if run.couplings is not None or run.data is not None or run.conditions is not None else
                   students.NoiseBatches(recipe.batch_size, recipe.seed, run.rank, run.world, draw))
        multi = len(times) > 2

        def samples(b: dict[str, Tensor]) -> Tensor:
            return generate(generator, b["z"], times, condition_of(b), stop=b["k"] if multi else None)

        def fake_loss(m: nn.Module, b: dict[str, Tensor]):
            cond = condition_of(b)
            with torch.no_grad():
                x = samples(b)
            loss, logs = fake_score_loss(objective, fake_net, x, b["t_fake"], b["eps_fake"], cond_fields(b))
            logs = {**logs, "denoise": loss.detach()}
            if disc is not None:
                x_real = students.clean_samples(b)
                lr_ = disc(noised(real.schedule, x_real, b["t_d"], b["eps_d_real"]), b["t_d"], cond)
                lf = disc(noised(real.schedule, x, b["t_d"], b["eps_d"]), b["t_d"], cond)
                d_loss = discriminator_loss(lr_, lf)
                loss = loss + recipe.gan_weight_fake * d_loss
                logs.update({"d_loss": d_loss.detach(), "d_acc": torch.tensor(accuracy(lr_.detach(), lf.detach()))})
            return loss, logs

        def generator_loss(m: nn.Module, b: dict[str, Tensor]):
            cond = condition_of(b)
            x = samples(b)
            if recipe.method == "sim":
                loss, logs = sim_loss(x, b["t_dm"], b["eps_dm"], real, fake, cond, recipe.distance, recipe.huber_c,
                                      recipe.sim_alpha)
            else:
                loss, logs = distribution_matching_loss(x, b["t_dm"], b["eps_dm"], real, fake, cond)
            if recipe.method == "dmd" and recipe.regression_weight:
                x_reg = generate(generator, b["noise"], times, cond)
                reg = regression_to_couplings(x_reg, b["sample"], "pseudo-huber", features)
                loss = loss + recipe.regression_weight * reg
                logs["regression"] = reg.detach()
            if disc is not None:
                g_gan = generator_gan_loss(disc(noised(real.schedule, x, b["t_d"], b["eps_d"]), b["t_d"], cond))
                loss = loss + recipe.gan_weight * g_gan
                logs["g_gan"] = g_gan.detach()
            return loss, logs

        ratio = int(recipe.ratio or 1)
        groups = [
            ParamGroup("fake_score", fake_part, fake_loss, recipe.fake_score.model_copy(update={"every": 1,
                                                                                                "offset": 0})),
            ParamGroup("generator", model["generator"], generator_loss,
                       recipe.generator.model_copy(update={"every": ratio, "offset": ratio - 1, "ema": True})),
        ]

        def validate(tr: Trainer) -> dict[str, float]:  # dmd2's GAN heads on a batch they never train on
            assert disc is not None and held_out is not None
            cond = condition_of(held_out)
            with torch.no_grad():
                lr_ = disc(noised(real.schedule, held_out["real"], held_out["t_d"], held_out["eps_d_real"]),
                           held_out["t_d"], cond)
                lf = disc(noised(real.schedule, samples(held_out), held_out["t_d"], held_out["eps_d"]),
                          held_out["t_d"], cond)
            return {"disc_accuracy": accuracy(lr_, lf)}

        def finish(trainer: Trainer, logs: dict[str, float], seconds: float) -> None:
            extra = held_out_summary(trainer, logs, held_out) if held_out is not None else {}
            finish_generator(art, recipe, run, trainer, logs, seconds, "accelkit score-distill",
                             {"ratio": ratio, "gan_weight": recipe.gan_weight,
                              "regression_weight": recipe.regression_weight, "fake_lora": lora is not None,
                              "guidance": real.guidance_scale, **extra})

        students.fit_in_artifact(art, path, run.rank, model, None, batches, recipe.loop, device, finish,
                                 groups=groups, validate_fn=validate if gan else None)
        return path
    finally:
        run.close()


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, ScoreDistillRecipe)
    return run_score_distill(recipe, output, force)


register_stage(KIND, ScoreDistillRecipe, _run)

__all__ = ["ScoreDistillRecipe", "run_score_distill", "KIND"]
