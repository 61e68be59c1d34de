"""`accelkit train`: the teacher learns, loads as a teacher, resumes exactly after kill -9, equals itself under DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, kill9_during
from safetensors.torch import load_file

from accelkit.data import load_dataset
from accelkit.metrics import sliced_wasserstein
from accelkit.models.builtin import build_network
from accelkit.solvers import solve

TINY = ["--data", "checkerboard", "--batch-size", "64", "--set", "train.network.hidden=32",
        "--set", "train.network.depth=2", "--set", "train.loop.checkpoint_every=10", "--set", "train.eval_samples=0",
        "--device", "cpu"]


#: Tiny networks gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's spinning threads make
#: them several times slower: the subprocesses run single-threaded (torchrun does the same for its workers).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def teacher_tensors(path):
    return load_file(os.path.join(path, "teacher.safetensors"))


def samples_of(teacher, n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return solve(teacher, teacher.prior_sample(torch.randn(n, 2, generator=g)), solver="euler", nfe=32)


def test_flow_teacher_learns_and_loads(cli, tmp_path):
    from accelkit.models.loading import load_teacher

    out = tmp_path / "moons"
    args = ["train", "--data", "moons", "--steps", "400", "--batch-size", "256", "--lr", "2e-3", "--set",
            "train.network.hidden=128", "--set", "train.network.depth=3", "--set", "train.eval_samples=1000", "-o", out]
    r = cli(*args, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    teacher = load_teacher(out / "teacher.safetensors")
    assert teacher.prediction == "flow" and teacher.schedule.name == "linear" and teacher.sample_shape == (2,)
    data = load_dataset("moons", 1000, seed=11).samples
    trained = sliced_wasserstein(samples_of(teacher), data)
    torch.manual_seed(1)
    untrained_net = build_network(teacher.info["architecture"], teacher.info["network_config"])
    teacher.network.load_state_dict(untrained_net.state_dict())
    untrained = sliced_wasserstein(samples_of(teacher), data)
    assert trained < 0.3 * untrained, (trained, untrained)
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["sliced_wasserstein"]["teacher"] < 0.3 * summary["sliced_wasserstein"]["untrained"]
    assert summary["steps"] == 400 and not (out / "checkpoint").exists()
    # the same command again reuses the complete artifact; another recipe into it is refused
    again = cli(*args, env=ONE_THREAD)
    assert again.returncode == 0 and again.stdout.strip() == str(out) and "reusing" in again.stderr
    other = cli(*args[:-2], "--seed", "5", "-o", out, env=ONE_THREAD)
    assert other.returncode == 2 and "--force" in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_kill9_then_same_command_equals_uninterrupted(cli, tmp_path):
    from conftest import run_cli

    steps = ["--steps", "500"]
    full = run_cli("train", *TINY, *steps, "-o", tmp_path / "full", env=ONE_THREAD)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    delay = kill9_during(["train", *TINY, *steps, "-o", out], out / "checkpoint" / "latest.json")
    step = json.loads((out / "checkpoint" / "latest.json").read_text())["step"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"
    resumed = run_cli("train", *TINY, *steps, "-o", out, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr, f"killed at step >= {step} after {delay:.2f}s but did not resume"
    a, b = teacher_tensors(tmp_path / "full"), teacher_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill -9 at step >= {step} (delay {delay:.2f}s)"


@pytest.mark.slow
def test_ddp_two_processes_equal_one(cli, tmp_path):
    """2 gloo processes at global batch 64 (32 each) against 1 process at 64: equal up to float summation order.
    Stated tolerance: max |difference| of any weight below 1e-4 after 40 AdamW steps (observed about 1e-6)."""
    steps = ["--steps", "40"]
    one = cli("train", *TINY, *steps, "-o", tmp_path / "one", env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "accelkit", "train", *TINY, *steps, "-o", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]  # only rank 0 prints the path
    a, b = teacher_tensors(tmp_path / "one"), teacher_tensors(tmp_path / "two")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4, diff
    summary = json.loads((tmp_path / "two" / "manifest.json").read_text())["summary"]
    assert summary["processes"] == 2


def test_eps_objective_on_digits_loads_as_ddpm_teacher(cli, tmp_path):
    from accelkit.models.loading import load_teacher

    out = tmp_path / "digits"
    r = cli("train", "--data", "digits", "--objective", "eps", "--steps", "3", "--batch-size", "16",
            "--set", "train.network.base=8", "--set", "train.network.mults=[1]", "-o", out)
    assert r.returncode == 0, r.stderr
    teacher = load_teacher(out / "teacher.safetensors")
    assert teacher.prediction == "eps" and teacher.sample_shape == (1, 8, 8)
    assert teacher.schedule.config()["name"] == "vp-discrete" and teacher.time_input.kind == "discrete"
    assert teacher.info["architecture"] == "accelkit.SmallUNet"
    x0 = teacher.predict_x0(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.5]))
    assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()


def test_bad_input_is_one_line_exit_2(cli, tmp_path):
    r = cli("train", "--data", "spirals", "--steps", "2", "-o", tmp_path / "a", env=ONE_THREAD)
    assert r.returncode == 2 and "expected one of checkerboard" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--lr", "-1", "-o", tmp_path / "b", env=ONE_THREAD)
    assert r.returncode == 2 and "train.loop.lr" in r.stderr
    r = cli("train", "--set", "train.loop.optimiser=sgd", "-o", tmp_path / "c", env=ONE_THREAD)
    assert r.returncode == 2 and "optimiser" in r.stderr and "unknown key" in r.stderr
    r = cli("train", "--data", str(tmp_path / "missing.npy"), "-o", tmp_path / "d", env=ONE_THREAD)
    assert r.returncode == 2 and "missing.npy" in r.stderr
    r = cli("train", "--data", "moons", "--dry-run", "-o", tmp_path / "e", env=ONE_THREAD)
    assert r.returncode == 0 and not (tmp_path / "e").exists() and r.stdout == ""
