"""Denoising training objectives: flow matching and DDPM-style noise prediction as one regression.

Draw data x0, noise eps ~ N(0, I) and a time t, form x_t = alpha(t) x0 + sigma(t) eps, and regress the network's
output at (x_t, t) on the quantity its prediction type names:

    L = E || f_theta(x_t, tau(t)) - target(x0, eps, t) ||^2,

with target from :func:`accelkit.teacher.x0_eps_to_output` and tau the network's timestep input
(:class:`accelkit.teacher.TimeInput`). Two standard instances:

* **flow matching** (Lipman et al. 2022; Liu et al. 2022, rectified flow): the linear schedule alpha = 1 - t,
  sigma = t, prediction ``flow`` (target eps - x0), t ~ U(0, 1);
* **DDPM** (Ho et al. 2020): a discrete VP schedule of N steps, prediction ``eps``, a step k ~ U{0, ..., N - 1},
  which is t = (k + 1) / N on accelkit's time axis.

The time and the noise are drawn by :meth:`DenoisingObjective.draw` from the data sampler's per-batch generator, so
they belong to the sample, not to the process: a resumed or multi-process run sees the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .schedules import DiscreteVPSchedule, Schedule, as_time
from .teacher import NetworkFn, TimeInput, broadcast_to, x0_eps_to_output


@dataclass
class DenoisingObjective:
    """Regression of ``call(network, x_t, time_input(t), None)`` on the ``prediction`` target under ``schedule``."""

    schedule: Schedule
    prediction: str
    call: NetworkFn
    time_input: TimeInput = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.time_input is None:
            self.time_input = TimeInput.for_schedule(self.schedule)

    @property
    def discrete(self) -> bool:
        return isinstance(self.schedule, DiscreteVPSchedule)

    def draw_times(self, generator: torch.Generator, n: int) -> Tensor:
        """t ~ U(0, 1), or t = (k + 1) / N with k ~ U{0..N-1} for a discrete schedule (float64)."""
        if self.discrete:
            steps = self.schedule.num_train_timesteps
            k = torch.randint(0, steps, (n,), generator=generator)
            return (k.double() + 1.0) / steps
        return torch.rand(n, generator=generator, dtype=torch.float64)

    def noise_fn(self, sample_shape: tuple[int, ...]) -> Callable[[torch.Generator, int], dict[str, Tensor]]:
        """The per-batch draws for :class:`accelkit.data.BatchSampler`: ``t`` and ``eps`` for n samples."""

        def draw(generator: torch.Generator, n: int) -> dict[str, Tensor]:
            t = self.draw_times(generator, n)
            return {"t": t, "eps": torch.randn(n, *sample_shape, generator=generator)}

        return draw

    def loss(self, network: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean squared error over the batch's elements; ``batch`` holds ``x`` (= x0), ``t`` and ``eps``."""
        x0, eps, t = batch["x"], batch["eps"], as_time(batch["t"])
        xt = broadcast_to(self.schedule.alpha(t), x0) * x0 + broadcast_to(self.schedule.sigma(t), x0) * eps
        target = x0_eps_to_output(self.prediction, x0, eps, t, self.schedule)
        out = self.call(network, xt, self.time_input(t).to(torch.float32), None)
        return torch.mean((out.float() - target) ** 2), {}


__all__ = ["DenoisingObjective"]
