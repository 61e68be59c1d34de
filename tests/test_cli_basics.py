"""The CLI as a shell sees it: fast help, completion that answers, completion scripts kept fresh."""

import os
import subprocess
import sys
import time

from conftest import REPO


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, accelkit.cli.main as m; m._register(); "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], "heavy imports on the CLI's import path"


def test_help_lists_commands(cli):
    start = time.perf_counter()
    out = cli("--help")
    assert out.returncode == 0
    assert time.perf_counter() - start < 10
    assert "Usage" in out.stdout


def test_completion_scripts_are_fresh():
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gen_completions.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_bash_completion_answers(cli):
    out = cli(env={"_ACCELKIT_COMPLETE": "complete_bash", "COMP_WORDS": "accelkit --de", "COMP_CWORD": "1"})
    assert out.returncode == 0
    assert "--debug" in out.stdout.split()
