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
