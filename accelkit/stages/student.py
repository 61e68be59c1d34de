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
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import Artifact, content_hash, open_on_rank0
from ..console import log
from ..errors import AccelkitError
from ..teacher import NetworkTeacher
from ..training import Trainer, init_distributed


@dataclass
class StudentRun:
    """One run of a student stage: where it runs, its artifact (``art`` on rank 0, None elsewhere) and, unless the
    artifact is already ``complete``, the student's start, the frozen reference and the opened couplings."""

    device: torch.device
    rank: int
    world: int
    couplings_artifact: Artifact
    art: Artifact | None
    path: Path
    complete: bool
    start: NetworkTeacher | None = None
    reference: NetworkTeacher | None = None
    couplings: Any = None  # accelkit.couplings.Couplings

    def close(self) -> None:
        if self.art is not None:
            self.art.close()


def begin_student_run(stage: str, recipe: Any, output: Path | None, force: bool) -> StudentRun:
    """Open the run of ``recipe`` (a student stage's recipe: ``couplings``, ``device``, ``seed``, ``batch_size``,
    ``loop``): the caller trains unless ``complete``, and calls :meth:`StudentRun.close` when done."""
    from ..couplings import open_couplings
    from .train import resolve_device

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
    from ..models.loading import load_teacher

    path = couplings_teacher_path(couplings, stage)
    teacher = load_teacher(path, dtype="fp32")
    if not isinstance(teacher, NetworkTeacher):
        raise AccelkitError(f"{path}: a {type(teacher).__name__} teacher (e.g. a rescale artifact) has no network of "
                            "its own schedule to start a student from; couple from the network teacher instead")
    reference = copy.deepcopy(teacher).eval().requires_grad_(False)
    guidance = couplings.recipe.get("guidance")
    if guidance is not None:
        reference.guidance_scale = float(guidance)
    teacher.network.requires_grad_(True).train()
    teacher.guidance_scale = 1.0
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
    condition) at guidance scale 1."""
    return NetworkTeacher(network, reference.call, reference.prediction, reference.schedule, reference.sample_shape,
                          reference.time_input, 1.0, reference.null_condition, dict(info or {}))


def save_student(art: Artifact, student: NetworkTeacher, history: Any, summary: Mapping[str, Any]) -> None:
    """Write ``student`` as the artifact's teacher.safetensors and ``history`` as history.json; mark it complete."""
    from ..models.loading import ARTIFACT_TEACHER_FILE, save_teacher

    student.network.cpu()
    art.write_with(ARTIFACT_TEACHER_FILE, lambda tmp: save_teacher(student, tmp))
    art.write_json("history.json", history)
    art.complete(summary)


__all__ = ["StudentRun", "begin_student_run", "couplings_teacher_path", "load_student_start", "averaged_network",
           "student_of", "save_student"]
