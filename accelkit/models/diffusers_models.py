"""diffusers models as accelkit teachers: one adapter per model family, scheduler configs as schedules.

Supported model families (the ``_class_name`` of a model's config.json):

* ``UNet2DModel``            pixel-space UNets (DDPM, DDIM pipelines); optional class labels.
* ``UNet2DConditionModel``   text-conditioned UNets (Stable Diffusion 1.x/2.x layout): ``encoder_hidden_states``
                             (+ ``encoder_attention_mask``), optional class labels; SDXL's added conditioning
                             (``addition_embed_type="text_time"``): ``pooled_projections`` as ``text_embeds`` and
                             ``extra["time_ids"]`` (size / crop numbers) in ``added_cond_kwargs``.
* ``DiTTransformer2DModel``  class-conditional DiT (Peebles & Xie 2023); the null class is ``num_embeds_ada_norm``.
* ``SD3Transformer2DModel``  MMDiT of Stable Diffusion 3: ``encoder_hidden_states`` + ``pooled_projections``.

Networks that also predict a variance (``out_channels = 2 in_channels``, "learned sigma") keep the first half of
the channels, the mean prediction. Classifier-free guidance contrasts with the null class (class models) or with
zero text embeddings of the same length as the conditional ones (text models), unless the user gives a null.

Scheduler configs map to accelkit schedules:

* every DDPM-family scheduler (DDPM, DDIM, PNDM, DPM-Solver, Euler, Heun, LMS, UniPC, DEIS, ...; any config with a
  ``beta_schedule``) -> :class:`accelkit.schedules.DiscreteVPSchedule` with the same betas, the network taking
  the discrete timestep k = t N - 1; ``prediction_type`` epsilon / v_prediction / sample -> eps / v / x0.
* ``FlowMatchEulerDiscreteScheduler`` (and DPM-Solver with ``use_flow_sigmas``) -> :class:`LinearSchedule`,
  ``flow`` prediction (eps - x0), the network taking 1000 sigma = 1000 t; its ``shift`` is a choice of sampling
  times, not of the model, and is recorded in the teacher's info.

Only local files are read (``local_files_only``); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AccelkitError
from ..schedules import DiscreteVPSchedule, LinearSchedule, Schedule
from ..teacher import Condition, NetworkTeacher, TimeInput
from .loading import (
    NetworkAdapter,
    NullCondition,
    load_state_dict_checked,
    move_network,
    parse_prediction_type,
    pickle_refused,
    read_pickle_state_dict,
    read_safetensors,
    stored_dtype,
    weights_to_be_loaded,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: never reach the hub

WEIGHTS_NAME = "diffusion_pytorch_model"
#: Pipeline components that hold the denoising network, in order of preference.
DENOISER_COMPONENTS = ("unet", "transformer")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# ----------------------------------------------------------------------------------------------------------------
# Network calls (NetworkFn: network, x, timestep input, condition -> output)


def _run(network: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    """Call a diffusers model in its own dtype; return the mean prediction (first C channels) in x's dtype."""
    dtype = next(network.parameters()).dtype
    kwargs = {k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() and k != "timestep" else v)
              for k, v in kwargs.items()}
    out = network(x.to(dtype), return_dict=False, **kwargs)[0]
    if out.shape[1] != x.shape[1]:  # learned variance: [mean, variance] along channels
        out = out[:, : x.shape[1]]
    return out.to(x.dtype)


def _has_class_embedding(network: nn.Module) -> bool:
    return getattr(network, "class_embedding", None) is not None


def _unet2d_call(network: nn.Module, x: Tensor, timestep: Tensor, cond: Condition | None) -> Tensor:
    labels = cond.class_labels if cond is not None and _has_class_embedding(network) else None
    if _has_class_embedding(network) and labels is None:
        raise AccelkitError("this UNet2DModel is class-conditional: give class labels")
    return _run(network, x, timestep=timestep, class_labels=labels)


def _text_dim(config: dict[str, Any]) -> int:
    """The width of the text embeddings a UNet2DConditionModel takes."""
    dim = config.get("encoder_hid_dim") or config.get("cross_attention_dim")
    if isinstance(dim, list | tuple):
        dim = dim[0]
    return int(dim)


def _unet2d_condition_call(network: nn.Module, x: Tensor, timestep: Tensor, cond: Condition | None) -> Tensor:
    b = x.shape[0]
    cond = cond or Condition()
    ehs = cond.encoder_hidden_states
    if ehs is None:  # unconditional: one zero token (all-equal tokens give the same cross-attention as any number)
        ehs = torch.zeros(b, 1, _text_dim(network.config), device=x.device)
    kwargs: dict[str, Any] = {"timestep": timestep, "encoder_hidden_states": ehs}
    if cond.encoder_attention_mask is not None:
        kwargs["encoder_attention_mask"] = cond.encoder_attention_mask
    if _has_class_embedding(network):
        if cond.class_labels is None:
            raise AccelkitError("this UNet2DConditionModel is also class-conditional: give class labels")
        kwargs["class_labels"] = cond.class_labels
    if network.config.get("addition_embed_type") == "text_time":  # SDXL-style added conditioning
        if cond.pooled_projections is None or "time_ids" not in cond.extra:
            raise AccelkitError("this UNet2DConditionModel takes added conditioning: give pooled_projections "
                                "(text_embeds) and time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled_projections, "time_ids": cond.extra["time_ids"]}
    return _run(network, x, **kwargs)


def _dit_call(network: nn.Module, x: Tensor, timestep: Tensor, cond: Condition | None) -> Tensor:
    labels = cond.class_labels if cond is not None else None
    if labels is None:  # unconditional: the null class
        labels = torch.full((x.shape[0],), int(network.config.num_embeds_ada_norm), device=x.device)
    return _run(network, x, timestep=timestep, class_labels=labels.long())


def _sd3_call(network: nn.Module, x: Tensor, timestep: Tensor, cond: Condition | None) -> Tensor:
    b, cfg = x.shape[0], network.config
    cond = cond or Condition()
    ehs = cond.encoder_hidden_states
    if ehs is None:
        ehs = torch.zeros(b, 1, int(cfg.joint_attention_dim), device=x.device)
    pooled = cond.pooled_projections
    if pooled is None:
        pooled = torch.zeros(b, int(cfg.pooled_projection_dim), device=x.device)
    return _run(network, x, timestep=timestep, encoder_hidden_states=ehs, pooled_projections=pooled)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning descriptions and null conditions


def zero_text_null(cond: Condition) -> Condition:
    """The null of a text condition: zero embeddings (and pooled embeddings) of the same shapes; the rest kept."""
    return Condition(
        class_labels=cond.class_labels,
        encoder_hidden_states=None if cond.encoder_hidden_states is None else torch.zeros_like(
            cond.encoder_hidden_states),
        encoder_attention_mask=None if cond.encoder_attention_mask is None else torch.ones_like(
            cond.encoder_attention_mask),
        pooled_projections=None if cond.pooled_projections is None else torch.zeros_like(cond.pooled_projections),
        extra=dict(cond.extra),
    )


def _unet2d_conditioning(network: nn.Module) -> dict[str, Any]:
    cfg = network.config
    if not _has_class_embedding(network):
        return {"kind": "none"}
    n = cfg.get("num_class_embeds")
    return {"kind": "class", "num_classes": n, "null_class": None, "class_embed_type": cfg.get("class_embed_type")}


def _unet2d_condition_conditioning(network: nn.Module) -> dict[str, Any]:
    cfg = network.config
    d: dict[str, Any] = {"kind": "text", "embedding_dim": _text_dim(cfg), "null": "zero embeddings"}
    if _has_class_embedding(network):
        d["num_classes"] = cfg.get("num_class_embeds")
    if cfg.get("addition_embed_type"):
        d["addition_embed_type"] = cfg.get("addition_embed_type")
    if cfg.get("addition_embed_type") == "text_time" and cfg.get("projection_class_embeddings_input_dim"):
        # SDXL: the added embedding takes the pooled text embeddings and 6 size / crop numbers (time_ids)
        d["pooled_dim"] = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(
            cfg.get("addition_time_embed_dim") or 0)
        d["time_ids"] = 6
    return d


def _dit_conditioning(network: nn.Module) -> dict[str, Any]:
    n = int(network.config.num_embeds_ada_norm)
    return {"kind": "class", "num_classes": n, "null_class": n}


def _sd3_conditioning(network: nn.Module) -> dict[str, Any]:
    cfg = network.config
    return {"kind": "text", "embedding_dim": int(cfg.joint_attention_dim),
            "pooled_dim": int(cfg.pooled_projection_dim), "null": "zero embeddings"}


def _image_shape(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    size = cfg.get("sample_size")
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg.get("in_channels", 3)), int(h), int(w))


#: The families: model class -> (call, conditioning, null condition).
FAMILIES: dict[str, tuple[Callable, Callable, Callable[[nn.Module], NullCondition | None]]] = {
    "UNet2DModel": (_unet2d_call, _unet2d_conditioning, lambda net: None),
    "UNet2DConditionModel": (_unet2d_condition_call, _unet2d_condition_conditioning, lambda net: zero_text_null),
    "DiTTransformer2DModel": (
        _dit_call, _dit_conditioning,
        lambda net: Condition(class_labels=torch.tensor([int(net.config.num_embeds_ada_norm)]))),
    "SD3Transformer2DModel": (_sd3_call, _sd3_conditioning, lambda net: zero_text_null),
}


def diffusers_adapter(class_name: str, source: str | os.PathLike = "") -> NetworkAdapter:
    """The adapter of a diffusers model class (``UNet2DModel``, ``UNet2DConditionModel``, ...)."""
    if class_name not in FAMILIES:
        where = f"{source}: " if source else ""
        raise AccelkitError(f"{where}unknown architecture {class_name!r}: expected one of {', '.join(FAMILIES)}")
    call, conditioning, null = FAMILIES[class_name]

    def build(config: dict[str, Any]) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, class_name)
        try:
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise AccelkitError(f"{source}: config does not build a {class_name} ({' '.join(str(e).split())})") from e

    return NetworkAdapter(f"diffusers.{class_name}", build, call, conditioning, null, _image_shape)


# ----------------------------------------------------------------------------------------------------------------
# Scheduler configs


def schedule_from_scheduler_config(
    cfg: dict[str, Any], source: str | os.PathLike
) -> tuple[str, Schedule, TimeInput, dict[str, Any]]:
    """(prediction type, schedule, time input, info) of a diffusers scheduler config."""
    name = cfg.get("_class_name", "?")
    info: dict[str, Any] = {"scheduler": name}
    if name == "AccelkitScheduler":
        return _accelkit_scheduler_config(cfg, source, info)
    flow = name.startswith("FlowMatch") or bool(cfg.get("use_flow_sigmas"))
    if flow:
        n = int(cfg.get("num_train_timesteps", 1000))
        shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
        info["shift"] = float(shift if shift is not None else 1.0)
        if cfg.get("use_dynamic_shifting"):
            info["dynamic_shift"] = {k: cfg.get(k) for k in ("base_shift", "max_shift", "base_image_seq_len",
                                                              "max_image_seq_len")}
        pred = cfg.get("prediction_type", "flow_prediction") if not name.startswith("FlowMatch") else "flow"
        return parse_prediction_type(pred, f"{source}: prediction_type"), LinearSchedule(), \
            TimeInput("scaled", n, float(n)), info
    if "beta_schedule" not in cfg:
        raise AccelkitError(f"{source}: scheduler {name} is not supported; expected a DDPM-family scheduler "
                            "(with beta_schedule) or FlowMatchEulerDiscreteScheduler")
    if cfg.get("trained_betas") is not None:
        raise AccelkitError(f"{source}: trained_betas are not supported; expected beta_schedule one of "
                            f"{', '.join(BETA_SCHEDULES)}")
    if cfg.get("rescale_betas_zero_snr"):
        raise AccelkitError(f"{source}: rescale_betas_zero_snr=true (zero terminal SNR) is not supported yet")
    if cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise AccelkitError(f"{source}: beta_schedule {cfg['beta_schedule']!r} is not supported; expected one of "
                            f"{', '.join(BETA_SCHEDULES)}")
    n = int(cfg.get("num_train_timesteps", 1000))
    schedule = DiscreteVPSchedule(cfg["beta_schedule"], n, float(cfg.get("beta_start", 0.0001)),
                                  float(cfg.get("beta_end", 0.02)))
    pred = parse_prediction_type(cfg.get("prediction_type", "epsilon"), f"{source}: prediction_type")
    return pred, schedule, TimeInput("discrete", n), info


def _accelkit_scheduler_config(
    cfg: dict[str, Any], source: str | os.PathLike, info: dict[str, Any]
) -> tuple[str, Schedule, TimeInput, dict[str, Any]]:
    """The network of an ``accelkit export`` folder (AccelkitScheduler's ``sampler`` record): its prediction type,
    schedule and time input; the sampler, and the schedule it samples under when the export is a rescaled teacher
    (``rescaled_to`` in the info: :func:`accelkit.models.loading.load_teacher` wraps it)."""
    from ..schedules import schedule_from_config

    sampler = cfg.get("sampler") or {}
    network = sampler.get("network") or {}
    try:
        schedule = schedule_from_config(network["schedule"])
        time_input = TimeInput(**network["time_input"])
        pred = parse_prediction_type(network["prediction_type"], f"{source}: prediction_type")
        sampling_schedule = schedule_from_config(sampler.get("schedule") or network["schedule"])
    except (KeyError, TypeError, ValueError) as e:
        raise AccelkitError(f"{source}: AccelkitScheduler config lacks a valid sampler.network record ({e}); "
                            "expected a folder written by accelkit export") from e
    info["sampling"] = {k: sampler.get(k) for k in ("solver", "nfe", "grid", "grid_name") if k in sampler}
    if sampling_schedule != schedule:
        info["rescaled_to"] = sampling_schedule.config()
    return pred, schedule, time_input, info


# ----------------------------------------------------------------------------------------------------------------
# Files and folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise AccelkitError(f"{path}: cannot read ({e})") from e
    except json.JSONDecodeError as e:
        raise AccelkitError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise AccelkitError(f"{path}: expected a JSON object")
    return data


def _pipeline_parts(folder: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """(model folder, scheduler config or None, info) of a pipeline folder with model_index.json."""
    index = _read_json(folder / "model_index.json")
    comp = next((c for c in DENOISER_COMPONENTS if c in index and (folder / c).is_dir()), None)
    if comp is None:
        raise AccelkitError(f"{folder}: pipeline has no {' or '.join(c + '/' for c in DENOISER_COMPONENTS)} "
                            "component; expected a diffusion pipeline folder")
    sched = folder / "scheduler" / "scheduler_config.json"
    info = {"pipeline": index.get("_class_name"), "component": comp}
    if "vae" in index and (folder / "vae").is_dir():
        info["latent"] = True
        info["vae"] = str(folder / "vae")
    return folder / comp, (sched if sched.is_file() else None), info


def _resolve_config(config: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """(model config.json, scheduler config or None, info) from a config file, model folder or pipeline folder."""
    if not config.exists():
        raise AccelkitError(f"{config}: no such config file or folder; expected a config.json or a diffusers folder")
    info: dict[str, Any] = {}
    if config.is_dir():
        if (config / "model_index.json").is_file():
            model_dir, sched, info = _pipeline_parts(config)
            return model_dir / "config.json", sched, info
        if not (config / "config.json").is_file():
            raise AccelkitError(f"{config}: not a model folder: expected config.json or model_index.json in it")
        config = config / "config.json"
    # a model folder inside a pipeline folder: use the pipeline's scheduler
    parent = config.parent.parent
    sched = parent / "scheduler" / "scheduler_config.json"
    if (parent / "model_index.json").is_file() and sched.is_file():
        return config, sched, {"component": config.parent.name}
    return config, None, info


def _weights_file(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight file(s) of a diffusers model folder: safetensors (plain, sharded, or a single variant), or .bin."""
    plain = folder / f"{WEIGHTS_NAME}.safetensors"
    if plain.is_file():
        return [plain]
    index = folder / f"{WEIGHTS_NAME}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise AccelkitError(f"{index}: shard {missing[0] if missing else '(none listed)'} is missing")
        return [folder / s for s in shards]
    variants = sorted(folder.glob(f"{WEIGHTS_NAME}.*.safetensors"))
    if len(variants) == 1:
        return variants
    if len(variants) > 1:
        raise AccelkitError(f"{folder}: several weight variants ({', '.join(v.name for v in variants)}); "
                            "pass one of them as the checkpoint with --config pointing at this folder")
    binary = folder / f"{WEIGHTS_NAME}.bin"
    if binary.is_file():
        if not allow_pickle:
            raise pickle_refused(binary)
        return [binary]
    raise AccelkitError(f"{folder}: no weights: expected {WEIGHTS_NAME}.safetensors (or a sharded index) "
                        "next to config.json")


def _state_dict(files: list[Path], allow_pickle: bool) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(read_safetensors(f)[0])
        else:
            state.update(read_pickle_state_dict(f, allow_pickle))
    return state


def _build_teacher(
    weights: list[Path],
    config_path: Path,
    scheduler_path: Path | None,
    info: dict[str, Any],
    *,
    allow_pickle: bool,
    prediction_type: str | None,
    schedule: Schedule | None,
    sample_shape: tuple[int, ...] | None,
    state: dict[str, Tensor] | None = None,
) -> NetworkTeacher:
    """The teacher of a model config and its weights (the files ``weights``, or ``state`` already in diffusers'
    key layout, e.g. converted from an original single file)."""
    cfg = _read_json(config_path)
    class_name = cfg.get("_class_name")
    if not class_name:
        raise AccelkitError(f"{config_path}: no _class_name; expected a diffusers model config.json")
    adapter = diffusers_adapter(class_name, config_path)
    source = weights[0] if len(weights) == 1 else weights[0].parent

    # what the network predicts and under which schedule: the scheduler config, or the user
    if scheduler_path is not None:
        pred, sched, time_input, sched_info = schedule_from_scheduler_config(_read_json(scheduler_path),
                                                                             scheduler_path)
        info = {**info, **sched_info}
        if schedule is not None:
            sched, time_input = schedule, _time_input_for(schedule)
        pred = prediction_type or pred
    else:
        if prediction_type is None or schedule is None:
            raise AccelkitError(f"{source}: no scheduler config (scheduler/scheduler_config.json), so the prediction "
                                "type and schedule are unknown; pass --prediction-type and --schedule")
        pred, sched, time_input = prediction_type, schedule, _time_input_for(schedule)

    state = _state_dict(weights, allow_pickle) if state is None else state
    with weights_to_be_loaded():
        network = adapter.build(cfg)
    move_network(network, dtype=stored_dtype(state))
    load_state_dict_checked(network, state, source)
    network.eval().requires_grad_(False)

    shape = tuple(sample_shape) if sample_shape else adapter.sample_shape(cfg)
    if shape is None:
        raise AccelkitError(f"{config_path}: no sample_size in the config; pass the sample shape")
    info = {**info, "architecture": adapter.architecture, "format": "diffusers", "source": str(source),
            "conditioning": adapter.conditioning(network)}
    return NetworkTeacher(network, adapter.call, pred, sched, shape, time_input, 1.0, adapter.null_condition(network),
                          info)


def _time_input_for(schedule: Schedule) -> TimeInput:
    """A user-given schedule's time input: DDPM steps for discrete VP, 1000 t for the flow-matching linear one."""
    if isinstance(schedule, LinearSchedule):
        return TimeInput("scaled", 1000, 1000.0)
    return TimeInput.for_schedule(schedule)


def _bare_component(folder: Path) -> str | None:
    """The one denoiser subfolder (unet/ or transformer/ with config.json) of a folder without model_index.json."""
    found = [c for c in DENOISER_COMPONENTS if (folder / c / "config.json").is_file()]
    return found[0] if len(found) == 1 else None


def load_diffusers_folder(
    folder: Path,
    *,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    schedule: Schedule | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> NetworkTeacher:
    """A teacher from a diffusers pipeline folder (model_index.json) or model folder (config.json)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        model_dir, sched, info = _pipeline_parts(folder)
        config = model_dir / "config.json"
        if not config.is_file():
            raise AccelkitError(f"{model_dir}: no config.json; expected a diffusers model folder")
    elif (folder / "config.json").is_file():
        config, sched, info = _resolve_config(folder / "config.json")
        model_dir = folder
    elif (comp := _bare_component(folder)) is not None:  # e.g. accelkit export of a model no pipeline runs
        model_dir, config = folder / comp, folder / comp / "config.json"
        sched_path = folder / "scheduler" / "scheduler_config.json"
        sched, info = (sched_path if sched_path.is_file() else None), {"component": comp}
    else:
        hint = " (this is a scheduler folder)" if (folder / "scheduler_config.json").is_file() else ""
        raise AccelkitError(f"{folder}: not a model{hint}: expected a diffusers model folder (config.json + weights), "
                            "a pipeline folder (model_index.json), or an accelkit artifact (teacher.safetensors)")
    return _build_teacher(_weights_file(model_dir, allow_pickle), config, sched, info, allow_pickle=allow_pickle,
                          prediction_type=prediction_type, schedule=schedule, sample_shape=sample_shape)


def load_diffusers_single_file(
    path: Path,
    config: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    schedule: Schedule | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> NetworkTeacher:
    """A teacher from one diffusers-layout state dict file and ``config``: its config.json, or a model or pipeline
    folder holding one (a pipeline folder also gives the scheduler)."""
    config_path, sched, info = _resolve_config(Path(config))
    return _build_teacher([Path(path)], config_path, sched, info, allow_pickle=allow_pickle,
                          prediction_type=prediction_type, schedule=schedule, sample_shape=sample_shape)


# ----------------------------------------------------------------------------------------------------------------
# Latent pipelines: the VAE decoder

VAE_CLASSES = ("AutoencoderKL",)


def load_vae(folder: str | os.PathLike, *, allow_pickle: bool = False,
             config: str | os.PathLike | None = None) -> nn.Module:
    """The VAE of a latent pipeline (``vae/`` folder: config.json + weights), checked like a denoiser; or the VAE
    inside an original single-file checkpoint (``config``: its vae/ config folder, default the shipped one)."""
    folder = Path(folder)
    if folder.is_file():
        from .original_layout import load_original_vae

        return load_original_vae(folder, config)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise AccelkitError(f"{folder}: no config.json; expected a diffusers VAE folder")
    cfg = _read_json(config_path)
    name = cfg.get("_class_name")
    if name not in VAE_CLASSES:
        raise AccelkitError(f"{config_path}: VAE class {name!r} is not supported; expected {', '.join(VAE_CLASSES)}")
    import diffusers

    try:
        with weights_to_be_loaded():
            vae = getattr(diffusers, name).from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError) as e:
        raise AccelkitError(f"{config_path}: config does not build a {name} ({' '.join(str(e).split())})") from e
    weights = _weights_file(folder, allow_pickle)
    state = _state_dict(weights, allow_pickle)
    move_network(vae, dtype=stored_dtype(state))
    load_state_dict_checked(vae, state, weights[0])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor, batch_size: int = 8) -> Tensor:
    """Images in [-1, 1] from latents: vae.decode(z / scaling_factor + shift_factor), in batches, float32."""
    scale = float(vae.config.get("scaling_factor") or 1.0)
    shift = float(vae.config.get("shift_factor") or 0.0)
    param = next(vae.parameters())
    out = []
    for z in latents.split(batch_size):
        z = (z.to(param.device, param.dtype) / scale) + shift
        out.append(vae.decode(z, return_dict=False)[0].float().cpu())
    return torch.cat(out)


__all__ = ["FAMILIES", "diffusers_adapter", "schedule_from_scheduler_config", "zero_text_null",
           "load_diffusers_folder", "load_diffusers_single_file", "load_vae", "decode_latents"]
