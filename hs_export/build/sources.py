"""Resolves what the user named (a preset or a small/large pair) into model sources for a build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hs_runtime.errors import ConfigError, describe
from hs_runtime.presets import get_preset


@dataclass(frozen=True)
class RunDefaults:
    """What a run uses unless told otherwise: the preset's or the engine build's settings."""

    height: int
    width: int
    steps: int = 28
    guidance_scale: float = 7.0
    preset: str | None = None


@dataclass(frozen=True)
class ModelSelection:
    """Sources for the two transformers and the text pipeline, and the run sizes they suit."""

    small: str | None  # None: a preset not written to disk (a dry run needs only its configs)
    large: str | None
    pipeline: str | None
    height: int
    width: int
    max_sequence_length: int
    preset: str | None = None
    clip_tokens: int = 77  # CLIP tokenizer length: text tokens = clip_tokens + max_sequence_length
    steps: int = 28
    guidance_scale: float = 7.0
    pipeline_given: bool = False  # --pipeline named it (the rebuild command repeats it)

    @property
    def defaults(self) -> RunDefaults:
        return RunDefaults(self.height, self.width, self.steps, self.guidance_scale, self.preset)


def resolve_models(preset, small_src, large_src, pipeline_src, log=print, materialize: bool = True, force: bool = False) -> ModelSelection:
    """``--preset`` (materialised on disk unless ``materialize`` is false; ``force``: even on a host
    that looks too small for its weights) or an explicit ``--small`` + ``--large`` pair."""
    if preset and (small_src or large_src):
        raise ConfigError(describe("pass either --preset or --small/--large, not both"))
    if preset:
        from ..presets import ensure_preset

        spec = get_preset(preset)
        small = large = pipeline = None
        pipeline_src = _local(pipeline_src)
        if materialize:
            paths = ensure_preset(preset, log=log, check_room=not force)
            small, large = str(paths.small), str(paths.large)
            pipeline = pipeline_src if pipeline_src is not None else (str(paths.pipeline) if paths.pipeline else None)
        return ModelSelection(
            small, large, pipeline, spec.height, spec.width, spec.max_sequence_length, preset,
            spec.clip_tokens, spec.steps, spec.guidance_scale, pipeline_given=pipeline_src is not None,
        )
    if not (small_src and large_src):
        raise ConfigError(describe("no models given", fix="pass --preset NAME, or both --small SRC and --large SRC"))
    small_src, large_src, pipeline = _local(small_src), _local(large_src), _local(pipeline_src)
    if pipeline is None and (Path(large_src) / "model_index.json").is_file():
        pipeline = large_src
    return ModelSelection(small_src, large_src, pipeline, 1024, 1024, 256, clip_tokens=clip_length(pipeline), pipeline_given=pipeline_src is not None)


def _local(source: str | None) -> str | None:
    """An existing local path made absolute (the manifest, verify and the rebuild command then
    name the same files from any folder); a hub id as given."""
    if source is None or not Path(source).exists():
        return source
    return str(Path(source).resolve())


def clip_length(pipeline: str | None) -> int:
    """The CLIP tokenizer length of a pipeline folder (SD3's is 77)."""
    import json

    config = Path(pipeline) / "tokenizer" / "tokenizer_config.json" if pipeline else None
    if config is not None and config.is_file():
        length = json.loads(config.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length <= 77:
            return length
    return 77


def model_configs(selection: ModelSelection) -> dict[str, dict]:
    """The two transformer configs, read without loading a weight (a preset's from its spec)."""
    if selection.preset:
        spec = get_preset(selection.preset)
        return {"small": dict(spec.small), "large": dict(spec.large)}
    from diffusers import SD3Transformer2DModel

    from hs_runtime.models import resolve_transformer_source

    configs = {}
    for role, source in (("small", selection.small), ("large", selection.large)):
        where, subfolder = resolve_transformer_source(source)
        configs[role] = dict(SD3Transformer2DModel.load_config(where, subfolder=subfolder))
    return configs
