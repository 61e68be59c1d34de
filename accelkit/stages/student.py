"""What every stage that trains a student on a teacher's couplings shares (``reflow``, ``distill``).

* the run: its device and processes, its artifact (opened on rank 0; a complete one is reused), the batch split
  check, the couplings opened with the keys a student reads, checked against the teacher's sample shape
  (:func:`begin_student_run`);
* the start: the teacher recorded in the couple artifact (checked against its content hash), loaded as a trainable
  fp32 :class:`accelkit.teacher.NetworkTeacher` (:func:`load_student_start`), with a frozen copy of it at the
  couplings' guidance scale as the reference;
* the end: the trained network (its first EMA, or the raw weights without one) wrapped as a teacher of the same
  prediction type, schedule and conditioning (:func:`averaged_network`, :func:`student_of`), written as the artifact's
  ``teacher.safetensors`` with ``history.json`` before the manifest is marked complete (:func:`save_student`), so
  ``accelkit sample`` / ``couple`` / ``eval`` and :func:`accelkit.models.loading.load_teacher` take the artifact.

Stages whose SOURCE is either a couple artifact or a teacher with ``--data`` (consistency, shortcut, QAC, ...) take
their recipe from :class:`SourceRecipe` and open the run with :func:`begin_source_run`: the student starts from the
couplings' teacher or from the teacher itself, and its clean samples x0 are the couplings' teacher samples, or the
data set when ``data`` is given (:meth:`StudentRun.batches`, :func:`clean_samples`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ..artifacts import Artifact, content_hash, open_on_rank0
from ..console import log
from ..errors import AccelkitError
from ..recipes import StageRecipe
from ..teacher import NetworkTeacher
from ..training import Trainer, init_distributed


@dataclass
class StudentRun:
    """One run of a student stage: where it runs, its artifact (``art`` on rank 0, None elsewhere) and, unless the
    artifact is already ``complete``, the student's start, the frozen reference and the opened couplings."""

    device: torch.device
    rank: int
    world: int
    couplings_artifact: Artifact | None
    art: Artifact | None
    path: Path
    complete: bool
    start: NetworkTeacher | None = None
    reference: NetworkTeacher | None = None
    couplings: Any = None  # accelkit.couplings.Couplings
    data: Tensor | None = None  # begin_source_run with data: the clean samples (the couplings' are not used)
    teacher_path: Path | None = None  # begin_source_run: the file or folder the student starts from
    conditions: Any = None  # the recipe's conditions file (Condition of R rows): data row / draw i takes row i mod R

    def close(self) -> None:
        if self.art is not None:
            self.art.close()

    def batches(self, batch_size: int, seed: int, noise=None, whole: bool = False):
        """Seeded, resumable batches of this rank's slice: the data set's rows (``x``) when the run has data, else
        the couplings' rows (``noise``, ``sample``, ``cond.*``); ``noise(generator, n)`` adds per-sample draws.
        :func:`clean_samples` gives a batch's x0 either way. ``whole``: every rank gets the whole global batch (a
        held-out or probe batch that all processes must see alike)."""
        from ..data import BatchSampler

        rank, world = (0, 1) if whole else (self.rank, self.world)
        if self.data is not None:
            return BatchSampler(self.data, batch_size, seed, rank, world, noise=noise, rows=self.condition_rows())
        if self.couplings is None:
            if self.conditions is not None:  # a teacher alone with conditions (begin_data_free_run)
                return NoiseBatches(batch_size, seed, rank, world, noise, rows=self.condition_rows())
            raise AccelkitError("this run has neither data nor couplings to draw batches from")
        return self.couplings.sampler(batch_size, seed, rank, world, noise=noise)


    def condition_rows(self) -> dict[str, Tensor]:
        """The conditions as batch tensors ``cond.<field>`` of R rows (empty without conditions)."""
        if self.conditions is None:
            return {}
        return {f"cond.{k}": v for k, v in self.conditions.tensors().items()}


def begin_student_run(stage: str, recipe: Any, output: Path | None, force: bool) -> StudentRun:
    """Open the run of ``recipe`` (a student stage's recipe: ``couplings``, ``device``, ``seed``, ``batch_size``,
    ``loop``): the caller trains unless ``complete``, and calls :meth:`StudentRun.close` when done."""
    from ..couplings import open_couplings
    from ..training import resolve_device

    device = resolve_device(recipe.device)
    rank, world = init_distributed(device)
    couplings_art = Artifact.read(recipe.couplings, "couple")
    art, path, state, _ = open_on_rank0(rank, output, stage, recipe, force=force, seeds={"seed": recipe.seed})
    run = StudentRun(device, rank, world, couplings_art, art, path, state == "complete")
    if run.complete:
        if rank == 0:
            log(f"{stage}: reusing the complete artifact {path}")
        return run
    try:
        if recipe.batch_size % (world * recipe.loop.grad_accum):
            raise AccelkitError(f"batch_size {recipe.batch_size} does not split over {world} processes x "
                                f"grad_accum {recipe.loop.grad_accum}")
        run.start, run.reference = load_student_start(couplings_art, stage)
        keys = open_couplings(recipe.couplings).keys
        run.couplings = open_couplings(recipe.couplings,
                                       keys=["noise", "sample", *[k for k in keys if k.startswith("cond.")]])
        if tuple(run.couplings.sample_shape) != tuple(run.start.sample_shape):
            raise AccelkitError(f"{recipe.couplings}: samples of shape {list(run.couplings.sample_shape)}, but the "
                                f"teacher's are {list(run.start.sample_shape)}")
    except BaseException:
        run.close()
        raise
    return run


def start_processes(recipe: Any) -> tuple[torch.device, int, int]:
    """(device, rank, world) of a training stage's run; its batch must split over the processes and
    ``loop.grad_accum``."""
    from ..training import resolve_device

    device = resolve_device(recipe.device)
    rank, world = init_distributed(device)
    if recipe.batch_size % (world * recipe.loop.grad_accum):
        raise AccelkitError(f"batch_size {recipe.batch_size} does not split over {world} processes x "
                            f"grad_accum {recipe.loop.grad_accum}")
    return device, rank, world


def open_run(stage: str, recipe: Any, output: Path | None, force: bool, run: StudentRun,
             check: Callable[[StudentRun], None] | None = None) -> StudentRun:
    """``check(run)`` (the method's own refusals), then the run's artifact (opened on rank 0; a complete one is
    reused): nothing is written when an input is refused."""
    if check is not None:
        check(run)
    run.art, run.path, state, _ = open_on_rank0(run.rank, output, stage, recipe, force=force,
                                                seeds={"seed": recipe.seed})
    run.complete = state == "complete"
    if run.complete and run.rank == 0:
        log(f"{stage}: reusing the complete artifact {run.path}")
    return run


class SourceRecipe(StageRecipe):
    """Base of the recipes of stages whose SOURCE is a couple artifact or a teacher with data (see
    :func:`begin_source_run`); subclasses add ``seed``, ``batch_size``, ``loop`` and ``device``."""

    input_fields = ("source", "data", "conditions")

    source: str = Field(description="a complete couple artifact (its teacher is the student's start and its samples "
                                    "the data), or a teacher (file, folder or artifact) together with data")
    data: str | None = Field(None, description="clean samples x0: one of the built-in sets or a .safetensors/.npy "
                                               "file (needed with a teacher as source; overrides couplings' samples)")
    data_size: int = Field(100_000, ge=16, description="points drawn for a 2-D toy set given as data")
    conditions: str | None = Field(None, description="conditions file (.safetensors, as couple's; what --prompt / "
                                                     "--prompts encode) for a teacher with data or alone: data row "
                                                     "or draw i takes row i mod R; null.<field> is guidance's null")

    @property
    def data_is_file(self) -> bool:
        from ..data import DATA_NAMES

        return self.data is not None and self.data not in DATA_NAMES

    def inputs(self) -> dict[str, str]:
        return {"source": self.source, **({"data": self.data} if self.data_is_file else {}),
                **({"conditions": self.conditions} if self.conditions is not None else {})}

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        if self.data is not None and not self.data_is_file:
            d["data"] = self.data  # a named set is part of the recipe, a file enters through its content hash
        else:
            d.pop("data_size", None)
        return d


def is_couplings(path: str | Path) -> bool:
    """True when ``path`` is an artifact directory of kind ``couple``."""
    import json

    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("kind") == "couple"
    except (OSError, ValueError):
        return False


def load_teacher_start(path: str | Path, stage: str) -> tuple[NetworkTeacher, NetworkTeacher]:
    """(student, reference) from a teacher path: a trainable fp32 copy at guidance scale 1, and a frozen one."""
    from ..models.loading import load_teacher

    teacher = load_teacher(path, dtype="fp32")
    if not isinstance(teacher, NetworkTeacher):
        raise AccelkitError(f"{path}: a {type(teacher).__name__} teacher (e.g. a rescale artifact) has no network of "
                            f"its own schedule to start a {stage} student from; give the network teacher")
    reference = copy.deepcopy(teacher).eval().requires_grad_(False)
    teacher.network.requires_grad_(True).train()
    teacher.guidance_scale = 1.0
    return teacher, reference


def begin_source_run(stage: str, recipe: SourceRecipe, output: Path | None, force: bool,
                     prepare: Any = None, check: Callable[[StudentRun], None] | None = None) -> StudentRun:
    """Open the run of a :class:`SourceRecipe` (with ``seed``, ``batch_size``, ``loop``, ``device``): SOURCE is a
    couple artifact (the student starts from its teacher; x0 are its samples unless ``data`` is given) or a teacher
    with ``data``. The caller trains unless ``complete``, draws batches with :meth:`StudentRun.batches` and calls
    :meth:`StudentRun.close` when done. ``prepare(start)`` (optional) changes or checks the student's start before
    the artifact is opened (e.g. adds extra inputs; an error there writes nothing); ``check(run)`` (optional) sees
    the loaded start, reference and data before the artifact is opened, and raises :class:`AccelkitError` for what
    the method cannot take (nothing is written then)."""
    from ..couplings import open_couplings
    from ..data import load_dataset

    source = Path(recipe.source)
    couplings_source = is_couplings(source)
    if not couplings_source and recipe.data is None:
        raise AccelkitError(f"{recipe.source}: SOURCE is not a couple artifact, so it is taken as a teacher, and a "
                            f"teacher needs --data (a built-in data set or a .safetensors/.npy file of samples)")
    device, rank, world = start_processes(recipe)
    # Everything that can be wrong with the inputs is found before the artifact is opened: nothing is written then.
    couplings_art = Artifact.read(source, "couple") if couplings_source else None
    if couplings_art is not None:
        teacher_path = couplings_teacher_path(couplings_art, stage)
        start, reference = load_student_start(couplings_art, stage)
    else:
        teacher_path = source
        start, reference = load_teacher_start(source, stage)
    data = couplings = None
    if recipe.data is not None:
        if Path(recipe.data).is_dir():  # images at the teacher's resolution, or latents of its VAE (cached)
            from ..image_folder import training_images

            ds = training_images(recipe.data, start, allow_pickle=getattr(recipe, "allow_pickle", False))
        else:
            ds = load_dataset(recipe.data, recipe.data_size, recipe.seed)
        if tuple(ds.sample_shape) != tuple(start.sample_shape):
            raise AccelkitError(f"data {recipe.data!r}: samples of shape {list(ds.sample_shape)}, but the "
                                f"teacher's are {list(start.sample_shape)}")
        data = ds.samples
    else:
        keys = open_couplings(source).keys
        couplings = open_couplings(source, keys=["noise", "sample", *[k for k in keys if k.startswith("cond.")]])
        if tuple(couplings.sample_shape) != tuple(start.sample_shape):
            raise AccelkitError(f"{recipe.source}: samples of shape {list(couplings.sample_shape)}, but the "
                                f"teacher's are {list(start.sample_shape)}")
    if prepare is not None:
        prepare(start)
    run = StudentRun(device, rank, world, couplings_art, None, Path(output or "."), False, start, reference,
                     couplings, data, teacher_path)
    run.conditions = recipe_conditions(recipe, run)
    return open_run(stage, recipe, output, force, run, check)


def recipe_conditions(recipe: SourceRecipe, run: StudentRun):
    """The recipe's conditions file (None without one), checked against the run: a couple artifact carries its own
    conditions; the teacher must be conditional. Its ``null.<field>`` tensors become the start's and the reference's
    null condition (the negative prompt of --prompt)."""
    from ..condition_files import load_conditions, load_null_condition

    if recipe.conditions is None:
        return None
    if run.couplings is not None:
        raise AccelkitError(f"conditions {recipe.conditions}: SOURCE {recipe.source} is a couple artifact, which "
                            "carries the conditions it was made with; give --prompt / --conditions to couple instead")
    kind = run.start.info.get("conditioning", {}).get("kind", "none")
    if kind == "none":
        raise AccelkitError(f"conditions {recipe.conditions}: the teacher {recipe.source} is unconditional")
    conditions = load_conditions(recipe.conditions)
    null = load_null_condition(recipe.conditions)
    if null is not None:
        run.start.null_condition = null
        run.reference.null_condition = null
    return conditions


class NoiseBatches:
    """Seeded, resumable batches of per-sample draws only, for methods that need no data (score distillation from
    a teacher alone): global batch b is ``noise(generator, batch_size)`` with the generator seeded with (seed, 2, b),
    as :class:`accelkit.data.BatchSampler` draws its noise, and rank r keeps the r-th of ``world`` equal slices.
    State: the number of batches drawn."""

    def __init__(self, batch_size: int, seed: int, rank: int, world: int, noise,
                 rows: dict[str, Tensor] | None = None):
        if batch_size % world:
            raise AccelkitError(f"batch size {batch_size} does not split over {world} processes")
        self.batch_size, self.seed, self.rank, self.world, self.noise = batch_size, seed, rank, world, noise
        self.rows = dict(rows or {})  # per-draw tensors of R rows: draw i (over all batches) takes row i mod R
        self.batches = 0

    def __iter__(self) -> NoiseBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        from ..data import seeded_generator

        per = self.batch_size // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        draws = self.noise(seeded_generator(self.seed, 2, self.batches), self.batch_size)
        index = torch.arange(self.batches * self.batch_size + lo, self.batches * self.batch_size + hi)
        self.batches += 1
        return {**{k: v[lo:hi] for k, v in draws.items()}, **{k: v[index % len(v)] for k, v in self.rows.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batches = int(state["batches"])


def begin_data_free_run(stage: str, recipe: SourceRecipe, output: Path | None, force: bool,
                        check: Callable[[StudentRun], None] | None = None) -> StudentRun:
    """Open the run of a :class:`SourceRecipe` whose SOURCE is a teacher and which has no data: for methods that
    need only noise (and conditions); the student starts from the teacher, the reference is its frozen copy. Batches
    come from :class:`NoiseBatches`. Callers route couple artifacts and runs with data to :func:`begin_source_run`.
    ``check(run)`` as there: it runs before the artifact is opened."""
    device, rank, world = start_processes(recipe)
    start, reference = load_teacher_start(recipe.source, stage)
    run = StudentRun(device, rank, world, None, None, Path(output or "."), False, start, reference, None, None,
                     Path(recipe.source))
    run.conditions = recipe_conditions(recipe, run)
    return open_run(stage, recipe, output, force, run, check)


def clean_samples(batch: Mapping[str, Tensor]) -> Tensor:
    """A batch's clean samples x0: the couplings' ``sample`` or the data set's ``x``."""
    return batch["sample"] if "sample" in batch else batch["x"]


def couplings_teacher_path(couplings: Artifact, stage: str) -> Path:
    """The teacher a couple artifact was made from, checked against the content hash recorded there."""
    entry = couplings.manifest.get("inputs", {}).get("teacher")
    if not entry or "path" not in entry:
        raise AccelkitError(f"{couplings.path}: the couple manifest records no teacher input")
    path = Path(entry["path"])
    if not path.exists():
        raise AccelkitError(f"{couplings.path}: its teacher {str(path)!r} no longer exists; {stage} starts the "
                            "student from the teacher's weights")
    if entry.get("sha256") and content_hash(path) != entry["sha256"]:
        raise AccelkitError(f"{couplings.path}: its teacher {str(path)!r} changed since the couplings were made "
                            "(content hash differs); run couple again")
    return path


def load_student_start(couplings: Artifact, stage: str) -> tuple[NetworkTeacher, NetworkTeacher]:
    """(student, reference): the couplings' teacher as a trainable :class:`NetworkTeacher` in fp32 on the CPU, at
    guidance scale 1 (the student learns the couplings' possibly guided map in one pass), and a frozen copy at the
    guidance scale the couplings were made with."""
    teacher, reference = load_teacher_start(couplings_teacher_path(couplings, stage), stage)
    guidance = couplings.recipe.get("guidance")
    if guidance is not None:
        reference.guidance_scale = float(guidance)
    return teacher, reference


def averaged_network(trainer: Trainer) -> tuple[nn.Module, str]:
    """A frozen copy of the trained network with its first EMA's weights (raw weights without EMA), and a label.
    LoRA adapters (``loop.lora``) are merged into the base weights: the student has the teacher's architecture."""
    from ..training import merge_lora

    rate = trainer.ema.rates[0] if trainer.ema.rates else None
    network = copy.deepcopy(trainer.model)
    network.load_state_dict(trainer.ema_weights(rate))
    label = f"ema {rate}" if rate is not None else "raw"
    if trainer.config.lora is not None:
        network = merge_lora(network)
        label += f", LoRA rank {trainer.config.lora.rank} merged"
    return network.eval().requires_grad_(False), label


def student_of(reference: NetworkTeacher, network: nn.Module, info: Mapping[str, Any] | None = None
               ) -> NetworkTeacher:
    """``network`` as a teacher of ``reference``'s kind (call, prediction type, schedule, time input, null
    condition) at guidance scale 1. A student of a QAC model (``accelkit qac``) keeps its code book (``info.qac``):
    its network keeps the code input, and its codes are drawn from the same weights."""
    info = dict(info or {})
    if "qac" in reference.info and "qac" not in info:
        info["qac"] = reference.info["qac"]
    return NetworkTeacher(network, reference.call, reference.prediction, reference.schedule, reference.sample_shape,
                          reference.time_input, 1.0, reference.null_condition, info)


def fit_in_artifact(art: Artifact | None, path: Path, rank: int, model: nn.Module, loss_fn: Any, data: Any,
                    loop: Any, device: torch.device, finish: Callable[[Trainer, dict[str, float], float], None],
                    before_fit: Callable[[Trainer], None] | None = None, **trainer_options: Any) -> Trainer:
    """The one way a stage trains inside its artifact: the manifest's progress follows the steps (step, steps,
    loss), the one :class:`Trainer` resumes from ``path / "checkpoint"`` and fits, and then rank 0 calls
    ``finish(trainer, logs, seconds)`` (which writes the result and marks the artifact complete) and removes the
    checkpoint; every rank waits for the others before and after. ``before_fit(trainer)`` (optional) sees the
    trainer before it fits (e.g. to hand its EMA to a loss); ``trainer_options`` go to the Trainer (``groups``,
    ``validate_fn``, ...)."""
    import shutil
    import time

    from ..jobs import barrier

    def on_log(step: int, values: dict[str, float]) -> None:
        if art is not None:
            art.progress = {"step": step, "steps": loop.steps, "loss": values.get("loss")}

    trainer = Trainer(model, loss_fn, data, loop, checkpoint_dir=path / "checkpoint", device=device, on_log=on_log,
                      **trainer_options)
    if before_fit is not None:
        before_fit(trainer)
    if art is not None:
        art.progress = {"step": 0, "steps": loop.steps}
    start = time.perf_counter()
    logs = trainer.fit()
    seconds = time.perf_counter() - start
    barrier()
    if rank == 0:
        finish(trainer, logs, seconds)
        shutil.rmtree(path / "checkpoint", ignore_errors=True)
    barrier()
    return trainer


def save_student(art: Artifact, student: NetworkTeacher, history: Any, summary: Mapping[str, Any]) -> None:
    """Write ``student`` as the artifact's teacher.safetensors and ``history`` as history.json; mark it complete."""
    from ..models.loading import ARTIFACT_TEACHER_FILE, save_teacher

    student.network.cpu()
    art.write_with(ARTIFACT_TEACHER_FILE, lambda tmp: save_teacher(student, tmp))
    art.write_json("history.json", history)
    art.complete(summary)


class EmaTarget:
    """A frozen copy of a trainer's network holding its EMA weights at ``rate`` (default: the trainer's first rate;
    the raw weights when it keeps none), refreshed whenever the trainer has taken a step since: the target network of
    a consistency loss (CD / LCM's EMA target, a shortcut model's self-consistency target). Its weights are the
    Trainer's own average, so checkpoints and exact resume carry them."""

    def __init__(self, trainer: Trainer, rate: float | None = None):
        self.trainer, self.rate = trainer, rate
        self.copy = copy.deepcopy(trainer.model).requires_grad_(False)
        self.step = -1

    def __call__(self) -> nn.Module:
        tr = self.trainer
        if self.step != tr.step:
            rate = self.rate if self.rate is not None else (tr.ema.rates[0] if tr.ema.rates else None)
            with torch.no_grad():
                params = dict(self.copy.named_parameters())
                if rate is not None:
                    for name, value in zip(tr.ema.names, tr.ema.shadow[float(rate)], strict=True):
                        params[name].copy_(value)
                else:
                    for name, p in tr.model.named_parameters():
                        params[name].copy_(p)
            self.copy.train(tr.model.training)
            self.step = tr.step
        return self.copy


__all__ = ["EmaTarget", "StudentRun", "begin_student_run", "SourceRecipe", "begin_source_run", "clean_samples",
           "is_couplings",
           "load_teacher_start", "couplings_teacher_path", "load_student_start", "averaged_network",
           "student_of", "save_student", "NoiseBatches", "begin_data_free_run", "fit_in_artifact", "recipe_conditions"]
