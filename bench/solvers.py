"""Solver benchmark: error vs NFE for every solver, and the solver loop's overhead over bare network calls.

1. Analytic Gaussian-mixture teachers (no network error) under the linear (flow) and DDPM linear-beta schedules;
   reference: scipy's DOP853 at rtol 1e-10 to t = 1e-4, then the x0 prediction. Grids: uniform in t and in log-SNR.
2. A small flow-matching MLP trained here on a 2-D Gaussian-mixture ring (seeded); reference as above at rtol 1e-9.
3. Overhead: wall time of ``solve`` at NFE 8 against the same number of bare network calls on the same model and
   batch, measured interleaved in the same run (best of repeats); and the solver loop's own cost per evaluation,
   measured with a zero-cost network (what solve() adds to any network, in microseconds).

    python bench/solvers.py --out bench/results/solvers.json

Tables go to stderr; the JSON (``--out``) holds every number and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.table import Table  # noqa: E402

from accelkit.console import err  # noqa: E402
from accelkit.metrics import rmse  # noqa: E402
from accelkit.models.analytic import gaussian_mixture_2d  # noqa: E402
from accelkit.schedules import DiscreteVPSchedule, LinearSchedule  # noqa: E402
from accelkit.solvers import SOLVER_NAMES, get_solver, solve, solver_grid  # noqa: E402
from accelkit.solvers.reference import reference_solve  # noqa: E402
from accelkit.teacher import NetworkTeacher  # noqa: E402

NFES = (4, 6, 8, 10, 16)
F64 = torch.float64


@torch.no_grad()
def reference_x0(teacher, x, rtol):
    end = 1e-4
    x_end = reference_solve(teacher, x, 1.0, end, rtol=rtol, atol=rtol)
    return teacher.predict_x0(x_end, torch.tensor(end, dtype=F64))


GRIDS = ("uniform", "logsnr")


def error_table(teacher, x, ref, nfes, grid) -> dict[str, dict[int, float]]:
    return {name: {n: rmse(solve(teacher, x, name, n, grid=grid), ref) for n in nfes} for name in SOLVER_NAMES}


def show_errors(title: str, errors: dict[str, dict[int, float]], nfes) -> None:
    table = Table(title=title)
    table.add_column("solver")
    for n in nfes:
        table.add_column(f"NFE {n}", justify="right")
    for name, row in errors.items():
        table.add_row(name, *(f"{row[n]:.2e}" for n in nfes))
    err.print(table)


class FlowMLP(torch.nn.Module):
    """A plain MLP u(x, t) on [x, t] (any dtype, so the reference ODE can run it in float64)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        layers, width = [], dim + 1
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        self.body = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.body(torch.cat([x, t.to(x.dtype)[:, None]], dim=1))


def call_mlp(net, x, ts, cond):
    return net(x, ts)


def train_flow_mlp(steps: int, seed: int) -> FlowMLP:
    """Conditional flow matching (Lipman et al. 2022) on the ring of 8 Gaussians: x_t = (1 - t) x0 + t eps,
    target eps - x0, t ~ U(0, 1)."""
    data = gaussian_mixture_2d(LinearSchedule(), modes=8, std=0.15)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FlowMLP()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        x0 = data.sample_data(512, generator=g).float()
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(x0.shape[0], generator=g)
        xt = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = ((net(xt, t) - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            err.print(f"  train step {step:4d}  loss {loss.item():.4f}", highlight=False)
    return net.eval()


def time_it(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def overhead(net: torch.nn.Module, batch: int, nfe: int, repeats: int) -> dict[str, dict[str, float]]:
    """Best wall time of solve() and of ``nfe`` bare network calls on the same inputs, interleaved per repeat."""
    teacher = NetworkTeacher(net, call_mlp, "flow", LinearSchedule(), (2,))
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
    results = {}
    for name in SOLVER_NAMES:
        t_in = solver_grid(teacher, name, nfe).float()[:-1].repeat(2)[:nfe]

        def bare(t_in=t_in):
            for i in range(nfe):
                net(x, t_in[i].expand(batch))

        def solver(name=name):
            solve(teacher, x, name, nfe)

        solver(), bare()  # warm-up
        t_solve, t_bare = [], []
        for _ in range(repeats):
            t_bare += time_it(bare, 1)
            t_solve += time_it(solver, 1)
        # min over repeats: on a shared machine, other processes only ever add time
        s, b = min(t_solve), min(t_bare)
        results[name] = {"solve_ms": 1e3 * s, "bare_ms": 1e3 * b, "overhead_pct": 100 * (s / b - 1),
                         "solve_median_ms": 1e3 * statistics.median(t_solve),
                         "bare_median_ms": 1e3 * statistics.median(t_bare)}
    return results


class ZeroFlow(torch.nn.Module):
    """A network that costs (almost) nothing: what remains of solve()'s time is the solver loop itself."""

    def forward(self, x, t):
        return torch.zeros_like(x)


@torch.no_grad()
def loop_cost_per_step(batch: int, nfe: int, repeats: int) -> dict[str, float]:
    """Microseconds per evaluation that solve() adds to bare calls of a zero-cost network (best of ``repeats``)."""
    net = ZeroFlow()
    teacher = NetworkTeacher(net, call_mlp, "flow", LinearSchedule(), (2,))
    x = torch.randn(batch, 2)
    t_in = torch.full((batch,), 0.5)
    out = {}
    for name in SOLVER_NAMES:
        solve(teacher, x, name, nfe)
        t_solve = min(time_it(lambda name=name: solve(teacher, x, name, nfe), repeats))
        t_bare = min(time_it(lambda: [net(x, t_in) for _ in range(nfe)], repeats))
        out[name] = 1e6 * (t_solve - t_bare) / nfe
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/solvers.json")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--overhead-batch", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="errors,overhead",
                    help="comma-separated parts to run; the others are kept from an existing --out file")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    nfes = NFES
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.samples, 2, dtype=F64, generator=g)
    report: dict = {"settings": vars(args), "nfes": list(nfes), "solvers": list(SOLVER_NAMES),
                    "steps_per_nfe": {n: {s: get_solver(s).steps(n) for s in SOLVER_NAMES} for n in nfes},
                    "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "cpus": os.cpu_count()},
                    "errors": {}}

    out = Path(args.out)
    if out.exists() and parts != {"errors", "overhead"}:
        old = json.loads(out.read_text())
        report["errors"], report["overhead"] = old.get("errors", {}), old.get("overhead", {})
        report["settings_overhead" if "errors" not in parts else "settings_errors"] = old.get("settings")
    net = None
    analytic = [("analytic, linear (flow)", LinearSchedule()), ("analytic, DDPM linear betas", DiscreteVPSchedule())]
    for label, schedule in analytic if "errors" in parts else []:
        teacher = gaussian_mixture_2d(schedule, modes=8, std=0.15)
        x = teacher.prior_sample(noise)
        ref = reference_x0(teacher, x, 1e-10)
        report["errors"][label] = {}
        for grid in GRIDS:
            report["errors"][label][grid] = errors = error_table(teacher, x, ref, nfes, grid)
            show_errors(f"RMSE to the exact endpoint: {label}, {grid} grid", errors, nfes)

    if "errors" in parts:
        err.print(f"training a flow-matching MLP for {args.train_steps} steps")
        net = train_flow_mlp(args.train_steps, args.seed)
        teacher = NetworkTeacher(net.double(), call_mlp, "flow", LinearSchedule(), (2,))
        ref = reference_x0(teacher, noise, 1e-9)
        label = f"trained flow MLP (3 x 128, {args.train_steps} steps)"
        report["errors"][label] = {}
        for grid in GRIDS:
            report["errors"][label][grid] = errors = error_table(teacher, noise, ref, nfes, grid)
            show_errors(f"RMSE to the DOP853 endpoint: {label}, {grid} grid", errors, nfes)

    if "overhead" in parts:
        torch.manual_seed(args.seed)
        net = (net or FlowMLP()).float()  # the cost of a call does not depend on the weights
        report["overhead"] = overhead(net, args.overhead_batch, 8, args.repeats)
        report["loop_us_per_eval"] = loop_cost_per_step(args.overhead_batch, 8, 5 * args.repeats)
    oh = report.get("overhead", {})
    table = Table(title=f"solve() vs bare network calls (best of {args.repeats}), NFE 8, "
                        f"batch {args.overhead_batch}, float32 MLP 3 x 128")
    for col in ("solver", "solve ms", "bare calls ms", "overhead %", "loop us / eval"):
        table.add_column(col, justify="right" if col != "solver" else "left")
    loop = report.get("loop_us_per_eval", {})
    for name, row in oh.items():
        table.add_row(name, f"{row['solve_ms']:.1f}", f"{row['bare_ms']:.1f}", f"{row['overhead_pct']:+.1f}",
                      f"{loop[name]:.0f}" if name in loop else "-")
    err.print(table)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    main()
