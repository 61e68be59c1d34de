"""``accelkit inspect PATH``: what a checkpoint is: architecture, size, prediction type, schedule, conditioning."""

from __future__ import annotations

import typer

from .main import app


@app.command("inspect")
def inspect_command(
    path: str = typer.Argument(None, help="Teacher checkpoint: .safetensors, diffusers model or pipeline folder, "
                               "or accelkit artifact; '-' or missing: read it from stdin."),
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout."),
    config: str = typer.Option(None, "--config", help="config.json (or its model/pipeline folder) of a single-file "
                               "diffusers state dict."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled checkpoints (.ckpt, .pt, .pth, "
                                      ".bin), read with torch.load(weights_only=True)."),
    prediction_type: str = typer.Option(None, "--prediction-type", help="What the network predicts (eps, x0, v, "
                                        "flow), where the checkpoint does not say."),
    schedule: str = typer.Option(None, "--schedule", help="Noise schedule (linear, vp-linear, vp-scaled-linear, "
                                 "vp-cosine, ...), where the checkpoint does not say."),
) -> None:
    """Describe a teacher checkpoint: a table on stderr, or JSON on stdout with --json."""
    import json

    from ..models.loading import load_teacher
    from .common import emit, input_path

    path = input_path(path, "teacher checkpoint")
    # device "meta": the header and configs only, no weight is read (a multi-GB checkpoint is described at once)
    teacher = load_teacher(path, config=config, allow_pickle=allow_pickle, prediction_type=prediction_type,
                           schedule=schedule, device="meta")
    desc = {"path": path, **teacher.describe()}
    header = exported_header(path)
    if header:
        desc["metadata"] = header
    if json_out:
        emit(json.dumps(desc, sort_keys=True, default=str))
        return
    print_description(desc)
    emit(path)


def exported_header(path: str) -> dict[str, str]:
    """The ``modelspec.*`` and ``accelkit.*`` keys of a single file's header (written by ``accelkit export``)."""
    if not path.endswith(".safetensors"):
        return {}
    from ..models.loading import read_safetensors_metadata

    meta = read_safetensors_metadata(path)
    return {k: v for k, v in sorted(meta.items()) if k.startswith(("modelspec.", "accelkit."))}


def _schedule_text(cfg: dict) -> str:
    name = cfg.get("name", "?")
    rest = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "name")
    return f"{name} ({rest})" if rest else name


def _time_input_text(cfg: dict) -> str:
    if cfg.get("kind") == "discrete":
        n = cfg.get("num_train_timesteps")
        return f"training step k = {n} t - 1 (of {n})"
    if cfg.get("kind") == "scaled":
        return f"{cfg.get('scale'):g} t"
    return "t"


def _conditioning_text(cond: dict | None) -> str:
    if not cond or cond.get("kind") == "none":
        return "none (unconditional)"
    if cond["kind"] == "class":
        null = cond.get("null_class")
        return f"class labels: {cond.get('num_classes')} classes, null class {null if null is not None else 'none'}"
    if cond["kind"] == "text":
        text = f"text embeddings of width {cond.get('embedding_dim')}"
        if cond.get("pooled_dim"):
            text += f" + pooled embeddings of width {cond['pooled_dim']}"
        return text + f"; null: {cond.get('null', 'zero embeddings')}"
    return str(cond)


def _qac_text(book: dict | None) -> str | None:
    """A QAC model's code book in one line (``accelkit qac``)."""
    if not isinstance(book, dict) or "codes" not in book:
        return None
    return (f"{book.get('levels')}^{book.get('bits')} codebook, {len(book['codes'])} codes in use; sample i's code "
            "drawn from their weights (or --code)")


def print_description(desc: dict) -> None:
    """The description of a teacher as a two-column table on stderr."""
    from rich.table import Table

    from ..console import err

    rows = [
        ("path", desc.get("path")),
        ("format", desc.get("format")),
        ("architecture", desc.get("architecture")),
        ("pipeline", desc.get("pipeline")),
        ("layout", f"{desc['layout']}: {desc.get('family_name') or 'unknown family'} ({desc.get('family')})"
         if desc.get("layout") else None),
        ("components", ", ".join(desc["components"]) if desc.get("components") else None),
        ("config", desc.get("config")),
        ("parameters", f"{desc['parameters']:,}" if isinstance(desc.get("parameters"), int) else None),
        ("dtype", desc.get("dtype")),
        ("prediction type", desc.get("prediction_type")),
        ("schedule", _schedule_text(desc["schedule"]) if "schedule" in desc else None),
        ("scheduler", desc.get("scheduler")),
        ("sampling shift", desc.get("shift")),
        ("time input", _time_input_text(desc["time_input"]) if "time_input" in desc else None),
        ("conditioning", _conditioning_text(desc.get("conditioning"))),
        ("guidance scale", desc.get("guidance_scale")),
        ("sample shape", " x ".join(map(str, desc.get("sample_shape", [])))),
        ("latent (VAE)", desc.get("vae")),
        ("QAC codes", _qac_text(desc.get("qac"))),
    ]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows += [(key, value) for key, value in desc.get("metadata", {}).items()]
    for key, value in rows:
        if value is not None and value != "":
            table.add_row(key, str(value))
    err.print(table)
