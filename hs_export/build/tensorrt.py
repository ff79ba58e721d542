"""TensorRT plans through Polygraphy's API; TensorRT itself is imported only when building.

The builder settings are computed by pure functions (tested everywhere); the build runs where
TensorRT ≥ 10 imports.
"""

from __future__ import annotations

from pathlib import Path

from hs_runtime.errors import BuildError, ConfigError, describe

PRECISIONS = ("fp32", "fp16", "bf16")


def import_tensorrt(onnx_dir: Path | None = None):
    try:
        import tensorrt
    except ImportError as exc:
        kept = f"; the ONNX files were kept in {onnx_dir}" if onnx_dir else ""
        raise BuildError(
            describe("TensorRT is not installed on this host", fix=f"pip install 'hybridstitch[tensorrt]' on an NVIDIA host (TensorRT >= 10), then rerun the same build{kept}")
        ) from exc
    return tensorrt


def config_kwargs(precision: str, builder_optimization_level: int = 3) -> dict:
    """Keyword arguments of ``polygraphy.backend.trt.CreateConfig`` besides profiles and caches.

    fp32 engines disable TF32 so they match PyTorch's fp32 reference; fp16/bf16 enable the
    reduced type and let TensorRT keep precision-sensitive layers (norms, softmax) in fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(describe("unknown precision", got=repr(precision), expected=" | ".join(PRECISIONS)))
    if not 0 <= builder_optimization_level <= 5:
        raise ConfigError(describe("builder optimization level out of range", got=builder_optimization_level, expected="0..5"))
    return {
        "tf32": False,
        "fp16": precision == "fp16",
        "bf16": precision == "bf16",
        "builder_optimization_level": builder_optimization_level,
    }


def polygraphy_profiles(profiles: list[dict[str, list[list[int]]]]):
    """``polygraphy.backend.trt.Profile`` objects from the manifest's profile dicts."""
    from polygraphy.backend.trt import Profile

    out = []
    for profile in profiles:
        p = Profile()
        for name, (low, opt, high) in profile.items():
            p.add(name, min=tuple(low), opt=tuple(opt), max=tuple(high))
        out.append(p)
    return out


def build_plan(onnx_path: Path, plan_path: Path, precision: str, profiles: list[dict], timing_cache: Path, builder_optimization_level: int = 3) -> Path:
    """Parses ``onnx_path``, builds one plan with ``profiles`` and saves it and the timing cache."""
    import_tensorrt(onnx_path.parent)
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path

    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        profiles=polygraphy_profiles(profiles),
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        **config_kwargs(precision, builder_optimization_level),
    )
    try:
        data = engine_bytes_from_network(network_from_onnx_path(str(onnx_path)), config=config, save_timing_cache=str(timing_cache))
    except Exception as exc:
        raise BuildError(describe(f"TensorRT build of {onnx_path.name} failed", got=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)) from exc
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(data))
    return plan_path
