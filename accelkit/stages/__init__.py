"""Stages: each module defines a recipe model and a run function and registers them with
:func:`accelkit.recipes.register_stage` (listed in :data:`accelkit.recipes.STAGE_MODULES`)."""
