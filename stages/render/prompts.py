"""The prompts of a render: where each came from, how messages name it, and the checks before any
weights load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    """A prompt and where it came from (for error messages)."""

    text: str
    line: int | None = None
    """1-based line in the prompts file (None for --prompt)."""
    source: str | None = None
    """The prompts file."""


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """One prompt per line of a UTF-8 file; blank lines and lines starting with `#` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path}: not UTF-8 text ({err})") from None
    prompts = [
        Prompt(line.strip(), number, str(path))
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not prompts:
        raise ValueError(
            f"prompts file {path}: no prompts (one per line; blank lines and # comments are skipped)"
        )
    return prompts


def prompt_label(index: int, prompt: Prompt) -> str:
    """How messages name a prompt, e.g. `prompt 0003 (line 7 of prompts.txt)`; the number is the output
    directory's."""
    where = f" (line {prompt.line} of {prompt.source})" if prompt.line is not None else ""
    return f"prompt {index:04d}{where}"


def check_prompts(prompts: Sequence[Prompt]) -> None:
    """ValueError unless there is at least one prompt and every prompt is a non-blank string."""
    if len(prompts) == 0:
        raise ValueError("no prompts given (use --prompt TEXT or --prompts FILE)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt.text, str):
            raise ValueError(
                f"{prompt_label(i, prompt)}: expected a string, got {type(prompt.text).__name__}"
            )
        if not prompt.text.strip():
            raise ValueError(f"{prompt_label(i, prompt)} is empty; every prompt needs some text")
