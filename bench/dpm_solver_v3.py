"""DPM-Solver-v3 benchmark: RMSE to the teacher's own ODE endpoint at 5-10 NFE against DPM-Solver++, UniPC and the
learned bespoke / BNS solvers, on the same teacher and the same held-out noise.

Teacher: a DDPM (eps, linear betas) SmallUNet on scikit-learn's 8x8 digits trained here (``--teacher-steps``), or
``--teacher``. DPM-Solver-v3 runs on the statistics of ``accelkit solver-stats`` (``--stats-samples`` trajectories,
``--stats-points`` log-SNR values); bespoke (RK2 / RK1 scale-time) and BNS solvers are trained by ``accelkit bespoke``
at ``--learned-nfes`` with a small budget (``--learned-steps`` optimizer steps on ``--learned-paths`` paths).
Ground truth: heun at 401 NFE from ``--test`` other noises (seed 1). Costs: the statistics' and each learned solver's
seconds and teacher evaluations.

    python bench/dpm_solver_v3.py --out bench/results/dpm_solver_v3.json

Tables go to stderr; the JSON (``--out``) holds every number and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.table import Table  # noqa: E402

from accelkit.artifacts import read_manifest  # noqa: E402
from accelkit.console import err  # noqa: E402
from accelkit.metrics import rmse  # noqa: E402
from accelkit.models.loading import load_teacher  # noqa: E402
from accelkit.noise import sample_noise  # noqa: E402
from accelkit.solvers import get_solver, solve  # noqa: E402

STANDARD = ("dpm++2m", "dpm++3m", "unipc", "unipc2", "ipndm")
NFES = (5, 6, 8, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher")
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--stats-samples", type=int, default=256)
    ap.add_argument("--stats-points", type=int, default=60)
    ap.add_argument("--learned-nfes", default="6,8")
    ap.add_argument("--learned-kinds", default="bespoke,bns")
    ap.add_argument("--learned-steps", type=int, default=150)
    ap.add_argument("--learned-paths", type=int, default=256)
    ap.add_argument("--test", type=int, default=256)
    ap.add_argument("--out", default="bench/results/dpm_solver_v3.json")
    args = ap.parse_args()
    from accelkit.stages.bespoke import BespokeRecipe, run_bespoke
    from accelkit.stages.solver_stats import SolverStatsRecipe, run_solver_stats
    from accelkit.stages.train import TrainRecipe, run_train

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = args.teacher
        if path is None:
            path = str(run_train(TrainRecipe(
                data="digits", objective="eps", batch_size=64, network={"base": 32, "mults": [1, 2]}, eval_samples=0,
                device="cpu", loop={"steps": args.teacher_steps, "lr": 2e-3, "warmup_steps": 50,
                                    "lr_schedule": "cosine", "checkpoint_every": 0}), root / "train"))
        stats = run_solver_stats(SolverStatsRecipe(teacher=path, samples=args.stats_samples, points=args.stats_points,
                                                   val_samples=0, device="cpu"), root / "stats")
        costs = {"dpm-solver-v3 statistics": read_manifest(stats)["summary"]["cost"]}
        learned: dict[tuple[str, int], Path] = {}
        for kind in [k for k in args.learned_kinds.split(",") if k]:
            for nfe in [int(v) for v in args.learned_nfes.split(",") if v]:
                out = run_bespoke(BespokeRecipe(
                    teacher=path, nfe=nfe, kind=kind, train_samples=args.learned_paths, val_samples=64,
                    path_points=32, reference="dpm++2m", reference_nfe=8, batch_size=64, device="cpu",
                    loop={"steps": args.learned_steps, "lr": 3e-2, "warmup_steps": 10, "lr_schedule": "cosine",
                          "ema_rates": [], "grad_clip": None, "checkpoint_every": 0}), root / f"{kind}-{nfe}")
                learned[(kind, nfe)] = out
                costs[f"{kind} NFE {nfe}"] = read_manifest(out)["summary"]["cost"]
        teacher = load_teacher(path)
        teacher.eval().requires_grad_(False)
        x = teacher.prior_sample(sample_noise(1, range(args.test), teacher.sample_shape))
        truth = solve(teacher, x, "heun", 401)
        errors: dict[str, dict[int, float]] = {}
        with torch.no_grad():
            for s in STANDARD:
                errors[s] = {n: rmse(solve(teacher, x, s, n), truth) for n in NFES}
            v3 = get_solver(str(stats))
            errors["dpm-solver-v3"] = {n: rmse(solve(teacher, x, v3, n), truth) for n in NFES}
            for (kind, nfe), out in learned.items():
                errors.setdefault(kind, {})[nfe] = rmse(solve(teacher, x, get_solver(str(out)), nfe), truth)
    table = Table(title=f"RMSE to the teacher's ODE endpoint (heun 401 NFE), {args.test} held-out noises")
    table.add_column("solver")
    for n in NFES:
        table.add_column(f"NFE {n}", justify="right")
    for s, row in errors.items():
        table.add_row(s, *[f"{row[n]:.4f}" if n in row else "-" for n in NFES])
    err.print(table)
    result = {"settings": vars(args), "rmse": {s: {str(n): v for n, v in row.items()} for s, row in errors.items()},
              "costs": costs, "seconds": round(time.time() - started, 1),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
