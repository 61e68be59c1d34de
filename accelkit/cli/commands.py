"""Registers every command on the app: one import per command module; each module decorates with ``app.command``."""

from __future__ import annotations

from . import (
    inspect_cmd,  # noqa: F401
    sample_cmd,  # noqa: F401
)
