"""Opens what a run names (an engine folder, a preset or a model pair) as a runtime."""

from __future__ import annotations

from pathlib import Path

from hs_runtime.errors import ConfigError, describe
from hs_runtime.pipeline import check_image_size
from hs_runtime.presets import get_preset
from hs_runtime.runtime import HybridStitchRuntime
from hs_runtime.validation import check_device

from .build.sources import RunDefaults, resolve_models


def open_runtime(engine_dir, preset, small_src, large_src, pipeline_src, backend, device, dtype, text_dtype=None) -> tuple[HybridStitchRuntime, RunDefaults]:
    """A runtime and the settings its models are meant for (size, steps, guidance)."""
    if engine_dir is not None:
        if preset or small_src or large_src:
            raise ConfigError(describe("an engine folder already names its models", fix="drop --preset/--small/--large"))
        runtime = HybridStitchRuntime.from_dir(engine_dir, backend=backend, device=device, pipeline_source=pipeline_src, dtype=dtype, text_dtype=text_dtype)
        build, plan = runtime.manifest.build, runtime.manifest.data.get("default_plan", {})
        return runtime, RunDefaults(build["height"], build["width"], plan.get("steps", 28), plan.get("guidance_scale", 7.0), build.get("preset"))
    if backend not in (None, "torch"):
        raise ConfigError(describe(f"backend {backend} runs engines", fix="build them with `hs-export build` and pass the engine folder"))
    if preset and not get_preset(preset).text_pipeline and pipeline_src is None:
        raise ConfigError(
            describe(f"preset {preset} has random weights and no text encoders or VAE", fix=f"benchmark it with hs-export bench --preset {preset}, or generate from real weights with --small/--large/--pipeline")
        )
    selection = resolve_models(preset, small_src, large_src, pipeline_src)
    runtime = HybridStitchRuntime.from_models(
        selection.small, selection.large, selection.pipeline, device=device, dtype=dtype, max_sequence_length=selection.max_sequence_length, text_dtype=text_dtype
    )
    return runtime, selection.defaults


def bench_engines(preset, backend, device, dtype, prompts, height, width, mask_ratio, log=print):
    """A preset's engines to benchmark, their latent size and text-token count.

    The torch backend runs random weights made in memory on ``device`` (the real SD3.5 sizes never
    touch the disk); ONNX Runtime or TensorRT engines are built first under ``engines/`` (skipped
    when up to date). ``dtype``: a precision name, fp32 when ``None``.
    """
    import torch

    from hs_runtime.backends.base import torch_dtype
    from hs_runtime.backends.torch_backend import torch_engines
    from hs_runtime.presets import random_transformer

    dtype = dtype or "fp32"
    spec = get_preset(preset)
    height = spec.height if height is None else height
    width = spec.width if width is None else width
    check_image_size(height, width)
    check_device(device)
    if backend in (None, "torch"):
        log(f"preset {preset}: random weights in memory on {device} ({dtype})")
        weights = torch_dtype(dtype)
        small = random_transformer(spec.small, spec.seed + 1, weights, device)
        large = random_transformer(spec.large, spec.seed + 2, weights, device)
        return torch_engines(small, large, torch.device(device), weights), (height // 8, width // 8), spec.text_tokens
    out = preset_engine_dir(preset, backend)
    _in_child(build_bench_folder, dict(preset=preset, backend=backend, out=str(out), precision=dtype, height=height, width=width, prompts=prompts, mask_ratio=mask_ratio), log)
    runtime = HybridStitchRuntime.from_dir(out, device=device)
    return runtime.engines, (height // 8, width // 8), spec.text_tokens


def preset_engine_dir(preset: str, backend: str) -> Path:
    """Where ``bench --preset NAME --backend B`` builds its engines."""
    return Path("engines") / f"{preset}-{backend}"


def build_bench_folder(preset: str, backend: str, out: str, precision: str, height: int, width: int, prompts: int, mask_ratio: float, log=print) -> None:
    """Builds bench's own ``engines/<preset>-<backend>`` (skipped when up to date; remade when it
    holds engines of other settings or an older version)."""
    import shutil

    from .build import BuildConfig, build
    from .build.builder import ForeignFolderError

    selection = resolve_models(preset, None, None, None, log=log)
    config = BuildConfig(out=Path(out), backend=backend, precision=precision, height=height, width=width, prompts=prompts, mask_ratio=mask_ratio)
    try:
        build(selection, config, log=log)
    except ForeignFolderError:  # bench's own folder, of other settings or an older version: remade
        log(f"{out} holds engines of other settings: rebuilding it (bench's own engine folder)")
        shutil.rmtree(out)
        build(selection, config, log=log)


_CHILD = """
import json, sys
from hs_runtime import errors
from hs_export import runs
try:
    getattr(runs, sys.argv[1])(**json.loads(sys.argv[2]), log=lambda line: print(line, flush=True))
except errors.HybridStitchError as exc:
    print(runs.CHILD_ERROR, type(exc).__name__, str(exc), flush=True)
    sys.exit(2)
"""
CHILD_ERROR = "HYBRIDSTITCH-ERROR"


def _in_child(function, kwargs: dict, log) -> None:
    """Runs ``function(**kwargs)`` of this module in a fresh Python process, its log lines relayed
    to ``log``: a bench's build (or its up-to-date check, which reads both models' weights) leaves
    nothing in this process's memory, so its loaded and peak figures count the run alone.

    Raises:
        HybridStitchError: the child's own one-line error, of its class.
    """
    import json
    import subprocess
    import sys

    from hs_runtime import errors

    proc = subprocess.Popen([sys.executable, "-c", _CHILD, function.__name__, json.dumps(kwargs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failure, tail = None, []
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith(CHILD_ERROR + " "):
            name, _, message = line[len(CHILD_ERROR) + 1:].partition(" ")
            failure = getattr(errors, name, errors.BuildError)(message)
        else:
            log(line)
            tail = (tail + [line])[-5:]
    if proc.wait() and failure is None:
        failure = errors.BuildError(describe(f"{function.__name__.replace('_', ' ')} failed", got=f"exit code {proc.returncode}: {tail[-1] if tail else 'no output'}", fix="see its output above"))
    if failure is not None:
        raise failure
