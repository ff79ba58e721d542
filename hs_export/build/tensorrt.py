"""TensorRT plans through Polygraphy's API; TensorRT itself is imported only when building.

Plans are **strongly typed** (DESIGN §3): every layer computes in the type its ONNX file gives it,
so an fp16/bf16 engine comes from an ONNX file exported in fp16/bf16 (with the layers of
:func:`hs_export.build.precision.precision_plan` kept in fp32 by ``Cast`` nodes). The builder
flags ``FP16``/``BF16`` are never set: TensorRT 10.12 deprecated them ("superseded by strong
typing") and TensorRT 11 removed them (``include/NvInfer.h``, ``enum class BuilderFlag``: no
``kFP16``/``kBF16`` left; ``NetworkDefinitionCreationFlag::kSTRONGLY_TYPED``: "Deprecated in
TensorRT 11.0. Strongly typed mode is always enabled … retained for API compatibility"), so the
same call builds on 10.x and 11.x. Polygraphy ≥ 0.48 passes ``strongly_typed`` through
``network_from_onnx_path`` (``polygraphy/backend/trt/loader.py`` ``CreateNetwork``).

The builder settings and cache keys are pure functions (tested everywhere); the build runs where
TensorRT ≥ 10.1 imports.
"""

from __future__ import annotations

import re
from pathlib import Path

from hs_runtime.backends.base import PRECISIONS
from hs_runtime.backends.tensorrt_backend import check_tensorrt_version
from hs_runtime.errors import BuildError, ConfigError, describe, first_line

# ONNX TensorProto element types (onnx/onnx.proto): what each precision's float inputs must be.
_ONNX_FLOAT, _ONNX_FLOAT16, _ONNX_BFLOAT16 = 1, 10, 16
_ONNX_TYPES = {_ONNX_FLOAT: "fp32", _ONNX_FLOAT16: "fp16", _ONNX_BFLOAT16: "bf16"}

CACHE_DIR = Path.home() / ".cache" / "hybridstitch"


def import_tensorrt(onnx_dir: Path | None = None):
    try:
        import tensorrt
    except ImportError as exc:
        kept = f"; the ONNX files were kept in {onnx_dir}" if onnx_dir else ""
        raise BuildError(
            describe("TensorRT is not installed on this host", fix=f"pip install 'hybridstitch[tensorrt]' on an NVIDIA host (TensorRT >= 10.1), then rerun the same build{kept}")
        ) from exc
    check_tensorrt_version(tensorrt)  # the runtime needs 10.1: refuse before building plans it cannot run
    return tensorrt


def config_kwargs(precision: str, builder_optimization_level: int = 3) -> dict:
    """Keyword arguments of ``polygraphy.backend.trt.CreateConfig`` besides profiles and caches.

    No ``fp16``/``bf16`` flags: the network is strongly typed, so its ONNX types decide (and
    TensorRT 11 has no such flags). ``tf32`` is the one type-related flag strong typing keeps
    (``BuilderFlag::kTF32``: "Allow (but not require) computations on tensors of type
    DataType::kFLOAT to use TF32 … Enabled by default"): off for fp32 plans, so they match
    PyTorch's fp32 reference (Polygraphy clears the flag when ``tf32=False``); on for fp16/bf16
    plans, where it only touches the layers kept in fp32, as in NVIDIA's Diffusion demo
    (``demo_diffusion/engine.py``: ``--strongly-typed --tf32``).
    """
    if precision not in PRECISIONS:
        raise ConfigError(describe("unknown precision", got=repr(precision), expected=" | ".join(PRECISIONS)))
    if not 0 <= builder_optimization_level <= 5:
        raise ConfigError(describe("builder optimization level out of range", got=builder_optimization_level, expected="0..5"))
    return {"tf32": precision != "fp32", "builder_optimization_level": builder_optimization_level}


def network_kwargs() -> dict:
    """Keyword arguments of ``polygraphy.backend.trt.network_from_onnx_path`` besides the path."""
    return {"strongly_typed": True}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-") or "unknown"


def timing_cache_path(gpu_name: str, compute_capability: str, trt_version: str, root: Path | None = None) -> Path:
    """The TensorRT timing cache for one GPU model and TensorRT version.

    Timings measured on one GPU or TensorRT version are wrong for another (TensorRT refuses a
    cache made on another device: ``IBuilderConfig::setTimingCache`` with ``ignoreMismatch``
    false, ``include/NvInfer.h``; Polygraphy loads that way but merges on save with
    ``ignore_mismatch=True``, mixing devices in one file), so each (GPU name, compute capability,
    TensorRT version) gets its own file, e.g.
    ``~/.cache/hybridstitch/trt_timing-nvidia-h200-sm9.0-trt10.13.0.35.cache``.
    """
    cc = str(compute_capability)
    return Path(root or CACHE_DIR) / f"trt_timing-{_slug(gpu_name)}-sm{_slug(cc)}-trt{_slug(trt_version)}.cache"


def device_fingerprint(device=None) -> dict:
    """``{"gpu_name", "compute_capability", "trt_version"}`` of ``device`` (default: the current
    CUDA device) and the installed TensorRT: what a plan and its timing cache are valid for.

    ``timing_cache_path(**device_fingerprint())`` is the keyed cache; the build puts the dict into
    its fingerprint so a folder built on another GPU or TensorRT is rebuilt, not reused.

    Raises:
        BuildError: TensorRT is not installed or no CUDA device is visible.
    """
    import torch

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BuildError(describe("TensorRT builds need a CUDA device", got="torch.cuda.is_available() is False", fix="build on an NVIDIA host, or use --backend onnxruntime"))
    index = None if device is None else torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu_name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}", "trt_version": str(trt.__version__)}


def onnx_precision(model) -> dict[str, str]:
    """``{input name: "fp32" | "fp16" | "bf16" | "other"}`` of an ``onnx.ModelProto``'s graph inputs."""
    return {i.name: _ONNX_TYPES.get(i.type.tensor_type.elem_type, "other") for i in model.graph.input}


def check_onnx_precision(types: dict[str, str], precision: str, name: str) -> None:
    """Raises :class:`BuildError` unless the ONNX inputs' types are ``precision``'s: a strongly
    typed network would otherwise silently build at the ONNX file's precision.

    ``timestep`` is fp32 and ``token_pos`` int64 at every precision; every other float input is in
    ``precision``.
    """
    for tensor, kind in types.items():
        if tensor == "token_pos" or kind == "other":
            continue
        expected = "fp32" if tensor == "timestep" else precision
        if kind != expected:
            raise BuildError(
                describe(
                    f"{name}: ONNX input {tensor} is {kind}, but a strongly typed {precision} plan needs it in {expected}",
                    got=kind, expected=expected,
                    fix=f"export the ONNX in {precision} (hs-export build --precision {precision} --force re-exports it)",
                )
            )


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


def build_plan(onnx_path: Path, plan_path: Path, precision: str, profiles: list[dict], timing_cache: Path | None = None, builder_optimization_level: int = 3, device=None) -> Path:
    """Parses ``onnx_path`` into a strongly typed network, builds one plan with ``profiles`` and
    saves it and the timing cache.

    Args:
        onnx_path: ONNX exported in ``precision`` (``timestep`` fp32); its types decide every layer's.
        precision: ``fp32`` | ``fp16`` | ``bf16``: checked against the ONNX inputs.
        profiles: the manifest's ``{input: [min, opt, max]}`` per optimization profile.
        timing_cache: default ``timing_cache_path(**device_fingerprint(device))``.
        device: the CUDA device to build on (default: the current one).

    Raises:
        BuildError: TensorRT is absent, the ONNX is in another precision, or TensorRT failed (its reason).
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    kwargs = config_kwargs(precision, builder_optimization_level)
    trt = import_tensorrt(onnx_path.parent)
    import onnx
    import torch
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.logger import G_LOGGER

    check_onnx_precision(onnx_precision(onnx.load(str(onnx_path), load_external_data=False)), precision, onnx_path.name)
    timing_cache = Path(timing_cache) if timing_cache is not None else timing_cache_path(**device_fingerprint(device))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    with torch.cuda.device(torch.device("cuda") if device is None else torch.device(device)), G_LOGGER.verbosity(G_LOGGER.WARNING):
        config = CreateConfig(
            profiles=polygraphy_profiles(profiles),
            load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
            # TensorRT's own default: left unset, Polygraphy builds DETAILED (backend/trt/config.py),
            # which "will generally increase latency in enqueueV3()" (NvInferRuntime.h, setNvtxVerbosity).
            profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY,
            **kwargs,
        )
        try:
            data = engine_bytes_from_network(network_from_onnx_path(str(onnx_path), **network_kwargs()), config=config, save_timing_cache=str(timing_cache))
        except Exception as exc:
            # Polygraphy's own message ("Invalid Engine…") names no cause: TensorRT's errors go
            # through Polygraphy's TensorRT logger, printed above at this verbosity.
            raise BuildError(describe(f"TensorRT build of {onnx_path.name} failed", got=first_line(exc), fix="TensorRT's own reason is the [E] line logged above")) from exc
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    # The plan is an IHostMemory (Polygraphy's EngineBytesFromNetwork returns what
    # build_serialized_network made), which exports the buffer protocol (pyFoundationalTypes.cpp):
    # written as it is, with no bytes() copy of a plan as large as the weights beside it.
    with open(plan_path, "wb") as f:
        f.write(data)
    return plan_path
