"""``AccelkitScheduler``: an accelkit sampler as a diffusers scheduler, for pipelines loaded with plain diffusers.

Every fixed-grid solver accelkit runs (Euler, Heun, DPM-Solver++, UniPC, iPNDM, learned bespoke solvers, on a
teacher's own schedule or on a rescaled one) is linear in the network's predictions: with x_init the state the
sampler starts from and m_k the x0 prediction of evaluation k, the point of evaluation j and the final sample are

    x_j = a_j x_init + sum_{k < j} b_jk m_k          (the "non-stationary" form of Shaul et al. 2024,
                                                       arXiv 2403.01329, with x0 predictions as the basis).

The coefficients depend on the grid and the schedule only, so accelkit computes them once at export time
(:mod:`accelkit.export.linear_form`) and this class replays them: nothing else of accelkit is needed here, except
for the re-noising consistency samplers, whose fresh draws z_k enter the same way (x_j gains sum_k c_jk z_k) and are
drawn with accelkit's own seeding (:func:`accelkit.solvers.consistency.fresh_noise`).

The pipeline holds the network's own input: evaluation j feeds ``sample_j = x_j / s_j`` at timestep ``timesteps[j]``
(s_j = 1 and the network's timestep of t_j for a teacher on its own schedule; the scale and time of the scale-time
transformation for a rescaled teacher), and the network's output o_j gives m_j = c_j sample_j + d_j o_j.
``scale_model_input`` is therefore the identity, so pipelines that never call it (DDPMPipeline) are right too. The
last :meth:`step` returns the sample x_N itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class AccelkitSchedulerOutput(BaseOutput):
    """``prev_sample``: the network input of the next evaluation (after the last step: the sample itself);
    ``pred_original_sample``: the x0 prediction of this evaluation."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class AccelkitScheduler(SchedulerMixin, ConfigMixin):
    """Replays one accelkit sampler (solver, NFE, time grid) exported by ``accelkit export``.

    Config (written by accelkit; see the module docstring for the equations):

    * ``num_inference_steps``   network evaluations per sample (the NFE); one :meth:`step` per evaluation;
    * ``timesteps``             the network's timestep input of each evaluation;
    * ``input_scales``          s_j: the sampler's state is s_j times the network input;
    * ``x0_from_input`` / ``x0_from_output``  c_j, d_j: the x0 prediction from the network's input and output;
    * ``x_init_coefficients``   a_{j+1} (j = 0 .. N-1): weight of the starting state in the next point;
    * ``x0_coefficients``       b_{j+1, k} (k <= j): weights of the x0 predictions in the next point;
    * ``init_noise_sigma``      the standard deviation of the first network input (unit noise times this);
    * ``noise_coefficients``    c_{j+1, k} (k <= j), only for the re-noising consistency samplers: weights of fresh
                                standard normal draws z_k in the next point, z_k row i seeded by row i of the
                                starting noise and k (:func:`accelkit.solvers.consistency.fresh_noise`), as accelkit
                                draws them, so the pipeline's samples are accelkit's given the same initial latents;
    * ``sampler``               what accelkit ran (solver, grid, schedules), for the record.
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(
        self,
        num_inference_steps: int = 1,
        timesteps: list[float] | None = None,
        input_scales: list[float] | None = None,
        x0_from_input: list[float] | None = None,
        x0_from_output: list[float] | None = None,
        x_init_coefficients: list[float] | None = None,
        x0_coefficients: list[list[float]] | None = None,
        init_noise_sigma: float = 1.0,
        num_train_timesteps: int = 1000,
        sampler: dict | None = None,
        noise_coefficients: list[list[float]] | None = None,
    ):
        n = int(num_inference_steps)
        lists = {"timesteps": timesteps, "input_scales": input_scales, "x0_from_input": x0_from_input,
                 "x0_from_output": x0_from_output, "x_init_coefficients": x_init_coefficients,
                 "x0_coefficients": x0_coefficients}
        for name, values in lists.items():
            if values is None or len(values) != n:
                raise ValueError(f"AccelkitScheduler: {name} must list {n} values (one per network evaluation); "
                                 f"got {None if values is None else len(values)}. Write the config with accelkit "
                                 "export")
        for j, row in enumerate(x0_coefficients):
            if len(row) != j + 1:
                raise ValueError(f"AccelkitScheduler: x0_coefficients[{j}] must have {j + 1} values, got {len(row)}")
        if noise_coefficients is not None and [len(r) for r in noise_coefficients] != list(range(1, n + 1)):
            raise ValueError(f"AccelkitScheduler: noise_coefficients must have rows of 1 .. {n} values")
        self.init_noise_sigma = float(init_noise_sigma)
        self.num_inference_steps = n
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32)
        self._reset()

    def _reset(self) -> None:
        self._step_index = 0
        self._x_init: torch.Tensor | None = None
        self._x0: list[torch.Tensor] = []

    @property
    def step_index(self) -> int:
        return self._step_index

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      **kwargs) -> None:
        """Start a new batch. The grid and coefficients are fixed at export: ``num_inference_steps`` must be the
        exported NFE (or None); custom ``timesteps`` / ``sigmas`` are refused."""
        n = self.config.num_inference_steps
        custom = [k for k in ("timesteps", "sigmas") if kwargs.get(k) is not None]
        if custom:
            raise ValueError(f"AccelkitScheduler has the grid it was exported with; custom {custom[0]} are not "
                             "supported (export again with accelkit export --grid)")
        if num_inference_steps is not None and int(num_inference_steps) != n:
            raise ValueError(f"this AccelkitScheduler was exported for {n} network evaluations; got "
                             f"num_inference_steps={num_inference_steps} (export again with accelkit export --nfe "
                             f"{num_inference_steps})")
        self.num_inference_steps = n
        self.timesteps = torch.tensor(self.config.timesteps, dtype=torch.float32, device=device)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The identity: the pipeline already holds the network's input."""
        return sample

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True
             ) -> AccelkitSchedulerOutput | tuple[torch.Tensor]:
        """One network evaluation: from its output at ``sample``, the next network input (or the final sample).

        The combination runs in float32 at least (the pipeline's dtype may be fp16) and returns the sample's dtype.
        """
        cfg = self.config
        j = self._step_index
        if j >= cfg.num_inference_steps:
            raise ValueError("AccelkitScheduler: all steps are done; call set_timesteps before the next batch")
        work = torch.promote_types(sample.dtype, torch.float32)
        x, out = sample.to(work), model_output.to(work)
        if j == 0:
            self._x_init = x * cfg.input_scales[0]
        m = x * cfg.x0_from_input[j] + out * cfg.x0_from_output[j]
        self._x0.append(m)
        nxt = self._x_init * cfg.x_init_coefficients[j]
        for b, m_k in zip(cfg.x0_coefficients[j], self._x0, strict=True):
            if b != 0.0:
                nxt = nxt + b * m_k
        if cfg.get("noise_coefficients"):
            from ..solvers.consistency import fresh_noise

            for k, c in enumerate(cfg.noise_coefficients[j]):
                if c != 0.0:
                    nxt = nxt + c * fresh_noise(self._x_init, k)
        self._step_index = j + 1
        if j + 1 < cfg.num_inference_steps:
            nxt = nxt / cfg.input_scales[j + 1]
        prev = nxt.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return AccelkitSchedulerOutput(prev_sample=prev, pred_original_sample=m.to(sample.dtype))

    def __len__(self) -> int:
        return self.config.num_train_timesteps


__all__ = ["AccelkitScheduler", "AccelkitSchedulerOutput"]
