"""Evaluation rows on known inputs give known numbers; plots are written as PNG."""

import math

import torch

from accelkit.evaluation import evaluate, sample_batched
from accelkit.models.analytic import gaussian_mixture_2d
from accelkit.schedules import LinearSchedule


def test_rows_against_own_samples_are_exact():
    teacher = gaussian_mixture_2d(LinearSchedule())
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x4 = sample_batched(teacher, noise, "euler", 4, batch_size=100)
    rows = evaluate(teacher, noise, x4, ["euler"], [4, 16], data=x4)
    assert [r.nfe for r in rows] == [4, 16]
    assert rows[0].rmse == 0.0 and math.isinf(rows[0].psnr) and rows[0].sliced_w2 == 0.0
    assert rows[1].rmse > 0 and rows[1].sliced_w2 > 0


def test_more_steps_get_closer_to_the_reference():
    teacher = gaussian_mixture_2d(LinearSchedule())
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = sample_batched(teacher, noise, "euler", 512)
    errs = [r.rmse for r in evaluate(teacher, noise, ref, ["euler"], [2, 8, 32])]
    assert errs[0] > errs[1] > errs[2]
    # Euler is first order: 4x the steps, about a quarter of the error
    assert 2.5 < errs[1] / errs[2] < 6


def test_plots_are_png(tmp_path):
    import numpy as np

    from accelkit.plots import plot_quality, plot_scatter_panels

    p = plot_quality({"a": ([1, 2, 4], [1.0, 0.5, 0.2])}, tmp_path / "q.png", "RMSE")
    s = plot_scatter_panels({"x": np.zeros((10, 2)) + 1}, tmp_path / "s.png")
    for f in (p, s):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["q.png", "s.png"]
