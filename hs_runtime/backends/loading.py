"""Makes an :class:`EngineSet` from a manifest, for the backend the folder was built for (or torch)."""

from __future__ import annotations

import torch

from ..contract import GRAPH_NAMES
from ..errors import ManifestError, describe
from .base import EngineSet
from .checked import ProfileCheckedEngine

_IO_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def engines_from_manifest(manifest, backend: str, device: torch.device) -> EngineSet:
    dims = {role: manifest.dims(role) for role in ("small", "large")}
    role_of = {name: manifest.graph(name)["model"] for name in GRAPH_NAMES}
    if backend == "torch":
        from .torch_backend import torch_engines
        from ..models import load_transformer

        models = {role: load_transformer(manifest.data["models"][role]["source"]) for role in ("small", "large")}
        inner = torch_engines(models["small"], models["large"], device, torch.float32)
    elif backend != manifest.backend:
        raise ManifestError(
            describe(f"engine folder {manifest.folder} holds {manifest.backend} engines", got=f"--backend {backend}", expected=f"{manifest.backend} or torch", fix=f"build {backend} engines: {manifest.rebuild_command.replace('--backend ' + manifest.backend, '--backend ' + backend)}")
        )
    elif backend == "onnxruntime":
        from .onnxruntime_backend import OrtEngine, load_settings

        settings = load_settings(manifest.folder)
        engines = {name: OrtEngine(manifest.engine_path(name), name, dims[role_of[name]], device, settings) for name in GRAPH_NAMES}
        inner = EngineSet(engines, device, _IO_DTYPES[manifest.data.get("io_dtype", "fp32")], backend)
    elif backend == "tensorrt":
        from .tensorrt_backend import TrtEngine

        built_with = f"TensorRT {manifest.data['versions'].get('tensorrt')}"
        engines = {
            name: TrtEngine(manifest.engine_path(name), name, dims[role_of[name]], device, manifest.graph(name)["profiles"], built_with)
            for name in GRAPH_NAMES
        }
        inner = EngineSet(engines, device, torch.float32, backend)
    else:
        raise ManifestError(describe("unknown backend", got=repr(backend), expected="torch | onnxruntime | tensorrt"))
    checked = {
        name: ProfileCheckedEngine(inner[name], manifest.graph(name)["profiles"], manifest.rebuild_command) for name in GRAPH_NAMES
    }
    return EngineSet(checked, inner.device, inner.dtype, inner.backend)
