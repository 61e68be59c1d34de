"""bespoke: a learned few-step solver for one teacher at one NFE (a tiny parameter set, the teacher frozen).

* ``kind: bespoke`` (Shaul et al. 2023, arXiv 2310.19075): an RK1 / RK2 base solver stepping on a learned
  scale-time transform of the teacher's ODE (:mod:`accelkit.solvers.bespoke`), trained on the upper bound of its
  global error: the local errors of its steps started on ground-truth paths, weighted by the products of the later
  steps' Lipschitz factors. Initialised at the identity transform, i.e. exactly the plain base solver.
* ``kind: bns`` (Shaul et al. 2024, arXiv 2403.01329): a non-stationary solver (:mod:`accelkit.solvers.bns`), every
  step a learned combination of the starting point and all velocities so far at learned times, trained end to end
  through the whole sampler on the mean log squared error of the endpoint (PSNR). Initialised at a standard solver
  (``init``; ``best``: the standard solver with the lowest validation error at this NFE), so it starts no worse.

Ground truth: noise and the teacher's ODE paths, from a couple artifact made with ``--save-trajectory K``
(``couplings``: the noise at t_max, its K intermediate states and the sample at t_min) or computed here
(``path_points`` states from t_max to t_min, by scipy's adaptive DOP853 or a fine fixed-step solver). The teacher's
velocity at every stored state makes the path a cubic Hermite curve in t, which the bespoke loss reads at its
learned times (and differentiates in them). The first ``train_samples`` paths train, the next ``val_samples`` measure
the held-out RMSE of the solver's endpoint during and after training.

Training runs on :class:`accelkit.training.Trainer` (the solver's parameters are the model; exact resume after
``kill -9``; the ground-truth paths are kept beside the checkpoints, so a resumed run reads them back). The
artifact holds ``solver.safetensors`` + ``solver.json`` (kind, base, NFE, the teacher's path and content hash;
:mod:`accelkit.solvers.learned` loads it as a solver: ``accelkit sample T --solver runs/bespoke-...``) and
``history.json``; its summary gives the held-out RMSE of the learned solver and of the standard solvers at the
same NFE, and the training cost in seconds and teacher evaluations. Where training raised the held-out RMSE (the
bespoke loss is a bound, not the error), the artifact keeps the starting solver and says so (``kept: initial``).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..artifacts import Artifact, content_hash, open_on_rank0
from ..console import log
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage
from ..teacher import CountingTeacher, Teacher
from ..training import LoopConfig, Trainer

KIND = "bespoke"
F64 = torch.float64
#: Standard solvers a learned one is compared with (and a BNS solver may start from).
STANDARD_SOLVERS = ("euler", "heun", "midpoint", "dpm++2m", "dpm++3m", "unipc", "unipc2", "ipndm")
LOOP_EXECUTION_FIELDS = ("checkpoint_every", "checkpoint_interval_s", "keep_checkpoints", "log_every",
                         "validate_every")


def default_loop() -> LoopConfig:
    return LoopConfig(steps=300, lr=3e-2, warmup_steps=10, lr_schedule="cosine", ema_rates=[], grad_clip=None,
                      checkpoint_every=100, validate_every=0, log_every=20)


class BespokeRecipe(StageRecipe):
    """bespoke: a learned few-step solver (bespoke scale-time or BNS) for one teacher at one NFE."""

    input_fields = ("teacher", "couplings")
    execution_fields = frozenset({"device"})

    teacher: str = Field(description="teacher checkpoint (file, folder or artifact); the solver is for it only")
    nfe: int = Field(ge=1, le=1000, description="teacher evaluations per sample of the learned solver")
    kind: Literal["bespoke", "bns"] = Field("bespoke", description="bespoke: scale-time RK1/RK2 trained on the "
                                                                   "error bound; bns: non-stationary, end to end")
    base: Literal["rk1", "rk2"] | None = Field(None, description="bespoke base solver (None: rk2 for an even NFE, "
                                                                 "rk1 for an odd one)")
    init: str = Field("best", description="bns: start at this standard solver, or 'best' (lowest validation RMSE)")
    couplings: str | None = Field(None, description="couple artifact with trajectories (--save-trajectory) to "
                                                    "train on; None: ground-truth paths are computed here")
    train_samples: int = Field(1024, ge=1, description="ground-truth paths to train on")
    val_samples: int = Field(256, ge=1, description="held-out paths for the validation RMSE")
    path_points: int = Field(64, ge=2, description="computed paths: states stored from t_max to t_min")
    reference: Literal["adaptive", "heun", "dpm++2m"] = Field(
        "adaptive", description="computed paths: scipy DOP853 (adaptive) or a fixed-step solver between points")
    reference_nfe: int = Field(16, ge=1, description="fixed-step reference: NFE between two stored points")
    reference_tol: float = Field(1e-7, gt=0, description="adaptive reference: rtol = atol")
    lipschitz: float = Field(1.0, gt=0, description="bespoke: the teacher's assumed Lipschitz constant in the bound")
    batch_size: int = Field(128, ge=1, description="paths per optimizer step")
    seed: int = Field(0, ge=0, description="seeds the noise of computed paths and the batch order")
    loop: LoopConfig = Field(default_factory=default_loop)
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="before")
    @classmethod
    def _default_base(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind", "bespoke") == "bespoke" and data.get("base") is None \
                and isinstance(data.get("nfe"), int):
            data = {**data, "base": "rk2" if data["nfe"] % 2 == 0 else "rk1"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> BespokeRecipe:
        from ..solvers.bespoke import bespoke_steps

        if self.kind == "bespoke":
            assert self.base is not None
            try:
                bespoke_steps(self.base, self.nfe)
            except AccelkitError as e:
                raise ValueError(str(e)) from None
        elif self.base is not None:
            raise ValueError("base applies to kind bespoke; a bns solver has no base solver")
        if self.kind == "bns" and self.init != "best" and self.init not in STANDARD_SOLVERS:
            raise ValueError(f"init {self.init!r}: expected best or one of {', '.join(STANDARD_SOLVERS)}")
        if self.loop.lora is not None:
            raise ValueError("a learned solver has no network weights to adapt; loop.lora does not apply")
        return self

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        return d


# ------------------------------------------------------------------------------------------------ ground truth


@dataclass
class GroundTruthPaths:
    """States ``x`` (N, K, *shape) and velocities ``v`` (same shape) of N ODE paths at the K decreasing ``times``,
    read at any time as the cubic Hermite curve through them (exact in x and dx/dt at the stored times):

        x(t) = h00(s) x_k + h10(s) H v_k + h01(s) x_{k+1} + h11(s) H v_{k+1},  H = t_{k+1} - t_k,  s = (t - t_k) / H.
    """

    times: Tensor
    x: Tensor
    v: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def noise_state(self) -> Tensor:
        return self.x[:, 0]

    @property
    def endpoint(self) -> Tensor:
        return self.x[:, -1]

    def reader(self, rows: Tensor):
        """path(t) for the rows ``rows``: their states at the (0-d, differentiable) time t."""
        times = self.times
        x, v = self.x[rows], self.v[rows]

        def path(t: Tensor) -> Tensor:
            tt = times.to(t.device)
            k = int(torch.searchsorted(-tt, -t.detach().reshape(1), right=True).clamp(1, len(tt) - 1)) - 1
            step = tt[k + 1] - tt[k]
            s = (t - tt[k]) / step
            s2, s3 = s * s, s * s * s
            coef = [2 * s3 - 3 * s2 + 1, (s3 - 2 * s2 + s) * step, -2 * s3 + 3 * s2, (s3 - s2) * step]
            parts = (x[:, k], v[:, k], x[:, k + 1], v[:, k + 1])
            return sum(c.to(p.dtype) * p for c, p in zip(coef, parts, strict=True))

        return path


def path_times(t_max: float, t_min: float, points: int) -> Tensor:
    """``points`` times from t_max to t_min, denser at both ends (t = t_min + (t_max - t_min)(1 + cos(pi k/(K-1)))/2),
    where the ODE of a diffusion model bends most."""
    k = torch.arange(points, dtype=F64)
    return t_min + (t_max - t_min) * 0.5 * (1.0 + torch.cos(math.pi * k / (points - 1)))


@torch.no_grad()
def velocities_at(teacher: Teacher, x: Tensor, times: Tensor, batch: int = 4096) -> Tensor:
    """The teacher's velocity at every stored state; where it is undefined (a VP teacher at t = 0) the secant of
    the adjacent interval stands in."""
    v = torch.empty_like(x)
    for k, t in enumerate(times.tolist()):
        for i in range(0, x.shape[0], batch):
            xs = x[i:i + batch, k]
            v[i:i + batch, k] = teacher.velocity(xs, torch.full((xs.shape[0],), t, dtype=F64, device=x.device))
        if not bool(torch.isfinite(v[:, k]).all()):
            j = k - 1 if k > 0 else k + 1
            v[:, k] = (x[:, k] - x[:, j]) / (times[k] - times[j]).to(x.dtype)
    return v


@torch.no_grad()
def compute_paths(teacher: Teacher, noise: Tensor, times: Tensor, reference: str = "adaptive",
                  reference_nfe: int = 16, tol: float = 1e-7, batch: int = 4096, progress: bool = False
                  ) -> GroundTruthPaths:
    """The teacher's ODE paths from ``teacher.prior_sample(noise)`` at t = times[0], stored at every time."""
    from ..jobs import progress_bar
    from ..solvers import get_solver, solve
    from ..solvers.reference import ReferenceSolveFailed, reference_solve

    states = [teacher.prior_sample(noise)]
    with progress_bar(len(times) - 1, "ground-truth paths", unit="segment", disable=not progress) as bar:
        for t0, t1 in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
            x = states[-1]
            if reference == "adaptive":
                try:
                    nxt = torch.cat([reference_solve(teacher, x[i:i + batch], t0, t1, rtol=tol, atol=tol).to(x)
                                     for i in range(0, x.shape[0], batch)])
                except ReferenceSolveFailed as e:
                    raise AccelkitError(f"bespoke: the adaptive reference (DOP853, tolerance {tol:g}) failed between "
                                        f"t = {t0:.4g} and {t1:.4g} ({e}); the teacher's ODE is too stiff for it: use "
                                        "--set bespoke.reference=dpm++2m (a fixed-step reference) or a looser "
                                        "bespoke.reference_tol") from e
            else:
                steps = get_solver(reference).steps(reference_nfe)
                grid = torch.linspace(t0, t1, steps + 1, dtype=F64)
                nxt = torch.cat([solve(teacher, x[i:i + batch], reference, reference_nfe, grid=grid)
                                 for i in range(0, x.shape[0], batch)])
            states.append(nxt)
            bar.advance(1)
    x = torch.stack(states, 1)
    return GroundTruthPaths(times, x, velocities_at(teacher, x, times, batch))


def couplings_paths(teacher: Teacher, path: str, rows: int, device: torch.device) -> GroundTruthPaths:
    """The first ``rows`` paths of a couple artifact made with ``save_trajectory``: noise at t_max, the stored
    intermediate states, the sample at t_min."""
    from ..couplings import open_couplings

    c = open_couplings(path, keys=None)
    if c.trajectory_times is None or "trajectory" not in c.keys:
        raise AccelkitError(f"{path}: the couplings hold no trajectories; make them with `accelkit couple "
                            "--save-trajectory K` (e.g. 32), or leave --couplings out to compute paths here")
    if tuple(c.sample_shape) != tuple(teacher.sample_shape):
        raise AccelkitError(f"{path}: samples of shape {list(c.sample_shape)}, the teacher's are "
                            f"{list(teacher.sample_shape)}")
    if len(c) < rows:
        raise AccelkitError(f"{path}: {len(c)} couplings, but train_samples + val_samples = {rows}")
    if any(k.startswith("cond.") for k in c.keys):
        raise AccelkitError(f"{path}: conditional couplings; learned solvers are trained on unconditional ones")
    grid = c.recipe.get("grid")
    t_max, t_min = (float(grid[0]), float(grid[-1])) if isinstance(grid, list) else (1.0, 0.0)
    data = c[torch.arange(rows)]
    inner = c.trajectory_times.to(F64)
    times = torch.cat([torch.tensor([t_max], dtype=F64), inner, torch.tensor([t_min], dtype=F64)])
    keep = torch.cat([torch.tensor([True]), (times[1:] < times[:-1])])  # drop a stored time equal to an end
    x = torch.cat([teacher.prior_sample(data["noise"]).unsqueeze(1), data["trajectory"], data["sample"].unsqueeze(1)],
                  1).to(device=device, dtype=torch.float32)
    times, x = times[keep], x[:, keep]
    return GroundTruthPaths(times, x, velocities_at(teacher, x, times))


# ------------------------------------------------------------------------------------------------------ solvers


def initial_solver(kind: str, teacher: Teacher, nfe: int, base: str | None, init: str, lipschitz: float,
                   val: GroundTruthPaths | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The untrained solver module and its config (what :func:`accelkit.solvers.learned.build_module` rebuilds)."""
    from ..solvers import solver_grid
    from ..solvers.bespoke import ScaleTimeSolver, bespoke_steps, parameter_count
    from ..solvers.bns import NonStationarySolver, trace_linear_solver

    if kind == "bespoke":
        assert base is not None
        n = bespoke_steps(base, nfe)
        grid = solver_grid(teacher, "euler" if base == "rk1" else "midpoint", n if base == "rk1" else 2 * n)
        module = ScaleTimeSolver(base, grid, lipschitz)
        return module, {"kind": kind, "base": base, "nfe": nfe, "steps": n, "grid": grid.tolist(),
                        "lipschitz": lipschitz, "parameters": parameter_count(base, n)}
    if init == "best":
        if val is None:
            raise AccelkitError("init best needs validation paths")
        scores = {s: standard_rmse(teacher, val, s, nfe) for s in STANDARD_SOLVERS if _takes(s, nfe)}
        init = min(scores, key=lambda s: scores[s])
    times, a, b = trace_linear_solver(teacher, init, nfe)
    grid = solver_grid(teacher, "euler", 1)
    t_max, t_min = float(grid[0]), float(grid[-1])
    t_lo = min(t_min + 1e-3 * (t_max - t_min), float(times.min()))
    module = NonStationarySolver(times, a, b, (t_lo, t_max))
    return module, {"kind": kind, "base": None, "init": init, "nfe": nfe, "steps": nfe, "t_range": [t_lo, t_max],
                    "parameters": nfe + nfe + nfe * (nfe + 1) // 2}


def _takes(solver: str, nfe: int) -> bool:
    from ..solvers import get_solver

    try:
        get_solver(solver).steps(nfe)
    except AccelkitError:
        return False
    return not (solver in ("heun", "midpoint") and nfe < 2)


@torch.no_grad()
def standard_rmse(teacher: Teacher, paths: GroundTruthPaths, solver: str, nfe: int) -> float:
    from ..metrics import rmse
    from ..solvers import solve

    return rmse(solve(teacher, paths.noise_state, solver, nfe), paths.endpoint)


@torch.no_grad()
def learned_rmse(module: nn.Module, teacher: Teacher, paths: GroundTruthPaths) -> float:
    from ..metrics import rmse

    return rmse(module.sample(teacher, paths.noise_state), paths.endpoint)


class _Objective(nn.Module):
    """The solver module with its training loss as forward(), so the Trainer (and DDP) can call it."""

    def __init__(self, solver: nn.Module, kind: str):
        super().__init__()
        self.solver, self.kind = solver, kind

    def forward(self, teacher: Teacher, paths: GroundTruthPaths, rows: Tensor) -> Tensor:
        from ..solvers.bns import psnr_loss

        if self.kind == "bespoke":
            return self.solver.bound_loss(teacher, paths.reader(rows))
        return psnr_loss(self.solver.sample(teacher, paths.noise_state[rows]), paths.endpoint[rows])


def keep_better(trained: nn.Module, initial_state: dict[str, Tensor], teacher: Teacher, val: GroundTruthPaths
                ) -> tuple[nn.Module, float, float, bool]:
    """The trained solver, or its starting point when training raised the held-out RMSE (the bespoke loss is an
    upper bound, not the error itself, and can move away from a start that is already good, e.g. the midpoint rule
    at NFE >= 10 on a smooth teacher). Returns (solver, trained RMSE, starting RMSE, whether the start was kept)."""
    import copy

    final = learned_rmse(trained, teacher, val)
    start = copy.deepcopy(trained)
    start.load_state_dict(initial_state)
    initial = learned_rmse(start, teacher, val)
    return (start if initial < final else trained), final, initial, initial < final


def fit_solver(module: nn.Module, kind: str, teacher: Teacher, train: GroundTruthPaths, val: GroundTruthPaths | None,
               loop: LoopConfig, batch_size: int = 128, seed: int = 0, checkpoint_dir: Path | None = None,
               device: torch.device | str = "cpu", on_log=None, progress: bool = True) -> Trainer:
    """Train ``module`` on ``train`` paths with the one :class:`Trainer`; returns it (``trainer.model.solver`` is
    the trained module; ``trainer.history`` the logs, with the validation RMSE when ``val`` is given)."""
    from ..data import BatchSampler

    teacher = teacher.to(device).eval().requires_grad_(False)
    objective = _Objective(module, kind)
    sampler = BatchSampler(torch.arange(len(train)), min(batch_size, len(train)), seed)

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(teacher, train, batch["x"].to(train.x.device))

    def validate(trainer: Trainer) -> dict[str, float]:
        return {"rmse": learned_rmse(trainer.model.solver, teacher, val)} if val is not None else {}

    return_trainer = Trainer(objective, loss_fn, sampler, loop, checkpoint_dir=checkpoint_dir, device=device,
                             validate_fn=validate if val is not None else None, on_log=on_log, progress=progress)
    return_trainer.fit()
    return return_trainer


# ----------------------------------------------------------------------------------------------------------- run


def refuse_qac_teacher(path: str, load_teacher: Any) -> None:
    """A QAC model's ODE depends on the code drawn for each sample; a learned solver here is trained and applied on
    unconditional paths, so such a teacher is refused before anything is written (its header alone is read)."""
    from ..qac import code_book_of

    if code_book_of(load_teacher(path, device="meta")) is not None:
        raise AccelkitError(f"{path}: a QAC model (accelkit qac), whose trajectories depend on the code drawn per "
                            "sample; bespoke trains solvers on unconditional paths only, so it does not take one")


def run_bespoke(recipe: BespokeRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the learned solver of ``recipe``; returns the artifact directory."""
    from ..jobs import dist_env
    from ..models.loading import load_teacher
    from ..noise import sample_noise
    from ..solvers.learned import save_learned_solver
    from ..training import resolve_device

    if dist_env()[1] > 1:
        raise AccelkitError("bespoke trains a few hundred parameters in one process; run it without torchrun")
    device = resolve_device(recipe.device)
    refuse_qac_teacher(recipe.teacher, load_teacher)
    teacher_hash = content_hash(recipe.teacher)
    if recipe.couplings is not None:
        recorded = Artifact.read(recipe.couplings, "couple").manifest.get("inputs", {}).get("teacher", {})
        if recorded.get("sha256") and recorded["sha256"] != teacher_hash:
            raise AccelkitError(f"{recipe.couplings}: made from the teacher {recorded.get('path')!r}, not from "
                                f"{recipe.teacher!r} (content hashes differ)")
    art, path, state, _ = open_on_rank0(0, output, KIND, recipe, force=force, seeds={"seed": recipe.seed})
    assert art is not None
    try:
        if state == "complete":
            log(f"bespoke: reusing the complete artifact {path}")
            return path
        teacher = load_teacher(recipe.teacher, device=device, dtype="fp32")
        if getattr(teacher, "guidance_scale", 1.0) != 1.0:
            raise AccelkitError(f"{recipe.teacher}: a guided teacher; learned solvers are trained unconditionally")
        teacher.eval().requires_grad_(False)
        counting = CountingTeacher(teacher)
        rows = recipe.train_samples + recipe.val_samples
        start = time.perf_counter()
        cache = path / "checkpoint" / "ground-truth.safetensors"  # a resumed run reads its paths back
        if cache.is_file():
            from safetensors.torch import load_file

            saved = load_file(str(cache))
            paths = GroundTruthPaths(saved["times"], saved["x"].to(device), saved["v"].to(device))
            gt_seconds, gt_evals = float(saved["seconds"]), int(saved["evaluations"])
        else:
            if recipe.couplings is not None:
                paths = couplings_paths(counting, recipe.couplings, rows, device)
            else:
                from ..solvers import solver_grid

                grid = solver_grid(teacher, "euler", 1)
                noise = sample_noise(recipe.seed, range(rows), teacher.sample_shape, device=device)
                log(f"bespoke: computing {rows} ground-truth paths ({recipe.reference} reference)")
                paths = compute_paths(counting, noise, path_times(float(grid[0]), float(grid[-1]),
                                                                  recipe.path_points),
                                      recipe.reference, recipe.reference_nfe, recipe.reference_tol, progress=True)
            gt_seconds, gt_evals = time.perf_counter() - start, counting.evaluations
            from ..artifacts import save_safetensors

            cache.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors(cache, {"times": paths.times, "x": paths.x.cpu(), "v": paths.v.cpu(),
                                     "seconds": torch.tensor(gt_seconds, dtype=F64),
                                     "evaluations": torch.tensor(gt_evals, dtype=torch.int64)})
        train = GroundTruthPaths(paths.times, paths.x[:recipe.train_samples], paths.v[:recipe.train_samples])
        val = GroundTruthPaths(paths.times, paths.x[recipe.train_samples:], paths.v[recipe.train_samples:])
        module, config = initial_solver(recipe.kind, teacher, recipe.nfe, recipe.base, recipe.init, recipe.lipschitz,
                                        val)
        config.update({"teacher": str(Path(recipe.teacher).resolve()), "teacher_sha256": teacher_hash})
        initial_state = {k: v.detach().clone() for k, v in module.state_dict().items()}

        def on_log(step: int, values: dict[str, float]) -> None:
            art.progress = {"step": step, "steps": recipe.loop.steps, "loss": values.get("loss")}

        start = time.perf_counter()
        trainer = fit_solver(module, recipe.kind, teacher, train, val, recipe.loop, recipe.batch_size, recipe.seed,
                             path / "checkpoint", device, on_log)
        train_seconds = time.perf_counter() - start
        teacher, val = teacher.cpu(), _cpu(val)
        solver, trained_rmse, initial_rmse, kept_start = keep_better(trainer.model.solver.cpu(), initial_state,
                                                                     teacher, val)
        final = min(trained_rmse, initial_rmse)
        if kept_start:
            log(f"bespoke: training raised the held-out RMSE ({initial_rmse:.4g} -> {trained_rmse:.4g}); keeping the "
                "starting solver")
        standard = {s: standard_rmse(teacher, val, s, recipe.nfe) for s in STANDARD_SOLVERS if _takes(s, recipe.nfe)}
        evals_per_step = recipe.nfe * min(recipe.batch_size, recipe.train_samples)
        summary = {
            "kind": recipe.kind, "base": config.get("base"), "init": config.get("init"), "nfe": recipe.nfe,
            "parameters": config["parameters"], "val_rmse": final, "val_rmse_initial": initial_rmse,
            "val_rmse_trained": trained_rmse, "kept": "initial" if kept_start else "trained",
            "val_rmse_standard": standard, "best_standard": min(standard, key=lambda s: standard[s]),
            "ratio_to_best_standard": final / min(standard.values()) if standard else None,
            "steps": trainer.step, "final_loss": trainer.history[-1].get("loss") if trainer.history else None,
            "cost": {"ground_truth_seconds": round(gt_seconds, 3), "ground_truth_teacher_evaluations": gt_evals,
                     "training_seconds_last_run": round(train_seconds, 3),
                     "training_teacher_evaluations": trainer.step * evals_per_step},
            "solver": solver.describe(),
        }
        save_learned_solver(path, solver, config, art.write_with)
        art.write_json("history.json", trainer.history)
        art.progress = {"step": trainer.step, "steps": recipe.loop.steps}
        art.complete(summary)
        log(f"bespoke: held-out RMSE {final:.4g} at NFE {recipe.nfe} (start {initial_rmse:.4g}; best standard "
            f"{summary['best_standard']} {min(standard.values()):.4g})")
        shutil.rmtree(path / "checkpoint", ignore_errors=True)
        return path
    finally:
        art.close()


def _cpu(p: GroundTruthPaths) -> GroundTruthPaths:
    return GroundTruthPaths(p.times, p.x.cpu(), p.v.cpu())


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, BespokeRecipe)
    return run_bespoke(recipe, output, force)


register_stage(KIND, BespokeRecipe, _run)

__all__ = ["BespokeRecipe", "run_bespoke", "fit_solver", "keep_better", "initial_solver", "compute_paths",
           "GroundTruthPaths", "path_times", "KIND", "STANDARD_SOLVERS"]
