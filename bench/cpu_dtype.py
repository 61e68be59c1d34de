"""An fp16-stored diffusers checkpoint sampled on the CPU: accelkit's default dtype against --dtype fp32 / fp16, and
diffusers' own loop on the same file loaded by ``from_pretrained`` (float32), in the same run.

accelkit's default (``auto``) casts half-precision weights to float32 on the CPU, as diffusers does, because the
CPU's fp16 kernels are many times slower; the target is default / fp32 wall time within 1.2x. The issue that asked
for it measured 0.2 (stored fp16) against 3.6 samples/s (diffusers, float32) on a 6.5 M UNet2DModel.

    python bench/cpu_dtype.py [--n 16] [--nfe 8] [--size 32] [--repeats 2] [--json bench/results/cpu_dtype.json]

Prints a table to stderr and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelkit.evaluation import sample_batched  # noqa: E402
from accelkit.export.exporter import stock_scheduler  # noqa: E402
from accelkit.models.loading import load_teacher  # noqa: E402
from accelkit.noise import sample_noise  # noqa: E402


def fp16_pipeline(folder: Path, size: int) -> Path:
    """A DDPM pipeline folder with a UNet2DModel of 2.6 M parameters stored in float16."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.half().save_pretrained(folder / "unet")
    DDPMScheduler(clip_sample=False).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--nfe", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default="bench/results/cpu_dtype.json")
    args = ap.parse_args()
    from diffusers import UNet2DModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = fp16_pipeline(Path(tmp) / "fp16", args.size)
        noise = sample_noise(0, range(args.n), (3, args.size, args.size))
        rows, outs = {}, {}
        for name, dtype in (("accelkit default (auto)", "auto"), ("accelkit --dtype fp32", "fp32"),
                            ("accelkit --dtype fp16 (stored)", "fp16")):
            teacher = load_teacher(folder, dtype=dtype)
            grid = stock_scheduler(teacher, "dpm++2m", args.nfe)[1]
            rows[name], outs[name] = timed(lambda t=teacher, g=grid: sample_batched(t, noise, "dpm++2m", args.nfe,
                                                                                     grid=g), args.repeats)
        teacher = load_teacher(folder)
        unet = UNet2DModel.from_pretrained(folder / "unet").eval()

        def diffusers_loop():
            scheduler = stock_scheduler(teacher, "dpm++2m", args.nfe)[0]
            x = noise.clone()
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
            return x

        rows["diffusers loop (from_pretrained, float32)"], outs["diffusers"] = timed(diffusers_loop, args.repeats)
    params = sum(p.numel() for p in unet.parameters())
    base = rows["accelkit --dtype fp32"]
    ref = outs["diffusers"]
    print(f"fp16-stored UNet2DModel ({params / 1e6:.1f} M parameters), {args.n} samples of 3x{args.size}x"
          f"{args.size}, DPM-Solver++(2M) {args.nfe} NFE, best of {args.repeats}, {torch.get_num_threads()} "
          "threads", file=sys.stderr)
    print(f"{'run':45s} {'seconds':>8s} {'samples/s':>10s} {'/ fp32':>7s} {'rel. diff. to diffusers':>24s}",
          file=sys.stderr)
    result = []
    for (name, sec), out in zip(rows.items(), outs.values(), strict=True):
        diff = float((out.float() - ref).norm() / ref.norm())
        print(f"{name:45s} {sec:8.2f} {args.n / sec:10.2f} {sec / base:7.2f} {diff:24.1e}", file=sys.stderr)
        result.append({"run": name, "seconds": sec, "samples_per_s": args.n / sec, "ratio_to_fp32": sec / base,
                       "rel_diff_to_diffusers": diff})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "parameters": params, "rows": result,
                                           "machine": platform.platform(), "cpus": os.cpu_count(),
                                           "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
