"""``hs-export serve``: the runtime inside Triton Inference Server, through PyTriton.

Life of a server:

1. Triton starts with no models (``/v2/health/live`` answers; no model is ready yet).
2. ``K`` instances load, each with its own :class:`HybridStitchRuntime` (own engines, own CUDA
   stream on a GPU); the text encoders and VAE are loaded once and shared. Every instance runs
   one warm-up generation.
3. ``hybridstitch`` and ``hybridstitch_latents`` are bound with ``K`` handlers each (Triton's
   instance group), behind Triton's dynamic batcher: ``/v2/models/NAME/ready`` turns true only now.
4. SIGTERM or SIGINT: Triton stops taking requests, finishes the ones in flight (up to 30 s) and
   exits; the process exits 0 and leaves no ``tritonserver`` behind.

Scale-out is Triton's own: one server per GPU (``--device cuda:i``), many servers behind a load
balancer or a KServe InferenceService; nothing here coordinates servers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import sysconfig
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from hs_runtime.errors import ConfigError, HybridStitchError, ModelLoadError, describe
from hs_runtime.runtime import HybridStitchRuntime

from .batching import ServingDefaults, ServingLimits
from .handlers import Counters, GenerateHandler, Instance, LatentsHandler, SharedTextAndVae, warm_up, warm_up_latents
from .protocol import GENERATE, LATENTS, ServingError

LOGGER = logging.getLogger("hs_export.serve")

#: How long Triton waits for in-flight requests on SIGTERM (PyTriton kills it after 30 s anyway).
DRAIN_TIMEOUT_S = 30


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``hs-export serve`` takes; CLI defaults come from here.

    Attributes:
        instances: model instances, each with its own runtime (engines, CUDA stream).
        max_queue_delay_ms: how long Triton's dynamic batcher may hold a request to fill a batch.
        dynamic_batching: off: Triton's default scheduler, one request per execution.
        max_batch_size: rows per Triton execution (default: the prompts one engine call takes).
        pipeline: text encoders + VAE folder (default: the engine folder's).
        backend: ``torch`` to serve the PyTorch graphs of the manifest's models (default: the
            folder's own backend).
    """

    engine_dir: Path | None = None
    instances: int = 1
    device: str = "cpu"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue_delay_ms: float = 50.0
    dynamic_batching: bool = True
    max_batch_size: int | None = None
    pipeline: str | None = None
    backend: str | None = None

    def validate(self) -> None:
        if self.engine_dir is None:
            raise ConfigError(describe("no engine folder", fix="hs-export serve ENGINE_DIR (built by hs-export build)"))
        if self.instances < 1:
            raise ConfigError(describe("--instances must be >= 1", got=self.instances))
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(describe(f"{flag} out of range", got=port, expected="1..65535"))
        if len(set(ports.values())) != 3:
            raise ConfigError(describe("HTTP, gRPC and metrics ports must differ", got=ports))
        if not 0 <= self.max_queue_delay_ms <= 60_000:
            raise ConfigError(describe("--max-queue-delay-ms out of range", got=self.max_queue_delay_ms, expected="0..60000"))
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(describe("--max-batch-size must be >= 1", got=self.max_batch_size))
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(describe("unknown device", got=repr(self.device), expected="cpu, cuda or cuda:N")) from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(describe("unknown device", got=repr(self.device), expected="cpu, cuda or cuda:N"))
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ConfigError(describe(f"--device {self.device}: no such CUDA device here", got=f"{found} CUDA device(s)", fix="serve on a GPU host, or pass --device cpu"))


def use_own_libpython(environ=os.environ) -> str | None:
    """Puts this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` so Triton's Python stub
    loads the same ``libpython`` as the running interpreter (else, e.g., ``'_thread.RLock' object
    has no attribute '_recursion_count'``). Must run before Triton starts."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        rest = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
        environ["LD_LIBRARY_PATH"] = ":".join([libdir, *rest])
    return libdir


def check_ports_free(config: ServeConfig) -> None:
    """Fails early, in one line, when a port is taken (Triton would only log it and hang)."""
    for flag, port in (("--http-port", config.http_port), ("--grpc-port", config.grpc_port), ("--metrics-port", config.metrics_port)):
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host, port))
            except OSError as exc:
                raise ServingError(describe(f"cannot listen on {config.host}:{port}", got=exc.strerror or str(exc), fix=f"pick another {flag}, or stop what uses it")) from None


def load_instances(config: ServeConfig, log=LOGGER.info) -> tuple[list[Instance], bool]:
    """``K`` warmed-up instances and whether prompt-to-image is served (text encoders + VAE found)."""
    device = torch.device(config.device)
    instances: list[Instance] = []
    shared = None
    with_images = True
    for index in range(config.instances):
        start = time.perf_counter()
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():  # TensorRT engines bind the current stream
            runtime = HybridStitchRuntime.from_dir(config.engine_dir, backend=config.backend, device=config.device, pipeline_source=config.pipeline)
        if index == 0:
            try:
                shared = SharedTextAndVae(runtime.text_and_vae())
            except ModelLoadError as exc:
                with_images = False
                log(f"no text encoders/VAE ({exc}): serving {LATENTS.name} only")
        # Stage timings synchronise the whole device (torch.cuda.synchronize): with several GPU
        # instances that would stall the others' streams, so there only the total is measured.
        profile = stream is None or config.instances == 1
        instance = Instance(index, runtime, shared, ServingDefaults.from_manifest(runtime.manifest), ServingLimits.from_manifest(runtime.manifest), stream, profile)
        loaded = time.perf_counter() - start
        warm = warm_up(instance) if with_images else warm_up_latents(instance)
        log(f"instance {index}: engines loaded in {loaded:.1f} s, warmed up in {warm:.1f} s ({runtime.engines.backend} on {runtime.engines.device})")
        instances.append(instance)
    return instances, with_images


def _model_config(config: ServeConfig, instance: Instance):
    from pytriton.model_config import DynamicBatcher, ModelConfig

    d = instance.defaults.settings
    max_batch = config.max_batch_size or instance.max_prompts(d.guidance_scale) or 4
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(config.max_queue_delay_ms * 1000)) if config.dynamic_batching else None
    return ModelConfig(batching=True, max_batch_size=max_batch, batcher=batcher), max_batch


def _triton_config(config: ServeConfig):
    from pytriton.triton import TritonConfig

    return TritonConfig(
        http_address=config.host, http_port=config.http_port, grpc_address=config.host, grpc_port=config.grpc_port,
        metrics_address=config.host, metrics_port=config.metrics_port, allow_metrics=True,
        allow_gpu_metrics=config.device.startswith("cuda"), exit_timeout_secs=DRAIN_TIMEOUT_S, log_verbose=0,
    )


def _install_signal_handlers(log) -> None:
    """SIGTERM and SIGINT → one ``KeyboardInterrupt`` (the only thing PyTriton stops on); later
    signals are ignored while in-flight requests drain."""

    def _stop(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log(f"{signal.Signals(signum).name}: draining in-flight requests (up to {DRAIN_TIMEOUT_S} s), then stopping")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def serve(config: ServeConfig, log=None) -> Counters:
    """Runs the server until SIGTERM/SIGINT; returns the handlers' counters after the drain.

    Raises:
        ConfigError, ServingError, ManifestError: bad options, a taken port, an unusable engine
            folder (before anything is started).
    """
    log = log or LOGGER.info
    config.validate()
    try:
        import pytriton  # noqa: F401
        from pytriton.triton import Triton
    except ImportError:
        raise ServingError(describe("serving needs nvidia-pytriton", fix="pip install 'hybridstitch[serve]'")) from None
    from hs_runtime.manifest import Manifest

    Manifest.load(config.engine_dir)  # a bad folder fails before Triton starts
    check_ports_free(config)
    use_own_libpython()
    _install_signal_handlers(log)
    counters = Counters()
    triton = Triton(config=_triton_config(config))
    try:
        log(f"starting Triton Inference Server on {config.host} (HTTP {config.http_port}, gRPC {config.grpc_port}, metrics {config.metrics_port})")
        triton.run()  # live, no model ready yet
        instances, with_images = load_instances(config, log)
        model_config, max_batch = _model_config(config, instances[0])
        specs = [(GENERATE, GenerateHandler), (LATENTS, LatentsHandler)] if with_images else [(LATENTS, LatentsHandler)]
        for spec, handler in specs:
            triton.bind(
                model_name=spec.name, infer_func=[handler(instance, counters) for instance in instances],
                inputs=[t.tensor() for t in spec.inputs], outputs=[t.tensor() for t in spec.outputs], config=model_config, strict=False,
            )
        batching = f"dynamic batching on (max batch {max_batch}, queue delay {config.max_queue_delay_ms:g} ms)" if config.dynamic_batching else f"dynamic batching off (max batch {max_batch})"
        log(
            f"ready: {', '.join(s.name for s, _ in specs)} on http://{config.host}:{config.http_port} and grpc://{config.host}:{config.grpc_port}, "
            f"metrics http://{config.host}:{config.metrics_port}/metrics; {config.instances} instance(s), {batching}"
        )
        triton.serve()  # returns once stopped (KeyboardInterrupt from the signal handler)
    except KeyboardInterrupt:
        pass
    except HybridStitchError:
        raise
    except Exception as exc:  # PyTriton/Triton start-up failures: one line, the log has the rest
        if type(exc).__module__.startswith("pytriton") or isinstance(exc, TimeoutError):
            raise ServingError(describe("Triton Inference Server failed", got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", fix="see the server log above")) from None
        raise
    finally:
        triton.stop()
        log(f"stopped: {counters.executions} execution(s), {counters.rows} request row(s), {counters.denoise_calls} engine call(s), {counters.errors} refused")
        sys.stdout.flush()
    return counters
