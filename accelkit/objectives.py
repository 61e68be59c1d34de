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

Options for students trained on a teacher's couplings (``accelkit reflow``): the time density ``times``

* ``uniform``: t ~ U(0, 1);
* ``logit-normal``: t = sigmoid(m + s z), z ~ N(0, 1) (Esser et al. 2024), m = 0, s = 1 by default;
* ``u-shaped``: density proportional to cosh(a (t - 1/2)) with a = 4, more weight near both ends (Lee et al.
  2024, "Improving the training of rectified flows"), drawn by inverting its CDF:
  t = 1/2 + asinh((2u - 1) sinh(a / 2)) / a;

(on a discrete schedule of N steps, t is rounded up to the grid: k = ceil(t N) - 1, t = (k + 1) / N), and the loss
``l2`` (mean squared error over the elements) or ``pseudo-huber``, per sample sqrt(||d||^2 + c^2) - c with
c = 0.00054 sqrt(D) for D elements by default (Song & Dhariwal 2023; Lee et al. 2024), taken in the space
``loss_space``: ``output`` (the network's own output against its target) or ``x0`` (the x0 estimate the output
implies, x0_hat = (x_t - sigma_t eps_hat) / alpha_t for an eps model, against x0). For an eps model the x0 loss is
the eps loss weighted by (sigma_t / alpha_t)^2, the weight rectified diffusion trains with (Wang et al. 2024, their
pseudo-Huber on the x0 estimate): without it the high-noise end, where one sampling step turns eps_hat into x0_hat
through 1 / alpha_t (156 at the last step of DDPM's linear schedule), is barely trained.

The time and the noise are drawn by :meth:`DenoisingObjective.draw` from the data sampler's per-batch generator, so
they belong to the sample, not to the process: a resumed or multi-process run sees the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .schedules import DiscreteVPSchedule, Schedule, as_time
from .teacher import Condition, NetworkFn, TimeInput, broadcast_to, output_to_x0_eps, x0_eps_to_output

TIME_DENSITIES = ("uniform", "logit-normal", "u-shaped")
LOSSES = ("l2", "pseudo-huber")
LOSS_SPACES = ("output", "x0")
CONDITION_PREFIX = "cond."


def sample_times(density: str, generator: torch.Generator, n: int, logit_mean: float = 0.0, logit_std: float = 1.0,
                 u_shape: float = 4.0) -> Tensor:
    """n times in [0, 1] (float64) from ``density`` (see the module docstring)."""
    if density == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    if density == "logit-normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, dtype=torch.float64))
    if density == "u-shaped":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (0.5 + torch.asinh((2 * u - 1) * math.sinh(u_shape / 2)) / u_shape).clamp(0.0, 1.0)
    raise ValueError(f"time density {density!r}: expected one of {', '.join(TIME_DENSITIES)}")


@dataclass
class DenoisingObjective:
    """Regression of ``call(network, x_t, time_input(t), None)`` on the ``prediction`` target under ``schedule``."""

    schedule: Schedule
    prediction: str
    call: NetworkFn
    time_input: TimeInput = field(default=None)  # type: ignore[assignment]
    times: str = "uniform"
    loss_kind: str = "l2"
    huber_c: float | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    u_shape: float = 4.0
    loss_space: str = "output"

    def __post_init__(self) -> None:
        if self.time_input is None:
            self.time_input = TimeInput.for_schedule(self.schedule)
        if self.loss_space not in LOSS_SPACES:
            raise ValueError(f"loss space {self.loss_space!r}: expected one of {', '.join(LOSS_SPACES)}")

    @property
    def discrete(self) -> bool:
        return isinstance(self.schedule, DiscreteVPSchedule)

    def draw_times(self, generator: torch.Generator, n: int) -> Tensor:
        """t from :attr:`times`; on a discrete schedule t = (k + 1) / N (uniform: k ~ U{0..N-1}), float64."""
        if self.discrete:
            steps = self.schedule.num_train_timesteps
            if self.times == "uniform":
                k = torch.randint(0, steps, (n,), generator=generator)
            else:
                k = (torch.ceil(self._continuous_times(generator, n) * steps) - 1).clamp(0, steps - 1)
            return (k.double() + 1.0) / steps
        return self._continuous_times(generator, n)

    def _continuous_times(self, generator: torch.Generator, n: int) -> Tensor:
        return sample_times(self.times, generator, n, self.logit_mean, self.logit_std, self.u_shape)

    def noise_fn(self, sample_shape: tuple[int, ...]) -> Callable[[torch.Generator, int], dict[str, Tensor]]:
        """The per-batch draws for :class:`accelkit.data.BatchSampler`: ``t`` and ``eps`` for n samples."""

        def draw(generator: torch.Generator, n: int) -> dict[str, Tensor]:
            t = self.draw_times(generator, n)
            return {"t": t, "eps": torch.randn(n, *sample_shape, generator=generator)}

        return draw

    def loss(self, network: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch's mean loss; ``batch`` holds ``x`` (= x0), ``t``, ``eps`` and optionally ``cond.<field>``."""
        x0, eps, t = batch["x"], batch["eps"], as_time(batch["t"])
        xt = broadcast_to(self.schedule.alpha(t), x0) * x0 + broadcast_to(self.schedule.sigma(t), x0) * eps
        out = self.call(network, xt, self.time_input(t).to(torch.float32), condition_of(batch))
        if self.loss_space == "x0":
            x0_hat = output_to_x0_eps(self.prediction, out.float(), xt, t, self.schedule)[0]
            return regression_loss(x0_hat.float() - x0, self.loss_kind, self.huber_c), {}
        target = x0_eps_to_output(self.prediction, x0, eps, t, self.schedule)
        return regression_loss(out.float() - target, self.loss_kind, self.huber_c), {}


def regression_loss(diff: Tensor, kind: str = "l2", huber_c: float | None = None) -> Tensor:
    """The batch mean of a per-sample regression loss on ``diff`` = prediction - target (batch along dim 0).

    ``l2``: the mean of diff^2 over all elements; ``pseudo-huber``: per sample sqrt(||diff||^2 + c^2) - c with
    c = 0.00054 sqrt(D) for D elements per sample unless ``huber_c`` is given (Song & Dhariwal 2023).
    """
    if kind == "l2":
        return torch.mean(diff**2)
    if kind == "pseudo-huber":
        dim = diff[0].numel()
        c = huber_c if huber_c is not None else 0.00054 * math.sqrt(dim)
        sq = diff.reshape(diff.shape[0], -1).pow(2).sum(dim=1)
        return torch.mean(torch.sqrt(sq + c * c) - c)
    raise ValueError(f"loss {kind!r}: expected one of {', '.join(LOSSES)}")


def condition_of(batch: dict[str, Tensor]) -> Condition | None:
    """The :class:`accelkit.teacher.Condition` of a batch's ``cond.<field>`` tensors (None when it has none)."""
    fields = {k[len(CONDITION_PREFIX):]: v for k, v in batch.items() if k.startswith(CONDITION_PREFIX)}
    if not fields:
        return None
    known = ("class_labels", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
    return Condition(**{k: v for k, v in fields.items() if k in known},
                     extra={k: v for k, v in fields.items() if k not in known})


__all__ = ["DenoisingObjective", "sample_times", "regression_loss", "condition_of", "TIME_DENSITIES", "LOSSES",
           "LOSS_SPACES"]
