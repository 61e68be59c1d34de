"""Path curvature (total turning angle of the solver's path, accelkit.evaluation.path_curvature) against exact answers:
0 on straight paths, the polygon's exterior angles on a circular arc, and the arc's angle in the limit."""

import math

import pytest
import torch
from test_eval import StraightTeacher

from accelkit.evaluation import curvature, evaluate, path_curvature, sample_with_path_measures
from accelkit.models.analytic import gaussian_mixture_2d
from accelkit.schedules import LinearSchedule
from accelkit.teacher import Teacher


class ArcTeacher(Teacher):
    """Under the linear schedule, the velocity field v(x, t) = r w (-sin(w t), cos(w t)), the same at every x: every
    ODE path is a circular arc of radius r through the angle w between t = 1 and t = 0 (x0 = x - t v, eps = x +
    (1 - t) v give exactly that velocity eps - x0)."""

    def __init__(self, w: float, r: float = 2.0):
        super().__init__()
        self.schedule, self.sample_shape, self.w, self.r = LinearSchedule(), (2,), w, r

    def denoise(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        v = self.r * self.w * torch.cat([-torch.sin(self.w * t), torch.cos(self.w * t)], dim=1)
        return x - t * v, x + (1 - t) * v


@pytest.mark.parametrize("solver,nfe", [("euler", 4), ("heun", 6), ("dpm++2m", 5), ("euler", 1)])
def test_a_straight_path_has_zero_curvature(solver, nfe):
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, s, k = sample_with_path_measures(StraightTeacher(), noise, solver, nfe, batch_size=10)
    assert 0.0 <= k < 1e-6 and s < 1e-18


@pytest.mark.parametrize("nfe", [2, 5, 16])
def test_a_circular_arc_turns_through_its_polygons_exterior_angles(nfe):
    """Euler on the uniform grid evaluates at t_i = 1 - i / N, i < N: N - 1 turns of w / N each."""
    w = 2.0
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, _, k = sample_with_path_measures(ArcTeacher(w), noise, "euler", nfe)
    assert k == pytest.approx(w * (nfe - 1) / nfe, rel=1e-12)


def test_the_curvature_of_fine_euler_paths_converges_to_the_arcs_angle_and_ignores_speed():
    w = 1.5
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert curvature(ArcTeacher(w), noise, nfe=1000) == pytest.approx(w, rel=2e-3)
    # the radius (speed) does not change the turning; an anti-parallel velocity is a turn of pi
    assert curvature(ArcTeacher(w, r=0.1), noise, nfe=64) == pytest.approx(curvature(ArcTeacher(w), noise, 64))
    v = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert path_curvature([1.0, 0.5, 0.2], [v, -v, -v]) == pytest.approx(math.pi)


def test_eval_rows_carry_curvature_beside_straightness():
    teacher = gaussian_mixture_2d(LinearSchedule())
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    row = evaluate(teacher, noise, noise, ["euler"], [8], straightness=True)[0]
    _, s, k = sample_with_path_measures(teacher, noise, "euler", 8, batch_size=20)
    assert row.curvature == pytest.approx(k, rel=1e-12) and row.straightness == pytest.approx(s, rel=1e-12)
    assert k > 0.05 and "curvature" in row.as_dict()
