"""Parallel sampling: the same sample as a sequential solver, in fewer sequential rounds of teacher evaluations,
by evaluating many steps of the time grid at once (more total NFE, fewer rounds; it pays where the hardware has
spare parallel compute, e.g. at batch 1 on a GPU).

Both methods wrap a one-step base solver on the fine grid t_0 > ... > t_N, written as the step map

    x_{j+1} = Phi_j(x_j) = a_j x_j + c_j f(x_j, t_j),

with ``euler`` (f the ODE velocity, a_j = 1, c_j = t_{j+1} - t_j) or ``ddim`` (f the x0 prediction,
a_j = sigma_{j+1} / sigma_j, c_j = -alpha_{j+1} (e^{-h_j} - 1), h_j the step in lambda = log(alpha / sigma); the
first-order DPM-Solver++ step). Multistep solvers (dpm++2m, unipc, ipndm) carry history across steps and learned
solvers step on their own times: neither is a step map of this form, so neither can be wrapped.

**Picard iteration / ParaDiGMS** (Shih et al. 2023, "Parallel Sampling of Diffusion Models", arXiv 2305.16317).
A window of P steps j = b .. b + P - 1 is updated at once from the previous iterate,

    x^{k+1}_{b+i+1} = x_b + sum_{j=b}^{b+i} (Phi_j(x^k_j) - x^k_j),

the P evaluations of f forming one batched teacher call (one sequential round). Step i of the window has converged
when ||x^{k+1}_{b+i+1} - x^k_{b+i+1}||^2 / d < tol^2 sigma(t_{b+i})^2 (d elements per sample; the paper's test,
scaled by the noise level at the step's start, which is never 0); the window then slides past the first unconverged
step, its new steps starting from its last state. The first step of a window is exact (x_b is final), so every
round advances at least one step: at most N rounds, and with tolerance 0 the fixed point is the sequential solve
itself. We apply the sum recursively, x^{k+1}_{b+i+1} = Phi_{b+i}(x^k_{b+i}) + (x^{k+1}_{b+i} - x^k_{b+i}), which at
the fixed point is the sequential step bit for bit.

**Parareal / SRDS** (Lions et al. 2001; Selvam et al. 2024, "Self-Refining Diffusion Samplers", arXiv 2412.08292).
The grid is cut into M blocks (default about sqrt(N)) with boundaries T_0 > ... > T_M. The coarse solver G_n is one
base step from T_n to T_{n+1}; the fine solver F_n the base solver's own steps over block n, all blocks' fine solves
batched together (one round per fine step). From U^0 given by the coarse sweep,

    U^{k+1}_0 = x,   U^{k+1}_{n+1} = G_n(U^{k+1}_n) + F_n(U^k_n) - G_n(U^k_n)

(the coarse sweep is sequential: one round per block). After k iterations U_0 .. U_k are exact (the first k blocks
are the sequential fine solve), so M iterations reproduce it exactly; a sample stops early once no block endpoint
moved by more than ``tol`` (root mean square over its elements) in an iteration. Blocks already exact are neither
fine-solved nor swept again.

Convergence is tested per sample, so a sample's result does not depend on the other samples of its batch. Each
``sample`` call records a :class:`ParallelReport` (sequential rounds, teacher evaluations per sample, wall clock,
next to the sequential solver's rounds and NFE); :func:`parallel_reports` collects them for the commands.

Solver names: ``picard:BASE[:window=P][:tol=T]`` and ``parareal:BASE[:blocks=M][:tol=T][:iterations=K]``, e.g.
``picard:euler:window=16:tol=0.1`` (:func:`parallel_spec` writes them); ``accelkit sample / couple / eval
--parallel picard|parareal`` build them from ``--solver``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..errors import AccelkitError
from ..teacher import Condition, Teacher
from .base import Solver, host_to_device, on_device

METHODS = ("picard", "parareal")
#: Base solvers a parallel method can wrap: one-step maps x -> a x + c f(x, t).
BASES = ("euler", "ddim")
DEFAULT_TOL = {"picard": 0.1, "parareal": 5e-3}
DEFAULT_WINDOW = 16


# --------------------------------------------------------------------------------------------------- reports


@dataclass
class ParallelReport:
    """One batch of a parallel solve: its cost next to the sequential solver's on the same grid."""

    solver: str
    samples: int
    steps: int
    rounds: int
    sequential_rounds: int
    nfe: float  # teacher evaluations per sample (mean over the batch)
    sequential_nfe: int
    seconds: float
    iterations: int

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"{self.solver}: {self.samples} samples, {self.rounds} sequential rounds (sequential "
                f"{self.sequential_rounds}), {self.nfe:.1f} NFE per sample (sequential {self.sequential_nfe}), "
                f"{self.seconds:.3f} s")


_COLLECTORS: list[list[ParallelReport]] = []


@contextmanager
def parallel_reports() -> Iterator[list[ParallelReport]]:
    """Collect the :class:`ParallelReport` of every parallel solve run inside the block, in order."""
    reports: list[ParallelReport] = []
    _COLLECTORS.append(reports)
    try:
        yield reports
    finally:
        _COLLECTORS.remove(reports)


def _report(r: ParallelReport) -> None:
    for c in _COLLECTORS:
        c.append(r)


# ------------------------------------------------------------------------------------------------- step map


def step_coefficients(base: str, schedule, t_from: Tensor, t_to: Tensor) -> tuple[list[float], list[float]]:
    """(a_j, c_j) of the step map x -> a x + c f(x, t_from) from each ``t_from`` to ``t_to`` (float64, host),
    computed as :class:`~accelkit.solvers.runge_kutta.Euler` and the first-order DPM-Solver++ do."""
    if base == "euler":
        return [1.0] * len(t_from), (t_to - t_from).tolist()
    alpha_to, sigma_from, sigma_to = schedule.alpha(t_to), schedule.sigma(t_from), schedule.sigma(t_to)
    lam_from, lam_to = 0.5 * schedule.log_snr(t_from), 0.5 * schedule.log_snr(t_to)
    a = [float(s1 / s0) for s0, s1 in zip(sigma_from, sigma_to, strict=True)]
    c = [-float(al) * math.expm1(-(float(l1) - float(l0))) for al, l0, l1 in zip(alpha_to, lam_from, lam_to,
                                                                                  strict=True)]
    return a, c


def _f(base: str, teacher: Teacher, x: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
    return teacher.velocity(x, t, cond) if base == "euler" else teacher.predict_x0(x, t, cond)


def _apply(base: str, a: Tensor, c: Tensor, x: Tensor, f: Tensor) -> Tensor:
    """a x + c f with per-row a, c (x of shape (R, ...)); Euler's a = 1 is not multiplied, as Euler does not."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x if base == "euler" else a.reshape(shape) * x) + c.reshape(shape) * f


def _rows(cond: Condition | None, idx: Tensor) -> Condition | None:
    """The condition of the evaluated rows (sample ``idx[r]`` for row r)."""
    return cond.index(idx) if cond is not None else None


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


class ParallelSolver(Solver):
    """What Picard and Parareal share: the base solver, the tolerance and the name that rebuilds them."""

    method = "parallel"

    def __init__(self, base: str = "euler", tol: float | None = None):
        if base not in BASES:
            raise AccelkitError(f"{self.method} wraps a one-step solver ({', '.join(BASES)}), not {base!r}: "
                                "multistep and learned solvers carry state between steps")
        tol = DEFAULT_TOL[self.method] if tol is None else float(tol)
        if not (math.isfinite(tol) and tol >= 0):
            raise AccelkitError(f"{self.method} tol {tol}: expected a number >= 0")
        self.base, self.tol = base, tol

    def steps(self, nfe: int) -> int:
        return nfe  # the base solver's: one evaluation per step on the fine grid


class Picard(ParallelSolver):
    """ParaDiGMS: Picard iteration over a sliding window of ``window`` steps (see the module docstring)."""

    method = "picard"

    def __init__(self, base: str = "euler", window: int = DEFAULT_WINDOW, tol: float | None = None):
        super().__init__(base, tol)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise AccelkitError(f"picard window {window!r}: expected an integer of at least 1")
        self.window = window
        self.name = parallel_spec("picard", base, window=window, tol=self.tol)

    @torch.no_grad()
    def sample(self, teacher: Teacher, x: Tensor, ts: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
        start = time.perf_counter()
        n, bsz, dev = len(ts) - 1, x.shape[0], x.device
        p = min(self.window, n)
        a_h, c_h = step_coefficients(self.base, teacher.schedule, ts[:-1], ts[1:])
        a, c, t = on_device(a_h, x), on_device(c_h, x), host_to_device(ts, dev)
        # threshold on the mean squared change of step j's result: tol^2 sigma(t_j)^2
        thr = on_device((self.tol * teacher.schedule.sigma(ts[:-1].to(torch.float64))) ** 2, x)
        # each sample's window: the states x_b .. x_{b+P} of its current window start b (memory (P + 1) per sample)
        win = x.unsqueeze(1).repeat(1, p + 1, *([1] * (x.ndim - 1)))
        b = torch.zeros(bsz, dtype=torch.long, device=dev)
        col = torch.arange(bsz, device=dev)
        offsets = torch.arange(p, device=dev)
        positions = torch.arange(p + 1, device=dev)
        rounds = evaluations = 0
        while True:
            active = b < n
            if not bool(active.any()):
                break
            j = b[:, None] + offsets  # (B, P) step indices
            valid = (j < n) & active[:, None]
            rs, ri = valid.nonzero(as_tuple=True)
            js = j[rs, ri]
            xs = win[rs, ri]  # x^k_{b+i}
            f = _f(self.base, teacher, xs, t[js], _rows(cond, rs))
            rounds, evaluations = rounds + 1, evaluations + len(js)
            phi = torch.zeros((bsz, p, *x.shape[1:]), dtype=x.dtype, device=dev)
            phi[rs, ri] = _apply(self.base, a[js], c[js], xs, f)
            new, cur = [], phi[:, 0]
            for i in range(p):  # x^{k+1}_{b+i+1} = Phi(x^k_{b+i}) + (x^{k+1}_{b+i} - x^k_{b+i})
                cur = phi[:, i] + (cur - win[:, i]) if i else cur
                new.append(cur)
            new_t = torch.stack(new, 1)  # (B, P, ...)
            err = (new_t - win[:, 1:]).pow(2).reshape(bsz, p, -1).mean(-1)
            ok = (err <= thr[j.clamp(max=n - 1)]) & valid
            ok[:, 0] = valid[:, 0]  # the window's first step starts from a final state
            advance = ok.long().cumprod(1).sum(1)
            filled = valid.long().sum(1)  # window positions 1 .. filled now hold new states
            win[rs, ri + 1] = new_t[rs, ri]
            # slide: position m takes old position m + advance; past the computed ones, the window's last state
            src = torch.minimum(positions[None, :] + advance[:, None], filled[:, None])
            win = win[col[:, None], src]
            b = torch.where(active, (b + advance).clamp(max=n), b)
        _sync(x)
        _report(ParallelReport(self.name, bsz, n, rounds, n, evaluations / bsz, n, time.perf_counter() - start,
                               rounds))
        return win[:, 0]


class Parareal(ParallelSolver):
    """SRDS: Parareal over ``blocks`` blocks of the fine grid (see the module docstring)."""

    method = "parareal"

    def __init__(self, base: str = "euler", blocks: int | None = None, tol: float | None = None,
                 iterations: int | None = None):
        super().__init__(base, tol)
        for key, v in (("blocks", blocks), ("iterations", iterations)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise AccelkitError(f"parareal {key} {v!r}: expected an integer of at least 1")
        self.blocks, self.iterations = blocks, iterations
        self.name = parallel_spec("parareal", base, blocks=blocks, tol=self.tol, iterations=iterations)

    def boundaries(self, n: int) -> list[int]:
        """Grid indices K_0 = 0 < ... < K_M = n of the block ends (block sizes differ by at most one)."""
        m = min(n, self.blocks if self.blocks is not None else max(1, round(math.sqrt(n))))
        return [round(k * n / m) for k in range(m + 1)]

    def sample(self, teacher: Teacher, x: Tensor, ts: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
        return self.block_endpoints(teacher, x, ts, cond)[-1]

    @torch.no_grad()
    def block_endpoints(self, teacher: Teacher, x: Tensor, ts: Tensor, cond: Condition | None = None) -> Tensor:
        """U_0 .. U_M (shape (M + 1, B, ...)) after the iterations run (all M, or ``iterations``, or fewer where
        every sample met the tolerance); U_M is the sample."""
        start = time.perf_counter()
        n, bsz, dev = len(ts) - 1, x.shape[0], x.device
        k_idx = self.boundaries(n)
        m = len(k_idx) - 1
        sizes = [k_idx[i + 1] - k_idx[i] for i in range(m)]
        fa_h, fc_h = step_coefficients(self.base, teacher.schedule, ts[:-1], ts[1:])
        fa, fc, t = on_device(fa_h, x), on_device(fc_h, x), host_to_device(ts, dev)
        tb = ts[k_idx]
        ga_h, gc_h = step_coefficients(self.base, teacher.schedule, tb[:-1], tb[1:])
        ga, gc = on_device(ga_h, x), on_device(gc_h, x)
        kd = torch.tensor(k_idx, dtype=torch.long, device=dev)
        all_rows = torch.arange(bsz, device=dev)
        rounds = evaluations = 0

        def coarse(nb: int, u: Tensor, rows: Tensor) -> Tensor:
            f = _f(self.base, teacher, u, t[kd[nb]].expand(len(rows)), _rows(cond, rows))
            return _apply(self.base, ga[nb].expand(len(rows)), gc[nb].expand(len(rows)), u, f)

        u = [x] + [None] * m  # block endpoints U_0 .. U_M, (B, ...) each
        g_old: list[Tensor] = [None] * m  # G_n(U_n) of the last sweep
        for nb in range(m):
            g_old[nb] = coarse(nb, u[nb], all_rows)
            u[nb + 1] = g_old[nb]
            rounds, evaluations = rounds + 1, evaluations + bsz
        u_t = torch.stack(u)  # (M + 1, B, ...)
        g_t = torch.stack(g_old)  # (M, B, ...)
        f_t = torch.zeros_like(g_t)  # F_n(U_n) of the last fine solve
        active = torch.ones(bsz, dtype=torch.bool, device=dev)
        iterations = 0
        for k in range(1, min(m, self.iterations or m) + 1):
            if not bool(active.any()):
                break
            iterations = k
            rows = active.nonzero(as_tuple=True)[0]
            first = k - 1  # blocks before it start from exact states whose fine solves are already known
            blocks = torch.arange(first, m, device=dev)
            # fine solves of blocks first .. M-1 for the active samples, batched: rows (block, sample)
            bi = blocks.repeat_interleave(len(rows))
            si = rows.repeat(len(blocks))
            y = u_t[bi, si]
            size_t = torch.tensor(sizes, device=dev)[bi]
            for step in range(max(sizes[first:])):
                live = (step < size_t).nonzero(as_tuple=True)[0]
                js = kd[bi[live]] + step
                f = _f(self.base, teacher, y[live], t[js], _rows(cond, si[live]))
                y[live] = _apply(self.base, fa[js], fc[js], y[live], f)
                rounds, evaluations = rounds + 1, evaluations + len(live)
            f_t[bi, si] = y
            # sequential coarse sweep with the Parareal correction
            new_u = u_t.clone()
            new_u[first + 1, rows] = f_t[first, rows]  # U_first is unchanged: no correction
            for nb in range(first + 1, m):
                g_new = coarse(nb, new_u[nb, rows], rows)
                new_u[nb + 1, rows] = f_t[nb, rows] + (g_new - g_t[nb, rows])
                g_t[nb, rows] = g_new
                rounds, evaluations = rounds + 1, evaluations + len(rows)
            change = (new_u[:, rows] - u_t[:, rows]).pow(2).reshape(m + 1, len(rows), -1).mean(-1).sqrt()
            u_t = new_u
            done = change.amax(0) <= self.tol
            active[rows[done]] = False
        _sync(x)
        _report(ParallelReport(self.name, bsz, n, rounds, n, evaluations / bsz, n, time.perf_counter() - start,
                               iterations))
        return u_t


# ---------------------------------------------------------------------------------------------------- names


def parallel_spec(method: str, base: str, **options) -> str:
    """The solver name of a parallel method over ``base`` with its options (None: left at the default)."""
    if method not in METHODS:
        raise AccelkitError(f"--parallel {method!r}: expected one of {', '.join(METHODS)}")
    parts = [method, base] + [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in options.items() if v is not None]
    return ":".join(parts)


def is_parallel_spec(name: object) -> bool:
    return isinstance(name, str) and name.split(":", 1)[0] in METHODS and ":" in name


def parse_parallel(name: str) -> ParallelSolver:
    """The solver a :func:`parallel_spec` name describes, or an AccelkitError naming what is wrong with it."""
    method, base, *opts = name.split(":")
    allowed = {"picard": {"window": int, "tol": float},
               "parareal": {"blocks": int, "tol": float, "iterations": int}}[method]
    kw = {}
    for o in opts:
        key, _, value = o.partition("=")
        if key not in allowed:
            raise AccelkitError(f"solver {name!r}: unknown option {key!r}; {method} takes "
                                f"{', '.join(sorted(allowed))}")
        try:
            kw[key] = allowed[key](value)
        except ValueError:
            raise AccelkitError(f"solver {name!r}: {key}={value!r} is not a number") from None
    return Picard(base, **kw) if method == "picard" else Parareal(base, **kw)


def wrap(method: str | None, base: str, *, window: int | None = None, tol: float | None = None,
         blocks: int | None = None) -> str:
    """The name of ``method`` over the solver ``base`` (checked: a learned or multistep solver is refused), for
    the ``--parallel`` options of the commands; ``method`` None returns ``base`` (and refuses the options)."""
    if method is None:
        given = [f"--{k}" for k, v in (("window", window), ("tol", tol), ("blocks", blocks)) if v is not None]
        if given:
            raise AccelkitError(f"{', '.join(given)}: options of --parallel picard|parareal, which is not given")
        return base
    if method not in METHODS:
        raise AccelkitError(f"--parallel {method!r}: expected one of {', '.join(METHODS)}")
    if method == "picard" and blocks is not None:
        raise AccelkitError("--blocks applies to --parallel parareal; picard takes --window and --tol")
    if method == "parareal" and window is not None:
        raise AccelkitError("--window applies to --parallel picard; parareal takes --blocks and --tol")
    if base not in BASES:
        from .base import is_solver, solver_names

        if not is_solver(base):
            raise AccelkitError(f"--solver {base!r}: unknown solver; --parallel {method} wraps {', '.join(BASES)}")
        what = "a learned solver (it steps on its own times)" if base not in solver_names() else \
            "a multistep or multi-stage solver"
        raise AccelkitError(f"--parallel {method} cannot wrap --solver {base}: {what}; it wraps the one-step "
                            f"solvers {', '.join(BASES)}")
    name = parallel_spec(method, base, window=window, blocks=blocks, tol=tol)
    parse_parallel(name)  # checks the values
    return name


__all__ = ["Picard", "Parareal", "ParallelSolver", "ParallelReport", "parallel_reports", "parallel_spec",
           "parse_parallel", "is_parallel_spec", "wrap", "step_coefficients", "METHODS", "BASES"]
