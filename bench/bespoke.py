"""Learned-solver benchmark: bespoke (scale-time RK2 / RK1) and BNS solvers against every standard solver, on the same
teacher and the same held-out noise, at NFE 4, 6, 8, 10, 16.

Teacher: the analytic 8-Gaussian ring under the linear (flow) schedule (exact velocity: no network error).
Ground truth: scipy's DOP853 (rtol = atol = 1e-8) paths stored at 64 times; the learned solvers train on
``--train`` paths and every solver is measured on ``--test`` other noises (seeded): RMSE and PSNR of the endpoint
against the ODE's, and the sliced Wasserstein-2 distance of the samples to exact draws from the mixture. Training
cost: wall seconds and teacher evaluations (optimizer steps x batch x NFE, each with its backward pass).

    python bench/bespoke.py --out bench/results/bespoke.json

Tables go to stderr; the JSON (``--out``) holds every number and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.table import Table  # noqa: E402

from accelkit.console import err  # noqa: E402
from accelkit.metrics import psnr, rmse, sliced_wasserstein  # noqa: E402
from accelkit.models.analytic import gaussian_mixture_2d  # noqa: E402
from accelkit.noise import sample_noise  # noqa: E402
from accelkit.schedules import LinearSchedule  # noqa: E402
from accelkit.solvers import solve  # noqa: E402
from accelkit.stages.bespoke import (  # noqa: E402
    STANDARD_SOLVERS,
    GroundTruthPaths,
    compute_paths,
    default_loop,
    fit_solver,
    initial_solver,
    keep_better,
    path_times,
)

NFES = (4, 6, 8, 10, 16)
VAL = 256


def takes(solver: str, nfe: int) -> bool:
    return not (solver in ("heun", "midpoint") and nfe < 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--train", type=int, default=1024, help="training paths")
    ap.add_argument("--test", type=int, default=1024, help="held-out noises")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the stage's)")
    ap.add_argument("--nfe", type=str, default=",".join(map(str, NFES)))
    args = ap.parse_args()
    torch.manual_seed(0)
    nfes = [int(v) for v in args.nfe.split(",")]

    teacher = gaussian_mixture_2d(LinearSchedule())
    start = time.perf_counter()
    noise = sample_noise(0, range(args.train + VAL + args.test), (2,))
    paths = compute_paths(teacher, noise, path_times(1.0, 0.0, 64), "adaptive", tol=1e-8)
    gt_seconds = time.perf_counter() - start
    a, b = args.train, args.train + VAL
    train = GroundTruthPaths(paths.times, paths.x[:a], paths.v[:a])
    # the stage's validation paths (its choices: BNS's starting solver, keeping the start), apart from the test ones
    train_val = GroundTruthPaths(paths.times, paths.x[a:b], paths.v[a:b])
    test = GroundTruthPaths(paths.times, paths.x[b:], paths.v[b:])
    data = teacher.sample_data(args.test, torch.Generator().manual_seed(7)).float()

    def measure(x: torch.Tensor) -> dict[str, float]:
        return {"rmse": rmse(x, test.endpoint), "psnr": psnr(x, test.endpoint), "sw2": sliced_wasserstein(x, data)}

    results: dict[str, dict[int, dict]] = {}
    with torch.no_grad():
        for s in STANDARD_SOLVERS:
            results[s] = {n: measure(solve(teacher, test.noise_state, s, n)) for n in nfes if takes(s, n)}
    for kind in ("bespoke", "bns"):
        results[kind] = {}
        for n in nfes:
            base = None if kind == "bns" else ("rk2" if n % 2 == 0 else "rk1")
            module, config = initial_solver(kind, teacher, n, base, "best", 1.0, train_val)
            initial_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            loop = default_loop()
            if args.steps:
                loop = loop.model_copy(update={"steps": args.steps})
            loop = loop.model_copy(update={"checkpoint_every": 0})
            batch = 128
            t0 = time.perf_counter()
            trainer = fit_solver(module, kind, teacher, train, None, loop, batch_size=batch, progress=False)
            seconds = time.perf_counter() - t0
            # as the stage does: keep the start if training raised the error on the validation paths
            solver, trained_rmse, start_rmse, kept = keep_better(trainer.model.solver, initial_state, teacher,
                                                                 train_val)
            with torch.no_grad():
                row = measure(solver.sample(teacher, test.noise_state))
            row.update({"kept": "initial" if kept else "trained", "val_rmse_trained": trained_rmse,
                        "val_rmse_initial": start_rmse, "train_seconds": round(seconds, 2),
                        "train_teacher_evaluations": loop.steps * batch * n,
                        "steps": loop.steps, "lr": loop.lr, "parameters": config["parameters"],
                        "base": config.get("base"), "init": config.get("init")})
            results[kind][n] = row
            err.print(f"{kind} NFE {n}: RMSE {row['rmse']:.3e} in {seconds:.1f} s ({row['kept']} kept)")

    best = {n: min(results[s][n]["rmse"] for s in STANDARD_SOLVERS if n in results[s]) for n in nfes}
    for metric, fmt in (("rmse", "{:.2e}"), ("psnr", "{:.1f}"), ("sw2", "{:.3f}")):
        table = Table(title=f"{metric.upper()} against NFE (8-Gaussian ring, linear schedule, {args.test} held-out "
                            "noises)")
        table.add_column("solver")
        for n in nfes:
            table.add_column(f"NFE {n}", justify="right")
        for name, row in results.items():
            table.add_row(name, *(fmt.format(row[n][metric]) if n in row else "-" for n in nfes))
        err.print(table)
    table = Table(title="learned solver RMSE / best standard solver RMSE at the same NFE; training cost")
    table.add_column("solver")
    for n in nfes:
        table.add_column(f"NFE {n}", justify="right")
    for kind in ("bespoke", "bns"):
        table.add_row(kind, *(f"{results[kind][n]['rmse'] / best[n]:.3f}" for n in nfes))
        table.add_row(f"{kind} s / evals", *(f"{results[kind][n]['train_seconds']:.0f} s / "
                                             f"{results[kind][n]['train_teacher_evaluations'] / 1e6:.2f}M"
                                             for n in nfes))
    err.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "settings": {"teacher": "gaussian_mixture_2d(LinearSchedule())", "train": args.train, "val": VAL,
                         "test": args.test,
                         "path_points": 64, "reference": "DOP853 rtol=atol=1e-8", "nfes": nfes,
                         "ground_truth_seconds": round(gt_seconds, 2)},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "results": {k: {str(n): v for n, v in row.items()} for k, row in results.items()},
            "ratio_to_best_standard": {k: {str(n): results[k][n]["rmse"] / best[n] for n in nfes}
                                       for k in ("bespoke", "bns")},
        }, indent=2) + "\n")
        err.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
