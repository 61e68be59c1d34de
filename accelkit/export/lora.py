"""LoRA files of LoRA students: the student as low-rank factors on its teacher's weights.

A student trained with low-rank adapters (``loop.lora``; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models") changes only the adapted layers, W' = W + (alpha / r) B A with B A of rank at most r, and is
stored merged (:func:`accelkit.training.merge_lora`), so that it loads like its teacher. Its LoRA file is recovered
from the difference to the teacher: for every changed layer, Delta = W' - W reshaped to (out, in k k) has the SVD
U S V^T with at most r non-zero singular values, and

    up = U_r S_r (out x r),   down = V_r^T (r x in k k),   alpha = r  (scale alpha / r = 1),

so W + up down = W' to float32 rounding. Every stage with LoRA students (reflow, consistency, shortcut, ...) exports
through this one module. Two layouts:

* ``lora`` (diffusers / peft): keys ``<component>.<module>.lora_A.weight`` (down) and ``.lora_B.weight`` (up), the
  component ``unet`` or ``transformer``: what diffusers' ``pipe.load_lora_weights(file)`` reads;
* ``kohya`` (sd-scripts, ComfyUI, AUTOMATIC1111): ``lora_unet_<module path with '.' as '_'>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (a scalar; scale alpha / rank), and ``ss_*`` training metadata.

Both headers carry ``format = accelkit.lora/1``, the base teacher's path and content hash, and the sampler the
student is meant to run with as the ``accelkit.*`` keys of a single-file export, so ``accelkit sample FILE`` loads
the base, adds the factors and samples with that sampler (:func:`load_lora_teacher`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AccelkitError

LORA_FORMAT = "accelkit.lora/1"
LAYOUTS = ("lora", "kohya")
#: The kohya prefix of UNet modules (sd-scripts' ``LORA_PREFIX_UNET``).
KOHYA_UNET_PREFIX = "lora_unet"
#: Singular values past the rank, relative to the largest, above this: the difference is not of that rank.
RANK_TOLERANCE = 1e-4


@dataclass
class LoraFactors:
    """One adapted layer: ``module`` (its path in the network), W += (alpha / rank) up @ down."""

    module: str
    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> Tensor:
        """(alpha / rank) up @ down, in the layer weight's shape."""
        d = self.up.flatten(1).double() @ self.down.flatten(1).double()
        out = d * (self.alpha / self.rank)
        return out.reshape(self.up.shape[0], *self.down.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# Student - teacher = low-rank factors


def _adaptable(network: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA adapts, by path: Linear and Conv2d."""
    return {name: m for name, m in network.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def extract_lora(base: nn.Module, student: nn.Module, rank: int, source: str | os.PathLike = "student"
                 ) -> list[LoraFactors]:
    """The factors of every layer where ``student`` differs from ``base`` (the same architecture), of rank
    ``rank``. Anything a LoRA cannot express (another tensor changed, a difference of higher rank) is an error."""
    layers = _adaptable(base)
    b_state, s_state = base.state_dict(), student.state_dict()
    if b_state.keys() != s_state.keys():
        raise AccelkitError(f"{source}: the student's tensors are not those of its teacher (another architecture)")
    factors: list[LoraFactors] = []
    for key, w in b_state.items():
        w2 = s_state[key]
        if w.shape != w2.shape:
            raise AccelkitError(f"{source}: {key} has shape {tuple(w2.shape)}, the teacher's {tuple(w.shape)}")
        if torch.equal(w.to(w2.dtype), w2):
            continue
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or module not in layers:
            raise AccelkitError(f"{source}: {key} differs from the teacher's but is not the weight of a Linear or "
                                "Conv2d layer, so no LoRA expresses this student; export it with --format "
                                "safetensors or diffusers")
        delta = (w2.double() - w.double()).flatten(1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        if s.numel() > r and float(s[r]) > RANK_TOLERANCE * float(s[0]):
            raise AccelkitError(f"{source}: the change of {key} has rank above {rank} (singular value {r + 1} is "
                                f"{float(s[r] / s[0]):.1e} of the first), so it is not a rank-{rank} LoRA")
        up = (u[:, :r] * s[:r]).to(torch.float32)
        down = vh[:r].to(torch.float32)
        if w.ndim == 4:
            up, down = up[:, :, None, None], down.reshape(r, *w.shape[1:])
        factors.append(LoraFactors(module, down.contiguous(), up.contiguous(), float(r)))
    if not factors:
        raise AccelkitError(f"{source}: the student's weights equal its teacher's; there is no LoRA to export")
    return factors


def apply_lora_factors(network: nn.Module, factors: list[LoraFactors], source: str | os.PathLike = "LoRA") -> None:
    """W <- W + (alpha / rank) up down for every factor (in place, in float64, stored in W's dtype)."""
    layers = _adaptable(network)
    for f in factors:
        layer = layers.get(f.module)
        if layer is None:
            raise AccelkitError(f"{source}: module {f.module!r} is not a Linear or Conv2d layer of the base network")
        d = f.delta()
        if tuple(d.shape) != tuple(layer.weight.shape):
            raise AccelkitError(f"{source}: the factors of {f.module!r} make shape {tuple(d.shape)}, the layer's "
                                f"weight is {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight.copy_((layer.weight.double() + d).to(layer.weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# The two layouts


def _component(network: nn.Module) -> str:
    from .exporter import COMPONENTS

    return COMPONENTS.get(type(network).__name__, "unet")


def kohya_name(module: str) -> str:
    """sd-scripts' name of a UNet layer: ``lora_unet`` + '.' + its module path, every '.' replaced by '_'."""
    return f"{KOHYA_UNET_PREFIX}.{module}".replace(".", "_")


def lora_tensors(factors: list[LoraFactors], layout: str, component: str) -> dict[str, Tensor]:
    """The tensors of a LoRA file in ``layout`` (``lora``: diffusers / peft; ``kohya``: sd-scripts)."""
    out: dict[str, Tensor] = {}
    for f in factors:
        if layout == "lora":
            if f.alpha != f.rank:
                raise AccelkitError("the diffusers layout stores scale 1 (alpha = rank)")
            out[f"{component}.{f.module}.lora_A.weight"] = f.down
            out[f"{component}.{f.module}.lora_B.weight"] = f.up
        else:
            name = kohya_name(f.module)
            out[f"{name}.lora_down.weight"] = f.down
            out[f"{name}.lora_up.weight"] = f.up
            out[f"{name}.alpha"] = torch.tensor(float(f.alpha))
    return out


def read_lora_factors(tensors: dict[str, Tensor], network: nn.Module, source: str | os.PathLike
                      ) -> list[LoraFactors]:
    """The factors of a LoRA file in either layout, named by the layers of ``network`` (the base)."""
    layers = _adaptable(network)
    by_kohya = {kohya_name(m): m for m in layers}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
                             (".lora_up.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                if suffix.startswith(".lora_") and suffix[6] in "AB":
                    module = stem.split(".", 1)[1] if "." in stem else stem  # drop the component prefix
                else:
                    module = by_kohya.get(stem)
                    if module is None:
                        raise AccelkitError(f"{source}: kohya key {key!r} names no Linear or Conv2d layer of the "
                                            "base network")
                groups.setdefault(module, {})[part] = v
                break
        else:
            raise AccelkitError(f"{source}: key {key!r} is not a LoRA key (expected .lora_A / .lora_B (diffusers) or "
                                ".lora_down / .lora_up / .alpha (kohya))")
    factors = []
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise AccelkitError(f"{source}: module {module!r} lacks its {'up' if 'down' in parts else 'down'} "
                                "factor")
        rank = int(parts["down"].shape[0])
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        factors.append(LoraFactors(module, parts["down"].float(), parts["up"].float(), alpha))
    return factors


def is_lora_file(meta: dict[str, str]) -> bool:
    return meta.get("format") == LORA_FORMAT


# ----------------------------------------------------------------------------------------------------------------
# Export and load


def base_teacher_path(source: Any) -> Path:
    """The teacher a student artifact adapts: its ``teacher`` input, or its couplings' teacher."""
    from ..artifacts import read_manifest

    manifest = source.manifest or {}
    inputs = manifest.get("inputs", {})
    if "teacher" in inputs:
        return Path(inputs["teacher"]["path"])
    if "source" in inputs:  # a SOURCE stage (consistency, ...): a couple artifact or the teacher itself
        from ..stages.student import is_couplings

        src = Path(inputs["source"]["path"])
        if not is_couplings(src):
            return src
        inputs = {"couplings": inputs["source"]}
    if "couplings" in inputs:
        couple = read_manifest(Path(inputs["couplings"]["path"]))
        entry = couple.get("inputs", {}).get("teacher")
        if entry and "path" in entry:
            return Path(entry["path"])
    raise AccelkitError(f"{source.path}: records no teacher it was trained from; a LoRA file is the difference to "
                        "that teacher")


def lora_rank_of(source: Any) -> int:
    """The LoRA rank a student artifact trained with (its recipe's ``loop.lora``); a one-line error otherwise."""
    recipe = (source.manifest or {}).get("recipe") or {}
    lora = (recipe.get("loop") or {}).get("lora")
    if source.manifest is None or not lora:  # any stage whose student trained loop.lora adapters
        what = "a teacher" if source.manifest is None else f"a full-weight {source.kind} artifact (no loop.lora)"
        raise AccelkitError(f"{source.path}: {what} has no LoRA adapters to export; --format lora / kohya needs a "
                            "student trained with --set <stage>.loop.lora.rank=R (use --format safetensors or "
                            "diffusers for full weights)")
    return int(lora.get("rank", 8))


def lora_file_contents(source: Any, sampling: Any, layout: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header of the LoRA file of the student ``source`` (an exporter Source) in ``layout``."""
    from ..artifacts import content_hash
    from ..models.loading import load_teacher
    from .exporter import exact_stock_scheduler, export_record, network_of

    if layout not in LAYOUTS:
        raise AccelkitError(f"LoRA layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    rank = lora_rank_of(source)
    base_path = base_teacher_path(source)
    if not base_path.exists():
        raise AccelkitError(f"{source.path}: its teacher {base_path} no longer exists; the LoRA is the difference "
                            "to it")
    student = network_of(source.teacher)
    base = network_of(load_teacher(base_path, dtype="fp32"))
    factors = extract_lora(base.network, student.network.float(), rank, source.path)
    component = _component(student.network)
    if layout == "kohya" and component != "unet":
        raise AccelkitError(f"{source.path}: the kohya layout names UNet layers (lora_unet_*); this student's "
                            f"network is a {type(student.network).__name__}: use --format lora")
    tensors = lora_tensors(factors, layout, component)
    stock = exact_stock_scheduler(source, sampling)
    record = export_record(source, sampling, type(stock).__name__ if stock is not None else "AccelkitScheduler")
    if stock is None:
        from .exporter import accelkit_scheduler_config

        record["scheduler_config"] = accelkit_scheduler_config(source, sampling)
    meta = {"format": LORA_FORMAT, "lora_layout": layout, "lora_rank": str(rank),
            "lora_modules": json.dumps(sorted(f.module for f in factors)),
            "base_model": str(base_path.resolve()), "base_model_sha256": content_hash(base_path)}
    for key, value in record.items():
        if value is not None:
            meta[f"accelkit.{key}"] = value if isinstance(value, str) else json.dumps(value)
    if layout == "kohya":  # sd-scripts' training metadata (strings)
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                     "ss_network_alpha": str(rank), "ss_output_name": source.path.name,
                     "ss_training_comment": f"{source.kind} student exported by accelkit; sample with "
                                            f"{sampling.solver} at {sampling.nfe} NFE (accelkit.* keys)"})
    return tensors, meta


def export_lora(source: Any, sampling: Any, output: str | os.PathLike, layout: str, force: bool = False) -> Path:
    """Write the LoRA file ``output`` (atomically; an existing one only with ``force``)."""
    from ..artifacts import atomic_write_bytes, safetensors_bytes

    out = Path(output)
    if out.suffix != ".safetensors":
        out = out / f"{source.path.name if source.path.is_dir() else source.path.stem}-{layout}.safetensors"
    if out.exists() and not force:
        raise AccelkitError(f"-o {out}: exists; pass --force to replace it")
    if out.exists() and out.is_dir():
        raise AccelkitError(f"-o {out}: is a directory; expected a .safetensors file name")
    tensors, meta = lora_file_contents(source, sampling, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, safetensors_bytes(tensors, meta))
    return out


def load_lora_teacher(path: str | os.PathLike, base: str | os.PathLike | None = None, **load_kwargs: Any):
    """The teacher a LoRA file describes: its base (``base``, else the path in its header, checked by content hash)
    with the factors added. ``load_kwargs`` (device, dtype, guidance) pass to the base's ``load_teacher``."""
    from ..artifacts import content_hash
    from ..models.loading import load_teacher, move_network, read_safetensors, read_safetensors_metadata
    from .linear_form import network_of

    meta = read_safetensors_metadata(path)
    if base is None:
        base = meta.get("base_model")
        if not base or not Path(base).exists():
            raise AccelkitError(f"{path}: a LoRA file whose base model {base!r} is not at hand; the LoRA adds to it")
        if meta.get("base_model_sha256") and content_hash(base) != meta["base_model_sha256"]:
            raise AccelkitError(f"{path}: its base model {base} changed since the LoRA was exported (content hash "
                                "differs)")
    device = load_kwargs.pop("device", "cpu")
    teacher = load_teacher(base, **{**load_kwargs, "device": "meta" if str(device) == "meta" else "cpu"})
    net = network_of(teacher)
    if str(device) != "meta":
        tensors, _ = read_safetensors(path)
        apply_lora_factors(net.network, read_lora_factors(tensors, net.network, path), path)
    move_network(net.network, device=device)
    net.info = {**net.info, "lora": str(path), "lora_layout": meta.get("lora_layout"),
                "lora_rank": meta.get("lora_rank")}
    return teacher


__all__ = ["LoraFactors", "extract_lora", "apply_lora_factors", "lora_tensors", "read_lora_factors", "kohya_name",
           "export_lora", "load_lora_teacher", "lora_file_contents", "is_lora_file", "LORA_FORMAT", "LAYOUTS"]
