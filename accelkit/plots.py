"""PNG figures: quality against NFE, and 2-D sample scatters (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG to a temporary file beside ``path``, then rename, so no half-written plot is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_quality(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str | Path, metric: str,
                 title: str = "", log_y: bool = True) -> Path:
    """One line per method: ``metric`` against NFE (log-log by default). ``curves[name] = (nfes, values)``."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for name, (nfes, values) in curves.items():
        ax.plot(list(nfes), list(values), marker="o", label=name)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_scatter_panels(panels: Mapping[str, np.ndarray], path: str | Path, lim: float | None = None) -> Path:
    """Side-by-side 2-D scatter plots, one per named (N, 2) array."""
    plt = _figure()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
    if lim is None:
        lim = max(float(np.abs(np.asarray(p)).max()) for p in panels.values()) * 1.05
    for ax, (name, pts) in zip(axes[0], panels.items(), strict=True):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.6, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
