"""Original (LDM-layout) single-file Stable Diffusion checkpoints: SD 1.x, SD 2.x and SDXL ``.safetensors`` files.

The files most people download from a model hub are the state dict of the original latent-diffusion code (Rombach
et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"; SDXL: Podell et al. 2023), every
component in one file under its original module path:

=================================  ==============================================================
key prefix                         component
=================================  ==============================================================
``model.diffusion_model.``         the UNet (``input_blocks``, ``middle_block``, ``output_blocks``)
``first_stage_model.``             the VAE (``encoder.down``, ``decoder.up``, ``quant_conv``)
``cond_stage_model.transformer.``  SD 1.x text encoder: CLIP ViT-L/14 (transformers' key names)
``cond_stage_model.model.``        SD 2.x text encoder: OpenCLIP ViT-H/14
``conditioner.embedders.0.``       SDXL first text encoder: CLIP ViT-L/14
``conditioner.embedders.1.``       SDXL second text encoder: OpenCLIP ViT-bigG/14 (pooled output)
=================================  ==============================================================

:func:`detect_original_layout` reads only the key names and a few shapes (the header): the family is SDXL when the
UNet has the ``label_emb`` added-conditioning MLP or the file holds the second (OpenCLIP bigG) encoder, SD 2.x when
the text encoder is OpenCLIP or the cross-attention context is 1024 wide, SD 1.x when it is CLIP or 768 wide.

The keys are converted to diffusers' layout by diffusers' own single-file conversion functions (the ones
``StableDiffusionPipeline.from_single_file`` runs: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``create_diffusers_clip_model_from_ldm``), with the configs accelkit ships in ``accelkit/models/configs/<family>/``
(a diffusers pipeline folder without weights: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``scheduler/``; written from the published architectures) or the pipeline folder the user names with ``--config``
(for fine-tunes of other sizes). Nothing is fetched from a hub. The converted tensors are then loaded with
:func:`accelkit.models.loading.load_state_dict_checked`, so a config that does not fit the file is a one-line error
naming the first key that disagrees, and :func:`accelkit.models.loading.structure_only` (``accelkit inspect``)
reads the header only.

Tokenizers are not inside single files: prompts need a pipeline folder (see :func:`tokenizer_missing`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import AccelkitError

#: The family folders shipped in accelkit/models/configs/.
CONFIGS_DIR = Path(__file__).parent / "configs"
FAMILIES = {"sd15": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: key prefix -> (pipeline component, encoder kind)
TEXT_ENCODER_PREFIXES = {
    "cond_stage_model.transformer.": ("text_encoder", "CLIP"),
    "cond_stage_model.model.": ("text_encoder", "OpenCLIP"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "CLIP"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "OpenCLIP"),
}
#: The key every original UNet has (its first convolution), and the added-conditioning MLP only SDXL's has.
UNET_MARKER = UNET_PREFIX + "input_blocks.0.0.weight"
SDXL_MARKER = UNET_PREFIX + "label_emb.0.0.weight"
#: Original files of other denoisers, recognised only to refuse them by name.
OTHER_ORIGINAL_MARKERS = {UNET_PREFIX + "joint_blocks.": "an SD3-style MMDiT", "double_blocks.": "a Flux transformer",
                          UNET_PREFIX + "double_blocks.": "a Flux transformer"}
#: Cross-attention context width -> family, for files without their text encoders.
CONTEXT_WIDTHS = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
LAYOUT = "ldm"
FORMAT = "original single file (LDM layout)"


@dataclass(frozen=True)
class OriginalLayout:
    """What an original single file holds: its family (``sd15`` / ``sd2`` / ``sdxl``, or None when the keys do not
    tell) and its components (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) with their key counts."""

    family: str | None
    components: dict[str, int] = field(default_factory=dict)
    text_encoders: dict[str, str] = field(default_factory=dict)
    context_width: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"layout": LAYOUT, "family": self.family, "family_name": FAMILIES.get(self.family or ""),
                "components": sorted(self.components), "text_encoders": dict(self.text_encoders)}


def _context_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The width of the text context the UNet's cross-attention takes (the in-features of its first attn2.to_k)."""
    keys = sorted(k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return int(shapes[keys[0]][-1]) if keys else None


def detect_original_layout(shapes: dict[str, tuple[int, ...]]) -> OriginalLayout | None:
    """The original layout of a state dict given its key names and shapes, or None when it is not one.

    Another original denoiser (SD3, Flux) is an AccelkitError naming it.
    """
    for marker, what in OTHER_ORIGINAL_MARKERS.items():
        if any(k.startswith(marker) for k in shapes):
            raise AccelkitError(f"{what} original single file: accelkit reads original checkpoints of the "
                                "Stable Diffusion UNets (SD 1.x, 2.x, XL); convert it to a diffusers folder")
    if UNET_MARKER not in shapes:
        return None
    components: dict[str, int] = {}
    encoders: dict[str, str] = {}
    for key in shapes:
        if key.startswith(UNET_PREFIX):
            components["unet"] = components.get("unet", 0) + 1
        elif key.startswith(VAE_PREFIX):
            components["vae"] = components.get("vae", 0) + 1
        else:
            for prefix, (name, kind) in TEXT_ENCODER_PREFIXES.items():
                if key.startswith(prefix):
                    components[name] = components.get(name, 0) + 1
                    encoders[name] = kind
    width = _context_width(shapes)
    if SDXL_MARKER in shapes or "text_encoder_2" in components:
        family: str | None = "sdxl"
    elif encoders.get("text_encoder") == "OpenCLIP":
        family = "sd2"
    elif encoders.get("text_encoder") == "CLIP":
        family = "sd15"
    else:
        family = CONTEXT_WIDTHS.get(width or 0)
    return OriginalLayout(family, components, encoders, width)


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of a safetensors file, from its header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AccelkitError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:300]}); "
                            "expected a complete .safetensors file (truncated or corrupt?)") from e


def original_layout_of(path: str | os.PathLike) -> OriginalLayout | None:
    """:func:`detect_original_layout` of a safetensors file's header."""
    try:
        return detect_original_layout(header_shapes(path))
    except AccelkitError as e:
        raise AccelkitError(f"{path}: {e}") from None


def config_folder(path: str | os.PathLike, layout: OriginalLayout, config: str | os.PathLike | None) -> Path:
    """The pipeline config folder for an original file: the user's ``--config`` (a diffusers pipeline folder:
    model_index.json + unet/config.json, weights not needed), else the one accelkit ships for its family."""
    if config is not None:
        folder = Path(config)
        if not (folder / "model_index.json").is_file() or not (folder / "unet" / "config.json").is_file():
            raise AccelkitError(f"--config {config}: for an original single-file checkpoint, expected a diffusers "
                                "pipeline folder (model_index.json and unet/config.json; weights are not needed)")
        return folder
    if layout.family is None:
        width = f"cross-attention context of width {layout.context_width}" if layout.context_width else \
            "no cross-attention"
        raise AccelkitError(f"{path}: an original (LDM-layout) UNet of unknown family ({width}; accelkit ships "
                            f"configs for {', '.join(FAMILIES)}): pass --config naming a diffusers pipeline folder "
                            "with its model_index.json and unet/config.json")
    return CONFIGS_DIR / layout.family


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AccelkitError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(data, dict):
        raise AccelkitError(f"{path}: expected a JSON object")
    return data


def _quiet_diffusers() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def unet_state_dict(checkpoint: dict[str, Tensor], unet_config: dict[str, Any]) -> dict[str, Tensor]:
    """The UNet's tensors under diffusers' names (diffusers' ``convert_ldm_unet_checkpoint``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _quiet_diffusers()
    try:
        return convert_ldm_unet_checkpoint(checkpoint, unet_config)
    except (KeyError, IndexError, ValueError) as e:
        raise AccelkitError(f"the original UNet keys do not fit its config (missing {e}); expected a complete "
                            "SD 1.x / 2.x / XL UNet") from None


def vae_state_dict(checkpoint: dict[str, Tensor], vae_config: dict[str, Any]) -> dict[str, Tensor]:
    """The VAE's tensors under diffusers' names (diffusers' ``convert_ldm_vae_checkpoint``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        return convert_ldm_vae_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)},
                                          vae_config)
    except (KeyError, IndexError, ValueError) as e:
        raise AccelkitError(f"the original VAE keys do not fit its config (missing {e}); expected a complete "
                            "AutoencoderKL") from None


def load_original_teacher(
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    *,
    prediction_type: str | None = None,
    schedule: Any = None,
    sample_shape: tuple[int, ...] | None = None,
):
    """The UNet of an original single file as a teacher, with the scheduler of its config folder.

    The teacher's info records the layout, family and components found, the config folder used, and (when the file
    holds one) the VAE that decodes its latents (:func:`load_original_vae`).
    """
    from .diffusers_models import _build_teacher  # the diffusers family adapters and checks, shared with folders
    from .loading import read_safetensors

    path = Path(path)
    layout = original_layout_of(path)
    if layout is None:
        raise AccelkitError(f"{path}: not an original (LDM-layout) checkpoint: no {UNET_MARKER} key")
    folder = config_folder(path, layout, config)
    unet_config_path = folder / "unet" / "config.json"
    checkpoint, _ = read_safetensors(path)
    try:
        state = unet_state_dict(checkpoint, _read_config(unet_config_path))
    except AccelkitError as e:
        raise AccelkitError(f"{path}: {e}") from None
    sched = folder / "scheduler" / "scheduler_config.json"
    info: dict[str, Any] = {**layout.describe(), "config": str(folder),
                            "pipeline": _read_config(folder / "model_index.json").get("_class_name")}
    if "vae" in layout.components and (folder / "vae" / "config.json").is_file():
        info.update({"latent": True, "vae": str(path), "vae_config": str(folder / "vae")})
    teacher = _build_teacher([path], unet_config_path, sched if sched.is_file() else None, info, allow_pickle=False,
                             prediction_type=prediction_type, schedule=schedule, sample_shape=sample_shape,
                             state=state)
    teacher.info["format"] = FORMAT
    return teacher


def load_original_vae(path: str | os.PathLike, config: str | os.PathLike | None = None) -> nn.Module:
    """The VAE inside an original single file (AutoencoderKL), on the CPU in its stored dtype.

    ``config``: its ``vae/`` config folder (or config.json); default the shipped one of the file's family.
    """
    from diffusers import AutoencoderKL

    from .loading import load_state_dict_checked, move_network, read_safetensors, stored_dtype, weights_to_be_loaded

    path = Path(path)
    layout = original_layout_of(path)
    if layout is None or "vae" not in layout.components:
        raise AccelkitError(f"{path}: holds no VAE (no {VAE_PREFIX}* keys); expected an original checkpoint with one")
    if config is None:
        config = config_folder(path, layout, None) / "vae"
    cfg_path = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
    cfg = {k: v for k, v in _read_config(cfg_path).items() if not k.startswith("_")}
    try:
        state = vae_state_dict(read_safetensors(path)[0], cfg)
    except AccelkitError as e:
        raise AccelkitError(f"{path}: {e}") from None
    with weights_to_be_loaded():
        vae = AutoencoderKL.from_config(cfg)
    move_network(vae, dtype=stored_dtype(state))
    load_state_dict_checked(vae, state, path)
    return vae.eval().requires_grad_(False)


def load_original_text_encoder(path: str | os.PathLike, config: str | os.PathLike | None = None,
                               component: str = "text_encoder") -> nn.Module:
    """A text encoder inside an original single file (transformers CLIPTextModel / CLIPTextModelWithProjection), by
    diffusers' ``create_diffusers_clip_model_from_ldm`` with the ``<component>/config.json`` of the config folder."""
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    from .loading import read_safetensors

    path = Path(path)
    layout = original_layout_of(path)
    if layout is None or component not in layout.components:
        found = ", ".join(sorted(layout.components)) if layout else "no original layout"
        raise AccelkitError(f"{path}: holds no {component} (found: {found})")
    folder = config_folder(path, layout, config)
    index = _read_config(folder / "model_index.json")
    entry = index.get(component)
    if not isinstance(entry, list) or not entry[1] or not (folder / component / "config.json").is_file():
        raise AccelkitError(f"{folder}: no {component} in model_index.json or no {component}/config.json")
    cls = getattr(transformers, entry[1])
    _quiet_diffusers()
    try:
        model = create_diffusers_clip_model_from_ldm(cls, read_safetensors(path)[0], subfolder=component,
                                                     config=str(folder), local_files_only=True)
    except (ValueError, OSError, RuntimeError) as e:
        raise AccelkitError(f"{path}: the {component} does not match {folder / component / 'config.json'} "
                            f"({' '.join(str(e).split())[:300]})") from None
    return model.eval().requires_grad_(False)


def tokenizer_missing(path: str | os.PathLike) -> AccelkitError:
    """The one-line refusal of ``--prompt`` for an original single file: it holds no tokenizer."""
    return AccelkitError(f"{path}: an original single-file checkpoint holds no tokenizer, so --prompt cannot be "
                         "encoded from it; save it as a diffusers pipeline folder with its tokenizer/ (diffusers' "
                         "from_single_file(...).save_pretrained) or give precomputed embeddings with --cond")


__all__ = ["OriginalLayout", "detect_original_layout", "original_layout_of", "load_original_teacher",
           "load_original_vae", "load_original_text_encoder", "unet_state_dict", "vae_state_dict", "CONFIGS_DIR",
           "FAMILIES", "tokenizer_missing"]
