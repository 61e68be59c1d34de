"""``accelkit verify``: check an artifact's files against the hashes in its manifest."""

from __future__ import annotations

import typer

from .common import emit, input_path
from .main import app


@app.command("verify")
def verify(
    artifact: str | None = typer.Argument(None, help="Artifact directory; missing or '-': read it from stdin."),
) -> None:
    """Check every file of ARTIFACT against its manifest; prints the path when all is well, exit 2 otherwise."""
    from ..artifacts import read_manifest
    from ..artifacts import verify as verify_artifact
    from ..console import log
    from ..errors import AccelkitError

    path = input_path(artifact, "artifact directory")
    problems = verify_artifact(path)
    if problems:
        for p in problems:
            log(p)
        raise AccelkitError(f"{path}: {len(problems)} problem(s) found")
    m = read_manifest(path)
    log(f"{path}: {m['kind']} artifact, {len(m['files'])} file(s), all hashes match")
    emit(path)
