"""solver-stats: the empirical model statistics (EMS) of one teacher, for DPM-Solver-v3 (Zheng et al. 2023,
arXiv 2310.13268; :mod:`accelkit.solvers.dpm_solver_v3`).

From ``samples`` seeded noises the teacher's own ODE trajectories are followed through ``points`` values of lambda
(Heun, ``segment_nfe`` evaluations between two of them); at each the statistics l (the Jacobian diagonal of the noise
prediction, Hutchinson's estimate by a vector-Jacobian product), s and b (the least-squares line of df/dlambda on f) are
averaged over the samples (:func:`accelkit.solvers.dpm_solver_v3.compute_statistics`).

The artifact holds ``solver.safetensors`` (lam, l, s, b: a few hundred KB for small images) and ``solver.json`` (kind
``dpm-solver-v3``, order, corrector, the teacher's path and content hash), the files a learned solver has, so
``accelkit sample / eval TEACHER --solver runs/solver-stats-...`` samples with DPM-Solver-v3 at any NFE and grid,
and a solver made for another teacher is refused unless forced. The summary gives, on ``val_samples`` other noises,
the RMSE to the teacher's ODE endpoint (Heun at ``reference_nfe``) of DPM-Solver-v3, DPM-Solver++(2M) and UniPC at
NFE 5, 6, 8 and 10, and the cost in seconds and teacher evaluations.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import Field

from ..artifacts import content_hash, open_on_rank0
from ..console import log
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage
from ..teacher import CountingTeacher

KIND = "solver-stats"
COMPARED = ("dpm++2m", "unipc", "unipc2")
SUMMARY_NFES = (5, 6, 8, 10)


class SolverStatsRecipe(StageRecipe):
    """solver-stats: DPM-Solver-v3's empirical model statistics of one teacher."""

    input_fields = ("teacher",)
    execution_fields = frozenset({"device", "batch_size"})

    teacher: str = Field(description="teacher checkpoint (file, folder or artifact); the statistics are for it only")
    samples: int = Field(256, ge=2, description="trajectories the statistics average over (the paper: 1024-4096)")
    points: int = Field(60, ge=3, le=10_000, description="lambda values the statistics are computed at")
    segment_nfe: int = Field(4, ge=1, description="Heun evaluations between two points of a trajectory")
    order: int = Field(2, ge=1, le=3, description="DPM-Solver-v3's predictor order when sampling")
    corrector: bool = Field(True, description="DPM-Solver-v3's corrector when sampling")
    val_samples: int = Field(64, ge=0, description="held-out noises for the summary's RMSE comparison (0: none)")
    reference_nfe: int = Field(200, ge=2, description="Heun NFE of the summary's ground truth")
    seed: int = Field(0, ge=0, description="seeds the noise (sample i from (seed, i)) and the Hutchinson probes")
    batch_size: int = Field(256, ge=1, description="samples per teacher call")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")


def run_solver_stats(recipe: SolverStatsRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Compute (or reuse) the statistics of ``recipe``; returns the artifact directory."""
    from ..jobs import dist_env
    from ..metrics import rmse
    from ..models.loading import load_teacher
    from ..noise import sample_noise
    from ..sampling import condition_from_options
    from ..solvers import solve
    from ..solvers.dpm_solver_v3 import DPMSolverV3, compute_statistics
    from ..solvers.learned import CONFIG_FILE, SOLVER_FILE
    from ..training import resolve_device

    if dist_env()[1] > 1:
        raise AccelkitError("solver-stats runs in one process; run it without torchrun")
    device = resolve_device(recipe.device)
    teacher_hash = content_hash(recipe.teacher)
    art, path, state, _ = open_on_rank0(0, output, KIND, recipe, force=force, seeds={"seed": recipe.seed})
    assert art is not None
    try:
        if state == "complete":
            log(f"solver-stats: reusing the complete artifact {path}")
            return path
        teacher = load_teacher(recipe.teacher, device=device, dtype="fp32")
        if getattr(teacher, "guidance_scale", 1.0) != 1.0:
            raise AccelkitError(f"{recipe.teacher}: a guided teacher; statistics are computed unguided")
        teacher.eval().requires_grad_(False)
        counting = CountingTeacher(teacher)
        cond_fn = condition_from_options(teacher, recipe.teacher, None, None)  # class labels cycled, as eval does
        n, k = recipe.samples, recipe.val_samples
        cond = cond_fn(list(range(n + k))) if cond_fn is not None else None
        cond = cond.map(lambda v: v.to(device)) if cond is not None else None
        noise = sample_noise(recipe.seed, range(n + k), teacher.sample_shape, device=device)
        log(f"solver-stats: {n} trajectories through {recipe.points} log-SNR points")
        start = time.perf_counter()
        torch.manual_seed(recipe.seed)
        stats = compute_statistics(counting, noise[:n], recipe.points, recipe.segment_nfe,
                                   cond.index(slice(0, n)) if cond is not None else None, recipe.batch_size,
                                   seed=recipe.seed)
        seconds, evaluations = time.perf_counter() - start, counting.evaluations
        if not all(bool(torch.isfinite(v).all()) for v in stats.tensors().values()):
            raise AccelkitError(f"{recipe.teacher}: the statistics are not finite (NaN or inf from the teacher); "
                                "nothing was written")
        config = {"kind": "dpm-solver-v3", "order": recipe.order, "corrector": recipe.corrector,
                  "points": recipe.points, "samples": n, "sample_shape": list(teacher.sample_shape),
                  "teacher": str(Path(recipe.teacher).resolve()), "teacher_sha256": teacher_hash}
        summary = {"points": recipe.points, "samples": n, "lambda_range": [float(stats.lam[0]), float(stats.lam[-1])],
                   "mean_l": float(stats.l.mean()), "mean_abs_s": float(stats.s.abs().mean()),
                   "mean_abs_b": float(stats.b.abs().mean()),
                   "cost": {"seconds": round(seconds, 3), "teacher_evaluations": evaluations}}
        if k:
            solver = DPMSolverV3(stats, recipe.order, recipe.corrector)
            vc = cond.index(slice(n, n + k)) if cond is not None else None
            x = teacher.prior_sample(noise[n:])
            ref = solve(teacher, x, "heun", recipe.reference_nfe, cond=vc)
            table = {}
            for nfe in SUMMARY_NFES:
                row = {"dpm-solver-v3": rmse(solve(teacher, x, solver, nfe, cond=vc), ref)}
                row.update({s: rmse(solve(teacher, x, s, nfe, cond=vc), ref) for s in COMPARED})
                table[str(nfe)] = row
                best = min(COMPARED, key=lambda s: row[s])
                log(f"solver-stats: NFE {nfe}: RMSE DPM-Solver-v3 {row['dpm-solver-v3']:.4g}, best other "
                    f"{best} {row[best]:.4g}")
            summary["val_rmse"] = table
        from ..artifacts import save_safetensors

        tensors = {k_: v.contiguous() for k_, v in stats.tensors().items()}
        art.write_with(SOLVER_FILE, lambda tmp: save_safetensors(tmp, tensors, {"format": "accelkit.solver-stats"}))
        art.write_with(CONFIG_FILE, lambda tmp: Path(tmp).write_text(_json(config)))
        art.complete(summary)
        return path
    finally:
        art.close()


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, SolverStatsRecipe)
    return run_solver_stats(recipe, output, force)


register_stage(KIND, SolverStatsRecipe, _run)

__all__ = ["SolverStatsRecipe", "run_solver_stats", "KIND"]
