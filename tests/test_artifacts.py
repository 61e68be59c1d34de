"""The artifact layer: identity, reuse/resume/refuse, atomic writes, locks, hashing, verification, checkpointer."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from accelkit.artifacts import Artifact, atomic_path, content_hash, read_manifest, verify
from accelkit.errors import AccelkitError, JobInterrupted
from accelkit.jobs import Checkpointer


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELKIT_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def make_input(tmp_path, content=b"weights"):
    p = tmp_path / "teacher.bin"
    p.write_bytes(content)
    return p


def test_default_path_is_content_addressed_and_complete_is_reused(tmp_path, runs):
    inp = make_input(tmp_path)
    with Artifact.open(None, "toy", {"n": 3}, {"teacher": inp}, seeds={"seed": 7}) as a:
        assert a.state == "new"
        assert a.path.parent == runs and a.path.name.startswith("toy-")
        a.save_tensors("x.safetensors", {"x": torch.arange(3.0)})
        a.progress = {"done": 3}
        a.complete({"n": 3})
    m = read_manifest(a.path)
    assert m["status"] == "complete" and m["seeds"] == {"seed": 7} and m["recipe"] == {"n": 3}
    assert m["inputs"]["teacher"]["sha256"] == content_hash(inp)
    assert set(m["files"]) == {"x.safetensors"}
    with Artifact.open(None, "toy", {"n": 3}, {"teacher": inp}) as b:
        assert b.path == a.path and b.state == "complete"
    # Other input content -> another directory; other recipe -> another directory.
    inp.write_bytes(b"other weights")
    with Artifact.open(None, "toy", {"n": 3}, {"teacher": inp}) as c:
        assert c.path != a.path and c.state == "new"
    with Artifact.open(None, "toy", {"n": 4}, {"teacher": inp}) as d:
        assert d.path not in (a.path, c.path)


def test_partial_resumes_with_progress_and_execution_keys_do_not_count(tmp_path, runs):
    out = tmp_path / "out"
    with Artifact.open(out, "toy", {"n": 3, "batch_size": 8}, exclude={"batch_size"}) as a:
        a.progress = {"cursor": 2}
    with Artifact.open(out, "toy", {"n": 3, "batch_size": 64}, exclude={"batch_size"}) as b:
        assert b.state == "partial" and b.progress == {"cursor": 2}
        assert b.recipe["batch_size"] == 64


def test_other_recipe_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    with Artifact.open(out, "toy", {"n": 3}) as a:
        a.write_file("f.txt", b"hello")
        a.complete()
    with pytest.raises(AccelkitError, match="another recipe.*--force"):
        Artifact.open(out, "toy", {"n": 4})
    assert (out / "f.txt").read_bytes() == b"hello"  # nothing clobbered
    with Artifact.open(out, "toy", {"n": 4}, force=True) as b:
        assert b.state == "new" and not (out / "f.txt").exists()


def test_non_artifact_directory_is_never_clobbered(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for force in (False, True):
        with pytest.raises(AccelkitError, match="not an accelkit artifact"):
            Artifact.open(out, "toy", {"n": 1}, force=force)
    assert (out / "thesis.tex").read_text() == "precious"


def test_second_job_is_refused_at_once(tmp_path):
    out = tmp_path / "out"
    with Artifact.open(out, "toy", {"n": 1}):
        # Another process, same directory: fails immediately with a clear message.
        code = textwrap.dedent(f"""
            from accelkit.artifacts import Artifact
            from accelkit.errors import AccelkitError
            try:
                Artifact.open({str(out)!r}, "toy", {{"n": 1}})
            except AccelkitError as e:
                print(e)
        """)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": REPO})
        assert "in use by another job" in res.stdout and f"pid {os.getpid()}" in res.stdout
    with Artifact.open(out, "toy", {"n": 1}) as a:  # released: opens again
        assert a.state == "new"


def test_verify_detects_flipped_bytes_and_reader_refuses(tmp_path):
    out = tmp_path / "out"
    with Artifact.open(out, "toy", {"n": 1}) as a:
        a.save_tensors("t.safetensors", {"x": torch.randn(100)})
        a.complete()
    assert verify(out) == []
    p = out / "t.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    problems = verify(out)
    assert len(problems) == 1 and "t.safetensors" in problems[0] and "damaged" in problems[0]
    with pytest.raises(AccelkitError, match="t.safetensors.*damaged"):
        Artifact.read(out, "toy").load_tensors("t.safetensors")


def test_reader_refuses_partial_and_wrong_kind(tmp_path):
    out = tmp_path / "out"
    with Artifact.open(out, "toy", {"n": 1}) as a:
        a.progress = {"x": 1}
    with pytest.raises(AccelkitError, match="not complete"):
        Artifact.read(out)
    with Artifact.open(out, "toy", {"n": 1}) as a:
        a.complete()
    with pytest.raises(AccelkitError, match="expected a 'couple' artifact"):
        Artifact.read(out, "couple")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]  # no temporary left behind


def test_content_hash_of_directories_and_artifacts(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"a": 1}))
    (d / "w.bin").write_bytes(b"123")
    h1 = content_hash(d)
    (d / "w.bin").write_bytes(b"124")
    assert content_hash(d) != h1
    out = tmp_path / "art"
    with Artifact.open(out, "toy", {"n": 1}) as a:
        a.progress = {"i": 0}
    with pytest.raises(AccelkitError, match="not complete"):
        content_hash(out)


def test_checkpointer_saves_on_signal_then_stops():
    saves = []
    with pytest.raises(JobInterrupted) as info, Checkpointer(every=3600, what="toy job") as ckpt:
        for step in range(100):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            if ckpt.due():
                saves.append(step)
                ckpt.saved()
    assert saves == [5]
    assert info.value.exit_code == 128 + signal.SIGTERM and "run the same command again" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_checkpointer_timer():
    with Checkpointer(every=0) as ckpt:
        assert ckpt.due()
    with Checkpointer(every=3600) as ckpt:
        assert not ckpt.due()


def test_safetensors_files_are_byte_reproducible_with_many_metadata_keys(tmp_path):
    """safetensors orders its header by hash map; ours is sorted, so the same content gives the same bytes."""
    import torch
    from safetensors.torch import load_file, safe_open

    from accelkit.artifacts import safetensors_bytes
    from accelkit.models.builtin import MLP, builtin_call
    from accelkit.models.loading import save_teacher
    from accelkit.schedules import LinearSchedule
    from accelkit.teacher import NetworkTeacher

    tensors = {"b": torch.randn(3, 2), "a": torch.arange(5)}
    meta = {f"key{i}": "v" * i for i in range(30)}
    assert len({safetensors_bytes(tensors, meta) for _ in range(10)}) == 1
    (tmp_path / "x.safetensors").write_bytes(safetensors_bytes(tensors, meta))
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == meta
    teacher = NetworkTeacher(MLP(dim=2, hidden=8, depth=2), builtin_call, "flow", LinearSchedule(), (2,))
    a, b = save_teacher(teacher, tmp_path / "a.safetensors"), save_teacher(teacher, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
