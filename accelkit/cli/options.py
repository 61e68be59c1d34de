"""Options that several commands take with the same meaning, declared once (``Annotated`` aliases for Typer).

A command writes ``prompt: PromptOption = None``; the flag, its type and its help come from here.
"""

from __future__ import annotations

from typing import Annotated

import typer

#: The prompt options of the training stages that start from a teacher (consistency, shortcut, qac, score-distill,
#: adversarial): they become a conditions file through :func:`accelkit.cli.common.prompt_conditions_option`.
PromptOption = Annotated[list[str] | None, typer.Option(
    "--prompt", help="Text prompt (repeatable): the teacher's condition for data row (or draw) i is prompt i mod P, "
                     "encoded with its pipeline's tokenizers and text encoders (cached by content).")]
PromptsFileOption = Annotated[str | None, typer.Option("--prompts", help="Text file of prompts, one a line.")]
NegativePromptOption = Annotated[str | None, typer.Option(
    "--negative-prompt", help="Guidance's null (default with --prompt: the empty prompt, or SDXL's zeros).")]
ConditionsOption = Annotated[str | None, typer.Option(
    "--conditions", help="Conditions file (.safetensors, as couple's) instead of prompts: row i mod R for data row "
                         "(or draw) i.")]
