"""The training loop: exact resume, EMA formula, gradient accumulation, NaN guard, data sampling."""

import json
import random
import sys

import numpy as np
import pytest
import torch

from accelkit.data import BatchSampler, digits, fashion_mnist, load_dataset, tensor_file
from accelkit.errors import AccelkitError, JobInterrupted
from accelkit.models.builtin import MLP
from accelkit.training import EMA, LoopConfig, Trainer, TrainingDiverged


def flow_noise(g, n):
    return {"t": torch.rand(n, generator=g), "eps": torch.randn(n, 2, generator=g)}


def flow_loss(model, b):
    """Flow matching on the linear schedule, with extra draws from every global generator so their states matter."""
    t = b["t"][:, None]
    x = (1 - t) * b["x"] + t * b["eps"]
    w = 1.0 + 0.1 * torch.rand(len(t)).to(t.device) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    err = ((model(x, b["t"] * 1000) - (b["eps"] - b["x"])) ** 2).sum(1)
    return (w * err).mean(), {"err": err.mean()}


def make(tmp_path, steps=40, seed=123, loss=flow_loss, batch=32, device=None, **cfg):
    torch.manual_seed(seed)
    model = MLP(2, 32, 2)
    data = BatchSampler(load_dataset("moons", 2000, 0).samples, batch, seed=7, noise=flow_noise)
    cfg = LoopConfig(steps=steps, lr=3e-3, ema_rates=[0.9, 0.99], warmup_steps=5, checkpoint_every=10,
                     checkpoint_interval_s=0, log_every=5, **cfg)
    return Trainer(model, loss, data, cfg, checkpoint_dir=tmp_path, progress=False, device=device)


def seed_globals():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)


def assert_same_state(a: Trainer, b: Trainer):
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    for r in a.ema.rates:
        for x, y in zip(a.ema.shadow[r], b.ema.shadow[r], strict=True):
            assert torch.equal(x, y)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (i, key)
    assert a.data.state_dict() == b.data.state_dict()
    assert a.step == b.step


class Crash(Exception):
    pass


def crashing_at(call: int):
    """flow_loss that raises Crash at its ``call``-th call (mid-step, after the last checkpoint before it)."""
    calls = {"n": 0}

    def loss(model, b):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash
        return flow_loss(model, b)

    return loss


def test_resume_in_process_equals_uninterrupted(tmp_path):
    seed_globals()
    full = make(tmp_path / "full")
    full.fit()
    crashing_loss = crashing_at(24)  # dies in the middle of step 24, after the checkpoint of step 20
    seed_globals()
    first = make(tmp_path / "resumed", loss=crashing_loss)
    with pytest.raises(Crash):
        first.fit()
    assert first.step == 23
    # a new process: different initial weights and global generator states, everything must come from the checkpoint
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    second = make(tmp_path / "resumed", seed=999)
    logged = []
    second.on_log = lambda step, values: logged.append(step)
    second.fit()
    assert logged[0] == 25  # resumed from step 20, not from scratch
    assert [h["step"] for h in second.history] == list(range(5, 45, 5))  # the history travels in the checkpoint
    assert_same_state(full, second)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    tr = make(tmp_path, steps=10)
    tr.fit()
    latest = json.loads((tmp_path / "latest.json").read_text())
    ckpt = tmp_path / latest["checkpoint"]
    assert latest["step"] == 10
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "rank0.json",
                     "rank0.safetensors", "state.json"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_interrupt_signal_checkpoints_and_resumes(tmp_path):
    import os
    import signal

    seed_globals()
    full = make(tmp_path / "full", steps=20)
    full.fit()

    calls = {"n": 0}

    def signalling_loss(model, b):
        calls["n"] += 1
        if calls["n"] == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return flow_loss(model, b)

    seed_globals()
    tr = make(tmp_path / "int", steps=20, loss=signalling_loss)
    with pytest.raises(JobInterrupted) as info:
        tr.fit()
    assert info.value.signum == signal.SIGTERM and "after step 13" in str(info.value)
    assert json.loads((tmp_path / "int" / "latest.json").read_text())["step"] == 13
    again = make(tmp_path / "int", steps=20, seed=1)
    again.fit()
    assert_same_state(full, again)


def test_nan_loss_stops_with_clear_error_and_usable_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_at_27(model, b):
        calls["n"] += 1
        loss, logs = flow_loss(model, b)
        return (loss * float("nan") if calls["n"] == 27 else loss), logs

    tr = make(tmp_path, loss=nan_at_27)
    with pytest.raises(TrainingDiverged) as info:
        tr.fit()
    msg = str(info.value)
    assert "step 27" in msg and "loss = nan" in msg and "recent losses" in msg and "step-000000020" in msg
    assert isinstance(info.value, AccelkitError)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 20
    again = make(tmp_path, seed=4)
    again.fit()
    assert again.step == 40
    assert all(torch.isfinite(p).all() for p in again.model.parameters())


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    def det_loss(model, b):
        t = b["t"][:, None]
        x = (1 - t) * b["x"] + t * b["eps"]
        return ((model(x, b["t"] * 1000) - (b["eps"] - b["x"])) ** 2).mean()

    runs = []
    for accum in (1, 4):
        tr = make(tmp_path / f"a{accum}", steps=15, loss=det_loss, batch=32, grad_accum=accum)
        tr.fit()
        runs.append(tr)
    diffs = [float((p - q).detach().abs().max()) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters(),
                                                         strict=True)]
    assert max(diffs) < 1e-5
    moved = [float((p - q).detach().abs().max()) for p, q in zip(runs[0].model.parameters(), MLP(2, 32, 2).parameters(),
                                                         strict=True)]
    assert max(moved) > 1e-2  # the runs trained


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_its_formula(warmup):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, [0.5, 0.9], warmup=warmup)
    ref = {r: [p.detach().clone() for p in model.parameters()] for r in ema.rates}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(1, 8):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        ema.update(model)
        for r in ema.rates:
            d = min(r, (1 + k) / (10 + k)) if warmup else r  # k = 1..7: (1+k)/(10+k) < 0.9 until k = 80
            ref[r] = [d * e + (1 - d) * p.detach() for e, p in zip(ref[r], model.parameters(), strict=True)]
    for r in ema.rates:
        for e, want in zip(ema.shadow[r], ref[r], strict=True):
            torch.testing.assert_close(e, want, rtol=1e-6, atol=1e-7)
    w = ema.weights(model, 0.9)
    assert torch.equal(w["weight"], ema.shadow[0.9][0]) and not torch.equal(w["weight"], model.weight)


def test_lr_warmup_and_cosine():
    cfg = LoopConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(60) == pytest.approx(0.5) and cfg.lr_at(110) < 1e-12


def test_loop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="EMA rate 1.5"):
        LoopConfig(ema_rates=[1.5])
    with pytest.raises(ValueError, match="extra"):
        LoopConfig(stepz=3)


def test_radam_and_bf16_autocast_run(tmp_path):
    tr = make(tmp_path, steps=5, optimizer="radam", precision="bf16")
    logs = tr.fit()
    assert np.isfinite(logs["loss"])


def test_fp16_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(AccelkitError, match="fp16 needs a CUDA"):
        make(tmp_path, precision="fp16")


def test_lora_without_peft_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(AccelkitError, match=r"pip install 'accelkit\[lora\]'"):
        make(tmp_path, lora={"target_modules": ["inp"]})


def test_lora_trains_only_adapters(tmp_path):
    pytest.importorskip("peft")
    tr = make(tmp_path, steps=5, lora={"rank": 2, "target_modules": ["inp", "out.1"]})
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in tr.model.named_parameters():
        # the base weights stay frozen; both adapter matrices move (B leaves zero at step 1, then A gets gradients)
        assert torch.equal(p, before[n]) == (n not in trainable), n


# ------------------------------------------------------------------------------------------------------------- data


def test_sampler_resumes_and_shards_exactly():
    data = torch.arange(50.0)[:, None]
    a = BatchSampler(data, 8, seed=3, noise=lambda g, n: {"eps": torch.randn(n, generator=g)})
    batches = [next(a) for _ in range(15)]  # crosses two epoch boundaries
    b = BatchSampler(data, 8, seed=3, noise=lambda g, n: {"eps": torch.randn(n, generator=g)})
    for _ in range(6):
        next(b)
    c = BatchSampler(data, 8, seed=3, noise=lambda g, n: {"eps": torch.randn(n, generator=g)})
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for want in batches[6:]:
        got = next(c)
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["eps"], want["eps"])
    # the first epoch (48 of 50 indices in 6 batches, then the rest) visits every sample once
    first = torch.cat([bt["x"] for bt in batches[:7]])[:50, 0]
    assert sorted(first.tolist()) == list(range(50))
    # two ranks' slices put together are the one-process batch
    r0 = BatchSampler(data, 8, seed=3, rank=0, world=2, noise=lambda g, n: {"eps": torch.randn(n, generator=g)})
    r1 = BatchSampler(data, 8, seed=3, rank=1, world=2, noise=lambda g, n: {"eps": torch.randn(n, generator=g)})
    for want in batches[:4]:
        p0, p1 = next(r0), next(r1)
        assert torch.equal(torch.cat([p0["x"], p1["x"]]), want["x"])
        assert torch.equal(torch.cat([p0["eps"], p1["eps"]]), want["eps"])
    with pytest.raises(AccelkitError, match="multiple of 3"):
        BatchSampler(data, 8, world=3)


@pytest.mark.parametrize("name", ["checkerboard", "moons", "rings", "gaussian-mixture"])
def test_toy_sets_are_seeded_2d(name):
    a, b = load_dataset(name, 500, seed=1), load_dataset(name, 500, seed=1)
    assert a.samples.shape == (500, 2) and torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, load_dataset(name, 500, seed=2).samples)
    assert 0.3 < float(a.samples.std()) < 2.0


def test_checkerboard_is_on_dark_squares():
    x = load_dataset("checkerboard", 2000).samples
    i, j = torch.floor(x[:, 0] + 2).long(), torch.floor(x[:, 1] + 2).long()
    assert bool(((i + j) % 2 == 0).all()) and float(x.abs().max()) <= 2.0


def test_digits_scaled_to_unit_interval():
    x = digits()
    assert x.shape == (1797, 1, 8, 8) and float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_fashion_mnist(tmp_path):
    import os

    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.skip("dataset-fashion-mnist not installed")
    x = fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    with pytest.raises(AccelkitError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)


def test_tensor_files(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(10, 3)
    save_file({"data": x, "labels": torch.zeros(10)}, tmp_path / "a.safetensors")
    np.save(tmp_path / "b.npy", x.numpy())
    np.save(tmp_path / "c.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert torch.equal(tensor_file(tmp_path / "a.safetensors"), x)
    assert torch.equal(load_dataset(str(tmp_path / "b.npy")).samples, x)
    with pytest.raises(AccelkitError, match="c.npy"):
        tensor_file(tmp_path / "c.npy")
    with pytest.raises(AccelkitError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npy"))
    with pytest.raises(AccelkitError, match="expected one of checkerboard"):
        load_dataset("spirals")
