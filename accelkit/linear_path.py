"""Any teacher as a velocity on the linear path, and its classifier-free-guided velocity at per-sample scales.

Shortcut models (Frans et al. 2024) and MeanFlow (Geng et al. 2025) are stated for the linear (rectified-flow)
path z_t = (1 - t) x0 + t eps, whose velocity is v = dz/dt = eps - x0 and whose one-step jump from t to r is
z_r = z_t - (t - r) u. A teacher on another schedule (a VP eps model, an EDM x0 model) describes the same ODE on
that path after the scale-time transformation (Shaul et al. 2023; :class:`accelkit.teacher.RescaledTeacher`):

    z(r) = s(r) x_A(t_A(r)),  lambda_A(t_A(r)) = lambda_linear(r),
    (x0_hat, eps_hat)(z, r) = teacher.denoise(z / s(r), t_A(r)),  v(z, r) = eps_hat - x0_hat,

so a student built on the teacher's network and trained on the linear path keeps the teacher's network, prediction
type and time input, and is read through the same transformation (:func:`linear_path_teacher`). A teacher already on
the linear schedule is used as it is (no transformation, so its outputs stay bit for bit its own).

Guidance: out_null + g (out_cond - out_null) is affine in the network's output, and the velocity is linear in
(x0_hat, eps_hat), which are affine in the output at fixed (z, t): the guided velocity is v_null + g (v_cond - v_null)
for the per-sample scales g of :func:`guided_velocity` (accelkit's scale g: 1 = unguided).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .schedules import LinearSchedule
from .teacher import Condition, Teacher, broadcast_to


def linear_path_teacher(teacher: Teacher) -> Teacher:
    """``teacher`` on the linear schedule: itself if it is on it, else under the scale-time transformation."""
    from .teacher import RescaledTeacher

    if teacher.schedule.name == "linear":
        return teacher
    return RescaledTeacher(teacher, LinearSchedule())


def linear_path_record(teacher: Teacher) -> dict[str, Any]:
    """What an artifact says about the path its student was trained on (the teacher's schedule and the conversion)."""
    own = teacher.schedule.config()
    if teacher.schedule.name == "linear":
        return {"path": "linear", "teacher_schedule": own, "conversion": "none (the teacher is on the linear path)"}
    return {"path": "linear", "teacher_schedule": own,
            "conversion": f"rescaled from {teacher.schedule.name} to the linear path (scale-time transformation: "
                          "z = s(r) x(t(r)) at equal log-SNR); the network keeps its own schedule and is read "
                          "through the transformation"}


def null_condition_of(teacher: Teacher, cond: Condition, batch: int) -> Condition:
    """The null condition of a guided teacher for a conditional batch of ``batch`` rows."""
    null = getattr(teacher, "null_condition", None)
    if null is None:
        raise ValueError("guidance needs a null condition, and this teacher has none")
    null = null(cond) if callable(null) else null
    device = next(iter(cond.tensors().values())).device
    return null.map(lambda v: (v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v).to(device))


def guided_velocity(teacher: Teacher, z: Tensor, t: Tensor, cond: Condition | None,
                    scale: Tensor | float | None) -> Tensor:
    """The linear-path velocity of ``teacher`` (on the linear schedule, see :func:`linear_path_teacher`; its own
    guidance scale 1) at (z, t), guided at per-sample ``scale`` g: v_null + g (v_cond - v_null) from one batched
    evaluation of the conditional and null inputs. ``scale`` None or 1, or no condition: the plain velocity."""
    if cond is None or scale is None or (not isinstance(scale, Tensor) and float(scale) == 1.0):
        return teacher.velocity(z, t, cond)
    b = z.shape[0]
    both = Condition.cat(cond, null_condition_of(teacher, cond, b))
    t2 = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim else t
    v = teacher.velocity(torch.cat([z, z]), t2, both)
    v_c, v_u = v[:b], v[b:]
    g = scale if isinstance(scale, Tensor) else torch.tensor(float(scale), dtype=torch.float64)
    return v_u + broadcast_to(g.to(torch.float64), z) * (v_c - v_u)


__all__ = ["linear_path_teacher", "linear_path_record", "guided_velocity", "null_condition_of"]
