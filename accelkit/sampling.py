"""Drawing samples from a teacher's probability-flow ODE, batch by batch, batch-size invariant.

Sample i starts from the noise of (seed, i) (:func:`accelkit.noise.sample_noise`) and the condition of index i, so
the samples are the same whatever the batch size (up to the floating-point differences of batched kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import AccelkitError
from .noise import sample_noise
from .solvers import solve
from .teacher import Condition, Teacher

#: Gives the condition of a list of sample indices (or None for unconditional sampling).
ConditionFn = Callable[[list[int]], "Condition | None"]


def cycled_condition(cond: Condition) -> ConditionFn:
    """Sample i takes row i mod R of a condition with R rows (R = 1: every sample the same)."""
    rows = cond.batch_size() or 1

    def condition(indices: list[int]) -> Condition:
        idx = torch.tensor([i % rows for i in indices])
        return cond.map(lambda v: v[idx.to(v.device)])

    return condition


def class_label_condition(labels: Sequence[int]) -> ConditionFn:
    """Sample i takes class label ``labels[i mod len(labels)]``."""
    if not labels:
        raise AccelkitError("class labels: expected at least one")
    return cycled_condition(Condition(class_labels=torch.tensor(list(labels), dtype=torch.long)))


def read_condition(file: str, batch_one: bool = False) -> Condition:
    """A Condition from a .safetensors file whose tensors are named after its fields."""
    from pathlib import Path

    from .models.loading import read_safetensors

    if not file.endswith(".safetensors"):
        raise AccelkitError(f"{file}: expected a .safetensors file of conditioning tensors")
    if not Path(file).is_file():
        raise AccelkitError(f"{file}: no such file; expected a .safetensors file of conditioning tensors")
    tensors, _ = read_safetensors(file)
    if not tensors:
        raise AccelkitError(f"{file}: holds no tensors; expected encoder_hidden_states, pooled_projections, ...")
    known = ("class_labels", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
    cond = Condition(**{k: v for k, v in tensors.items() if k in known},
                     extra={k: v for k, v in tensors.items() if k not in known})
    rows = {v.shape[0] if v.ndim else 0 for v in tensors.values()}
    if len(rows) != 1 or 0 in rows:
        raise AccelkitError(f"{file}: tensors must share their first (batch) dimension; got {sorted(rows)}")
    if batch_one and rows != {1}:
        raise AccelkitError(f"{file}: a null condition must have batch size 1; got {rows.pop()}")
    return cond


def condition_from_options(teacher: Teacher, path: str, labels: Sequence[int] | None, cond_file: str | None
                           ) -> ConditionFn | None:
    """The per-sample condition function from the --label / --cond options of ``sample`` and ``eval``, checked
    against the teacher's conditioning; a class model without either cycles through its labels 0, 1, ..."""
    info = teacher.info.get("conditioning", {"kind": "none"}) if hasattr(teacher, "info") else {"kind": "none"}
    kind = info.get("kind", "none")
    if cond_file is not None:
        if kind == "none":
            raise AccelkitError(f"{path}: the model is unconditional; --cond is not used")
        cond = read_condition(cond_file)
        if kind == "text":
            ehs = cond.encoder_hidden_states
            if ehs is None or ehs.ndim != 3:
                raise AccelkitError(f"{cond_file}: expected encoder_hidden_states of shape (batch, tokens, "
                                    f"{info.get('embedding_dim')})")
            if info.get("embedding_dim") and ehs.shape[-1] != info["embedding_dim"]:
                raise AccelkitError(f"{cond_file}: encoder_hidden_states has width {ehs.shape[-1]}, the model "
                                    f"takes {info['embedding_dim']}")
            pooled = cond.pooled_projections
            if info.get("pooled_dim") and (pooled is None or pooled.shape[-1] != info["pooled_dim"]):
                raise AccelkitError(f"{cond_file}: expected pooled_projections of width {info['pooled_dim']}")
        if labels is not None:
            raise AccelkitError("give class labels either with --label or in the --cond file, not both")
        return cycled_condition(cond)
    if labels is not None:
        if kind != "class" and "num_classes" not in info:
            raise AccelkitError(f"{path}: the model takes no class labels; --label is not used")
        n_classes = info.get("num_classes")
        bad = [lab for lab in labels if lab < 0 or (n_classes is not None and lab >= n_classes)]
        if bad:
            raise AccelkitError(f"--label {bad[0]}: expected a class label in 0..{n_classes - 1}")
        return class_label_condition(labels)
    if kind == "class" and info.get("num_classes"):
        return class_label_condition(list(range(int(info["num_classes"]))))
    return None



@torch.no_grad()
def draw_samples(
    teacher: Teacher,
    n: int,
    *,
    seed: int,
    solver: str,
    nfe: int,
    grid: str | Sequence[float] | None = None,
    grid_kw: dict | None = None,
    batch_size: int = 64,
    condition: ConditionFn | None = None,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """``n`` samples (float32, on the CPU) of the teacher's ODE from the noise of (seed, 0) ... (seed, n - 1).

    Each batch starts at t = 1 from ``teacher.prior_sample(noise)`` and is integrated to t = 0 by
    :func:`accelkit.solvers.solve` in ``nfe`` evaluations on ``grid`` (None: the solver's default for the schedule;
    ``grid_kw`` such as ``shift`` go to the grid). ``on_batch(k)`` is called after each batch of k samples.
    """
    if n < 1:
        raise AccelkitError(f"number of samples {n}: expected at least 1")
    if batch_size < 1:
        raise AccelkitError(f"batch size {batch_size}: expected at least 1")
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        noise = sample_noise(seed, idx, teacher.sample_shape, device=device)
        cond = condition(idx) if condition is not None else None
        if cond is not None:
            cond = cond.map(lambda v: v.to(device))
        x = solve(teacher, teacher.prior_sample(noise), solver=solver, nfe=nfe, grid=grid, cond=cond,
                  **(grid_kw or {}))
        out.append(x.float().cpu())
        if on_batch is not None:
            on_batch(len(idx))
    return torch.cat(out)


def recorded_sampler(path: str) -> dict | None:
    """The sampler a model records for itself: {solver, nfe, grid} from an artifact's ``summary.sampling`` (students
    of ``reflow`` / ``distill``), an exported folder's ``accelkit_export.json`` or an exported file's ``accelkit.*``
    header; None when it records none (or something unreadable)."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        if (p / "manifest.json").is_file():
            rec = (json.loads((p / "manifest.json").read_text()).get("summary") or {}).get("sampling")
        elif (p / "accelkit_export.json").is_file():
            rec = json.loads((p / "accelkit_export.json").read_text())
        elif p.is_file() and p.suffix == ".safetensors":
            from .models.loading import read_safetensors_metadata

            meta = read_safetensors_metadata(p)
            if "accelkit.solver" not in meta:
                return None
            rec = {"solver": meta["accelkit.solver"], "nfe": json.loads(meta.get("accelkit.nfe", "null")),
                   "grid": json.loads(meta.get("accelkit.grid", "null"))}
        else:
            return None
    except (OSError, ValueError, AccelkitError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("solver"), str) or not isinstance(rec.get("nfe"), int):
        return None
    grid = rec.get("grid")
    return {"solver": rec["solver"], "nfe": rec["nfe"],
            "grid": [float(v) for v in grid] if isinstance(grid, list) else grid if isinstance(grid, str) else None}


__all__ = ["recorded_sampler", "draw_samples", "cycled_condition", "class_label_condition", "ConditionFn"]
