"""Test-wide settings: offline hub, deterministic CPU math, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the machine is shared, and OpenMP threads spinning on a loaded CPU make small networks 10-40x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, input: str | None = None, cwd: str | None = None, env: dict | None = None, timeout=600):
    """Run ``python -m accelkit ARGS`` from this checkout in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["HF_HUB_OFFLINE"] = "1"
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "accelkit", *map(str, args)], input=input, capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def cli():
    """The CLI as a user runs it: ``cli("inspect", path)`` -> CompletedProcess with stdout/stderr/returncode."""
    return run_cli


def kill9_during(args, marker, *, max_delay: float = 0.3, stdin: str | None = None, env: dict | None = None,
                 timeout: float = 120) -> float:
    """Start ``python -m accelkit ARGS``, wait for the path ``marker`` (a first checkpoint), wait a random delay in
    [0, max_delay] s and SIGKILL it. Returns the delay; fails if the run ended before the kill."""
    import random
    import signal
    import subprocess
    import sys
    import time

    full_env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "accelkit", *map(str, args)], env=full_env,
                            stdin=subprocess.PIPE if stdin is not None else None, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    delay = random.uniform(0.0, max_delay)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return delay


def assert_same_tensors(file_a, file_b, context: str = "") -> None:
    """Two safetensors files hold the same keys with bit-identical tensors."""
    from safetensors.torch import load_file

    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs {context}"


def run_in_process(monkeypatch, capsys, *args):
    """The console-script entry in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from accelkit.cli.main import run

    monkeypatch.setattr("sys.argv", ["accelkit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        run()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err
