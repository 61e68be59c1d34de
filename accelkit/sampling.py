"""Drawing samples from a teacher's probability-flow ODE, batch by batch, batch-size invariant.

Sample i starts from the noise of (seed, i) (:func:`accelkit.noise.sample_noise`) and the condition of index i, so
the samples are the same whatever the batch size (up to the floating-point differences of batched kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import AccelkitError
from .noise import sample_noise
from .solvers import solve
from .teacher import Condition, Teacher

#: Gives the condition of a list of sample indices (or None for unconditional sampling).
ConditionFn = Callable[[list[int]], "Condition | None"]


def cycled_condition(cond: Condition) -> ConditionFn:
    """Sample i takes row i mod R of a condition with R rows (R = 1: every sample the same)."""
    rows = cond.batch_size() or 1

    def condition(indices: list[int]) -> Condition:
        idx = torch.tensor([i % rows for i in indices])
        return cond.map(lambda v: v[idx.to(v.device)])

    return condition


def class_label_condition(labels: Sequence[int]) -> ConditionFn:
    """Sample i takes class label ``labels[i mod len(labels)]``."""
    if not labels:
        raise AccelkitError("class labels: expected at least one")
    return cycled_condition(Condition(class_labels=torch.tensor(list(labels), dtype=torch.long)))


@torch.no_grad()
def draw_samples(
    teacher: Teacher,
    n: int,
    *,
    seed: int,
    solver: str,
    nfe: int,
    grid: str | Sequence[float] | None = None,
    grid_kw: dict | None = None,
    batch_size: int = 64,
    condition: ConditionFn | None = None,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """``n`` samples (float32, on the CPU) of the teacher's ODE from the noise of (seed, 0) ... (seed, n - 1).

    Each batch starts at t = 1 from ``teacher.prior_sample(noise)`` and is integrated to t = 0 by
    :func:`accelkit.solvers.solve` in ``nfe`` evaluations on ``grid`` (None: the solver's default for the schedule;
    ``grid_kw`` such as ``shift`` go to the grid). ``on_batch(k)`` is called after each batch of k samples.
    """
    if n < 1:
        raise AccelkitError(f"number of samples {n}: expected at least 1")
    if batch_size < 1:
        raise AccelkitError(f"batch size {batch_size}: expected at least 1")
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        noise = sample_noise(seed, idx, teacher.sample_shape, device=device)
        cond = condition(idx) if condition is not None else None
        if cond is not None:
            cond = cond.map(lambda v: v.to(device))
        x = solve(teacher, teacher.prior_sample(noise), solver=solver, nfe=nfe, grid=grid, cond=cond,
                  **(grid_kw or {}))
        out.append(x.float().cpu())
        if on_batch is not None:
            on_batch(len(idx))
    return torch.cat(out)


__all__ = ["draw_samples", "cycled_condition", "class_label_condition", "ConditionFn"]
