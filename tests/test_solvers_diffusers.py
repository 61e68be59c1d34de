"""accelkit's solvers reach the same sample as diffusers' schedulers on a real (tiny, random-weight) UNet.

The grid is the scheduler's own: diffusers' training timestep k sits at accelkit's t = (k + 1) / N_train, and the
final sigma 0 is t = 0; for flow matching, diffusers' sigma is t itself and its shift is our ``shift`` grid.
"""

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from accelkit.schedules import DiscreteVPSchedule, LinearSchedule
from accelkit.solvers import UniPC, solve
from accelkit.teacher import NetworkTeacher, TimeInput

STEPS = 8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                      norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"))
    return net.eval()


def call_unet(net, x, ts, cond):
    return net(x, ts).sample


def run_diffusers(scheduler, unet, noise, **set_kw):
    scheduler.set_timesteps(**set_kw)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x, scheduler


def vp_grid(scheduler):
    """The scheduler's timesteps k as accelkit times (k + 1) / N, then the final sigma 0 at t = 0."""
    n = scheduler.config.num_train_timesteps
    return [(float(k) + 1.0) / n for k in scheduler.timesteps] + [0.0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


NOISE = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))

CASES = [  # (ours, diffusers scheduler); the final step onto sigma = 0 is first order in both
    pytest.param("dpm++2m", lambda **kw: DPMSolverMultistepScheduler(solver_order=2, lower_order_final=False, **kw),
                 id="dpm++2m"),
    pytest.param("dpm++3m", lambda **kw: DPMSolverMultistepScheduler(solver_order=3, lower_order_final=False, **kw),
                 id="dpm++3m", marks=pytest.mark.slow),
    pytest.param("unipc2", lambda **kw: UniPCMultistepScheduler(solver_order=2, lower_order_final=True, **kw),
                 id="unipc2"),
    # diffusers' lower_order_final also lowers step N - 2 to order 2 at solver_order 3: accelkit's option of that name
    pytest.param(UniPC(3, lower_order_final=True),
                 lambda **kw: UniPCMultistepScheduler(solver_order=3, lower_order_final=True, **kw), id="unipc"),
]


@pytest.mark.parametrize("prediction", ["eps", pytest.param("v", marks=pytest.mark.slow)])
@pytest.mark.parametrize("solver,make_scheduler", CASES)
def test_multistep_matches_diffusers(unet, prediction, solver, make_scheduler):
    pred_type = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    scheduler = make_scheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred_type,
                               timestep_spacing="linspace", final_sigmas_type="zero")
    expected, scheduler = run_diffusers(scheduler, unet, NOISE, num_inference_steps=STEPS)
    teacher = NetworkTeacher(unet, call_unet, prediction, DiscreteVPSchedule("linear", 1000), (2, 8, 8))
    ours = solve(teacher, teacher.prior_sample(NOISE), solver, STEPS, grid=vp_grid(scheduler))
    assert torch.isfinite(ours).all()
    print(f"relative difference to diffusers: {rel(ours, expected):.2e}")
    assert rel(ours, expected) < 1e-5, f"relative difference {rel(ours, expected):.2e}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers(unet, shift):
    """diffusers' FlowMatchEulerDiscreteScheduler with user sigmas linspace(1, 0, N + 1)[:-1] shifts them by
    s t / (1 + (s - 1) t) and appends 0: accelkit's ``shift`` grid; the network takes 1000 t."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sigmas = torch.linspace(1, 0, STEPS + 1)[:-1].tolist()
    expected, _ = run_diffusers(scheduler, unet, NOISE, sigmas=sigmas)
    teacher = NetworkTeacher(unet, call_unet, "flow", LinearSchedule(), (2, 8, 8), time_input=TimeInput("scaled",
                                                                                                        scale=1000.0))
    ours = solve(teacher, teacher.prior_sample(NOISE), "euler", STEPS, grid="shift", shift=shift)
    print(f"relative difference to diffusers: {rel(ours, expected):.2e}")
    assert rel(ours, expected) < 1e-5, f"relative difference {rel(ours, expected):.2e}"
