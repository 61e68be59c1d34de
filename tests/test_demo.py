"""`accelkit demo` runs the pipeline end to end, prints its table, writes its plots and reuses itself."""

import json
from pathlib import Path

import pytest
from conftest import REPO


def test_show_recipe_is_the_shipped_recipe(cli):
    r = cli("demo", "--show-recipe")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (Path(REPO) / "recipes" / "demo.yaml").read_text()


@pytest.mark.slow
def test_demo_small_end_to_end_and_reused(tmp_path, cli):
    sets = ["--set", "train.loop.steps=300", "--set", "couple.n=500", "--set", "couple.shard_size=250",
            "--set", "reflow.loop.steps=100", "--set", "reflow.eval_samples=100",
            "--set", "consistency.loop.steps=40", "--set", "shortcut.loop.steps=40"]
    r = cli("demo", *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / r.stdout.strip()
    assert len(r.stdout.strip().splitlines()) == 1 and out.is_dir()
    assert "quality against NFE" in r.stderr and "dpm++2m" in r.stderr
    for name in ("quality.png", "samples.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    quality = json.loads((out / "quality.json").read_text())
    rows = quality["rows"]
    # the teacher has learned the board, not a blur over it: its ODE samples land on the dark squares (a density
    # blind to the colours puts half there; the full demo's teacher about 92 %)
    assert quality["teacher_on_dark_squares"] > 0.7, quality["teacher_on_dark_squares"]
    euler = {r["nfe"]: r["rmse"] for r in rows if r["solver"] == "euler" and r["method"] == "teacher"}
    assert euler[1] > euler[4] > euler[16]  # more steps, closer to the ODE endpoint
    best8 = min(r["rmse"] for r in rows if r["nfe"] == 8 and r["method"] == "teacher")
    assert best8 < 0.5 * euler[8]  # a higher-order solver is much closer than Euler at the same NFE
    student = {r["nfe"]: r for r in rows if r["method"] == "rectified flow"}
    assert sorted(student) == [1, 2, 4] and all(r["solver"] == "euler" for r in student.values())
    assert student[1]["rmse"] < euler[1]  # the reflow student at 1 NFE is closer to the ODE endpoint than Euler
    for label, solver in (("consistency (cd)", "consistency"), ("shortcut", "shortcut")):  # their own samplers
        rows_of = {r["nfe"]: r for r in rows if r["method"] == label}
        assert sorted(rows_of) == [1, 2, 4] and all(r["solver"] == solver for r in rows_of.values()), label
    again = cli("demo", *sets, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == r.stdout and "reuse" in again.stderr
    bad = cli("demo", "--set", "train.loop.steps=-1", cwd=tmp_path)
    assert bad.returncode == 2 and "steps" in bad.stderr and "Traceback" not in bad.stderr


def test_mlp_fourier_features_option_and_old_checkpoints(tmp_path):
    """The built-in MLP's Fourier-feature input is an option: a checkpoint written without it (its config has no
    fourier keys) loads as the plain MLP, one with it round-trips; the features are [x, sin, cos] of pi base 2^k x."""
    import math

    import torch

    from accelkit.data import checkerboard, checkerboard_share
    from accelkit.models.builtin import MLP, build_network, fourier_features
    from accelkit.models.loading import load_teacher, save_teacher
    from accelkit.schedules import schedule_from_name
    from accelkit.teacher import NetworkTeacher, TimeInput

    x = torch.tensor([[0.5, -1.0]])
    f = fourier_features(x, 2, 0.5)
    angles = [math.pi / 4, math.pi / 2, -math.pi / 2, -math.pi]  # per coordinate: x_0 w_0, x_0 w_1, x_1 w_0, ...
    expected = [0.5, -1.0, *map(math.sin, angles), *map(math.cos, angles)]
    assert torch.allclose(f, torch.tensor([expected]), atol=1e-6)
    old_config = {"dim": 2, "hidden": 16, "depth": 1, "time_scale": 1000.0, "num_classes": 0}
    assert build_network("accelkit.MLP", old_config).inp.in_features == 2
    for config in (old_config, {**old_config, "fourier_features": 3, "fourier_base": 0.5}):
        torch.manual_seed(0)
        net = MLP(**config)
        assert net.config == config
        teacher = NetworkTeacher(net, lambda n, x, t, c: n(x, t), "flow", schedule_from_name("linear"), (2,),
                                 TimeInput("scaled", 1000, 1000.0))
        path = save_teacher(teacher, tmp_path / f"mlp-{len(config)}.safetensors")
        loaded = load_teacher(path)
        assert loaded.network.config == config
        with torch.no_grad():
            assert torch.equal(loaded.network(x, torch.tensor([0.5])), net(x, torch.tensor([0.5])))
    board = checkerboard(4000, torch.Generator().manual_seed(0))
    assert checkerboard_share(board) == 1.0 and checkerboard_share(board + torch.tensor([1.0, 0.0])) < 0.3
