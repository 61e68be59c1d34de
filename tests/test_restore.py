"""Linear inverse problems (accelkit.operators, accelkit.inverse) against closed forms: the operators' SVDs, PiGDM on
a N(0, I) prior (exact posterior mean and covariance), on a Gaussian-mixture prior (exact posterior mean), DPS and
DDRM on the same cases, the flow form and the scale-time invariance of the guidance."""

import math

import pytest
import torch

from accelkit.inverse import PiGDMTeacher, RestoreSettings, method_grid, restore
from accelkit.metrics import psnr
from accelkit.models.analytic import GaussianMixtureTeacher, gaussian_mixture_images
from accelkit.operators import Blur, Downsample, Identity, Inpaint
from accelkit.schedules import CosineSchedule, LinearSchedule, schedule_from_name
from accelkit.solvers import get_solver
from accelkit.teacher import RescaledTeacher, Teacher

F64 = torch.float64


def half_mask(shape):
    m = torch.ones(1, *shape, dtype=F64)
    m[..., shape[-2] // 2:, :] = 0
    return m


def operators(shape):
    return {"inpaint": Inpaint(half_mask(shape)), "super-resolution": Downsample(shape, 2),
            "deblur": Blur(shape, 0.8), "denoise": Identity(shape)}


def measure(op, x0, noise_std, seed):
    g = torch.Generator().manual_seed(seed)
    hx = op(x0)
    return op.ut(op.u(hx + noise_std * torch.randn(hx.shape, dtype=F64, generator=g))) if isinstance(op, Inpaint) \
        else hx + noise_std * torch.randn(hx.shape, dtype=F64, generator=g)


@pytest.mark.parametrize("task", ["inpaint", "super-resolution", "deblur", "denoise"])
def test_operator_svd_adjoint_and_pseudo_inverse_are_exact(task):
    shape = (2, 4, 6)
    op = operators(shape)[task]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *shape, dtype=F64, generator=g)
    y = torch.randn(3, *op.measurement_shape(), dtype=F64, generator=g)
    if isinstance(op, Inpaint):
        y = op.u(y)
    # the SVD reproduces the direct form, V is orthonormal, and <H x, y> = <x, H^T y>
    assert torch.allclose(op.u(op.s(op.vt(x)) * op.vt(x)), op(x), atol=1e-12)
    assert torch.allclose(op.v(op.s(op.ut(y)) * op.ut(y)), op.adjoint(y), atol=1e-12)
    assert torch.allclose(op.v(op.vt(x)), x, atol=1e-12)
    assert math.isclose(float((op.vt(x).abs() ** 2).sum()), float((x**2).sum()), rel_tol=1e-12)
    assert math.isclose(float((op(x) * y).sum()), float((x * op.adjoint(y)).sum()), rel_tol=1e-10)
    # pseudo-inverse: H H^+ H = H, and it equals the dense pinv (numpy's rcond rule)
    h = op.matrix()
    assert torch.allclose(op(op.pinv(op(x))), op(x), atol=1e-9)
    dense = (torch.linalg.pinv(h, rtol=1e-3) @ y.reshape(3, -1).T).T
    assert torch.allclose(op.pinv(y).reshape(3, -1), dense, atol=1e-8)
    # (r^2 H H^T + s^2 I)^-1 as a dense solve
    r2, s2 = 0.3, 0.01
    gram = r2 * h @ h.T + s2 * torch.eye(h.shape[0], dtype=F64)
    if isinstance(op, Inpaint):  # only the observed rows are measurements
        rows = op.mask.reshape(-1) > 0
        want = torch.zeros(3, h.shape[0], dtype=F64)
        want[:, rows] = torch.linalg.solve(gram[rows][:, rows], y.reshape(3, -1)[:, rows].T).T
    else:
        want = torch.linalg.solve(gram, y.reshape(3, -1).T).T
    assert torch.allclose(op.gram_solve(y, r2, s2).reshape(3, -1), want, atol=1e-9)


def affine_moments(teacher, op, y, noise_std, settings):
    """Mean and covariance of PiGDM's samples, exactly: with a Gaussian prior the guided ODE is affine in its start
    x_T = a H^+ y + s eps, so the mean is the solve from eps = 0 and the covariance A A^T with A from the basis."""
    ts = method_grid(teacher, settings)
    a0, s0 = float(teacher.schedule.alpha(ts[0])), float(teacher.schedule.sigma(ts[0]))
    shape = teacher.sample_shape
    n = math.prod(shape)
    eps = torch.cat([torch.zeros(1, *shape, dtype=F64), torch.eye(n, dtype=F64).reshape(n, *shape)])
    x = a0 * op.regularized_pinv(y, noise_std**2) + s0 * eps
    guided = PiGDMTeacher(teacher, op, y, noise_std)
    out = get_solver(settings.solver).sample(guided, x, ts, settings.nfe).reshape(n + 1, n)
    a = (out[1:] - out[0]).T
    return out[0], a @ a.T


@pytest.mark.parametrize("schedule", ["linear", "vp-cosine", "vp-linear", "edm", "ve"])
@pytest.mark.parametrize("task", ["inpaint", "super-resolution", "deblur"])
def test_pigdm_on_a_gaussian_prior_gives_the_exact_posterior(schedule, task):
    """N(0, I) prior, y = H x + n (s_y = 0.1): the exact posterior is N(C H^T y / s^2, C), C = (I + H^T H / s^2)^-1.
    PiGDM's Gaussian approximation is then exact; DPM-Solver++(2M) at 100 NFE from the top of the schedule leaves
    only discretisation error, on flow, VP, EDM and VE schedules: mean within 1e-3 and covariance within 1e-2
    (relative Frobenius; measured at most 2.5e-3, falling with the NFE)."""
    shape, sy = (1, 4, 4), 0.1
    prior = GaussianMixtureTeacher(torch.zeros(1, *shape), torch.ones(1), None, schedule_from_name(schedule))
    op = operators(shape)[task]
    h = op.matrix()
    y = measure(op, torch.randn(1, *shape, dtype=F64, generator=torch.Generator().manual_seed(1)), sy, 2)
    n = h.shape[1]
    cov = torch.linalg.inv(torch.eye(n, dtype=F64) + h.T @ h / sy**2)
    mean = cov @ h.T @ y.reshape(-1) / sy**2
    m, c = affine_moments(prior, op, y, sy, RestoreSettings("pigdm", 100, start=1.0, solver="dpm++2m"))
    mean_err, cov_err = float((m - mean).norm() / mean.norm()), float((c - cov).norm() / cov.norm())
    print(f"{schedule} {task}: mean error {mean_err:.2e}, covariance error {cov_err:.2e}")
    assert mean_err < 1e-3 and cov_err < 1e-2
    if schedule != "linear":
        return
    # the samples themselves (Monte Carlo, 1000 of them) agree too
    samples = restore(prior, op, y, sy, RestoreSettings("pigdm", 50, start=1.0, solver="dpm++2m"), n=1000,
                      batch_size=1000)[0]
    flat = samples.reshape(1000, -1)
    se = cov.diagonal().sqrt() / math.sqrt(1000)
    assert bool(((flat.mean(0) - mean).abs() < 5 * se).all())
    assert float((torch.cov(flat.T) - cov).norm() / cov.norm()) < 0.2


def mixture_case(schedule, task):
    shape, sy = (1, 8, 8), 0.05
    prior = gaussian_mixture_images(schedule, shape, modes=4, std=0.2)
    op = operators(shape)[task] if task != "deblur" else Blur(shape, 1.0)
    x0 = prior.sample_data(12, torch.Generator().manual_seed(1))
    y = measure(op, x0, sy, 3)
    h = op.matrix()
    exact = []
    for i in range(len(y)):
        w, means, _ = prior.linear_gaussian_posterior(h, y[i], sy)
        exact.append((w[:, None] * means).sum(0))
    return prior, op, x0, y, sy, torch.stack(exact).reshape(x0.shape)


@pytest.fixture(scope="module", params=[(s, t) for s in ("linear", "vp-cosine")
                                        for t in ("inpaint", "super-resolution", "deblur")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def mixture(request):
    return mixture_case(schedule_from_name(request.param[0]), request.param[1])


def residual_over_noise(op, y, samples, sy):
    """RMS of y - H x per measured value, over the noise level (exact posterior samples give about 0.97 here)."""
    n = samples.shape[1]
    hx = op.select(torch.arange(len(y)).repeat_interleave(n))(samples.reshape(-1, *samples.shape[2:]))
    r = y.repeat_interleave(n, 0) - hx
    count = float(op.mask.sum()) if isinstance(op, Inpaint) else math.prod(op.measurement_shape())
    return float(r.flatten(1).norm(dim=1).mean()) / math.sqrt(count) / sy


def test_pigdm_posterior_mean_on_a_mixture_prior_is_near_the_exact_one(mixture):
    """Four-Gaussian mixture of 8x8 images, s_y = 0.05: the mean of 16 PiGDM samples (20 NFE) is within 1.2 dB PSNR
    of the exact posterior mean, far above the regularised pseudo-inverse, and the samples fit y to about the noise
    level (RMS residual 0.7-1.7 s_y; exact posterior samples: 0.96-0.99 s_y)."""
    prior, op, x0, y, sy, exact = mixture
    samples = restore(prior, op, y, sy, RestoreSettings("pigdm", 20), n=16)
    got, best, base = psnr(samples.mean(1), x0), psnr(exact, x0), psnr(op.regularized_pinv(y, sy**2), x0)
    resid = residual_over_noise(op, y, samples, sy)
    print(f"PSNR exact posterior mean {best:.2f}, PiGDM {got:.2f}, pseudo-inverse {base:.2f}; residual {resid:.2f} s_y")
    assert got > best - 1.2 and got > base + 1.5
    assert 0.7 < resid < 1.7


@pytest.mark.parametrize("method, nfe, margin", [("dps", 100, 1.5), ("ddrm", 20, 1.5)])
def test_dps_and_ddrm_on_the_same_mixture_cases(mixture, method, nfe, margin):
    """The baselines, measured the same way (measured: DPS 0.4-1.3 dB and DDRM 0.3-1.1 dB below the exact posterior
    mean; residuals 0.6-1.8 s_y)."""
    prior, op, x0, y, sy, exact = mixture
    samples = restore(prior, op, y, sy, RestoreSettings(method, nfe), n=16)
    got, best = psnr(samples.mean(1), x0), psnr(exact, x0)
    resid = residual_over_noise(op, y, samples, sy)
    print(f"{method}: PSNR {got:.2f} (exact posterior mean {best:.2f}); residual {resid:.2f} s_y")
    assert got > best - margin
    assert 0.4 < resid < 2.0


def test_the_guided_velocity_is_the_flow_form_and_the_guidance_is_scale_time_invariant():
    """On the linear schedule the guided teacher's velocity is v - sigma^2 (d/dt log(sigma / alpha)) g (Pokle et al.,
    gamma = 1), and the guided denoiser of a teacher rescaled to another schedule is the original's at the same
    log-SNR (x0 predictions agree at x_B = s x_A)."""
    shape = (1, 4, 4)
    op, sy = Downsample(shape, 2), 0.1
    base = gaussian_mixture_images(CosineSchedule(), shape, modes=3)
    y = measure(op, base.sample_data(2, torch.Generator().manual_seed(0)), sy, 1)
    x = torch.randn(2, *shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    flow = RescaledTeacher(base, LinearSchedule())
    guided = PiGDMTeacher(flow, op, y, sy)
    t = torch.tensor(0.6, dtype=F64)
    _, _, g = guided.guidance(x, t)
    a, s = 1 - t, t
    dlog = 1 / s + 1 / a  # d/dt log(t / (1 - t))
    assert torch.allclose(guided.velocity(x, t), flow.velocity(x, t) - s**2 * dlog * g, atol=1e-10)
    t_a, scale = flow.time_map(t)
    assert torch.allclose(guided.predict_x0(x, t), PiGDMTeacher(base, op, y, sy).predict_x0(x / scale, t_a),
                          atol=1e-10)


def test_restore_is_batch_invariant_and_seeded():
    prior, op, x0, y, sy, _ = mixture_case(LinearSchedule(), "inpaint")
    for method in ("pigdm", "ddrm"):
        a = restore(prior, op, y[:3], sy, RestoreSettings(method, 6), n=2, seed=4, batch_size=6)
        b = restore(prior, op, y[:3], sy, RestoreSettings(method, 6), n=2, seed=4, batch_size=4)
        c = restore(prior, op, y[:3], sy, RestoreSettings(method, 6), n=2, seed=5, batch_size=4)
        assert torch.allclose(a, b, atol=1e-12) and not torch.allclose(a, c)


class ClassMixtures(Teacher):
    """A class-conditional analytic teacher: class c's data is its own Gaussian mixture (dispatch by label)."""

    def __init__(self, classes):
        super().__init__()
        self.classes = torch.nn.ModuleList(classes)
        self.schedule, self.sample_shape = classes[0].schedule, classes[0].sample_shape

    def denoise(self, x, t, cond=None):
        labels = cond.class_labels
        out = [c.denoise(x, t) for c in self.classes]
        pick = labels.reshape(-1, *([1] * (x.ndim - 1)))
        return tuple(torch.where(pick == 0, a, b) for a, b in zip(out[0], out[1], strict=True))


def test_the_condition_reaches_the_teacher_for_every_method():
    """Two classes of 8x8 images, the bottom half hidden: the hidden half is restored from the labelled class's prior
    (closer to that class's exact posterior mean than to the other's), for PiGDM, DPS and DDRM."""
    from accelkit.sampling import class_label_condition

    shape, sy = (1, 8, 8), 0.05
    a = GaussianMixtureTeacher(torch.full((1, *shape), 0.5), torch.full((1,), 0.04), None, LinearSchedule())
    b = GaussianMixtureTeacher(torch.full((1, *shape), -0.5), torch.full((1,), 0.04), None, LinearSchedule())
    teacher = ClassMixtures([a, b])
    op = Inpaint(half_mask(shape))
    x0 = torch.zeros(2, *shape, dtype=F64)  # ambiguous observed half: the label decides the hidden half
    y = measure(op, x0, sy, 0)
    h = op.matrix()
    for method, nfe in (("pigdm", 20), ("dps", 50), ("ddrm", 20)):
        out = restore(teacher, op, y, sy, RestoreSettings(method, nfe), n=4,
                      condition=class_label_condition([0, 1])).mean(1)
        for i, prior in enumerate((a, b)):
            w, means, _ = prior.linear_gaussian_posterior(h, y[i], sy)
            want = (w[:, None] * means).sum(0).reshape(shape)
            other = (1, 0)[i]
            w2, means2, _ = (a, b)[other].linear_gaussian_posterior(h, y[i], sy)
            wrong = (w2[:, None] * means2).sum(0).reshape(shape)
            hidden = op.mask[0] == 0
            assert float((out[i] - want)[hidden].abs().mean()) < 0.5 * float((out[i] - wrong)[hidden].abs().mean())


@pytest.mark.parametrize("task", ["inpaint", "super-resolution", "deblur"])
def test_dps_and_ddrm_on_the_gaussian_prior_against_the_exact_posterior(task):
    """The N(0, I) case of the PiGDM test, 1000 samples of each method at its default settings (PiGDM 20 NFE from
    t = 0.8, DPS 100, DDRM 20). Measured relative mean error PiGDM 0.05-0.10, DPS 0.08-0.39, DDRM 0.05-0.58 (Monte
    Carlo included): all three are near the exact mean for the mask and the pooling; under the blur (singular values
    down to 2e-3, so coefficients whose measurement noise is 50x the prior's std) DDRM and DPS trust y too much and
    PiGDM is at least 4x closer."""
    shape, sy = (1, 4, 4), 0.1
    prior = GaussianMixtureTeacher(torch.zeros(1, *shape), torch.ones(1), None, LinearSchedule())
    op = operators(shape)[task]
    h = op.matrix()
    y = measure(op, torch.randn(1, *shape, dtype=F64, generator=torch.Generator().manual_seed(1)), sy, 2)
    cov = torch.linalg.inv(torch.eye(h.shape[1], dtype=F64) + h.T @ h / sy**2)
    mean = cov @ h.T @ y.reshape(-1) / sy**2
    errors = {}
    for method, nfe in (("pigdm", 20), ("dps", 100), ("ddrm", 20)):
        s = restore(prior, op, y, sy, RestoreSettings(method, nfe), n=1000, batch_size=1000)[0].reshape(1000, -1)
        errors[method] = float((s.mean(0) - mean).norm() / mean.norm())
    print(task, {k: round(v, 3) for k, v in errors.items()})
    assert errors["pigdm"] < 0.15
    if task == "deblur":
        assert 4 * errors["pigdm"] < min(errors["dps"], errors["ddrm"])
    else:
        assert max(errors["dps"], errors["ddrm"]) < 0.15
