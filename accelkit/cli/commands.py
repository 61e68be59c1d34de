"""Registers every command on the app: one import per command module; each module decorates with ``app.command``."""

from __future__ import annotations
