"""Shortcut-model and MeanFlow students against their teacher's best solver and a reflow student (same budget).

A flow-matching teacher is trained on scikit-learn's digits (8x8; ``--data moons`` for a 2-D one), couplings are drawn
from its ODE (dpm++2m at 32 NFE) for training and a held-out set (another seed) for evaluation. Three students start
from the teacher's weights with the same optimizer steps and batch size, all trained on the couplings:

* ``shortcut`` (Frans et al. 2024): step size as input, anchored to the teacher's velocity, sampled with N jumps;
* ``meanflow`` (Geng et al. 2025): the interval as input, the MeanFlow identity by torch.func.jvp, sampled with N
  average-velocity jumps (the distillation settings of tests/test_shortcut.py);
* ``reflow`` (rectified flow, Liu et al. 2022), sampled with Euler: the baseline student.

``accelkit eval`` measures every model on the held-out pairs at 1, 2, 4 and 8 NFE: RMSE to the teacher's ODE endpoint,
and the Frechet distance to digits on the shipped digits features (sliced W2 for 2-D data); the teacher's best of
euler, heun, dpm++2m and unipc at each NFE is the baseline (ratio = student / teacher's best). Training steps per
second come from the stages' manifests; the JVP's cost is the time of one torch.func.jvp of the MeanFlow student's
average velocity over one plain forward, on a training batch. Table on stderr, JSON to --json FILE.

    python bench/shortcut.py [--data digits] [--teacher-steps 1500] [--steps 600] [--pairs 4000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import (
    STANDARD_SOLVERS,
    accelkit,
    couplings,
    distance_key,
    evaluate,
    machine,
    steps_per_second,
    summary,
    teacher_best,
    train_teacher,
    write,
)

NFES = (1, 2, 4, 8)
MEANFLOW = ["--anchor", "teacher", "--set", "shortcut.times=uniform", "--set", "shortcut.interval_share=0.5",
            "--set", "shortcut.adaptive_power=0.5"]


def jvp_cost(student: str, batch: int, repeats: int = 20) -> float:
    """Seconds of one torch.func.jvp of u(z, r, t) over one plain forward of the same function."""
    import torch

    from accelkit.meanflow import average_velocity_derivative
    from accelkit.models.loading import load_teacher
    from accelkit.stages.shortcut import average_velocity_fn

    model = load_teacher(student)
    u = average_velocity_fn(model, None)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *model.sample_shape, generator=g)
    r, t = torch.full((batch,), 0.2, dtype=torch.float64), torch.full((batch,), 0.8, dtype=torch.float64)

    def timed(fn) -> float:
        fn()
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - began) / repeats

    with torch.no_grad():
        plain = timed(lambda: u(z, r, t))
    jvp = timed(lambda: average_velocity_derivative(u, z, r, t, torch.ones_like(z), "jvp"))
    return jvp / plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of every student")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--workdir", default="bench/work-shortcut")
    ap.add_argument("--json", default="bench/results/shortcut.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = Path(args.workdir) / args.data
    start = time.time()
    device, described = machine()
    out: dict = {"machine": described, "settings": vars(args), "models": {}}
    teacher = train_teacher(args.data, args.teacher_steps, w / "teacher", device=device)
    pairs, held = couplings(teacher, args.pairs, args.eval_n, device, w)
    metric = distance_key(args.data)
    best = teacher_best(teacher, held, args.eval_n, device, NFES, solvers=STANDARD_SOLVERS)
    out["teacher_best"] = best
    common = ["--steps", args.steps, "--batch-size", args.batch_size, "--device", device]
    students = {
        "shortcut": (["shortcut", pairs, "--method", "shortcut", "--anchor", "teacher"], "shortcut"),
        "meanflow": (["shortcut", pairs, "--method", "meanflow", *MEANFLOW], "meanflow"),
        "reflow": (["reflow", pairs, "--method", "rectified-flow", "--set", "reflow.eval_samples=0"], "euler"),
    }
    rows = []
    for name, (cmd, solver) in students.items():
        began = time.time()
        path = accelkit(*cmd, *common, "-o", w / name)
        wall = time.time() - began
        s = summary(path)
        rate = steps_per_second(path)
        got = evaluate([path], held, args.eval_n, device, NFES, solver)
        entry = {"steps_per_s": rate, "wall_s": wall, "rows": got}
        if name == "meanflow":
            entry["jvp_over_forward"] = jvp_cost(path, args.batch_size)
            entry["derivative"] = s.get("derivative")
        out["models"][name] = entry
        for r in got:
            b = best[r["nfe"]]
            rows.append((name, r["nfe"], r["rmse"], b["rmse"], r.get(metric), b.get(metric), rate, b["solver"]))
        write(args.json, out)
    out["seconds"] = time.time() - start
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.data}: students after {args.steps} steps vs the teacher's best solver (held-out pairs)")
    for c in ("student", "NFE", "RMSE", "teacher best", "ratio", metric, f"teacher {metric}", "steps/s",
              "best solver"):
        t.add_column(c)
    for name, k, rmse, brmse, m, bm, rate, bs in rows:
        t.add_row(name, str(k), f"{rmse:.4f}", f"{brmse:.4f}", f"{rmse / brmse:.3f}",
                  f"{m:.3g}" if m is not None else "-", f"{bm:.3g}" if bm is not None else "-", f"{rate:.1f}", bs)
    Console(stderr=True).print(t)
    if "meanflow" in out["models"]:
        ratio = out["models"]["meanflow"]["jvp_over_forward"]
        Console(stderr=True).print(f"MeanFlow JVP / plain forward: {ratio:.2f}x")
    write(args.json, out)
    print(args.json)


if __name__ == "__main__":
    main()
