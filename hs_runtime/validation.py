"""Checks for the values users pass in, shared by the API and the CLI.

Every public entry point (config dataclasses, ``make_plan``, ``initial_latents``, ``from_dir``, …)
calls these, so an embedding host gets the same one-line errors as the command line. Zero and
negative sizes are errors, never "use the default": callers pick defaults with ``is None``.
"""

from __future__ import annotations

import math
import os
import numbers
from pathlib import Path

import torch

from .errors import ConfigError, describe

SEED_MAX = 2**64 - 1  # torch generators take seeds 0 .. 2**64 - 1


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """Returns ``value`` if it is an integer in ``[minimum, maximum]``.

    Raises:
        ConfigError: "``name`` must be >= ``minimum`` | got …" (or "out of range" with both bounds).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(describe(f"{name} must be an integer", got=repr(value)))
    if maximum is None and value < minimum:
        raise ConfigError(describe(f"{name} must be >= {minimum}", got=value))
    if maximum is not None and not minimum <= value <= maximum:
        raise ConfigError(describe(f"{name} out of range", got=value, expected=f"{minimum}..{maximum}"))
    return int(value)


def check_number(name: str, value, minimum: float | None = None) -> float:
    """Returns ``value`` as a float if it is finite (and ``>= minimum`` when given).

    Raises:
        ConfigError: for NaN, inf, non-numbers and values below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(describe(f"{name} must be a finite number", got=value))
    if minimum is not None and value < minimum:
        raise ConfigError(describe(f"{name} must be >= {minimum:g}", got=value))
    return float(value)


def check_seed(seed) -> int:
    """Seeds are what torch generators take: integers ``0 .. 2**64 - 1``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(describe("seed out of range", got=seed, expected=f"an integer in 0..{SEED_MAX} (2**64 - 1, what torch generators take)"))
    return int(seed)


def check_folder_path(path, what: str, error: type[Exception] = ConfigError, fix: str | None = None) -> Path:
    """Refuses a path that exists but is not a folder; whether it must exist is the caller's call.

    Args:
        what: how the user named it, e.g. ``"engine folder"`` or ``"--large"``.
        error: the toolkit error to raise (a manifest or model error where that fits better).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise error(describe(f"{what} {path} is a file, not a folder", expected="a folder", fix=fix))
    return path


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``.`` or ``/`` at the latest): where a file
    or folder about to be made would land, for permission and free-space checks."""
    return next(p for p in (path, *path.parents) if p.exists())


def same_disk(a: Path, b: Path) -> bool:
    """Whether files written under ``a`` and under ``b`` (existing or not) land on one filesystem."""
    return os.stat(nearest_existing(Path(a).absolute())).st_dev == os.stat(nearest_existing(Path(b).absolute())).st_dev


def check_writable_folder(folder: Path, what: str, named: Path | None = None) -> None:
    """Refuses a folder to be written (existing or not) that lies under a file or where nothing can
    be written, before any work; messages name ``named`` (a file to be written there) if given."""
    named = folder if named is None else named
    existing = nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise ConfigError(describe(f"{what} {named}: {existing} is a file, not a folder", fix=f"choose another {what}"))
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only folder or file system
        raise ConfigError(describe(f"{what} {named} cannot be written", got=f"no write permission on {existing} (or a read-only file system)", fix=f"choose another {what}"))


def check_pipeline(pipeline: str | None) -> None:
    """Refuses a ``--pipeline`` that is not a diffusers SD3 folder on this host (the runtime loads
    text encoders and VAE from a local folder only); ``None`` passes."""
    if pipeline is None:
        return
    path = Path(pipeline)
    if not (path / "model_index.json").is_file():
        found = "no model_index.json in it" if path.is_dir() else "a file" if path.exists() else "no such folder"
        raise ConfigError(describe(f"--pipeline {pipeline} is not an SD3 pipeline folder", got=found, expected="a diffusers StableDiffusion3Pipeline folder (text encoders + VAE)", fix="pass --pipeline DIR, or leave it out"))


def check_output_file(path, what: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuses an output path that is a folder, lies under a file, or (with ``suffixes``) has an
    extension no writer knows. Checked before any work, so a long run never fails at the end."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(describe(f"{what} {path} is a folder, not a file", fix=f"name a file, e.g. {path / ('out' + (suffixes[0] if suffixes else path.suffix))}"))
    check_writable_folder(path.parent, what, named=path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ConfigError(describe(f"{what} needs an image file name", got=repr(path.name), expected="a name ending in " + ", ".join(suffixes[:6])))
    return path


def check_device(device) -> torch.device:
    """A ``torch.device`` for ``cpu``, ``cuda`` or ``cuda:N`` that exists on this host."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(describe("unknown device", got=repr(device), expected="cpu, cuda or cuda:N")) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(describe("CUDA device requested but torch sees no GPU here", got=str(parsed), expected="cpu on this host", fix="pass --device cpu, or use a host with a CUDA build of torch"))
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(describe("no such CUDA device", got=str(parsed), expected=f"cuda:0..cuda:{count - 1}"))
    elif parsed.type != "cpu" or parsed.index not in (None, 0):  # torch takes cpu:N but has one CPU device
        raise ConfigError(describe("unsupported device", got=str(parsed), expected="cpu, cuda or cuda:N"))
    return parsed
