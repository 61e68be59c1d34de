"""Text conditions from prompts, encoded offline with a pipeline's own tokenizer and text encoder (transformers).

For a Stable Diffusion 1.x / 2.x pipeline folder (``tokenizer/`` + ``text_encoder/`` beside ``unet/``) a prompt is
encoded as ``StableDiffusionPipeline.encode_prompt`` does: the CLIP tokenizer pads and truncates it to its
``model_max_length`` (77 for SD), the text encoder's last hidden state is ``encoder_hidden_states`` (batch, tokens,
width), with the attention mask only where the encoder's config asks for one (``use_attention_mask``).
Classifier-free guidance contrasts with the negative prompt, or the empty prompt "" when none is given (diffusers'
choice), encoded the same way: that is the teacher's null condition, not zero embeddings.

Encodings are cached on disk by content: the file ``<cache>/prompts/<sha256>.safetensors`` where the hash covers the
tokenizer's and text encoder's files and the prompts, so a second run (or every epoch of a training stage) reads the
tensors instead of running the encoder. The cache is ``$ACCELKIT_CACHE`` or ``~/.cache/accelkit``.

Nothing is downloaded: the tokenizer and encoder are read with ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from .errors import AccelkitError
from .teacher import Condition

CACHE_FORMAT = "accelkit.prompts/1"
#: Pipelines with more than one text encoder, which this module does not encode yet.
MULTI_ENCODER_KEYS = ("text_encoder_2", "text_encoder_3")


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


def text_encoder_folder(path: str | os.PathLike) -> Path:
    """The pipeline folder whose ``tokenizer/`` and ``text_encoder/`` encode prompts for the model at ``path``;
    a one-line error when there is none."""
    p = Path(path)
    index = p / "model_index.json" if p.is_dir() else None
    if p.is_file() and p.suffix == ".safetensors":  # an original single file: text encoder inside, no tokenizer
        from .models.original_layout import original_layout_of, tokenizer_missing

        if original_layout_of(p) is not None:
            raise tokenizer_missing(p)
    if index is None or not index.is_file():
        raise AccelkitError(f"{path}: has no text encoder (a diffusers pipeline folder with tokenizer/ and "
                            "text_encoder/); --prompt needs one. Give precomputed embeddings with --cond instead")
    components = json.loads(index.read_text())
    multi = [k for k in MULTI_ENCODER_KEYS if components.get(k) and (components[k][0] if isinstance(
        components[k], list) else components[k])]
    if multi:
        raise AccelkitError(f"{path}: a pipeline with several text encoders ({', '.join(['text_encoder', *multi])}); "
                            "accelkit encodes prompts for single-encoder pipelines (SD 1.x / 2.x) so far: give "
                            "precomputed embeddings with --cond")
    for name in ("text_encoder", "tokenizer"):
        entry = components.get(name)
        if not entry or (isinstance(entry, list) and entry[0] is None):
            raise AccelkitError(f"{path}: the pipeline has no {name}; --prompt needs its tokenizer and text encoder "
                                "(give precomputed embeddings with --cond instead)")
        folder = p / name
        if not folder.is_dir() or not any(folder.iterdir()):
            raise AccelkitError(f"{folder}: missing; model_index.json lists a {name} but the folder is not there")
    return p


def _files_digest(folder: Path) -> str:
    from .artifacts import content_hash

    return content_hash(folder)


def encoding_key(pipeline: Path, prompts: list[str]) -> str:
    """The cache key of ``prompts`` encoded by ``pipeline``'s tokenizer and text encoder (a sha256)."""
    record = {"format": CACHE_FORMAT, "tokenizer": _files_digest(pipeline / "tokenizer"),
              "text_encoder": _files_digest(pipeline / "text_encoder"), "prompts": prompts}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _load_encoder(pipeline: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(pipeline / "tokenizer"), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise AccelkitError(f"{pipeline / 'tokenizer'}: not a readable tokenizer ({' '.join(str(e).split())[:200]})"
                            ) from None
    try:
        encoder = AutoModel.from_pretrained(str(pipeline / "text_encoder"), local_files_only=True,
                                            dtype=torch.float32)
    except (OSError, ValueError, TypeError) as e:
        raise AccelkitError(f"{pipeline / 'text_encoder'}: not a readable text encoder "
                            f"({' '.join(str(e).split())[:200]})") from None
    return tokenizer, encoder.eval()


@torch.no_grad()
def _encode(tokenizer, encoder, prompts: list[str]) -> Tensor:
    """encoder_hidden_states of ``prompts``, as StableDiffusionPipeline.encode_prompt computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    mask = ids.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder(ids.input_ids, attention_mask=mask)[0].float()


def encode_prompts(pipeline: str | os.PathLike, prompts: list[str]) -> Tensor:
    """The text embeddings (len(prompts), tokens, width) of ``prompts``: read from the cache, else encoded with
    the pipeline's tokenizer and text encoder and cached."""
    from .artifacts import save_safetensors
    from .models.loading import read_safetensors

    folder = text_encoder_folder(pipeline)
    key = encoding_key(folder, prompts)
    cached = cache_dir() / f"{key}.safetensors"
    if cached.is_file():
        try:
            return read_safetensors(cached)[0]["encoder_hidden_states"]
        except (AccelkitError, KeyError):
            pass  # a damaged cache entry is encoded again
    tokenizer, encoder = _load_encoder(folder)
    embeddings = _encode(tokenizer, encoder, prompts)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(cached, {"encoder_hidden_states": embeddings.contiguous()},
                     {"format": CACHE_FORMAT, "prompts": json.dumps(prompts), "pipeline": str(folder)})
    return embeddings


def prompt_conditions(pipeline: str | os.PathLike, prompts: list[str], negative_prompt: str | None
                      ) -> tuple[Condition, Condition]:
    """(condition with one row per prompt, null condition of batch 1: the negative prompt, or "")."""
    if not prompts:
        raise AccelkitError("--prompt: expected at least one prompt")
    negative = negative_prompt if negative_prompt is not None else ""
    embeddings = encode_prompts(pipeline, [*prompts, negative])
    return (Condition(encoder_hidden_states=embeddings[:-1]), Condition(encoder_hidden_states=embeddings[-1:]))


def prompt_conditions_file(pipeline: str | os.PathLike, prompts: list[str], negative_prompt: str | None) -> Path:
    """A conditions file (``couple --conditions``) of ``prompts``: ``encoder_hidden_states`` with one row per
    prompt, and guidance's null as ``null.encoder_hidden_states`` (batch 1). Content-addressed in the cache, so the
    same prompts make the same file and a couple artifact's identity."""
    from .artifacts import save_safetensors
    from .models.loading import load_teacher

    check_text_model(load_teacher(pipeline, device="meta"), str(pipeline))
    cond, null = prompt_conditions(pipeline, prompts, negative_prompt)
    tensors = {"encoder_hidden_states": cond.encoder_hidden_states.contiguous(),
               "null.encoder_hidden_states": null.encoder_hidden_states.contiguous()}
    key = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors.values())).hexdigest()
    path = cache_dir() / f"conditions-{key}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, tensors, {"format": "accelkit.conditions/1", "prompts": json.dumps(prompts),
                                         "negative_prompt": negative_prompt or ""})
    return path


def check_text_model(teacher, path: str) -> None:
    """A one-line error unless the teacher takes text embeddings of the width a prompt encodes to."""
    info = getattr(teacher, "info", {}).get("conditioning", {"kind": "none"})
    if info.get("kind") != "text":
        raise AccelkitError(f"{path}: the model takes no text ({info.get('kind', 'none')} conditioning); --prompt "
                            "needs a text-conditioned model")
    if info.get("pooled_dim") or info.get("addition_embed_type"):
        raise AccelkitError(f"{path}: the model also takes pooled text embeddings (SDXL / SD3 style), which accelkit "
                            "does not encode from prompts yet; give them with --cond")


__all__ = ["read_prompts_file", "text_encoder_folder", "encode_prompts", "prompt_conditions", "check_text_model",
           "prompt_conditions_file",
           "cache_dir"]
