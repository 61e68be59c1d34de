"""On a CUDA device: the stages give what they give on the CPU (same noise, same samples to float tolerance), the
training loop resumes exactly there, and fp16 / bf16 training runs. Skipped without CUDA (conftest)."""

import numpy as np
import pytest
import torch
from test_training import Crash, assert_same_state, crashing_at, make, seed_globals

from accelkit.evaluation import sample_batched
from accelkit.models.loading import load_teacher
from accelkit.stages.couple import CoupleRecipe, run_couple
from accelkit.stages.reflow import ReflowRecipe, run_reflow
from accelkit.stages.train import TrainRecipe, run_train

pytestmark = pytest.mark.cuda


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.fixture(scope="module")
def moons_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return run_train(TrainRecipe(data="moons", batch_size=256, eval_samples=0, device="cpu",
                                 loop={"steps": 200}), root / "train")


@pytest.mark.parametrize("solver", ["euler", "dpm++2m", "unipc", "ipndm"])
def test_sampling_on_cuda_equals_cpu(moons_teacher, solver):
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    cpu = sample_batched(load_teacher(moons_teacher), noise, solver, 8)
    gpu = sample_batched(load_teacher(moons_teacher, device="cuda"), noise.cuda(), solver, 8)
    assert gpu.device.type == "cuda"
    assert rel(gpu, cpu) < 1e-5


def test_diffusers_unet_teacher_on_cuda_equals_cpu(tmp_path):
    from tiny_models import ddpm_pipeline

    folder = ddpm_pipeline(tmp_path / "ddpm")
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cpu = sample_batched(load_teacher(folder), noise, "dpm++2m", 6)
    gpu = sample_batched(load_teacher(folder, device="cuda"), noise.cuda(), "dpm++2m", 6)
    assert rel(gpu, cpu) < 1e-3  # cuDNN convolutions may use TF32


def test_couple_on_cuda_draws_the_cpu_noise_and_lands_on_the_cpu_samples(moons_teacher, tmp_path):
    from accelkit.couplings import open_couplings

    common = dict(teacher=str(moons_teacher), n=256, nfe=8, solver="dpm++2m", micro_batch=64, shard_size=128)
    a = open_couplings(run_couple(CoupleRecipe(**common, device="cpu"), tmp_path / "cpu"))[0:256]
    b = open_couplings(run_couple(CoupleRecipe(**common, device="cuda"), tmp_path / "cuda"))[0:256]
    assert torch.equal(a["noise"], b["noise"])
    assert rel(b["sample"], a["sample"]) < 1e-5


def test_reflow_on_cuda_tracks_the_cpu_run(moons_teacher, tmp_path):
    couple = run_couple(CoupleRecipe(teacher=str(moons_teacher), n=512, nfe=8, solver="dpm++2m", micro_batch=256),
                        tmp_path / "couple")
    runs = {}
    for device in ("cpu", "cuda"):
        out = run_reflow(ReflowRecipe(couplings=str(couple), batch_size=128, eval_samples=0, device=device,
                                      loop={"steps": 30}), tmp_path / device)
        runs[device] = load_teacher(out)
    for (k, v), (k2, w) in zip(runs["cpu"].network.state_dict().items(),
                               runs["cuda"].network.state_dict().items(), strict=True):
        assert k == k2 and torch.allclose(v.cpu(), w.cpu(), atol=1e-4, rtol=1e-3), k


def test_trainer_resumes_exactly_on_cuda(tmp_path):
    seed_globals()
    full = make(tmp_path / "full", device="cuda")
    full.fit()
    seed_globals()
    with pytest.raises(Crash):  # dies in step 24, after the checkpoint of step 20
        make(tmp_path / "resumed", loss=crashing_at(24), device="cuda").fit()
    torch.manual_seed(999)
    second = make(tmp_path / "resumed", seed=999, device="cuda")
    second.fit()
    assert_same_state(full, second)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda_tracks_fp32(tmp_path, precision):
    seed_globals()
    full = make(tmp_path / "fp32", steps=40, device="cuda")
    full.fit()
    seed_globals()
    mixed = make(tmp_path / precision, steps=40, precision=precision, device="cuda")
    logs = mixed.fit()
    assert np.isfinite(logs["loss"]) and next(mixed.model.parameters()).dtype == torch.float32  # fp32 master weights
    # same data, times and noise: the loss curve follows fp32's to the autocast dtype's precision
    for a, b in zip(full.history, mixed.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.05 * abs(a["loss"]), (a, b)
