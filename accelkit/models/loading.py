"""Loading teachers from disk, and accelkit's own single-file teacher format.

:func:`load_teacher` is the one entry point: whatever the user points at, it returns a
:class:`accelkit.teacher.NetworkTeacher` (network + prediction type + schedule + time input + conditioning).

* **accelkit's own format** (``.safetensors``): the network's tensors, and in the safetensors header (strings only)
  the format marker ``accelkit.teacher/1``, the architecture name, the network config, the prediction type, the
  schedule, the time input and the sample shape (JSON). :func:`save_teacher` writes it atomically.
* an **accelkit artifact directory** holding ``teacher.safetensors`` (that file is loaded).
* **diffusers** model folders, pipeline folders and single-file state dicts with ``config=``
  (see :mod:`accelkit.models.diffusers_models`).
* **pickled** checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) only with ``allow_pickle=True``, and then read with
  ``torch.load(weights_only=True)``.

Nothing here touches the network: diffusers is only asked for local files. Every problem with the user's input is
an :class:`accelkit.errors.AccelkitError` naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import AccelkitError
from ..extra_inputs import HEADER_KEY as EXTRA_INPUTS_KEY
from ..extra_inputs import ExtraInputCall, attach_to_network, header_value, inputs_from_header
from ..schedules import Schedule, schedule_from_config, schedule_from_name
from ..teacher import PREDICTION_TYPES, Condition, NetworkFn, NetworkTeacher, Teacher, TimeInput
from .builtin import MLP, SmallUNet, build_network, builtin_call

#: The format marker in the header of accelkit's single-file teachers; the number is the format version.
FORMAT = "accelkit.teacher/1"
FORMAT_NAME = FORMAT.split("/")[0]
#: Key prefix of the null condition's tensors in an accelkit teacher file (the network's tensors have none).
NULL_PREFIX = "accelkit.null_condition."
#: File name of the teacher inside an accelkit artifact directory.
ARTIFACT_TEACHER_FILE = "teacher.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

#: Prediction-type spellings accepted from users and from diffusers configs.
PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow",
                      "velocity": "flow"}

#: A null condition: a fixed batch-1 condition, or a function from the conditional batch to its null.
NullCondition = Condition | Callable[[Condition], Condition]


# ----------------------------------------------------------------------------------------------------------------
# Network families


@dataclass(frozen=True)
class NetworkAdapter:
    """How accelkit builds, calls and conditions one family of networks.

    ``build(config)`` makes the network from its JSON config; ``call`` is its :data:`accelkit.teacher.NetworkFn`;
    ``conditioning(network)`` describes what it is conditioned on (``{"kind": "none" | "class" | "text", ...}``);
    ``null_condition(network)`` gives the condition classifier-free guidance contrasts with (or None);
    ``sample_shape(config)`` the shape of one sample when the config fixes it (else None).
    """

    architecture: str
    build: Callable[[dict[str, Any]], nn.Module]
    call: NetworkFn
    conditioning: Callable[[nn.Module], dict[str, Any]]
    null_condition: Callable[[nn.Module], NullCondition | None]
    sample_shape: Callable[[dict[str, Any]], tuple[int, ...] | None]


def _builtin_conditioning(network: nn.Module) -> dict[str, Any]:
    n = int(network.config.get("num_classes", 0))
    return {"kind": "class", "num_classes": n, "null_class": n} if n > 0 else {"kind": "none"}


def _builtin_null(network: nn.Module) -> Condition | None:
    n = int(network.config.get("num_classes", 0))
    return Condition(class_labels=torch.tensor([n])) if n > 0 else None


def _builtin_call_in_network_dtype(network: nn.Module, x: Tensor, timestep: Tensor, cond: Condition | None) -> Tensor:
    """:func:`builtin_call` with x cast to the network's dtype and the output cast back (fp64 / fp16 networks)."""
    dtype = next(network.parameters()).dtype
    if dtype == x.dtype:
        return builtin_call(network, x, timestep, cond)
    return builtin_call(network, x.to(dtype), timestep, cond).to(x.dtype)


def _builtin_adapter(name: str, sample_shape: Callable[[dict[str, Any]], tuple[int, ...] | None]) -> NetworkAdapter:
    return NetworkAdapter(name, lambda cfg: build_network(name, cfg), _builtin_call_in_network_dtype,
                          _builtin_conditioning, _builtin_null, sample_shape)


BUILTIN_ADAPTERS = {
    "accelkit.MLP": _builtin_adapter("accelkit.MLP", lambda cfg: (int(cfg.get("dim", 2)),)),
    "accelkit.SmallUNet": _builtin_adapter("accelkit.SmallUNet", lambda cfg: None),
}


def adapter_for(architecture: str, source: str | os.PathLike = "") -> NetworkAdapter:
    """The adapter of an architecture name (``accelkit.MLP``, ``accelkit.SmallUNet``, ``diffusers.<ModelClass>``)."""
    if architecture in BUILTIN_ADAPTERS:
        return BUILTIN_ADAPTERS[architecture]
    if architecture.startswith("diffusers."):
        from .diffusers_models import diffusers_adapter

        return diffusers_adapter(architecture.removeprefix("diffusers."), source)
    where = f"{source}: " if source else ""
    raise AccelkitError(f"{where}unknown architecture {architecture!r}: expected one of "
                        f"{', '.join(BUILTIN_ADAPTERS)} or diffusers.<ModelClass>")


def architecture_of(network: nn.Module) -> tuple[str, dict[str, Any]]:
    """The architecture name and JSON config of a network accelkit knows how to rebuild."""
    if isinstance(network, MLP):
        return "accelkit.MLP", dict(network.config)
    if isinstance(network, SmallUNet):
        return "accelkit.SmallUNet", dict(network.config)
    if type(network).__module__.startswith("diffusers.") and hasattr(network, "config"):
        cfg = {k: v for k, v in dict(network.config).items() if not k.startswith("_")}
        return f"diffusers.{type(network).__name__}", json.loads(json.dumps(cfg, default=list))
    raise AccelkitError(f"cannot save a network of type {type(network).__name__}: expected accelkit.MLP, "
                        "accelkit.SmallUNet or a diffusers model")


@contextlib.contextmanager
def weights_to_be_loaded() -> Iterator[None]:
    """Build networks without their random initialisation, for weights that are all loaded right after.

    The ``torch.nn.init`` functions do nothing inside this block (large models build in a fraction of the time);
    :func:`load_state_dict_checked` then guarantees that every parameter and persistent buffer is overwritten.
    """
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(torch.nn.init, n))]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta") if _STRUCTURE_ONLY.get() else contextlib.nullcontext():
            yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


# ----------------------------------------------------------------------------------------------------------------
# Reading tensors


#: Inside :func:`structure_only`: safetensors files give meta tensors (shape and dtype from the header, no data read)
#: and networks are built on the meta device.
_STRUCTURE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("accelkit_structure_only", default=False)

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@contextlib.contextmanager
def structure_only() -> Iterator[None]:
    """Load what a checkpoint is (config, tensor names, shapes, dtypes) without reading its weights.

    What :func:`load_teacher` does with ``device="meta"`` (``accelkit inspect``): a multi-GB file costs its header.
    """
    token = _STRUCTURE_ONLY.set(True)
    try:
        yield
    finally:
        _STRUCTURE_ONLY.reset(token)


def _meta_tensor(f: Any, key: str) -> Tensor:
    part = f.get_slice(key)
    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
    return torch.empty(part.get_shape(), dtype=dtype, device="meta")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file; a damaged file is an AccelkitError.

    Inside :func:`structure_only` the tensors are meta tensors of the stored shapes and dtypes (no data is read).
    """
    from safetensors import SafetensorError, safe_open

    read = _meta_tensor if _STRUCTURE_ONLY.get() else (lambda f, k: f.get_tensor(k))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: read(f, k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AccelkitError(f"{path}: not a readable safetensors file ({_one_line(e)}); "
                            "expected a complete .safetensors file (truncated or corrupt?)") from e
    return tensors, meta


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Only the header metadata of a safetensors file (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise AccelkitError(f"{path}: not a readable safetensors file ({_one_line(e)}); "
                            "expected a complete .safetensors file (truncated or corrupt?)") from e


def pickle_refused(path: str | os.PathLike) -> AccelkitError:
    return AccelkitError(f"{path}: pickled checkpoint refused (unpickling can run code); convert it to .safetensors, "
                         "or pass --allow-pickle to read it with torch.load(weights_only=True)")


def read_pickle_state_dict(path: str | os.PathLike, allow_pickle: bool) -> dict[str, Tensor]:
    """A state dict from a pickled checkpoint, only with ``allow_pickle`` and only through ``weights_only=True``."""
    if not allow_pickle:
        raise pickle_refused(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        raise AccelkitError(f"{path}: could not read the pickled checkpoint with weights_only=True "
                            f"({_one_line(e)}); expected a plain state dict of tensors") from e
    for key in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not isinstance(obj.get(key), Tensor):
            if all(isinstance(v, Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise AccelkitError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def load_state_dict_checked(network: nn.Module, state: dict[str, Tensor], source: str | os.PathLike) -> None:
    """Load ``state`` into ``network`` after checking every key and shape against what the config built.

    The first missing, unexpected or mis-shaped key is reported with both shapes.
    """
    expected = network.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise AccelkitError(f"{source}: the weights do not match the config: missing key {key!r} "
                                f"(expected shape {tuple(ref.shape)})")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise AccelkitError(f"{source}: the weights do not match the config: key {key!r} has shape "
                                f"{tuple(state[key].shape)}, the config expects {tuple(ref.shape)}")
    for key in state:
        if key not in expected:
            raise AccelkitError(f"{source}: the weights do not match the config: unexpected key {key!r} "
                                f"(shape {tuple(state[key].shape)})")
    # meta tensors (structure_only) take the place of the parameters: nothing to copy
    network.load_state_dict(state, strict=True, assign=any(v.is_meta for v in state.values()))


def stored_dtype(state: dict[str, Tensor]) -> torch.dtype | None:
    """The floating-point dtype of a state dict when all its floating tensors share one, else None."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def move_network(network: nn.Module, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """Move/cast a network in place (plain ``nn.Module.to``: diffusers' override only adds a warning here)."""
    if dtype is not None and any(p.dtype != dtype for p in network.parameters()):
        nn.Module.to(network, dtype=dtype)
    if device is not None:
        nn.Module.to(network, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Small parsers for user overrides


def parse_prediction_type(value: str, source: str = "prediction type") -> str:
    """accelkit's name for a prediction type (accepts diffusers' ``epsilon``, ``v_prediction``, ``sample`` too)."""
    p = PREDICTION_ALIASES.get(value, value)
    if p not in PREDICTION_TYPES:
        raise AccelkitError(f"{source} {value!r}: expected one of {', '.join(PREDICTION_TYPES)} "
                            f"(or {', '.join(PREDICTION_ALIASES)})")
    return p


def parse_schedule(value: Schedule | str | dict[str, Any]) -> Schedule:
    """A schedule from a Schedule, a short name (``linear``, ``vp-linear``, ...), or a JSON config."""
    if isinstance(value, Schedule):
        return value
    try:
        if isinstance(value, dict):
            return schedule_from_config(value)
        if value.lstrip().startswith("{"):
            return schedule_from_config(json.loads(value))
        return schedule_from_name(value)
    except (ValueError, TypeError) as e:
        raise AccelkitError(f"schedule {value!r}: {_one_line(e)}") from e


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``fp16`` / ``bf16`` / ``fp32`` (or the torch names) as a torch dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
             "fp64": torch.float64, "float64": torch.float64}
    if value not in names:
        raise AccelkitError(f"dtype {value!r}: expected one of fp32, fp16, bf16")
    return names[value]


#: ``dtype="auto"``: float32 on the CPU, the stored dtype elsewhere (see :func:`auto_dtype`).
AUTO_DTYPE = "auto"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def auto_dtype(network: nn.Module, device: torch.device | str) -> torch.dtype | None:
    """The dtype a network runs in by default: half-precision weights (fp16, bf16) become float32 on the CPU, as
    diffusers' ``from_pretrained`` loads them (the CPU's half-precision kernels are many times slower and less
    accurate); on CUDA (and any other accelerator) the stored dtype is kept. None: keep the network as it is."""
    if torch.device(device).type != "cpu":
        return None
    dtypes = {p.dtype for p in network.parameters()} | {b.dtype for b in network.buffers() if b.is_floating_point()}
    return torch.float32 if dtypes & set(HALF_DTYPES) else None


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch device, or a one-line error when this machine does not have it (CUDA without a GPU or
    without a CUDA build of torch, a GPU index past the last, MPS off macOS)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AccelkitError(f"--device {device!r}: not a device; expected cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise AccelkitError(f"--device {device}: CUDA is not available on this machine ({why}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise AccelkitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise AccelkitError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return d


# ----------------------------------------------------------------------------------------------------------------
# accelkit's own single-file format


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        return None


def teacher_file_contents(teacher: NetworkTeacher) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the header metadata :func:`save_teacher` writes for ``teacher``."""
    if not isinstance(teacher, NetworkTeacher):
        raise AccelkitError(f"cannot save a {type(teacher).__name__} as a teacher file: expected a network teacher")
    architecture, net_config = architecture_of(teacher.network)
    tensors: dict[str, Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for k, v in teacher.network.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        tensors[k] = v.clone() if key in seen else v  # safetensors refuses tensors that share memory
        seen[key] = k
    if isinstance(teacher.null_condition, Condition):
        for k, v in teacher.null_condition.tensors().items():
            tensors[NULL_PREFIX + k] = v.detach().to("cpu").contiguous()
    info = {k: v for k, v in teacher.info.items() if k not in ("source", "format", "architecture", "conditioning",
                                                               "network_config")}
    info = {k: v for k, v in info.items() if _jsonable(v) is not None}
    meta = {
        "format": FORMAT,
        "accelkit_version": __version__,
        "architecture": architecture,
        "network_config": json.dumps(net_config, sort_keys=True),
        "prediction_type": teacher.prediction,
        "schedule": json.dumps(teacher.schedule.config(), sort_keys=True),
        "time_input": json.dumps(teacher.time_input.config(), sort_keys=True),
        "sample_shape": json.dumps(list(teacher.sample_shape)),
        "guidance_scale": repr(float(teacher.guidance_scale)),
        "info": json.dumps(info, sort_keys=True),
    }
    extra = header_value(teacher.network)
    if extra is not None:  # the student's extra inputs (accelkit.extra_inputs); weights under accelkit_extra.*
        meta[EXTRA_INPUTS_KEY] = extra
    return tensors, meta


def save_teacher(teacher: NetworkTeacher, path: str | os.PathLike) -> Path:
    """Write ``teacher`` as one accelkit ``.safetensors`` file, atomically (temp file in the same dir, fsync, rename).

    The header holds everything :func:`load_teacher` needs to rebuild it (see the module docstring).
    """
    from ..artifacts import save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = teacher_file_contents(teacher)
    save_safetensors(path, tensors, meta)
    return path


def _meta_json(meta: dict[str, str], key: str, path: str | os.PathLike) -> Any:
    if key not in meta:
        raise AccelkitError(f"{path}: {FORMAT_NAME} header lacks {key!r}; expected a file written by save_teacher")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise AccelkitError(f"{path}: header value {key!r} is not valid JSON ({e.msg})") from e


def is_accelkit_teacher_file(meta: dict[str, str]) -> bool:
    return meta.get("format", "").split("/")[0] == FORMAT_NAME


def load_accelkit_teacher(
    path: str | os.PathLike,
    *,
    prediction_type: str | None = None,
    schedule: Schedule | str | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> NetworkTeacher:
    """Load a file written by :func:`save_teacher` (on the CPU, in its stored dtype)."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise AccelkitError(f"{path}: format {meta.get('format')!r} is not supported by accelkit {__version__}; "
                            f"expected {FORMAT!r}")
    architecture = meta.get("architecture")
    if not architecture:
        raise AccelkitError(f"{path}: {FORMAT_NAME} header lacks 'architecture'")
    adapter = adapter_for(architecture, path)
    net_config = _meta_json(meta, "network_config", path)
    try:
        with weights_to_be_loaded():
            network = adapter.build(net_config)
    except (TypeError, ValueError) as e:
        raise AccelkitError(f"{path}: network_config does not build a {architecture} ({_one_line(e)})") from e
    null_tensors = {k.removeprefix(NULL_PREFIX): tensors.pop(k) for k in list(tensors) if k.startswith(NULL_PREFIX)}
    if EXTRA_INPUTS_KEY in meta:
        attach_to_network(network, inputs_from_header(meta[EXTRA_INPUTS_KEY], str(path)))
    move_network(network, dtype=stored_dtype(tensors))
    load_state_dict_checked(network, tensors, path)
    network.eval().requires_grad_(False)

    prediction = parse_prediction_type(prediction_type or meta.get("prediction_type", ""), f"{path}: prediction type")
    try:
        sched = parse_schedule(schedule) if schedule is not None else schedule_from_config(
            _meta_json(meta, "schedule", path))
        time_input = TimeInput(**_meta_json(meta, "time_input", path))
    except (TypeError, ValueError) as e:
        raise AccelkitError(f"{path}: bad schedule or time input in the header ({_one_line(e)})") from e
    shape = tuple(sample_shape) if sample_shape else tuple(_meta_json(meta, "sample_shape", path))
    null: NullCondition | None = adapter.null_condition(network)
    if null_tensors:
        null = _condition_from_tensors(null_tensors)
    info = _meta_json(meta, "info", path) if "info" in meta else {}
    info.update({"architecture": architecture, "format": meta["format"], "source": str(path),
                 "conditioning": adapter.conditioning(network), "network_config": net_config})
    guidance = float(meta.get("guidance_scale", "1.0"))
    call = ExtraInputCall(adapter.call) if EXTRA_INPUTS_KEY in meta else adapter.call
    return NetworkTeacher(network, call, prediction, sched, shape, time_input, guidance, null, info)


def _condition_from_tensors(tensors: dict[str, Tensor]) -> Condition:
    known = ("class_labels", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
    return Condition(**{k: v for k, v in tensors.items() if k in known},
                     extra={k: v for k, v in tensors.items() if k not in known})


# ----------------------------------------------------------------------------------------------------------------
# The one entry point


def load_teacher(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = AUTO_DTYPE,
    prediction_type: str | None = None,
    schedule: Schedule | str | None = None,
    guidance: float | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> Teacher:
    """Load a teacher from accelkit's own file, an accelkit artifact (a trained or a rescaled teacher), a diffusers
    folder or a single-file checkpoint.

    ``config``: the config.json (or a model or pipeline folder holding it) of a single-file diffusers state dict.
    ``prediction_type`` / ``schedule`` override (or, where the checkpoint has no scheduler config, supply) what the
    network predicts and its noise schedule. ``guidance``: the classifier-free guidance scale (1 = none).
    ``sample_shape`` overrides the shape of one sample (for networks whose config does not fix it).
    ``dtype``: ``auto`` (float32 on the CPU, the stored dtype on CUDA; :func:`auto_dtype`), None (as stored), or a
    dtype. ``device="meta"``: only the structure (config, shapes, stored dtypes), no weight is read
    (:func:`structure_only`); what ``accelkit inspect`` describes.
    """
    if str(device) == "meta" and not _STRUCTURE_ONLY.get():
        with structure_only():
            return load_teacher(path, config=config, allow_pickle=allow_pickle, device=device, dtype=None,
                                prediction_type=prediction_type, schedule=schedule, guidance=guidance,
                                sample_shape=sample_shape)
    if str(device) != "meta":
        check_device(device)
    if dtype != AUTO_DTYPE:
        parse_dtype(dtype)  # a bad --dtype is refused before anything is read
    p = Path(path)
    if not p.exists():
        raise AccelkitError(f"{path}: no such file or directory; expected a teacher checkpoint "
                            "(.safetensors file, diffusers model or pipeline folder, or accelkit artifact)")
    if prediction_type is not None:
        prediction_type = parse_prediction_type(prediction_type)
    if schedule is not None:
        schedule = parse_schedule(schedule)
    overrides = {"prediction_type": prediction_type, "schedule": schedule, "sample_shape": sample_shape}

    teacher: NetworkTeacher
    if p.is_dir():
        from ..stages.rescale import is_rescale_artifact, load_rescaled

        if is_rescale_artifact(p):
            if any(v is not None for v in overrides.values()) or config is not None:
                raise AccelkitError(f"{path}: a rescale artifact; its source's loading options are in its recipe, "
                                    "so --config, --prediction-type, --schedule and shape overrides do not apply")
            return load_rescaled(p, device=device, dtype=dtype, guidance=guidance)
        if (p / ARTIFACT_TEACHER_FILE).is_file():
            teacher = load_accelkit_teacher(p / ARTIFACT_TEACHER_FILE, **overrides)
        elif (p / "manifest.json").is_file() and not (p / "config.json").exists() \
                and not (p / "model_index.json").exists():
            raise AccelkitError(f"{path}: an accelkit {_artifact_kind(p)} artifact without {ARTIFACT_TEACHER_FILE}; "
                                "expected a teacher (a .safetensors file, a diffusers folder, or an artifact holding "
                                f"{ARTIFACT_TEACHER_FILE})")
        else:
            from .diffusers_models import load_diffusers_folder

            teacher = load_diffusers_folder(p, allow_pickle=allow_pickle, **overrides)
    elif p.suffix == ".safetensors":
        meta = read_safetensors_metadata(p)
        if is_accelkit_teacher_file(meta):
            teacher = load_accelkit_teacher(p, **overrides)
        elif meta.get("format") == "accelkit.lora/1":  # a LoRA student: its base teacher + the factors
            from ..export.lora import load_lora_teacher

            return load_lora_teacher(p, device=device, dtype=dtype, guidance=guidance)
        elif _is_original_layout(p, meta):  # an original SD 1.x / 2.x / XL file (accelkit.models.original_layout)
            from .original_layout import load_original_teacher

            teacher = load_original_teacher(p, config, **overrides)
        elif config is not None:
            from .diffusers_models import load_diffusers_single_file

            teacher = load_diffusers_single_file(p, config, allow_pickle=allow_pickle, **overrides)
        elif meta.get("format", "").startswith("accelkit."):
            raise AccelkitError(f"{path}: an {meta['format']} file, not a teacher; expected {FORMAT}")
        else:
            raise AccelkitError(f"{path}: no {FORMAT} metadata in the header and no original Stable Diffusion keys "
                                "(model.diffusion_model.*): unknown single-file layout; for a diffusers-layout "
                                "state dict pass --config naming its config.json (or its model or pipeline folder)")
    elif p.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise pickle_refused(p)
        if config is None:
            raise AccelkitError(f"{path}: a pickled state dict carries no architecture; pass --config naming its "
                                "config.json (or its model or pipeline folder)")
        from .diffusers_models import load_diffusers_single_file

        teacher = load_diffusers_single_file(p, config, allow_pickle=allow_pickle, **overrides)
    else:
        raise AccelkitError(f"{path}: unknown checkpoint type {p.suffix or '(no suffix)'!r}; expected .safetensors, "
                            "a diffusers model or pipeline folder, an accelkit artifact, or (with --allow-pickle) "
                            f"{', '.join(PICKLE_SUFFIXES)}")

    dt = auto_dtype(teacher.network, device) if dtype == AUTO_DTYPE else parse_dtype(dtype)
    move_network(teacher.network, device=device, dtype=dt)
    if guidance is not None:
        teacher.guidance_scale = float(guidance)
    return rescaled_if_recorded(teacher)


def _is_original_layout(path: Path, meta: dict[str, str]) -> bool:
    """Whether a safetensors file without an accelkit header is an original (LDM-layout) checkpoint."""
    if meta.get("format", "").startswith("accelkit."):
        return False
    from .original_layout import original_layout_of

    return original_layout_of(path) is not None


def rescaled_if_recorded(teacher: NetworkTeacher) -> Teacher:
    """A rescaled teacher exported by ``accelkit export`` records its sampling schedule as ``rescaled_to`` in its
    info: the network under :class:`accelkit.teacher.RescaledTeacher` to that schedule; other teachers as they are."""
    target = teacher.info.get("rescaled_to")
    if not target:
        return teacher
    from ..teacher import RescaledTeacher

    try:
        schedule = schedule_from_config(target)
    except (TypeError, ValueError) as e:
        raise AccelkitError(f"{teacher.info.get('source')}: recorded rescaled_to schedule {target!r} is not valid "
                            f"({_one_line(e)})") from e
    teacher.info = {k: v for k, v in teacher.info.items() if k != "rescaled_to"}
    return RescaledTeacher(teacher, schedule)


def as_teacher(obj: Teacher | str | os.PathLike, **kwargs: Any) -> Teacher:
    """A teacher object as is, or a path loaded with :func:`load_teacher`."""
    return obj if isinstance(obj, Teacher) else load_teacher(obj, **kwargs)


def _artifact_kind(folder: Path) -> str:
    try:
        kind = json.loads((folder / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    return str(kind) if kind else "(unknown kind)"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


__all__ = [
    "FORMAT", "ARTIFACT_TEACHER_FILE", "NetworkAdapter", "adapter_for", "architecture_of", "save_teacher",
    "load_teacher", "load_accelkit_teacher", "read_safetensors", "read_pickle_state_dict", "load_state_dict_checked",
    "parse_prediction_type", "parse_schedule", "parse_dtype", "as_teacher", "auto_dtype", "check_device",
    "structure_only", "AUTO_DTYPE",
]
