"""couple: (noise, sample) pairs from the teacher's probability-flow ODE, in sharded safetensors.

For sample i (0 <= i < n): eps_i = sample_noise(seed, i), x_1 = prior_std eps_i, and x_0 = solve(teacher, x_1) from
t = 1 to t = 0 with the chosen solver and NFE. These are the couplings that reflow / rectified-flow students are
trained on (Liu et al. 2022, "Flow straight and fast"): the teacher's ODE maps eps_i to x_0 deterministically.

Layout: shard k holds samples [k S, min((k + 1) S, n)) in ``shard-0000k.safetensors`` with tensors

* ``index`` (int64), ``noise`` (the standard normal eps_i), ``sample`` (x_0),
* ``cond.<field>`` for each conditioning field (sample i takes row i mod M of the ``conditions`` file),
* with ``save_trajectory`` K: ``trajectory`` (rows, K, *shape), the solver's states at K of the times where it
  evaluated the teacher, spread evenly through the run, and ``trajectory_times`` (K,).

Reproducibility: the teacher always runs on the same micro-batches, [j m, (j + 1) m) for a fixed ``micro_batch`` m,
so every sample sees exactly the same arithmetic whatever ``batch_size``, the number of processes, and whether the
job was interrupted. ``batch_size`` only sets how much work is done between progress updates and checkpoints.
Under torchrun, rank r makes shards k with k mod world = r and rank 0 writes the manifest; the files equal a
one-process run's. Inside a shard, finished rows are checkpointed to ``shard-0000k.partial.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from ..artifacts import Artifact, file_problem, open_on_rank0, save_safetensors
from ..condition_files import load_conditions, load_null_condition  # the conditions file (training stages read it too)
from ..console import log
from ..errors import AccelkitError
from ..jobs import Checkpointer, barrier, init_distributed, progress_bar
from ..recipes import StageRecipe, register_stage
from ..teacher import Condition, Teacher

KIND = "couple"
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


class CoupleRecipe(StageRecipe):
    """couple: (noise, sample) pairs from the teacher's ODE."""

    input_fields = ("teacher", "conditions")
    execution_fields = frozenset({"batch_size", "checkpoint_every", "device", "compile", "cuda_graphs"})

    teacher: str = Field(description="teacher checkpoint (file, folder or artifact)")
    n: int = Field(ge=1, description="number of pairs")
    solver: str = Field("dpm++2m", description="ODE solver (accelkit.solvers)")
    nfe: int = Field(32, ge=1, le=100_000, description="network evaluations per sample")
    grid: str | list[float] | None = Field(None, description="time grid name or times (None: the schedule's default)")
    guidance: float | None = Field(None, description="classifier-free guidance scale (None: the teacher's own)")
    conditions: str | None = Field(None, description="conditioning file: sample i takes row i mod M")
    save_trajectory: int = Field(0, ge=0, description="also store the states at this many intermediate times")
    seed: int = Field(0, ge=0)
    shard_size: int = Field(4096, ge=1, description="samples per shard file (a multiple of micro_batch)")
    micro_batch: int = Field(64, ge=1, description="samples per teacher call; fixes the arithmetic of each sample")
    dtype: Literal["fp32", "fp64", "bf16", "fp16"] = "fp32"
    batch_size: int = Field(256, ge=1, description="samples per step between progress updates and checkpoints")
    checkpoint_every: float = Field(60.0, ge=0, description="seconds between checkpoints (0: every step)")
    device: str = "cpu"
    compile: bool = Field(False, description="compile the teacher's network with torch.compile (accelkit.acceleration)")
    cuda_graphs: bool = Field(False, description="replay each network call from a CUDA graph (CUDA, fixed-grid "
                                                 "solvers; accelkit.acceleration)")

    @field_validator("solver")
    @classmethod
    def _known_solver(cls, v: str) -> str:
        from ..solvers import solver_names
        from ..solvers.parallel import is_parallel_spec, parse_parallel

        if is_parallel_spec(v):
            try:
                parse_parallel(v)
            except AccelkitError as e:
                raise ValueError(str(e)) from None
            return v
        if v not in solver_names():
            raise ValueError(f"expected one of {', '.join(solver_names())}, or picard:BASE / parareal:BASE")
        return v

    @field_validator("grid")
    @classmethod
    def _known_grid(cls, v: str | list[float] | None) -> str | list[float] | None:
        from ..solvers import GRID_NAMES

        if isinstance(v, str) and v not in GRID_NAMES:
            raise ValueError(f"expected one of {', '.join(GRID_NAMES)} or a list of times")
        if isinstance(v, list) and (len(v) < 2 or any(b >= a for a, b in zip(v, v[1:], strict=False))
                                    or v[0] > 1 or v[-1] < 0):
            raise ValueError("expected a strictly decreasing list of at least two times in [0, 1]")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not (v == "cpu" or v == "cuda" or v.startswith("cuda:") or v == "mps"):
            raise ValueError("expected cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CoupleRecipe:
        if self.shard_size % self.micro_batch:
            raise ValueError(f"shard_size {self.shard_size} must be a multiple of micro_batch {self.micro_batch}")
        if isinstance(self.grid, list):
            from ..solvers import get_solver

            steps = get_solver(self.solver).steps(self.nfe)
            if len(self.grid) - 1 != steps:
                raise ValueError(f"grid has {len(self.grid) - 1} steps but {self.solver} at nfe {self.nfe} takes "
                                 f"{steps}")
        if self.save_trajectory and ":" in self.solver:
            raise ValueError(f"save_trajectory: the parallel solver {self.solver} evaluates many times at once; "
                             "store trajectories with a sequential solver")
        if self.save_trajectory >= self.nfe:
            raise ValueError(f"save_trajectory {self.save_trajectory} must be below nfe {self.nfe} "
                             f"(the intermediate states are taken where the teacher is evaluated)")
        if self.guidance is not None and self.guidance != 1.0 and self.conditions is None:
            raise ValueError("guidance needs conditions (a conditions file)")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError(f"cuda_graphs: needs a CUDA device, not {self.device}")
        if self.cuda_graphs and ":" in self.solver:
            raise ValueError(f"cuda_graphs: the parallel solver {self.solver} changes its batch every round; use a "
                             "fixed-grid solver")
        return self


# ------------------------------------------------------------------------------------------------------ conditioning

def conditions_for(cond: Condition | None, indices: Tensor) -> Condition | None:
    if cond is None:
        return None
    return cond.index(indices % cond.batch_size())


# ------------------------------------------------------------------------------------------------------- trajectory


class RecordingTeacher(Teacher):
    """Delegates every call to ``base`` and keeps the last state it was evaluated at for each time."""

    def __init__(self, base: Teacher):
        super().__init__()
        self.base = base
        self.schedule = base.schedule
        self.sample_shape = base.sample_shape
        self.states: dict[float, Tensor] = {}

    def _record(self, x: Tensor, t: Tensor | float) -> None:
        tt = float(torch.as_tensor(t).reshape(-1)[0])
        self.states[tt] = x.detach().clone()

    def denoise(self, x, t, cond=None):
        self._record(x, t)
        return self.base.denoise(x, t, cond)

    def velocity(self, x, t, cond=None):
        self._record(x, t)
        return self.base.velocity(x, t, cond)

    def predict_x0(self, x, t, cond=None):
        self._record(x, t)
        return self.base.predict_x0(x, t, cond)

    def predict_eps(self, x, t, cond=None):
        self._record(x, t)
        return self.base.predict_eps(x, t, cond)

    def prior_sample(self, noise):
        return self.base.prior_sample(noise)

    def pick(self, k: int) -> tuple[list[float], list[Tensor]]:
        """K states at evaluation times strictly between the start and the end, evenly spaced among them."""
        times = sorted(self.states, reverse=True)
        inner = [t for t in times[1:] if t > 0.0]
        if len(inner) < k:
            raise AccelkitError(f"save_trajectory {k}: the solver evaluated the teacher at only {len(inner)} "
                                f"intermediate times; raise nfe or lower save_trajectory")
        # Positions (j + 1) / (k + 1) of the way through the run, j = 0..k-1.
        chosen = [inner[round((j + 1) * (len(inner) + 1) / (k + 1)) - 1] for j in range(k)]
        return chosen, [self.states[t] for t in chosen]


# -------------------------------------------------------------------------------------------------------- generation


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def partial_name(k: int) -> str:
    return f"shard-{k:05d}.partial.safetensors"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


@torch.no_grad()
def generate(teacher: Teacher, recipe: CoupleRecipe, indices: range, cond: Condition | None) -> dict[str, Tensor]:
    """Couplings for consecutive sample indices forming whole micro-batches (see the module docstring)."""
    from ..noise import sample_noise
    from ..qac import with_codes
    from ..solvers import solve

    dtype, device = DTYPES[recipe.dtype], torch.device(recipe.device)
    store = torch.float64 if recipe.dtype == "fp64" else torch.float32
    noise = sample_noise(recipe.seed, indices, teacher.sample_shape)
    idx = torch.tensor(list(indices), dtype=torch.int64)
    c = conditions_for(cond, idx)
    c = with_codes(teacher, c, recipe.seed, idx)  # a QAC model: sample i's code from (seed, i), kept as cond.code
    c_dev = c.map(lambda v: v.to(device)) if c is not None else None
    model = RecordingTeacher(teacher) if recipe.save_trajectory else teacher
    # The solver's state and schedule arithmetic stay float32 (float64 for fp64) when the network runs in half
    # precision: the network call casts its input to the network's dtype and its output back.
    x1 = teacher.prior_sample(noise.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32))
    x0 = solve(model, x1, solver=recipe.solver, nfe=recipe.nfe, grid=recipe.grid, cond=c_dev)
    if not bool(torch.isfinite(x0).all()):
        raise AccelkitError(f"the teacher's ODE gave non-finite samples in [{indices.start}, {indices.stop}) "
                            f"(solver {recipe.solver}, nfe {recipe.nfe}, dtype {recipe.dtype}); check its "
                            f"prediction type and schedule (an eps model is singular at t = 1 under a linear "
                            f"schedule)")
    out = {"index": idx, "noise": noise.to(store), "sample": x0.to(device="cpu", dtype=store)}
    if c is not None:
        out.update({f"cond.{k}": v.cpu() for k, v in c.tensors().items()})
    if recipe.save_trajectory:
        times, states = model.pick(recipe.save_trajectory)
        out["trajectory"] = torch.stack([s.to(device="cpu", dtype=store) for s in states], dim=1)
        out["trajectory_times"] = torch.tensor(times, dtype=torch.float64)
    return out


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    out = {}
    for key in parts[0]:
        out[key] = parts[0][key] if key == "trajectory_times" else torch.cat([p[key] for p in parts])
    return out


def make_shard(art: Artifact, teacher: Teacher, recipe: CoupleRecipe, cond: Condition | None, k: int,
               start: int, stop: int, ckpt: Checkpointer, bar: Any, record: bool) -> None:
    """Generate shard k (indices [start, stop)), resuming from its partial file; checkpoints on ``ckpt``."""
    partial = art.file(partial_name(k))
    parts: list[dict[str, Tensor]] = []
    done = start
    if partial.is_file():
        from safetensors.torch import load_file

        saved = load_file(str(partial))
        rows = saved["index"].shape[0]
        if rows % recipe.micro_batch and start + rows != stop or not torch.equal(
                saved["index"], torch.arange(start, start + rows)):
            partial.unlink()  # not ours (another micro-batch layout): start the shard over
        else:
            parts, done = [saved], start + rows
            bar.advance(rows)
    m = recipe.micro_batch
    step = max(1, math.ceil(recipe.batch_size / m)) * m
    while done < stop:
        chunk_end = min(done + step, stop)
        for a in range(done, chunk_end, m):
            parts.append(generate(teacher, recipe, range(a, min(a + m, chunk_end)), cond))
        bar.advance(chunk_end - done)
        done = chunk_end
        if done < stop and ckpt.due():
            merged = _concat(parts)
            parts = [merged]
            save_safetensors(partial, merged, {"accelkit.couple-partial": str(k)})
            ckpt.saved()
    # One metadata key: safetensors writes several in hash-map order, and shards must be byte-reproducible.
    meta = {"accelkit.couple": json.dumps({"shard": k, "start": start, "count": stop - start,
                                           "sample_shape": list(teacher.sample_shape)}, sort_keys=True)}
    art.save_tensors(shard_name(k), _concat(parts), meta, record=record)
    partial.unlink(missing_ok=True)
    if record:
        art.progress = {"shards_done": sorted(int(name[6:11]) for name in art.files if name.startswith("shard-"))}
    ckpt.stop_if_interrupted()


def load_teacher_for(recipe: CoupleRecipe) -> Teacher:
    from ..models.loading import load_teacher

    dtype = DTYPES[recipe.dtype]
    return load_teacher(recipe.teacher, device=recipe.device, dtype=dtype, guidance=recipe.guidance)


def run_couple(recipe: CoupleRecipe, output: Path | None = None, force: bool = False, repair: bool = False,
               teacher: Teacher | None = None) -> Path:
    """Make (reuse, resume or repair) the couplings artifact of ``recipe``; returns its directory.

    ``teacher``: an already loaded teacher to use instead of loading ``recipe.teacher`` (which still names the file
    whose content hash identifies the artifact).
    """
    from ..models.loading import check_device

    check_device(recipe.device)  # before any artifact is opened: --device cuda without CUDA is a one-line error
    rank, world = init_distributed(recipe.device)
    if recipe.device == "cuda" and world > 1:  # one GPU per process
        recipe = recipe.model_copy(update={"device": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"})
    art, path, state, recorded = open_on_rank0(rank, output, KIND, recipe, force=force, seeds={"seed": recipe.seed})
    try:
        if art is None:
            art = Artifact.attach(path)
        ranges = shard_ranges(recipe.n, recipe.shard_size)
        if state == "complete" and not repair:
            if rank == 0:
                log(f"couple: reusing the complete artifact {path}")
            return path
        redo: set[int] = set()
        if repair:
            redo = {k for k in range(len(ranges))
                    if shard_name(k) in recorded and file_problem(path, shard_name(k), recorded[shard_name(k)])}
            if state == "complete":
                if rank == 0:
                    log(f"couple --repair: {len(redo)} damaged shard(s) of {len(ranges)}"
                        + (f": {', '.join(shard_name(k) for k in sorted(redo))}" if redo else "; nothing to do"))
                    if redo:
                        art.manifest["status"] = "partial"  # readers stay away while shards are rewritten
                        art._write_manifest()
                if not redo:
                    return path
        mine = [k for k in range(len(ranges)) if k % world == rank]
        todo = [k for k in mine if k in redo or not (path / shard_name(k)).is_file()]
        for k in redo & set(mine):
            (path / shard_name(k)).unlink(missing_ok=True)
        if teacher is None:
            teacher = load_teacher_for(recipe)
        cond = load_conditions(recipe.conditions) if recipe.conditions else None
        null = load_null_condition(recipe.conditions) if recipe.conditions else None
        if null is not None:  # on the device once: a host copy in every guided step would sync the solver's loop
            teacher.null_condition = null.map(lambda v: v.to(recipe.device))
        if recipe.compile or recipe.cuda_graphs:
            from ..acceleration import accelerate

            accelerate(teacher, compile=recipe.compile, cuda_graphs=recipe.cuda_graphs, solver=recipe.solver,
                       what=recipe.teacher)
        my_total = sum(b - a for k, (a, b) in enumerate(ranges) if k in todo)
        start_time = time.perf_counter()
        with Checkpointer(recipe.checkpoint_every, what="couple") as ckpt, \
                progress_bar(my_total, "couple", unit="samples", disable=rank != 0) as bar:
            for k in todo:
                a, b = ranges[k]
                make_shard(art, teacher, recipe, cond, k, a, b, ckpt, bar, record=world == 1)
        seconds = time.perf_counter() - start_time
        barrier()
        if rank == 0:
            finish(art, recipe, teacher, ranges, redo, recorded, seconds, world)
        barrier()
        return path
    finally:
        if art is not None:
            art.close()


def finish(art: Artifact, recipe: CoupleRecipe, teacher: Teacher, ranges: list[tuple[int, int]], redo: set[int],
           recorded: dict[str, Any], seconds: float, world: int) -> None:
    for k in range(len(ranges)):
        name = shard_name(k)
        if not art.file(name).is_file():
            raise AccelkitError(f"{art.path}: {name} was not written; run the command again to finish it")
        digest = art.record_file(name, save=False)
        if k in redo:
            same = digest == recorded[name]["sha256"]
            log(f"couple --repair: regenerated {name}" + ("" if same else
                " (its hash differs from the original: other hardware or software?)"))
    guided = recipe.conditions is not None and getattr(teacher, "guidance_scale", 1.0) != 1.0
    summary = {
        "samples": recipe.n, "shards": [{"file": shard_name(k), "start": a, "count": b - a}
                                        for k, (a, b) in enumerate(ranges)],
        "sample_shape": list(teacher.sample_shape), "nfe": recipe.nfe,
        "forward_passes_per_sample": recipe.nfe * (2 if guided else 1),
        "keys": None, "seconds_last_run": round(seconds, 3), "processes": world,
        "teacher": {k: v for k, v in teacher.describe().items() if isinstance(v, str | int | float | bool)},
    }
    from safetensors import safe_open

    with safe_open(str(art.file(shard_name(0))), "pt") as f:
        summary["keys"] = sorted(f.keys())
    art.manifest["progress"] = {"shards_done": list(range(len(ranges)))}
    art.complete(summary)


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, CoupleRecipe)
    return run_couple(recipe, output, force)


register_stage(KIND, CoupleRecipe, _run)

__all__ = ["CoupleRecipe", "run_couple", "generate", "load_conditions", "shard_name", "shard_ranges",
           "RecordingTeacher"]
