"""Exporting teachers, rescaled teachers and students for plain diffusers and single-file tools.

* :mod:`.linear_form`  an accelkit sampler (solver, NFE, grid, schedule) as a table of linear coefficients;
* :mod:`.scheduler`    :class:`AccelkitScheduler`, the diffusers scheduler that replays such a table;
* :mod:`.exporter`     ``accelkit export``: the diffusers folder and the single ``.safetensors`` file.

This package imports nothing heavy until asked: ``from accelkit.export import AccelkitScheduler`` loads torch and
diffusers then, so the CLI's import path stays light.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("AccelkitScheduler", "AccelkitSchedulerOutput"):
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
