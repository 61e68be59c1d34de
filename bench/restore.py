"""Restoration benchmark: PiGDM, DPS and DDRM on digits inpainting, 2x super-resolution and deblurring, against the
noise-regularised pseudo-inverse measured in the same run (and, on the analytic prior, the exact posterior mean).

Priors: an analytic mixture of four Gaussian 8x8 images (exact posterior mean known, no network error) and digits
teachers, eps (DDPM, vp-linear) and flow (linear), trained here for ``--train-steps`` (reused from ``--runs`` when
present) or given with ``--teacher PATH`` (repeatable). Measurements: the first ``--count`` digits (held-out mixture
draws for the analytic prior), noise 0.05: bottom half hidden, 2x average pooling, a circular Gaussian blur of 1 pixel.
Each method gives ``--samples`` posterior samples per measurement; the table reports the PSNR / SSIM of their mean
(the posterior-mean estimate) and of single samples, NFE (PiGDM and DPS add one vector-Jacobian product to each) and
wall seconds.

    python bench/restore.py --out bench/results/restore.json

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
from accelkit.data import digits  # noqa: E402
from accelkit.inverse import RestoreSettings, restore  # noqa: E402
from accelkit.metrics import psnr, ssim  # noqa: E402
from accelkit.models.analytic import gaussian_mixture_images  # noqa: E402
from accelkit.models.loading import load_teacher  # noqa: E402
from accelkit.noise import sample_noise  # noqa: E402
from accelkit.operators import Blur, Downsample, Inpaint  # noqa: E402
from accelkit.schedules import LinearSchedule  # noqa: E402

NOISE = 0.05
METHODS = (("pigdm", 10), ("pigdm", 20), ("dps", 50), ("dps", 100), ("ddrm", 10), ("ddrm", 20))


def operators(shape):
    mask = torch.ones(1, *shape, dtype=torch.float64)
    mask[..., shape[-2] // 2:, :] = 0
    return {"inpaint": Inpaint(mask), "super-resolution x2": Downsample(shape, 2),
            "deblur gaussian:1": Blur(shape, 1.0)}


def measure(op, x0, seed=1):
    hx = op(x0.double())
    y = hx + NOISE * sample_noise(seed, range(len(x0)), tuple(hx.shape[1:]), dtype=torch.float64)
    return op.ut(y) if isinstance(op, Inpaint) else y


def train_teacher(objective: str, steps: int, runs: Path) -> str:
    from accelkit.stages.train import TrainRecipe, run_train

    loop = {"steps": steps, "lr": 2e-3, "warmup_steps": 20, "lr_schedule": "cosine", "checkpoint_every": 0}
    path = run_train(TrainRecipe(data="digits", objective=objective, batch_size=128, network={"base": 16},
                                 eval_samples=0, device="cpu", loop=loop), runs / f"digits-{objective}-{steps}")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--teacher", action="append", default=None, help="digits teacher(s) to use instead of training")
    ap.add_argument("--train-steps", type=int, default=600, help="steps of the digits teachers trained here")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-restore"), help="where trained teachers live")
    ap.add_argument("--count", type=int, default=64, help="measurements per task")
    ap.add_argument("--samples", type=int, default=4, help="posterior samples per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (1, 8, 8)
    priors = {"analytic mixture (linear)": (gaussian_mixture_images(LinearSchedule(), shape, modes=4, std=0.2), None)}
    teachers = args.teacher or [train_teacher(o, args.train_steps, args.runs) for o in ("eps", "flow")]
    for path in teachers:
        t = load_teacher(path)
        priors[f"{Path(path).name} ({getattr(t, 'prediction', '?')}, {t.schedule.name})"] = (t, path)
    rows = []
    for prior_name, (teacher, path) in priors.items():
        analytic = path is None
        x0 = (teacher.sample_data(args.count, torch.Generator().manual_seed(7)).float() if analytic
              else digits()[: args.count])
        for task, op in operators(shape).items():
            y = measure(op, x0)
            base = op.regularized_pinv(y, NOISE**2).float()
            row0 = {"prior": prior_name, "task": task, "method": "pseudo-inverse", "nfe": 0, "vjp": False,
                    "psnr_mean": psnr(base, x0), "ssim_mean": ssim(base, x0), "psnr_sample": None,
                    "ssim_sample": None, "seconds": 0.0}
            rows.append(row0)
            if analytic:
                h = op.matrix()
                exact = []
                for i in range(len(y)):
                    w, means, _ = teacher.linear_gaussian_posterior(h, y[i], NOISE)
                    exact.append((w[:, None] * means).sum(0))
                exact = torch.stack(exact).reshape(x0.shape).float()
                rows.append({**row0, "method": "exact posterior mean", "psnr_mean": psnr(exact, x0),
                             "ssim_mean": ssim(exact, x0)})
            for method, nfe in METHODS:
                start = time.perf_counter()
                s = restore(teacher, op, y, NOISE, RestoreSettings(method, nfe), n=args.samples, seed=0)
                seconds = time.perf_counter() - start
                mean, flat = s.mean(1).float(), s.reshape(-1, *shape).float()
                ref = x0.repeat_interleave(args.samples, 0)
                rows.append({"prior": prior_name, "task": task, "method": method, "nfe": nfe,
                             "vjp": method != "ddrm", "psnr_mean": psnr(mean, x0), "ssim_mean": ssim(mean, x0),
                             "psnr_sample": psnr(flat, ref), "ssim_sample": ssim(flat, ref),
                             "seconds": round(seconds, 2)})
                err.print(f"{prior_name} | {task} | {method} {nfe}: PSNR {rows[-1]['psnr_mean']:.2f} "
                          f"(baseline {row0['psnr_mean']:.2f}), {seconds:.1f} s")
    table = Table(title=f"restoration, noise {NOISE}, mean of {args.samples} samples (PSNR dB / SSIM)",
                  title_justify="left")
    for col in ("prior", "task", "method", "NFE", "PSNR mean", "SSIM mean", "PSNR sample", "vs baseline", "s"):
        table.add_column(col)
    base_of = {(r["prior"], r["task"]): r["psnr_mean"] for r in rows if r["method"] == "pseudo-inverse"}
    for r in rows:
        table.add_row(r["prior"], r["task"], r["method"], str(r["nfe"] or "-") + (" +VJP" if r["vjp"] else ""),
                      f"{r['psnr_mean']:.2f}", f"{r['ssim_mean']:.3f}",
                      "-" if r["psnr_sample"] is None else f"{r['psnr_sample']:.2f}",
                      f"{r['psnr_mean'] - base_of[(r['prior'], r['task'])]:+.2f}", f"{r['seconds']:.1f}")
    err.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info = {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
                "settings": {"noise_std": NOISE, "count": args.count, "samples": args.samples,
                             "train_steps": args.train_steps, "teachers": teachers}}
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
        err.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
