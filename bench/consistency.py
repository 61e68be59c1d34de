"""Consistency students (cd, lcm, pcm, ect, sct) against the teacher's best solver and against reflow / direct-distill
students with the same training budget, on a digits (8x8) or 2-D flow teacher.

A flow-matching teacher is trained on ``--data`` (digits: a SmallUNet of width ``--base`` on scikit-learn's digits;
a 2-D set: an MLP); from it, couplings (dpm++2m at 32 NFE) for training and a held-out set (another seed) for
evaluation (:mod:`common`). Students, each with the same optimizer steps and batch:

* ``cd`` (couplings' samples as data, EMA target), ``pcm`` (2 and 4 phases; ``pcm-1`` optional), ``ect`` and
  ``sct`` (tuned on the data themselves), each evaluated with the sampler it records (consistency / tcd
  multistep, one jump per phase);
* ``lcm`` needs a teacher with a null class: on digits a class-conditional teacher of the same width and steps is
  trained with 10 % label dropout (:func:`common.class_conditional_digits_teacher`), its unguided couplings (labels
  0..9 cycled) are drawn the same way, and the LCM student takes the guidance scale g in ``--guidance-range`` as an
  input; ``accelkit eval`` measures it at g = 1 (its recorded scale) against that teacher's unguided endpoints and
  best solver (``cd-cond``, optional: plain CD on the same conditional teacher, the control). Not on 2-D sets;
* baselines: a 1-rectified-flow student (euler) and a direct-distilled 2-step student (euler) on the same couplings.

Every model is measured by ``accelkit eval`` on the held-out pairs at 1, 2 and 4 NFE: RMSE to the teacher's ODE
endpoint of the same noise and the distance to the data (digits: the Frechet distance on the shipped digits
classifier's features; 2-D: sliced W2); the teacher with the best of euler, heun, dpm++2m and unipc at each NFE is the
baseline (ratio = model / teacher's best, lower is better). Training steps per second come from the stages'
manifests. Table on stderr, JSON to --json FILE. On a loaded CPU set OMP_NUM_THREADS=1 (docs/benchmarks.md).

    python bench/consistency.py [--data digits|moons|...] [--teacher-steps 1500] [--base 32] [--steps 400]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import (
    IMAGE_SETS,
    accelkit,
    class_conditional_digits_teacher,
    couplings,
    distance_key,
    evaluate,
    machine,
    steps_per_second,
    teacher_best,
    train_teacher,
    write,
)

NFES = (1, 2, 4)
#: name -> (command and its options, its teacher, the solver it is evaluated with (None: the one it records), the
#: NFEs it is made for)
STUDENTS = {
    "cd": (["consistency", "{pairs}", "--method", "cd"], "plain", None, NFES),
    "lcm": (["consistency", "{pairs}", "--method", "lcm", "--guidance-range", "{g}"], "conditional", None, NFES),
    "cd-cond": (["consistency", "{pairs}", "--method", "cd"], "conditional", None, NFES),
    "pcm-4": (["consistency", "{pairs}", "--method", "pcm", "--phases", "4"], "plain", None, (4,)),
    "pcm-2": (["consistency", "{pairs}", "--method", "pcm", "--phases", "2"], "plain", None, (2,)),
    "pcm-1": (["consistency", "{pairs}", "--method", "pcm", "--phases", "1"], "plain", None, (1,)),
    "ect": (["consistency", "{teacher}", "--method", "ect", "--data", "{data}"], "plain", None, NFES),
    "sct": (["consistency", "{teacher}", "--method", "sct", "--data", "{data}"], "plain", None, NFES),
    "reflow": (["reflow", "{pairs}", "--method", "rectified-flow", "--set", "reflow.eval_samples=0"], "plain", "euler",
               NFES),
    "direct-2": (["distill", "{pairs}", "--method", "direct", "--nfe", "2"], "plain", "euler", (2,)),
}
DEFAULT = "cd,lcm,pcm-2,pcm-4,ect,sct,reflow,direct-2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="digits, fashion-mnist or a 2-D set (moons, checkerboard, ...)")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--base", type=int, default=32, help="image teachers: the SmallUNet's width")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of every student")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--guidance-range", default="1,3", help="lcm: the range of the student's guidance input g")
    ap.add_argument("--students", default=DEFAULT, help="comma-separated subset of " + ",".join(STUDENTS))
    ap.add_argument("--workdir", default="bench/work-consistency")
    ap.add_argument("--json", default="bench/results/consistency.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = Path(args.workdir)
    start = time.time()
    device, described = machine()
    out: dict = {"machine": described, "settings": vars(args), "models": {}, "teachers": {}}
    names = args.students.split(",")
    unknown = [n for n in names if n not in STUDENTS]
    if unknown:
        raise SystemExit(f"--students: unknown {', '.join(unknown)}; expected a subset of {', '.join(STUDENTS)}")
    if args.data != "digits" and any(STUDENTS[n][1] == "conditional" for n in names):
        left = [n for n in names if STUDENTS[n][1] == "conditional"]
        print(f"note: {', '.join(left)} need a class-conditional teacher (digits only here); left out", file=sys.stderr)
        names = [n for n in names if STUDENTS[n][1] != "conditional"]
    sets = [f"train.network.base={args.base}"] if args.data in IMAGE_SETS else []

    teachers: dict[str, dict] = {}  # kind -> teacher, pairs, held, best
    began = time.time()
    teacher = train_teacher(args.data, args.teacher_steps, w / "teacher", sets=sets, device=device)
    wall = time.time() - began
    pairs, held = couplings(teacher, args.pairs, args.eval_n, device, w)
    teachers["plain"] = {"teacher": teacher, "pairs": pairs, "held": held, "train_wall_s": wall,
                         "steps_per_s": steps_per_second(teacher)}
    if any(STUDENTS[n][1] == "conditional" for n in names):
        began = time.time()
        file, labels = class_conditional_digits_teacher(w / "teacher-cond", args.teacher_steps, args.base,
                                                        device=device)
        wall = time.time() - began
        pairs_c, held_c = couplings(file, args.pairs, args.eval_n, device, w, "-cond", ["--conditions", labels])
        teachers["conditional"] = {"teacher": str(file), "pairs": pairs_c, "held": held_c, "train_wall_s": wall}
    for kind, t in teachers.items():
        t["best"] = teacher_best(t["teacher"], t["held"], args.eval_n, device, NFES, args.data)
        out["teachers"][kind] = t
        write(args.json, out)
    out["teacher_best"] = teachers["plain"]["best"]
    metric = distance_key(args.data)
    rows: list[tuple] = []
    for name in names:
        command, kind, solver, nfes = STUDENTS[name]
        t = teachers[kind]
        command = [c.format(pairs=t["pairs"], teacher=t["teacher"], data=args.data, g=args.guidance_range)
                   for c in command]
        began = time.time()
        path = accelkit(*command, "--steps", args.steps, "--batch-size", args.batch_size, "--device", device,
                        "-o", w / name)
        wall = time.time() - began
        rate = steps_per_second(path)
        got = [r for r in evaluate([path], t["held"], args.eval_n, device, NFES, solver, args.data)
               if r["nfe"] in nfes]
        out["models"][name] = {"teacher": kind, "solver": got[0]["solver"] if got else solver, "steps_per_s": rate,
                               "wall_s": wall, "rows": got}
        for r in got:
            b = t["best"][r["nfe"]]
            rows.append((name, kind, r["solver"], r["nfe"], r["rmse"], b["rmse"], r.get(metric), b.get(metric),
                         rate, wall, b["solver"]))
        write(args.json, out)  # after every student, so a cut-off run keeps what it measured
    out["seconds"] = time.time() - start
    from rich.console import Console
    from rich.table import Table

    dist = "FD" if metric == "frechet" else "SW2"
    t = Table(title=f"students after {args.steps} steps vs the teacher's best solver ({args.data}, held-out pairs)")
    for c in ("student", "teacher", "sampler", "NFE", "RMSE", "teacher best", "ratio", dist, f"teacher {dist}",
              f"{dist} ratio", "steps/s", "wall s", "best solver"):
        t.add_column(c)
    nan = float("nan")
    for name, kind, solver, k, rmse, brmse, fd, bfd, rate, wall, bs in rows:
        fd, bfd = fd if fd is not None else nan, bfd if bfd is not None else nan
        t.add_row(name, kind, solver, str(k), f"{rmse:.4f}", f"{brmse:.4f}", f"{rmse / brmse:.3f}", f"{fd:.3g}",
                  f"{bfd:.3g}", f"{fd / bfd:.3f}", f"{rate:.1f}", f"{wall:.0f}", bs)
    Console(stderr=True, width=200).print(t)
    write(args.json, out)
    print(args.json)


if __name__ == "__main__":
    main()
