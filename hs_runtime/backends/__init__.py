"""Engine backends behind one protocol. Each imports its engine library only when used."""

from .base import Engine, EngineSet

BACKENDS = ("torch", "onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Engine", "EngineSet"]
