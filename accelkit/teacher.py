"""The one teacher interface: x0, eps and velocity predictions at continuous t under a schedule.

Solvers, stages and metrics talk to a :class:`Teacher` only, never to a raw network. Its one primitive is
:meth:`Teacher.denoise`, which returns the pair (x0_hat, eps_hat) with

    x_t = alpha(t) x0_hat + sigma(t) eps_hat;

the probability-flow ODE velocity follows as dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat.

A :class:`NetworkTeacher` wraps a network that predicts one of

* ``eps``   the noise (DDPM),
* ``x0``    the clean sample,
* ``v``     alpha eps - sigma x0 (Salimans & Ho 2022),
* ``flow``  the velocity dx/dt = alpha' x0 + sigma' eps; for the linear schedule eps - x0, as diffusers'
  flow-matching models (SD3, Flux) predict it,
* ``flow_to_data`` the opposite sign, x0 - eps under the linear schedule (flow-matching code that runs time from
  noise to data).

A network takes its own timestep input, given by a :class:`TimeInput` from continuous t; conditioning is a
:class:`Condition`; classifier-free guidance runs the conditional and the null condition in one batched forward
pass (one NFE, two forward passes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from .schedules import DiscreteVPSchedule, Schedule, as_time, scale_time_map

PREDICTION_TYPES = ("eps", "x0", "v", "flow", "flow_to_data")


def broadcast_to(c: Tensor, x: Tensor) -> Tensor:
    """A per-sample or scalar float64 coefficient shaped and typed to multiply ``x``."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim else c


@dataclass
class Condition:
    """What a conditional network is conditioned on. Every field is batched along dim 0 or None.

    ``class_labels``: integer labels; ``encoder_hidden_states`` with its ``encoder_attention_mask`` (1 = keep): text
    embeddings; ``pooled_projections``: pooled text embeddings (SD3). ``extra`` holds any other keyword inputs.
    """

    class_labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    pooled_projections: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return {k: v for k, v in out.items() if v is not None}

    def batch_size(self) -> int | None:
        for v in self.tensors().values():
            return v.shape[0]
        return None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        kw = {f.name: (fn(getattr(self, f.name)) if getattr(self, f.name) is not None else None)
              for f in fields(self) if f.name != "extra"}
        return Condition(**kw, extra={k: fn(v) for k, v in self.extra.items()})

    def index(self, idx: Tensor | slice) -> Condition:
        return self.map(lambda v: v[idx])

    @staticmethod
    def cat(a: Condition, b: Condition) -> Condition:
        ta, tb = a.tensors(), b.tensors()
        if set(ta) != set(tb):
            raise ValueError(f"conditions to batch differ in fields: {sorted(ta)} vs {sorted(tb)}")
        kw = {k: torch.cat([ta[k], tb[k]]) for k in ta}
        known = {f.name for f in fields(Condition)} - {"extra"}
        return Condition(**{k: v for k, v in kw.items() if k in known},
                         extra={k: v for k, v in kw.items() if k not in known})


@dataclass
class TimeInput:
    """Maps continuous t to a network's own timestep input.

    ``kind``: ``discrete`` (a DDPM network of N training steps takes k = t N - 1, t_k = (k + 1) / N),
    ``scaled`` (takes ``scale * t``; diffusers' flow-matching models take 1000 sigma), ``identity`` (takes t).
    """

    kind: str = "identity"
    num_train_timesteps: int = 1000
    scale: float = 1.0

    def __call__(self, t: Tensor) -> Tensor:
        t = as_time(t)
        if self.kind == "discrete":
            return (t * self.num_train_timesteps - 1.0).clamp(min=0.0)
        if self.kind == "scaled":
            return t * self.scale
        if self.kind == "identity":
            return t
        raise ValueError(f"time input kind {self.kind!r}: expected discrete, scaled or identity")

    @staticmethod
    def for_schedule(schedule: Schedule) -> TimeInput:
        if isinstance(schedule, DiscreteVPSchedule):
            return TimeInput("discrete", schedule.num_train_timesteps)
        return TimeInput("identity")

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps, "scale": self.scale}


class Teacher(torch.nn.Module):
    """Anything that gives (x0, eps) predictions at continuous t under :attr:`schedule`.

    Subclasses implement :meth:`denoise`. ``sample_shape`` is the shape of one sample (no batch dimension).
    """

    schedule: Schedule
    sample_shape: tuple[int, ...]

    def denoise(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def predict_x0(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        return self.denoise(x, t, cond)[0]

    def predict_eps(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        return self.denoise(x, t, cond)[1]

    def velocity(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        """dx/dt of the probability-flow ODE: alpha'(t) x0_hat + sigma'(t) eps_hat."""
        x0, eps = self.denoise(x, t, cond)
        return broadcast_to(self.schedule.d_alpha(t), x) * x0 + broadcast_to(self.schedule.d_sigma(t), x) * eps

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        return self.velocity(x, t, cond)

    def prior_sample(self, noise: Tensor) -> Tensor:
        """The state at t = 1 for standard normal ``noise``."""
        return noise * self.schedule.prior_std()

    def describe(self) -> dict[str, Any]:
        """What ``accelkit inspect`` prints."""
        return {"kind": type(self).__name__, "schedule": self.schedule.config(),
                "sample_shape": list(self.sample_shape)}


def output_to_x0_eps(
    prediction: str, out: Tensor, x: Tensor, t: Tensor, schedule: Schedule
) -> tuple[Tensor, Tensor]:
    """Convert a network output of type ``prediction`` at (x, t) into (x0, eps); float64 coefficients."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    A, S = broadcast_to(a, x), broadcast_to(s, x)
    if prediction == "eps":
        return (x - S * out) / A, out
    if prediction == "x0":
        return out, (x - A * out) / S
    if prediction == "v":
        n = a**2 + s**2
        return broadcast_to(a / n, x) * x - broadcast_to(s / n, x) * out, \
            broadcast_to(s / n, x) * x + broadcast_to(a / n, x) * out
    if prediction in ("flow", "flow_to_data"):
        u = out if prediction == "flow" else -out
        da, ds = schedule.d_alpha(t), schedule.d_sigma(t)
        det = a * ds - s * da
        x0 = broadcast_to(ds / det, x) * x - broadcast_to(s / det, x) * u
        eps = broadcast_to(a / det, x) * u - broadcast_to(da / det, x) * x
        return x0, eps
    raise ValueError(f"prediction type {prediction!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def x0_eps_to_output(prediction: str, x0: Tensor, eps: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """The inverse of :func:`output_to_x0_eps`: the target a network of type ``prediction`` is trained on."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return broadcast_to(schedule.alpha(t), eps) * eps - broadcast_to(schedule.sigma(t), x0) * x0
    if prediction in ("flow", "flow_to_data"):
        u = broadcast_to(schedule.d_alpha(t), x0) * x0 + broadcast_to(schedule.d_sigma(t), eps) * eps
        return u if prediction == "flow" else -u
    raise ValueError(f"prediction type {prediction!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def _extra_input_names(network: torch.nn.Module) -> tuple[str, ...]:
    """Names of the network's extra inputs (:mod:`accelkit.extra_inputs`); empty without any."""
    from .extra_inputs import extra_inputs_of

    return tuple(s.name for s in extra_inputs_of(network))


#: A network call: (network, x, timestep input, condition) -> output of the network's prediction type.
NetworkFn = Callable[[torch.nn.Module, Tensor, Tensor, "Condition | None"], Tensor]


class NetworkTeacher(Teacher):
    """A network of a known prediction type, schedule and timestep input, with optional classifier-free guidance.

    Guidance with scale w combines the conditional and null outputs as out_null + w (out_cond - out_null) in the
    network's own output space (affine in x0 and eps, so the same as guiding x0 or eps); w = 1 runs one forward pass
    and equals the unguided teacher. ``null_condition`` is a batch-1 condition broadcast to the batch, or a function
    from the conditional batch to its null (e.g. zero text embeddings of the same length).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        call: NetworkFn,
        prediction: str,
        schedule: Schedule,
        sample_shape: tuple[int, ...],
        time_input: TimeInput | None = None,
        guidance_scale: float = 1.0,
        null_condition: Condition | Callable[[Condition], Condition] | None = None,
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {prediction!r}: expected one of {', '.join(PREDICTION_TYPES)}")
        self.network = network
        if _extra_input_names(network):  # a student with extra inputs: its call feeds them (accelkit.extra_inputs)
            from .extra_inputs import ExtraInputCall, base_call

            call = ExtraInputCall(base_call(call))
        self.call = call
        self.prediction = prediction
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.time_input = time_input or TimeInput.for_schedule(schedule)
        self.guidance_scale = float(guidance_scale)
        self.null_condition = null_condition
        self.info = dict(info or {})

    def with_guidance(
        self, scale: float, null_condition: Condition | Callable[[Condition], Condition] | None = None
    ) -> NetworkTeacher:
        """The same teacher at another guidance scale (shares the network)."""
        new = NetworkTeacher(self.network, self.call, self.prediction, self.schedule, self.sample_shape,
                             self.time_input, scale, null_condition or self.null_condition, self.info)
        return new

    def network_output(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        t = as_time(t, x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        ts = self.time_input(t).to(torch.float32)
        w = self.guidance_scale
        extra_names = _extra_input_names(self.network)
        if "guidance" in extra_names:  # a student with the scale as an input (LCM, guided distillation): no CFG
            if cond is None or "guidance" not in cond.extra:
                from .extra_inputs import with_extra_inputs

                cond = with_extra_inputs(cond, guidance=torch.full((x.shape[0],), w, device=x.device))
            return self.call(self.network, x, ts, cond)
        if cond is None or w == 1.0:
            return self.call(self.network, x, ts, cond)
        if self.null_condition is None:
            raise ValueError("guidance scale != 1 needs a null condition")
        b = x.shape[0]
        null = self.null_condition(cond) if callable(self.null_condition) else self.null_condition
        null = null.map(lambda v: (v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v).to(x.device))
        if extra_names:  # the null branch sees the same extra inputs (a QAC code, a step size) as the conditional
            null = Condition(null.class_labels, null.encoder_hidden_states, null.encoder_attention_mask,
                             null.pooled_projections,
                             {**null.extra, **{k: v for k, v in cond.extra.items() if k in extra_names}})
        out = self.call(self.network, torch.cat([x, x]), torch.cat([ts, ts]), Condition.cat(cond, null))
        out_c, out_u = out[:b], out[b:]
        return out_u + w * (out_c - out_u)

    def denoise(self, x, t, cond=None):
        out = self.network_output(x, t, cond)
        return output_to_x0_eps(self.prediction, out, x, as_time(t, x.device), self.schedule)

    def describe(self):
        d = super().describe()
        n_params = sum(p.numel() for p in self.network.parameters())
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self.network.parameters()})
        d.update({"kind": "network", "prediction_type": self.prediction, "time_input": self.time_input.config(),
                  "parameters": n_params, "dtype": ",".join(dtypes) or "none", "guidance_scale": self.guidance_scale})
        d.update(self.info)
        return d


class RescaledTeacher(Teacher):
    """A teacher's ODE expressed exactly under another schedule by the scale-time transformation.

    With t(r) matching log-SNR and s(r) the scale (see :func:`accelkit.schedules.scale_time_map`), the state
    x_B(r) = s(r) x_A(t(r)) has the same x0 and eps predictions: denoise_B(x, r) = denoise_A(x / s(r), t(r)).
    The velocity u_B = alpha_B' x0 + sigma_B' eps is then the transformed field
    u_B(x, r) = (s'/s) x + s t' u_A(x / s, t) of Shaul et al. (2023).
    """

    def __init__(self, base: Teacher, schedule: Schedule):
        super().__init__()
        self.base = base
        self.schedule = schedule
        self.sample_shape = base.sample_shape

    def time_map(self, r: Tensor) -> tuple[Tensor, Tensor]:
        return scale_time_map(self.base.schedule, self.schedule, r)

    def denoise(self, x, t, cond=None):
        t_a, s = self.time_map(as_time(t, x.device))
        return self.base.denoise(x / broadcast_to(s, x), t_a, cond)

    # Guidance and conditioning belong to the base network; commands that set them reach through.
    @property
    def info(self) -> dict[str, Any]:
        return getattr(self.base, "info", {})

    @property
    def guidance_scale(self) -> float:
        return getattr(self.base, "guidance_scale", 1.0)

    @guidance_scale.setter
    def guidance_scale(self, scale: float) -> None:
        self.base.guidance_scale = float(scale)

    @property
    def null_condition(self) -> Condition | None:
        return getattr(self.base, "null_condition", None)

    @null_condition.setter
    def null_condition(self, cond: Condition | None) -> None:
        self.base.null_condition = cond

    def describe(self):
        d = self.base.describe()
        d.update({"kind": "rescaled", "schedule": self.schedule.config(),
                  "source_schedule": self.base.schedule.config()})
        return d


class CountingTeacher(Teacher):
    """Delegates to ``base`` and counts its evaluations (rows of x), for stages that report their teacher cost."""

    def __init__(self, base: Teacher):
        super().__init__()
        self.base, self.schedule, self.sample_shape = base, base.schedule, base.sample_shape
        self.evaluations = 0

    def denoise(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> tuple[Tensor, Tensor]:
        self.evaluations += x.shape[0]
        return self.base.denoise(x, t, cond)


__all__ = [
    "Condition", "TimeInput", "Teacher", "NetworkTeacher", "RescaledTeacher", "CountingTeacher", "PREDICTION_TYPES",
    "output_to_x0_eps", "x0_eps_to_output", "broadcast_to",
]
