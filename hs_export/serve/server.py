"""``hs-export serve``: a model repository run on the ``tritonserver`` binary.

Life of a server:

1. What the instances hold at least (``preflight``: every instance's runtime, the text encoders
   + VAE of ``hybridstitch``'s, on a CPU each process's libraries) is checked against the device's free memory; a server
   that cannot fit is refused in one line, naming the instances that would.
2. The repository is written (``repository.write_repository``) into a temporary folder, or into
   ``--repo``, which is kept.
3. The ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships (PyTriton's own binding
   code is not used) starts on it with the Python backend: ``K`` instances per model, each a
   Python-backend process that loads its runtime and warms it up in ``initialize``, so
   ``/v2/models/NAME/ready`` turns true only when the model can serve.
4. SIGTERM or SIGINT is forwarded to Triton, which stops taking requests, finishes the ones in
   flight (up to ``--exit-timeout-secs``) and exits; the command then exits 0 and leaves no
   ``tritonserver`` behind. Triton 2.51 first closes its HTTP endpoint and waits for every open
   HTTP connection, idle keep-alive ones included (``http_server.cc``), then unloads the models;
   when that takes the whole timeout it exits 1 ("Exit timeout expired"), which a requested stop
   reports as a warning, not an error.

What runs is what NVIDIA's ``tritonserver`` container runs on the same repository. Scale-out is
Triton's own (one server per GPU, servers behind a load balancer or KServe); nothing here
coordinates servers.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import functools
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from hs_runtime.errors import ConfigError, describe

from .protocol import ServingError
from .preflight import check_serve_memory, free_memory, repository_needs
from .repository import Repository, RepositoryConfig, check_pipeline, check_repository, write_repository
from .triton_model import LOG_LEVEL_ENV

LOGGER = logging.getLogger("hs_export.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``hs-export serve`` takes besides the repository's own settings; CLI defaults
    come from here.

    Attributes:
        model: what the repository serves and how Triton schedules it.
        repo: write the repository here and keep it (default: a temporary folder, removed at exit).
        host: the address to listen on; a name is resolved to one (:attr:`address`).
        exit_timeout_s: how long Triton waits for in-flight requests after SIGTERM/SIGINT (>= 1:
            with 0 Triton never finishes unloading the models and exits 1).
        ready_timeout_s: how long the models may take to load and warm up.
        verbose: Triton's verbose log, and one log line per batch from the models.
    """

    model: RepositoryConfig = field(default_factory=RepositoryConfig)
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    repo: Path | None = None
    exit_timeout_s: int = 30
    ready_timeout_s: float = 1800.0
    verbose: bool = False

    def validate(self) -> None:
        self.model.validate()
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(describe(f"{flag} out of range", got=port, expected="1..65535"))
        if len(set(ports.values())) != 3:
            raise ConfigError(describe("HTTP, gRPC and metrics ports must differ", got=ports))
        if self.exit_timeout_s < 1:
            raise ConfigError(describe("--exit-timeout-secs must be >= 1", got=self.exit_timeout_s, fix="Triton needs time to unload the models; with 0 it exits with an error"))
        self.address  # an unresolvable --host is refused here
        if self.model.pipeline is not None:
            check_pipeline(self.model.pipeline)  # the server runs here: so must the text encoders and VAE
        kind, gpu = self.model.device_kind()
        if kind == "KIND_GPU" and (not torch.cuda.is_available() or gpu >= torch.cuda.device_count()):
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ConfigError(describe(f"--device {self.model.device}: no such CUDA device here", got=f"{found} CUDA device(s)", fix="serve on a GPU host, or pass --device cpu"))

    @cached_property
    def address(self) -> str:
        """The IP address :attr:`host` names (see :func:`listen_address`)."""
        return listen_address(self.host)


def listen_address(host: str) -> str:
    """The IP address Triton listens on for ``host``. Triton's HTTP and metrics endpoints bind IP
    literals only (libevhtp: ``localhost`` binds 255.255.255.255 and nothing answers), so a name
    is resolved here, IPv4 first.

    Raises:
        ConfigError: a name that does not resolve.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(describe(f"--host {host!r} does not resolve to an address", got=getattr(exc, "strerror", None) or str(exc), expected="an IP address (127.0.0.1, 0.0.0.0, ::1, ::) or a host name")) from None
    return sorted({info[4][0] for info in found}, key=lambda a: ":" in a)[0]


def url_host(address: str) -> str:
    """``address`` as a URL's host part (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


# ----------------------------------------------------------------------------- the binary


@dataclass(frozen=True)
class TritonDist:
    """The ``tritonserver`` binary, its libraries and Python backend, as the wheel ships them."""

    binary: Path
    libs: Path
    python_backend: Path  # libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this interpreter's Python version

    @classmethod
    def find(cls) -> "TritonDist":
        """Locates the binary in the installed ``nvidia-pytriton`` wheel.

        Raises:
            ServingError: the wheel is missing or lacks a stub for this Python.
        """
        try:
            import pytriton
        except ImportError:
            raise ServingError(describe("serving needs the tritonserver binary of nvidia-pytriton", fix="pip install 'hybridstitch[serve]' (Linux x86-64/aarch64), or run the repository in NVIDIA's tritonserver container")) from None
        root = Path(pytriton.__file__).resolve().parent
        dist = root / "tritonserver"
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        libs = next((p for p in (root.parent / "nvidia_pytriton.libs", dist / "external_libs") if p.is_dir()), root.parent / "nvidia_pytriton.libs")
        found = cls(dist / "bin" / "tritonserver", libs, dist / "backends" / "python", dist / "python_backend_stubs" / version / "triton_python_backend_stub")
        for what, path in (("tritonserver binary", found.binary), ("Python backend", found.python_backend / "libtriton_python.so"), (f"Python {version} backend stub", found.stub)):
            if not path.exists():
                raise ServingError(describe(f"nvidia-pytriton has no {what}", got=f"nothing at {path}", fix="reinstall nvidia-pytriton for this platform and Python"))
        return found

    def backend_directory(self, work: Path) -> Path:
        """``work/backends`` with a ``python`` backend whose stub sits beside
        ``libtriton_python.so`` (the wheel keeps one stub per Python version elsewhere)."""
        python = work / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for source in (self.python_backend / "libtriton_python.so", self.python_backend / "triton_python_backend_utils.py", self.stub):
            target = python / source.name
            if not target.exists():
                target.symlink_to(source)
        return python.parent

    def environment(self, environ=None) -> dict[str, str]:
        """Triton's environment: this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` (else
        the stub may load another ``libpython``: ``'_thread.RLock' object has no attribute
        '_recursion_count'``), the wheel's libraries last; this interpreter first on ``PATH``, so
        the stub's Python finds this environment's packages."""
        env = dict(os.environ if environ is None else environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p not in (libdir, str(self.libs))]
        env["LD_LIBRARY_PATH"] = ":".join([*([libdir] if libdir else []), *paths, str(self.libs)])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def command(self, repo: Path, backends: Path, address: str, http_port: int, grpc_port: int, metrics_port: int, exit_timeout_s: int = 30, gpu_metrics: bool = False, verbose: bool = False) -> list[str]:
        """``tritonserver --model-repository REPO`` with addresses, ports and the drain timeout.

        ``address`` is an IP address. IPv6 takes libevhtp's ``ipv6:[…]`` for HTTP and metrics
        (Triton's ``docs/protocol/README.md``, "IPv6") and ``[…]`` for gRPC (Triton appends
        ``:port``). Auto-complete is off: the written config is complete, and with it on the
        Python backend starts one more stub per model only to import ``model.py``.
        """
        v6 = ipaddress.ip_address(address).version == 6
        web, grpc = (f"ipv6:[{address}]", f"[{address}]") if v6 else (address, address)
        return [
            str(self.binary), f"--model-repository={repo}", f"--backend-directory={backends}", "--disable-auto-complete-config",
            f"--http-address={web}", f"--http-port={http_port}", f"--grpc-address={grpc}", f"--grpc-port={grpc_port}",
            f"--metrics-address={web}", f"--metrics-port={metrics_port}", "--allow-metrics=true", f"--allow-gpu-metrics={str(gpu_metrics).lower()}",
            f"--exit-timeout-secs={exit_timeout_s}", f"--log-verbose={1 if verbose else 0}",
        ]


def _die_with_parent(prctl, parent: int) -> None:
    """In the child before exec: its own process group (a terminal's Ctrl+C reaches only the
    parent, which forwards it once), and SIGTERM when the parent dies, so no tritonserver
    outlives ``serve`` even on SIGKILL. ``prctl`` is libc's, loaded in the parent (finding libc
    runs ``ldconfig``: no subprocess between fork and exec)."""
    os.setpgid(0, 0)
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl: no signal would come
        os._exit(1)


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fails early, in one line, when a port is taken (Triton would only log it)."""
    for flag, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ServingError(describe(f"cannot listen on {host}:{port}", got=exc.strerror or str(exc), fix=f"pick another {flag}, or stop what uses it")) from None


def local_address(host: str, port: int) -> str:
    """Where this host reaches a server listening on ``host:port``."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{url_host(host)}:{port}"


def model_ready(address: str, model: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/models/{model}/ready", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


class _Output:
    """Copies Triton's output to ours line by line and keeps the last lines for error messages."""

    def __init__(self, stream, sink):
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.thread = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
        self.thread.start()

    def _pump(self, stream, sink) -> None:
        """Reads Triton's pipe to its end whatever happens to ``sink``: a pipe nobody reads fills
        (~64 KiB) and blocks every Triton thread that logs, requests and health checks included."""
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self.lines.append(line.rstrip())
            if sink is None:
                continue
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):  # `serve | head` closed, a full disk, a closed file
                sink = None

    def reason(self) -> str:
        """Why Triton stopped: the first model that failed to load and its one-line reason, else
        the last error line, else the last line."""
        lines = [line for line in self.lines if line.strip()]
        for line in lines:
            found = _LOAD_FAILURE.search(line)
            if found:
                return f"model {found.group(1)} failed to load: {found.group(2).strip()}"
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["no output"])[-1].strip()

    def says(self, text: str) -> bool:
        return any(text in line for line in self.lines)


#: Seconds past ``--exit-timeout-secs`` that ``serve`` waits for Triton to exit before killing it.
EXIT_MARGIN_S = 30

#: What Triton logs when a stop outlasts ``--exit-timeout-secs`` (``core/src/server.cc``); it then exits 1.
EXIT_TIMEOUT = "Exit timeout expired"

#: Triton's line for a model that failed to load; the message ends at the first escaped newline.
_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (?:Internal: )?(.*?)(?:\\n|\"?$)")


def preflight(config: ServeConfig) -> tuple["TritonDist", str]:
    """Every check :func:`serve` makes before it starts anything: options, the engine folder and
    ``--repo`` (as writing the repository checks them), the ``tritonserver`` binary, free ports,
    and the memory the instances need; returns the binary and the memory line.

    Raises:
        ConfigError, ServingError, ManifestError: what :func:`serve` would refuse.
    """
    config.validate()
    check_repository(config.model, config.repo, "--repo")  # what writing the repository would refuse (the engine folder, backend, --repo)
    dist = TritonDist.find()
    check_ports_free(config.address, {"--http-port": config.http_port, "--grpc-port": config.grpc_port, "--metrics-port": config.metrics_port})
    return dist, check_serve_memory(repository_needs(config.model), free_memory(config.model.device))


def serve(config: ServeConfig, log=None) -> None:
    """Writes the repository, runs ``tritonserver`` on it until SIGTERM/SIGINT, and returns once
    Triton has drained and exited 0.

    Raises:
        ConfigError, ServingError, ManifestError: bad options, a taken port, an unusable engine
            folder (before anything starts), or Triton failing to start or stop cleanly.
    """
    log = log or LOGGER.info
    dist, memory = preflight(config)
    log(memory)
    work = Path(tempfile.mkdtemp(prefix="hybridstitch-serve-"))
    proc = None
    try:
        repository = write_repository(config.model, config.repo or work / "repository", log=log, flag="--repo")
        log(f"model repository: {repository.path}" + ("" if config.repo else " (temporary)"))
        env = dist.environment()
        env[LOG_LEVEL_ENV] = "DEBUG" if config.verbose else "INFO"
        command = dist.command(
            repository.path.resolve(), dist.backend_directory(work), config.address, config.http_port, config.grpc_port, config.metrics_port,
            config.exit_timeout_s, gpu_metrics=config.model.device.startswith("cuda"), verbose=config.verbose,
        )
        named = "" if config.address == config.host else f" ({config.host})"
        log(f"starting {dist.binary.name} on {config.address}{named} (HTTP {config.http_port}, gRPC {config.grpc_port}, metrics {config.metrics_port}); models load and warm up before they report ready")
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        die_with_parent = functools.partial(_die_with_parent, libc.prctl, os.getpid())
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        output = _Output(proc.stdout, sys.stdout)
        stopping = threading.Event()

        def _forward(signum, _frame):
            if not stopping.is_set():
                log(f"{signal.Signals(signum).name}: draining in-flight requests (up to {config.exit_timeout_s} s), then stopping")
            stopping.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            _wait_ready(config, repository, proc, output, stopping, log)
            killed = _wait_exit(config, proc, stopping)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        output.thread.join(timeout=5)
        if killed:  # its last log line would be a bystander, not the reason
            raise ServingError(describe(f"tritonserver did not exit within --exit-timeout-secs {config.exit_timeout_s} + {EXIT_MARGIN_S} s of the stop signal: killed", fix="see its log above for what it was waiting on"))
        if proc.returncode != 0 and stopping.is_set() and output.says(EXIT_TIMEOUT):
            log(
                f"stopped at --exit-timeout-secs {config.exit_timeout_s}: Triton waits for every open HTTP connection (clients that keep "
                "theirs alive) and in-flight request, and when the time ran out stopped the models without finalize (requests still running were cut)"
            )
            return
        if proc.returncode != 0:
            raise ServingError(describe("tritonserver stopped with an error", got=f"exit code {proc.returncode}: {output.reason()}", fix="see its log above"))
        log("stopped: tritonserver drained and exited")
    finally:
        if proc is not None and proc.poll() is None:  # only on an error above: never leave one behind
            _kill(proc)
        shutil.rmtree(work, ignore_errors=True)


def _wait_ready(config: ServeConfig, repository: Repository, proc, output: _Output, stopping: threading.Event, log) -> None:
    address = local_address(config.address, config.http_port)
    deadline = time.monotonic() + config.ready_timeout_s
    pending = list(repository.models)
    while pending and not stopping.is_set():
        if proc.poll() is not None:
            output.thread.join(timeout=5)  # its last lines hold the reason
            raise ServingError(describe("tritonserver exited during start-up", got=f"exit code {proc.returncode}: {output.reason()}", fix="see its log above"))
        if time.monotonic() > deadline:
            raise ServingError(describe(f"models not ready after {config.ready_timeout_s:.0f} s", got=f"waiting for {pending}", fix="see the log above"))
        pending = [m for m in pending if not model_ready(address, m)]
        if pending:
            time.sleep(0.25)
    if not pending:
        m = config.model
        batching = f"dynamic batching on (max batch {repository.max_batch_size}, queue delay {m.max_queue_delay_ms:g} ms, queue {m.max_queue or 'unbounded'})" if m.dynamic_batching else f"dynamic batching off (max batch {repository.max_batch_size})"
        log(
            f"ready: {', '.join(repository.models)} on http://{url_host(config.address)}:{config.http_port} and grpc://{url_host(config.address)}:{config.grpc_port}, "
            f"metrics http://{url_host(config.address)}:{config.metrics_port}/metrics; {m.instances} instance(s) per model on {m.device}, {batching}"
        )


def _wait_exit(config: ServeConfig, proc, stopping: threading.Event) -> bool:
    """Waits for Triton to exit; after a stop signal, at most the drain timeout plus a margin,
    then kills it. Returns whether it had to."""
    while proc.poll() is None and not stopping.is_set():
        time.sleep(0.25)
    try:
        proc.wait(timeout=config.exit_timeout_s + EXIT_MARGIN_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return True
    return False


def _kill(proc) -> None:
    """SIGKILL to Triton and its Python-backend processes (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
