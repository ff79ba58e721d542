"""Makes an :class:`EngineSet` from a manifest, for the backend the folder was built for (or torch)."""

from __future__ import annotations

import torch

from ..contract import GRAPH_NAMES
from ..errors import ManifestError, describe
from ..profiles import check_latent_size
from ..validation import check_device
from .base import EngineSet
from .checked import ProfileCheckedEngine

IO_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_engine(manifest, name: str, backend: str, device: torch.device):
    """One engine of the folder (``onnxruntime`` or ``tensorrt``), without the profile checks.

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
    return TrtEngine(manifest.engine_path(name), name, dims, device, manifest.graph(name)["profiles"], built_with, fix=fix)


def engines_from_manifest(manifest, backend: str, device) -> EngineSet:
    """Loads the folder's engines (or the torch graphs of its models) behind the profile checks.

    Raises:
        ConfigError: an unknown or absent device.
        ManifestError: a backend the folder was not built for.
        EngineLoadError: an engine library refused a file (with its reason and the rebuild command).
    """
    device = check_device(device)
    precision = manifest.build.get("precision")
    if backend == "torch":
        from ..models import load_transformer
        from .torch_backend import torch_engines

        models = {role: load_transformer(manifest.data["models"][role]["source"]) for role in GRAPH_NAMES}
        inner = torch_engines(models["small"], models["large"], device, torch.float32)
        precision = inner.precision
    elif backend != manifest.backend:
        raise ManifestError(
            describe(f"engine folder {manifest.folder} holds {manifest.backend} engines", got=f"--backend {backend}", expected=f"{manifest.backend} or torch", fix=f"build {backend} engines: {manifest.rebuild_command.replace('--backend ' + manifest.backend, '--backend ' + backend)}")
        )
    elif backend in ("onnxruntime", "tensorrt"):
        engines = {name: load_engine(manifest, name, backend, device) for name in GRAPH_NAMES}
        inner = EngineSet(engines, device, IO_DTYPES[manifest.data.get("io_dtype", "fp32")], backend, precision)
    else:
        raise ManifestError(describe("unknown backend", got=repr(backend), expected="torch | onnxruntime | tensorrt"))
    checked = {
        name: ProfileCheckedEngine(inner[name], manifest.graph(name)["profiles"], manifest.rebuild_command) for name in GRAPH_NAMES
    }
    shape, large = manifest.shape, manifest.dims("large")
    hint = f"rebuild with: {manifest.rebuild_command} --force"
    check_size = lambda h, w: check_latent_size(shape, large, h, w, hint, manifest.vae_scale)  # noqa: E731
    return EngineSet(checked, inner.device, inner.dtype, inner.backend, precision, check_size)
