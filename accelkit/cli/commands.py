"""Registers every command on the app: one import per command module; each module decorates with ``app.command``."""
# ruff: noqa: I001  (one import line per command module, so adding a command never conflicts)

from __future__ import annotations

from . import adversarial_cmd  # noqa: F401
from . import bespoke_cmd  # noqa: F401
from . import config_cmd  # noqa: F401
from . import couple_cmd  # noqa: F401
from . import demo_cmd  # noqa: F401
from . import distill_cmd  # noqa: F401
from . import eval_cmd  # noqa: F401
from . import export_cmd  # noqa: F401
from . import inspect_cmd  # noqa: F401
from . import run_cmd  # noqa: F401
from . import reflow_cmd  # noqa: F401
from . import rescale_cmd  # noqa: F401
from . import sample_cmd  # noqa: F401
from . import score_distill_cmd  # noqa: F401
from . import train_cmd  # noqa: F401
from . import verify_cmd  # noqa: F401
