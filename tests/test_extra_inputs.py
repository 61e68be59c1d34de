"""The shared extra-input embedding (accelkit/extra_inputs.py): exact start, inputs that matter once trained, saving,
guidance as an input, every supported architecture, LoRA, deepcopy, JVP, and one-line errors."""

import copy

import pytest
import torch

from accelkit.errors import AccelkitError
from accelkit.extra_inputs import ExtraInput, attach_extra_inputs, extra_inputs_of, with_extra_inputs
from accelkit.models.builtin import MLP, SmallUNet, builtin_call
from accelkit.schedules import LinearSchedule
from accelkit.teacher import Condition, NetworkTeacher

INPUTS = [ExtraInput("step_size", default=1 / 128), ExtraInput("code", kind="vector", dim=4)]


def mlp_teacher(num_classes=0):
    torch.manual_seed(0)
    return NetworkTeacher(MLP(dim=2, hidden=16, depth=2, num_classes=num_classes), builtin_call, "flow",
                          LinearSchedule(), (2,))


def perturb(network):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in network.accelkit_extra.parameters():
            p.add_(0.3 * torch.randn_like(p))


def code_cond(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return with_extra_inputs(None, code=torch.randint(0, 2, (b, 4), generator=g).float(),
                             step_size=torch.rand(b, generator=g))


def test_zero_init_student_equals_teacher_bit_for_bit_then_inputs_matter():
    teacher = mlp_teacher()
    student = attach_extra_inputs(copy.deepcopy(teacher), INPUTS)
    x, t = torch.randn(6, 2), torch.rand(6)
    ref = teacher.network_output(x, t)
    assert torch.equal(student.network_output(x, t, code_cond(6, 0)), ref)
    assert torch.equal(student.network_output(x, t, code_cond(6, 1)), ref)
    perturb(student.network)
    a, b = student.network_output(x, t, code_cond(6, 0)), student.network_output(x, t, code_cond(6, 1))
    assert (a - b).abs().max() > 1e-3 and (a - ref).abs().max() > 1e-3
    assert [s.name for s in extra_inputs_of(student.network)] == ["step_size", "code"]


def test_missing_required_input_is_one_line_error_and_default_fills_scalar():
    student = attach_extra_inputs(mlp_teacher(), INPUTS)
    perturb(student.network)
    x, t = torch.randn(3, 2), torch.rand(3)
    with pytest.raises(AccelkitError, match="'code'"):
        student.network_output(x, t)
    code = torch.ones(3, 4)
    implicit = student.network_output(x, t, with_extra_inputs(None, code=code))
    explicit = student.network_output(x, t, with_extra_inputs(None, code=code, step_size=torch.full((3,), 1 / 128)))
    assert torch.equal(implicit, explicit)


def test_save_and_load_round_trip(tmp_path):
    from accelkit.models.loading import load_teacher, save_teacher

    student = attach_extra_inputs(mlp_teacher(), INPUTS)
    perturb(student.network)
    save_teacher(student, tmp_path / "s.safetensors")
    loaded = load_teacher(tmp_path / "s.safetensors")
    assert extra_inputs_of(loaded.network) == tuple(INPUTS)
    x, t, c = torch.randn(5, 2), torch.rand(5), code_cond(5, 2)
    assert torch.equal(loaded.network_output(x, t, c), student.network_output(x, t, c))


def test_guidance_input_replaces_cfg_and_takes_the_teachers_scale():
    student = attach_extra_inputs(mlp_teacher(num_classes=3), [ExtraInput("guidance", scale=100.0, default=1.0)])
    perturb(student.network)
    calls = []
    student.network.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    x, t = torch.randn(4, 2), torch.rand(4)
    cond = Condition(class_labels=torch.tensor([0, 1, 2, 0]))
    student.guidance_scale = 3.0
    out = student.network_output(x, t, cond)
    assert calls == [4]  # one forward pass of the batch: no classifier-free guidance pair
    explicit = student.network_output(x, t, with_extra_inputs(cond, guidance=3.0))
    assert torch.equal(out, explicit)
    assert (student.with_guidance(5.0).network_output(x, t, cond) - out).abs().max() > 1e-4


def test_cfg_teacher_with_extra_input_feeds_the_null_branch_too():
    student = attach_extra_inputs(mlp_teacher(num_classes=3), [ExtraInput("code", kind="vector", dim=4)])
    student.null_condition = Condition(class_labels=torch.tensor([3]))
    perturb(student.network)
    x, t = torch.randn(4, 2), torch.rand(4)
    code = torch.ones(4, 4)
    cond = Condition(class_labels=torch.tensor([0, 1, 2, 0]), extra={"code": code})
    out = student.with_guidance(2.0).network_output(x, t, cond)
    c = student.network_output(x, t, cond)
    u = student.network_output(x, t, Condition(class_labels=torch.full((4,), 3), extra={"code": code}))
    torch.testing.assert_close(out, u + 2.0 * (c - u), rtol=1e-5, atol=1e-6)


def test_deepcopy_hooks_follow_the_copy():
    student = attach_extra_inputs(mlp_teacher(), INPUTS)
    clone = copy.deepcopy(student)
    perturb(clone.network)
    x, t, c = torch.randn(3, 2), torch.rand(3), code_cond(3)
    base = mlp_teacher().network_output(x, t)
    assert torch.equal(student.network_output(x, t, c), base)  # the original's embedding is still zero
    assert (clone.network_output(x, t, c) - base).abs().max() > 1e-3


def test_lora_keeps_the_embedding_trainable():
    pytest.importorskip("peft")
    from accelkit.training import LoraSettings, apply_lora

    student = attach_extra_inputs(mlp_teacher(), INPUTS)
    net = apply_lora(student.network, LoraSettings(rank=2, target_modules=["inp"]))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert any(n.startswith("accelkit_extra.") for n in trainable)
    assert all(n.startswith("accelkit_extra.") or "lora_" in n for n in trainable)


def test_jvp_through_a_scalar_input():
    """MeanFlow differentiates through its second time r: forward-mode JVP along r equals a central difference."""
    student = attach_extra_inputs(mlp_teacher(), [ExtraInput("r", scale=10.0)])
    perturb(student.network)
    x, t, r0 = torch.randn(3, 2), torch.rand(3), torch.rand(3)

    def f(r):
        return student.network_output(x, t, with_extra_inputs(None, r=r))

    _, tangent = torch.func.jvp(f, (r0,), (torch.ones_like(r0),))
    h = 1e-2
    fd = (f(r0 + h) - f(r0 - h)) / (2 * h)
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, fd, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("make", ["unet2d", "unet2d_condition", "dit", "sd3", "small_unet"])
def test_every_supported_architecture_starts_exact(make):
    import tiny_models

    from accelkit.models.diffusers_models import diffusers_adapter

    if make == "small_unet":
        torch.manual_seed(0)
        net, call, shape, cond = SmallUNet(channels=1, base=16, mults=(1,)), builtin_call, (1, 8, 8), None
    else:
        net = {"unet2d": tiny_models.tiny_unet2d, "unet2d_condition": tiny_models.tiny_unet2d_condition,
               "dit": tiny_models.tiny_dit, "sd3": tiny_models.tiny_sd3}[make]()
        call = diffusers_adapter(type(net).__name__).call
        shape = (net.config.in_channels, 8, 8)
        cond = None
        if make == "sd3":
            cond = Condition(encoder_hidden_states=torch.randn(2, 3, 12), pooled_projections=torch.randn(2, 10))
    teacher = NetworkTeacher(net.eval(), call, "eps", LinearSchedule(), shape)
    x, t = torch.randn(2, *shape), torch.full((2,), 0.5)
    with torch.no_grad():
        ref = teacher.network_output(x, t, cond)
        student = attach_extra_inputs(teacher, [ExtraInput("step_size")])
        c = with_extra_inputs(cond, step_size=torch.tensor([0.25, 0.5]))
        assert torch.equal(student.network_output(x, t, c), ref)
        perturb(student.network)
        assert (student.network_output(x, t, c) - ref).abs().max() > 1e-3 * ref.abs().max()


def test_unknown_architecture_is_refused():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t, labels=None):
            return self.lin(x)

    teacher = NetworkTeacher(Bare(), builtin_call, "flow", LinearSchedule(), (2,))
    with pytest.raises(AccelkitError, match="no time embedding"):
        attach_extra_inputs(teacher, [ExtraInput("code", kind="vector", dim=3)])


def test_a_teacher_built_around_a_network_with_extra_inputs_feeds_them():
    """stages/student.py rebuilds the trained student with the reference's (plain) call: it still feeds the inputs."""
    student = attach_extra_inputs(mlp_teacher(), INPUTS)
    perturb(student.network)
    rebuilt = NetworkTeacher(student.network, builtin_call, "flow", LinearSchedule(), (2,))
    x, t, c = torch.randn(3, 2), torch.rand(3), code_cond(3)
    assert torch.equal(rebuilt.network_output(x, t, c), student.network_output(x, t, c))


def test_the_embedding_start_is_seeded_not_drawn_from_the_global_rng():
    a = attach_extra_inputs(mlp_teacher(), INPUTS, seed=3).network.accelkit_extra.state_dict()
    torch.manual_seed(12345)
    b = attach_extra_inputs(mlp_teacher(), INPUTS, seed=3).network.accelkit_extra.state_dict()
    c = attach_extra_inputs(mlp_teacher(), INPUTS, seed=4).network.accelkit_extra.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
