"""Parallel sampling benchmark: Picard (ParaDiGMS) and Parareal (SRDS) against the sequential solver they wrap.

For each grid of N steps (25, 50, 100, 1000) and batch size (1 and 8 by default), on a small flow teacher trained
here (two moons, an MLP) or any ``--teacher``:

* the sequential base solver (euler): N rounds, N NFE, wall clock;
* picard (window ``--window``, tolerance ``--picard-tol``) and parareal (``--blocks`` default ~sqrt(N), tolerance
  ``--parareal-tol``): sequential rounds, NFE per sample, wall clock, and the RMSE of their samples to the sequential
  sample on the same grid (what the tolerance gives away) and to the ground truth (heun at 2000 NFE);
* the honest comparison: the cheapest sequential few-step solver (dpm++2m, unipc, heun at 2-200 NFE) whose RMSE to
  the ground truth is no worse than the parallel sample's, with its NFE (= rounds) and wall clock.

    python bench/parallel.py --out bench/results/parallel.json [--device cuda] [--teacher PATH]

Wall clock pays only where the hardware has spare parallel compute for the window's batch (a GPU at small batch);
on a CPU thread the extra NFE cost time. Tables go to stderr; the JSON holds every number and the settings.
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

from accelkit.console import err  # noqa: E402
from accelkit.metrics import rmse  # noqa: E402
from accelkit.models.loading import load_teacher  # noqa: E402
from accelkit.noise import sample_noise  # noqa: E402
from accelkit.solvers import solve  # noqa: E402
from accelkit.solvers.parallel import parallel_reports, parallel_spec  # noqa: E402

FEW_STEP = ("dpm++2m", "unipc", "heun")
FEW_NFES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 100, 128, 160, 200)


def timed(teacher, x, solver, nfe, device, repeats: int):
    """(sample, best wall clock of ``repeats`` runs, the last run's parallel report or None)."""
    best, out, report = float("inf"), None, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with parallel_reports() as reports:
            out = solve(teacher, x, solver, nfe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        report = reports[-1] if reports else None
    return out, best, report


def train_teacher(root: Path, steps: int) -> Path:
    from accelkit.stages.train import TrainRecipe, run_train

    return run_train(TrainRecipe(data="moons", objective="flow", batch_size=256, network={"hidden": 128, "depth": 3},
                                 eval_samples=0, device="cpu",
                                 loop={"steps": steps, "lr": 2e-3, "warmup_steps": 20, "checkpoint_every": 0}),
                     root / "train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="teacher checkpoint (default: a moons flow MLP trained here)")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--steps", default="25,50,100,1000")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--picard-tol", type=float, default=0.1)
    ap.add_argument("--parareal-tol", type=float, default=5e-3)
    ap.add_argument("--base", default="euler", choices=("euler", "ddim"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/parallel.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    steps_list = [int(v) for v in args.steps.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.teacher or str(train_teacher(Path(tmp), args.teacher_steps))
        teacher = load_teacher(path, device=str(device))
        teacher.eval().requires_grad_(False)
        rows = []
        for bsz in batches:
            x = teacher.prior_sample(sample_noise(0, range(bsz), teacher.sample_shape, device=device))
            truth = solve(teacher, x, "heun", 2001)
            few = {(s, k): timed(teacher, x, s, k, device, args.repeats) for s in FEW_STEP for k in FEW_NFES
                   if not (s == "heun" and k < 3)}
            few_err = {key: rmse(v[0], truth) for key, v in few.items()}
            for n in steps_list:
                seq, seq_s, _ = timed(teacher, x, args.base, n, device, args.repeats)
                seq_err = rmse(seq, truth)
                rows.append({"batch": bsz, "steps": n, "method": args.base, "rounds": n, "nfe": n, "seconds": seq_s,
                             "rmse_to_sequential": 0.0, "rmse_to_truth": seq_err})
                specs = [parallel_spec("picard", args.base, window=args.window, tol=args.picard_tol),
                         parallel_spec("parareal", args.base, blocks=args.blocks, tol=args.parareal_tol)]
                for spec in specs:
                    y, secs, rep = timed(teacher, x, spec, n, device, args.repeats)
                    err_truth = rmse(y, truth)
                    match = [(k, s) for (s, k), e in few_err.items() if e <= err_truth]
                    cheapest = min(match) if match else None
                    rows.append({"batch": bsz, "steps": n, "method": spec, "rounds": rep.rounds, "nfe": rep.nfe,
                                 "seconds": secs, "rmse_to_sequential": rmse(y, seq), "rmse_to_truth": err_truth,
                                 "equal_quality_solver": None if cheapest is None else
                                 {"solver": cheapest[1], "nfe": cheapest[0],
                                  "seconds": few[(cheapest[1], cheapest[0])][1]}})
        table = Table(title=f"parallel sampling ({args.base} base, {device.type}); ground truth heun 2001 NFE")
        for col in ("batch", "N", "method", "rounds", "NFE/sample", "wall s", "x seq. wall", "RMSE to seq.",
                    "RMSE to truth", "equal-quality sequential (NFE, s)"):
            table.add_column(col, justify="left" if col in ("method",) else "right")
        seq_time = {(r["batch"], r["steps"]): r["seconds"] for r in rows if r["method"] == args.base}
        for r in rows:
            eq = r.get("equal_quality_solver")
            table.add_row(str(r["batch"]), str(r["steps"]), r["method"], str(r["rounds"]), f"{r['nfe']:.1f}",
                          f"{r['seconds']:.4f}", f"{seq_time[(r['batch'], r['steps'])] / r['seconds']:.2f}",
                          f"{r['rmse_to_sequential']:.2e}", f"{r['rmse_to_truth']:.2e}",
                          "-" if eq is None else f"{eq['solver']} {eq['nfe']}, {eq['seconds']:.4f}")
        err.print(table)
    result = {"settings": vars(args), "teacher": args.teacher or f"moons flow MLP, {args.teacher_steps} steps",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "threads": torch.get_num_threads()},
              "seconds": round(time.time() - started, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
