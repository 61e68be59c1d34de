"""`accelkit rescale`: an artifact that loads as a teacher with the same ODE, the weights referenced by hash."""

import json
from pathlib import Path

import pytest
import torch

from accelkit.models.builtin import MLP, builtin_call
from accelkit.models.loading import load_teacher, save_teacher
from accelkit.schedules import LinearSchedule, schedule_from_name
from accelkit.solvers import get_solver, solve
from accelkit.teacher import NetworkTeacher, RescaledTeacher


def mlp_file(path: Path) -> Path:
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2)
    teacher = NetworkTeacher(net, builtin_call, "flow", LinearSchedule(), (2,))
    return save_teacher(teacher, path)


@pytest.mark.parametrize("target", ["vp-cosine", "edm"])
def test_cli_round_trip_same_samples_from_corresponding_noise(tmp_path, cli, target):
    src = mlp_file(tmp_path / "t.safetensors")
    r = cli("rescale", src, "--to", target, "-o", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip())
    assert out == tmp_path / "r" and not list(out.glob("*.safetensors")), "weights must be referenced, not copied"
    spec = json.loads((out / "rescaled.json").read_text())
    assert spec["schedule"]["name"] == target and spec["source"]["path"] == str(src.resolve())

    base, resc = load_teacher(src), load_teacher(out)
    assert isinstance(resc, RescaledTeacher) and resc.schedule == schedule_from_name(target)
    # The two ODEs solved accurately from corresponding noise reach the same sample: x_B(1) = s(1) x_A(t(1)).
    # The target's r = 1 sits at the source's t(1) (< 1 where the target's SNR range is narrower, as for EDM).
    x_b1 = resc.prior_sample(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    t1, s1 = resc.time_map(torch.ones((), dtype=torch.float64))
    steps = get_solver("heun").steps(400)
    x_a = solve(base, x_b1 / float(s1), solver="heun", nfe=400, grid=torch.linspace(float(t1), 0, steps + 1).tolist())
    x_b = solve(resc, x_b1, solver="heun", nfe=400)
    assert torch.allclose(x_a, x_b, rtol=1e-4, atol=1e-4), (x_a - x_b).abs().max()

    again = cli("rescale", src, "--to", target, "-o", out)  # the same recipe again: reused
    assert again.returncode == 0 and again.stdout.strip() == str(out)
    info = cli("inspect", out, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["schedule"]["name"] == target


def test_pipe_from_stdin_and_bad_inputs(tmp_path, cli):
    src = mlp_file(tmp_path / "t.safetensors")
    r = cli("rescale", "--to", "vp-cosine", "-o", tmp_path / "r", input=f"{src}\n")
    assert r.returncode == 0, r.stderr
    bad = cli("rescale", src, "--to", "cosine", "-o", tmp_path / "bad")
    assert bad.returncode == 2 and "rescale.to" in bad.stderr and "vp-cosine" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    other = cli("rescale", src, "--to", "edm", "-o", tmp_path / "r")  # another recipe into a used directory
    assert other.returncode == 2 and "--force" in other.stderr
    # The source changes after rescaling: loading the artifact refuses it.
    torch.manual_seed(1)
    save_teacher(NetworkTeacher(MLP(dim=2, hidden=32, depth=2), builtin_call, "flow", LinearSchedule(), (2,)), src)
    changed = cli("sample", tmp_path / "r", "-n", "4", "-o", tmp_path / "x.safetensors")
    assert changed.returncode == 2 and "has changed" in changed.stderr and not (tmp_path / "x.safetensors").exists()
