"""Recipes: YAML files of stages, validated by one pydantic model per stage before any work starts.

A recipe file is either one stage's section or a pipeline of stages run in order::

    couple:                       # one stage (``accelkit couple --recipe FILE``)
      teacher: teacher.safetensors
      n: 20000

    stages:                       # a pipeline (``accelkit run FILE``)
      - couple: {teacher: teacher.safetensors, n: 20000, nfe: 16}
      - reflow: {couplings: "@couple", lr: 1e-4}

A string value ``@NAME`` (the latest earlier stage of that name) or ``@INDEX`` (the stage at that position) stands for
that stage's output directory. Precedence, lowest first: the model's defaults, the recipe file, command-line flags,
``--set stage.key=value`` (values parsed as YAML, so ``--set reflow.lr=1e-4`` is a float). Errors name the YAML path
of the bad key (``stages[1].couple.nfe``), the value and what was expected.

Stages plug in with :func:`register_stage` (name, recipe model, run function); ``accelkit run`` and
``accelkit config show`` find them through :func:`load_stages`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import AccelkitError

# ------------------------------------------------------------------------------------------------------------ YAML


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (``1e-4`` and ``1E5`` are floats, not strings) and an error on
    duplicate keys."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
RecipeLoader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_mapping(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str = "<recipe>") -> Any:
    """Parse recipe YAML; syntax errors become one-line AccelkitErrors naming the file and line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise AccelkitError(f"{source}{where}: invalid YAML: {problem}") from None


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise AccelkitError(f"recipe {str(p)!r} does not exist")
    data = load_yaml(p.read_text(), str(p))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AccelkitError(f"{p}: expected a mapping at the top level (a stage section or 'stages:'), got "
                            f"{type(data).__name__}")
    return data


def dump_yaml(data: Any) -> str:
    """YAML that :func:`load_yaml` reads back to the same values (block style, keys in model order)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------- stage recipes


class StageRecipe(BaseModel):
    """Base of every stage's recipe model: unknown keys are errors; values are checked on assignment too.

    ``input_fields``: fields that name input files or artifacts (their content hashes, not their paths, enter the
    artifact identity). ``execution_fields``: fields that change how a job runs but not its result (batch size,
    checkpoint interval, device); they stay out of the identity, so a job can resume with other values.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    input_fields: ClassVar[tuple[str, ...]] = ()
    execution_fields: ClassVar[frozenset[str]] = frozenset()

    def inputs(self) -> dict[str, str]:
        """Input name -> path, for the inputs that are set."""
        return {f: str(getattr(self, f)) for f in self.input_fields if getattr(self, f) is not None}

    def identity_dict(self) -> dict[str, Any]:
        """The recipe values that decide the result (no inputs' paths, no execution settings)."""
        skip = set(self.input_fields) | set(self.execution_fields)
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


#: A stage's run function: (recipe, output directory or None for the default, force) -> the artifact's path.
RunFn = Callable[[StageRecipe, "Path | None", bool], Path]


@dataclass(frozen=True)
class StageSpec:
    name: str
    recipe: type[StageRecipe]
    run: RunFn
    help: str = ""


_STAGES: dict[str, StageSpec] = {}
#: Modules under accelkit.stages that register a stage when imported: every module of the package, found by
#: :func:`stage_modules` (so adding a stage touches no list here).
def stage_modules() -> list[str]:
    import pkgutil

    from . import stages

    return sorted(f"accelkit.stages.{m.name}" for m in pkgutil.iter_modules(stages.__path__) if not m.ispkg)


def register_stage(name: str, recipe: type[StageRecipe], run: RunFn, help: str = "") -> StageSpec:
    """Make stage ``name`` known to ``accelkit run`` and ``accelkit config show``."""
    doc_lines = (recipe.__doc__ or "").strip().splitlines()
    spec = StageSpec(name, recipe, run, help or (doc_lines[0] if doc_lines else name))
    _STAGES[name] = spec
    return spec


def load_stages() -> dict[str, StageSpec]:
    """Import every stage module (each registers itself) and return the registry."""
    for mod in stage_modules():
        importlib.import_module(mod)
    return dict(_STAGES)


def get_stage(name: str) -> StageSpec:
    stages = _STAGES if name in _STAGES else load_stages()
    if name not in stages:
        raise AccelkitError(f"unknown stage {name!r}: expected one of {', '.join(sorted(stages)) or '(none)'}")
    return stages[name]


# --------------------------------------------------------------------------------------------------------- errors


def yaml_path(loc: Iterable[Any]) -> str:
    """A pydantic location as a YAML path: ('stages', 1, 'couple', 'nfe') -> 'stages[1].couple.nfe'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(error: Mapping[str, Any], model: type[BaseModel] | None) -> str:
    kind, msg = error.get("type", ""), error.get("msg", "")
    value = error.get("input")
    if kind == "extra_forbidden":
        known = ", ".join(model.model_fields) if model is not None else ""
        return "unknown key" + (f"; expected one of: {known}" if known else "")
    if kind == "missing":
        return "required key is missing"
    expected = msg[0].lower() + msg[1:] if msg else "a valid value"
    expected = expected.replace("input should be", "expected").replace("value error, ", "")
    expected = expected.replace(", got a number with a fractional part", " (no fractional part)")
    if isinstance(value, dict):  # a check across several keys: the message names them
        return expected
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{expected}, got {shown}"


def validation_message(e: ValidationError, prefix: Iterable[Any] = (), source: str | None = None,
                       model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``FILE: stages[1].couple.nfe: expected ... , got ...``."""
    lines = []
    for error in e.errors():
        loc = (*prefix, *error["loc"])
        lines.append(f"{source + ': ' if source else ''}{yaml_path(loc)}: {_describe(error, model)}")
    return "; ".join(lines)


def validate_stage(name: str, data: Any, prefix: Iterable[Any] = (), source: str | None = None) -> StageRecipe:
    """Validate one stage's section into its recipe model; errors name the YAML path."""
    spec = get_stage(name)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AccelkitError(f"{source + ': ' if source else ''}{yaml_path((*prefix, name))}: expected a mapping of "
                            f"{name} settings, got {type(data).__name__}")
    try:
        return spec.recipe.model_validate(data)
    except ValidationError as e:
        raise AccelkitError(validation_message(e, (*prefix, name), source, spec.recipe)) from None


# -------------------------------------------------------------------------------------------------------- --set


def parse_set(expr: str) -> tuple[list[str | int], Any]:
    """``stage.key=value`` or ``stages[1].stage.key=value`` -> (path, value); the value is parsed as YAML."""
    if "=" not in expr:
        raise AccelkitError(f"--set {expr!r}: expected stage.key=value")
    key, raw = expr.split("=", 1)
    path: list[str | int] = []
    for part in key.strip().split("."):
        m = re.fullmatch(r"([A-Za-z_][\w-]*)((?:\[\d+\])*)", part)
        if not m:
            raise AccelkitError(f"--set {expr!r}: bad key {part!r}; expected names like stage.key or stages[1].key")
        path.append(m.group(1))
        path += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    if len(path) < 2:
        raise AccelkitError(f"--set {expr!r}: expected stage.key=value (the stage name first)")
    return path, load_yaml(raw, f"--set {key}") if raw.strip() else ""


def _set_in(data: Any, path: list[str | int], value: Any, expr: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise AccelkitError(f"--set {expr!r}: {yaml_path(path[:i + 1])} does not exist in the recipe")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise AccelkitError(f"--set {expr!r}: {yaml_path(path[:i])} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise AccelkitError(f"--set {expr!r}: {yaml_path(path)} does not exist in the recipe")
    elif not isinstance(node, dict):
        raise AccelkitError(f"--set {expr!r}: {yaml_path(path[:-1])} is not a mapping")
    node[last] = value


def apply_sets(data: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw recipe data. In a pipeline, ``stage.key=v`` applies to every stage of that
    name, ``stages[i].stage.key=v`` to one."""
    for expr in sets or ():
        path, value = parse_set(expr)
        if "stages" in data and path[0] != "stages":
            hits = [i for i, s in enumerate(data["stages"] or []) if isinstance(s, dict) and path[0] in s]
            if not hits:
                raise AccelkitError(f"--set {expr!r}: the recipe has no {path[0]!r} stage")
            for i in hits:
                _set_in(data, ["stages", i, *path], value, expr)
        else:
            _set_in(data, path, value, expr)
    return data


# ---------------------------------------------------------------------------------------------------- resolving


def resolve_stage(name: str, recipe_file: str | Path | None = None, flags: Mapping[str, Any] | None = None,
                  sets: Iterable[str] = ()) -> StageRecipe:
    """One stage's recipe from a file's section (or a pipeline with one such stage), flags (None = not given) and
    ``--set`` overrides, validated."""
    section: dict[str, Any] = {}
    source = str(recipe_file) if recipe_file else None
    prefix: tuple[Any, ...] = ()
    if recipe_file:
        data = load_recipe_file(recipe_file)
        if "stages" in data:
            hits = [i for i, s in enumerate(data["stages"] or []) if isinstance(s, dict) and name in s]
            if len(hits) != 1:
                raise AccelkitError(f"{recipe_file}: expected exactly one {name!r} stage for `accelkit {name}`, "
                                    f"found {len(hits)}; use `accelkit run` for pipelines")
            section, prefix = data["stages"][hits[0]][name] or {}, ("stages", hits[0])
        elif name in data:
            extra = sorted(set(data) - {name})
            if extra:
                raise AccelkitError(f"{recipe_file}: unknown top-level key {extra[0]!r}; expected {name!r}")
            section = data[name] or {}
        else:
            raise AccelkitError(f"{recipe_file}: no {name!r} section; expected a top-level {name!r} key or 'stages:'")
        if not isinstance(section, dict):
            raise AccelkitError(f"{recipe_file}: {yaml_path((*prefix, name))}: expected a mapping, "
                                f"got {type(section).__name__}")
    section = dict(section)
    section.update({k: v for k, v in (flags or {}).items() if v is not None})
    wrapped = apply_sets({name: section}, [s for s in sets or ()])
    unknown = sorted(set(wrapped) - {name})
    if unknown:
        raise AccelkitError(f"--set {unknown[0]}.…: this command runs the {name!r} stage; use {name}.key=value")
    return validate_stage(name, wrapped[name], prefix, source)


REF = re.compile(r"^@(\w[\w-]*)$")


@dataclass
class PlannedStage:
    index: int
    name: str
    recipe: StageRecipe
    refs: dict[str, int]  # field -> index of the earlier stage whose output it takes

    @property
    def label(self) -> str:
        return f"stages[{self.index}].{self.name}"


def resolve_pipeline(recipe_file: str | Path, sets: Iterable[str] = ()) -> list[PlannedStage]:
    """A pipeline recipe's stages, each validated, with ``@stage`` references checked to point backwards."""
    source = str(recipe_file)
    data = apply_sets(load_recipe_file(recipe_file), sets)
    if "stages" not in data:
        names = [k for k in data]
        known = load_stages()
        if len(names) == 1 and names[0] in known:  # a one-stage file runs as a one-stage pipeline
            data = {"stages": [{names[0]: data[names[0]]}]}
        elif len(names) == 1:
            raise AccelkitError(f"{source}: {names[0]}: unknown top-level key; expected 'stages' or a stage name "
                                f"({', '.join(sorted(known))})")
        else:
            raise AccelkitError(f"{source}: expected a 'stages:' list (or a single stage section), "
                                f"got keys {', '.join(map(str, names)) or '(none)'}")
    extra = sorted(set(data) - {"stages"})
    if extra:
        raise AccelkitError(f"{source}: {extra[0]}: unknown top-level key; expected 'stages'")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise AccelkitError(f"{source}: stages: expected a non-empty list of stages")
    plan: list[PlannedStage] = []
    for i, entry in enumerate(stages):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise AccelkitError(f"{source}: stages[{i}]: expected one mapping 'STAGE: {{settings}}', got {entry!r}")
        (name, section), = entry.items()
        if name not in load_stages():
            raise AccelkitError(f"{source}: stages[{i}].{name}: unknown stage; expected one of "
                                f"{', '.join(sorted(load_stages()))}")
        recipe = validate_stage(name, section, ("stages", i), source)
        refs: dict[str, int] = {}
        for field, value in recipe.model_dump().items():
            m = REF.match(value) if isinstance(value, str) else None
            if not m:
                continue
            target = m.group(1)
            if target.isdigit():
                j = int(target)
                ok = j < i
            else:
                earlier = [p.index for p in plan if p.name == target]
                j = earlier[-1] if earlier else -1
                ok = bool(earlier)
            if not ok:
                raise AccelkitError(f"{source}: stages[{i}].{name}.{field}: {value!r} must name an earlier stage "
                                    f"(by name or index)")
            refs[field] = j
        plan.append(PlannedStage(i, name, recipe, refs))
    return plan


def pipeline_as_data(plan: list[PlannedStage]) -> dict[str, Any]:
    """The fully resolved pipeline as plain data (what ``accelkit config show`` prints)."""
    return {"stages": [{p.name: p.recipe.model_dump(mode="json")} for p in plan]}


__all__ = [
    "StageRecipe", "StageSpec", "register_stage", "load_stages", "get_stage", "load_yaml", "load_recipe_file",
    "dump_yaml", "RecipeLoader", "parse_set", "apply_sets", "resolve_stage", "resolve_pipeline", "validate_stage",
    "validation_message", "yaml_path", "PlannedStage", "pipeline_as_data", "stage_modules",
]
