"""Quantized adaptive conditions (accelkit qac) against the control and the original teacher, on the digits teacher.

A flow-matching SmallUNet teacher is trained on scikit-learn's 8x8 digits; from it, with the same optimizer steps,
batch size and learning rate:

* the QAC model (``--bits`` binary codes, online code weights), and the same with offline weights;
* the control: the teacher fine-tuned on the same objective without codes (``accelkit qac --bits 0``).

Every model is measured by ``accelkit eval`` on the same noises at 2, 4, 6 and 10 NFE with euler, heun and dpm++2m:
the Frechet distance to digits on the shipped digits classifier's features (FD), each model with its best solver at
each NFE; ratio = model / control. The QAC summaries give the codebook use (perplexity of the collected weights,
online and offline, and their total variation), the encoder's and the extra parameters' share of the teacher, and
the training cost (steps/s). ``--paper`` adds the QAC model with Algorithm 1's printed quantizer (the codebook use
before FSQ's bounded straight-through estimator and the unit-scale encoder init). Composition (``--composition``):
couplings of the QAC model and of the original teacher (dpm++2m, 32 NFE) and a rectified-flow student of each, FD
at 1 and 2 NFE (euler). Table on stderr, JSON to --json.

    python bench/qac.py [--teacher PATH | --teacher-steps 1000 --base 32] [--steps 500] [--bits 8] [--paper]
                        [--composition]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import accelkit, machine, summary, train_teacher, write

SOLVERS = "euler,heun,dpm++2m"
NFES = (2, 4, 6, 10)


METRIC = "frechet"  # sliced_w2 on a 2-D set (--data)


def best_fd(rows: list[dict], model: str, nfes) -> dict[int, tuple[float, str]]:
    """(distance, solver) of ``model``'s best solver at each NFE (FD on images, sliced W2 on 2-D sets)."""
    out = {}
    for k in nfes:
        mine = [r for r in rows if r["method"] == model and r["nfe"] == k and r.get(METRIC) is not None]
        if mine:
            r = min(mine, key=lambda r: r[METRIC])
            out[k] = (r[METRIC], r["solver"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="digits, or a 2-D set (e.g. gaussian-mixture: sliced W2, an "
                                                     "MLP teacher)")
    ap.add_argument("--teacher", default=None, help="an existing teacher of --data (default: train one here)")
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--base", type=int, default=32, help="the trained teacher's SmallUNet width")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps of the QAC models and the control")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="constant learning rate of the QAC models and the "
                    "control (at 2e-4 for 500 steps the code embedding barely moves: docs/benchmarks.md)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--offline", action="store_true", help="also train the QAC model with offline weights (the same "
                                                           "training; the summaries compare both books anyway)")
    ap.add_argument("--paper", action="store_true", help="also train the QAC model with quantizer paper (Algorithm "
                                                         "1's printed straight-through estimator, outputs only "
                                                         "centred) to compare with the default")
    ap.add_argument("--composition", action="store_true", help="also couple + reflow from the QAC model and the "
                                                               "teacher")
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--workdir", default="bench/work-qac")
    ap.add_argument("--json", default="bench/results/qac.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = Path(args.workdir)
    start = time.time()
    device, described = machine()
    out: dict = {"machine": described, "settings": vars(args)}
    global METRIC
    two_d = args.data != "digits"
    METRIC = "sliced_w2" if two_d else "frechet"
    net = ["train.network.hidden=128", "train.network.depth=3"] if two_d else [f"train.network.base={args.base}"]
    teacher = args.teacher or train_teacher(args.data, args.teacher_steps, w / "teacher", sets=net, device=device)
    common = ["--data", args.data, "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr,
              "--device", device]
    models = {}
    runs = [("control", ["--bits", 0]), ("qac", ["--bits", args.bits])]
    if args.paper:  # the quantizer as Algorithm 1 prints it: the codebook use before FSQ's bounded estimator
        runs.append(("qac-paper", ["--bits", args.bits, "--set", "qac.quantizer=paper"]))
    if args.offline:
        runs.append(("qac-offline", ["--bits", args.bits, "--collection", "offline"]))
    for name, extra in runs:
        began = time.time()
        models[name] = accelkit("qac", teacher, *common, *extra, "-o", w / name)
        s = summary(models[name])
        out[name] = {"path": models[name], "wall_s": time.time() - began,
                     "steps_per_s": s["steps"] / s["seconds_last_run"] if s.get("seconds_last_run") else None,
                     **{k: s.get(k) for k in ("perplexity", "codes_used", "online_offline_tv", "encoder",
                                              "extra_share_of_teacher", "curvature", "straightness", "final_loss",
                                              "quantizer")}}
        write(args.json, out)
    names = ["teacher", *models]
    paths = [teacher, *models.values()]
    rows = json.loads(accelkit("eval", *paths, "--data", args.data, "--solver", SOLVERS,
                               "--nfe", ",".join(map(str, NFES)), "-n", args.eval_n, "--device", device, "--json"))
    out["eval"] = rows
    best = {name: best_fd(rows, p, NFES) for name, p in zip(names, paths, strict=True)}
    out["best_fd"] = {k: {str(n): v for n, v in b.items()} for k, b in best.items()}
    write(args.json, out)
    if args.composition:
        reflowed = {}
        for name, source in (("teacher", teacher), ("qac", models["qac"])):
            pairs = accelkit("couple", source, "-n", args.pairs, "--solver", "dpm++2m", "--nfe", 32,
                             "--micro-batch", 256, "--device", device, "--seed", 1, "-o", w / f"pairs-{name}")
            reflowed[name] = accelkit("reflow", pairs, "--steps", args.steps, "--batch-size", args.batch_size,
                                      "--device", device, "-o", w / f"reflow-{name}")
        comp = json.loads(accelkit("eval", reflowed["teacher"], reflowed["qac"], "--data", args.data, "--solver",
                                   "euler", "--nfe", "1,2", "-n", args.eval_n, "--device", device, "--json"))
        out["composition"] = {name: best_fd(comp, p, (1, 2)) for name, p in reflowed.items()}
        out["composition"] = {k: {str(n): v for n, v in b.items()} for k, b in out["composition"].items()}
    out["seconds"] = time.time() - start
    write(args.json, out)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.data}: QAC ({args.bits} bits) vs the control after {args.steps} steps, "
                    f"{'sliced W2' if two_d else 'FD'} with each model's best of {SOLVERS} (n = {args.eval_n})")
    for c in ("NFE", "teacher", "control", "QAC online", "QAC offline", "QAC paper", "QAC / control", "QAC solver",
              "paper / control"):
        t.add_column(c)
    for k in NFES:
        cells = [best.get(m, {}).get(k, (float("nan"), "-"))
                 for m in ("teacher", "control", "qac", "qac-offline", "qac-paper")]
        t.add_row(str(k), *[f"{c[0]:.3g}" for c in cells], f"{cells[2][0] / cells[1][0]:.3f}", cells[2][1],
                  f"{cells[4][0] / cells[1][0]:.3f}")
    console = Console(stderr=True)
    console.print(t)
    q = out["qac"]
    console.print(f"codebook use: perplexity online {q['perplexity']['online']:.1f}, offline "
                  f"{q['perplexity']['offline']:.1f} (codes used {q['codes_used']}); online/offline TV "
                  f"{q['online_offline_tv']:.3f}; encoder {100 * q['encoder']['share_of_teacher']:.2f} % and all "
                  f"extra parameters {100 * q['extra_share_of_teacher']:.2f} % of the teacher; steps/s QAC "
                  f"{q['steps_per_s']:.2f}, control {out['control']['steps_per_s']:.2f}")
    if "qac-paper" in out:
        p = out["qac-paper"]
        console.print(f"quantizer {q.get('quantizer')} (default): perplexity online {q['perplexity']['online']:.1f}, "
                      f"codes used {q['codes_used']}; quantizer paper (before): perplexity online "
                      f"{p['perplexity']['online']:.1f}, offline {p['perplexity']['offline']:.1f}, codes used "
                      f"{p['codes_used']}")
    if "composition" in out:
        console.print(f"composition (reflow students, {METRIC} at 1 / 2 NFE euler): {out['composition']}")
    print(args.json)


if __name__ == "__main__":
    main()
