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
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SOLVERS = "euler,heun,dpm++2m,unipc"
NFES = (1, 2, 4, 8)
MEANFLOW = ["--anchor", "teacher", "--set", "shortcut.times=uniform", "--set", "shortcut.interval_share=0.5",
            "--set", "shortcut.adaptive_power=0.5"]


def accelkit(*args: object) -> str:
    proc = subprocess.run([sys.executable, "-m", "accelkit", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"accelkit {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def summary(path: str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text()).get("summary", {})


def evaluate(model: str, solvers: str, reference: str, n: int, device: str) -> list[dict]:
    return json.loads(accelkit("eval", model, "--solver", solvers, "--nfe", ",".join(map(str, NFES)),
                               "--reference", reference, "-n", n, "--device", device, "--json"))


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


def write(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


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
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {gpu}", "settings": vars(args),
                 "models": {}}
    teacher = accelkit("train", "--data", args.data, "--objective", "flow", "--steps", args.teacher_steps,
                       "--device", device, "-o", w / "teacher")
    couple = ["--solver", "dpm++2m", "--nfe", 32, "--micro-batch", 256, "--device", device]
    pairs = accelkit("couple", teacher, "-n", args.pairs, *couple, "--seed", 1, "-o", w / "pairs")
    held = accelkit("couple", teacher, "-n", args.eval_n, *couple, "--seed", 2, "-o", w / "held")
    metric = "frechet" if args.data == "digits" else "sliced_w2"
    base = evaluate(teacher, SOLVERS, held, args.eval_n, device)
    best = {k: min((r for r in base if r["nfe"] == k), key=lambda r: r["rmse"]) for k in NFES}
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
        rate = s["steps"] / s["seconds_last_run"] if s.get("seconds_last_run") else float("nan")
        got = evaluate(path, solver, held, args.eval_n, device)
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
