"""Text conditions from prompts, encoded offline with a pipeline's own tokenizers and text encoders (transformers).

Three layouts of diffusers pipeline folders are read, each encoded exactly as its diffusers pipeline's
``encode_prompt`` does (the tokenizers pad and truncate to their ``model_max_length``):

* **SD 1.x / 2.x** (``tokenizer/`` + ``text_encoder/``, a CLIPTextModel): ``encoder_hidden_states`` is the
  encoder's last hidden state (batch, tokens, width), with the attention mask only where the encoder's config asks
  for one (``use_attention_mask``).
* **SDXL** (also ``tokenizer_2/`` + ``text_encoder_2/``, a CLIPTextModelWithProjection; Podell et al. 2023):
  ``encoder_hidden_states`` concatenates both encoders' penultimate hidden states along the width;
  ``pooled_projections`` is the second encoder's projected pooled output (the UNet's ``text_embeds``); and the
  size / crop micro-conditioning ``time_ids`` = (original_size, crops_coords_top_left, target_size) =
  (H, W, 0, 0, H, W) with H x W the pixel size of the sample (latent size x the VAE's scale factor), as the
  pipeline's defaults. The UNet (``addition_embed_type="text_time"``) takes them as ``added_cond_kwargs``.
* **SD3** (two CLIPTextModelWithProjection + ``text_encoder_3/``, a T5EncoderModel; Esser et al. 2024): the two
  CLIP penultimate states concatenated and zero-padded to the T5 width, then the T5 last hidden state of
  ``max_sequence_length`` (256) tokens appended along the tokens; ``pooled_projections`` the two pooled outputs
  concatenated. Without a T5 encoder its part is zeros, as diffusers does.

Classifier-free guidance contrasts with the negative prompt, or the empty prompt "" when none is given (diffusers'
choice), encoded the same way: that is the teacher's null condition. SDXL pipelines saved with
``force_zeros_for_empty_prompt`` (the default) take zero embeddings as the null when no negative prompt is given.

Encodings are cached on disk by content: the file ``<cache>/prompts/<sha256>.safetensors`` where the hash covers the
tokenizers' and text encoders' files and the prompts, so a second run (or every epoch of a training stage) reads the
tensors instead of running the encoders. The cache is ``$ACCELKIT_CACHE`` or ``~/.cache/accelkit``.

Nothing is downloaded: the tokenizers and encoders are read with ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import AccelkitError
from .teacher import Condition

CACHE_FORMAT = "accelkit.prompts/2"
#: The (tokenizer, text encoder) components of each pipeline layout, in diffusers' order.
TEXT_COMPONENTS = {"sd": (("tokenizer", "text_encoder"),),
                   "sdxl": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
                   "sd3": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                           ("tokenizer_3", "text_encoder_3"))}
#: SD3's T5 sequence length (StableDiffusion3Pipeline's max_sequence_length default).
SD3_MAX_SEQUENCE_LENGTH = 256


def cache_dir() -> Path:
    return Path(os.environ.get("ACCELKIT_CACHE") or Path.home() / ".cache" / "accelkit") / "prompts"


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one a line (blank lines skipped)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AccelkitError(f"--prompts {path}: cannot read it ({e}); expected a UTF-8 text file, one prompt a line") \
            from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise AccelkitError(f"--prompts {path}: holds no prompt; expected one prompt a line")
    return prompts


@dataclass(frozen=True)
class TextStack:
    """The text side of a pipeline folder: its layout (``sd``, ``sdxl`` or ``sd3``), the (tokenizer, encoder)
    component pairs present, the encoder classes model_index.json names, and SDXL's zero-null flag."""

    folder: Path
    layout: str
    pairs: tuple[tuple[str, str], ...]
    classes: dict[str, str]
    force_zeros_for_empty_prompt: bool = False


def _component_class(entry) -> str | None:
    if isinstance(entry, list | tuple):
        return entry[1] if len(entry) > 1 and entry[0] is not None else None
    return entry or None


#: The inputs of an artifact's manifest that lead to the model it was made from, in order of preference.
LINEAGE_INPUTS = ("teacher", "couplings", "source")


def pipeline_folder(path: str | os.PathLike, depth: int = 8) -> Path | None:
    """The diffusers pipeline folder (with model_index.json) of the model at ``path``: the folder itself, or, for an
    accelkit artifact (a reflow / consistency / ... student, a couple artifact), the pipeline its recorded inputs
    lead back to (a student of a pipeline takes the pipeline's text encoders). None when there is none."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return p
    manifest = p / "manifest.json"
    if depth <= 0 or not manifest.is_file():
        return None
    try:
        inputs = json.loads(manifest.read_text()).get("inputs") or {}
    except (OSError, ValueError):
        return None
    for name in sorted(inputs, key=lambda k: (LINEAGE_INPUTS.index(k) if k in LINEAGE_INPUTS else 99, k)):
        entry = inputs[name]
        if isinstance(entry, dict) and entry.get("path"):
            found = pipeline_folder(entry["path"], depth - 1)
            if found is not None:
                return found
    return None


def text_stack(path: str | os.PathLike) -> TextStack:
    """The tokenizers and text encoders that encode prompts for the model at ``path`` (a diffusers pipeline folder,
    or an artifact made from one: :func:`pipeline_folder`); a one-line error when there are none, or a listed one is
    missing from the folder."""
    if Path(path).is_file() and Path(path).suffix == ".safetensors":  # an original single file: no tokenizer inside
        from .models.original_layout import original_layout_of, tokenizer_missing

        if original_layout_of(Path(path)) is not None:
            raise tokenizer_missing(Path(path))
    p = pipeline_folder(path)
    if p is None:
        raise AccelkitError(f"{path}: has no text encoder (a diffusers pipeline folder with tokenizer/ and "
                            "text_encoder/, or an artifact made from one); --prompt needs one. Give precomputed "
                            "embeddings with --cond instead")
    index = p / "model_index.json"
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise AccelkitError(f"{index}: not readable JSON ({e})") from None
    layout = "sd3" if "text_encoder_3" in components else "sdxl" if "text_encoder_2" in components else "sd"
    pairs = []
    for tok, enc in TEXT_COMPONENTS[layout]:
        listed = {name: _component_class(components.get(name)) for name in (tok, enc)}
        if listed[enc] is None and listed[tok] is None and (layout, enc) in (("sdxl", "text_encoder"),
                                                                             ("sd3", "text_encoder_3")):
            continue  # SDXL refiners have no first encoder; SD3 may drop T5 (its part is zeros)
        for name in (enc, tok):
            if listed[name] is None:
                raise AccelkitError(f"{p}: the pipeline has no {name}; --prompt needs its tokenizers and text "
                                    "encoders (give precomputed embeddings with --cond instead)")
            folder = p / name
            if not folder.is_dir() or not any(folder.iterdir()):
                raise AccelkitError(f"{folder}: missing; model_index.json lists a {name} but the folder is not there")
        pairs.append((tok, enc))
    classes = {name: _component_class(components.get(name)) for pair in pairs for name in pair}
    return TextStack(p, layout, tuple(pairs), classes,
                     bool(components.get("force_zeros_for_empty_prompt", layout == "sdxl")) and layout == "sdxl")


def text_encoder_folder(path: str | os.PathLike) -> Path:
    """The pipeline folder whose tokenizers and text encoders encode prompts for the model at ``path``."""
    return text_stack(path).folder


def _files_digest(folder: Path) -> str:
    from .artifacts import content_hash

    return content_hash(folder)


def encoding_key(stack: TextStack | Path, prompts: list[str]) -> str:
    """The cache key of ``prompts`` encoded by the pipeline's tokenizers and text encoders (a sha256)."""
    if not isinstance(stack, TextStack):
        stack = text_stack(stack)
    record = {"format": CACHE_FORMAT, "layout": stack.layout, "prompts": prompts,
              **{name: _files_digest(stack.folder / name) for pair in stack.pairs for name in pair}}
    if stack.layout == "sd3":
        record["max_sequence_length"] = SD3_MAX_SEQUENCE_LENGTH
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _load_encoder(stack: TextStack | Path) -> list:
    """[(tokenizer, text encoder)] of the stack's pairs, read from its folder (float32, eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    if not isinstance(stack, TextStack):
        stack = text_stack(stack)
    transformers.utils.logging.disable_progress_bar()  # stderr keeps accelkit's own progress and errors
    tokenizers = []
    for tok_name, _ in stack.pairs:  # every tokenizer before any encoder: a bad one is found before weights load
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(str(stack.folder / tok_name), local_files_only=True))
        except (OSError, ValueError, TypeError) as e:
            raise AccelkitError(f"{stack.folder / tok_name}: not a readable tokenizer "
                                f"({' '.join(str(e).split())[:200]})") from None
    loaded = []
    for tokenizer, (_, enc_name) in zip(tokenizers, stack.pairs, strict=True):
        cls = getattr(transformers, stack.classes.get(enc_name) or "", None) or AutoModel
        try:
            encoder = cls.from_pretrained(str(stack.folder / enc_name), local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, TypeError) as e:
            raise AccelkitError(f"{stack.folder / enc_name}: not a readable text encoder "
                                f"({' '.join(str(e).split())[:200]})") from None
        loaded.append((tokenizer, encoder.eval()))
    return loaded


def _tokens(tokenizer, prompts: list[str], max_length: int | None = None):
    return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


@torch.no_grad()
def _encode_sd(loaded: list, prompts: list[str]) -> dict[str, Tensor]:
    """StableDiffusionPipeline.encode_prompt: the CLIP encoder's last hidden state."""
    (tokenizer, encoder), = loaded
    ids = _tokens(tokenizer, prompts)
    mask = ids.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    return {"encoder_hidden_states": encoder(ids.input_ids, attention_mask=mask)[0].float()}


@torch.no_grad()
def _encode_sdxl(loaded: list, prompts: list[str]) -> dict[str, Tensor]:
    """StableDiffusionXLPipeline.encode_prompt: the penultimate hidden states of both CLIP encoders concatenated;
    the pooled embeddings from the first encoder whose first output is 2-D (the projected text_embeds)."""
    states, pooled = [], None
    for tokenizer, encoder in loaded:
        out = encoder(_tokens(tokenizer, prompts).input_ids, output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        states.append(out.hidden_states[-2])
    if pooled is None:
        raise AccelkitError("the SDXL pipeline's text encoders give no pooled embeddings (text_encoder_2 should be a "
                            "CLIPTextModelWithProjection)")
    return {"encoder_hidden_states": torch.cat(states, dim=-1).float(), "pooled_projections": pooled.float()}


@torch.no_grad()
def _encode_sd3(loaded: list, prompts: list[str], joint_dim: int) -> dict[str, Tensor]:
    """StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states (padded to the T5 width) followed by
    T5's last hidden state along the tokens; both CLIPs' pooled outputs concatenated."""
    clip_max = loaded[0][0].model_max_length  # the pipeline's tokenizer_max_length, used for both CLIPs
    states, pooled = [], []
    for tokenizer, encoder in loaded[:2]:
        out = encoder(_tokens(tokenizer, prompts, clip_max).input_ids, output_hidden_states=True)
        pooled.append(out[0])
        states.append(out.hidden_states[-2])
    if len(loaded) > 2:
        tokenizer, encoder = loaded[2]
        t5 = encoder(_tokens(tokenizer, prompts, SD3_MAX_SEQUENCE_LENGTH).input_ids)[0]
    else:
        t5 = torch.zeros(len(prompts), SD3_MAX_SEQUENCE_LENGTH, joint_dim)
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2).float(),
            "pooled_projections": torch.cat(pooled, dim=-1).float()}


def _joint_dim(stack: TextStack) -> int:
    config = stack.folder / "transformer" / "config.json"
    try:
        return int(json.loads(config.read_text()).get("joint_attention_dim", 4096))
    except (OSError, ValueError):
        return 4096


def encode_prompts(pipeline: str | os.PathLike, prompts: list[str]) -> dict[str, Tensor]:
    """The text conditions of ``prompts`` (``encoder_hidden_states`` (len(prompts), tokens, width), and
    ``pooled_projections`` (len(prompts), width) for SDXL / SD3): read from the cache, else encoded with the
    pipeline's tokenizers and text encoders and cached."""
    from .artifacts import save_safetensors
    from .models.loading import read_safetensors

    stack = text_stack(pipeline)
    key = encoding_key(stack, prompts)
    cached = cache_dir() / f"{key}.safetensors"
    if cached.is_file():
        try:
            tensors = read_safetensors(cached)[0]
            if "encoder_hidden_states" in tensors:
                return tensors
        except AccelkitError:
            pass  # a damaged cache entry is encoded again
    loaded = _load_encoder(stack)
    if stack.layout == "sd3":
        tensors = _encode_sd3(loaded, prompts, _joint_dim(stack))
    elif stack.layout == "sdxl":
        tensors = _encode_sdxl(loaded, prompts)
    else:
        tensors = _encode_sd(loaded, prompts)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(cached, {k: v.contiguous() for k, v in tensors.items()},
                     {"format": CACHE_FORMAT, "prompts": json.dumps(prompts), "pipeline": str(stack.folder)})
    return tensors


def _vae_scale_factor(folder: Path) -> int:
    """2^(number of VAE blocks - 1), diffusers' vae_scale_factor; 8 without a VAE config (as diffusers)."""
    config = folder / "vae" / "config.json"
    try:
        return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 8


def size_time_ids(pipeline: str | os.PathLike, sample_shape: tuple[int, ...]) -> Tensor:
    """SDXL's micro-conditioning of a sample: (original_size, crops_coords_top_left, target_size) =
    (H, W, 0, 0, H, W) in pixels, as StableDiffusionXLPipeline's defaults, shape (1, 6)."""
    scale = _vae_scale_factor(Path(pipeline))
    h, w = int(sample_shape[-2]) * scale, int(sample_shape[-1]) * scale
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)


def prompt_conditions(pipeline: str | os.PathLike, prompts: list[str], negative_prompt: str | None,
                      teacher=None) -> tuple[Condition, Condition]:
    """(condition with one row per prompt, null condition of batch 1: the negative prompt, or "", or SDXL's zeros).
    With ``teacher`` given, the encodings are checked against what its network takes (a one-line error), and an
    SDXL UNet's ``time_ids`` are added for the teacher's sample size."""
    if not prompts:
        raise AccelkitError("--prompt: expected at least one prompt")
    stack = text_stack(pipeline)
    zero_null = negative_prompt is None and stack.force_zeros_for_empty_prompt
    texts = list(prompts) if zero_null else [*prompts, negative_prompt if negative_prompt is not None else ""]
    tensors = encode_prompts(pipeline, texts)
    if zero_null:
        rows = {k: v for k, v in tensors.items()}
        nulls = {k: torch.zeros_like(v[:1]) for k, v in tensors.items()}
    else:
        rows = {k: v[:-1] for k, v in tensors.items()}
        nulls = {k: v[-1:] for k, v in tensors.items()}
    extra: dict[str, Tensor] = {}
    info = getattr(teacher, "info", {}).get("conditioning", {}) if teacher is not None else {}
    if teacher is not None:
        _check_widths(rows, info, str(pipeline))
    if stack.layout == "sdxl" or info.get("addition_embed_type") == "text_time":
        shape = tuple(teacher.sample_shape) if teacher is not None else _unet_sample_shape(stack.folder)
        extra["time_ids"] = size_time_ids(stack.folder, shape)
    cond = Condition(encoder_hidden_states=rows["encoder_hidden_states"],
                     pooled_projections=rows.get("pooled_projections"),
                     extra={k: v.expand(len(prompts), -1).clone() for k, v in extra.items()})
    null = Condition(encoder_hidden_states=nulls["encoder_hidden_states"],
                     pooled_projections=nulls.get("pooled_projections"), extra=dict(extra))
    return cond, null


def _unet_sample_shape(folder: Path) -> tuple[int, ...]:
    config = json.loads((folder / "unet" / "config.json").read_text())
    size = config.get("sample_size", 128)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.get("in_channels", 4)), int(h), int(w))


def _check_widths(rows: dict[str, Tensor], info: dict, path: str) -> None:
    """A one-line error when the encodings do not have the widths the network takes."""
    width = rows["encoder_hidden_states"].shape[-1]
    if info.get("embedding_dim") and width != int(info["embedding_dim"]):
        raise AccelkitError(f"{path}: the text encoders give embeddings of width {width}, but the network takes "
                            f"{info['embedding_dim']}; the pipeline's text encoders do not fit its denoiser")
    pooled = rows.get("pooled_projections")
    if info.get("pooled_dim"):
        if pooled is None:
            raise AccelkitError(f"{path}: the network takes pooled text embeddings of width {info['pooled_dim']}, "
                                "which the pipeline's text encoder does not give")
        if pooled.shape[-1] != int(info["pooled_dim"]):
            raise AccelkitError(f"{path}: the text encoders give pooled embeddings of width {pooled.shape[-1]}, but "
                                f"the network takes {info['pooled_dim']}")


def prompt_conditions_file(pipeline: str | os.PathLike, prompts: list[str], negative_prompt: str | None) -> Path:
    """A conditions file (``couple --conditions``, a training stage's ``conditions``) of ``prompts``: the condition
    fields with one row per prompt (``encoder_hidden_states``, and for SDXL / SD3 ``pooled_projections``, for SDXL
    ``time_ids``), and guidance's null as ``null.<field>`` (batch 1). Content-addressed in the cache, so the same
    prompts make the same file and a couple artifact's identity."""
    from .artifacts import save_safetensors
    from .models.loading import load_teacher

    teacher = load_teacher(pipeline, device="meta")
    check_text_model(teacher, str(pipeline))
    cond, null = prompt_conditions(pipeline, prompts, negative_prompt, teacher)
    tensors = {k: v.contiguous() for k, v in cond.tensors().items()}
    tensors.update({f"null.{k}": v.contiguous() for k, v in null.tensors().items()})
    key = hashlib.sha256(b"".join(k.encode() + t.numpy().tobytes() for k, t in sorted(tensors.items()))).hexdigest()
    path = cache_dir() / f"conditions-{key}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, tensors, {"format": "accelkit.conditions/1", "prompts": json.dumps(prompts),
                                         "negative_prompt": negative_prompt or ""})
    return path


def check_text_model(teacher, path: str) -> None:
    """A one-line error unless the teacher takes text embeddings."""
    info = getattr(teacher, "info", {}).get("conditioning", {"kind": "none"})
    if info.get("kind") != "text":
        raise AccelkitError(f"{path}: the model takes no text ({info.get('kind', 'none')} conditioning); --prompt "
                            "needs a text-conditioned model")
    extra = info.get("addition_embed_type")
    if extra and extra != "text_time":
        raise AccelkitError(f"{path}: the UNet's added conditioning {extra!r} is not encoded from prompts (accelkit "
                            "encodes SDXL's text_time); give it with --cond")


__all__ = ["read_prompts_file", "pipeline_folder", "text_stack", "TextStack", "text_encoder_folder", "encode_prompts",
           "prompt_conditions", "check_text_model", "prompt_conditions_file", "size_time_ids", "cache_dir"]
