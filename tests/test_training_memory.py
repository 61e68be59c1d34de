"""Training big students (issue 16, item 6): gradient checkpointing gives the plain network's loss and gradients
while recomputing each block; the training loop with ``loop.gradient_checkpointing`` follows the plain run."""

import copy

import pytest
import torch
from test_training import make, seed_globals

from accelkit.activation_checkpointing import enable_gradient_checkpointing
from accelkit.errors import AccelkitError
from accelkit.models.builtin import MLP, SmallUNet


def counting(module):
    """Counts the calls of ``module`` (a pre-hook: the recomputation may stop early, once it has what it needs)."""
    calls = {"n": 0}
    module.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def loss_and_grads(net, inputs):
    net.zero_grad(set_to_none=True)
    out = net(*inputs)
    out = out.sample if hasattr(out, "sample") else out
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert abs(float(la - lb)) <= tol * abs(float(la)) and ga.keys() == gb.keys() and ga
    for k in ga:
        scale = ga[k].abs().max().clamp(min=1e-12)
        assert (ga[k] - gb[k]).abs().max() <= tol * scale, k


def test_diffusers_unet_with_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from tiny_models import tiny_unet2d_condition

    plain = tiny_unet2d_condition()
    ckpt = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(ckpt) == 1 and ckpt.is_gradient_checkpointing
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 12, generator=g))
    resnet = lambda net: net.down_blocks[0].resnets[0]  # noqa: E731
    calls_plain, calls_ckpt = counting(resnet(plain)), counting(resnet(ckpt))
    ckpt.train(), plain.train()
    assert_same(loss_and_grads(plain, inputs), loss_and_grads(ckpt, inputs))
    assert calls_plain["n"] == 1 and calls_ckpt["n"] == 2  # the block ran again in the backward pass
    with torch.no_grad():  # evaluation runs the plain blocks
        ckpt(*inputs)
    assert calls_ckpt["n"] == 3


@pytest.mark.parametrize("net", [MLP(dim=2, hidden=16, depth=3), SmallUNet(channels=1, base=8, mults=(1, 2))],
                         ids=["mlp", "small-unet"])
def test_builtin_networks_with_gradient_checkpointing_give_the_same_loss_and_gradients(net):
    torch.manual_seed(0)
    ckpt = copy.deepcopy(net)
    n_blocks = enable_gradient_checkpointing(ckpt)
    assert n_blocks == (3 if isinstance(net, MLP) else 3 + 2)  # MLP blocks; down, mid and up ResBlocks
    x = torch.randn(4, 2) if isinstance(net, MLP) else torch.randn(4, 1, 8, 8)
    inputs = (x, torch.rand(4) * 1000)
    inner = (lambda m: m.blocks[0][1]) if isinstance(net, MLP) else (lambda m: m.mid.conv1)
    calls = counting(inner(ckpt))
    assert_same(loss_and_grads(net, inputs), loss_and_grads(ckpt, inputs))
    assert calls["n"] == 2
    assert list(ckpt.state_dict()) == list(net.state_dict())  # same keys: checkpoints and exports are unchanged
    twin, plain_twin = copy.deepcopy(ckpt), copy.deepcopy(net)  # a copy (an EMA network) computes with its weights
    with torch.no_grad():
        for p, q in zip(twin.parameters(), plain_twin.parameters(), strict=True):
            p.mul_(0.5), q.mul_(0.5)
    assert torch.allclose(twin(*inputs), plain_twin(*inputs), atol=1e-6)


def test_training_loop_with_gradient_checkpointing_follows_the_plain_run(tmp_path):
    seed_globals()
    plain = make(tmp_path / "plain", steps=10)
    plain.fit()
    seed_globals()
    ckpt = make(tmp_path / "ckpt", steps=10, gradient_checkpointing=True)
    assert all(getattr(b, "_accelkit_checkpointed", False) for b in ckpt.model.blocks)
    ckpt.fit()
    for a, b in zip(plain.history, ckpt.history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
    for (k, v), (_, w) in zip(plain.model.state_dict().items(), ckpt.model.state_dict().items(), strict=True):
        assert torch.allclose(v, w, atol=1e-6, rtol=1e-5), k


def test_gradient_checkpointing_of_a_model_without_networks_is_a_one_line_error():
    with pytest.raises(AccelkitError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path):
    """FSDP2 over 2 gloo processes (global batch 32, 16 each), stopped at step 20 and resumed to 40 on the sharded
    model, against one plain process for 40 steps: every process held half of each parameter's rows, and the final
    weights, the EMA and the loss curve agree to float summation order (stated: 1e-5; observed about 1e-7)."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from fsdp_worker import trainer
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(REPO, "tests", "fsdp_worker.py"), str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    got = load_file(tmp_path / "two" / "result.safetensors")
    assert got["shard_rows"].tolist() == [16, 32]
    one = trainer(tmp_path / "one", 40)
    one.fit()
    assert torch.allclose(got["loss"], torch.tensor([h["loss"] for h in one.history]), rtol=1e-5)
    for k, v in one.model.state_dict().items():
        assert (got[f"model.{k}"] - v).abs().max() < 1e-5, k
    for k, v in one.ema_weights(0.9).items():
        assert (got[f"ema.{k}"] - v).abs().max() < 1e-5, k
