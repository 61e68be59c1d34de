"""GPU speed of sampling and training on an SD1.5-size UNet, against diffusers' own denoising loop in the same run.

On CUDA: a random-weight UNet2DConditionModel of SD1.5's configuration (860 M parameters, fp16), batch 32 of 4x64x64
latents, 77-token text embeddings of width 768, DPM-Solver++(2M) in 25 steps with guidance 7.5 (conditional and
null rows in one batched call, as StableDiffusionPipeline does). Rows:

* diffusers' loop: ``DPMSolverMultistepScheduler.step`` after each guided UNet call (the pipeline's loop without
  the text encoder and the VAE), on the same UNet module and grid;
* ``accelkit couple`` (``run_couple`` with the loaded teacher: noise from (seed, i), shards written) eager, with
  ``--compile``, with ``--cuda-graphs``, and with both;
* the bare network calls (25 guided UNet calls on fixed inputs), against which the solver's overhead is measured
  (accelkit's ``solve`` alone, no couple I/O; target under 2 %);
* model FLOP utilisation: the FLOPs of one guided call from ``torch.utils.flop_counter`` times the calls per
  second, over the GPU's dense fp16 peak (``--peak-tflops``, default from the GPU's name);
* reflow with LoRA (rank 8 on the attention projections, bf16 autocast; the rectified-diffusion x0 loss on the
  couplings made above): training steps per second and peak memory, with and without gradient checkpointing.

Without CUDA it runs the same rows at a reduced size on the CPU (a 2-level UNet of width 32, batch 4 of 4x16x16
latents, embeddings of width 64, fp32; CUDA graphs are skipped, and the compiled rows unless ``--compile``) to check
the script and give CPU figures.

    nice -n 15 python bench/gpu.py [--batch B] [--latent S] [--steps 25] [--batches K] [--[no-]compile] [--json ...]

Prints a table to stderr and writes JSON (bench/results/gpu.json on CUDA, bench/results/gpu-cpu.json otherwise).
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

from accelkit.acceleration import accelerate  # noqa: E402
from accelkit.export.exporter import stock_scheduler  # noqa: E402
from accelkit.models.loading import load_teacher  # noqa: E402
from accelkit.noise import sample_noise  # noqa: E402
from accelkit.teacher import Condition  # noqa: E402

#: Dense fp16 / bf16 tensor-core peaks (FLOP/s) by a substring of the GPU's name.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12,
         "L4": 121e12, "V100": 125e12}


def unet_config(cuda: bool) -> dict:
    if cuda:  # SD1.5's UNet: the class defaults (320-640-1280-1280, 2 layers per block) with 768-wide embeddings
        return dict(sample_size=64, cross_attention_dim=768)
    return dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8)


def write_pipeline(folder: Path, cuda: bool) -> tuple[Path, int]:
    """A StableDiffusionPipeline-layout folder with only the random-weight UNet (fp16 on CUDA) and SD1.5's scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(cuda))
    params = sum(p.numel() for p in unet.parameters())
    (unet.half() if cuda else unet).save_pretrained(folder / "unet")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"],
                                                         "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder, params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``fn`` (after the device finished its work), and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32 if cuda else 4)
    ap.add_argument("--latent", type=int, default=64 if cuda else 16)
    ap.add_argument("--tokens", type=int, default=77)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batches", type=int, default=2, help="batches per timed couple run")
    ap.add_argument("--train-batch", type=int, default=8 if cuda else 4)
    ap.add_argument("--train-steps", type=int, default=20 if cuda else 6)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                    help="include the --compile rows (default on CUDA; on the CPU inductor's first compilation of "
                         "the UNet takes many minutes)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16 peak (default: by name)")
    ap.add_argument("--json", default="bench/results/gpu.json" if cuda else "bench/results/gpu-cpu.json")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "fp16" if cuda else "fp32"
    from safetensors.torch import save_file

    from accelkit.stages.couple import CoupleRecipe, run_couple

    rows: list[dict] = []
    started = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {what}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder, params = write_pipeline(tmp / "sd", cuda)
        b, steps, w = args.batch, args.steps, args.guidance
        width = int(unet_config(cuda).get("cross_attention_dim", 768))
        g = torch.Generator().manual_seed(1)
        ehs = torch.randn(b, args.tokens, width, generator=g)
        null = torch.zeros(1, args.tokens, width)
        conditions = tmp / "conditions.safetensors"
        save_file({"encoder_hidden_states": ehs, "null.encoder_hidden_states": null}, str(conditions))
        shape = (4, args.latent, args.latent)

        def teacher_with(**flags):
            t = load_teacher(folder, device=str(device), dtype=dtype, guidance=w)
            t.sample_shape = shape  # the UNet's own sample_size is 64; the CPU run uses smaller latents
            t.null_condition = Condition(encoder_hidden_states=null.to(device))
            return accelerate(t, **flags, solver="dpm++2m") if flags else t

        eager = teacher_with()
        unet = eager.network
        scheduler, grid = stock_scheduler(eager, "dpm++2m", steps)
        n = args.batches * b
        recipe = dict(teacher=str(folder), n=n, solver="dpm++2m", nfe=steps, grid=grid, guidance=w,
                      conditions=str(conditions), micro_batch=b, shard_size=n, batch_size=n, dtype=dtype,
                      device=str(device), checkpoint_every=3600.0)
        couplings = None

        def couple_row(name: str, teacher, **flags) -> None:
            nonlocal couplings
            progress(name)
            warm = CoupleRecipe(**{**recipe, "n": b, "shard_size": b, "batch_size": b}, **flags)
            # compiles / captures, in the timed run's inference mode (a compiled network recompiles when it changes)
            first, _ = timed(lambda: run_couple(warm, tmp / f"warm-{len(rows)}", teacher=teacher), device)
            out = tmp / f"couple-{len(rows)}"
            sec, _ = timed(lambda: run_couple(CoupleRecipe(**recipe, **flags), out, teacher=teacher), device)
            couplings = couplings or out
            rows.append({"run": name, "seconds": sec, "samples_per_s": n / sec, "first_batch_s": first})

        # diffusers' own loop (StableDiffusionPipeline's, without text encoder and VAE), same UNet and grid
        cond_cat = torch.cat([null.expand(b, -1, -1), ehs]).to(device, unet.dtype)
        noise = sample_noise(0, range(b), shape, device=device)

        def diffusers_loop():
            scheduler.set_timesteps(steps)
            x = (noise * scheduler.init_noise_sigma).to(unet.dtype)
            for t in scheduler.timesteps:
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=cond_cat).sample
                u, c = out.chunk(2)
                x = scheduler.step(u + w * (c - u), t, x).prev_sample
            return x

        progress("diffusers loop")
        timed(diffusers_loop, device)  # warm-up (cuDNN / cuBLAS choices)
        sec, ref = timed(diffusers_loop, device, repeats=args.batches)
        rows.append({"run": "diffusers loop (DPMSolverMultistepScheduler)", "seconds": sec * args.batches,
                     "samples_per_s": b / sec})

        # the bare network calls and accelkit's solve alone
        x_in, t_in = torch.cat([noise, noise]).to(unet.dtype), torch.full((2 * b,), 500.0, device=device)

        def bare():
            for _ in range(steps):
                unet(x_in, t_in, encoder_hidden_states=cond_cat)

        progress("bare network calls and accelkit solve")
        from accelkit.solvers import solve

        cond = Condition(encoder_hidden_states=ehs.to(device))
        x1 = eager.prior_sample(noise)
        timed(bare, device)
        bare_s = solve_s = float("inf")
        for _ in range(3):  # interleaved, best of 3 each: a shared machine's load changes from minute to minute
            bare_s = min(bare_s, timed(bare, device)[0])
            sec, mine = timed(lambda: solve(eager, x1, "dpm++2m", steps, grid=grid, cond=cond), device)
            solve_s = min(solve_s, sec)
        agreement = float((mine.float() - ref.float()).norm() / ref.float().norm())

        couple_row("accelkit couple (eager)", eager)
        variants = []
        if args.compile:
            variants.append(("accelkit couple --compile", {"compile": True}))
        if cuda:
            variants.append(("accelkit couple --cuda-graphs", {"cuda_graphs": True}))
            if args.compile:
                variants.append(("accelkit couple --compile --cuda-graphs", {"compile": True, "cuda_graphs": True}))
        graphed_solve_s = None
        for name, flags in variants:
            teacher = teacher_with(**flags)
            couple_row(name, teacher, **flags)
            if flags == {"cuda_graphs": True}:
                graphed_solve_s, _ = timed(lambda t=teacher: solve(t, x1, "dpm++2m", steps, grid=grid, cond=cond),
                                           device, repeats=3)

        # FLOPs of one guided call
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            unet(x_in, t_in, encoder_hidden_states=cond_cat)
        flops_per_sample = counter.get_total_flops() * steps / b
        name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in name),
                                                                       None) if cuda else None
        for row in rows:
            row["tflops_achieved"] = row["samples_per_s"] * flops_per_sample / 1e12
            row["mfu"] = row["samples_per_s"] * flops_per_sample / peak if peak else None

        # reflow with LoRA: training steps per second, with and without gradient checkpointing
        from accelkit.couplings import open_couplings
        from accelkit.objectives import DenoisingObjective
        from accelkit.training import LoopConfig, LoraSettings, Trainer

        train_rows = []
        progress("reflow + LoRA training")
        for checkpointing in (False, True):
            student = load_teacher(folder, device="cpu", dtype="fp32")
            objective = DenoisingObjective(student.schedule, student.prediction, student.call, student.time_input,
                                           loss_space="x0")
            data = open_couplings(couplings).sampler(args.train_batch, 0, noise=lambda gen, k, o=objective: {
                "t": o.draw_times(gen, k)})

            def loss_fn(network, batch, objective=objective):
                pairs = {"x": batch["sample"], "eps": batch["noise"], "t": batch["t"],
                         **{k: v for k, v in batch.items() if k.startswith("cond.")}}
                return objective.loss(network, pairs)

            loop = LoopConfig(steps=10**6, lr=1e-4, ema_rates=[], checkpoint_every=0, checkpoint_interval_s=0,
                              precision="bf16" if cuda else "fp32", deterministic=False,
                              lora=LoraSettings(rank=8), gradient_checkpointing=checkpointing)
            trainer = Trainer(student.network, loss_fn, data, loop, device=device, progress=False)
            for _ in range(2):
                trainer.train_step(next(data))
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            for _ in range(args.train_steps):
                trainer.train_step(next(data))
            sync(device)
            sec = time.perf_counter() - start
            train_rows.append({"gradient_checkpointing": checkpointing, "steps_per_s": args.train_steps / sec,
                               "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None})
            del trainer, student

    base = next(r for r in rows if r["run"].startswith("diffusers"))["samples_per_s"]
    out = sys.stderr
    print(f"{'GPU ' + name if cuda else 'CPU (reduced size)'}: UNet2DConditionModel {params / 1e6:.1f} M parameters "
          f"({dtype}), batch {b} of {'x'.join(map(str, shape))} latents, {args.tokens} tokens x {width}, "
          f"DPM-Solver++(2M) {steps} steps, guidance {w}, {n} samples per couple run", file=out)
    unit, scale = ("TFLOP/s", 1.0) if cuda else ("GFLOP/s", 1e3)
    print(f"{'run':42s} {'samples/s':>10s} {'/ diffusers':>12s} {unit:>9s} {'MFU':>6s} {'first batch s':>14s}",
          file=out)
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        first = f"{r['first_batch_s']:14.1f}" if "first_batch_s" in r else " " * 14
        print(f"{r['run']:42s} {r['samples_per_s']:10.2f} {r['samples_per_s'] / base:11.2f}x "
              f"{r['tflops_achieved'] * scale:9.2f} {mfu} {first}", file=out)
    overhead = solve_s / bare_s - 1.0
    print(f"bare network calls {bare_s:.3f} s per batch; accelkit solve (eager) {solve_s:.3f} s: solver overhead "
          f"{100 * overhead:+.1f} % (target < 2 %)" + (f"; graphed solve {graphed_solve_s:.3f} s "
                                                     f"({100 * (graphed_solve_s / bare_s - 1):+.1f} %)"
                                                     if graphed_solve_s else ""), file=out)
    print(f"accelkit solve vs diffusers loop samples: relative difference {agreement:.1e}; "
          f"{flops_per_sample / 1e9:.2f} GFLOP per sample", file=out)
    for r in train_rows:
        mem = f", peak {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else ""
        print(f"reflow + LoRA rank 8, batch {args.train_batch}, gradient checkpointing "
              f"{'on ' if r['gradient_checkpointing'] else 'off'}: {r['steps_per_s']:.2f} steps/s{mem}", file=out)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "args": vars(args), "device": name, "cuda": cuda, "parameters": params, "dtype": dtype,
        "flops_per_sample": flops_per_sample, "peak_flops": peak, "rows": rows,
        "bare_network_s_per_batch": bare_s, "solve_s_per_batch": solve_s, "graphed_solve_s_per_batch": graphed_solve_s,
        "solver_overhead": overhead, "rel_diff_to_diffusers": agreement, "training": train_rows,
        "machine": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
