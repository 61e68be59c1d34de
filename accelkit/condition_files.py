"""Conditions files: the condition of M samples in one file, what ``couple --conditions`` and a training stage's
``conditions`` read (``--prompt`` / ``--prompts`` write one: :func:`accelkit.prompts.prompt_conditions_file`).

A ``.safetensors`` file holds tensors named like :class:`accelkit.teacher.Condition`'s fields (other names, such as
SDXL's ``time_ids``, go to ``extra``), every one with the same M rows; sample (or data row) i takes row i mod M.
Tensors named ``null.<field>`` (batch 1) are guidance's null condition, e.g. the encoded negative prompt. A
``.json`` file holds class labels: ``{"class_labels": [...]}`` or a plain list.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import AccelkitError
from .teacher import Condition

CONDITION_FIELDS = ("class_labels", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections")


def load_conditions(path: str | Path) -> Condition:
    """Conditions of M samples from a ``.safetensors`` file (tensors named like :class:`Condition` fields, other
    names go to ``extra``) or a ``.json`` file (``{"class_labels": [...]}`` or a list of class labels)."""
    p = Path(path)
    if not p.is_file():
        raise AccelkitError(f"conditions file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except ValueError as e:
            raise AccelkitError(f"{p}: invalid JSON ({e})") from None
        if isinstance(data, list):
            data = {"class_labels": data}
        if not isinstance(data, dict):
            raise AccelkitError(f"{p}: expected a list of class labels or a mapping of condition fields")
        tensors = {k: torch.as_tensor(v) for k, v in data.items()}
    else:
        raise AccelkitError(f"{p}: expected a .safetensors or .json conditions file")
    tensors = {k: v for k, v in tensors.items() if not k.startswith(NULL_PREFIX)}  # see load_null_condition
    if not tensors:
        raise AccelkitError(f"{p}: no conditions in the file")
    sizes = {k: v.shape[0] if v.ndim else None for k, v in tensors.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise AccelkitError(f"{p}: every condition tensor needs the same number of rows (dim 0), got {sizes}")
    if "class_labels" in tensors:
        tensors["class_labels"] = tensors["class_labels"].long()
    return Condition(**{k: v for k, v in tensors.items() if k in CONDITION_FIELDS},
                     extra={k: v for k, v in tensors.items() if k not in CONDITION_FIELDS})


#: Tensors named ``null.<field>`` in a conditions file are guidance's null condition (batch 1), e.g. the encoded
#: negative prompt of ``couple --prompt``; without them the teacher's own null is used.
NULL_PREFIX = "null."


def load_null_condition(path: str | Path) -> Condition | None:
    """The null condition a ``.safetensors`` conditions file carries (``null.<field>`` tensors), or None."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        null = {k.removeprefix(NULL_PREFIX): f.get_tensor(k) for k in f.keys() if k.startswith(NULL_PREFIX)}
    if not null:
        return None
    return Condition(**{k: v for k, v in null.items() if k in CONDITION_FIELDS},
                     extra={k: v for k, v in null.items() if k not in CONDITION_FIELDS})


__all__ = ["CONDITION_FIELDS", "NULL_PREFIX", "load_conditions", "load_null_condition"]
