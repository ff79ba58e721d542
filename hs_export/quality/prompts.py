"""Prompts for a quality run: a file (one per line) or N built-in ones.

The ``shapes`` pair gets prompts from its own scene grammar, drawn from a seed no training scene
used; other models get everyday SD prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hs_runtime.errors import ConfigError, describe

GENERAL_PROMPTS = (
    "a photo of a cat",
    "a red fox in a snowy forest",
    "a lighthouse on a cliff at sunset",
    "a bowl of ramen, studio photo",
    "an astronaut riding a horse",
    "a city street at night in the rain",
    "a watercolor painting of a mountain lake",
    "a portrait of an old man with a beard",
    "a vintage car parked by the sea",
    "a castle on a hill, oil painting",
    "a macro photo of a bee on a flower",
    "a robot reading a book in a library",
)
SHAPES_PROMPT_SEED = 9_000_017  # never used by train-shapes (its scenes use seeds < 100 + scenes)


def builtin_prompts(count: int, preset: str | None) -> list[str]:
    if preset == "shapes":
        from ..shapes.scenes import sample_scene

        rng = np.random.default_rng(SHAPES_PROMPT_SEED)
        return [sample_scene(rng).prompt for _ in range(count)]
    if count > len(GENERAL_PROMPTS):
        raise ConfigError(describe(f"only {len(GENERAL_PROMPTS)} built-in prompts", got=count, fix="pass a prompts file for more"))
    return list(GENERAL_PROMPTS[:count])


def is_count(source) -> bool:
    """Whether ``--prompts`` is a count of built-in prompts ("-2" included, refused later), not a
    file name: a file needs no preset to be read."""
    return str(source).strip().lstrip("+-").isdigit()


def load_prompts(source: str, preset: str | None) -> list[str]:
    """``source`` is a count (built-in prompts) or a text file with one prompt per line
    (blank lines and ``#`` comments skipped)."""
    text = str(source).strip()
    if is_count(text):
        count = int(text)
        if count < 1:
            raise ConfigError(describe("--prompts must be >= 1", got=count))
        return builtin_prompts(count, preset)
    path = Path(text)
    if not path.exists():
        raise ConfigError(describe(f"prompts file not found: {path}", fix="pass a text file with one prompt per line, or a count such as --prompts 8"))
    if path.is_dir():
        raise ConfigError(describe(f"--prompts is a folder, not a file: {path}", fix="pass a text file with one prompt per line"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(describe(f"prompts file is not UTF-8 text: {path}", got=f"byte {exc.object[exc.start]:#04x} at offset {exc.start}", fix="pass a UTF-8 text file with one prompt per line")) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(describe(f"prompts file is empty: {path}", expected="one prompt per line"))
    return prompts
