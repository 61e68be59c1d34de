"""Write accelkit's shell completion scripts into completions/ (bash, zsh, fish).

Run ``python scripts/gen_completions.py`` after changing the CLI's name or completion mechanism;
``python scripts/gen_completions.py --check`` exits 1 when the files on disk are stale (the tests run it).
The scripts call ``accelkit`` back on every TAB (Typer/Click completion), so commands and options come live from
the installed CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHELLS = {"bash": "accelkit.bash", "zsh": "_accelkit", "fish": "accelkit.fish"}


def scripts() -> dict[str, str]:
    from typer._completion_shared import get_completion_script

    return {
        name: get_completion_script(prog_name="accelkit", complete_var="_ACCELKIT_COMPLETE", shell=shell).strip()
        + "\n"
        for shell, name in SHELLS.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if completions/ is stale")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / "completions"))
    args = parser.parse_args()
    out = Path(args.dir)
    stale = []
    for name, text in scripts().items():
        path = out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale completion scripts: {', '.join(stale)}; run python scripts/gen_completions.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
