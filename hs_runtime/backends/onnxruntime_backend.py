"""``onnxruntime`` backend: CPU or CUDA execution provider.

On CUDA, inputs and outputs are bound to torch device tensors (I/O binding), so no step copies
through the host; output buffers are allocated from the contract's shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from ..contract import ModelDims, graph_spec
from ..errors import BuildError, ConfigError, EngineLoadError, EngineRunError, ManifestError, describe, first_line, out_of_memory

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BuildError(describe("onnxruntime is not installed", fix="pip install onnxruntime (CPU) or 'hybridstitch[gpu]' (CUDA)")) from exc
    return onnxruntime


_GLOBAL_POOL: list[int] = []  # set once this process's sessions share ONNX Runtime's global pool
THREAD_POOLS = ("global", "session")


def _use_global_pool(ort, intra: int) -> None:
    """Creates ONNX Runtime's process-wide thread pools once. ``set_global_thread_pool_sizes``
    raises "Global thread pools have already been created, cannot replace them" when the host
    made them first: its pools are then the ones the sessions join."""
    if _GLOBAL_POOL:
        return
    try:
        ort.set_global_thread_pool_sizes(intra, 1)
    except Exception as exc:  # ORT's Fail has no importable base class beyond Exception
        if "already been created" not in str(exc):
            raise
    _GLOBAL_POOL.append(intra)


def thread_pool(settings: Mapping) -> str:
    """The thread pool ``ort_session.json`` asks for; folders built before the setting existed
    ran one pool per session."""
    return settings.get("thread_pool", "session")


def session_options(settings: Mapping):
    """``onnxruntime.SessionOptions`` from the JSON settings saved beside the engines.

    ``thread_pool``: ``"global"`` (the default of new builds: the small and large sessions share
    ONNX Runtime's one process-wide intra-op pool, whose idle threads spin briefly, so an op
    starts without waking a thread and no session's spinning threads hold the cores the other
    session needs; 1.16–1.29× faster on the small ``shapes`` calls, level on ``bench``,
    docs/benchmarks.md) or ``"session"`` (each session its own threads, spinning off unless
    ``intra_op_allow_spinning``). ONNX Runtime refuses a session with its own threads once the
    global pools exist ("use_per_session_threads must be false when using a global thread
    pool"), so after any engine folder in this process has made them, every later session joins
    them: the same outputs, other threads. A host that creates ONNX Runtime sessions of its own
    in the same process sets ``use_per_session_threads = False`` on them too, or builds with
    ``--ort-thread-pool session``.
    """
    ort = _import_ort()
    pool = thread_pool(settings)
    if pool not in THREAD_POOLS:
        raise ConfigError(describe("unknown thread_pool in ort_session.json", got=repr(pool), expected=" | ".join(THREAD_POOLS)))
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    options.log_severity_level = int(settings.get("log_severity_level", 3))
    if pool == "global" or _GLOBAL_POOL:
        _use_global_pool(ort, int(settings.get("intra_op_num_threads", 0)))
        options.use_per_session_threads = False
        return options
    options.intra_op_num_threads = int(settings.get("intra_op_num_threads", 0))
    # The sampler alternates between sessions (small, large): a session whose idle
    # threads keep spinning steals the cores the next one needs (measured: ~18% per hybrid step
    # on 2 cores). Spinning is off unless the settings turn it on.
    spinning = "1" if settings.get("intra_op_allow_spinning", False) else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    return options


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception types (``InvalidProtobuf``, ``Fail``, ``NoSuchFile``, …): they
    share no base class beyond ``Exception``, so the load and run boundaries name them all."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def providers_for(device: torch.device) -> list:
    ort = _import_ort()
    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BuildError(
                describe("ONNX Runtime has no CUDA execution provider here", got=available, fix="pip install 'hybridstitch[gpu]' (onnxruntime-gpu), or run with --device cpu")
            )
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtEngine:
    """One graph in an ``onnxruntime.InferenceSession``.

    Args:
        fix: what to tell the user if ONNX Runtime refuses the file (the folder's rebuild command).

    Raises:
        EngineLoadError: ONNX Runtime could not load ``path``; names the file and ORT's reason.
    """

    def __init__(self, path: Path, graph: str, dims: ModelDims, device: torch.device, settings: Mapping | None = None, fix: str | None = None):
        ort = _import_ort()
        fix = fix or "rebuild with hs-export build --force"
        if not Path(path).is_file():
            raise ManifestError(describe(f"engine file missing for {graph}", got=str(path), fix=fix))
        self.spec = graph_spec(graph, dims)
        self.dims = dims
        self.device = torch.device(device)
        options, providers = session_options(settings or {}), providers_for(self.device)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except ort_errors() as exc:
            raise EngineLoadError(describe(f"ONNX Runtime cannot load {graph} engine {path}", got=first_line(exc), fix=fix)) from exc
        names = {i.name for i in self.session.get_inputs()} | {o.name for o in self.session.get_outputs()}
        expected = {*self.spec.input_names, *self.spec.output_names}
        if names != expected:  # as TrtEngine._check_io: a graph of other dims than the manifest's
            odd = sorted(names ^ expected)
            raise EngineLoadError(describe(f"{path} is not a {graph} engine of this contract", got=f"tensors differ: {odd[:4]}", expected=f"{len(expected)} tensors from graph_spec('{graph}')", fix=fix))
        # A CUDA provider that fails to start (a missing cuDNN or CUDA library) leaves the session
        # on the CPU with only an error in ONNX Runtime's log; get_providers() tells (ONNX Runtime
        # maintainers, microsoft/onnxruntime#23059; disable_fallback() does not stop it, #23647).
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise EngineLoadError(
                describe(
                    f"ONNX Runtime could not start its CUDA execution provider for {graph} engine {path}", got=f"session providers {self.session.get_providers()} (its reason is in the log above)",
                    fix="install the CUDA and cuDNN versions your onnxruntime-gpu needs (onnxruntime.ai: CUDA execution provider requirements), or run with --device cpu",
                )
            )

    def __call__(self, feeds: Mapping[str, torch.Tensor], outputs: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Runs the session on ``feeds``.

        Raises:
            OutOfMemoryError: ONNX Runtime could not allocate a buffer.
            EngineRunError: any other failure of ONNX Runtime's run (its one-line reason), in
                place of its own exception types, which share no base class but ``Exception``.
        """
        wanted = list(outputs) if outputs is not None else list(self.spec.output_names)
        try:
            if self.device.type == "cuda":
                return self._run_bound(feeds, wanted)
            arrays = {name: feeds[name].detach().cpu().numpy() for name in self.spec.input_names}
            results = self.session.run(wanted, arrays)
        except ort_errors() as exc:
            where = f"the {self.spec.name} engine ({self.device})"
            raise out_of_memory(exc, where) or EngineRunError(describe(f"ONNX Runtime failed running {where}", got=first_line(exc), fix="see ONNX Runtime's log; hs-export verify DIR checks the folder")) from exc
        return {name: torch.from_numpy(r) for name, r in zip(wanted, results)}

    def _run_bound(self, feeds: Mapping[str, torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        device_id = self.device.index or 0
        keep = []
        for name in self.spec.input_names:
            tensor = feeds[name].contiguous()
            keep.append(tensor)
            binding.bind_input(name, "cuda", device_id, _NP[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        sizes = self._sizes(feeds)
        shapes = self.spec.shapes(sizes)
        out_dtype = feeds[self.spec.inputs[0].name].dtype
        results = {}
        for name in wanted:
            buffer = torch.empty(shapes[name], dtype=out_dtype, device=self.device)
            binding.bind_output(name, "cuda", device_id, _NP[out_dtype], list(buffer.shape), buffer.data_ptr())
            results[name] = buffer
        # ONNX Runtime runs on a stream of its own and does not wait for the one that wrote the
        # bound inputs (microsoft/onnxruntime#26609, #32673): torch's stream must be done with the
        # inputs, and with the memory the outputs now take, before the run. The run itself returns
        # with its stream synchronised (the run option disable_synchronize_execution_providers is off).
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return results

    def _sizes(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Dynamic axis values read off the feeds (batch, height, tokens, …)."""
        sizes = {}
        for tensor in self.spec.inputs:
            for axis, size in zip(tensor.axes, feeds[tensor.name].shape):
                sizes.setdefault(axis, int(size))
        return sizes


def load_settings(folder: Path) -> dict:
    """The session settings saved beside the engines (``{}`` if the folder has none)."""
    path = Path(folder) / "ort_session.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(describe(f"unreadable {path}", got=first_line(exc), fix="run hs-export verify on the folder, or rebuild it with --force")) from exc
    if not isinstance(settings, dict):
        raise ManifestError(describe(f"unreadable {path}", got=type(settings).__name__, expected="a JSON object", fix="rebuild the folder with --force"))
    return settings
