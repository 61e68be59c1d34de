"""Loading teachers: accelkit's own format round trip, diffusers folders and single files, and bad inputs."""

import json

import pytest
import torch

from accelkit.errors import AccelkitError
from accelkit.models.builtin import MLP, SmallUNet, builtin_call
from accelkit.models.loading import FORMAT, load_teacher, read_safetensors, save_teacher
from accelkit.noise import sample_noise
from accelkit.schedules import DiscreteVPSchedule, LinearSchedule
from accelkit.teacher import Condition, NetworkTeacher, TimeInput


def builtin_teacher(kind: str) -> NetworkTeacher:
    torch.manual_seed(0)
    if kind == "mlp":
        net = MLP(dim=2, hidden=32, depth=2, num_classes=3)
        return NetworkTeacher(net, builtin_call, "flow", LinearSchedule(), (2,), guidance_scale=2.0,
                              null_condition=Condition(class_labels=torch.tensor([3])))
    net = SmallUNet(channels=1, base=8, mults=(1, 2), time_scale=1.0)
    return NetworkTeacher(net, builtin_call, "eps", DiscreteVPSchedule(), (1, 8, 8))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_accelkit_format_round_trip(tmp_path, kind):
    teacher = builtin_teacher(kind)
    path = save_teacher(teacher, tmp_path / "t.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name != "t.safetensors"], "temporary file left behind"
    _, meta = read_safetensors(path)
    assert meta["format"] == FORMAT and json.loads(meta["sample_shape"]) == list(teacher.sample_shape)
    loaded = load_teacher(path)
    assert type(loaded.network) is type(teacher.network)
    assert loaded.prediction == teacher.prediction and loaded.schedule == teacher.schedule
    assert loaded.time_input.config() == teacher.time_input.config()
    assert loaded.sample_shape == teacher.sample_shape and loaded.guidance_scale == teacher.guidance_scale
    x = sample_noise(0, range(5), teacher.sample_shape)
    t = torch.linspace(0.1, 0.9, 5)
    cond = Condition(class_labels=torch.tensor([0, 1, 2, 0, 1])) if kind == "mlp" else None
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, t, cond), teacher.velocity(x, t, cond))
    # the artifact hook: a directory holding teacher.safetensors
    (tmp_path / "art").mkdir()
    save_teacher(teacher, tmp_path / "art" / "teacher.safetensors")
    with torch.no_grad():
        assert torch.equal(load_teacher(tmp_path / "art").velocity(x, t, cond), teacher.velocity(x, t, cond))


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "t.safetensors"
    a, b = builtin_teacher("mlp"), builtin_teacher("unet")
    save_teacher(a, path)
    save_teacher(b, path)
    assert load_teacher(path).sample_shape == (1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_load_overrides(tmp_path):
    path = save_teacher(builtin_teacher("unet"), tmp_path / "t.safetensors")
    t = load_teacher(path, prediction_type="v_prediction", schedule="vp-scaled-linear", dtype="fp64", guidance=1.0)
    assert t.prediction == "v" and t.schedule.config()["beta_schedule"] == "scaled_linear"
    assert next(t.network.parameters()).dtype == torch.float64
    assert t.time_input.config() == TimeInput("discrete", 1000).config()


def test_sample_noise_depends_on_seed_and_index_only():
    full = sample_noise(7, range(10), (3, 4))
    parts = torch.cat([sample_noise(7, range(0, 3), (3, 4)), sample_noise(7, torch.arange(3, 10), (3, 4))])
    assert torch.equal(full, parts)
    assert torch.equal(sample_noise(7, [5, 2], (3, 4)), full[[5, 2]])
    assert not torch.equal(sample_noise(8, range(10), (3, 4)), full)
    assert not torch.equal(full[0], full[1])
    big = sample_noise(0, range(2000), (8,))
    assert abs(float(big.mean())) < 0.03 and abs(float(big.std()) - 1) < 0.03


def test_bad_inputs(tmp_path):
    path = save_teacher(builtin_teacher("mlp"), tmp_path / "t.safetensors")
    with pytest.raises(AccelkitError, match="no such file"):
        load_teacher(tmp_path / "missing.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AccelkitError, match="cut.safetensors: not a readable safetensors file"):
        load_teacher(tmp_path / "cut.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.ckpt")
    with pytest.raises(AccelkitError, match="model.ckpt: pickled checkpoint refused"):
        load_teacher(tmp_path / "model.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AccelkitError, match="empty: not a model"):
        load_teacher(tmp_path / "empty")
