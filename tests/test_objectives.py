"""The denoising objective's loss spaces: the x0 loss of a network is its output loss under the exact weight."""

import pytest
import torch

from accelkit.objectives import DenoisingObjective, regression_loss
from accelkit.schedules import as_time, schedule_from_name
from accelkit.teacher import x0_eps_to_output


class Constant(torch.nn.Module):
    """A network whose output is a fixed tensor (so the loss is a known function of it)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out


def call(network, x, tau, cond):
    return network.out


def batch(n=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    t = (torch.randint(0, 1000, (n,), generator=g).double() + 1) / 1000
    return {"x": x0, "eps": eps, "t": t}, torch.randn(n, d, generator=g)


@pytest.mark.parametrize("schedule", ["vp-linear", "vp-scaled-linear"])
def test_eps_x0_loss_is_the_eps_loss_weighted_by_sigma_over_alpha_squared(schedule):
    s = schedule_from_name(schedule)
    b, err = batch()
    t = as_time(b["t"])
    out = b["eps"] + 0.01 * err  # the network's eps is off by 0.01 err
    net = Constant(out)
    got = DenoisingObjective(s, "eps", call, loss_space="x0").loss(net, b)[0]
    w = (s.sigma(t) / s.alpha(t)).float() ** 2
    want = torch.mean(w[:, None] * (0.01 * err) ** 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    # the weight reaches 1 / alpha(1)^2 - 1 at the last step: 24,000 on DDPM's linear betas, 210 on SD's
    assert float(w.max()) > (2e4 if schedule == "vp-linear" else 150)


@pytest.mark.parametrize("prediction", ["flow", "v", "x0"])
def test_x0_loss_of_other_predictions_is_zero_at_the_target_and_positive_off_it(prediction):
    s = schedule_from_name("linear" if prediction == "flow" else "vp-scaled-linear")
    b, err = batch(seed=1)
    if prediction == "flow":
        b["t"] = b["t"].clamp(max=0.999)
    target = x0_eps_to_output(prediction, b["x"], b["eps"], as_time(b["t"]), s)
    obj = DenoisingObjective(s, prediction, call, loss_space="x0")
    assert float(obj.loss(Constant(target), b)[0]) < 1e-8
    assert float(obj.loss(Constant(target + 0.1 * err), b)[0]) > 1e-5


def test_output_loss_is_the_default_and_bad_space_is_refused():
    s = schedule_from_name("vp-linear")
    b, err = batch()
    net = Constant(b["eps"] + err)
    torch.testing.assert_close(DenoisingObjective(s, "eps", call).loss(net, b)[0], regression_loss(err))
    with pytest.raises(ValueError, match="loss space 'eps'"):
        DenoisingObjective(s, "eps", call, loss_space="eps")
