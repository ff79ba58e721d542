"""``tensorrt`` backend (TensorRT ≥ 10 name-based API), imported only when an engine is loaded.

Inputs are bound with ``set_tensor_address`` on torch CUDA tensors and run with
``execute_async_v3`` on the runtime's stream; outputs are preallocated per shape and reused.
With several optimization profiles (token buckets) the first profile holding the request is
chosen by :func:`hs_runtime.profiles.select_profile`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..contract import ModelDims, graph_spec
from ..errors import BuildError, EngineLoadError, ManifestError, describe, first_line
from ..profiles import select_profile


def _import_trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BuildError(describe("TensorRT is not installed on this host", fix="pip install 'hybridstitch[tensorrt]' (TensorRT >= 10, NVIDIA GPU), or run with --backend torch")) from exc
    return tensorrt


def torch_dtype_of(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.int64: torch.int64, trt.int32: torch.int32}
    return table[dtype]


def recording_logger(trt):
    """A ``trt.ILogger`` that prints warnings and errors like ``trt.Logger(WARNING)`` and keeps the
    errors, so a failed deserialization can name TensorRT's own reason (it returns ``None``)."""

    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # required by TensorRT's Python bindings
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(str(msg).strip())
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR, trt.ILogger.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return RecordingLogger()


class TrtEngine:
    """One deserialized plan with one execution context (so: one request at a time).

    Raises:
        EngineLoadError: the plan cannot be read or deserialized here; names the file, TensorRT's
            reason (a version or GPU mismatch, a damaged file) and ``fix``.
    """

    def __init__(self, plan_path: Path, graph: str, dims: ModelDims, device: torch.device, profiles: list[dict], built_with: str | None = None, stream: torch.cuda.Stream | None = None, fix: str | None = None):
        trt = _import_trt()
        self.spec = graph_spec(graph, dims)
        self.dims = dims
        self.profiles = profiles
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ManifestError(describe("TensorRT engines run on CUDA devices", got=str(self.device), fix="pass --device cuda"))
        fix = fix or "rebuild on this host with hs-export build --backend tensorrt --force"
        self.logger = recording_logger(trt)  # kept alive as long as the runtime and engine
        self.runtime = trt.Runtime(self.logger)
        try:
            data = Path(plan_path).read_bytes()
        except OSError as exc:
            raise EngineLoadError(describe(f"cannot read {graph} engine {plan_path}", got=first_line(exc), fix=fix)) from exc
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            reason = self.logger.errors[0] if self.logger.errors else "deserialize_cuda_engine returned None"
            raise EngineLoadError(
                describe(
                    f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)} cannot load {graph} engine {plan_path}",
                    got=reason, expected=f"a plan from this TensorRT version and GPU (built with {built_with or 'see manifest'})", fix=fix,
                )
            )
        self.context = self.engine.create_execution_context()
        self.stream = stream or torch.cuda.current_stream(self.device)
        self.dtypes = {name: torch_dtype_of(trt, self.engine.get_tensor_dtype(name)) for name in (*self.spec.input_names, *self.spec.output_names)}
        self._profile = None
        self._buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def __call__(self, feeds: Mapping[str, torch.Tensor], outputs: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        shapes = {name: tuple(feeds[name].shape) for name in self.spec.input_names}
        profile = select_profile(self.profiles, shapes, self.spec.name, "rebuild with more --token-buckets or --dynamic-shape")
        handle = self.stream.cuda_stream
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, handle)
            self._profile = profile
        keep = []
        for name in self.spec.input_names:
            tensor = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.spec.output_names:  # every output needs an address, wanted or not
            shape = tuple(self.context.get_tensor_shape(name))
            key = (name, shape)
            if key not in self._buffers:
                self._buffers[key] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, self._buffers[key].data_ptr())
            results[name] = self._buffers[key]
        if not self.context.execute_async_v3(handle):
            raise BuildError(describe(f"TensorRT execution of {self.spec.name} failed", got=shapes))
        wanted = set(outputs) if outputs is not None else set(self.spec.output_names)
        # Buffers are reused on the next call with the same shape: callers consume them first.
        return {name: t for name, t in results.items() if name in wanted}
