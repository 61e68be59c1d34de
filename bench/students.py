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
import os
import time
from pathlib import Path

from common import (
    STANDARD_SOLVERS,
    accelkit,
    couplings,
    evaluate,
    machine,
    steps_per_second,
    teacher_best,
    train_teacher,
    write,
)

#: (teacher objective, its schedule, its students)
TEACHERS = (("flow", "linear", ("rectified-flow", "direct-1", "direct-2", "direct-4")),
            ("eps", "vp-linear", ("rectified-diffusion",)),
            ("eps-sl", "vp-scaled-linear", ("rectified-diffusion",)))
NFES = (1, 2, 4)


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
    device, described = machine()  # every stage runs there
    out: dict = {"machine": described, "settings": vars(args), "models": {}}
    rows: list[tuple] = []
    for objective, schedule, students in TEACHERS:
        if schedule not in args.teachers.split(","):
            continue
        teacher = train_teacher("digits", args.teacher_steps, w / f"teacher-{objective}", objective.split("-")[0],
                                [f"train.schedule={schedule}"])
        pairs, held = couplings(teacher, args.pairs, args.eval_n, device, w, f"-{objective}")
        best = teacher_best(teacher, held, args.eval_n, device, NFES, solvers=STANDARD_SOLVERS)
        for name in students:
            common = ["--steps", args.steps, "--batch-size", args.batch_size, "-o", w / f"{objective}-{name}"]
            began = time.time()
            if name.startswith("direct"):
                k = int(name.split("-")[1])
                path = accelkit("distill", pairs, "--method", "direct", "--nfe", k, *common)
            else:
                path = accelkit("reflow", pairs, "--method", name, *common)
            wall = time.time() - began
            rate = steps_per_second(path)
            solver = "euler" if objective == "flow" else "ddim"
            got = evaluate([path], held, args.eval_n, device, NFES, solver)
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
