"""Resolves what the user named (preset, model folders, engine folder) into a runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hs_runtime.errors import ConfigError, describe
from hs_runtime.presets import get_preset
from hs_runtime.runtime import HybridStitchRuntime


@dataclass(frozen=True)
class ModelSelection:
    """Sources for the two transformers and the text pipeline, and the run sizes they suit."""

    small: str
    large: str
    pipeline: str | None
    height: int
    width: int
    max_sequence_length: int
    preset: str | None = None


def resolve_models(preset, small_src, large_src, pipeline_src, log=print) -> ModelSelection:
    """``--preset`` (materialised on disk) or an explicit ``--small`` + ``--large`` pair."""
    if preset and (small_src or large_src):
        raise ConfigError(describe("pass either --preset or --small/--large, not both"))
    if preset:
        from .presets import ensure_preset

        spec = get_preset(preset)
        paths = ensure_preset(preset, log=log)
        pipeline = pipeline_src or (str(paths.pipeline) if paths.pipeline else None)
        return ModelSelection(str(paths.small), str(paths.large), pipeline, spec.height, spec.width, spec.max_sequence_length, preset)
    if not (small_src and large_src):
        raise ConfigError(describe("no models given", fix="pass --preset NAME, or both --small SRC and --large SRC"))
    pipeline = pipeline_src
    if pipeline is None and (Path(large_src) / "model_index.json").is_file():
        pipeline = large_src
    return ModelSelection(small_src, large_src, pipeline, 1024, 1024, 256)


def open_runtime(engine_dir, preset, small_src, large_src, pipeline_src, backend, device, dtype):
    """A runtime and its default ``(height, width)``."""
    if engine_dir is not None:
        if preset or small_src or large_src:
            raise ConfigError(describe("an engine folder already names its models", fix="drop --preset/--small/--large"))
        runtime = HybridStitchRuntime.from_dir(engine_dir, backend=backend, device=device, pipeline_source=pipeline_src)
        build = runtime.manifest.build
        return runtime, (build["height"], build["width"])
    if backend not in (None, "torch"):
        raise ConfigError(describe(f"backend {backend} runs engines", fix="build them with `hs-export build` and pass the engine folder"))
    selection = resolve_models(preset, small_src, large_src, pipeline_src)
    runtime = HybridStitchRuntime.from_models(
        selection.small, selection.large, selection.pipeline, device=device, dtype=dtype, max_sequence_length=selection.max_sequence_length
    )
    return runtime, (selection.height, selection.width)
