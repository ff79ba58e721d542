"""``tensorrt`` backend (TensorRT ≥ 10.1 name-based API), imported only when an engine is loaded.

One :class:`TrtEngine` per plan, with one execution context, its own CUDA stream and its own
output buffers. What TensorRT requires, and where it says so (``include/NvInferRuntime.h`` of
TensorRT 11.1, github.com/NVIDIA/TensorRT; the Python names are those of
``python/src/infer/pyCore.cpp``):

* ``IExecutionContext::setTensorAddress``: "Before calling enqueueV3(), each input must have a
  non-null address and each output must have a non-null address …" and "The pointer must have at
  least 256-byte alignment." torch gives a null ``data_ptr()`` for zero-element tensors (no
  context tokens, text reuse), so those are bound to a persistent 256-byte dummy, as TensorRT's own
  samples do (``samples/common/sampleDevice.h``: "TensorRT requires a non-null ptr even for empty
  tensors, so allocate a dummy byte").
* ``setOptimizationProfileAsync``: "must be called before calling setInputShape() for all dynamic
  input tensors", on a stream synchronised with the enqueue stream (here: the same stream).
* ``setInputShape`` for every input, then ``inferShapes`` ("Positive value n if n input tensors
  were not sufficiently specified"; ``allInputDimensionsSpecified`` "does not work with name-base
  interfaces").
* ``enqueueV3``: "Using default stream may lead to performance issues due to additional
  cudaDeviceSynchronize() calls … Please use non-default stream instead", and "Modifying or
  releasing memory that has been registered for the tensors before stream synchronization …
  results in undefined behavior". So each engine runs on a private stream that waits for the
  caller's current stream before and is waited for after, and every input is
  ``record_stream``-ed on it so the caching allocator cannot hand its memory to another stream
  while TensorRT reads it. A call also waits for the stream of the call before when the caller
  has changed streams since: that stream may still be reading the outputs this call overwrites.
* Activation memory: each context is made with ``ExecutionContextAllocationStrategy::kUSER_MANAGED``
  and given its block with ``setDeviceMemoryV2(memory, size)`` (TensorRT >= 10.1; Python
  ``set_device_memory``: "256-byte aligned device memory", size "at least as large as
  CudaEngine.get_device_memory_size_v2"). The memory "is in use from the invocation of enqueueV3()
  until network execution is complete … using it in another execution context running in parallel
  … will result in undefined behavior". The engines of one set run on one stream, so their
  calls never overlap whatever streams their callers use, and they share one block the
  size of the larger one (:func:`share_activation_memory`), as TensorRT's ``demo/Diffusion`` does
  for its engines (the call itself as Polygraphy's ``TrtRunner``, ``backend/trt/runner.py``:
  ``context.set_device_memory(ptr, nbytes)``); an engine used alone allocates its own at its first
  call.
* Plans are memory-mapped for ``deserialize_cuda_engine`` (which takes any buffer), not read into
  a private ``bytes`` per process (:func:`_mapped`).
* An engine and its contexts belong to the device that was current when they were made, and
  calls must run with it current (trtexec: ``cudaSetDevice`` before context creation and in every
  inference thread, ``samples/common/sampleInference.cpp``). So deserialisation, context creation
  and every call run under ``torch.cuda.device(self.device)``.

Outputs live in one buffer per output, sized for the largest shape any built profile allows and
returned as views: **an engine's outputs are valid until its next call** (callers copy what they
keep). GPU memory therefore stays flat however many shapes a server sees.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..contract import DYNAMIC_AXES, GraphSpec, ModelDims, graph_spec
from ..errors import BuildError, ConfigError, EngineLoadError, EngineRunError, ManifestError, ShapeError, describe, first_line
from ..profiles import select_profile

# setTensorAddress: "The pointer must have at least 256-byte alignment."
ADDRESS_ALIGNMENT = 256

# cudaStreamLegacy (0x1), cudaStreamPerThread (0x2) and the null stream are all default streams.
DEFAULT_STREAM_HANDLES = (0, 1, 2)

REBUILD_HINT = "rebuild with more --token-buckets or --dynamic-shape"


# setDeviceMemoryV2 / getDeviceMemorySizeV2 (user-managed activation memory) came in TensorRT 10.1.
MIN_TENSORRT = (10, 1)


def check_tensorrt_version(trt) -> None:
    """Refuses a TensorRT older than :data:`MIN_TENSORRT` in one line, before any call it lacks.

    Raises:
        BuildError: naming the version found and the upgrade.
    """
    found = tuple(int(part) for part in re.findall(r"\d+", trt.__version__)[:2])
    if found < MIN_TENSORRT:
        wanted = ".".join(map(str, MIN_TENSORRT))
        raise BuildError(describe(f"TensorRT {trt.__version__} is too old", expected=f">= {wanted}", fix=f"pip install -U 'tensorrt>={wanted}' (or 'hybridstitch[tensorrt]')"))


def _import_trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BuildError(describe("TensorRT is not installed on this host", fix="pip install 'hybridstitch[tensorrt]' (TensorRT >= 10.1, NVIDIA GPU), or run with --backend torch")) from exc
    check_tensorrt_version(tensorrt)
    return tensorrt


def preflight(device: torch.device):
    """What loading a plan needs before anything heavy: a CUDA device and TensorRT >= 10.1
    installed; returns the module.

    Raises:
        ManifestError: ``device`` is not a CUDA device.
        BuildError: TensorRT is missing or too old.
    """
    if torch.device(device).type != "cuda":
        raise ManifestError(describe("TensorRT engines run on CUDA devices", got=str(device), fix="pass --device cuda"))
    return _import_trt()


def check_plan_host(build_device: Mapping | None, device: torch.device, trt, folder, fix: str) -> None:
    """Refuses plans built for another GPU architecture or another TensorRT before any is read.

    By default "TensorRT engines are compatible only with the version of TensorRT used to build
    them" and "are not portable across different GPU architectures" (TensorRT docs, "Engine
    Compatibility" and the support matrix's "Engine Portability"); version and hardware
    compatibility are build-time options the build does not set. Without this check the mismatch
    shows only when ``deserialize_cuda_engine`` fails, which ``verify`` reaches after minutes of
    its torch reference. A GPU of the same compute capability but another model loads the plans
    (TensorRT warns it may be slower). Folders without the build's record are left to the load.

    Raises:
        EngineLoadError: naming what the plans were built for, what this host has, and ``fix``.
    """
    if not build_device:
        return
    major, minor = torch.cuda.get_device_capability(device)
    here = {"compute_capability": f"{major}.{minor}", "trt_version": str(trt.__version__)}
    if all(build_device.get(key) in (None, value) for key, value in here.items()):
        return
    built = f"sm {build_device.get('compute_capability')} ({build_device.get('gpu_name')}), TensorRT {build_device.get('trt_version')}"
    raise EngineLoadError(
        describe(
            f"the TensorRT plans of {folder} were built for another GPU architecture or TensorRT version", got=f"{device}: sm {here['compute_capability']} ({torch.cuda.get_device_name(device)}), TensorRT {here['trt_version']}",
            expected=built, fix=fix,
        )
    )


@contextlib.contextmanager
def _mapped(plan_path, graph: str, fix: str):
    """The plan file memory-mapped read-only for ``deserialize_cuda_engine`` (a ``py::buffer``
    in TensorRT's bindings, ``python/src/infer/pyCore.cpp``): file-backed pages that every process
    loading the same plan shares (Triton instances), where reading it into a ``bytes`` would hold a
    private copy of the plan (~16 GB for SD3.5-large in bf16) per process while it loads. The
    engine does not keep the buffer (TensorRT's samples free theirs after deserializing).

    Raises:
        EngineLoadError: the file cannot be read, or is empty.
    """
    try:
        with open(plan_path, "rb") as file:  # the mapping outlives the file object (mmap keeps its own descriptor)
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: "cannot mmap an empty file"
        raise EngineLoadError(describe(f"cannot read {graph} engine {plan_path}", got=first_line(exc), fix=fix)) from exc
    with data:
        yield data


def _memory_device(device: torch.device) -> torch.device:
    """Where the engine's tensors live: ``device`` itself. (The CPU test double in
    ``tests/trt_double.py`` replaces this one function so that host memory stands in for device
    memory; everything else runs as on a GPU.)"""
    return device


def torch_dtype_of(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.int64: torch.int64, trt.int32: torch.int32}
    if dtype not in table:
        raise EngineLoadError(describe("TensorRT engine tensor of an unsupported type", got=dtype, expected="float32 | float16 | bfloat16 | int64 | int32"))
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


def max_sizes(spec: GraphSpec, profiles: list[dict]) -> dict[str, int]:
    """The largest size of every dynamic axis over the profiles' maxima (``{input: [min, opt, max]}``)."""
    sizes: dict[str, int] = {}
    for profile in profiles:
        for tensor in spec.inputs:
            if tensor.name not in profile:
                continue
            for axis, size in zip(tensor.axes, profile[tensor.name][2]):
                if axis in DYNAMIC_AXES:
                    sizes[axis] = max(sizes.get(axis, 0), int(size))
    missing = [a for a in DYNAMIC_AXES if a not in sizes]
    if missing:
        raise ManifestError(describe(f"{spec.name}: the manifest's profiles leave axes unbounded", got=missing, expected="a range for every dynamic axis", fix="rebuild the engine folder"))
    return sizes


def output_capacity(spec: GraphSpec, profiles: list[dict]) -> dict[str, int]:
    """Elements of the largest value of each output any profile allows: one buffer each holds every call."""
    shapes = spec.shapes(max_sizes(spec, profiles))
    return {name: math.prod(shapes[name]) for name in spec.output_names}


class TrtEngine:
    """One deserialized plan with one execution context, on its own CUDA stream.

    Args:
        plan_path: the serialized plan.
        graph / dims: which graph of the contract the plan implements.
        device: the CUDA device (``cuda:N``) the engine is loaded on and runs on.
        profiles: the manifest's profiles, in the plan's order.
        built_with: "TensorRT x.y on GPU" for error messages.
        stream: a non-default ``torch.cuda.Stream`` on ``device`` to run on (e.g. one shared by an
            engine set); default: a private stream made here.
        fix: the rebuild command for error messages.

    Calls order themselves after the caller's current stream and make it wait for their work, so
    callers need no synchronisation of their own. Returned outputs are views of buffers reused by
    the next call (valid until then). One request at a time (one context).

    Raises:
        EngineLoadError: the plan cannot be read or deserialized here, or does not implement
            ``graph``; names the file, TensorRT's reason and ``fix``.
        ManifestError: ``device`` is not a CUDA device.
        ConfigError: ``stream`` is a default stream or on another device.
    """

    def __init__(self, plan_path: Path, graph: str, dims: ModelDims, device: torch.device, profiles: list[dict], built_with: str | None = None, stream=None, fix: str | None = None):
        self.spec = graph_spec(graph, dims)
        self.dims = dims
        self.profiles = profiles
        self.device = torch.device(device)
        trt = preflight(self.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        fix = fix or "rebuild on this host with hs-export build --backend tensorrt --force"
        memory = _memory_device(self.device)
        with torch.cuda.device(self.device), _mapped(plan_path, graph, fix) as data:
            self.logger = recording_logger(trt)  # kept alive as long as the runtime and engine
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                reason = self.logger.errors[0] if self.logger.errors else "deserialize_cuda_engine returned None"
                raise EngineLoadError(
                    describe(
                        f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)} cannot load {graph} engine {plan_path}",
                        got=reason, expected=f"a plan from this TensorRT version and GPU (built with {built_with or 'see manifest'})", fix=fix,
                    )
                )
            self._check_io(trt, plan_path, fix)
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if self.context is None:
                raise EngineLoadError(describe(f"TensorRT cannot create an execution context for {graph} engine {plan_path}", got=self._reason("create_execution_context returned None"), fix="free GPU memory or load fewer engines per GPU"))
            # Plans built before 2026-12-07 went through Polygraphy's DETAILED profiling verbosity,
            # which "will generally increase latency in enqueueV3()"; a context may lower its NVTX
            # verbosity, never raise it (NvInferRuntime.h, IExecutionContext::setNvtxVerbosity).
            if getattr(self.context, "nvtx_verbosity", None) == trt.ProfilingVerbosity.DETAILED:
                self.context.nvtx_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            if stream is None:
                stream = torch.cuda.Stream(self.device)
            elif stream.cuda_stream in DEFAULT_STREAM_HANDLES:
                raise ConfigError(describe("TensorRT engines run on a non-default CUDA stream", got=f"stream handle {stream.cuda_stream}", fix="pass torch.cuda.Stream(device), or no stream (the engine makes its own)"))
            elif stream.device != self.device:
                raise ConfigError(describe(f"{graph}: the engine runs on {self.device}", got=f"a stream on {stream.device}", fix=f"pass torch.cuda.Stream({str(self.device)!r})"))
            self.stream = stream
            self._last_caller = None  # the stream that received the previous call's outputs
            self.activation_bytes = int(self.engine.device_memory_size_v2)  # the maximum over all profiles
            self._activations: torch.Tensor | None = None
            self.dtypes = {name: torch_dtype_of(trt, self.engine.get_tensor_dtype(name)) for name in (*self.spec.input_names, *self.spec.output_names)}
            with torch.cuda.stream(self.stream):  # persistent memory, owned by this stream
                # setTensorAddress needs a non-null, 256-byte-aligned address even for zero-element
                # tensors: one aligned slot each (and one for empty activation memory), as trtexec
                # gives every tensor its own buffer, so no empty input shares an output's address.
                self._dummy_slots = {name: i for i, name in enumerate((*self.spec.input_names, *self.spec.output_names))}
                self._dummies = torch.empty(ADDRESS_ALIGNMENT * (len(self._dummy_slots) + 1), dtype=torch.uint8, device=memory)
                self._buffers = {
                    name: torch.empty(max(1, n), dtype=self.dtypes[name], device=memory) for name, n in output_capacity(self.spec, profiles).items()
                }
        self._profile: int | None = None

    def _check_io(self, trt, plan_path: Path, fix: str) -> None:
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = {*self.spec.input_names, *self.spec.output_names}
        if names != expected:
            odd = sorted(names ^ expected)
            raise EngineLoadError(describe(f"{plan_path} is not a {self.spec.name} engine of this contract", got=f"tensors differ: {odd[:4]}", expected=f"{len(expected)} tensors from graph_spec('{self.spec.name}')", fix=fix))
        # getTensorLocation: "E.g. shape tensors inputs are typically required to be on the CPU";
        # this backend binds device memory to every tensor, which a kHOST tensor must not get.
        on_host = sorted(n for n in expected if self.engine.get_tensor_location(n) != trt.TensorLocation.DEVICE)
        if on_host:
            raise EngineLoadError(describe(f"{plan_path} wants tensors in host memory", got=on_host[:4], expected="every I/O tensor on the GPU, as the contract's graphs export them", fix=fix))
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise EngineLoadError(describe(f"{plan_path} does not match its manifest", got=f"{self.engine.num_optimization_profiles} optimization profiles", expected=len(self.profiles), fix=fix))

    def _address(self, tensor: torch.Tensor, name: str | None = None) -> int:
        """``tensor``'s address, or for a zero-element one the dummy slot of ``name`` (``None``:
        activation memory's)."""
        return tensor.data_ptr() if tensor.numel() else self.dummy_address(name)

    def dummy_address(self, name: str | None) -> int:
        return self._dummies.data_ptr() + ADDRESS_ALIGNMENT * self._dummy_slots.get(name, len(self._dummy_slots))

    def use_activation_memory(self, block: torch.Tensor) -> None:
        """Gives the context ``block`` (bytes on this engine's device, at least
        :attr:`activation_bytes`) as its activation memory, kept alive by this engine.

        Raises:
            ConfigError: ``block`` is too small, on another device, or misaligned.
        """
        if block.device != _memory_device(self.device) or block.nbytes < self.activation_bytes:
            raise ConfigError(describe(f"{self.spec.name}: activation memory too small or on another device", got=f"{block.nbytes} bytes on {block.device}", expected=f">= {self.activation_bytes} bytes on {self.device}"))
        if block.numel() and block.data_ptr() % ADDRESS_ALIGNMENT:
            raise ConfigError(describe(f"{self.spec.name}: activation memory must be {ADDRESS_ALIGNMENT}-byte aligned", got=hex(block.data_ptr())))
        with torch.cuda.device(self.device):
            self.context.set_device_memory(self._address(block), block.nbytes)
        if block.numel():
            block.record_stream(self.stream)  # freed with the engine only after this stream's work
        self._activations = block

    def _bind_input(self, name: str, feed: torch.Tensor, stream) -> torch.Tensor:
        """``feed`` on this device in the engine's type, contiguous and aligned (copies made on
        ``stream``), its shape set and its address bound; recorded on ``stream``."""
        tensor = feed.to(device=_memory_device(self.device), dtype=self.dtypes[name]).contiguous()
        if tensor.numel() and tensor.data_ptr() % ADDRESS_ALIGNMENT:
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # a view at an odd offset
        if not self.context.set_input_shape(name, tuple(tensor.shape)):
            allowed = " or ".join(f"{p[name][0]}..{p[name][2]}" for p in self.profiles if name in p)
            raise ShapeError(describe(f"{self.spec.name}: TensorRT refused the shape of {name} in profile {self._profile}", got=list(tensor.shape), expected=allowed, fix=REBUILD_HINT))
        self._set_address(name, tensor)
        if tensor.numel():
            tensor.record_stream(stream)  # the allocator keeps it until this stream's work is done
        return tensor

    def _bind_output(self, name: str) -> torch.Tensor:
        shape = tuple(int(s) for s in self.context.get_tensor_shape(name))
        if any(s < 0 for s in shape):
            raise ShapeError(describe(f"{self.spec.name}: TensorRT cannot infer the shape of output {name}", got=shape, fix="set every input's shape (a contract or plan mismatch)"))
        numel = math.prod(shape)
        buffer = self._buffers[name]
        if numel > buffer.numel():
            raise ManifestError(describe(f"{self.spec.name}: output {name} outgrows the largest shape of the manifest's profiles", got=shape, expected=f"<= {buffer.numel()} elements", fix="rebuild the engine folder (the plan and manifest disagree)"))
        view = buffer[:numel].view(shape)
        self._set_address(name, view)
        return view

    def _set_address(self, name: str, tensor: torch.Tensor) -> None:
        # setTensorAddress: "\return True on success, false if error occurred" (NvInferRuntime.h);
        # ignored, the context would keep the previous call's address and use that memory.
        if not self.context.set_tensor_address(name, self._address(tensor, name)):
            raise EngineRunError(describe(f"{self.spec.name}: TensorRT refused the address of {name}", got=f"{self._reason('set_tensor_address returned False')} ({hex(self._address(tensor, name))})", expected=f"a {ADDRESS_ALIGNMENT}-byte aligned device address on {self.device}"))

    def _reason(self, default: str) -> str:
        """TensorRT's last error since this call began (the log is cleared at each call's start;
        while loading, it holds only the load's)."""
        return self.logger.errors[-1] if self.logger.errors else default

    def __call__(self, feeds: Mapping[str, torch.Tensor], outputs: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Runs the engine on ``feeds`` (any device and float type: converted here).

        Returns:
            The outputs named in ``outputs`` (default: all), views of this engine's buffers:
            valid until the next call.
        """
        self.spec.check_feeds(feeds)
        shapes = {name: tuple(feeds[name].shape) for name in self.spec.input_names}
        profile = select_profile(self.profiles, shapes, self.spec.name, REBUILD_HINT)
        wanted = set(self.spec.output_names if outputs is None else outputs)
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            stream = self.stream
            stream.wait_stream(caller)  # the feeds were made on the caller's stream
            if self._last_caller is not None and self._last_caller.cuda_stream != caller.cuda_stream:
                stream.wait_stream(self._last_caller)  # it may still read the outputs this call overwrites
            try:
                with torch.cuda.stream(stream):
                    results = self._enqueue(feeds, profile, stream)
            finally:
                caller.wait_stream(stream)  # the caller's next work sees the outputs
                self._last_caller = caller
        return {name: results[name] for name in self.spec.output_names if name in wanted}

    def _enqueue(self, feeds: Mapping[str, torch.Tensor], profile: int, stream) -> dict[str, torch.Tensor]:
        handle = stream.cuda_stream
        self.logger.errors.clear()  # so a failure names this call's reason, not an older one
        if self._activations is None:  # used alone: a block of its own
            self.use_activation_memory(torch.empty(self.activation_bytes, dtype=torch.uint8, device=_memory_device(self.device)))
        if profile != self._profile:
            try:  # before any setInputShape; on the enqueue stream, so no other synchronisation
                self.context.set_optimization_profile_async(profile, handle)
            except RuntimeError as exc:
                raise ShapeError(describe(f"{self.spec.name}: TensorRT refused optimization profile {profile}", got=first_line(exc), fix=REBUILD_HINT)) from exc
            self._profile = profile
        # Held through the enqueue; record_stream keeps their memory until the stream is past it.
        bound = [self._bind_input(name, feeds[name], stream) for name in self.spec.input_names]
        try:  # the binding raises RuntimeError("infer_shapes error code: -1") for a negative dimension
            missing = self.context.infer_shapes()
        except RuntimeError as exc:
            raise ShapeError(describe(f"{self.spec.name}: TensorRT cannot infer the shapes of this call in profile {profile}", got=self._reason(first_line(exc)), fix=REBUILD_HINT)) from exc
        if missing:
            raise ShapeError(describe(f"{self.spec.name}: TensorRT input shapes not fully specified", got=list(missing), fix="feed every input of the contract"))
        results = {name: self._bind_output(name) for name in self.spec.output_names}  # all need an address
        if not self.context.execute_async_v3(handle):
            raise EngineRunError(describe(f"TensorRT execution of {self.spec.name} failed", got=self._reason("execute_async_v3 returned False"), expected=f"shapes inside profile {profile}"))
        del bound
        return results


def share_activation_memory(engines: Iterable[TrtEngine]) -> torch.Tensor | None:
    """One activation block for the engines of a set, the size of the largest need, instead of one
    block each. They must run on one stream (made with the same ``stream=``): stream order is what
    keeps two enqueues from using the block at once, whatever streams the callers use.

    Raises:
        ConfigError: engines on several devices or streams.
    """
    engines = list(engines)
    if not engines:
        return None
    device = engines[0].device
    if any(e.device != device for e in engines):
        raise ConfigError(describe("engines sharing activation memory must be on one device", got=sorted({str(e.device) for e in engines})))
    streams = {e.stream.cuda_stream for e in engines}
    if len(streams) > 1:
        raise ConfigError(describe("engines sharing activation memory must run on one CUDA stream", got=f"{len(streams)} streams", fix="make them with the same stream=torch.cuda.Stream(device)"))
    # Allocated on the stream that uses it: the caching allocator may hand out memory another
    # stream's queued kernels still use, which only that stream's order makes safe (setDeviceMemoryV2:
    # "the memory is in use from the invocation of enqueueV3() until network execution is complete").
    with torch.cuda.device(device), torch.cuda.stream(engines[0].stream):
        block = torch.empty(max(e.activation_bytes for e in engines), dtype=torch.uint8, device=_memory_device(device))
    for engine in engines:
        engine.use_activation_memory(block)
    return block
