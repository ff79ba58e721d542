"""Memory a server's instances hold, checked before ``hs-export serve`` starts Triton.

Every Triton instance is its own Python-backend process with its own runtime, so nothing is
shared: ``instances × (hybridstitch + hybridstitch_latents)``. One instance holds at least what
``hs-export inspect`` calls "run needs" (weights, engine outputs, the default plan's K/V cache),
and the ``hybridstitch`` model also the text encoders and VAE (in ``--text-dtype``, fp32 by default).
On a CPU each instance process also holds its interpreter and libraries (:data:`CPU_PROCESS_BYTES`);
on a GPU its CUDA context is not counted. That is a lower bound: each engine call's activations
come on top. A server whose lower bound does not fit is refused in one line before
anything starts, instead of instances dying one by one (or the host's OOM killer choosing) minutes
into loading.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from hs_export.build.limits import ELEMENT_BYTES, available_memory, folder_run_needs, format_bytes, text_and_vae_elements
from hs_runtime.errors import ConfigError, describe

from .protocol import GENERATE

#: Resident memory of one instance process on a CPU before its models: Python with torch, ONNX
#: Runtime, diffusers and transformers imported. Measured 2026-12-07: 477 MiB resident (475 MiB
#: private) for an instance of the tiny preset, whose models and text encoders are ~2 MiB.
CPU_PROCESS_BYTES = 450 * 2**20


@dataclass(frozen=True)
class ServeNeeds:
    """The lower bound of what a server's instances hold, per model and in all."""

    per_instance: dict[str, int]  # served model → bytes one instance of it holds at least
    instances: int
    device: str
    unknown: tuple[str, ...] = ()  # what could not be counted (e.g. a pipeline not on local disk)
    text_bytes: int = 0  # the text encoders + VAE in one instance of hybridstitch
    text_dtype: str = "fp32"
    process_bytes: int = 0  # each instance process's interpreter and libraries (CPU only)

    @property
    def per_process(self) -> dict[str, int]:
        """Bytes one instance process of each model holds at least."""
        return {name: n + self.process_bytes for name, n in self.per_instance.items()}

    @property
    def total(self) -> int:
        return self.instances * sum(self.per_process.values())

    def summary(self) -> str:
        text = f" (text encoders + VAE {format_bytes(self.text_bytes)} in {self.text_dtype})" if self.text_bytes else ""
        models = " + ".join(f"{name} {format_bytes(n)}" + (text if name == GENERATE.name else "") for name, n in self.per_instance.items())
        missing = f"; not counted: {', '.join(self.unknown)}" if self.unknown else ""
        processes = f" + {self.instances * len(self.per_instance)} process(es) × {format_bytes(self.process_bytes)} of libraries" if self.process_bytes else ""
        return f"{self.instances} instance(s) × ({models}){processes} ≥ {format_bytes(self.total)} on {self.device}, plus each call's activations{missing}"


def repository_needs(config) -> ServeNeeds:
    """:func:`serve_needs` of what a :class:`~.repository.RepositoryConfig` serves."""
    from hs_runtime.manifest import Manifest

    from .repository import served_models

    manifest = Manifest.load(config.engine_dir)
    served = tuple(spec.name for spec in served_models(manifest, config.pipeline, config.models))
    return serve_needs(manifest, served, config.instances, config.device, config.backend, config.pipeline, config.text_dtype)


def serve_needs(manifest, models: tuple[str, ...], instances: int, device: str, backend: str | None, pipeline: str | None, text_dtype: str | None = None) -> ServeNeeds:
    """What ``instances`` instances of each of ``models`` hold at least on ``device``; the text
    encoders and VAE in ``text_dtype`` (fp32 by default, as the runtime loads them)."""
    text_dtype = text_dtype or "fp32"
    runtime = folder_run_needs(manifest, backend)[0].total
    per_instance, unknown, text = {}, [], 0
    for name in models:
        per_instance[name] = runtime
        if name == GENERATE.name:
            source = pipeline or manifest.data.get("pipeline")
            elements = text_and_vae_elements(source)
            if elements is None:
                unknown.append(f"text encoders + VAE ({source})")
            else:
                text = elements * ELEMENT_BYTES[text_dtype]
                per_instance[name] += text
    process = CPU_PROCESS_BYTES if device == "cpu" else 0
    return ServeNeeds(per_instance, instances, device, tuple(unknown), text, text_dtype, process)


def free_memory(device: str) -> int | None:
    """Bytes ``device`` can give now: the host's available memory for ``cpu``; for ``cuda:N``,
    ``torch.cuda.mem_get_info`` (cudaMemGetInfo) asked in a short-lived process, so this one
    never holds a CUDA context for the server's life. ``None`` if it cannot be asked."""
    if device == "cpu":
        return available_memory()
    index = device.partition(":")[2] or "0"
    code = f"import torch; print(torch.cuda.mem_get_info({int(index)})[0])"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def check_serve_memory(needs: ServeNeeds, free: int | None) -> str:
    """Refuses a server whose instances cannot fit; returns the line ``serve`` logs.

    Raises:
        ConfigError: the lower bound exceeds ``free``, with the most instances that fit.
    """
    if free is None:
        return f"memory: {needs.summary()}; free memory on {needs.device} unknown, not checked"
    if needs.total > free:
        per = sum(needs.per_process.values())
        fit = free // per if per else needs.instances
        fix = f"serve with --instances {fit} or fewer" if fit else f"free memory on {needs.device}, or serve on a larger host"
        if needs.text_dtype == "fp32" and needs.total - needs.instances * needs.text_bytes // 2 <= free:
            fix += ", or pass --text-dtype bf16 (the text encoders and VAE in half the memory: then it fits)"
        alone = [name for name, n in needs.per_process.items() if needs.instances * n <= free]
        if len(needs.per_instance) > 1 and alone:
            fix += f", or serve one model (--models {alone[0]} fits)"
        raise ConfigError(
            describe(
                f"the server would not fit in memory on {needs.device}",
                got=f"{format_bytes(free)} free", expected=needs.summary(), fix=fix + " (hs-export inspect ENGINE_DIR shows one runtime's needs)",
            )
        )
    return f"memory: {needs.summary()}; {format_bytes(free)} free"
