"""Stages: each module defines a recipe model and a run function and registers them with
:func:`accelkit.recipes.register_stage`; :func:`accelkit.recipes.load_stages` imports every module of this package."""
