"""rescale: a teacher's probability-flow ODE expressed exactly under another noise schedule.

Two schedules A (the teacher's) and B (the target) are related by the scale-time transformation
(Shaul et al. 2023, "Bespoke Solvers for Generative Flow Models"; Lipman et al. 2024, "Flow Matching Guide", 4.8):

    x_B(r) = s(r) x_A(t(r)),   lambda_A(t(r)) = lambda_B(r),   s(r) = sigma_B(r) / sigma_A(t(r)),

so the rescaled teacher predicts x0 and eps at (x, r) as the original does at (x / s(r), t(r)) and its ODE carries
the same noise to the same sample (outside A's log-SNR range t is clamped to A's end, as samplers treat the prior).
The artifact holds no weights: ``rescaled.json`` names the target schedule and the source by path and content hash,
and :func:`load_rescaled` refuses a source whose content has changed since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from ..artifacts import Artifact, content_hash, read_manifest
from ..console import log
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage

KIND = "rescale"
FORMAT = "accelkit.rescaled/1"
SPEC_FILE = "rescaled.json"


class RescaleRecipe(StageRecipe):
    """rescale: the teacher's ODE under another schedule (scale + time reparameterization), weights referenced."""

    input_fields = ("teacher", "config")
    execution_fields = frozenset({"allow_pickle"})

    teacher: str = Field(description="teacher checkpoint (file, folder or artifact)")
    to: str = Field(description="target schedule name")
    config: str | None = Field(None, description="config.json of a single-file diffusers state dict")
    prediction_type: str | None = Field(None, description="override the teacher's prediction type")
    schedule: str | None = Field(None, description="override the teacher's own schedule")
    allow_pickle: bool = Field(False, description="allow a pickled source checkpoint (read with weights_only)")

    @field_validator("to", "schedule")
    @classmethod
    def _known_schedule(cls, v: str | None) -> str | None:
        from ..schedules import SCHEDULE_NAMES

        if v is not None and v not in SCHEDULE_NAMES:
            raise ValueError(f"expected one of {', '.join(SCHEDULE_NAMES)}")
        return v


def _source_kwargs(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: recipe.get(k) for k in ("config", "prediction_type", "schedule")} | {
        "allow_pickle": bool(recipe.get("allow_pickle", False))}


def run_rescale(recipe: RescaleRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Write the rescale artifact for ``recipe``; returns its directory (reused when already complete)."""
    from ..models.loading import load_teacher
    from ..schedules import schedule_from_name

    source = load_teacher(recipe.teacher, **_source_kwargs(recipe.model_dump()))  # checks that the source loads
    target = schedule_from_name(recipe.to)
    if target == source.schedule:
        log(f"note: {recipe.teacher} already uses the {recipe.to} schedule; the rescaled teacher is the same ODE")
    with Artifact.open(output, KIND, recipe, recipe.inputs(), force=force) as art:
        if art.state == "complete":
            log(f"reusing {art.path}")
            return art.path
        spec = {"format": FORMAT, "schedule": target.config(), "source_schedule": source.schedule.config(),
                "source": art.manifest["inputs"]["teacher"]}
        art.write_json(SPEC_FILE, spec)
        art.complete({"schedule": target.config(), "source_schedule": source.schedule.config()})
        return art.path


def is_rescale_artifact(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / SPEC_FILE).is_file() and (p / "manifest.json").is_file()


def load_rescaled(path: str | Path, **load_kwargs: Any):
    """The :class:`accelkit.teacher.RescaledTeacher` of a rescale artifact, its source loaded from the recorded path.

    ``load_kwargs`` (device, dtype, guidance) pass through to the source's :func:`load_teacher`. Raises
    :class:`AccelkitError` when the artifact is incomplete or the source is missing or has changed since.
    """
    import json

    from ..models.loading import load_teacher
    from ..schedules import schedule_from_config
    from ..teacher import RescaledTeacher

    p = Path(path)
    manifest = read_manifest(p)
    if manifest.get("status") != "complete":
        raise AccelkitError(f"{p}: the rescale artifact is not complete; run `accelkit rescale` again to finish it")
    spec = json.loads((p / SPEC_FILE).read_text())
    if spec.get("format") != FORMAT:
        raise AccelkitError(f"{p / SPEC_FILE}: format {spec.get('format')!r}; expected {FORMAT}")
    src = spec["source"]
    if not Path(src["path"]).exists():
        raise AccelkitError(f"{p}: its source teacher {src['path']} is missing; the artifact refers to the weights "
                            "by path and does not copy them")
    if content_hash(src["path"]) != src["sha256"]:
        raise AccelkitError(f"{p}: its source teacher {src['path']} has changed since it was rescaled "
                            f"(expected content hash {src['sha256'][:12]}); rescale it again")
    base = load_teacher(src["path"], **_source_kwargs(manifest["recipe"]), **load_kwargs)
    return RescaledTeacher(base, schedule_from_config(spec["schedule"]))


register_stage("rescale", RescaleRecipe, run_rescale)

__all__ = ["RescaleRecipe", "run_rescale", "load_rescaled", "is_rescale_artifact", "KIND", "FORMAT"]
