"""A CPU test double of the TensorRT runtime API and of the few ``torch.cuda`` calls around it.

It stands in for ``import tensorrt`` and for CUDA devices and streams, so the real
:class:`hs_runtime.backends.tensorrt_backend.TrtEngine` runs on CPU tensors: host memory stands in
for device memory (``data_ptr()`` values are real addresses; the double reads inputs from and
writes outputs to them through ``ctypes``). It *enforces* what TensorRT documents, so a backend
that breaks a rule fails here rather than only on a GPU. Each rule below cites its source
(``include/NvInferRuntime.h`` of TensorRT 11.1 at github.com/NVIDIA/TensorRT, unless noted; the
Python method names are the bindings' in ``python/src/infer/pyCore.cpp``):

* ``IExecutionContext::setTensorAddress``: "Before calling enqueueV3(), each input must have a
  non-null address and each output must have a non-null address" and "The pointer must have at
  least 256-byte alignment" (host memory from torch's CPU allocator is 64-byte aligned, so the
  double checks 64 and the fixture runs the backend's rule at 64 too). ``nullptr`` is accepted by
  ``setTensorAddress`` itself ("Pass data=nullptr to reset to the default state"): the failure
  comes at enqueue, as here.
* ``IExecutionContext::setOptimizationProfileAsync``: "must be called before calling
  setInputShape() for all dynamic input tensors … which in turn must be called before
  executeV2()/enqueueV3()" (so a profile switch forgets the shapes set before it), "Not
  synchronizing the stream used at enqueue with the stream used to set optimization profile …
  will result in undefined behavior" (the double requires the same stream), and an index outside
  ``[0, getNbOptimizationProfiles())`` fails (a ``RuntimeError`` in Python).
* ``IExecutionContext::setInputShape``: returns false for a shape the engine cannot take (the
  double: rank, static sizes, or outside the selected profile's ``[min, max]``).
* ``IExecutionContext::inferShapes``: the names of inputs "not sufficiently specified".
* ``IExecutionContext::enqueueV3``: "Using default stream may lead to performance issues due to
  additional cudaDeviceSynchronize() calls … Please use non-default stream instead" (TensorRT
  warns; the double refuses, as this project requires a private stream), and "Modifying or
  releasing memory that has been registered for the tensors before stream synchronization …
  results in undefined behavior" (the double requires every non-empty input to be
  ``record_stream``-ed on the enqueue stream, torch's way of keeping memory until a stream is done).
* ``ICudaEngine::createExecutionContext(ExecutionContextAllocationStrategy)``: ``kUSER_MANAGED``
  "The user supplies custom allocation to the execution context", with
  ``IExecutionContext::setDeviceMemoryV2`` (TensorRT 10.1; Python ``set_device_memory(memory,
  size)``: "256-byte aligned device memory", size "at least as large as
  CudaEngine.get_device_memory_size_v2"; "Setting memory to nullptr is acceptable if the reported
  size is 0"). The double refuses an enqueue of such a context without memory, and scribbles over
  the block while it "runs" (before reading the inputs, after writing the outputs), as activations
  would: a block that overlaps an input or output, or that another engine's call overwrote between
  two of its calls' reads, shows as wrong values. The memory "is in use from the invocation of
  enqueueV3() until network execution is complete … using it in another execution context running
  in parallel … will result in undefined behavior": the double refuses an enqueue whose block (or
  output memory) an earlier enqueue used unless stream order puts the earlier one first (same
  stream, or ``wait_stream`` edges after it), and an enqueue that overwrites outputs a stream that
  waited for them may still be reading (the caller's stream) without waiting for that stream.
* Devices: an engine belongs to the device current when it was deserialized and must be used with
  it current (trtexec sets the device before creating contexts and in every inference thread:
  ``samples/common/sampleInference.cpp``). The double also requires the tensors' device
  (``CudaWorld.memory_device``, set by the test) to be the engine's.

Violations raise :class:`PreconditionViolation` naming the rule.

:func:`install` fakes CUDA too (any CPU machine); :func:`install_real_cuda` fakes only TensorRT, for
GPU machines without it (the double then reads and writes device memory on the enqueue stream).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import math
import sys
import types
from pathlib import Path

import torch

MAGIC = b"TRT-DOUBLE-PLAN\n"
ALIGNMENT = 64  # what torch's CPU allocator guarantees; TensorRT asks 256 of device memory
DEFAULT_HANDLES = (0, 1, 2)  # null, cudaStreamLegacy, cudaStreamPerThread


class PreconditionViolation(AssertionError):
    """A documented TensorRT precondition was broken."""


class DataType:
    def __init__(self, name: str, torch_dtype: torch.dtype):
        self.name, self.torch = name, torch_dtype

    def __repr__(self):
        return f"DataType.{self.name}"


DTYPES = {
    "float32": DataType("FLOAT", torch.float32),
    "float16": DataType("HALF", torch.float16),
    "bfloat16": DataType("BF16", torch.bfloat16),
    "int64": DataType("INT64", torch.int64),
    "int32": DataType("INT32", torch.int32),
}


class ExecutionContextAllocationStrategy:
    STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"


class TensorIOMode:
    INPUT, OUTPUT = "INPUT", "OUTPUT"


class ProfilingVerbosity:
    """Ordered as TensorRT's enum: kLAYER_NAMES_ONLY (0, its default), kNONE (1), kDETAILED (2)."""

    LAYER_NAMES_ONLY, NONE, DETAILED = 0, 1, 2


class TensorLocation:
    DEVICE, HOST = "DEVICE", "HOST"


class ILogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self):
        pass

    def log(self, severity, msg):  # overridden by the backend's recording logger
        pass


# ---------------------------------------------------------------- CUDA devices and streams


class FakeStream:
    """A ``torch.cuda.Stream`` stand-in: a handle, a device, and ``wait_stream`` edges recorded."""

    _handles = itertools.count(0x7F00)

    def __init__(self, world: "CudaWorld", device_index: int, handle: int | None = None):
        self.world = world
        self.device_index = device_index
        self.cuda_stream = next(self._handles) if handle is None else handle

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def wait_stream(self, other: "FakeStream") -> None:
        self.world.waits.append((self.cuda_stream, other.cuda_stream))
        self.world.edges.append((self.cuda_stream, other.cuda_stream, next(self.world.clock)))

    def __repr__(self):
        return f"FakeStream(cuda:{self.device_index}, handle={self.cuda_stream:#x})"


class CudaWorld:
    """The simulated CUDA state: current device, current stream per device, streams' wait edges,
    ``record_stream`` calls, and a log of the TensorRT calls made."""

    def __init__(self, devices: int = 2, real: bool = False):
        self.devices = devices
        self.real = real  # real CUDA: devices, streams and memory are torch's own; only TensorRT is faked
        self._current_device = 0
        self.memory_device = 0  # the device the tests' tensors stand for
        self.default = {i: FakeStream(self, i, handle=0) for i in range(devices)}
        self.current = dict(self.default)
        self.waits: list[tuple[int, int]] = []
        self.recorded: dict[int, set[int]] = {}
        self.calls: list[tuple] = []
        # Stream order (fake CUDA only): every wait edge and enqueue gets a tick of one clock.
        self.clock = itertools.count()
        self.edges: list[tuple[int, int, int]] = []  # (waiting stream, waited-for stream, tick)
        self.last_use: dict[int, tuple[int, int]] = {}  # address -> (stream, tick) of its last enqueue

    def ordered(self, stream_a: int, tick_a: int, stream_b: int, tick_b: int) -> bool:
        """Whether work enqueued on ``stream_a`` by ``tick_a`` completes before work enqueued on
        ``stream_b`` at ``tick_b``: the same stream, or a chain of ``wait_stream`` edges between."""
        if stream_a == stream_b:
            return tick_a <= tick_b
        return any(self.ordered(stream_a, tick_a, waited, tick) for waiting, waited, tick in self.edges if waiting == stream_b and tick_a <= tick < tick_b)

    def check_reuse(self, address: int, what: str, stream: int, tick: int, readers: bool) -> None:
        """An enqueue on ``stream`` at ``tick`` writes the memory at ``address``: the enqueue that
        used it last must be ordered before, and (``readers``: outputs) so must every stream that
        waited for that enqueue, which may be reading them."""
        if address in self.last_use:
            before, then = self.last_use[address]
            if not self.ordered(before, then, stream, tick):
                raise PreconditionViolation(f"{what}: in use by an enqueue on stream {before:#x} that is not ordered before this one on {stream:#x} (no wait_stream between)")
            for waiting, waited, when in self.edges if readers else ():
                if waited == before and when > then and waiting != stream and not self.ordered(waiting, when, stream, tick):
                    raise PreconditionViolation(f"{what}: overwritten while stream {waiting:#x}, which waited for the previous call's outputs, may still read them (wait for it first)")
        self.last_use[address] = (stream, tick)

    @property
    def current_device(self) -> int:
        return torch.cuda.current_device() if self.real else self._current_device

    @current_device.setter
    def current_device(self, value: int) -> None:
        self._current_device = value

    def index(self, device) -> int:
        if device is None:
            return self.current_device
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current_device if device.index is None else device.index

    @contextlib.contextmanager
    def device_guard(self, device):
        previous, self.current_device = self.current_device, self.index(device)
        try:
            yield
        finally:
            self.current_device = previous

    @contextlib.contextmanager
    def stream_guard(self, stream: FakeStream):
        previous = self.current[stream.device_index]
        self.current[stream.device_index] = stream
        with self.device_guard(stream.device_index):
            try:
                yield
            finally:
                self.current[stream.device_index] = previous

    def record(self, tensor: torch.Tensor, stream) -> None:
        if not isinstance(stream, (FakeStream, torch.cuda.Stream) if self.real else FakeStream):
            raise TypeError(f"record_stream expects a stream, got {type(stream).__name__}")
        self.recorded.setdefault(tensor.data_ptr(), set()).add(stream.cuda_stream)


# ---------------------------------------------------------------- plans


def plan_bytes(spec, profiles: list[dict], precision: str = "fp32", device_memory: int | None = None) -> bytes:
    """A serialized double plan implementing ``spec`` (a :class:`hs_runtime.contract.GraphSpec`)
    with ``profiles`` (``{input: [min, opt, max]}`` each), I/O in ``precision`` like a strongly
    typed engine exported in it (``timestep`` fp32, ``token_pos`` int64), needing
    ``device_memory`` bytes of activation memory (default: 4 KiB per layer)."""
    float_type = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    kind = {"float": float_type, "float32": "float32", "int64": "int64"}
    tensors = lambda ts: [{"name": t.name, "dtype": kind[t.dtype], "axes": list(t.axes)} for t in ts]  # noqa: E731
    static = {"hidden": spec.dims.hidden, "patch_dim": spec.dims.patch_dim, "joint_dim": spec.dims.joint_attention_dim, "pooled_dim": spec.dims.pooled_projection_dim}
    memory = 4096 * spec.dims.num_layers if device_memory is None else device_memory
    body = {"graph": spec.name, "inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs), "static": static, "profiles": profiles, "device_memory": memory}
    return MAGIC + json.dumps(body).encode()


def write_plan(path: Path, spec, profiles: list[dict], precision: str = "fp32", device_memory: int | None = None) -> Path:
    Path(path).write_bytes(plan_bytes(spec, profiles, precision, device_memory))
    return Path(path)


def reference_outputs(inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """What a double engine computes (fp32): every output depends on the inputs it would read, so
    a wrong binding shows as a wrong value.

    ``velocity_tokens = 2·patches + timestep/1000 + mean(k_context_0)``;
    ``k_i = i + patches[..., :1]``, ``v_i = i + 1 + patches[..., :1]``; ``text_k_j`` / ``text_v_j``
    alike from ``encoder_hidden_states[..., :1]``.
    """
    patches = inputs["patches"].float()
    ctx = inputs.get("k_context_0")
    ctx_mean = ctx.float().mean() if ctx is not None and ctx.numel() else torch.tensor(0.0, device=patches.device)
    text = inputs["encoder_hidden_states"].float()
    out = {}
    for name, shape in outputs.items():
        if name == "velocity_tokens":
            out[name] = 2 * patches + inputs["timestep"].float().view(-1, 1, 1) / 1000 + ctx_mean
        else:
            i = int(name.split("_")[-1]) + (1 if name.startswith(("v_", "text_v_")) else 0)
            source = text if name.startswith("text_") else patches
            out[name] = (i + source[..., :1]).expand(shape).clone()
    return out


class _CudaArray:
    """``__cuda_array_interface__`` (v3) over a raw device pointer, for ``torch.as_tensor``."""

    TYPESTR = {torch.uint8: "|u1", torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.int64: "<i8", torch.int32: "<i4"}

    def __init__(self, address: int, shape, dtype: torch.dtype):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": self.TYPESTR[dtype], "data": (address, False), "version": 3, "strides": None}


def _memory(address: int, shape: tuple[int, ...], dtype: torch.dtype, device: int | None = None) -> torch.Tensor:
    """A tensor over the memory at ``address``: host memory standing in for device memory, or
    (``device`` given) real device memory of that CUDA device."""
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype, device="cpu" if device is None else torch.device("cuda", device))
    if device is not None:
        t = torch.as_tensor(_CudaArray(address, shape, dtype), device=torch.device("cuda", device))
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
    raw = (ctypes.c_ubyte * (n * torch.empty((), dtype=dtype).element_size())).from_address(address)
    return torch.frombuffer(raw, dtype=dtype, count=n).view(shape)


# ---------------------------------------------------------------- the tensorrt API


class Runtime:
    def __init__(self, logger):
        self.logger = logger
        self.world: CudaWorld = _STATE["world"]

    def deserialize_cuda_engine(self, data: bytes):
        data = bytes(data)
        if not data.startswith(MAGIC):
            self.logger.log(ILogger.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        self.world.calls.append(("deserialize_cuda_engine", self.world.current_device))
        return ICudaEngine(json.loads(data[len(MAGIC):]), self.world, self.logger, device=self.world.current_device)


class ICudaEngine:
    def __init__(self, body: dict, world: CudaWorld, logger, device: int):
        self.body, self.world, self.logger, self.device = body, world, logger, device
        self.inputs = {t["name"]: t for t in body["inputs"]}
        self.outputs = {t["name"]: t for t in body["outputs"]}
        self.tensors = {**self.inputs, **self.outputs}

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return DTYPES[self.tensors[name]["dtype"]]

    def get_tensor_location(self, name: str):
        """``kHOST`` for a tensor the plan marks ``"location": "HOST"`` (a shape tensor), else ``kDEVICE``."""
        return TensorLocation.HOST if self.tensors.get(name, {}).get("location") == "HOST" else TensorLocation.DEVICE

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.body["profiles"])

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        return [tuple(s) for s in self.body["profiles"][profile_index][name]]

    @property
    def device_memory_size_v2(self) -> int:
        return int(self.body.get("device_memory", 0))

    def create_execution_context(self, strategy=None):
        strategy = ExecutionContextAllocationStrategy.STATIC if strategy is None else strategy
        if self.world.current_device != self.device:
            raise PreconditionViolation(f"create_execution_context with device {self.world.current_device} current, but the engine was deserialized on device {self.device} (contexts belong to the engine's device)")
        self.world.calls.append(("create_execution_context", strategy))
        return IExecutionContext(self, strategy)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy=None):
        self.engine, self.world = engine, engine.world
        self.strategy = strategy
        self.device_memory: tuple[int, int] | None = None  # (address, size) given by set_device_memory
        self.profile = 0  # "The newly created execution context will be assigned optimization profile 0."
        self.profile_stream: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self._nvtx = engine.body.get("profiling_verbosity", ProfilingVerbosity.DETAILED)  # "the verbosity with which the engine was built"

    @property
    def nvtx_verbosity(self):
        return self._nvtx

    @nvtx_verbosity.setter
    def nvtx_verbosity(self, verbosity):
        built = self.engine.body.get("profiling_verbosity", ProfilingVerbosity.DETAILED)
        rank = {ProfilingVerbosity.NONE: 0, ProfilingVerbosity.LAYER_NAMES_ONLY: 1, ProfilingVerbosity.DETAILED: 2}
        if rank[verbosity] > rank[built]:  # "the verbosity may not be raised above that level"
            raise PreconditionViolation(f"nvtx_verbosity raised to {verbosity} above the plan's {built}")
        self._nvtx = verbosity

    @property
    def active_optimization_profile(self) -> int:
        return self.profile

    def _bounds(self, name: str):
        low, _, high = self.engine.body["profiles"][self.profile][name]
        return low, high

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")
        self.world.calls.append(("set_optimization_profile_async", profile_index, stream_handle))
        self.profile, self.profile_stream = profile_index, stream_handle
        self.shapes.clear()  # setInputShape must follow the profile switch
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(s) for s in shape)
        if name not in self.engine.inputs:
            return False
        low, high = self._bounds(name)
        if len(shape) != len(low) or not all(lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            self.engine.logger.log(ILogger.ERROR, f"IExecutionContext::setInputShape: Error Code 3: API Usage Error ({name} {shape} outside profile {self.profile} [{low}, {high}])")
            return False
        self.shapes[name] = shape
        return True

    def infer_shapes(self) -> list[str]:
        return [name for name in self.engine.inputs if name not in self.shapes]

    def _symbols(self) -> dict[str, int]:
        table = dict(self.engine.body["static"])
        for name, shape in self.shapes.items():
            table.update(zip(self.engine.inputs[name]["axes"], shape))
        return table

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        table = self._symbols()
        return tuple(table.get(axis, -1) for axis in self.engine.tensors[name]["axes"])

    def set_device_memory(self, memory: int, size: int) -> None:
        need = self.engine.device_memory_size_v2
        if size < need:
            raise PreconditionViolation(f"set_device_memory: {size} bytes, but the engine needs device_memory_size_v2 = {need}")
        if need and not memory:
            raise PreconditionViolation("set_device_memory: null memory for an engine that needs activation memory")
        if memory % ALIGNMENT:
            raise PreconditionViolation(f"set_device_memory: address {memory:#x} not {ALIGNMENT}-byte aligned")
        self.world.calls.append(("set_device_memory", int(memory), int(size)))
        self.device_memory = (int(memory), int(size))

    def _scribble(self, device) -> None:
        """What activations do to their block while an engine runs."""
        if self.device_memory is not None and self.engine.device_memory_size_v2:
            _memory(self.device_memory[0], (self.engine.device_memory_size_v2,), torch.uint8, device).fill_(0xA5)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.tensors:
            return False
        # NvInferRuntime.h, setTensorAddress: "False if the provided name does not map to an input or
        # output tensor" and "The pointer must have at least 256-byte alignment", with no promise of a
        # refusal here (only setInputTensorAddress names alignment among its false returns): the
        # double takes the address and refuses a misaligned one, like nullptr, at enqueue.
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        world, engine = self.world, self.engine
        if world.current_device != engine.device:
            raise PreconditionViolation(f"execute_async_v3 with device {world.current_device} current, but the engine belongs to device {engine.device}")
        if world.memory_device != engine.device:
            raise PreconditionViolation(f"execute_async_v3: the engine lives on device {engine.device}, its tensors on device {world.memory_device}")
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory is None:
            raise PreconditionViolation("execute_async_v3 of a USER_MANAGED context before set_device_memory (it has no activation memory)")
        if stream_handle in DEFAULT_HANDLES:
            raise PreconditionViolation(f"execute_async_v3 on the default stream (handle {stream_handle}): use a non-default stream")
        if self.profile_stream is not None and self.profile_stream != stream_handle:
            raise PreconditionViolation(f"profile set on stream {self.profile_stream:#x} but enqueued on {stream_handle:#x} without synchronisation")
        for name in engine.inputs:
            if name not in self.shapes:
                raise PreconditionViolation(f"input {name}: shape not set (setInputShape after setOptimizationProfileAsync, before enqueueV3)")
            low, high = self._bounds(name)
            if not all(lo <= s <= hi for s, lo, hi in zip(self.shapes[name], low, high)):
                raise PreconditionViolation(f"input {name}: shape {self.shapes[name]} outside profile {self.profile}")
        shapes = {name: tuple(self.get_tensor_shape(name)) for name in engine.tensors}
        for name in engine.tensors:
            address = self.addresses.get(name, 0)
            if not address:
                raise PreconditionViolation(f"tensor {name} {shapes[name]}: null address (every I/O tensor needs a non-null address, zero-element ones too)")
            if address % ALIGNMENT:
                raise PreconditionViolation(f"tensor {name}: address {address:#x} not {ALIGNMENT}-byte aligned")
        for name in engine.outputs:  # TensorRT documents no aliasing of I/O; trtexec gives each tensor its own buffer
            shared = [other for other in engine.tensors if other != name and self.addresses.get(other) == self.addresses[name]]
            if shared:
                raise PreconditionViolation(f"output {name}: bound to the address of {shared[0]} (an output must have memory of its own)")
        for name in engine.inputs:
            if math.prod(shapes[name]) and stream_handle not in world.recorded.get(self.addresses[name], ()):
                raise PreconditionViolation(f"input {name}: memory not record_stream-ed on the enqueue stream (it may be freed and reused while TensorRT reads it)")
        if not world.real:  # real CUDA orders streams itself
            tick = next(world.clock)
            if self.device_memory is not None and engine.device_memory_size_v2:
                world.check_reuse(self.device_memory[0], "activation memory", stream_handle, tick, readers=False)
            for name in engine.outputs:
                if math.prod(shapes[name]):
                    world.check_reuse(self.addresses[name], f"output {name}", stream_handle, tick, readers=True)
        world.calls.append(("execute_async_v3", stream_handle, self.profile))
        dtypes = {name: DTYPES[t["dtype"]].torch for name, t in engine.tensors.items()}
        device = engine.device if world.real else None
        # On real CUDA the "kernels" run on the enqueue stream, so stream ordering is exercised too.
        on_stream = torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)) if world.real else contextlib.nullcontext()
        with on_stream:
            self._scribble(device)
            inputs = {name: _memory(self.addresses[name], shapes[name], dtypes[name], device).clone() for name in engine.inputs}
            values = reference_outputs(inputs, {name: shapes[name] for name in engine.outputs})
            for name in engine.outputs:
                if math.prod(shapes[name]):
                    _memory(self.addresses[name], shapes[name], dtypes[name], device).copy_(values[name].to(dtypes[name]))
            self._scribble(device)
        world.recorded.clear()
        return True


_STATE: dict = {}


def tensorrt_module(world: CudaWorld) -> types.ModuleType:
    """The fake ``tensorrt`` module."""
    _STATE["world"] = world
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.99.0-double"
    module.ILogger, module.Runtime, module.TensorIOMode, module.TensorLocation = ILogger, Runtime, TensorIOMode, TensorLocation
    module.ICudaEngine, module.IExecutionContext = ICudaEngine, IExecutionContext
    module.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    module.ProfilingVerbosity = ProfilingVerbosity
    for name, dtype in DTYPES.items():
        setattr(module, name, dtype)
    return module


def install(monkeypatch, world: CudaWorld | None = None) -> CudaWorld:
    """Puts the double in place for one test: ``import tensorrt`` gets the fake module, the
    ``torch.cuda`` calls the backend makes go to ``world``, and the backend's tensors live in host
    memory (its one seam, ``_memory_device``) with the host allocator's alignment."""
    from hs_runtime.backends import tensorrt_backend

    world = world or CudaWorld()
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_module(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: world.devices)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: world.current_device)
    monkeypatch.setattr(torch.cuda, "device", world.device_guard)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: FakeStream(world, world.index(device)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: world.current[world.index(device)])
    monkeypatch.setattr(torch.cuda, "stream", world.stream_guard)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Double GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: world.record(self, stream))
    monkeypatch.setattr(tensorrt_backend, "_memory_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(tensorrt_backend, "ADDRESS_ALIGNMENT", ALIGNMENT)
    return world


def install_real_cuda(monkeypatch) -> CudaWorld:
    """The double on a real CUDA machine without TensorRT: only ``tensorrt`` is faked; devices,
    streams, allocations and alignment are torch's own (``record_stream`` is observed, then run)."""
    world = CudaWorld(devices=torch.cuda.device_count(), real=True)
    world.default = {i: torch.cuda.default_stream(i) for i in range(world.devices)}
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_module(world))
    original = torch.Tensor.record_stream

    def record_stream(self, stream):
        world.record(self, stream)
        return original(self, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    monkeypatch.setattr(sys.modules[__name__], "ALIGNMENT", 256)  # TensorRT's rule for device memory
    return world
