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
    import shutil

    from .build import BuildConfig, build
    from .build.builder import ForeignFolderError

    selection = resolve_models(preset, None, None, None, log=log)
    out = Path("engines") / f"{preset}-{backend}"
    config = BuildConfig(out=out, backend=backend, precision=dtype, height=height, width=width, prompts=prompts, mask_ratio=mask_ratio)
    try:
        build(selection, config, log=log)
    except ForeignFolderError:  # bench's own folder, of other settings or an older version: remade
        log(f"{out} holds engines of other settings: rebuilding it (bench's own engine folder)")
        shutil.rmtree(out)
        build(selection, config, log=log)
    runtime = HybridStitchRuntime.from_dir(out, device=device)
    return runtime.engines, (height // 8, width // 8), spec.text_tokens
