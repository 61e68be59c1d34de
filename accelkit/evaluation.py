"""Quality against NFE: every (teacher, solver, NFE) run on the same noise and compared with

* the teacher's own ODE endpoint from that noise (RMSE, PSNR), solved at high accuracy, and
* a sample of the data when one is given: sliced Wasserstein-2 and MMD^2 for 2-D points, the Frechet distance of
  feature statistics for images (see :mod:`accelkit.metrics`);
* the straightness of the solver's own path (Liu et al. 2022, see :func:`path_straightness`) and its curvature (the
  total turning of its direction, see :func:`path_curvature`);
* samples per second.

The evaluation draws nothing at random itself: noise and reference come from the caller (seeded), so two runs on
the same inputs print the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from . import metrics
from .solvers import solve
from .teacher import Condition, Teacher, broadcast_to


@dataclass
class QualityRow:
    """One method at one NFE."""

    method: str
    solver: str
    nfe: int
    rmse: float
    psnr: float
    sliced_w2: float | None
    mmd2: float | None
    samples_per_s: float
    frechet: float | None = None
    straightness: float | None = None
    curvature: float | None = None
    rounds: float | None = None  # sequential rounds of teacher evaluations per batch (parallel solvers: fewer)
    nfe_total: float | None = None  # teacher evaluations per sample (parallel solvers: more than nfe)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sample_batched(teacher: Teacher, noise: Tensor, solver: str, nfe: int, cond: Condition | None = None,
                   batch_size: int = 4096, **solve_kw) -> Tensor:
    """``solve`` from ``teacher.prior_sample(noise)`` in batches of ``batch_size`` rows."""
    out = []
    for i in range(0, noise.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        c = cond.index(sl) if cond is not None else None
        out.append(solve(teacher, teacher.prior_sample(noise[sl]), solver=solver, nfe=nfe, cond=c, **solve_kw))
    return torch.cat(out)


class PathRecorder(Teacher):
    """Delegates to ``base`` and keeps, for every evaluation, the time t and the ODE velocity dx/dt there."""

    def __init__(self, base: Teacher):
        super().__init__()
        self.base = base
        self.schedule = base.schedule
        self.sample_shape = base.sample_shape
        self.times: list[float] = []
        self.velocities: list[Tensor] = []

    def denoise(self, x, t, cond=None):
        x0, eps = self.base.denoise(x, t, cond)
        tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1)[:1]
        v = broadcast_to(self.schedule.d_alpha(tt), x) * x0 + broadcast_to(self.schedule.d_sigma(tt), x) * eps
        self.times.append(float(tt[0]))
        self.velocities.append(v.detach().to(torch.float64))
        return x0, eps

    def prior_sample(self, noise):
        return self.base.prior_sample(noise)


def path_straightness(x_start: Tensor, x_end: Tensor, t_start: float, t_end: float, times: Sequence[float],
                      velocities: Sequence[Tensor]) -> tuple[float, float]:
    """Straightness of one solver path (Liu, Gong & Liu 2022, "Flow straight and fast", eq. 7), normalised:

        S = int E |c - v(x_t, t)|^2 dt / ((t_start - t_end) E |c|^2),   c = (x_start - x_end) / (t_start - t_end),

    the velocity's deviation from the constant one of the straight line between the path's ends, relative to that
    line's speed; 0 exactly when every evaluated velocity equals the chord. Velocities are dx/dt in the teacher's own
    time: under a linear schedule this is Liu et al.'s measure; under others a non-constant speed along a straight
    line also counts. The integral is the left Riemann sum over
    the distinct times at which the solver evaluated the network (repeated times averaged), each held until the next
    one. Returns (the un-normalised numerator summed over rows, sum over rows of |c|^2 (t_start - t_end)), so batches
    add up; the ratio is S.
    """
    length = t_start - t_end
    chord = (x_start.double() - x_end.double()).reshape(x_start.shape[0], -1) / length
    by_time: dict[float, list[Tensor]] = {}
    for t, v in zip(times, velocities, strict=True):
        by_time.setdefault(t, []).append(((chord - v.reshape(chord.shape)) ** 2).sum(1))
    ts = sorted(by_time, reverse=True) + [t_end]
    total = torch.zeros((), dtype=torch.float64)
    for k, t in enumerate(ts[:-1]):
        total = total + (t - ts[k + 1]) * torch.stack(by_time[t]).mean(0).sum()
    return float(total), float((chord**2).sum() * length)


def path_curvature(times: Sequence[float], velocities: Sequence[Tensor]) -> float:
    """Total curvature of each solver path: the angle through which its direction turns, summed over the path.

    For a smooth curve this is int kappa ds, the integral of the curvature over arc length (e.g. Milnor 1950, "On the
    total curvature of knots"); for a polygon it is the sum of its exterior angles. The direction of the path at the
    i-th distinct evaluated time t_i (decreasing, repeated times averaged) is that of the velocity v_i there, so

        K = sum_i arccos( <v_i, v_{i+1}> / (|v_i| |v_{i+1}|) )        (radians, per sample),

    which along an Euler path is exactly the total curvature of the polygon it draws (each edge is h_i v_i). K = 0
    for a straight path whatever its speed; a circular arc through angle Theta has K = Theta in the limit of fine
    steps. It complements :func:`path_straightness`, which measures the deviation of the velocity from the chord and
    also counts a changing speed (Lee et al. 2023, "Minimizing trajectory curvature of ODE-based generative models",
    call that quantity the curvature); K is purely geometric and dimensionless. Returns the sum of K over the rows.
    """
    by_time: dict[float, list[Tensor]] = {}
    for t, v in zip(times, velocities, strict=True):
        by_time.setdefault(t, []).append(v.reshape(v.shape[0], -1).double())
    vs = [torch.stack(by_time[t]).mean(0) for t in sorted(by_time, reverse=True)]
    total = torch.zeros((), dtype=torch.float64)
    for a, b in zip(vs[:-1], vs[1:], strict=True):
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
        total = total + torch.arccos(cos.clamp(-1.0, 1.0)).sum()
    return float(total)


@torch.no_grad()
def sample_with_path_measures(teacher: Teacher, noise: Tensor, solver: str, nfe: int, cond: Condition | None = None,
                              batch_size: int = 4096, grid: str | Sequence[float] | None = None
                              ) -> tuple[Tensor, float, float]:
    """Like :func:`sample_batched`, also returning the straightness (:func:`path_straightness`) and the mean total
    curvature (:func:`path_curvature`) of the solver's own paths."""
    from .solvers import solver_grid

    ts = solver_grid(teacher, solver, nfe, grid)
    out, num, den, turn = [], 0.0, 0.0, 0.0
    for i in range(0, noise.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        c = cond.index(sl) if cond is not None else None
        rec = PathRecorder(teacher)
        x1 = teacher.prior_sample(noise[sl])
        x0 = solve(rec, x1, solver=solver, nfe=nfe, grid=ts, cond=c)
        a, b = path_straightness(x1, x0, float(ts[0]), float(ts[-1]), rec.times, rec.velocities)
        num, den, turn = num + a, den + b, turn + path_curvature(rec.times, rec.velocities)
        out.append(x0)
    return torch.cat(out), (num / den if den > 0 else math.nan), turn / max(noise.shape[0], 1)


def sample_with_straightness(teacher: Teacher, noise: Tensor, solver: str, nfe: int, cond: Condition | None = None,
                             batch_size: int = 4096) -> tuple[Tensor, float]:
    """Like :func:`sample_batched`, also returning the straightness of the solver's path (:func:`path_straightness`)."""
    x, s, _ = sample_with_path_measures(teacher, noise, solver, nfe, cond, batch_size)
    return x, s


def evaluate(teacher: Teacher, noise: Tensor, reference: Tensor, solvers: Sequence[str], nfes: Sequence[int],
             data: Tensor | None = None, method: str = "teacher", cond: Condition | None = None,
             batch_size: int = 4096, features: Callable[[Tensor], Tensor] | None = None,
             straightness: bool = False, grid: str | Sequence[float] | None = None) -> list[QualityRow]:
    """Rows of :class:`QualityRow` for every solver at every NFE on ``noise`` against ``reference`` endpoints.

    With ``data``: 2-D points get sliced W2 and MMD^2 against it; other shapes the Frechet distance between the
    Gaussian statistics of ``features(x)`` and ``features(data)`` (``features`` default: the flattened samples).
    ``straightness``: also measure the solver path's straightness and curvature (the recording is inside the timed
    run). ``grid``: the solvers' time grid (a name or the times; None: each solver's default).
    """
    rows = []
    data_stats = None
    if data is not None and tuple(data.shape[1:]) != (2,):
        data_stats = metrics.feature_statistics(_features(features, data, batch_size))
    from .solvers.parallel import is_parallel_spec, parallel_reports

    for solver in solvers:
        for nfe in nfes:
            start = time.perf_counter()
            with parallel_reports() as reports:
                if straightness and not is_parallel_spec(solver):  # a parallel window mixes times in one call
                    x, s, k = sample_with_path_measures(teacher, noise, solver, nfe, cond, batch_size, grid)
                else:
                    x, s, k = sample_batched(teacher, noise, solver, nfe, cond, batch_size, grid=grid), None, None
            seconds = max(time.perf_counter() - start, 1e-9)
            rounds, total = float(nfe), float(nfe)  # a sequential solver: every evaluation is a round
            if reports:
                rounds = sum(r.rounds for r in reports) / len(reports)
                total = sum(r.nfe * r.samples for r in reports) / sum(r.samples for r in reports)
            sw = mm = fd = None
            if data_stats is not None:
                fd = metrics.frechet_distance(*metrics.feature_statistics(_features(features, x, batch_size)),
                                              *data_stats)
            elif data is not None:
                n = min(len(x), len(data))
                sw = metrics.sliced_wasserstein(x[:n], data[:n])
                mm = metrics.mmd(x[:n], data[:n])
            rows.append(QualityRow(method, solver, int(nfe), metrics.rmse(x, reference), metrics.psnr(x, reference),
                                   sw, mm, len(x) / seconds, fd, s, k, rounds, total))
    return rows


@torch.no_grad()
def straightness(teacher: Teacher, noise: Tensor, nfe: int = 64, cond: Condition | None = None) -> float:
    """Straightness of ``teacher``'s own ODE trajectories from ``noise`` (Liu et al. 2022): the normalised S of
    :func:`path_straightness` along Euler paths of ``nfe`` steps (fine enough to follow the ODE). A rectified flow's S
    falls towards 0, where one Euler step solves its ODE exactly."""
    return sample_with_straightness(teacher, noise, "euler", nfe, cond)[1]


@torch.no_grad()
def curvature(teacher: Teacher, noise: Tensor, nfe: int = 64, cond: Condition | None = None) -> float:
    """Mean total curvature (radians, :func:`path_curvature`) of ``teacher``'s ODE trajectories from ``noise``, along
    the same Euler paths of ``nfe`` steps as :func:`straightness`."""
    return sample_with_path_measures(teacher, noise, "euler", nfe, cond)[2]


def _features(features: Callable[[Tensor], Tensor] | None, x: Tensor, batch_size: int) -> Tensor:
    if features is None:
        return x.reshape(x.shape[0], -1)
    return torch.cat([features(x[i:i + batch_size]).reshape(len(x[i:i + batch_size]), -1)
                      for i in range(0, len(x), batch_size)])


def print_quality_table(rows: Sequence[QualityRow], title: str = "quality against NFE") -> None:
    """A rich table of ``rows`` on stderr."""
    from rich.table import Table

    from .console import err

    table = Table(title=title)
    has = {"SW2": any(r.sliced_w2 is not None for r in rows), "MMD²": any(r.mmd2 is not None for r in rows),
           "FD": any(r.frechet is not None for r in rows), "straight.": any(r.straightness is not None for r in rows),
           "curv.": any(r.curvature is not None for r in rows)}
    parallel = any(r.rounds is not None and r.rounds != r.nfe for r in rows)
    cols = ["solver", "NFE", "RMSE", "PSNR", *[c for c in ("SW2", "MMD²", "FD", "straight.", "curv.") if has[c]],
            *(["rounds", "total NFE"] if parallel else []), "samp/s"]
    for col in cols:
        table.add_column(col, justify="left" if col == "solver" else "right")

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    methods = {r.method for r in rows}
    for r in rows:
        name = r.solver if len(methods) == 1 or r.method == "teacher" else f"{r.solver} ({r.method})"
        cells = {"solver": name, "NFE": str(r.nfe), "RMSE": fmt(r.rmse, ".4f"), "PSNR": fmt(r.psnr, ".1f"),
                 "SW2": fmt(r.sliced_w2, ".4f"), "MMD²": fmt(r.mmd2, ".5f"), "FD": fmt(r.frechet, ".4g"),
                 "straight.": fmt(r.straightness, ".4f"), "curv.": fmt(r.curvature, ".4f"),
                 "samp/s": fmt(r.samples_per_s, ".0f"), "rounds": fmt(r.rounds, ".1f"),
                 "total NFE": fmt(r.nfe_total, ".1f")}
        table.add_row(*[cells[c] for c in cols])
    err.print(table)


# ------------------------------------------------------------------------------------- inputs of ``accelkit eval``

#: How ``accelkit eval`` solves the first model's ODE for a reference when no couplings are given.
REFERENCE_SOLVER = "heun"
REFERENCE_NFE = 200


def reference_from_couplings(path: str, n: int, sample_shape: Sequence[int]
                             ) -> tuple[Tensor, Tensor, Condition | None, str]:
    """The first ``n`` rows of a ``couple`` artifact: noise, the teacher's ODE endpoints, the conditions they were
    drawn with (``cond.*`` columns, None when there are none), and a description of them."""
    from .couplings import open_couplings
    from .errors import AccelkitError

    try:
        pairs = open_couplings(path)
    except AccelkitError as e:
        raise AccelkitError(f"--reference {path}: {e}; expected a couple artifact") from None
    if tuple(pairs.sample_shape) != tuple(sample_shape):
        raise AccelkitError(f"--reference {path}: its samples have shape {list(pairs.sample_shape)}, the models "
                            f"make {list(sample_shape)}; expected couplings of the same teacher")
    if n > len(pairs):
        raise AccelkitError(f"-n {n}: --reference {path} holds only {len(pairs)} pairs")
    pairs.keys = [k for k in pairs.keys if k in ("noise", "sample") or k.startswith("cond.")]
    rows = pairs[:n]
    fields = {k[len("cond."):]: v for k, v in rows.items() if k.startswith("cond.")}
    cond = None
    if fields:
        known = ("class_labels", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
        cond = Condition(**{k: v for k, v in fields.items() if k in known},
                         extra={k: v for k, v in fields.items() if k not in known})
    r = pairs.recipe
    return rows["noise"], rows["sample"], cond, f"couplings {path} ({r.get('solver')}, {r.get('nfe')} NFE)"


def couplings_size(path: str) -> int:
    """The number of pairs in a ``couple`` artifact (its manifest only; the shards are not opened)."""
    from .artifacts import Artifact
    from .errors import AccelkitError

    try:
        return int(Artifact.read(path, "couple").manifest["summary"]["samples"])
    except AccelkitError as e:
        raise AccelkitError(f"--reference {path}: {e}; expected a couple artifact") from None


def train_data_name(path: str) -> str | None:
    """The data set named in the recipe of a ``train`` artifact (or of the teacher a rescale / couple artifact
    names, followed back), else None."""
    import json
    from pathlib import Path

    seen: set[str] = set()
    p = Path(path)
    while str(p) not in seen and (p / "manifest.json").is_file():
        seen.add(str(p))
        try:
            m = json.loads((p / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        recipe = m.get("recipe") or {}
        if m.get("kind") == "train":
            return recipe.get("data")
        nxt = recipe.get("teacher")
        if not isinstance(nxt, str):
            return None
        p = Path(nxt)
    return None


def recommended_grid(path: str) -> list[float] | None:
    """The sampling grid a model recommends for itself (the times of :func:`accelkit.sampling.recorded_sampler`,
    which phased ``accelkit reflow`` and ``accelkit distill`` students and exports record), else None."""
    from .sampling import recorded_sampler

    recorded = recorded_sampler(path)
    return recorded["grid"] if recorded is not None and isinstance(recorded["grid"], list) else None
