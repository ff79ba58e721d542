"""The one small protocol every backend implements: named tensors in, named tensors out."""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol

import threading
from contextlib import contextmanager, nullcontext

import torch

from ..contract import GraphSpec, ModelDims
from ..errors import ConcurrencyError, ConfigError, describe

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(precision: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a precision name (``fp32``, ``fp16``, ``bf16``); a dtype passes through.

    Raises:
        ConfigError: any other name.
    """
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in PRECISIONS:
        raise ConfigError(describe("unknown precision", got=repr(precision), expected=" | ".join(PRECISIONS)))
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype) -> str:
    """``fp32``, ``fp16`` or ``bf16``: the name a manifest and the CLI use for ``dtype``."""
    return next((name for name, d in PRECISIONS.items() if d == dtype), str(dtype).replace("torch.", ""))


class Engine(Protocol):
    """One compiled graph. Inputs and outputs are torch tensors on the engine's device.

    ``outputs`` names the outputs the caller needs; an engine may skip the others (dense steps
    that keep no K/V ask for ``velocity_tokens`` alone).
    """

    spec: GraphSpec
    dims: ModelDims

    def __call__(self, feeds: Mapping[str, torch.Tensor], outputs: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        ...


class EngineSet:
    """The ``small`` and ``large`` engines of one build, with the device and float dtype they
    exchange tensors in.

    ``precision`` is what the engines compute in (``fp32``, ``fp16``, ``bf16``; engine I/O is in
    the same type, ``timestep`` fp32), used to suggest the fix when a graph overflows.

    Not thread-safe: TensorRT contexts and reused output buffers serve one request at a time.
    :meth:`exclusive` makes a second concurrent user fail loudly instead of corrupting them.
    """

    def __init__(self, engines: Mapping[str, Engine], device: torch.device, dtype: torch.dtype, backend: str, precision: str | None = None, check_size=None):
        self.engines = dict(engines)
        # check_size(latent_height, latent_width): raises for a size the build was not made for
        # (engine folders; None for torch models, which take any size their position table holds).
        self.check_size = check_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.backend = backend
        self.precision = precision
        self._lock = threading.RLock()  # reentrant: a request split into chunks holds it throughout

    @contextmanager
    def exclusive(self):
        """Held for one whole request; raises :class:`ConcurrencyError` if another thread holds it."""
        if not self._lock.acquire(blocking=False):
            raise ConcurrencyError(describe("this runtime is already running a request in another thread", fix="create one runtime per thread (engines cannot be shared)"))
        try:
            yield
        finally:
            self._lock.release()

    def host_work(self):
        """Held for one whole denoise: the torch threads of the sampler's own work between engine
        calls (guidance, Euler update, patchify, gathers, the mask).

        ONNX Runtime on a CPU: one thread (:func:`torch_threads`). Those tensors are a few latents
        in size, but torch's element-wise and pooling kernels split them over its OpenMP threads,
        which then spin on the cores the next ONNX Runtime call needs while its own pool spins on
        them too: on 2 cores the hybrid steps' calls took 1.1–1.4× their time alone and the
        ``shapes`` ``hybrid`` plan took 1.14× as long (docs/benchmarks.md). Other backends compute
        in torch or on a GPU: torch is left as it is.
        """
        return torch_threads(1) if self.backend == "onnxruntime" and self.device.type == "cpu" else nullcontext()

    def __getitem__(self, name: str) -> Engine:
        return self.engines[name]

    def __contains__(self, name: str) -> bool:
        return name in self.engines


@contextmanager
def torch_threads(count: int):
    """``torch.set_num_threads(count)`` while held, then the count the calling thread had.

    With the OpenMP backend of torch's CPU builds the count is the calling thread's own (OpenMP's
    per-thread setting; a thread that first uses torch meanwhile starts from the last count set):
    concurrent denoises in other threads and the host's other threads keep theirs, and each holder
    restores its own thread. ``tests/test_runtime.py`` checks this with two threads that overlap.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
