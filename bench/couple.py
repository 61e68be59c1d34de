"""Coupling throughput against the bare teacher forward passes it needs, measured in the same run.

``accelkit couple`` does, per sample, NFE teacher evaluations plus the noise draw, the solver's arithmetic, the
shard writes (atomic, fsync'd), hashing and the manifest. The baseline runs only the network forward passes the
same job needs (n / micro_batch calls per NFE step on micro-batches of the same size, same threads). The ratio
baseline_time / couple_time is the fraction of the bare network throughput that couple keeps (target >= 0.95).

    python bench/couple.py [--n 1024] [--nfe 8] [--size 16] [--base 32] [--micro-batch 64] [--repeats 3]
                           [--json bench/results/couple.json]

Prints a table to stderr and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelkit.models.builtin import SmallUNet, builtin_call  # noqa: E402
from accelkit.models.loading import load_teacher, save_teacher  # noqa: E402
from accelkit.schedules import LinearSchedule  # noqa: E402
from accelkit.stages.couple import CoupleRecipe, run_couple  # noqa: E402
from accelkit.teacher import NetworkTeacher  # noqa: E402


def bare_forward_passes(network: torch.nn.Module, n: int, nfe: int, micro: int, shape: tuple[int, ...]) -> float:
    """Seconds for the network calls alone: ceil(n / micro) micro-batches x nfe steps."""
    x = torch.randn(micro, *shape)
    last = n - (n // micro) * micro
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(nfe):
            t = torch.full((micro,), 0.5)
            for _ in range(n // micro):
                network(x, t)
            if last:
                network(x[:last], t[:last])
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--nfe", type=int, default=8)
    ap.add_argument("--size", type=int, default=16, help="image side (1 channel)")
    ap.add_argument("--base", type=int, default=32, help="SmallUNet base width")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "couple.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["ACCELKIT_NO_PROGRESS"] = "1"

    work = Path(tempfile.mkdtemp(prefix="bench-couple-"))
    try:
        torch.manual_seed(0)
        net = SmallUNet(channels=1, base=args.base, mults=(1, 2)).eval()
        shape = (1, args.size, args.size)
        teacher_file = save_teacher(NetworkTeacher(net, builtin_call, "flow", LinearSchedule(), shape),
                                    work / "teacher.safetensors")
        teacher = load_teacher(teacher_file)
        network = teacher.network
        params = sum(p.numel() for p in network.parameters())
        shard = max(args.micro_batch, (args.n // 4) // args.micro_batch * args.micro_batch)
        recipe = CoupleRecipe(teacher=str(teacher_file), n=args.n, nfe=args.nfe, micro_batch=args.micro_batch,
                              shard_size=shard, batch_size=args.batch_size)
        bare_forward_passes(network, args.micro_batch * 2, 2, args.micro_batch, shape)  # warm-up
        base_times, couple_times = [], []
        for r in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            base_times.append(bare_forward_passes(network, args.n, args.nfe, args.micro_batch, shape))
            out = work / f"run{r}"
            start = time.perf_counter()
            run_couple(recipe, out, teacher=teacher)
            couple_times.append(time.perf_counter() - start)
            shutil.rmtree(out)
        base, couple = min(base_times), min(couple_times)
        result = {
            "benchmark": "couple", "machine": f"{platform.processor() or platform.machine()}, "
                                              f"{os.cpu_count()} cores, torch {torch.__version__}",
            "threads": args.threads, "teacher": f"SmallUNet(base={args.base}, mults=(1, 2)) on 1x{args.size}x"
                                                 f"{args.size}, {params} parameters",
            "n": args.n, "nfe": args.nfe, "micro_batch": args.micro_batch, "shard_size": shard,
            "bare_forward_seconds": base, "couple_seconds": couple,
            "bare_samples_per_s": args.n / base, "couple_samples_per_s": args.n / couple,
            "ratio": base / couple, "repeats": args.repeats,
            "all_bare_seconds": base_times, "all_couple_seconds": couple_times,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from rich.table import Table

    from accelkit.console import err

    table = Table(title=f"couple throughput: n={args.n}, NFE={args.nfe}, micro-batch {args.micro_batch}, "
                        f"{args.threads} threads (best of {args.repeats})")
    for col in ("what", "seconds", "samples/s", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("bare teacher forward passes", f"{base:.2f}", f"{args.n / base:.1f}", "1.00")
    table.add_row("accelkit couple (end to end)", f"{couple:.2f}", f"{args.n / couple:.1f}", f"{base / couple:.3f}")
    err.print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    err.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
