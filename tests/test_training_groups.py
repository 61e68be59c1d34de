"""Several networks in one Trainer: per-group schedules, learning rates, clipping and EMA; exact resume; DDP."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from accelkit.data import BatchSampler, load_dataset
from accelkit.errors import AccelkitError
from accelkit.training import GroupSettings, LoopConfig, ParamGroup, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def noise(g, n):
    return {"z": torch.randn(n, 2, generator=g)}


def nets(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "gen": nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 2)),
        "critic": nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1)),
    })


def critic_loss(model, b, jitter=True):
    """Least-squares critic: 1 on data, 0 on the generator's detached samples (plus a global-RNG draw)."""
    fake = model["gen"](b["z"]).detach()
    w = 1.0 + (0.1 * torch.rand(()) if jitter else 0.0)
    return w * ((model["critic"](b["x"]) - 1) ** 2 + model["critic"](fake) ** 2).mean()


def gen_loss(model, b, jitter=True):
    x = model["gen"](b["z"] + (0.01 * torch.randn_like(b["z"]) if jitter else 0.0))
    out = ((model["critic"](x) - 1) ** 2).mean()
    return out, {"spread": x.std()}


SETTINGS = {"critic": GroupSettings(lr=5e-3, grad_clip=0.5),
            "gen": GroupSettings(lr=2e-3, every=3, ema=True, grad_clip="off")}


def make(tmp_path, steps=30, seed=0, losses=None, rank=0, world=1, batch=32, **cfg):
    model = nets(seed)
    losses = losses or {"critic": critic_loss, "gen": gen_loss}
    data = BatchSampler(load_dataset("moons", 1000, 0).samples, batch, seed=7, noise=noise, rank=rank, world=world)
    cfg = LoopConfig(**{"steps": steps, "lr": 1e-3, "ema_rates": [0.9], "warmup_steps": 5, "checkpoint_every": 10,
                        "checkpoint_interval_s": 0, "log_every": 1, **cfg})
    groups = [ParamGroup(name, model[name], losses[name], SETTINGS[name]) for name in ("critic", "gen")]
    return Trainer(model, None, data, cfg, checkpoint_dir=tmp_path, progress=False, groups=groups)


def assert_same(a: Trainer, b: Trainer):
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    for name in a.optimizers:
        sa, sb = a.optimizers[name].state_dict()["state"], b.optimizers[name].state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for key in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (name, i, key)
    for x, y in zip(a.emas["gen"].shadow[0.9], b.emas["gen"].shadow[0.9], strict=True):
        assert torch.equal(x, y)
    assert a.updates == b.updates and a.step == b.step and a.data.state_dict() == b.data.state_dict()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    torch.manual_seed(3)
    tr = make(tmp_path_factory.mktemp("full"))
    tr.fit()
    return tr


def test_update_counts_lr_and_history(full):
    # critic every step, generator at steps 0, 3, ..., 27
    assert full.updates == {"critic": 30, "gen": 10}
    gen_steps = [h["step"] for h in full.history if "gen/loss" in h]
    assert gen_steps == list(range(1, 30, 3))  # logged after step s (0-based) as step s + 1
    cfg = full.config
    for h in full.history:
        s = h["step"] - 1
        assert h["critic/lr"] == pytest.approx(5e-3 * cfg.lr_at(s) / cfg.lr)
        if "gen/lr" in h:
            assert h["gen/lr"] == pytest.approx(2e-3 * cfg.lr_at(s) / cfg.lr)
        assert "critic/grad_norm" in h and "gen/grad_norm" not in h  # per-group clipping: gen's is off
    assert all(np.isfinite(h["gen/spread"]) for h in full.history if "gen/spread" in h)
    assert [p.requires_grad for p in full.model.parameters()] == [True] * len(list(full.model.parameters()))


def test_only_the_due_groups_move(tmp_path):
    tr = make(tmp_path)
    for step in range(6):
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        tr.train_step(next(tr.data))
        moved = {name for name in ("gen", "critic")
                 if any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items()
                        if k.startswith(name + "."))}
        assert moved == ({"critic", "gen"} if step % 3 == 0 else {"critic"}), step
        assert all(p.grad is None for p in tr.model.parameters())  # nothing left over for the next group


def test_kill_between_two_groups_updates_resumes_exactly(full, tmp_path):
    """Crash inside the generator's update at step 24, after the critic's update of that step; resume from the
    checkpoint of step 20 in a 'new process' (other seeds): every network, optimizer and EMA equal bit for bit."""
    calls = {"n": 0}

    def crashing_gen(model, b):
        calls["n"] += 1
        if calls["n"] == 9:  # the generator's 9th update is at step 24
            raise RuntimeError("crash")
        return gen_loss(model, b)

    torch.manual_seed(3)
    first = make(tmp_path, losses={"critic": critic_loss, "gen": crashing_gen})
    with pytest.raises(RuntimeError, match="crash"):
        first.fit()
    assert first.step == 24 and first.updates == {"critic": 25, "gen": 8}
    torch.manual_seed(99)
    second = make(tmp_path, seed=5)
    second.fit()
    assert second.history[0]["step"] == 1 and len(second.history) == 30  # history traveled with the checkpoint
    assert_same(full, second)
    ckpt = sorted(p.name for p in (tmp_path / "step-000000030").iterdir())
    assert ckpt == ["ema-gen.safetensors", "model.safetensors", "optimizer-critic.safetensors",
                    "optimizer-gen.safetensors", "rank0.json", "rank0.safetensors", "state.json"]


def test_ema_of_the_chosen_group(full):
    avg = full.ema_weights(group="gen")
    assert set(avg) == set(full.model["gen"].state_dict())
    assert not torch.equal(avg["0.weight"], full.model["gen"][0].weight)
    assert torch.equal(full.ema_weights(group="critic")["0.weight"], full.model["critic"][0].weight)  # no EMA: raw
    with pytest.raises(AccelkitError, match="no parameter group 'disc'"):
        full.ema_weights(group="disc")


def test_bad_groups_are_clear_errors(tmp_path):
    model = nets()
    cfg = LoopConfig(steps=2)
    data = iter([])
    with pytest.raises(AccelkitError, match="share parameters"):
        Trainer(model, None, data, cfg, progress=False,
                groups=[ParamGroup("a", model, critic_loss), ParamGroup("b", model["gen"], gen_loss)])
    with pytest.raises(AccelkitError, match="no group trains"):
        Trainer(model, None, data, cfg, progress=False, groups=[ParamGroup("a", model["gen"], gen_loss)])
    with pytest.raises(AccelkitError, match="update nothing at step 1"):
        Trainer(model, None, data, cfg, progress=False,
                groups=[ParamGroup("gen", model["gen"], gen_loss, GroupSettings(every=2)),
                        ParamGroup("critic", model["critic"], critic_loss, GroupSettings(every=4, offset=2))])
    with pytest.raises(AccelkitError, match="loss_fn=None"):
        Trainer(model, critic_loss, data, cfg, progress=False, groups=[ParamGroup("a", model, critic_loss)])
    with pytest.raises(ValueError, match="offset 2: expected 0 <= offset < every = 2"):
        GroupSettings(every=2, offset=2)
    tr = make(tmp_path, steps=10)
    tr.fit()
    single = Trainer(nets()["gen"], lambda m, b: m(b["z"]).pow(2).mean(), tr.data, LoopConfig(steps=12),
                     checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(AccelkitError, match="weights do not fit|parameter groups"):
        single.fit()


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from accelkit.jobs import dist_env
from test_training_groups import make, critic_loss, gen_loss
rank, world = dist_env()[:2]
tr = make(None, steps=9, rank=rank, world=world,
          losses={{"critic": lambda m, b: critic_loss(m, b, False), "gen": lambda m, b: gen_loss(m, b, False)}})
tr.fit()
if rank == 0:
    from safetensors.torch import save_file
    save_file({{k: v.contiguous() for k, v in tr.model.state_dict().items()}}, sys.argv[1])
"""


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_groups.py"
    script.write_text(DDP_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two.safetensors")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    start = nets(0).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # the runs trained
