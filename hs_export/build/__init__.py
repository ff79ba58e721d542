"""The build side: model sources → ONNX export → ONNX Runtime / TensorRT engines → manifest.

Modules: ``sources`` (what the user named), ``export`` (ONNX export and parity), ``limits``
(tensor, memory and disk limits computed before exporting), ``ort`` and ``tensorrt`` (engines),
``builder`` (the atomic, fingerprinted build), ``verify`` and ``inspect`` (engine folders).
"""

from .builder import BuildConfig, BuildReport, build, library_versions, remove_stale_work
from .sources import ModelSelection, resolve_models

__all__ = ["BuildConfig", "BuildReport", "ModelSelection", "build", "library_versions", "remove_stale_work", "resolve_models"]
