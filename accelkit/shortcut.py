"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024, "One Step Diffusion via Shortcut Models"), on a teacher.

On the linear path z_t = (1 - t) x0 + t eps (t = 1 noise, t = 0 data; :mod:`accelkit.linear_path`), a shortcut
model s(z_t, t, d) predicts the jump of size d: z_{t-d} = z_t - d s(z_t, t, d). The exact shortcut of a flow with
solution map Phi is

    s*(z_t, t, d) = (z_t - Phi(z_t; t -> t - d)) / d,                                        (:func:`exact_shortcut`)

which tends to the velocity v(z_t, t) as d -> 0, and two jumps of size d make one of size 2d (the flow's semigroup
property, Phi(.; t -> t - 2d) = Phi(Phi(.; t -> t - d); t - d -> t - 2d)):

    s*(z_t, t, 2d) = (s*(z_t, t, d) + s*(z', t - d, d)) / 2,   z' = z_t - d s*(z_t, t, d).

Training (the paper's Algorithm 1, in accelkit's direction of time): step sizes d = 2^-k on levels k = 0..K
(:func:`step_sizes`; K = 7 gives the paper's finest 1/128). The finest level is anchored to flow matching on data
(target eps - x0 at z_t = (1 - t) x0 + t eps) or, for a distillation, to the teacher's velocity; a share of each batch
(the paper's 1/8) learns the self-consistency target above at a level 2d with d drawn from the K levels below the
coarsest and t on d's grid (t = j d, j = 2 .. 1/d, so that t - 2d >= 0), computed with the EMA student (the paper's
0.999) without gradient, its intermediate z' and the target clipped to [-4, 4] (:func:`self_consistency_target`).
Guidance is baked into the targets at a fixed scale (the paper's workaround: a model that predicts jumps cannot be
guided at sampling), or, beyond the paper, taken as one more input over a range of scales.

Sampling: N equal steps of d = 1/N for N a power of two up to 2^K, one evaluation each (the ``shortcut`` solver,
:mod:`accelkit.solvers.self_consistency`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import AccelkitError
from .teacher import Teacher, broadcast_to

#: s(z, t, d) -> the jump velocity of size d at (z, t); t and d per sample (float64).
ShortcutFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: The paper's finest level: d = 1/128.
DEFAULT_LEVELS = 7
#: The paper's clipping of z' and of the self-consistency target.
DEFAULT_CLIP = 4.0


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def step_sizes(levels: int) -> list[float]:
    """The step sizes 1, 1/2, ..., 2^-levels, coarsest first."""
    if levels < 1:
        raise AccelkitError(f"shortcut levels {levels}: expected at least 1 (the finest step is 2^-levels)")
    return [2.0 ** -k for k in range(levels + 1)]


def check_steps(steps: int, levels: int, what: str = "steps") -> None:
    """``steps`` N equal jumps of 1/N are on a trained level: N a power of two, at most 2^levels."""
    if not is_power_of_two(steps):
        raise AccelkitError(f"{what} {steps}: a shortcut model takes N equal steps of d = 1/N with N a power of two "
                            f"(1, 2, 4, ..., {2 ** levels})")
    if steps > 2 ** levels:
        raise AccelkitError(f"{what} {steps}: this shortcut model's finest level is d = 1/{2 ** levels}; expected at "
                            f"most {2 ** levels} steps")


def draw_consistency_times(generator: torch.Generator, n: int, levels: int) -> tuple[Tensor, Tensor]:
    """(t, d) for n self-consistency samples: d = 2^-k with k uniform in 1..levels (the target is at 2d <= 1) and
    t = j d with j uniform in 2..1/d (float64)."""
    k = torch.randint(1, levels + 1, (n,), generator=generator)
    d = torch.pow(2.0, -k.double())
    j = 2 + torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (2.0 ** k - 1))
    return j * d, d


def self_consistency_target(step: ShortcutFn, z: Tensor, t: Tensor, d: Tensor,
                            clip: float | None = DEFAULT_CLIP) -> Tensor:
    """The target of s(z, t, 2d): the mean of two jumps of size d, (s(z, t, d) + s(z', t - d, d)) / 2 with
    z' = z - d s(z, t, d); z' and the target clipped to [-clip, clip] (None: no clipping). No gradient."""
    with torch.no_grad():
        s1 = step(z, t, d)
        z_mid = z - broadcast_to(d, z) * s1
        if clip is not None:
            z_mid = z_mid.clamp(-clip, clip)
        s2 = step(z_mid, t - d, d)
        target = 0.5 * (s1 + s2)
        return target.clamp(-clip, clip) if clip is not None else target


@torch.no_grad()
def exact_shortcut(teacher: Teacher, z: Tensor, t: float, d: float, cond=None, tol: float = 1e-11) -> Tensor:
    """s*(z, t, d) = (z - Phi(z; t -> t - d)) / d of ``teacher`` on the linear path (a high-accuracy solve,
    :func:`accelkit.solvers.reference.reference_solve`; float64): the ground truth of a shortcut model."""
    from .linear_path import linear_path_teacher
    from .solvers.reference import reference_solve

    lin = linear_path_teacher(teacher)
    z64 = z.detach().to(torch.float64)
    end = reference_solve(lin, z64, float(t), float(t) - float(d), cond, rtol=tol, atol=tol)
    return (z64 - end.to(z64.device)) / float(d)


__all__ = ["ShortcutFn", "DEFAULT_LEVELS", "DEFAULT_CLIP", "is_power_of_two", "step_sizes", "check_steps",
           "draw_consistency_times", "self_consistency_target", "exact_shortcut"]
