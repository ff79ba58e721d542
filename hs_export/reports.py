"""Writing measured reports: one JSON file, or a dated section appended to a Markdown log.

Shared by ``bench``, ``quality`` and ``bench-serve``, whose reports differ only in content.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(report: dict, path: str | Path) -> Path:
    """The report as indented JSON (values JSON cannot hold are written as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def versions_line(versions: dict) -> str:
    """``{"torch": "2.13.0", "tensorrt": None}`` → ``"torch 2.13.0"`` (missing libraries left out)."""
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def append_section(path: str | Path, text: str) -> Path:
    """Appends ``text`` (one ``### …`` section) to a Markdown file, creating it if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(text)
    return path
