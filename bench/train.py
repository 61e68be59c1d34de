"""Training-loop overhead: accelkit's Trainer against a bare forward + backward + optimizer loop, same run.

Both train the same network (the built-in MLP on 2-D data, or the SmallUNet on 8x8 digits) with the same flow-matching
loss, batch size and AdamW; the bare loop draws its batch with torch.randint / rand / randn and does nothing else.
The Trainer runs with its defaults (one EMA, gradient clipping, seeded sampler, NaN guard, progress off) and with
EMA and clipping off ("minimal"), so the cost of each feature is visible. Reports steps/second and the ratio
Trainer / bare (target >= 0.9). Table on stderr, JSON on stdout or to --json FILE.

    python bench/train.py [--model mlp|unet] [--steps 300] [--batch-size 256] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from accelkit.data import BatchSampler, load_dataset  # noqa: E402
from accelkit.models.builtin import MLP, SmallUNet, builtin_call  # noqa: E402
from accelkit.objectives import DenoisingObjective  # noqa: E402
from accelkit.schedules import LinearSchedule  # noqa: E402
from accelkit.training import LoopConfig, Trainer  # noqa: E402


def make_model(kind: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    net = MLP(2, 256, 4, time_scale=1000.0) if kind == "mlp" else SmallUNet(1, 32, (1, 2), time_scale=1000.0)
    return net.to(device)


def bare_loop(kind, data, objective, steps, batch, device) -> float:
    model = make_model(kind, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = data.to(device)
    shape = tuple(data.shape[1:])

    def one():
        idx = torch.randint(0, len(data), (batch,), device=device)
        b = {"x": data[idx], "t": torch.rand(batch, device=device, dtype=torch.float64),
             "eps": torch.randn(batch, *shape, device=device)}
        opt.zero_grad(set_to_none=True)
        loss, _ = objective.loss(model, b)
        loss.backward()
        opt.step()

    for _ in range(10):
        one()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    return steps / (time.perf_counter() - start)


def trainer_loop(kind, data, objective, steps, batch, device, minimal: bool) -> float:
    model = make_model(kind, device)
    sampler = BatchSampler(data, batch, seed=0, noise=objective.noise_fn(tuple(data.shape[1:])))
    extra = {"ema_rates": [], "grad_clip": None} if minimal else {}
    cfg = LoopConfig(steps=steps + 10, lr=1e-3, checkpoint_every=0, checkpoint_interval_s=0, log_every=10**9,
                     **extra)
    trainer = Trainer(model, objective.loss, sampler, cfg, checkpoint_dir=None, device=device, progress=False)
    for _ in range(10):  # warm-up, as the bare loop's
        trainer.train_step(next(sampler))
    sync(device)
    start = time.perf_counter()
    trainer.fit(resume=False)  # the remaining `steps` steps
    sync(device)
    return steps / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mlp", "unet"], default="mlp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the JSON here (default: stdout)")
    args = p.parse_args()
    device = torch.device(args.device)
    data = load_dataset("moons", 20000).samples if args.model == "mlp" else load_dataset("digits").samples
    objective = DenoisingObjective(LinearSchedule(), "flow", builtin_call)
    rows = {"bare": [], "trainer": [], "trainer-minimal": []}
    for _ in range(args.repeats):  # interleaved, best of repeats: robust to other load on a shared machine
        rows["bare"].append(bare_loop(args.model, data, objective, args.steps, args.batch_size, device))
        rows["trainer"].append(trainer_loop(args.model, data, objective, args.steps, args.batch_size, device, False))
        rows["trainer-minimal"].append(trainer_loop(args.model, data, objective, args.steps, args.batch_size, device,
                                                    True))
    best = {k: max(v) for k, v in rows.items()}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training loop, {args.model}, batch {args.batch_size}, {device}")
    for col in ("loop", "steps/s (best)", "all runs", "ratio to bare"):
        table.add_column(col)
    for k, v in best.items():
        table.add_row(k, f"{v:.1f}", " ".join(f"{x:.1f}" for x in rows[k]), f"{v / best['bare']:.3f}")
    Console(stderr=True).print(table)
    out = {"benchmark": "training-loop", "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
           "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "cpus": os.cpu_count(), "steps_per_s": rows, "best": best,
           "ratio": {k: best[k] / best["bare"] for k in best}}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
