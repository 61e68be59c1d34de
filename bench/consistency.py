"""Consistency students (cd, pcm, ect, sct) against the teacher's best solver and against reflow / direct-distill
students with the same training budget, on a digits (8x8) or 2-D flow teacher.

A flow-matching teacher is trained on ``--data`` (digits: a SmallUNet on scikit-learn's digits; a 2-D set: an MLP);
from it, couplings (dpm++2m at 32 NFE) for
training and a held-out set (another seed) for evaluation. Students, each with the same optimizer steps and batch:

* ``cd`` (couplings' samples as data, EMA target), ``pcm`` (4 phases), ``ect`` and ``sct`` (tuned on the digits
  themselves), each sampled with the sampler it records (consistency / tcd multistep, or one Euler jump per phase);
* baselines: a 1-rectified-flow student (euler) and a direct-distilled 2-step student (euler) on the same couplings.

(``lcm`` needs a class- or text-conditional teacher; the digits teacher is unconditional, so it is not in this table.)

Every model is measured by ``accelkit eval`` on the held-out pairs at 1, 2 and 4 NFE: RMSE to the teacher's ODE
endpoint and the distance to the data (digits: the Frechet distance on the shipped digits classifier's features;
2-D: sliced W2); the teacher with the best of
euler, heun, dpm++2m and unipc at each NFE is the baseline (ratio = model / teacher's best, lower is better).
Training steps per second come from the stages' manifests. Table on stderr, JSON to --json FILE.

    python bench/consistency.py [--data digits|moons|...] [--teacher-steps 1500] [--steps 400] [--pairs 4000]
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
NFES = (1, 2, 4)
#: name -> (command and its options, the solver it is evaluated with, the NFEs it is made for)
STUDENTS = {
    "cd": (["consistency", "{pairs}", "--method", "cd"], "consistency", NFES),
    "pcm-4": (["consistency", "{pairs}", "--method", "pcm", "--phases", "4"], "euler", (4,)),
    "ect": (["consistency", "{teacher}", "--method", "ect", "--data", "{data}"], "tcd", NFES),
    "sct": (["consistency", "{teacher}", "--method", "sct", "--data", "{data}"], "tcd", NFES),
    "reflow": (["reflow", "{pairs}", "--method", "rectified-flow"], "euler", NFES),
    "direct-2": (["distill", "{pairs}", "--method", "direct", "--nfe", "2"], "euler", (2,)),
}


def accelkit(*args: str) -> str:
    """Run one accelkit command; its stdout (an artifact path or JSON)."""
    proc = subprocess.run([sys.executable, "-m", "accelkit", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"accelkit {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def evaluate(models: list[str], solvers: str, reference: str, n: int, device: str, data: str) -> list[dict]:
    rows = json.loads(accelkit("eval", *models, "--solver", solvers, "--nfe", ",".join(map(str, NFES)),
                               "--reference", reference, "-n", n, "--device", device, "--data", data, "--json"))
    for r in rows:  # one distance to the data: the Frechet distance on images, sliced W2 on 2-D points
        r["distance"] = r.get("frechet") if r.get("frechet") is not None else r.get("sliced_w2")
    return rows


def write(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="digits, fashion-mnist or a 2-D set (moons, checkerboard, ...)")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of every student")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--students", default=",".join(STUDENTS), help="comma-separated subset of " + ",".join(STUDENTS))
    ap.add_argument("--workdir", default="bench/work-consistency")
    ap.add_argument("--json", default="bench/results/consistency.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = Path(args.workdir)
    start = time.time()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {gpu}", "settings": vars(args),
                 "models": {}}
    teacher = accelkit("train", "--data", args.data, "--objective", "flow", "--steps", args.teacher_steps,
                       "-o", w / "teacher")
    couple = ["--solver", "dpm++2m", "--nfe", 32, "--micro-batch", 256, "--device", device]
    pairs = accelkit("couple", teacher, "-n", args.pairs, *couple, "--seed", 1, "-o", w / "pairs")
    held = accelkit("couple", teacher, "-n", args.eval_n, *couple, "--seed", 2, "-o", w / "held")
    base = evaluate([teacher], SOLVERS, held, args.eval_n, device, args.data)
    best = {k: min((r for r in base if r["nfe"] == k), key=lambda r: r["rmse"]) for k in NFES}
    out["teacher_best"] = best
    rows: list[tuple] = []
    for name in args.students.split(","):
        command, solver, nfes = STUDENTS[name]
        command = [c.format(pairs=pairs, teacher=teacher, data=args.data) for c in command]
        began = time.time()
        path = accelkit(*command, "--steps", args.steps, "--batch-size", args.batch_size, "--device", device,
                        "-o", w / name)
        wall = time.time() - began
        s = json.loads((Path(path) / "manifest.json").read_text()).get("summary", {})
        rate = s["steps"] / s["seconds_last_run"] if s.get("seconds_last_run") else float("nan")
        got = [r for r in evaluate([path], solver, held, args.eval_n, device, args.data) if r["nfe"] in nfes]
        out["models"][name] = {"solver": solver, "steps_per_s": rate, "wall_s": wall, "rows": got}
        for r in got:
            b = best[r["nfe"]]
            rows.append((name, solver, r["nfe"], r["rmse"], b["rmse"], r["distance"] or float("nan"),
                         b["distance"] or float("nan"), rate, wall, b["solver"]))
        write(args.json, out)  # after every student, so a cut-off run keeps what it measured
    out["seconds"] = time.time() - start
    from rich.console import Console
    from rich.table import Table

    dist = "FD" if args.data in ("digits", "fashion-mnist") else "SW2"
    t = Table(title=f"students after {args.steps} steps vs the teacher's best solver ({args.data}, held-out pairs)")
    for c in ("student", "sampler", "NFE", "RMSE", "teacher best", "ratio", dist, f"teacher {dist}", "steps/s",
              "wall s", "best solver"):
        t.add_column(c)
    for name, solver, k, rmse, brmse, fd, bfd, rate, wall, bs in rows:
        t.add_row(name, solver, str(k), f"{rmse:.4f}", f"{brmse:.4f}", f"{rmse / brmse:.3f}", f"{fd:.3g}",
                  f"{bfd:.3g}", f"{rate:.1f}", f"{wall:.0f}", bs)
    Console(stderr=True).print(t)
    write(args.json, out)
    print(args.json)


if __name__ == "__main__":
    main()
