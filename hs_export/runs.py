"""Opens what a run names (an engine folder, a preset or a model pair) as a runtime."""

from __future__ import annotations

from pathlib import Path

from hs_runtime.errors import ConfigError, HybridStitchError, describe
from hs_runtime.manifest import Manifest
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
        return runtime, folder_defaults(runtime.manifest)
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


def folder_defaults(manifest) -> RunDefaults:
    """The size, steps and guidance an engine folder's build is meant for."""
    build, plan = manifest.build, manifest.data.get("default_plan", {})
    return RunDefaults(build["height"], build["width"], plan.get("steps", 28), plan.get("guidance_scale", 7.0), build.get("preset"))


def default_guidance(engine_dir, preset) -> float:
    """The guidance scale of the folder's build or of the preset, as ``generate`` and ``quality``
    take it when none is given (7.0 where neither is named: the caller refuses that itself)."""
    if engine_dir is not None:
        return folder_defaults(Manifest.load(engine_dir)).guidance_scale
    return get_preset(preset).guidance_scale if preset is not None else RunDefaults.guidance_scale


def bench_engines(preset, device, dtype, height, width, log=print):
    """A preset's torch engines to benchmark (random weights made in memory on ``device``: the real
    SD3.5 sizes never touch the disk), their latent size and text-token count. ``dtype``: a
    precision name, fp32 when ``None``. ONNX Runtime and TensorRT engines are built by
    :func:`build_preset_engines` instead."""
    import torch

    from hs_runtime.backends.base import torch_dtype
    from hs_runtime.backends.torch_backend import torch_engines
    from hs_runtime.presets import random_transformer

    dtype = dtype or "fp32"
    spec = get_preset(preset)
    height, width = preset_size(preset, height, width)
    check_device(device)
    log(f"preset {preset}: random weights in memory on {device} ({dtype})")
    weights = torch_dtype(dtype)
    small = random_transformer(spec.small, spec.seed + 1, weights, device)
    large = random_transformer(spec.large, spec.seed + 2, weights, device)
    return torch_engines(small, large, torch.device(device), weights), (height // 8, width // 8), spec.text_tokens


def preset_size(preset: str, height: int | None, width: int | None) -> tuple[int, int]:
    """The image size a preset runs at: its own where not given; refused when not a multiple of 16."""
    spec = get_preset(preset)
    height = spec.height if height is None else height
    width = spec.width if width is None else width
    check_image_size(height, width)
    return height, width


def build_preset_engines(preset: str, backend: str, dtype, prompts: int, height, width, mask_ratio: float, log=print) -> Path:
    """Builds bench's own ONNX Runtime/TensorRT engine folder of a preset (or finds it up to date)
    in a child process (:func:`_in_child`) and returns it. ``dtype``: fp32 when ``None``.

    Raises:
        HybridStitchError: the build's own refusal, with the ``hs-export build`` command that runs
            it by hand (its fixes name build's flags: ``--force``, ``--out``).
    """
    height, width = preset_size(preset, height, width)
    out = preset_engine_dir(preset, backend)
    precision = dtype or "fp32"
    try:
        _in_child(build_bench_folder, dict(preset=preset, backend=backend, out=str(out), precision=precision, height=height, width=width, prompts=prompts, mask_ratio=mask_ratio), log)
    except HybridStitchError as exc:
        by_hand = f"hs-export build --preset {preset} --backend {backend} --precision {precision} --height {height} --width {width} --prompts {prompts} --mask-ratio {mask_ratio:g} --out {out}"
        raise type(exc)(f"{exc} (bench builds its engines with: {by_hand})") from None
    return out


def preset_engine_dir(preset: str, backend: str) -> Path:
    """Where ``bench --preset NAME --backend B`` builds its engines."""
    return Path("engines") / f"{preset}-{backend}"


def build_bench_folder(preset: str, backend: str, out: str, precision: str, height: int, width: int, prompts: int, mask_ratio: float, log=print) -> None:
    """Builds bench's own ``engines/<preset>-<backend>`` (skipped when up to date; remade when it
    holds engines of other settings or an older version)."""
    import shutil

    from .build import BuildConfig, build
    from .build.builder import ForeignFolderError, preset_models

    config = BuildConfig(out=Path(out), backend=backend, precision=precision, height=height, width=width, prompts=prompts, mask_ratio=mask_ratio)
    selection = preset_models(preset, config, log=log)
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


CHILD_GRACE_S = 30  # what an interrupted build takes to remove its work folder


def _stop(proc) -> None:
    """Stops a child build this process stopped waiting for, letting it remove its work folder
    (tens of GiB at SD3.5): a terminal's Ctrl+C reached it too, so it is given
    :data:`CHILD_GRACE_S` to exit; then it gets a SIGINT of its own and as long again; then it is
    killed."""
    import signal
    import subprocess

    for nudge in (None, signal.SIGINT):
        if nudge is not None:
            proc.send_signal(nudge)
        try:
            proc.wait(timeout=CHILD_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def _in_child(function, kwargs: dict, log) -> None:
    """Runs ``function(**kwargs)`` of this module in a fresh Python process, its log lines relayed
    to ``log``: a bench's build (or its up-to-date check, which reads both models' weights) leaves
    nothing in this process's memory, so its loaded and peak figures count the run alone. The
    child is stopped if this process stops waiting for it (Ctrl+C, an error).

    Raises:
        HybridStitchError: the child's own one-line error, of its class.
        BuildError: the child failed otherwise (a traceback, a signal such as the kernel's
            out-of-memory kill).
    """
    import json
    import signal
    import subprocess
    import sys

    from hs_runtime import errors

    what = function.__name__.replace("_", " ")
    failure, tail = None, []
    with subprocess.Popen([sys.executable, "-c", _CHILD, function.__name__, json.dumps(kwargs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(CHILD_ERROR + " "):
                    name, _, message = line[len(CHILD_ERROR) + 1:].partition(" ")
                    failure = getattr(errors, name, errors.BuildError)(message)
                else:
                    log(line)
                    tail = (tail + [line])[-5:]
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if proc.returncode < 0 and failure is None:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        hint = " (SIGKILL: the kernel's out-of-memory killer, most often; hs-export build --dry-run shows the memory it needs)" if name == "SIGKILL" else ""
        failure = errors.BuildError(describe(f"{what} was stopped by a signal", got=f"{name}{hint}", fix="see its output above"))
    elif proc.returncode and failure is None:
        failure = errors.BuildError(describe(f"{what} failed", got=f"exit code {proc.returncode}: {tail[-1] if tail else 'no output'}", fix="see its output above"))
    if failure is not None:
        raise failure
