"""accelkit's built-in small networks: an MLP for vectors and a small UNet for images.

Both take (x, timestep, class_labels=None) and return a tensor shaped like x. The timestep is embedded with
sinusoidal features (Vaswani et al. 2017; Ho et al. 2020), so any TimeInput (t, 1000 t, DDPM steps) works.
Built from a plain JSON config by :func:`build_network`, so a saved file carries everything needed to rebuild it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def timestep_embedding(timestep: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos(w_k s), sin(w_k s)] of the timestep s, w_k = max_period^(-k / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeClassEmbedding(nn.Module):
    """Timestep features through a 2-layer MLP, plus a learned class embedding (index ``num_classes`` = null)."""

    def __init__(self, dim: int, time_scale: float, num_classes: int = 0):
        super().__init__()
        self.dim, self.time_scale = dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None

    def forward(self, timestep: Tensor, class_labels: Tensor | None) -> Tensor:
        features = timestep_embedding(timestep * self.time_scale, self.dim)  # float32, then the network's dtype
        emb = self.mlp(features.to(next(self.mlp.parameters()).dtype))
        if self.classes is not None:
            if class_labels is None:
                class_labels = torch.full((timestep.shape[0],), self.classes.num_embeddings - 1,
                                          device=timestep.device, dtype=torch.long)
            emb = emb + self.classes(class_labels.long())
        return emb


def fourier_features(x: Tensor, n: int, base: float) -> Tensor:
    """[x, sin(w_k x), cos(w_k x)] for k = 0 .. n-1, w_k = pi base 2^k (per coordinate): Fourier features of the
    input (Tancik et al. 2020, "Fourier Features Let Networks Learn High Frequency Functions in Low Dimensional
    Domains"), so an MLP can represent sharp edges in the data."""
    freqs = math.pi * base * 2.0 ** torch.arange(n, device=x.device, dtype=x.dtype)
    angles = (x[..., None] * freqs).flatten(-2)
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=-1)


class MLP(nn.Module):
    """Residual MLP for flat vectors (2-D toy data): x -> [Linear, SiLU] blocks with additive time embedding.

    ``fourier_features`` = n > 0 feeds the input layer [x, sin(w_k x), cos(w_k x)], w_k = pi ``fourier_base`` 2^k
    (:func:`fourier_features`; periods 2 / (base 2^k) in data units) instead of x alone; 0 (the default, and what
    checkpoints written before the option hold) is the plain MLP.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, time_scale: float = 1.0,
                 num_classes: int = 0, fourier_features: int = 0, fourier_base: float = 0.5):
        super().__init__()
        #: The JSON config that rebuilds this network (see :func:`build_network`).
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "time_scale": time_scale,
                       "num_classes": num_classes}
        if fourier_features:
            self.config.update({"fourier_features": fourier_features, "fourier_base": fourier_base})
        self.fourier = (int(fourier_features), float(fourier_base))
        self.inp = nn.Linear(dim * (1 + 2 * self.fourier[0]), hidden)
        self.emb = TimeClassEmbedding(hidden, time_scale, num_classes)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        features = fourier_features(x, *self.fourier) if self.fourier[0] else x
        h = self.inp(features) + self.emb(timestep, class_labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """A two-level UNet for small images (8x8 digits, 28x28 Fashion-MNIST): ResBlocks, average-pool down,
    nearest up, skip connections, time (and class) embedding added in every block."""

    def __init__(self, channels: int = 1, base: int = 32, mults: tuple[int, ...] = (1, 2), time_scale: float = 1.0,
                 num_classes: int = 0):
        super().__init__()
        self.config = {"channels": channels, "base": base, "mults": list(mults), "time_scale": time_scale,
                       "num_classes": num_classes}
        emb_dim = base * 4
        self.emb = TimeClassEmbedding(emb_dim, time_scale, num_classes)
        self.inp = nn.Conv2d(channels, base, 3, padding=1)
        widths = [base * m for m in mults]
        self.down = nn.ModuleList()
        c = base
        for w in widths:
            self.down.append(ResBlock(c, w, emb_dim))
            c = w
        self.mid = ResBlock(c, c, emb_dim)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(ResBlock(c + w, w, emb_dim))
            c = w
        self.out = nn.Sequential(nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.emb(timestep, class_labels)
        h = self.inp(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = nn.functional.avg_pool2d(h, 2, ceil_mode=True)
        h = self.mid(h, emb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(h)


ARCHITECTURES: dict[str, type[nn.Module]] = {"accelkit.MLP": MLP, "accelkit.SmallUNet": SmallUNet}


def build_network(architecture: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a built-in network from its architecture name and JSON config."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    cfg = dict(config)
    if "mults" in cfg:
        cfg["mults"] = tuple(cfg["mults"])
    return ARCHITECTURES[architecture](**cfg)


def builtin_call(network: nn.Module, x: Tensor, timestep: Tensor, cond) -> Tensor:
    """The NetworkFn for built-in networks (class labels are the only conditioning they take)."""
    labels = cond.class_labels if cond is not None else None
    return network(x, timestep, labels)
