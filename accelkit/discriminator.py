"""A discriminator made of trainable heads on a diffusion network's own features at noised inputs.

LADD (Sauer et al. 2024, "Fast high-resolution image synthesis with latent adversarial diffusion distillation"):
the frozen teacher sees a sample noised to a level t, x_t = alpha_t x + sigma_t eps, and small trainable heads read
the activations of some of its layers (forward hooks) and give one logit per sample (the heads' mean). The noise
level is drawn skewed towards high noise, t = sigmoid(m + s n), n ~ N(0, 1), m = 1 by default (LADD's shifted
logit-normal: at high noise the discriminator judges global structure). DMD2's GAN term uses the same heads on its
fake score network's features (that network is then trained by the GAN loss too). PCM's adversarial term can reuse
it.

Losses (non-saturating; Goodfellow et al. 2014), with D(x) the logit and softplus(v) = log(1 + e^v):

    L_D = E softplus(-D(x_real)) + E softplus(D(x_fake)),        L_G = E softplus(-D(x_fake)),

and the approximated R1 penalty of Seaweed-APT (Lin et al. 2025, "Diffusion adversarial post-training for one-step
video generation"): lambda E || D(x_real) - D(x_real + s n) ||^2, n ~ N(0, I), instead of the gradient penalty's
double backward. A healthy discriminator's accuracy stays well below 1 (FIELD-NOTES.md); batch >= 2.

Each head first standardises its layer's channels with the mean and deviation of a probe batch (real samples noised
at drawn levels, given by the stage; fixed buffers): a pretrained network's channels differ widely in offset and
scale, and unstandardised heads barely learn (docs/score_distill.md). Heads by feature shape: (B, C) ->
Linear-SiLU-Linear; (B, C, H, W) -> conv3x3-GroupNorm-SiLU, spatial mean, then
the same MLP; (B, N, C) tokens -> token mean, then the MLP; the MLP (``depth`` hidden layers, 1 by default) also
sees (t, sin pi t, cos pi t). A network whose features are few and plain (the MLP of a 2-D teacher) needs heads of
depth 2: one hidden layer cannot draw the boundary between a good generator's samples and the real ones (a 2-D
measurement: held-out accuracy 0.51 at depth 1 against 0.59-0.67 at depth 2, docs/score_distill.md). Layers
``auto``: a diffusers UNet's ``mid_block``, the builtin UNet's ``mid``, every block of the builtin MLP, a
transformer's middle and last block.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AccelkitError
from .teacher import Condition, NetworkTeacher


def auto_layers(network: nn.Module) -> list[str]:
    """The layers whose outputs the heads read when the recipe says ``auto`` (see the module docstring)."""
    names = dict(network.named_modules())
    if "mid_block" in names:
        return ["mid_block"]
    if "mid" in names:
        return ["mid"]
    blocks = getattr(network, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return sorted({f"transformer_blocks.{len(blocks) // 2}", f"transformer_blocks.{len(blocks) - 1}"})
    blocks = getattr(network, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return [f"blocks.{i}" for i in range(len(blocks))]
    raise AccelkitError(f"{type(network).__name__}: no known layers for the discriminator heads; name them in the "
                        f"recipe (discriminator.layers, module names such as 'down_blocks.1')")


def _first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if hasattr(out, "sample") and isinstance(out.sample, Tensor):
        return out.sample
    raise AccelkitError(f"a discriminator layer returned {type(out).__name__}, not a tensor")


def noise_level_features(t: Tensor) -> Tensor:
    """(t, sin(pi t), cos(pi t)) per sample: what a head knows of the noise level (LADD's heads are conditioned
    on it, so each level has its own decision threshold)."""
    t = t.float().reshape(-1, 1)
    return torch.cat([t, torch.sin(torch.pi * t), torch.cos(torch.pi * t)], dim=1)


class Head(nn.Module):
    """One logit per sample from one layer's features and the noise level (see the module docstring).

    The features are first standardised per channel, (f - mean) / std, with the mean and standard deviation of
    that channel over the probe batch the discriminator was built with (fixed buffers, part of the state dict): a
    pretrained network's channels have offsets and scales far apart, and without this the heads barely learn
    (see :class:`FeatureDiscriminator`)."""

    def __init__(self, shape: Sequence[int], width: int, mean: Tensor | None = None, std: Tensor | None = None,
                 depth: int = 1):
        super().__init__()
        self.rank = len(shape)
        channels = shape[0] if self.rank == 3 else shape[-1]
        self.register_buffer("mean", torch.zeros(channels) if mean is None else mean.detach().float().clone())
        self.register_buffer("std", torch.ones(channels) if std is None else std.detach().float().clone())
        if self.rank == 3:
            self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(min(8, width), width),
                                      nn.SiLU())
            channels = width
        elif self.rank not in (1, 2):
            raise AccelkitError(f"discriminator features of shape {list(shape)}: expected (C), (N, C) or (C, H, W)")
        hidden = [nn.Linear(channels + 3, width), nn.SiLU()]
        for _ in range(depth - 1):
            hidden += [nn.Linear(width, width), nn.SiLU()]
        self.mlp = nn.Sequential(*hidden, nn.Linear(width, 1))

    def forward(self, f: Tensor, t: Tensor) -> Tensor:
        f = f.float()
        if self.rank == 3:
            f = (f - self.mean[:, None, None]) / self.std[:, None, None]
            f = self.conv(f).mean((2, 3))
        else:
            f = (f - self.mean) / self.std
            if self.rank == 2:
                f = f.mean(1)
        level = noise_level_features(t.to(f.device).expand(f.shape[0]) if t.ndim == 0 else t.to(f.device))
        return self.mlp(torch.cat([f, level], dim=1))[:, 0]


def channel_statistics(f: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of a batch of features (B, C), (B, N, C) or (B, C, H, W); a
    channel's deviation is kept above 1e-2 of the median channel's (a dead channel is not blown up)."""
    f = f.detach().float()
    flat = f.transpose(0, 1).reshape(f.shape[1], -1) if f.ndim == 4 else f.reshape(-1, f.shape[-1]).T
    mean, std = flat.mean(1), flat.std(1) if flat.shape[1] > 1 else torch.ones(flat.shape[0], device=f.device)
    floor = 1e-2 * std.median().clamp(min=1e-6)
    return mean, std.clamp(min=float(floor))


class FeatureDiscriminator(nn.Module):
    """Trainable heads on ``backbone``'s features; ``forward(x_t, t, cond)`` runs the backbone's network once
    (unguided) and returns the heads' mean logit per sample. Only the heads are this module's parameters: the
    backbone (a frozen teacher, or a fake score network trained elsewhere) is referenced, not owned."""

    def __init__(self, backbone: NetworkTeacher, layers: Sequence[str] | str = "auto", width: int = 64,
                 probe: tuple[Tensor, Tensor, Condition | None] | None = None, seed: int = 0, depth: int = 1):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: its weights are not the heads'
        modules = dict(backbone.network.named_modules())
        self.layers = auto_layers(backbone.network) if layers == "auto" else list(layers)
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise AccelkitError(f"discriminator layers {missing}: not modules of {type(backbone.network).__name__} "
                                f"(some of its modules: {list(modules)[1:8]})")
        self._captured: dict[str, Tensor] = {}
        self._capturing = False
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name))
        probe_given = probe is not None and len(probe[0]) > 1
        if probe is None:
            x = torch.zeros(2, *backbone.sample_shape)
            probe = (x, torch.full((2,), 0.5, dtype=torch.float64), None)
        device = next(backbone.network.parameters()).device
        with torch.no_grad():
            feats = self.features(probe[0].to(device), probe[1], probe[2])
        with torch.random.fork_rng(devices=[]):  # the heads' initial weights come from ``seed`` alone
            torch.manual_seed(seed)
            stats = {n: channel_statistics(feats[n]) if probe_given else (None, None) for n in self.layers}
            self.heads = nn.ModuleList([Head(tuple(feats[n].shape[1:]), width, *stats[n], depth=depth)
                                        for n in self.layers])

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._capturing:
                self._captured[name] = _first_tensor(output)
        return hook

    @contextmanager
    def _capture(self):
        self._captured, self._capturing = {}, True
        try:
            yield self._captured
        finally:
            self._capturing = False

    def features(self, x_t: Tensor, t: Tensor, cond: Condition | None = None) -> dict[str, Tensor]:
        """The hooked layers' outputs for one unguided forward pass of the backbone at (x_t, t)."""
        b = self.backbone
        t = t.to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        with self._capture() as captured:
            b.call(b.network, x_t, b.time_input(t).to(torch.float32), cond)
            feats = dict(captured)
        self._captured = {}
        return feats

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        feats = self.features(x_t, t, cond)
        return torch.stack([head(feats[n], t) for n, head in zip(self.layers, self.heads, strict=True)]).mean(0)


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating L_D = E softplus(-D(real)) + E softplus(D(fake))."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating L_G = E softplus(-D(fake))."""
    return F.softplus(-logits_fake).mean()


def approximate_r1(disc: FeatureDiscriminator, x_t: Tensor, t: Tensor, cond: Condition | None, logits: Tensor,
                   scale: float, noise: Tensor) -> Tensor:
    """Seaweed-APT's approximated R1: E || D(x) - D(x + scale n) ||^2 at the real inputs ``x_t``."""
    return ((logits - disc(x_t + scale * noise, t, cond)) ** 2).mean()


def accuracy(logits_real: Tensor, logits_fake: Tensor) -> float:
    """The share of correct calls (real > 0, fake < 0) over both batches."""
    right = (logits_real > 0).float().sum() + (logits_fake < 0).float().sum()
    return float(right / (len(logits_real) + len(logits_fake)))


__all__ = ["FeatureDiscriminator", "Head", "auto_layers", "discriminator_loss", "generator_gan_loss",
           "approximate_r1", "accuracy", "noise_level_features", "channel_statistics"]
