"""A teacher's network used as a K-step generator on fixed times: the student of score distillation (DMD, DMD2,
VSD, SIM) and of adversarial post-training (LADD).

The generator G keeps the teacher's network, prediction type and schedule. It runs on K fixed times
1 = t_0 > t_1 > ... > t_{K-1} (and t_K = 0): at step k it predicts the clean sample from its state,

    x0_k = G_x0(x_{t_k}, t_k),                 eps_k = (x_{t_k} - alpha(t_k) x0_k) / sigma(t_k),

and moves to the next time along that prediction (a DDIM step, Song et al. 2021; Euler on the linear schedule),

    x_{t_{k+1}} = alpha(t_{k+1}) x0_k + sigma(t_{k+1}) eps_k,

so its last step returns x0_{K-1}. This is exactly ``solve(student, prior(z), "ddim" | "euler", nfe=K, grid=times)``
with the times of :func:`generator_times` (the K windows' boundaries of :func:`accelkit.phased.window_boundaries`):
the artifact records that sampler (:func:`generator_sampling`), so ``accelkit sample`` / ``couple`` / ``eval`` /
``export`` use it without flags.

**Backward simulation** (DMD2, Yin et al. 2024, "Improved distribution matching distillation for fast image
synthesis", Sec. 4.5): a K > 1 generator is trained at each of its times on the states it produces itself, not on
noised data. Sample i draws a step k_i uniform in {0, ..., K-1}; the generator runs from its noise without gradients
to x_{t_{k_i}}, and its prediction x0_{k_i} there (with gradients) is the sample the losses see
(:func:`generate`). K = 1: x0 = G_x0(prior(z), 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import AccelkitError
from .schedules import Schedule
from .teacher import Condition, Teacher


def generator_times(schedule: Schedule, steps: int) -> Tensor:
    """The K + 1 times 1 = t_0 > ... > t_K = 0 of a K-step generator (float64): the default K-step grid of the
    schedule, rounded to the grid of a discrete one (an error where it has fewer steps than K)."""
    from .phased import window_boundaries

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AccelkitError(f"generator steps {steps!r}: expected an integer of at least 1")
    try:
        return window_boundaries(schedule, steps)
    except AccelkitError as e:
        raise AccelkitError(f"--steps {steps}: the generator's time grid cannot take it ({e})") from None


def generator_sampling(schedule: Schedule, steps: int) -> dict:
    """The sampler recorded with a K-step generator: {solver, nfe, grid} (see the module docstring)."""
    from .phased import recommended_sampling

    generator_times(schedule, steps)
    return recommended_sampling(schedule, steps)


def _step(generator: Teacher, x: Tensor, t: Tensor, t_next: Tensor, cond: Condition | None) -> tuple[Tensor, Tensor]:
    """(x0_k, x_{t_{k+1}}) from x_{t_k}: the generator's prediction and the DDIM move along it."""
    sch = generator.schedule
    x0 = generator.predict_x0(x, t.to(x.device), cond)
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    a_n, s_n = float(sch.alpha(t_next)), float(sch.sigma(t_next))
    eps = (x - a * x0) / s
    return x0, a_n * x0 + s_n * eps


def generate(generator: Teacher, noise: Tensor, times: Tensor, cond: Condition | None = None,
             stop: Tensor | None = None) -> Tensor:
    """The generator's clean-sample predictions for standard normal ``noise``.

    ``stop`` (per-sample step indices k_i in 0..K-1; None: K-1 for all) selects backward simulation: each sample's
    result is x0_{k_i}, with gradients through that step only. ``stop = K-1`` for all is the full K-step sample."""
    k_total = len(times) - 1
    n = noise.shape[0]
    if stop is None:
        stop = torch.full((n,), k_total - 1, dtype=torch.long)
    stop = stop.to(torch.long).cpu()
    if int(stop.min()) < 0 or int(stop.max()) >= k_total:
        raise ValueError(f"stop indices must lie in 0..{k_total - 1}")
    rows: list[Tensor] = []
    preds: list[Tensor] = []
    x = generator.prior_sample(noise)
    alive = torch.arange(n)  # the rows still running (stop >= k); x holds their states, in this order
    for k in range(int(stop.max()) + 1):
        here = stop[alive] == k
        if bool(here.any()):
            pos = here.nonzero().reshape(-1).to(x.device)
            c = cond.index(alive[here].to(noise.device)) if cond is not None else None
            preds.append(generator.predict_x0(x[pos], times[k].to(x.device), c))
            rows.append(alive[here])
        if not bool(here.all()):
            pos = (~here).nonzero().reshape(-1).to(x.device)
            c = cond.index(alive[~here].to(noise.device)) if cond is not None else None
            with torch.no_grad():
                _, x = _step(generator, x[pos], times[k], times[k + 1], c)
        alive = alive[~here]
    order = torch.argsort(torch.cat(rows)).to(noise.device)
    return torch.cat(preds)[order]


__all__ = ["generator_times", "generator_sampling", "generate"]
