"""The teacher interface: parameterization conversions, analytic posterior means, guidance, rescaled teachers."""

import pytest
import torch

from accelkit.models.analytic import GaussianMixtureTeacher, gaussian_mixture_2d, gaussian_mixture_images
from accelkit.schedules import CosineSchedule, DiscreteVPSchedule, EDMSchedule, LinearSchedule, VESchedule
from accelkit.teacher import (
    PREDICTION_TYPES,
    Condition,
    NetworkTeacher,
    RescaledTeacher,
    TimeInput,
    output_to_x0_eps,
    x0_eps_to_output,
)

F64 = torch.float64
SCHEDULES = [LinearSchedule(), CosineSchedule(), EDMSchedule(), VESchedule(), DiscreteVPSchedule()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_prediction_conversions_invert(schedule, prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=F64)
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    x = a * x0 + s * eps
    out = x0_eps_to_output(prediction, x0, eps, t, schedule)
    x0_hat, eps_hat = output_to_x0_eps(prediction, out, x, t, schedule)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)


def test_flow_prediction_is_eps_minus_x0_on_linear():
    x0, eps, t = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64), torch.rand(4, dtype=F64)
    assert torch.allclose(x0_eps_to_output("flow", x0, eps, t, LinearSchedule()), eps - x0)
    assert torch.allclose(x0_eps_to_output("flow_to_data", x0, eps, t, LinearSchedule()), x0 - eps)


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule(), DiscreteVPSchedule()], ids=lambda s: s.name)
def test_analytic_posterior_mean_matches_monte_carlo(schedule):
    """E[x0 | x_t] against self-normalised importance sampling over exact data samples."""
    teacher = gaussian_mixture_2d(schedule, modes=4, std=0.3)
    g = torch.Generator().manual_seed(1)
    data = teacher.sample_data(400_000, generator=g)
    t = torch.tensor(0.5, dtype=F64)
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    x = torch.tensor([[0.7, -0.3], [-1.2, 1.5]], dtype=F64)
    logw = -((x[:, None, :] - a * data[None]) ** 2).sum(-1) / (2 * s**2)
    w = torch.softmax(logw, dim=1)
    mc = w @ data
    x0, eps = teacher.denoise(x, t)
    assert torch.allclose(x0, mc, atol=2e-2)
    assert torch.allclose(a * x0 + s * eps, x, atol=1e-12)


def test_analytic_teacher_ends():
    teacher = gaussian_mixture_images(LinearSchedule(), shape=(1, 4, 4))
    x = torch.randn(3, 1, 4, 4, dtype=F64)
    x0, eps = teacher.denoise(x, torch.zeros((), dtype=F64))
    assert torch.allclose(x0, x) and torch.all(eps == 0)
    x0, _ = teacher.denoise(x, torch.ones((), dtype=F64))
    mean = (teacher.log_weights.exp()[:, None] * teacher.means).sum(0).reshape(1, 1, 4, 4)
    assert torch.allclose(x0, mean.expand_as(x0))
    assert GaussianMixtureTeacher(torch.zeros(1, 2), torch.ones(1), None, LinearSchedule()).sample_shape == (2,)


class _Affine(torch.nn.Module):
    """A fake conditional network: out = x * (1 + timestep / 1000) + class offset."""

    def __init__(self):
        super().__init__()
        self.offsets = torch.nn.Parameter(torch.tensor([0.0, 1.0, -2.0]))

    def forward(self, x, timestep, labels):
        return x * (1 + timestep[:, None] / 1000) + self.offsets[labels][:, None]


def _fake_teacher(guidance=1.0):
    net = _Affine()
    call = lambda n, x, ts, c: n(x, ts, c.class_labels if c is not None else torch.zeros(len(x), dtype=torch.long))
    return NetworkTeacher(net, call, "eps", DiscreteVPSchedule(), (2,), guidance_scale=guidance,
                          null_condition=Condition(class_labels=torch.tensor([0])))


def test_guidance_combines_in_one_batched_call():
    x = torch.randn(4, 2)
    cond = Condition(class_labels=torch.tensor([1, 2, 1, 2]))
    t = torch.full((4,), 0.5, dtype=F64)
    plain = _fake_teacher(1.0)
    direct = plain.call(plain.network, x, plain.time_input(t).float(), cond)
    assert torch.equal(plain.network_output(x, t, cond), direct)
    guided = plain.with_guidance(7.5)
    calls = []
    guided.call = lambda n, x, ts, c: calls.append(len(x)) or plain.call(n, x, ts, c)
    out = guided.network_output(x, t, cond)
    uncond = plain.network_output(x, t, Condition(class_labels=torch.zeros(4, dtype=torch.long)))
    cnd = plain.network_output(x, t, cond)
    assert calls == [8]
    assert torch.allclose(out, uncond + 7.5 * (cnd - uncond), atol=1e-6)


def test_discrete_time_input_hits_integer_timesteps():
    s = DiscreteVPSchedule()
    ti = TimeInput.for_schedule(s)
    k = torch.tensor([0, 1, 499, 999])
    assert torch.equal(ti(s.timestep_t(k)).float(), k.float())


def test_rescaled_teacher_keeps_predictions():
    base = gaussian_mixture_2d(LinearSchedule())
    res = RescaledTeacher(base, CosineSchedule())
    r = torch.tensor(0.37, dtype=F64)
    t, s = res.time_map(r)
    x_a = torch.randn(5, 2, dtype=F64)
    x0_a, eps_a = base.denoise(x_a, t)
    x0_b, eps_b = res.denoise(float(s) * x_a, r)
    assert torch.allclose(x0_a, x0_b, atol=1e-12) and torch.allclose(eps_a, eps_b, atol=1e-12)
