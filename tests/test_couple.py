"""couple: per-sample determinism, kill -9 resume, hash-checked shards and --repair, locks, torchrun, pipes."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

from accelkit.artifacts import read_manifest
from accelkit.couplings import Couplings
from accelkit.errors import AccelkitError
from accelkit.models.builtin import MLP, SmallUNet, builtin_call
from accelkit.models.loading import load_teacher, save_teacher
from accelkit.noise import sample_noise
from accelkit.schedules import LinearSchedule
from accelkit.solvers import solve
from accelkit.stages.couple import CoupleRecipe, run_couple


def mlp_teacher(path: Path, hidden: int = 32) -> Path:
    torch.manual_seed(0)
    from accelkit.teacher import NetworkTeacher

    net = MLP(dim=2, hidden=hidden, depth=2)
    save_teacher(NetworkTeacher(net, builtin_call, "flow", LinearSchedule(), (2,)), path)
    return path


def unet_teacher(path: Path, num_classes: int = 0) -> Path:
    torch.manual_seed(0)
    from accelkit.teacher import NetworkTeacher

    net = SmallUNet(channels=1, base=8, mults=(1, 2), num_classes=num_classes)
    save_teacher(NetworkTeacher(net, builtin_call, "flow", LinearSchedule(), (1, 8, 8)), path)
    return path


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return mlp_teacher(tmp_path_factory.mktemp("teacher") / "mlp.safetensors")


def tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    m = read_manifest(path)
    return {name: load_file(str(path / name)) for name in sorted(m["files"])}


def assert_same_artifact(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["status"] == mb["status"] == "complete"
    assert ma["identity"] == mb["identity"]
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for k in ta[name]:
            assert torch.equal(ta[name][k], tb[name][k]), (name, k)
    assert {k: v["sha256"] for k, v in ma["files"].items()} == {k: v["sha256"] for k, v in mb["files"].items()}


def test_pairs_are_the_teacher_ode_endpoints_and_independent_of_batch_size(tmp_path, teacher_file):
    base = dict(teacher=str(teacher_file), solver="euler", n=70, nfe=6, micro_batch=8, shard_size=32, save_trajectory=2)
    a = run_couple(CoupleRecipe(**base, batch_size=8), tmp_path / "a")
    b = run_couple(CoupleRecipe(**base, batch_size=40, checkpoint_every=0), tmp_path / "b")
    assert_same_artifact(a, b)
    c = Couplings(a)
    assert len(c) == 70 and c.sample_shape == (2,)
    rows = c[torch.arange(70)]
    assert torch.equal(rows["index"], torch.arange(70))
    assert torch.equal(rows["noise"], sample_noise(0, range(70), (2,)))  # sample i's noise is (seed, i)'s
    teacher = load_teacher(teacher_file)
    x0 = solve(teacher, teacher.prior_sample(rows["noise"]), solver="euler", nfe=6)
    torch.testing.assert_close(rows["sample"], x0, rtol=1e-5, atol=1e-6)
    # The saved intermediate states lie on the same Euler path: t = 4/6 and 2/6 of the uniform grid.
    assert rows["trajectory"].shape == (70, 2, 2)
    torch.testing.assert_close(c.trajectory_times, torch.tensor([4 / 6, 2 / 6], dtype=torch.float64))
    x = teacher.prior_sample(rows["noise"])
    ts = torch.linspace(1, 0, 7, dtype=torch.float64)
    states = {}
    for i in range(6):
        x = x + (ts[i + 1] - ts[i]).float() * teacher.velocity(x, ts[i].expand(70))
        states[round(float(ts[i + 1]), 6)] = x
    torch.testing.assert_close(rows["trajectory"][:, 0], states[round(4 / 6, 6)], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows["trajectory"][:, 1], states[round(2 / 6, 6)], rtol=1e-5, atol=1e-6)
    # Reused, not recomputed, when asked again.
    mtime = os.stat(a / "manifest.json").st_mtime_ns
    assert run_couple(CoupleRecipe(**base, batch_size=16), tmp_path / "a") == a
    assert os.stat(a / "manifest.json").st_mtime_ns == mtime


def test_reader_random_access_and_resumable_shuffled_batches(tmp_path, teacher_file):
    path = run_couple(CoupleRecipe(teacher=str(teacher_file), n=50, nfe=2, micro_batch=5, shard_size=20),
                      tmp_path / "c")
    c = Couplings(path)
    whole = c[:]
    pick = torch.tensor([49, 3, 21, 3, 40])
    got = c[pick]
    for k in ("index", "noise", "sample"):
        assert torch.equal(got[k], whole[k][pick])
    assert torch.equal(c[7]["noise"], whole["noise"][7])
    s = c.sampler(batch_size=16, seed=1)
    first = [next(s)["index"] for _ in range(3)]
    epoch0 = torch.cat(first + [next(s)["index"]])[:50]
    assert sorted(epoch0.tolist()) == list(range(50))  # each epoch visits every row once
    s2 = c.sampler(batch_size=16, seed=1)
    for _ in range(2):
        next(s2)
    state = s2.state_dict()
    s3 = c.sampler(batch_size=16, seed=1)
    s3.load_state_dict(state)
    assert torch.equal(next(s3)["index"], first[2])
    ranks = [c.sampler(16, seed=1, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([next(r)["index"] for r in ranks]), first[0])


def test_conditions_and_guidance(tmp_path):
    teacher = unet_teacher(tmp_path / "unet.safetensors", num_classes=3)
    cond = tmp_path / "labels.json"
    cond.write_text(json.dumps([0, 2, 1]))
    recipe = CoupleRecipe(teacher=str(teacher), n=8, nfe=2, micro_batch=4, shard_size=4, conditions=str(cond),
                          guidance=2.0)
    path = run_couple(recipe, tmp_path / "g")
    rows = Couplings(path)[:]
    assert rows["cond.class_labels"].tolist() == [0, 2, 1, 0, 2, 1, 0, 2]
    t = load_teacher(teacher, guidance=2.0)
    from accelkit.teacher import Condition

    x0 = solve(t, t.prior_sample(rows["noise"]), solver="dpm++2m", nfe=2,
               cond=Condition(class_labels=rows["cond.class_labels"]))
    torch.testing.assert_close(rows["sample"], x0, rtol=1e-4, atol=1e-5)
    assert read_manifest(path)["summary"]["forward_passes_per_sample"] == 4


COUPLE_SLOW = ["-n", "128", "--nfe", "150", "--micro-batch", "8", "--shard-size", "64", "--checkpoint-every", "0"]


def couple_cmd(teacher, out, *extra):
    return [sys.executable, "-m", "accelkit", "couple", str(teacher), "-o", str(out), *COUPLE_SLOW, *extra]


def env():
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1",
            "ACCELKIT_NO_PROGRESS": "1"}


def wait_for(pred, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_kill_9_then_resume_with_another_batch_size_is_bit_identical(tmp_path, teacher_file):
    ref = run_cli("couple", teacher_file, "-o", tmp_path / "ref", *COUPLE_SLOW, "--batch-size", "8")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    rng = random.Random(os.getpid())
    proc = subprocess.Popen(couple_cmd(teacher_file, out, "--batch-size", "16"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait until real work is under way (a checkpoint or a shard on disk), then kill at a random moment.
    assert wait_for(lambda: any(p.name.startswith("shard-") for p in out.glob("*")) or proc.poll() is not None)
    time.sleep(rng.uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(out)["status"] != "complete", "the job finished before the kill; make it slower"
    resumed = run_cli("couple", teacher_file, "-o", out, *COUPLE_SLOW, "--batch-size", "40")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out)
    assert_same_artifact(ref.stdout.strip() and Path(ref.stdout.strip()), out)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_nonzero_then_resumes(tmp_path, teacher_file):
    out = tmp_path / "term"
    proc = subprocess.Popen(couple_cmd(teacher_file, out, "--batch-size", "8"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: any(p.name.startswith("shard-") for p in out.glob("*")) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted: couple stopped by SIGTERM" in stderr and "run the same command again" in stderr
    assert stdout == ""
    again = run_cli("couple", teacher_file, "-o", out, *COUPLE_SLOW)
    assert again.returncode == 0, again.stderr
    ref = run_couple(CoupleRecipe(teacher=str(teacher_file), n=128, nfe=150, micro_batch=8, shard_size=64),
                     tmp_path / "ref")
    assert_same_artifact(ref, out)


def test_second_job_into_same_directory_is_refused_at_once(tmp_path, teacher_file):
    out = tmp_path / "busy"
    long_job = [sys.executable, "-m", "accelkit", "couple", str(teacher_file), "-o", str(out), "-n", "100000",
                "--nfe", "150", "--micro-batch", "8", "--shard-size", "64"]
    proc = subprocess.Popen(long_job, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: (out / "manifest.json").exists())
        second = subprocess.run(long_job, env=env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert "is in use by another job" in second.stderr
        assert proc.poll() is None, "the second job waited for the first instead of failing at once"
    finally:
        proc.kill()
        proc.wait()


def test_flipped_bytes_detected_and_repair_regenerates_that_shard_only(tmp_path, teacher_file, cli):
    args = ["-n", "40", "--nfe", "3", "--micro-batch", "4", "--shard-size", "12"]
    made = cli("couple", teacher_file, "-o", tmp_path / "r", *args)
    assert made.returncode == 0, made.stderr
    path = Path(made.stdout.strip())
    before = read_manifest(path)["files"]
    victim = path / "shard-00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0x40
    victim.write_bytes(bytes(data))
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.glob("shard-*")}
    bad = cli("verify", path)
    assert bad.returncode == 2 and "shard-00002.safetensors" in bad.stderr and "damaged" in bad.stderr
    assert bad.stdout == ""
    with pytest.raises(AccelkitError, match="shard-00002.safetensors.*damaged"):
        Couplings(path)[torch.arange(40)]
    # Without --repair the complete artifact is reused as is; --repair rewrites the damaged shard only.
    fixed = cli("couple", teacher_file, "-o", path, *args, "--repair")
    assert fixed.returncode == 0, fixed.stderr
    assert "1 damaged shard(s)" in fixed.stderr
    assert read_manifest(path)["files"] == before  # regenerated bits equal the original ones
    assert cli("verify", path).returncode == 0
    for p in path.glob("shard-*"):
        assert (p.stat().st_mtime_ns == mtimes[p.name]) == (p.name != "shard-00002.safetensors")


def test_pipe_couple_into_verify_and_bad_input(tmp_path, teacher_file):
    out = subprocess.run(f"{sys.executable} -m accelkit couple {teacher_file} -n 10 --nfe 2 --micro-batch 5 "
                         f"--shard-size 5 | {sys.executable} -m accelkit verify", shell=True, capture_output=True,
                         text=True, cwd=tmp_path, env=env(), timeout=300)
    assert out.returncode == 0, out.stderr
    (path,) = out.stdout.split()
    assert Path(tmp_path / path).is_dir() and Path(path).name.startswith("couple-")
    assert "all hashes match" in out.stderr
    # A teacher piped in on stdin works too; a missing teacher is a one-line error.
    piped = run_cli("couple", "-n", "10", "--nfe", "2", "--micro-batch", "5", "--shard-size", "5",
                    input=f"{teacher_file}\n", cwd=tmp_path)
    assert piped.returncode == 0 and piped.stdout.strip() == path
    missing = run_cli("couple", tmp_path / "nope.safetensors", "-n", "3", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.safetensors" in missing.stderr and "Traceback" not in missing.stderr


def test_other_recipe_into_existing_output_refused_then_forced(tmp_path, teacher_file, cli):
    args = ["-o", tmp_path / "o", "--micro-batch", "5", "--shard-size", "5", "--nfe", "2"]
    assert cli("couple", teacher_file, "-n", "10", *args).returncode == 0
    other = cli("couple", teacher_file, "-n", "15", *args)
    assert other.returncode == 2 and "another recipe" in other.stderr and "--force" in other.stderr
    assert read_manifest(tmp_path / "o")["recipe"]["n"] == 10
    forced = cli("couple", teacher_file, "-n", "15", *args, "--force")
    assert forced.returncode == 0 and read_manifest(tmp_path / "o")["recipe"]["n"] == 15


def test_dry_run_and_recipe_file(tmp_path, teacher_file, cli):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"couple:\n  teacher: {teacher_file}\n  n: 10\n  nfe: 2\n  micro_batch: 5\n  shard_size: 5\n")
    dry = cli("couple", "--recipe", recipe, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and dry.stdout == "" and "run" in dry.stderr
    assert not (tmp_path / "runs").exists()
    made = cli("couple", "--recipe", recipe, "--set", "couple.seed=4", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    m = read_manifest(tmp_path / made.stdout.strip())
    assert m["recipe"]["seed"] == 4 and m["seeds"] == {"seed": 4}


def test_run_recipe_stages_in_order_reused_second_time(tmp_path, teacher_file, cli):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"stages:\n  - couple: {{teacher: {teacher_file}, n: 10, nfe: 2, micro_batch: 5, "
                      f"shard_size: 5}}\n  - couple: {{teacher: {teacher_file}, n: 10, nfe: 3, micro_batch: 5, "
                      f"shard_size: 5}}\n")
    first = cli("run", recipe, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.split()) == 1 and "summary" in first.stderr
    second = cli("run", recipe, cwd=tmp_path)
    assert second.stdout == first.stdout and second.stderr.count("reusing the complete artifact") == 2
    assert first.stderr.count("reusing") == 0


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path, teacher_file):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    args = ["-n", "50", "--nfe", "3", "--micro-batch", "5", "--shard-size", "10"]
    one = run_cli("couple", teacher_file, "-o", tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                          "-m", "accelkit", "couple", str(teacher_file), "-o", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, env=env(), timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(tmp_path / "two")
    assert_same_artifact(tmp_path / "one", tmp_path / "two")
    assert read_manifest(tmp_path / "two")["summary"]["processes"] == 2
