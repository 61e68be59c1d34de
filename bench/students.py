"""Students after the same training budget against their teacher's best solver, on the digits (8x8) teachers.

Three teachers are trained on scikit-learn's digits: a flow-matching one (linear schedule) and two eps ones, on
DDPM's linear betas (vp-linear, alpha at the last step 0.0064) and on Stable Diffusion's scaled-linear betas
(vp-scaled-linear, alpha at the last step 0.068). From each, couplings (dpm++2m at 32 NFE) for training and a
held-out set (another seed) for evaluation. Students, each with the same optimizer steps and batch size:

* rectified-flow (reflow on the flow teacher), direct distillation at 1, 2 and 4 steps (flow teacher);
* rectified-diffusion (reflow on each eps teacher, which stays an eps model; loss on the x0 estimate, sampled with
  DDIM).

Every model is measured by ``accelkit eval`` on the held-out pairs at 1, 2 and 4 NFE: RMSE to the teacher's ODE
endpoint and the Frechet distance to digits on the shipped digits classifier's features; the teacher with the best of
euler, heun, dpm++2m and unipc at each NFE is the baseline (ratio = student / teacher's best, lower is better).
Training steps per second come from the stages' manifests. Table on stderr, JSON to --json FILE.

    python bench/students.py [--teacher-steps 3000] [--steps 1500] [--pairs 8000] [--workdir bench/work-students]
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
#: (teacher objective, its schedule, its students)
TEACHERS = (("flow", "linear", ("rectified-flow", "direct-1", "direct-2", "direct-4")),
            ("eps", "vp-linear", ("rectified-diffusion",)),
            ("eps-sl", "vp-scaled-linear", ("rectified-diffusion",)))
NFES = (1, 2, 4)


def accelkit(*args: str) -> str:
    """Run one accelkit command; its stdout (an artifact path or JSON)."""
    proc = subprocess.run([sys.executable, "-m", "accelkit", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"accelkit {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def summary(path: str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text()).get("summary", {})


def evaluate(models: list[str], solvers: str, reference: str, n: int, device: str) -> list[dict]:
    return json.loads(accelkit("eval", *models, "--solver", solvers, "--nfe", ",".join(map(str, NFES)),
                               "--reference", reference, "-n", n, "--device", device, "--json"))


def write(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps of every student")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--workdir", default="bench/work-students")
    ap.add_argument("--teachers", default="linear,vp-linear,vp-scaled-linear",
                    help="the teachers' schedules to run (comma-separated)")
    ap.add_argument("--json", default="bench/results/students.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = Path(args.workdir)
    start = time.time()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # every stage runs there
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {gpu}", "settings": vars(args),
                 "models": {}}
    rows: list[tuple] = []
    for objective, schedule, students in TEACHERS:
        if schedule not in args.teachers.split(","):
            continue
        teacher = accelkit("train", "--data", "digits", "--objective", objective.split("-")[0], "--steps",
                           args.teacher_steps, "--set", f"train.schedule={schedule}", "-o", w / f"teacher-{objective}")
        couple = ["--solver", "dpm++2m", "--nfe", 32, "--micro-batch", 256, "--device", device]
        pairs = accelkit("couple", teacher, "-n", args.pairs, *couple, "--seed", 1, "-o", w / f"pairs-{objective}")
        held = accelkit("couple", teacher, "-n", args.eval_n, *couple, "--seed", 2, "-o", w / f"held-{objective}")
        base = evaluate([teacher], SOLVERS, held, args.eval_n, device)
        best = {k: min((r for r in base if r["nfe"] == k), key=lambda r: r["rmse"]) for k in NFES}
        for name in students:
            common = ["--steps", args.steps, "--batch-size", args.batch_size, "-o", w / f"{objective}-{name}"]
            began = time.time()
            if name.startswith("direct"):
                k = int(name.split("-")[1])
                path = accelkit("distill", pairs, "--method", "direct", "--nfe", k, *common)
            else:
                path = accelkit("reflow", pairs, "--method", name, *common)
            wall = time.time() - began
            s = summary(path)
            rate = s["steps"] / s["seconds_last_run"] if s.get("seconds_last_run") else float("nan")
            solver = "euler" if objective == "flow" else "ddim"
            got = evaluate([path], solver, held, args.eval_n, device)
            out["models"][f"{name} ({schedule})"] = {"teacher": objective, "schedule": schedule, "steps_per_s": rate,
                                                     "wall_s": wall, "rows": got,
                                                     "teacher_best": {k: best[k] for k in NFES}}
            for r in got:
                if name.startswith("direct") and r["nfe"] != int(name.split("-")[1]):
                    continue  # a direct student is made for its own step count
                b = best[r["nfe"]]
                rows.append((f"{name} ({schedule})", r["nfe"], r["rmse"], b["rmse"], r["frechet"] or float("nan"),
                             b["frechet"] or float("nan"), rate, wall, b["solver"]))
            write(args.json, out)  # after every student, so a cut-off run keeps what it measured
    out["seconds"] = time.time() - start
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"students after {args.steps} steps vs the teacher's best solver (digits, held-out pairs)")
    for c in ("student", "NFE", "RMSE", "teacher best", "ratio", "FD", "teacher FD", "steps/s", "wall s",
              "best solver"):
        t.add_column(c)
    for name, k, rmse, brmse, fd, bfd, rate, wall, bs in rows:
        t.add_row(name, str(k), f"{rmse:.4f}", f"{brmse:.4f}", f"{rmse / brmse:.3f}", f"{fd:.3g}", f"{bfd:.3g}",
                  f"{rate:.1f}", f"{wall:.0f}", bs)
    Console(stderr=True).print(t)
    write(args.json, out)
    print(args.json)


if __name__ == "__main__":
    main()
