"""Learned solvers as :class:`~accelkit.solvers.base.Solver` objects: a ``bespoke`` artifact (made by ``accelkit
bespoke``) is a solver for the one teacher it was trained on, at the one NFE it was trained for.

The artifact holds ``solver.safetensors`` (the parameters) and ``solver.json`` (``kind``: ``bespoke`` for the
scale-time solver of :mod:`.bespoke`, ``bns`` for the non-stationary solver of :mod:`.bns`; ``base``; ``nfe``; what
the module needs to be rebuilt; the teacher's path and content hash). :func:`accelkit.solvers.get_solver` takes the
artifact's path wherever it takes a solver name; :func:`check_solver_teacher` refuses a solver trained for another
teacher (its content hash differs) unless forced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AccelkitError
from ..teacher import Condition, Teacher
from .base import Solver

KIND = "bespoke"
STATS_KIND = "solver-stats"  # DPM-Solver-v3's empirical model statistics (accelkit solver-stats)
SOLVER_FILE = "solver.safetensors"
CONFIG_FILE = "solver.json"
FORMAT = "accelkit.learned-solver"


class LearnedSolver(Solver):
    """A trained :class:`~accelkit.solvers.bespoke.ScaleTimeSolver` or
    :class:`~accelkit.solvers.bns.NonStationarySolver` behind the :class:`Solver` interface. It steps on its own
    learned times: the grid ``solve`` passes is ignored, and only the NFE it was trained for is accepted."""

    def __init__(self, module: nn.Module, config: dict[str, Any], name: str = "learned"):
        self.module = module.eval().requires_grad_(False)
        self.config = dict(config)
        self.name = name

    @property
    def nfe(self) -> int:
        return int(self.config["nfe"])

    def steps(self, nfe: int) -> int:
        if nfe != self.nfe:
            raise AccelkitError(f"solver {self.name}: trained for NFE {self.nfe}, asked for NFE {nfe}")
        return int(self.config["steps"])

    def sample(self, teacher: Teacher, x: Tensor, ts: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
        self.steps(nfe)
        module = self.module.to(x.device)
        with torch.no_grad():
            return module.sample(teacher, x, cond)


def build_module(config: dict[str, Any]) -> nn.Module:
    """An untrained module of the shape ``config`` describes (its parameters are then loaded)."""
    from .bespoke import ScaleTimeSolver
    from .bns import NonStationarySolver

    if config.get("kind") == "bespoke":
        return ScaleTimeSolver(config["base"], torch.tensor(config["grid"], dtype=torch.float64),
                               config.get("lipschitz", 1.0))
    if config.get("kind") == "bns":
        n = int(config["nfe"])
        z = torch.zeros(n, dtype=torch.float64)
        return NonStationarySolver(z, z, torch.zeros(n, n, dtype=torch.float64), tuple(config["t_range"]))
    raise AccelkitError(f"learned solver kind {config.get('kind')!r}: expected bespoke or bns")


def save_learned_solver(directory: Path, module: nn.Module, config: dict[str, Any], write) -> None:
    """Write ``solver.safetensors`` and ``solver.json`` through ``write(name, fn(tmp_path))`` (atomic)."""
    from ..artifacts import save_safetensors

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    write(SOLVER_FILE, lambda tmp: save_safetensors(tmp, tensors, {"format": FORMAT, "config": json.dumps(config)}))
    write(CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def is_learned_solver(path: str | os.PathLike) -> bool:
    """True for a directory holding a learned solver (a bespoke artifact)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (p / SOLVER_FILE).is_file()


_CACHE: dict[tuple[str, float], LearnedSolver] = {}


def load_learned_solver(path: str | os.PathLike) -> Solver:
    """The solver in a complete bespoke artifact (checked against its manifest), or DPM-Solver-v3 on the statistics
    of a solver-stats artifact."""
    from safetensors.torch import load_file

    from ..artifacts import Artifact

    p = Path(path)
    if not is_learned_solver(p):
        raise AccelkitError(f"{path}: not a learned solver (expected a bespoke artifact with {CONFIG_FILE} and "
                            f"{SOLVER_FILE})")
    key = (str(p.resolve()), (p / SOLVER_FILE).stat().st_mtime)
    if key in _CACHE:
        return _CACHE[key]
    art = Artifact.read(p)
    if art.manifest["kind"] not in (KIND, STATS_KIND):
        raise AccelkitError(f"{p} is a {art.manifest['kind']!r} artifact; expected a {KIND!r} or {STATS_KIND!r} "
                            "artifact")
    art.check_file(SOLVER_FILE)
    try:
        config = json.loads((p / CONFIG_FILE).read_text())
    except ValueError as e:
        raise AccelkitError(f"{p / CONFIG_FILE}: unreadable ({e})") from None
    if config.get("kind") == "dpm-solver-v3":  # empirical model statistics: DPM-Solver-v3 at any NFE and grid
        from .dpm_solver_v3 import DPMSolverV3, EmpiricalStatistics

        t = load_file(str(p / SOLVER_FILE))
        stats = EmpiricalStatistics(t["lam"], t["l"], t["s"], t["b"])
        v3 = DPMSolverV3(stats, int(config.get("order", 2)), bool(config.get("corrector", True)), config, str(path))
        _CACHE[key] = v3
        return v3
    module = build_module(config)
    state = load_file(str(p / SOLVER_FILE))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AccelkitError(f"{p / SOLVER_FILE}: parameters do not fit a {config.get('kind')} solver of NFE "
                            f"{config.get('nfe')} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    solver = LearnedSolver(module, config, name=str(path))
    _CACHE[key] = solver
    return solver


def check_solver_teacher(solver_path: str | os.PathLike, teacher_path: str | os.PathLike, force: bool = False
                         ) -> None:
    """Refuse a learned solver trained for another teacher than ``teacher_path`` (content hashes differ) unless
    ``force``; a solver trained for a teacher keeps working when that file moves."""
    from ..artifacts import content_hash

    config = load_learned_solver(solver_path).config
    recorded = config.get("teacher_sha256")
    if force or recorded is None:
        return
    if content_hash(teacher_path) != recorded:
        raise AccelkitError(f"--solver {solver_path}: trained for the teacher {config.get('teacher')!r} (content hash "
                            f"{recorded[:12]}), not for {str(teacher_path)!r}; pass --force to use it anyway")


__all__ = ["LearnedSolver", "load_learned_solver", "is_learned_solver", "check_solver_teacher", "build_module",
           "save_learned_solver", "SOLVER_FILE", "CONFIG_FILE"]
