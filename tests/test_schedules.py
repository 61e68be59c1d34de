"""Schedules: exact agreement with diffusers' betas, derivatives, log-SNR inverse, and finite endpoints."""

import math

import pytest
import torch

from accelkit.schedules import (
    CosineSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    LinearSchedule,
    VESchedule,
    scale_time_map,
    schedule_from_config,
    schedule_from_name,
)

F64 = torch.float64
ALL = [
    LinearSchedule(),
    CosineSchedule(),
    EDMSchedule(80.0),
    VESchedule(0.01, 50.0),
    DiscreteVPSchedule("linear"),
    DiscreteVPSchedule("scaled_linear", 1000, 0.00085, 0.012),
    DiscreteVPSchedule("squaredcos_cap_v2"),
]
IDS = [f"{s.name}-{getattr(s, 'beta_schedule', '')}" for s in ALL]


@pytest.mark.parametrize("kind,b0,b1", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                        ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_discrete_vp_matches_diffusers_alphas_cumprod(kind, b0, b1):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule=kind, beta_start=b0, beta_end=b1).alphas_cumprod.to(F64)
    s = DiscreteVPSchedule(kind, 1000, b0, b1)
    t = (torch.arange(1000, dtype=F64) + 1) / 1000  # training step k sits at t = (k + 1) / N
    assert torch.equal(s.alpha(t) ** 2, ref) or torch.allclose(s.alpha(t) ** 2, ref, rtol=1e-12, atol=0)
    assert torch.allclose(s.timestep_t(torch.arange(1000)), t)


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_derivatives_match_finite_differences(s):
    # Points away from the discrete schedule's nodes (where log alpha has kinks).
    t = torch.tensor([0.1234, 0.3456, 0.5678, 0.8765], dtype=F64)
    h = 1e-7
    fd_a = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    fd_s = (s.sigma(t + h) - s.sigma(t - h)) / (2 * h)
    assert torch.allclose(s.d_alpha(t), fd_a, rtol=1e-6, atol=1e-7)
    assert torch.allclose(s.d_sigma(t), fd_s, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_log_snr_inverse_round_trip(s):
    t = torch.linspace(0.01, 0.99, 97, dtype=F64)
    lam = s.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must decrease in t"
    assert torch.allclose(s.t_of_log_snr(lam), t, atol=1e-10)


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_endpoints_have_no_nan(s):
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for f in (s.alpha, s.sigma, s.d_alpha, s.log_snr):
        assert not torch.isnan(f(t)).any(), f.__name__
    assert not torch.isnan(s.t_of_log_snr(torch.tensor([math.inf, -math.inf], dtype=F64))).any()


def test_data_end_is_exact():
    for s in [LinearSchedule(), CosineSchedule(), EDMSchedule(), DiscreteVPSchedule()]:
        zero = torch.zeros((), dtype=F64)
        assert float(s.sigma(zero)) == 0.0 and float(s.alpha(zero)) == 1.0
    assert float(CosineSchedule().alpha(torch.ones((), dtype=F64))) == 0.0


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_config_round_trip(s):
    assert schedule_from_config(s.config()) == s


def test_schedule_names():
    assert schedule_from_name("vp-scaled-linear").beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="expected one of"):
        schedule_from_name("cosine-ish")


@pytest.mark.parametrize("src,dst", [(LinearSchedule(), CosineSchedule()), (CosineSchedule(), EDMSchedule()),
                                     (DiscreteVPSchedule(), LinearSchedule())])
def test_scale_time_map_matches_snr_and_sigma_ratio(src, dst):
    r = torch.linspace(0.05, 0.95, 19, dtype=F64)
    t, s = scale_time_map(src, dst, r)
    inside = (dst.log_snr(r) >= src.log_snr(torch.ones((), dtype=F64)))
    assert torch.allclose(src.log_snr(t)[inside], dst.log_snr(r)[inside], atol=1e-9)
    assert torch.allclose(s[inside], (dst.sigma(r) / src.sigma(t))[inside], rtol=1e-10)
    assert torch.allclose(s[inside], (dst.alpha(r) / src.alpha(t))[inside], rtol=1e-10)
