"""Score-distillation (vsd, dmd, dmd2 with and without GAN, sim) and adversarial (ladd) generators against the
teacher's best standard solver and the reflow, direct-distill and consistency-distillation (cd) students with the same
training budget, on a 2-D ring or digits teacher.

A flow-matching teacher is trained on ``--data`` (the 8-mode ``gaussian-mixture`` ring: an MLP; ``digits``: a
SmallUNet on scikit-learn's 8x8 digits); couplings from its ODE (dpm++2m, 16 NFE) are every method's SOURCE. Each
generator is trained for ``--steps`` steps at each K in ``--k`` (its own K-step sampler, recorded in its artifact,
is what it is evaluated with); the baselines are the teacher (best of euler, heun, dpm++2m, unipc at each NFE), the
reflow student (euler), one direct-distill student per K and one cd student (its recorded multistep sampler at each
K), each trained ``--steps`` steps on the same pairs (``--baselines``). Measured by ``accelkit eval`` on held-out
couplings (another seed): sliced W2 to the data (2-D) or the Frechet distance on the shipped digits classifier's
features, and mode coverage: the share of the ring's 8 modes (digits: of the 10 classes, by the classifier's
predicted labels) holding at least half their fair share of 2000 samples. Training steps per second and each
training process's peak resident memory are reported.
Table on stderr, JSON to --json FILE.

    python bench/score_distill.py [--data gaussian-mixture|digits] [--steps 300] [--k 1,2] [--teacher-steps 600]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from common import accelkit, accelkit_rss

FAST_FAKE = ["--set", "score_distill.fake_score.lr=5e-3"]
#: name -> (command and options, training-steps multiplier[, learning rate instead of --lr's 1e-3])
METHODS = {
    "dmd2": (["score-distill", "{pairs}", "--method", "dmd2", "--ratio", "5", *FAST_FAKE], 2),
    "dmd2+gan": (["score-distill", "{pairs}", "--method", "dmd2", "--ratio", "5", *FAST_FAKE,
                  "--set", "score_distill.gan_weight=3e-3"], 2),
    "dmd": (["score-distill", "{pairs}", "--method", "dmd", *FAST_FAKE], 1),
    "vsd": (["score-distill", "{pairs}", "--method", "vsd", "--ratio", "2", *FAST_FAKE], 1),
    # sim's pseudo-Huber direction d'(u) = u / sqrt(|u|^2 + c^2) has unit length whatever the score gap: on digits
    # lr 1e-3 diverged (FD 254 at 1 step, 7 of 10 classes), 3e-4 gave 34, 1e-4 gave 16.6 (docs/benchmarks.md)
    "sim": (["score-distill", "{pairs}", "--method", "sim", *FAST_FAKE], 1, 1e-4),
    "ladd": (["adversarial", "{pairs}", "--set", "adversarial.loop.betas=[0.0,0.99]",
              "--set", "adversarial.discriminator.logit_mean=-1.0", "--set", "adversarial.disc.lr=3e-3"], 1),
}


def coverage(samples_file: str, data: str) -> float:
    import torch
    from safetensors.torch import load_file

    x = next(iter(load_file(samples_file).values())).float()
    if data == "digits":
        from accelkit.features import load_builtin

        net = load_builtin("digits")
        with torch.no_grad():
            labels = net(x.clamp(-1, 1)).argmax(1)
        k = 10
    else:
        ang = torch.arange(8, dtype=torch.float32) * (2 * math.pi / 8)
        centres = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        labels, k = torch.cdist(x, centres).argmin(1), 8
    counts = torch.bincount(labels, minlength=k).float()
    return float((counts >= 0.5 * len(x) / k).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="gaussian-mixture", help="gaussian-mixture (the 8-mode ring) or digits")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="training steps of every generator (dmd2: twice, for its "
                                                          "5:1 ratio) and of the reflow student")
    ap.add_argument("--k", default="1,2", help="generator steps to train, comma-separated (1, 2, 4)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--baselines", default="reflow,direct,cd", help="comma-separated subset of reflow,direct,cd "
                                                                     "(students trained for --steps on the same pairs)")
    ap.add_argument("--workdir", default="bench/work-score-distill")
    ap.add_argument("--json", default="bench/results/score_distill.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.k.split(",")]
    start = time.time()
    net = (["--set", "train.network.hidden=64", "--set", "train.network.depth=2"] if args.data != "digits" else [])
    teacher = accelkit("train", "--data", args.data, "--steps", args.teacher_steps, "--batch-size", 256, "--lr",
                          "3e-3", *net, "--set", "train.eval_samples=0", "--device", "cpu", "-o", work / "teacher")
    pairs = accelkit("couple", teacher, "-n", args.pairs, "--solver", "dpm++2m", "--nfe", 16, "--seed", 1,
                        "--device", "cpu", "-o", work / "pairs")
    held = accelkit("couple", teacher, "-n", args.eval_n, "--solver", "dpm++2m", "--nfe", 16, "--seed", 99,
                       "--device", "cpu", "-o", work / "held-out")
    common = ["--batch-size", args.batch_size, "--device", "cpu",
              "--set", "{stage}.loop.ema_rates=[0.99]", "--set", "{stage}.loop.checkpoint_every=0"]
    rows = []
    teacher_rows = json.loads(accelkit("eval", teacher, "--solver", "euler,heun,dpm++2m,unipc", "--nfe",
                                       ",".join(map(str, sorted(set(ks)))), "--reference", held, "-n", args.eval_n,
                                       "--device", "cpu", "--data", args.data, "--json"))
    best = {}
    for r in teacher_rows:
        d = r.get("frechet") if r.get("frechet") is not None else r.get("sliced_w2")
        if r["nfe"] not in best or d < best[r["nfe"]][0]:
            best[r["nfe"]] = (d, r["solver"])
    ode_row = json.loads(accelkit("eval", teacher, "--solver", "dpm++2m", "--nfe", "32", "--reference", held, "-n",
                                  args.eval_n, "--device", "cpu", "--data", args.data, "--json"))[0]
    ode = ode_row.get("frechet") if ode_row.get("frechet") is not None else ode_row.get("sliced_w2")
    models = []
    for name in [m for m in args.methods.split(",") if m]:
        cmd, mult, *lr = METHODS[name]
        stage = "adversarial" if cmd[0] == "adversarial" else "score_distill"
        for k in ks:
            out, rss = accelkit_rss(*[c.format(pairs=pairs) for c in cmd], "--steps", str(k), "--train-steps",
                                    str(args.steps * mult), "--lr", str(lr[0] if lr else 1e-3),
                                    *[str(c).format(stage=stage) for c in common],
                                    "-o", str(work / f"{name}-k{k}"))
            models.append((name, k, out, rss))
    # the students that need no generator game, at the same budget: reflow (euler at every K), a direct-distill
    # student per K, and one consistency-distillation student (its recorded multistep sampler at every K)
    baselines = []
    if "reflow" in args.baselines:
        path, rss = accelkit_rss("reflow", pairs, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                 "--lr", "1e-3", "--device", "cpu", "--set", "reflow.eval_samples=0",
                                 "-o", str(work / "reflow"))
        baselines.append(("reflow", None, path, rss, "euler"))
    if "direct" in args.baselines:
        for k in ks:
            path, rss = accelkit_rss("distill", pairs, "--method", "direct", "--nfe", str(k), "--steps",
                                     str(args.steps), "--batch-size", str(args.batch_size), "--lr", "1e-3",
                                     "--device", "cpu", "--set", "distill.eval_samples=0",
                                     "-o", str(work / f"direct-k{k}"))
            baselines.append(("direct", k, path, rss, None))
    if "cd" in args.baselines:
        path, rss = accelkit_rss("consistency", pairs, "--method", "cd", "--steps", str(args.steps), "--batch-size",
                                 str(args.batch_size), "--lr", "1e-3", "--device", "cpu",
                                 "-o", str(work / "consistency-cd"))
        baselines.append(("cd", None, path, rss, "recorded"))
    for name, k, path, rss, *how in [*[(*m, None) for m in models], *baselines]:
        summary = json.loads((Path(path) / "manifest.json").read_text())["summary"]
        nfes = [k] if k is not None else ks
        for nfe in nfes:
            solver = summary["sampling"]["solver"] if (k is not None or how[0] == "recorded") else how[0]
            ev = json.loads(accelkit("eval", path, "--solver", solver, "--nfe", str(nfe), "--reference", held, "-n",
                                     args.eval_n, "--device", "cpu", "--data", args.data, "--json"))[0]
            dist = ev.get("frechet") if ev.get("frechet") is not None else ev.get("sliced_w2")
            sfile = work / f"samples-{name}-{nfe}.safetensors"
            accelkit("sample", path, "--solver", solver, "--nfe", nfe, "-n", args.eval_n, "--seed", 5, "-o", sfile,
                     "--force")
            steps = summary.get("steps")
            rows.append({"model": name, "nfe": nfe, "distance": dist, "teacher_best": best[nfe][0],
                         "teacher_best_solver": best[nfe][1], "ratio": dist / best[nfe][0],
                         "coverage": coverage(str(sfile), args.data), "train_steps": steps,
                         "steps_per_s": (steps / summary["seconds_last_run"]) if summary.get("seconds_last_run")
                         else None, "peak_rss_mib": rss, "updates": summary.get("updates")})
    metric = "FD (digits features)" if args.data == "digits" else "sliced W2"
    print(f"\n{args.data}: {metric} to the data at the model's own NFE; ratio = model / teacher's best solver there; "
          f"the teacher's ODE (dpm++2m, 32 NFE): {ode:.4f}", file=sys.stderr)
    print(f"{'model':10s} {'NFE':>3s} {'dist':>8s} {'teacher':>8s} {'ratio':>6s} {'cover':>6s} {'step/s':>7s} "
          f"{'RSS MiB':>8s}", file=sys.stderr)
    for r in rows:
        print(f"{r['model']:10s} {r['nfe']:3d} {r['distance']:8.4f} {r['teacher_best']:8.4f} {r['ratio']:6.3f} "
              f"{r['coverage']:6.3f} {r['steps_per_s'] or 0:7.1f} {r['peak_rss_mib']:8d}", file=sys.stderr)
    out = {"data": args.data, "args": vars(args), "rows": rows, "teacher_best": best, "teacher_ode_32": ode,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "seconds": round(time.time() - start, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
