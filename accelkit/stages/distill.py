"""distill: a student that does in N steps what its teacher's sampler did in many, trained on the teacher's couplings.

The student starts from the teacher of a couple artifact (noise eps_i, teacher ODE sample x0*_i), keeps its network,
prediction type and schedule, and is sampled with N first-order steps on the uniform grid t_k = 1 - k / N: the DDIM
update (Song et al. 2021, eta = 0), which on the linear schedule is exactly Euler's step,

    x_s = alpha(s) x0_hat(x_t, t) + sigma(s) eps_hat(x_t, t)          (:func:`ddim_step`).

* ``direct`` (Luhman & Luhman 2021, "Knowledge distillation in iterative generative models for improved sampling
  speed"; the distillation step of InstaFlow after reflow, Liu et al. 2023): the student's N-step sample from eps_i,
  with gradients through all N steps, regresses the teacher's sample,

      L = E_i d(Phi_theta^N(eps_i), x0*_i),      N in {1, 2, 4},

  with d the L2 or pseudo-Huber loss (:func:`accelkit.objectives.regression_loss`).
* ``progressive`` (Salimans & Ho 2022, "Progressive distillation for fast sampling of diffusion models", Alg. 2):
  rounds that halve the step count, from the teacher at ``start_nfe`` = N_0 down to ``nfe``. In round r the student
  of N = N_{r-1} / 2 steps starts from the previous round's model (the round's teacher, eta) and learns to do in one
  step from t to t'' = t - 1/N what two teacher steps t -> t' = t - 1/(2N) -> t'' do. Training points come from the
  couplings' samples x0* (or, with ``data``, the data set the teacher was trained on) noised with fresh seeded noise:
  t = i / N with i ~ U{1..N}, z_t = alpha_t x0 + sigma_t eps.
  The target is the x0 for which one DDIM step from z_t lands on the teacher's z_t'':

      z_t'  = ddim_step(eta, z_t, t, t'),   z_t'' = ddim_step(eta, z_t', t', t''),
      x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

  (one student step gives alpha_t'' x^ + sigma_t'' (z_t - alpha_t x^) / sigma_t, equal to z_t'' iff x^ = x~), with
  the paper's truncated-SNR weighting, the larger of the x- and eps-space errors:

      L = E w(t) d(x^_theta(z_t), x~),    w(t) = max(1, alpha_t^2 / sigma_t^2)   (d applied to sqrt(w) (x^ - x~)).

  Each round runs ``loop.steps`` steps of its own :class:`accelkit.training.Trainer` (checkpoints in
  ``checkpoint/round-R``); its student (EMA weights) is written as ``round-R.safetensors`` (a loadable teacher) and
  its quality recorded before the next round starts, so a run killed in any round resumes there.

* ``guided`` (Meng et al. 2023, "On distillation of guided diffusion models"): stage one (round 1) trains a student
  that takes the guidance scale g as an input (the extra input ``guidance``, :mod:`accelkit.extra_inputs`, zero
  initialised) to give in one evaluation the teacher's classifier-free-guided output, g drawn per example from
  ``guidance_range`` [A, B] (accelkit's scale: out_null + g (out_cond - out_null); their w = g - 1):

      L = E_{x0, eps, t, g} || out_theta(z_t, t, g) - (out_null(z_t, t) + g (out_cond(z_t, t) - out_null(z_t, t))) ||^2;

  stage two runs the progressive rounds above on that student, g kept as an input and drawn per example, so the
  final N-step student follows any g in the range (``accelkit sample --guidance G``). Needs conditional couplings
  (class labels or text embeddings) of a teacher with a null condition.

Quality is the RMSE, on the first ``eval_samples`` couplings, between a model's N-step sample from eps_i and the
teacher's ODE sample x0*_i: for every round (its student at N and its teacher at 2N) and for the original teacher
at every NFE of the chain with the same first-order sampler. The artifact holds ``teacher.safetensors`` (the final
student in accelkit's teacher format, with the recommended solver, NFE and grid in its header info and the manifest
summary), ``history.json`` (every logged training step; progressive entries carry their round) and, for progressive,
every round's student.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..artifacts import Artifact
from ..console import log
from ..data import DATA_NAMES, BatchSampler, load_dataset, stream_seed
from ..errors import AccelkitError
from ..jobs import barrier, broadcast_object
from ..recipes import StageRecipe, register_stage
from ..teacher import Condition, NetworkTeacher, Teacher, broadcast_to
from ..training import LOOP_EXECUTION_FIELDS, LoopConfig, Trainer
from . import student as students

KIND = "distill"
METHODS = ("direct", "progressive", "guided")
#: Sinusoidal features of g * 100 for the student's guidance input (as accelkit.stages.consistency's LCM input).
GUIDANCE_INPUT_SCALE = 100.0
DIRECT_NFES = (1, 2, 4)


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=1e-4, warmup_steps=50, ema_rates=[0.999], checkpoint_every=500)


class DistillRecipe(StageRecipe):
    """distill: a direct or progressive few-step student trained on a teacher's couplings."""

    input_fields = ("couplings", "data")
    execution_fields = frozenset({"device", "eval_samples"})

    couplings: str = Field(description="a complete couple artifact (its teacher is the student's start)")
    method: Literal["direct", "progressive", "guided"] = Field(
        "progressive", description="direct: regress the N-step sample on the teacher's; guided: the guided teacher "
                                   "as a student with g as input, then progressive rounds; progressive: halve the "
                                   "steps round by round (Salimans & Ho 2022)")
    nfe: int = Field(1, ge=1, description="the student's steps (direct: 1, 2 or 4)")
    start_nfe: int = Field(8, ge=2, description="progressive: the teacher's steps in the first round (nfe x 2^k)")
    data: str | None = Field(None, description="progressive: noise this data set instead of the couplings' samples "
                                               f"(one of {', '.join(DATA_NAMES)} or a .safetensors/.npy file)")
    data_size: int = Field(100_000, ge=16, description="points drawn for a 2-D toy set given as data")
    loss: Literal["l2", "pseudo-huber"] = Field("l2", description="l2 or pseudo-huber")
    huber_c: float | None = Field(None, gt=0, description="pseudo-Huber c (None: 0.00054 sqrt(elements per sample))")
    batch_size: int = Field(256, ge=1, description="global batch size (over all processes)")
    seed: int = Field(0, ge=0, description="seeds the pair order, the training times and the fresh noise")
    loop: LoopConfig = Field(default_factory=default_loop, description="the training loop (progressive: per round)")
    guidance_range: tuple[float, float] | None = Field(
        None, description="guided: the range [A, B] of the guidance scale g (accelkit's scale) the student takes")
    eval_samples: int = Field(1000, ge=0, description="couplings for the quality record (0: skip)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> DistillRecipe:
        if self.method == "direct" and self.nfe not in DIRECT_NFES:
            raise ValueError(f"nfe {self.nfe}: --method direct trains a 1-, 2- or 4-step student; expected one of "
                             f"{', '.join(map(str, DIRECT_NFES))}")
        if self.method == "guided":
            if self.guidance_range is None:
                raise ValueError("method guided needs guidance_range A,B (accelkit's guidance scale g; Meng et al.'s "
                                 "w = g - 1), e.g. --guidance-range 1,4")
            if not self.guidance_range[0] <= self.guidance_range[1]:
                raise ValueError(f"guidance_range {list(self.guidance_range)}: expected A <= B")
        elif self.guidance_range is not None:
            raise ValueError(f"guidance_range {list(self.guidance_range)}: applies to --method guided")
        if self.method in ("progressive", "guided"):
            ratio, rest = divmod(self.start_nfe, self.nfe)
            if rest or ratio < 2 or ratio & (ratio - 1):
                raise ValueError(f"start_nfe {self.start_nfe} with nfe {self.nfe}: progressive distillation halves "
                                 f"the steps each round, so start_nfe must be nfe times a power of two (e.g. "
                                 f"{2 * self.nfe}, {4 * self.nfe}, {8 * self.nfe})")
        if self.data is not None and self.method not in ("progressive", "guided"):
            raise ValueError(f"data {self.data!r}: direct distillation learns the couplings' noise-to-sample map; "
                             "data applies to --method progressive")
        if self.data is not None and self.data not in DATA_NAMES and not self.data.endswith((".safetensors",
                                                                                            ".npy")):
            raise ValueError(f"data {self.data!r}: expected one of {', '.join(DATA_NAMES)} or a .safetensors/.npy "
                             "file")
        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        if self.loop.lora is not None:
            raise ValueError("distill trains the teacher's full weights; loop.lora is not supported by distill")
        return self

    @property
    def data_is_file(self) -> bool:
        return self.data is not None and self.data not in DATA_NAMES

    def inputs(self) -> dict[str, str]:
        return {"couplings": self.couplings, **({"data": self.data} if self.data_is_file else {})}

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        if self.data is not None and not self.data_is_file:
            d["data"] = self.data  # a named set is part of the recipe, a file enters through its content hash
        if self.data is None or self.data_is_file:
            d.pop("data_size")
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        if self.method == "direct":
            d.pop("start_nfe")  # only progressive uses it
        if self.guidance_range is None:
            d.pop("guidance_range", None)  # the methods without it keep their identity
        return d

    def round_nfes(self) -> list[int]:
        """The student's steps round by round: direct [nfe]; progressive start_nfe / 2, ..., nfe; guided the same after
        stage one (the guided teacher at start_nfe, with g as an input)."""
        if self.method == "direct":
            return [self.nfe]
        out, n = [self.start_nfe] if self.method == "guided" else [], self.start_nfe
        while n > self.nfe:
            n //= 2
            out.append(n)
        return out


# ------------------------------------------------------------------------------------------------------- sampling


def ddim_step(model: Teacher, x: Tensor, t: Tensor, s: Tensor, cond: Condition | None = None) -> Tensor:
    """One DDIM step (eta = 0) of ``model`` from time t to s (scalars or per sample):
    x_s = alpha(s) x0_hat + sigma(s) eps_hat with (x0_hat, eps_hat) = model.denoise(x, t); Euler's step on the linear
    schedule. The step of the ``ddim`` solver, with gradients and per-sample times."""
    x0, eps = model.denoise(x, t, cond)
    schedule = model.schedule
    return broadcast_to(schedule.alpha(s), x) * x0 + broadcast_to(schedule.sigma(s), x) * eps


def student_grid(nfe: int) -> Tensor:
    """The N + 1 times 1 = t_0 > ... > t_N = 0 of an N-step student (uniform in t, the paper's t = i / N)."""
    return torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)


def sampler_name(model: Teacher) -> str:
    """The registered solver that runs :func:`ddim_step` on the uniform grid: euler on the linear schedule (the same
    update), ddim otherwise."""
    return "euler" if model.schedule.name == "linear" else "ddim"


def recommended_sampling(model: Teacher, nfe: int) -> dict[str, Any]:
    return {"solver": sampler_name(model), "nfe": nfe, "grid": [float(t) for t in student_grid(nfe)]}


def sample_steps(model: Teacher, noise: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
    """``nfe`` DDIM steps of ``model`` from ``model.prior_sample(noise)`` on :func:`student_grid` (differentiable)."""
    x, grid = model.prior_sample(noise), student_grid(nfe).to(noise.device)
    b = noise.shape[0]
    for k in range(nfe):
        x = ddim_step(model, x, grid[k].expand(b), grid[k + 1].expand(b), cond)
    return x


def progressive_target(teacher: Teacher, z_t: Tensor, t: Tensor, nfe: int, cond: Condition | None = None
                       ) -> tuple[Tensor, Tensor]:
    """(x~, w): the x0 target of Salimans & Ho's Algorithm 2 for a student of ``nfe`` steps at per-sample times t
    (see the module docstring), from two DDIM steps of ``teacher``, and the weight max(1, alpha_t^2 / sigma_t^2)."""
    schedule = teacher.schedule
    t_mid, t_end = (t - 0.5 / nfe).clamp(min=0.0), (t - 1.0 / nfe).clamp(min=0.0)
    with torch.no_grad():
        z_end = ddim_step(teacher, ddim_step(teacher, z_t, t, t_mid, cond), t_mid, t_end, cond)
    a_t, s_t, a_e, s_e = schedule.alpha(t), schedule.sigma(t), schedule.alpha(t_end), schedule.sigma(t_end)
    ratio = s_e / s_t
    target = (z_end - broadcast_to(ratio, z_t) * z_t) / broadcast_to(a_e - ratio * a_t, z_t)
    weight = torch.clamp((a_t / s_t) ** 2, min=1.0)
    return target, weight


# --------------------------------------------------------------------------------------------------------- quality


@torch.no_grad()
def quality(model: Teacher, pairs: dict[str, Tensor], nfe: int, device: torch.device) -> float:
    """RMSE between ``model``'s ``nfe``-step sample from the pairs' noise (the recorded sampler) and their x0*."""
    from ..evaluation import sample_batched
    from ..metrics import rmse
    from ..objectives import condition_of

    cond = condition_of(pairs)
    cond = cond.map(lambda v: v.to(device)) if cond is not None else None
    x = sample_batched(model.to(device), pairs["noise"].to(device), sampler_name(model), nfe, cond=cond,
                       grid=student_grid(nfe))
    return rmse(x.cpu(), pairs["sample"])


# ------------------------------------------------------------------------------------------------------------- run


def run_distill(recipe: DistillRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the student of ``recipe``; returns the artifact directory."""
    if recipe.method == "guided":
        keys = Artifact.read(recipe.couplings, "couple").manifest.get("summary", {}).get("keys", [])
        if not any(k.startswith("cond.") for k in keys):
            raise AccelkitError(f"{recipe.couplings}: --method guided distils classifier-free guidance, but these "
                                "couplings are unconditional; couple a conditional teacher with --conditions")
    run = students.begin_student_run(KIND, recipe, output, force)
    art, path, device, rank, world = run.art, run.path, run.device, run.rank, run.world
    try:
        if run.complete:
            return path
        start, reference, couplings, couplings_art = run.start, run.reference, run.couplings, run.couplings_artifact
        job = DistillJob(recipe, art, path, couplings, reference, device, rank, world)
        network = start.network
        begin = time.perf_counter()
        for r, nfe in enumerate(recipe.round_nfes(), start=1):
            network = job.run_round(r, nfe, network)
        if rank == 0:
            job.finish(couplings_art, network, time.perf_counter() - begin)
            shutil.rmtree(path / "checkpoint", ignore_errors=True)
        barrier()
        return path
    finally:
        run.close()


class DistillJob:
    """The rounds of one distill run: each trains, records its student and its quality, and is skipped on resume
    once recorded (direct is one round)."""

    def __init__(self, recipe: DistillRecipe, art: Artifact | None, path: Path, couplings, reference: NetworkTeacher,
                 device: torch.device, rank: int, world: int):
        self.recipe, self.art, self.path, self.couplings = recipe, art, path, couplings
        self.reference, self.device, self.rank, self.world = reference, device, rank, world
        self.records: list[dict[str, Any]] = list(art.progress.get("rounds", [])) if art is not None else []
        self.done = int(broadcast_object(len(self.records)))
        self.history: list[dict[str, Any]] = []
        self.data: Tensor | None = None
        if recipe.data is not None:
            if any(k.startswith("cond.") for k in couplings.keys):
                raise AccelkitError(f"data {recipe.data!r}: the couplings are conditional and the data has no "
                                    "conditions; distill on the couplings (leave data out)")
            ds = load_dataset(recipe.data, recipe.data_size, recipe.seed)
            if tuple(ds.sample_shape) != tuple(reference.sample_shape):
                raise AccelkitError(f"data {recipe.data!r}: samples of shape {list(ds.sample_shape)}, but the "
                                    f"teacher's are {list(reference.sample_shape)}")
            self.data = ds.samples
        n = min(recipe.eval_samples, len(couplings))
        if recipe.method == "guided":
            n = 0  # the couplings' samples are not the guided teacher's at every g: no RMSE record
        self.eval_pairs = couplings.get(torch.arange(n)) if n > 0 else None
        self.kind = reference
        if recipe.method == "guided":  # the students' network call feeds the guidance input
            from ..extra_inputs import ExtraInputCall, base_call

            if reference.null_condition is None:
                raise AccelkitError("--method guided: the teacher has no null condition to guide against")
            self.kind = NetworkTeacher(reference.network, ExtraInputCall(base_call(reference.call)),
                                       reference.prediction, reference.schedule, reference.sample_shape,
                                       reference.time_input, 1.0, reference.null_condition, reference.info)

    def model(self, network: torch.nn.Module, info: dict[str, Any] | None = None) -> NetworkTeacher:
        return students.student_of(self.kind, network, info)

    def teacher_of_round(self, r: int, network: torch.nn.Module) -> Teacher:
        """Round 1's teacher is the couplings' teacher (at their guidance scale); later rounds' the last student."""
        return self.reference if r == 1 else self.model(network)

    def _set_progress(self, r: int, step: int, loss: float | None = None) -> None:
        if self.art is not None:
            self.art.progress = {"round": r, "step": step, "steps": self.recipe.loop.steps, "loss": loss,
                                 "rounds": self.records}

    def run_round(self, r: int, nfe: int, network: torch.nn.Module) -> torch.nn.Module:
        """Train round ``r`` (an ``nfe``-step student) from ``network``; returns the round's frozen student network."""
        from ..models.loading import load_teacher, save_teacher

        name = f"round-{r}.safetensors"
        if r <= self.done:
            if self.art is not None:
                self.art.check_file(name)
            loaded = load_teacher(self.path / name, dtype="fp32")
            assert isinstance(loaded, NetworkTeacher)
            self.history.extend(self._round_history(r))
            return loaded.network.eval().requires_grad_(False)
        recipe = self.recipe
        teacher = self.teacher_of_round(r, network).to(self.device)
        trainable = copy.deepcopy(network).requires_grad_(True).train()
        if recipe.method == "guided" and r == 1:
            from ..extra_inputs import ExtraInput, attach_to_network

            attach_to_network(trainable, [ExtraInput("guidance", "scalar", scale=GUIDANCE_INPUT_SCALE)])
        loss_fn, draw = self.objective(teacher, nfe, r)
        seed = stream_seed(recipe.seed, r)
        if self.data is not None:
            sampler = BatchSampler(self.data, recipe.batch_size, seed, self.rank, self.world, noise=draw)
        else:
            sampler = self.couplings.sampler(recipe.batch_size, seed, self.rank, self.world, noise=draw)

        def on_log(step: int, values: dict[str, float]) -> None:
            self._set_progress(r, step, values.get("loss"))

        trainer = Trainer(trainable, loss_fn, sampler, recipe.loop, checkpoint_dir=self.path / "checkpoint" /
                          f"round-{r}", device=self.device, on_log=on_log)
        self._set_progress(r, 0)
        trainer.fit()
        barrier()
        student, weights = students.averaged_network(trainer)
        if self.rank == 0:
            assert self.art is not None
            model = self.model(student, {"trained_by": "accelkit distill", "method": recipe.method, "round": r,
                                         "sampling": recommended_sampling(self.reference, nfe)})
            progressive = recipe.method in ("progressive", "guided")
            final_loss = trainer.history[-1].get("loss") if trainer.history else None
            stage_one = recipe.method == "guided" and r == 1
            record: dict[str, Any] = {"round": r, "nfe": nfe, "teacher_nfe": 2 * nfe if progressive and not stage_one
                                      else None,
                                      "steps": trainer.step, "final_loss": final_loss, "weights": weights}
            if self.eval_pairs is not None:
                record["rmse"] = quality(model, self.eval_pairs, nfe, self.device)
                if progressive:
                    record["teacher_rmse"] = quality(self.teacher_of_round(r, network), self.eval_pairs, 2 * nfe,
                                                     self.device)
                shown = f"rmse {record['rmse']:.4g}" + (f" (its teacher at {2 * nfe}: {record['teacher_rmse']:.4g})"
                                                         if "teacher_rmse" in record else "")
                log(f"distill: round {r}: {nfe}-step student, {shown}")
            entries = [{"round": r, **e} for e in trainer.history]
            self.history.extend(entries)
            self.records.append(record)
            if progressive:  # the round is done once recorded: a resumed run loads its student from the file
                self.art.write_with(name, lambda tmp: save_teacher(model, tmp))
                self.art.write_json(f"history-round-{r}.json", entries)
                self._set_progress(r, trainer.step)
                shutil.rmtree(self.path / "checkpoint" / f"round-{r}", ignore_errors=True)
            # direct: one round, finished by finish(); until then its checkpoint is what a resumed run starts from
        barrier()
        return student

    def _round_history(self, r: int) -> list[dict[str, Any]]:
        import json

        p = self.path / f"history-round-{r}.json"
        return json.loads(p.read_text()) if p.exists() else []

    def objective(self, teacher: Teacher, nfe: int, r: int = 0):
        """(loss_fn, per-batch draws) of the method for an ``nfe``-step student (round ``r``)."""
        from ..objectives import condition_of, regression_loss

        recipe = self.recipe
        shape = tuple(self.reference.sample_shape)
        if recipe.method == "guided":
            return self.guided_objective(teacher, nfe, r)
        if recipe.method == "direct":
            def direct_loss(network: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
                x = sample_steps(self.model(network), batch["noise"], nfe, condition_of(batch))
                return regression_loss(x.float() - batch["sample"].float(), recipe.loss, recipe.huber_c)

            return direct_loss, None

        def draw(generator: torch.Generator, n: int) -> dict[str, Tensor]:
            i = torch.randint(1, nfe + 1, (n,), generator=generator)
            return {"t": i.double() / nfe, "eps": torch.randn(n, *shape, generator=generator)}

        schedule = self.reference.schedule

        def progressive_loss(network: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
            x0 = (batch["sample"] if "sample" in batch else batch["x"]).float()  # couplings' x0* or data
            cond, t = condition_of(batch), batch["t"]
            z_t = broadcast_to(schedule.alpha(t), x0) * x0 + broadcast_to(schedule.sigma(t), x0) * batch["eps"]
            target, weight = progressive_target(teacher, z_t, t, nfe, cond)
            x0_hat = self.model(network).predict_x0(z_t, t, cond)
            diff = broadcast_to(weight.sqrt(), x0) * (x0_hat.float() - target)
            return regression_loss(diff, recipe.loss, recipe.huber_c)

        return progressive_loss, draw

    def guided_objective(self, teacher: Teacher, nfe: int, r: int):
        """Meng et al.'s two stages: round 1 regresses the teacher's guided output at per-example g (the student takes
        g as its ``guidance`` input); later rounds are progressive rounds with g drawn per example."""
        from ..consistency import guided_denoise
        from ..extra_inputs import with_extra_inputs
        from ..objectives import condition_of, regression_loss
        from ..teacher import x0_eps_to_output

        recipe = self.recipe
        shape = tuple(self.reference.sample_shape)
        lo, hi = recipe.guidance_range  # type: ignore[misc]
        schedule = self.reference.schedule
        stage_one = r == 1

        def draw(generator: torch.Generator, n: int) -> dict[str, Tensor]:
            if stage_one:
                t = 1e-3 + (1.0 - 1e-3) * torch.rand(n, generator=generator, dtype=torch.float64)
            else:
                t = torch.randint(1, nfe + 1, (n,), generator=generator).double() / nfe
            g = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
            return {"t": t, "eps": torch.randn(n, *shape, generator=generator), "g": g}

        def guided_loss(network: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
            x0 = (batch["sample"] if "sample" in batch else batch["x"]).float()
            cond, t, g = condition_of(batch), batch["t"], batch["g"]
            z_t = broadcast_to(schedule.alpha(t), x0) * x0 + broadcast_to(schedule.sigma(t), x0) * batch["eps"]
            seen = with_extra_inputs(cond, guidance=g.float())
            if stage_one:
                with torch.no_grad():
                    x0_g, eps_g = guided_denoise(self.reference, z_t, t, cond, g)
                    target = x0_eps_to_output(self.reference.prediction, x0_g, eps_g, t, schedule)
                student = self.model(network)
                out = student.network_output(z_t, t, seen)
                return regression_loss(out.float() - target.float(), recipe.loss, recipe.huber_c)
            target, weight = progressive_target(teacher, z_t, t, nfe, seen)
            x0_hat = self.model(network).predict_x0(z_t, t, seen)
            diff = broadcast_to(weight.sqrt(), x0) * (x0_hat.float() - target)
            return regression_loss(diff, recipe.loss, recipe.huber_c)

        return guided_loss, draw

    def finish(self, couplings: Artifact, network: torch.nn.Module, seconds: float) -> None:
        """Write the last student as teacher.safetensors with its summary: the rounds, the recommended sampling and
        the original teacher's quality at every NFE of the chain with the same sampler."""
        recipe = self.recipe
        nfe = recipe.nfe
        sampling = recommended_sampling(self.reference, nfe)
        info = {"trained_by": "accelkit distill", "method": recipe.method, "seed": recipe.seed,
                "couplings": str(couplings.path), "steps": sum(int(r["steps"]) for r in self.records),
                "rounds": [r["nfe"] for r in self.records], "sampling": sampling}
        model = self.model(network, info)
        if recipe.guidance_range is not None:
            lo, hi = recipe.guidance_range
            model.guidance_scale = 1.0 if lo <= 1.0 <= hi else float(lo)  # the default when sampled without --guidance
        summary: dict[str, Any] = {
            "method": recipe.method, "nfe": nfe, "sampling": sampling, "prediction_type": model.prediction,
            "schedule": model.schedule.config(), "sample_shape": list(model.sample_shape),
            "couplings": couplings.manifest["summary"].get("samples"), "rounds": self.records,
            "nfe_per_round": ([recipe.start_nfe] if recipe.method == "progressive" else []) + [r["nfe"] for r in
                                                                                              self.records],
            "steps": info["steps"], "final_loss": self.records[-1].get("final_loss"), "processes": self.world,
            "seconds_last_run": round(seconds, 3),
        }
        if recipe.guidance_range is not None:
            summary["guidance"] = {"input": "guidance", "range": list(recipe.guidance_range),
                                   "default": model.guidance_scale,
                                   "convention": "accelkit's g (out_null + g (out_cond - out_null)); Meng et al.'s "
                                                 "w = g - 1"}
        if self.eval_pairs is not None:
            nfes = sorted({*summary["nfe_per_round"]})
            summary["quality"] = {
                "metric": "rmse to the couplings' teacher ODE samples", "sampler": sampling["solver"],
                "samples": int(self.eval_pairs["noise"].shape[0]), "student": {str(nfe): self.records[-1]["rmse"]},
                "teacher": {str(n): quality(self.reference, self.eval_pairs, n, self.device) for n in nfes}}
            q = summary["quality"]
            log(f"distill: {nfe}-step student rmse {q['student'][str(nfe)]:.4g}; teacher with the same sampler: "
                + ", ".join(f"{n} steps {v:.4g}" for n, v in q["teacher"].items()))
        students.save_student(self.art, model, self.history, summary)


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, DistillRecipe)
    return run_distill(recipe, output, force)


register_stage(KIND, DistillRecipe, _run)

__all__ = ["DistillRecipe", "run_distill", "ddim_step", "progressive_target", "student_grid", "KIND", "METHODS"]
