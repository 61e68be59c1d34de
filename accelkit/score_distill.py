"""Score distillation: a few-step generator G matched to a teacher's distribution through two score networks.

Three networks (seed 001, "Distillation techniques: score distillation"; FIELD-NOTES.md):

* the **generator** G, started from the teacher's weights, run as a K-step generator on fixed times
  (:mod:`accelkit.generator`); x = G(z) is its clean sample;
* the **real score**: the frozen teacher, classifier-free guided with the recipe's scale, x0_real(x_t, t);
* the **fake score**: a copy of the teacher (all weights, or LoRA adapters: VSD / SwiftBrush) trained by denoising
  on the generator's detached samples, unguided (:func:`fake_score_loss`); it tracks the score of G's distribution,
  x0_fake(x_t, t).

Both are used in x0 terms: the score of x_t = alpha x0 + sigma eps is s(x_t) = -(x_t - alpha x0_hat) / sigma^2, so
score differences are alpha / sigma^2 times x0 differences.

**DMD** (Yin et al. 2024, "One-step diffusion with distribution matching distillation"; DMD2, Yin et al. 2024,
"Improved distribution matching distillation for fast image synthesis"). The gradient of KL(p_G || p_data),
integrated over noise levels t ~ U[t_min, t_max] (0.02, 0.98), with DMD's per-sample normalisation:

    x_t = alpha_t sg(x) + sigma_t eps,
    g = (x0_fake(x_t) - x0_real(x_t)) / mean_d |x - x0_real(x_t)|,
    L_DM = 1/2 || x - sg(x - g) ||^2        (mean over elements; its gradient in x is g / D)

(:func:`distribution_matching_loss`). DMD adds a regression loss on couplings pairs (z, x*) of the teacher's ODE,
L_reg = d(G(z), x*) with the pseudo-Huber distance or a feature distance (LPIPS in the paper); DMD2 drops it, takes
several fake-score updates per generator update and optionally a GAN term (:mod:`accelkit.discriminator`).

**VSD / SwiftBrush** (Wang et al. 2023, "ProlificDreamer"; Nguyen & Tran 2024, "SwiftBrush"): the same gradient
with the fake score a LoRA of the teacher, eps-form weighting  w(t) (eps_real - eps_fake) dG/dtheta; in x0 terms the
eps difference is -alpha / sigma times the x0 difference, so VSD is the DMD gradient with another time weighting.
accelkit uses DMD's normalisation for both (the weight only rescales each sample's gradient).

**SIM** (Luo et al. 2024, "One-step diffusion distillation through score implicit matching"; seed 001's "Score
Divergence Gradient Theorem"). The divergence D = int w(t) E_{x_t ~ p_G,t} d(s_G(x_t) - s_teacher(x_t)) dt with a
general distance d has, for the part through G's own (unknown) score, the gradient of the surrogate

    L_SIM = - E_{z, eps} [ d'(u)^T (x0_fake(x_t) - x) ],   u = x0_fake(x_t) - x0_real(x_t),
    x_t = alpha_t x + sigma_t eps          (x = G(z) with gradients; the score networks' weights are not
                                            differentiated, but x_t is, through both networks' inputs)

(in x0 terms: s_fake - grad log q_t(x_t | x) = alpha / sigma^2 (x0_fake - x); the alpha / sigma^2 factors go into
w(t)). d is the pseudo-Huber distance sqrt(||u||^2 + c^2) - c by default, d'(u) = u / sqrt(||u||^2 + c^2), or L2,
d = ||u||^2 / 2, d'(u) = u. SiD (Zhou et al. 2024, "Score identity distillation") is the L2 case with an extra
(1 - alpha) ||u||^2 (alpha = 1.2 in SiD; ``sim_alpha`` here, 1 by default: SIM's surrogate alone). Per-sample
weights use DMD's normalisation as well. At a generator whose distribution is the teacher's and a fake score equal to
the real one, u = 0 and both gradients vanish (tests: the analytic mixture teacher).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .objectives import DenoisingObjective, regression_loss
from .teacher import Condition, Teacher, broadcast_to

METHODS = ("vsd", "dmd", "dmd2", "sim")
DISTANCES = ("pseudo-huber", "l2")


def noised(schedule, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = alpha(t) x + sigma(t) eps."""
    return broadcast_to(schedule.alpha(t), x) * x + broadcast_to(schedule.sigma(t), x) * eps


def _per_sample_mean_abs(d: Tensor) -> Tensor:
    return d.reshape(d.shape[0], -1).abs().mean(1)


def dmd_weight(x: Tensor, x0_real: Tensor) -> Tensor:
    """DMD's normalisation 1 / mean_d |x - x0_real| per sample (detached), shaped to multiply x."""
    w = 1.0 / _per_sample_mean_abs((x - x0_real).detach()).clamp_min(1e-8)
    return w.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def distribution_matching_loss(x: Tensor, t: Tensor, eps: Tensor, real: Teacher, fake: Teacher,
                               cond: Condition | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD's L_DM for generator samples ``x`` (with gradients) at times ``t`` with noise ``eps``."""
    with torch.no_grad():
        xt = noised(real.schedule, x.detach(), t, eps)
        x0_real = real.predict_x0(xt, t, cond).to(x.dtype)
        x0_fake = fake.predict_x0(xt, t, cond).to(x.dtype)
        grad = (x0_fake - x0_real) * dmd_weight(x, x0_real)
        grad = torch.nan_to_num(grad)
    loss = 0.5 * torch.mean((x.float() - (x - grad).detach().float()) ** 2)
    return loss, {"dm_grad": grad.abs().mean()}


def sim_loss(x: Tensor, t: Tensor, eps: Tensor, real: Teacher, fake: Teacher, cond: Condition | None = None,
             distance: str = "pseudo-huber", huber_c: float | None = None, alpha: float = 1.0
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """SIM's surrogate L_SIM (plus SiD's (1 - alpha) term) for generator samples ``x`` (with gradients)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance {distance!r}: expected one of {', '.join(DISTANCES)}")
    xt = noised(real.schedule, x, t, eps)
    x0_real = real.predict_x0(xt, t, cond).to(x.dtype)
    x0_fake = fake.predict_x0(xt, t, cond).to(x.dtype)
    u = (x0_fake - x0_real).reshape(x.shape[0], -1).float()
    dim = u.shape[1]
    if distance == "l2":
        d_prime, d_value = u, 0.5 * (u**2).sum(1)
    else:
        c = huber_c if huber_c is not None else 0.00054 * math.sqrt(dim)
        root = torch.sqrt((u**2).sum(1, keepdim=True) + c * c)
        d_prime, d_value = u / root, root[:, 0] - c
    w = dmd_weight(x, x0_real).reshape(-1).float()
    surrogate = -(d_prime * (x0_fake - x).reshape(x.shape[0], -1).float()).sum(1)
    per_sample = surrogate + (1.0 - alpha) * 2.0 * d_value
    return torch.mean(w * per_sample) / dim, {"score_gap": _per_sample_mean_abs(u).mean().detach()}


def fake_score_loss(objective: DenoisingObjective, network: torch.nn.Module, x: Tensor, t: Tensor, eps: Tensor,
                    cond_fields: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The fake score's denoising loss on the generator's detached samples ``x`` (the teacher's own objective)."""
    batch = {"x": x.detach(), "t": t, "eps": eps, **(cond_fields or {})}
    return objective.loss(network, batch)


def regression_to_couplings(sample: Tensor, target: Tensor, kind: str = "pseudo-huber", features=None) -> Tensor:
    """DMD's regression loss: the pseudo-Huber distance of G(z) to the teacher's ODE sample x*, or the mean squared
    distance of their features under ``features`` (a feature network, e.g. ``accelkit.features.feature_network``)."""
    if features is not None:
        return torch.mean((features(sample) - features(target).detach()) ** 2)
    return regression_loss(sample.float() - target.float(), kind)


__all__ = ["METHODS", "DISTANCES", "noised", "dmd_weight", "distribution_matching_loss", "sim_loss",
           "fake_score_loss", "regression_to_couplings"]
