"""Registers every command on the app: every ``*_cmd`` module of this package is imported (each decorates its
command with ``app.command``), in name order, so adding a command touches no list here."""

from __future__ import annotations

import importlib
import pkgutil

from .. import cli as _package

for _module in sorted(m.name for m in pkgutil.iter_modules(_package.__path__) if m.name.endswith("_cmd")):
    importlib.import_module(f"{__package__}.{_module}")
