"""qac: a teacher turned into a QAC model, its network conditioned on a learned quantized code of the data.

Liang, Chen et al. 2024, "Learning Quantized Adaptive Conditions for Diffusion Models" (arXiv 2409.17487; the method
and its equations are in :mod:`accelkit.qac`). The stage

1. starts from the teacher (SOURCE: a teacher with ``data``, or a couple artifact whose teacher samples serve as the
   data, :func:`accelkit.stages.student.begin_source_run`), gives its network the ``code`` extra input (D values,
   through the shared zero-initialised embedding on its time embedding, :mod:`accelkit.extra_inputs`: at step 0
   the model equals the teacher for every code) and builds the encoder (an MLP for vectors, a conv net for
   images, about ``encoder_share`` of the teacher's parameters unless ``encoder_width`` is given; its output layer
   initialised on the data so that every code channel starts balanced, :func:`accelkit.qac.center_encoder`;
   ``quantizer`` picks FSQ's bounded straight-through estimator with unit-scale outputs or Algorithm 1's printed
   one, :func:`accelkit.qac.fsq`, :func:`accelkit.qac.resolve_quantizer`);
2. trains encoder and denoiser jointly on the teacher's own objective and schedule
   (:class:`accelkit.objectives.DenoisingObjective`: eps, x0, v or flow; fresh noise and times per batch) with
   :class:`accelkit.training.Trainer` (EMA, checkpoints, exact resume after ``kill -9``, DDP, LoRA on the
   denoiser with ``loop.lora``: the adapters, the code embedding and the encoder train), collecting the code
   sampling weights online, as the EMA of the batch code frequencies with the model EMA's own decay of each step
   (Algorithm 1 steps 12-13; part of the checkpoint);
3. writes ``teacher.safetensors``: the EMA denoiser with its code embedding, and the code book (the used code indices
   and their weights, ``info.qac``) in its header, so it loads as a teacher like any other; ``sample``, ``couple``
   and ``eval`` draw sample i's code from the weights with a generator of (seed, i) (or take ``--code``) and solve
   with any solver. ``encoder.safetensors`` holds the EMA encoder (for encoding data, not needed to sample).
   ``collection: offline`` stores the paper's alternative instead: the EMA encoder's code frequencies over the
   data; the summary gives both, their total-variation distance and perplexities, the extra parameters' share,
   and the curvature and straightness of teacher and QAC model on ``eval_samples`` noises.

``bits`` 0 is the control of the paper's comparison: the same teacher fine-tuned on the same objective, steps and
batches, without codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..artifacts import Artifact
from ..console import log
from ..data import seeded_generator, stream_seed
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage
from ..training import LoopConfig, Trainer
from . import student as students

KIND = "qac"
LOOP_EXECUTION_FIELDS = ("checkpoint_every", "checkpoint_interval_s", "keep_checkpoints", "log_every",
                         "validate_every")
ENCODER_FILE = "encoder.safetensors"
#: The first this many clean samples set the encoder's initial output bias (accelkit.qac.center_encoder).
CENTER_SAMPLES = 2048


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=5e-4, warmup_steps=50, ema_rates=[0.999], checkpoint_every=500)


class QACRecipe(students.SourceRecipe):
    """qac: a teacher conditioned on learned quantized codes of its data (quantized adaptive conditions)."""

    execution_fields = frozenset({"device", "eval_samples"})

    bits: int = Field(8, ge=0, description="D: code channels (codebook L^D); 0: no codes (the control: the teacher "
                                           "fine-tuned the same way)")
    levels: int = Field(2, description="L: quantization levels per channel (2: binary codes, the paper's choice)")
    encoder_width: int | None = Field(None, ge=1, description="encoder width (None: the widest at most "
                                                               "encoder_share of the teacher's parameters)")
    encoder_share: float = Field(0.01, gt=0, le=1, description="encoder size as a share of the teacher's parameters "
                                                               "(when encoder_width is not given)")
    quantizer: Literal["auto", "fsq", "paper"] = Field(
        "auto", description="fsq: FSQ's straight-through rounding of L sigmoid(y) (dy_q/dy = L sigmoid'(y)) on "
                            "encoder outputs initialised at unit scale; paper: Algorithm 1 as printed (dy_q/dy = I, "
                            "outputs only centred); auto: fsq for images, paper for vectors")
    collection: Literal["online", "offline"] = Field(
        "online", description="code sampling weights: online (EMA of batch code counts synchronised with the model "
                              "EMA) or offline (the EMA encoder's code counts over the data after training)")
    batch_size: int = Field(256, ge=1, description="global batch size (over all processes)")
    seed: int = Field(0, ge=0, description="seeds the encoder's initial weights, the data order, times and noise")
    loop: LoopConfig = Field(default_factory=default_loop)
    eval_samples: int = Field(1000, ge=0, description="noises for the final curvature check (0: skip)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> QACRecipe:
        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        if self.levels < 2:
            raise ValueError(f"levels {self.levels}: expected at least 2 quantization levels per channel (2: binary "
                             "codes)")
        if self.bits > 0:
            from ..qac import codebook_size

            try:
                codebook_size(self.levels, self.bits)
            except AccelkitError as e:
                raise ValueError(str(e).replace("--bits", "bits").replace("--levels", "levels")) from None
            if self.collection == "online" and not self.loop.ema_rates:
                raise ValueError("collection online keeps the code weights in step with the model EMA: give "
                                 "loop.ema_rates (or use collection offline)")
        return self

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        if self.bits == 0:  # the control has no encoder and no code book
            for k in ("levels", "encoder_width", "encoder_share", "collection", "quantizer"):
                d.pop(k, None)
        return d


# ----------------------------------------------------------------------------------------------------------- run


def add_code_input(recipe: QACRecipe):
    """The ``prepare`` of :func:`accelkit.stages.student.begin_source_run`: gives the start's network the ``code``
    input (refused, before anything is written, for an architecture without a known time embedding)."""
    from ..extra_inputs import ExtraInput, attach_extra_inputs, extra_inputs_of
    from ..qac import CODE_INPUT

    def prepare(start) -> None:
        if recipe.bits == 0:
            return
        if extra_inputs_of(start.network):
            names = [s.name for s in extra_inputs_of(start.network)]
            raise AccelkitError(f"{recipe.source}: the teacher already has extra inputs {names}; qac starts from a "
                                "plain teacher")
        if start.info.get("qac"):
            raise AccelkitError(f"{recipe.source}: already a QAC model")
        torch.manual_seed(stream_seed(recipe.seed, 0x0AC))  # the embedding's first layer and then the encoder
        attach_extra_inputs(start, [ExtraInput(CODE_INPUT, "vector", dim=recipe.bits)])

    return prepare


def run_qac(recipe: QACRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the QAC model of ``recipe``; returns the artifact directory."""
    from ..objectives import DenoisingObjective
    from ..qac import (
        QUANTIZERS,
        QACModel,
        build_encoder,
        center_encoder,
        encoder_width_for_share,
        parameter_count,
        resolve_quantizer,
    )

    run = students.begin_source_run(KIND, recipe, output, force, prepare=add_code_input(recipe))
    art, path, device, rank, world = run.art, run.path, run.device, run.rank, run.world
    try:
        if run.complete:
            return path
        teacher = run.start
        assert teacher is not None and run.reference is not None
        teacher_params = parameter_count(run.reference.network)
        objective = DenoisingObjective(teacher.schedule, teacher.prediction, teacher.call, teacher.time_input)
        encoder, straight_through = None, "bounded"
        if recipe.bits > 0:
            width = recipe.encoder_width or encoder_width_for_share(teacher.sample_shape, recipe.bits, teacher_params,
                                                                    recipe.encoder_share)
            torch.manual_seed(stream_seed(recipe.seed, 0x0AC, 1))
            encoder = build_encoder(teacher.sample_shape, recipe.bits, width)
            straight_through, scale = QUANTIZERS[resolve_quantizer(recipe.quantizer, teacher.sample_shape)]
            center_encoder(encoder, clean_data(run)[:CENTER_SAMPLES], scale)  # every code channel starts balanced
        model = QACModel(teacher.network, encoder, objective, recipe.levels, recipe.bits, straight_through)
        batches = run.batches(recipe.batch_size, recipe.seed, noise=objective.noise_fn(teacher.sample_shape))
        training: list[Trainer] = []  # the trainer, once built: its EMA decay paces the code weights
        pending: list[torch.Tensor] = []

        def loss_fn(module: torch.nn.Module, batch: dict[str, torch.Tensor]):
            loss, logs = module(batch)
            if model.code_weights is not None:  # steps 12-13 once per optimizer step, on the global batch's codes
                assert training and model.last_codes is not None
                trainer = training[0]
                pending.append(model.last_codes)
                if len(pending) == recipe.loop.grad_accum:
                    codes = gather_codes(torch.cat(pending), world)
                    pending.clear()
                    rate = trainer.ema.rates[0] if trainer.ema.rates else 0.0
                    model.collect(codes, trainer.ema.decay(rate, trainer.ema.updates + 1))
            return loss, logs

        students.fit_in_artifact(art, path, rank, model, loss_fn, batches, recipe.loop, device,
                                 lambda trainer, logs, seconds: finish(art, recipe, run, trainer, teacher_params, logs,
                                                                       seconds, world, device),
                                 before_fit=training.append)
        return path
    finally:
        run.close()


def gather_codes(codes: torch.Tensor, world: int) -> torch.Tensor:
    """The code indices of the global batch: every rank's (equal-sized) slice, in rank order."""
    if world == 1:
        return codes
    parts = [torch.empty_like(codes) for _ in range(world)]
    torch.distributed.all_gather(parts, codes.contiguous())
    return torch.cat(parts)


def clean_data(run: students.StudentRun) -> torch.Tensor:
    """All clean samples of the run (the data set, or the couplings' teacher samples), on the CPU."""
    if run.data is not None:
        return run.data
    return run.couplings[0:len(run.couplings)]["sample"]


def finish(art: Artifact, recipe: QACRecipe, run: students.StudentRun, trainer: Trainer, teacher_params: int,
           logs: dict[str, float], seconds: float, world: int, device: torch.device) -> None:
    """Write the QAC model (EMA weights + code book) as teacher.safetensors, the EMA encoder, history; complete."""
    from ..artifacts import save_safetensors
    from ..evaluation import curvature, straightness
    from ..qac import INFO_KEY, collect_offline, parameter_count, resolve_quantizer, with_codes

    trained, weights_label = students.averaged_network(trainer)
    reference = run.reference
    info: dict[str, Any] = {"trained_by": "accelkit qac", "steps": trainer.step, "weights": weights_label,
                            "seed": recipe.seed, "source": str(recipe.source), "bits": recipe.bits}
    summary: dict[str, Any] = {"bits": recipe.bits, "steps": trainer.step, "final_loss": logs.get("loss"),
                               "weights": weights_label, "processes": world, "seconds_last_run": round(seconds, 3),
                               "prediction_type": reference.prediction, "schedule": reference.schedule.config(),
                               "sample_shape": list(reference.sample_shape), "teacher_parameters": teacher_params,
                               "data": recipe.data or "couplings"}
    encoder = trained.encoder
    if encoder is not None:
        data = clean_data(run)
        online = trained.code_weights
        offline = collect_offline(encoder, data, recipe.levels, recipe.bits, device=device)
        book = online if recipe.collection == "online" else offline
        info[INFO_KEY] = book.to_info()
        extra = parameter_count(encoder) + parameter_count(trained.denoiser) - teacher_params
        summary.update({
            "levels": recipe.levels, "codebook": recipe.levels**recipe.bits, "collection": recipe.collection,
            "quantizer": resolve_quantizer(recipe.quantizer, reference.sample_shape),
            "codes_used": {"online": len(online), "offline": len(offline)},
            "perplexity": {"online": online.perplexity(), "offline": offline.perplexity()},
            "online_offline_tv": total_variation(online, offline),
            "encoder": {**encoder.config, "parameters": parameter_count(encoder),
                        "share_of_teacher": parameter_count(encoder) / teacher_params},
            "extra_parameters": extra, "extra_share_of_teacher": extra / teacher_params,
        })
        log(f"qac: {len(book)} codes in use of {recipe.levels}^{recipe.bits} (perplexity online "
            f"{online.perplexity():.1f}, offline {offline.perplexity():.1f}); encoder "
            f"{100 * parameter_count(encoder) / teacher_params:.2f} % of the teacher's parameters")
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        art.write_with(ENCODER_FILE, lambda tmp: save_safetensors(
            tmp, state, {"format": "accelkit.qac-encoder/1", "config": json.dumps(encoder.config),
                         "levels": str(recipe.levels)}))
    model = students.student_of(reference, trained.denoiser, info)
    if recipe.eval_samples > 0 and run.conditions is None and not any(
            k.startswith("cond.") for k in (run.couplings.keys if run.couplings is not None else [])):
        n = recipe.eval_samples
        noise = torch.randn(n, *model.sample_shape, generator=seeded_generator(recipe.seed, 5)).to(device)
        cond = with_codes(model, None, recipe.seed, range(n))
        cond = cond.map(lambda v: v.to(device)) if cond is not None else None
        reference.to(device)
        model.to(device)
        summary["curvature"] = {"teacher": curvature(reference, noise), "qac": curvature(model, noise, cond=cond),
                                "samples": n, "nfe": 64, "unit": "radians"}
        summary["straightness"] = {"teacher": straightness(reference, noise),
                                   "qac": straightness(model, noise, cond=cond), "samples": n, "nfe": 64}
        k = summary["curvature"]
        log(f"qac: mean curvature {k['qac']:.4g} rad (teacher {k['teacher']:.4g})")
    art.progress = {"step": trainer.step, "steps": recipe.loop.steps}
    students.save_student(art, model, trainer.history, summary)


def total_variation(a, b) -> float:
    """0.5 sum_c |p_a(c) - p_b(c)| of two code books."""
    ca, pa = a.probabilities()
    cb, pb = b.probabilities()
    codes = torch.unique(torch.cat([ca, cb]))
    full_a = torch.zeros(len(codes), dtype=torch.float64)
    full_b = torch.zeros(len(codes), dtype=torch.float64)
    full_a[torch.searchsorted(codes, ca)] = pa
    full_b[torch.searchsorted(codes, cb)] = pb
    return 0.5 * float((full_a - full_b).abs().sum())


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, QACRecipe)
    return run_qac(recipe, output, force)


register_stage(KIND, QACRecipe, _run)

__all__ = ["QACRecipe", "run_qac", "KIND", "total_variation"]
