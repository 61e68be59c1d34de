"""Loading teachers: accelkit's own format round trip, diffusers folders and single files, and bad inputs."""

import json
import shutil

import pytest
import tiny_models
import torch
from safetensors.torch import save_file

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
    tensors, meta = read_safetensors(path)
    save_file(tensors, tmp_path / "v9.safetensors", metadata={**meta, "format": "accelkit.teacher/9"})
    with pytest.raises(AccelkitError, match="v9.safetensors: format 'accelkit.teacher/9' is not supported"):
        load_teacher(tmp_path / "v9.safetensors")
    save_file({"samples": torch.zeros(2)}, tmp_path / "s.safetensors", metadata={"format": "accelkit.samples/1"})
    with pytest.raises(AccelkitError, match="s.safetensors: an accelkit.samples/1 file, not a teacher"):
        load_teacher(tmp_path / "s.safetensors")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text(json.dumps({"kind": "couple"}))
    with pytest.raises(AccelkitError, match="art: an accelkit couple artifact without teacher.safetensors"):
        load_teacher(tmp_path / "art")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AccelkitError, match="empty: not a model"):
        load_teacher(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# diffusers folders and single files (tiny random-weight models built from configs)

@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {
        "ddpm": tiny_models.ddpm_pipeline(root / "ddpm"),
        "ddpm-v": tiny_models.ddpm_pipeline(root / "ddpm-v", "v_prediction"),
        "sd": tiny_models.sd_like_pipeline(root / "sd"),
        "sd3": tiny_models.sd3_like_pipeline(root / "sd3"),
        "dit": tiny_models.dit_pipeline(root / "dit"),
    }


@pytest.mark.parametrize("which", ["ddpm", "ddpm-v"])
def test_ddpm_pipeline_x0_matches_diffusers_scheduler(pipes, which):
    """x0 at the training step k equals DDPMScheduler.step's pred_original_sample from the raw UNet output."""
    from diffusers import DDPMPipeline

    teacher = load_teacher(pipes[which])
    assert teacher.prediction == ("eps" if which == "ddpm" else "v")
    assert teacher.schedule == DiscreteVPSchedule("linear", 1000, 0.0001, 0.02)
    assert teacher.sample_shape == (1, 8, 8) and teacher.info["pipeline"] == "DDPMPipeline"
    ref = DDPMPipeline.from_pretrained(pipes[which], local_files_only=True)
    ref.scheduler.set_timesteps(1000)
    x = sample_noise(1, range(3), (1, 8, 8))
    for k in (0, 10, 500, 999):
        with torch.no_grad():
            out = ref.unet(x, k).sample
        expected = ref.scheduler.step(out, k, x).pred_original_sample
        t = torch.full((3,), (k + 1) / 1000, dtype=torch.float64)
        with torch.no_grad():
            got = teacher.predict_x0(x, t)
        assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), k


def test_single_file_with_config_equals_folder(pipes, tmp_path):
    folder = load_teacher(pipes["ddpm"])
    shutil.copy(pipes["ddpm"] / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet.safetensors")
    x, t = sample_noise(2, range(2), (1, 8, 8)), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        ref = folder.velocity(x, t)
        for config in (pipes["ddpm"], pipes["ddpm"] / "unet", pipes["ddpm"] / "unet" / "config.json"):
            single = load_teacher(tmp_path / "unet.safetensors", config=config)
            assert single.prediction == "eps" and torch.equal(single.velocity(x, t), ref)
    with pytest.raises(AccelkitError, match="unet.safetensors: no accelkit.teacher/1 metadata.*--config"):
        load_teacher(tmp_path / "unet.safetensors")
    # the same weights pickled: refused, then read with weights_only=True when allowed
    torch.save(dict(folder.network.state_dict()), tmp_path / "unet.bin")
    with pytest.raises(AccelkitError, match="unet.bin: pickled checkpoint refused.*--allow-pickle"):
        load_teacher(tmp_path / "unet.bin", config=pipes["ddpm"])
    with torch.no_grad():
        assert torch.equal(load_teacher(tmp_path / "unet.bin", config=pipes["ddpm"], allow_pickle=True)
                           .velocity(x, t), ref)


def test_model_folder_needs_prediction_type_and_schedule(pipes):
    unet_dir = pipes["dit"] / "transformer"
    # inside a pipeline folder the pipeline's scheduler is found
    assert load_teacher(unet_dir).schedule == DiscreteVPSchedule()
    lone = unet_dir.parent.parent / "lone-dit"
    shutil.copytree(unet_dir, lone, dirs_exist_ok=True)
    with pytest.raises(AccelkitError, match="lone-dit.*no scheduler config.*--prediction-type and --schedule"):
        load_teacher(lone)
    teacher = load_teacher(lone, prediction_type="epsilon", schedule="vp-linear")
    assert teacher.prediction == "eps" and teacher.time_input.kind == "discrete"


def test_dit_transformer_class_guidance(pipes):
    """DiT: mean channels of the learned-sigma output; guidance against the null class num_embeds_ada_norm."""
    teacher = load_teacher(pipes["dit"])
    assert teacher.info["conditioning"] == {"kind": "class", "num_classes": 10, "null_class": 10}
    net = teacher.network
    x, t = sample_noise(3, range(2), (4, 8, 8)), torch.tensor([0.25, 0.5], dtype=torch.float64)
    labels = torch.tensor([3, 7])
    ts = t.float() * 1000 - 1
    with torch.no_grad():
        out_c = net(x, timestep=ts, class_labels=labels).sample[:, :4]
        out_u = net(x, timestep=ts, class_labels=torch.tensor([10, 10])).sample[:, :4]
        guided = teacher.with_guidance(4.0).predict_eps(x, t, Condition(class_labels=labels))
    assert torch.allclose(guided, out_u + 4.0 * (out_c - out_u), atol=1e-5)


def test_sd3_flow_matching_pipeline(pipes):
    teacher = load_teacher(pipes["sd3"])
    assert teacher.prediction == "flow" and teacher.schedule == LinearSchedule()
    assert teacher.info["shift"] == 3.0 and teacher.time_input.config() == TimeInput("scaled", 1000, 1000.0).config()
    assert teacher.info["conditioning"]["kind"] == "text"
    g = torch.Generator().manual_seed(0)
    cond = Condition(encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
                     pooled_projections=torch.randn(2, 10, generator=g))
    x, t = sample_noise(4, range(2), (4, 8, 8)), torch.tensor([0.2, 0.9], dtype=torch.float64)
    with torch.no_grad():
        raw = teacher.network(x, encoder_hidden_states=cond.encoder_hidden_states,
                              pooled_projections=cond.pooled_projections, timestep=t.float() * 1000).sample
        raw_null = teacher.network(x, encoder_hidden_states=torch.zeros(2, 5, 12),
                                   pooled_projections=torch.zeros(2, 10), timestep=t.float() * 1000).sample
        assert torch.allclose(teacher.velocity(x, t, cond), raw, atol=1e-5)
        guided = teacher.with_guidance(7.5).velocity(x, t, cond)
    assert torch.allclose(guided, raw_null + 7.5 * (raw - raw_null), atol=1e-4)


def test_diffusers_teacher_saves_in_accelkit_format(pipes, tmp_path):
    teacher = load_teacher(pipes["sd"])
    path = save_teacher(teacher, tmp_path / "sd.safetensors")
    loaded = load_teacher(path)
    assert loaded.info["architecture"] == "diffusers.UNet2DConditionModel" and loaded.schedule == teacher.schedule
    cond = Condition(encoder_hidden_states=torch.randn(2, 4, 12))
    x, t = sample_noise(5, range(2), (3, 8, 8)), torch.tensor([0.4, 0.6])
    with torch.no_grad():
        expected = teacher.with_guidance(3.0).velocity(x, t, cond)
        assert torch.equal(loaded.with_guidance(3.0).velocity(x, t, cond), expected)


def test_config_weights_mismatch_and_unknown_architecture(pipes, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pipes["ddpm"], bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [8, 24]}))
    with pytest.raises(AccelkitError, match=r"do not match the config: key '.*' has shape \(.*\), the config expects"):
        load_teacher(bad)
    (bad / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "FancyNet"}))
    with pytest.raises(AccelkitError, match="unknown architecture 'FancyNet'"):
        load_teacher(bad)
    (bad / "unet" / "config.json").write_text(json.dumps({**cfg, "layers_per_block": 2}))
    with pytest.raises(AccelkitError, match="missing key"):
        load_teacher(bad)
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AccelkitError, match="no weights"):
        load_teacher(bad)
    with pytest.raises(AccelkitError, match="not a model .this is a scheduler folder"):
        load_teacher(pipes["ddpm"] / "scheduler")


def test_skipped_initialisation_is_restored_and_loading_overwrites_everything(tmp_path):
    from accelkit.models.loading import weights_to_be_loaded

    original = torch.nn.init.kaiming_uniform_
    with pytest.raises(RuntimeError), weights_to_be_loaded():
        assert torch.nn.init.kaiming_uniform_ is not original
        raise RuntimeError("boom")
    assert torch.nn.init.kaiming_uniform_ is original
    teacher = builtin_teacher("unet")
    loaded = load_teacher(save_teacher(teacher, tmp_path / "t.safetensors"))
    for (k, a), b in zip(teacher.network.state_dict().items(), loaded.network.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
