"""Makes an :class:`EngineSet` from a manifest, for the backend the folder was built for (or torch)."""

from __future__ import annotations

import torch

from ..contract import GRAPH_NAMES
from ..errors import ConfigError, ManifestError, describe
from ..profiles import check_latent_size
from ..validation import check_device
from . import BACKENDS
from .base import EngineSet, precision_name, torch_dtype
from .checked import ProfileCheckedEngine


def load_engine(manifest, name: str, backend: str, device: torch.device, stream=None):
    """One engine of the folder (``onnxruntime`` or ``tensorrt``), without the profile checks.
    ``stream``: the CUDA stream a TensorRT engine runs on (default: one of its own).

    Raises:
        EngineLoadError: the engine library refused the file (its reason and the rebuild command).
    """
    fix = f"run hs-export verify {manifest.folder} to check every file, or rebuild with: {manifest.rebuild_command} --force"
    dims = manifest.dims(name)
    if backend == "onnxruntime":
        from .onnxruntime_backend import OrtEngine, load_settings

        return OrtEngine(manifest.engine_path(name), name, dims, device, load_settings(manifest.folder), fix=fix)
    from .tensorrt_backend import TrtEngine

    built_with = f"TensorRT {manifest.data['versions'].get('tensorrt')}"
    return TrtEngine(manifest.engine_path(name), name, dims, device, manifest.graph(name)["profiles"], built_with, stream=stream, fix=fix)


def engines_from_manifest(manifest, backend: str, device, dtype=None) -> EngineSet:
    """Loads the folder's engines (or the torch graphs of its models) behind the profile checks.

    Args:
        dtype: the torch backend's precision (``fp32`` by default: the reference); the folder's
            own engines compute in the precision they were built in, and refuse another.

    Raises:
        ConfigError: an unknown backend, an unknown or absent device; ``dtype`` not the engines'
            precision.
        ManifestError: a backend the folder was not built for.
        EngineLoadError: an engine library refused a file (with its reason and the rebuild command).
    """
    device = check_device(device)
    check_loadable(manifest, backend, device)
    precision = manifest.build.get("precision")
    wanted = None if dtype is None else torch_dtype(dtype)
    if backend == "torch":
        from ..models import load_transformer
        from .torch_backend import torch_engines

        wanted = wanted or torch.float32
        models = {role: load_transformer(manifest.data["models"][role]["source"], wanted, device) for role in GRAPH_NAMES}
        inner = torch_engines(models["small"], models["large"], device, wanted)
        precision = inner.precision
    else:
        asked = None if wanted is None else precision_name(wanted)
        if asked is not None and asked != precision:  # before any engine loads
            raise ConfigError(describe(f"{backend} engines compute in the precision they were built in", got=f"dtype {asked} for {manifest.folder}, built in {precision}", fix=_precision_fix(manifest, asked)))
        # TensorRT: one stream for the set, so its engines' calls never overlap and can share one
        # activation block (the larger need) whatever streams their callers use.
        stream = torch.cuda.Stream(device) if backend == "tensorrt" else None
        engines = {name: load_engine(manifest, name, backend, device, stream) for name in GRAPH_NAMES}
        if backend == "tensorrt":
            from .tensorrt_backend import share_activation_memory

            share_activation_memory(engines.values())
        inner = EngineSet(engines, device, torch_dtype(manifest.data.get("io_dtype", "fp32")), backend, precision)
    checked = {
        name: ProfileCheckedEngine(inner[name], manifest.graph(name)["profiles"], manifest.rebuild_command) for name in GRAPH_NAMES
    }
    shape, large = manifest.shape, manifest.dims("large")
    hint = f"rebuild with: {manifest.rebuild_command} --force"
    check_size = lambda h, w: check_latent_size(shape, large, h, w, hint, manifest.vae_scale)  # noqa: E731
    return EngineSet(checked, inner.device, inner.dtype, inner.backend, precision, check_size)


def check_loadable(manifest, backend: str, device) -> None:
    """The refusals :func:`engines_from_manifest` makes before it loads anything heavy (device,
    backend, TensorRT on a CUDA device and installed, plans built for this GPU architecture and
    TensorRT), for a long job to make first.

    Raises:
        ConfigError, ManifestError, BuildError, EngineLoadError: as :func:`engines_from_manifest` would.
    """
    device = check_device(device)
    if backend not in BACKENDS:
        raise ConfigError(describe("unknown backend", got=repr(backend), expected=" | ".join(BACKENDS)))
    if backend != "torch":
        check_backend(manifest, backend)
    if backend == "tensorrt":
        from .tensorrt_backend import check_plan_host, preflight

        trt = preflight(device)
        check_plan_host(manifest.data.get("versions", {}).get("build_device"), device, trt, manifest.folder, f"rebuild on this host: {manifest.rebuild_command} --force")


def check_backend(manifest, backend: str) -> None:
    """Refuses a backend that is neither the folder's own nor ``torch`` (which runs its models).

    Raises:
        ManifestError: naming the folder's backend and the build that makes ``backend``'s engines.
    """
    if backend not in ("torch", manifest.backend):
        raise ManifestError(
            describe(f"engine folder {manifest.folder} holds {manifest.backend} engines", got=f"--backend {backend}", expected=f"{manifest.backend} or torch", fix=f"build {backend} engines: {manifest.rebuild_command.replace('--backend ' + manifest.backend, '--backend ' + backend)}")
        )


def _precision_fix(manifest, asked: str) -> str:
    """How to run ``asked``: the torch backend, or the folder rebuilt in it (bf16 engines are TensorRT's)."""
    rebuild = manifest.rebuild_command.replace(f"--precision {manifest.build.get('precision')}", f"--precision {asked}")
    if asked == "bf16":
        rebuild = rebuild.replace("--backend onnxruntime", "--backend tensorrt")
    return f"drop the dtype, run the torch backend in {asked}, or rebuild: {rebuild} --force"
