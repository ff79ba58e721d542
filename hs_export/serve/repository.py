"""``hs-export triton-repo``: a Triton model repository for an engine folder (DESIGN §8).

What it writes, for each served model (``hybridstitch``; ``hybridstitch_latents``)::

    REPO/hybridstitch/config.pbtxt   inputs and outputs from ``protocol``, Python backend, instance
                                     group, dynamic batcher with a bounded queue, and parameters
                                     (engine folder, backend, pipeline) read by the model
    REPO/hybridstitch/1/model.py     one import: ``hs_export.serve.triton_model.TritonPythonModel``

The engine folder is referenced by its absolute path, or copied to ``REPO/<first model>/1/engines``
(``copy_engines``) and referenced relative to the repository, so the folder can move (e.g. into a
container). Nothing here starts Triton or loads an engine: a repository may be written on a CPU
host for a GPU container.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hs_runtime import __version__
from hs_runtime.backends.base import torch_dtype
from hs_runtime.backends.loading import check_backend
from hs_runtime.errors import ConfigError, describe
from hs_runtime.validation import check_pipeline, check_writable_folder

from .protocol import GENERATE, LATENTS, ModelSpec

#: Triton's ``data_type`` names for the protocol's ``triton_dtype``.
_CONFIG_DTYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "UINT8": "TYPE_UINT8"}

MODEL_PY = '''"""Triton Python-backend model written by `hs-export triton-repo` (hybridstitch {version}).

The code is hs_export.serve.triton_model (pip install hybridstitch); its settings are the
parameters in ../config.pbtxt.
"""

from hs_export.serve.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RepositoryConfig:
    """What the model repository serves and how Triton schedules it; CLI defaults come from here.

    Attributes:
        engine_dir: folder made by ``hs-export build``.
        instances: model instances per model, each a Triton Python-backend process with its own
            runtime (engines, text encoders and VAE; a CUDA stream on a GPU).
        device: ``cpu`` (``KIND_CPU``, no index) or ``cuda:N`` (``KIND_GPU`` on GPU ``N``); not
            checked against this host, which may only write the repository.
        backend: ``torch`` to serve the PyTorch graphs of the manifest's models (default: the
            folder's own backend).
        pipeline: text encoders + VAE folder, written as its absolute path (default: the engine
            folder's); without one only ``hybridstitch_latents`` is written. An absolute path
            need not exist on this host (it may name a folder in the server's container).
        text_dtype: precision ``hybridstitch`` loads the text encoders + VAE in (default fp32).
        models: which of ``hybridstitch`` and ``hybridstitch_latents`` to serve (default: both,
            or the latents model alone when no text encoders are known). Each model's instances
            hold their own engines, so serving one halves the memory.
        dynamic_batching: off: Triton's default scheduler, one request per execution (and no
            queue bound; meant for comparisons).
        max_batch_size: rows per Triton execution (default: the prompts one engine call takes).
        max_queue_delay_ms: how long the batcher may hold a request to fill a batch.
        max_queue: requests waiting in the batcher's queue before new ones are refused at once
            (``UNAVAILABLE``, HTTP 503); 0: no bound. At least ``max_batch_size``.
        copy_engines: copy the engine folder into the repository instead of referencing it.
    """

    engine_dir: Path | None = None
    instances: int = 1
    device: str = "cpu"
    backend: str | None = None
    pipeline: str | None = None
    text_dtype: str | None = None
    models: tuple[str, ...] | None = None
    dynamic_batching: bool = True
    max_batch_size: int | None = None
    max_queue_delay_ms: float = 50.0
    max_queue: int = 32
    copy_engines: bool = False

    def validate(self) -> None:
        if self.engine_dir is None:
            raise ConfigError(describe("no engine folder", fix="pass ENGINE_DIR (built by hs-export build)"))
        if self.instances < 1:
            raise ConfigError(describe("--instances must be >= 1", got=self.instances))
        if not 0 <= self.max_queue_delay_ms <= 60_000:
            raise ConfigError(describe("--max-queue-delay-ms out of range", got=self.max_queue_delay_ms, expected="0..60000"))
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(describe("--max-batch-size must be >= 1", got=self.max_batch_size))
        if self.max_queue < 0:
            raise ConfigError(describe("--max-queue must be >= 0", got=self.max_queue, fix="0 for no bound"))
        self.device_kind()
        if self.models is not None:
            known = (GENERATE.name, LATENTS.name)
            odd = [m for m in self.models if m not in known]
            if odd:
                raise ConfigError(describe("--models: not a model this repository serves", got=",".join(odd), expected=" | ".join(known)))
            if not self.models or len(set(self.models)) != len(self.models):
                raise ConfigError(describe("--models names each served model once", got=",".join(self.models) or "nothing", expected=" and/or ".join(known)))
        if self.text_dtype is not None:
            torch_dtype(self.text_dtype)  # an unknown name is refused here, not in every instance
        if self.pipeline is not None and (Path(self.pipeline).exists() or not Path(self.pipeline).is_absolute()):
            check_pipeline(self.pipeline)  # an absolute path not here may name a folder where the server runs (a container)

    def device_kind(self) -> tuple[str, int | None]:
        """``("KIND_CPU", None)`` or ``("KIND_GPU", N)`` for ``device``."""
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            device = None
        if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
            raise ConfigError(describe("unknown device", got=repr(self.device), expected="cpu or cuda:N", fix="Triton's CPU instances take no device index: pass --device cpu" if device is not None and device.type == "cpu" else None))
        return ("KIND_CPU", None) if device.type == "cpu" else ("KIND_GPU", device.index or 0)


@dataclass(frozen=True)
class Repository:
    """A written model repository: its folder, the models in it and their batch limit."""

    path: Path
    models: tuple[str, ...]
    max_batch_size: int
    engine_dir: Path


def served_models(manifest, pipeline: str | None, models: tuple[str, ...] | None = None) -> tuple[ModelSpec, ...]:
    """``models`` (names), or by default both models when text encoders + VAE are known
    (``--pipeline`` or the manifest's), else ``hybridstitch_latents`` alone.

    Raises:
        ConfigError: ``hybridstitch`` asked for without text encoders + VAE.
    """
    has_text = bool(pipeline or manifest.data.get("pipeline"))
    if models is None:
        return (GENERATE, LATENTS) if has_text else (LATENTS,)
    if GENERATE.name in models and not has_text:
        raise ConfigError(describe(f"{GENERATE.name} needs the text encoders and VAE", got=f"no --pipeline, and none in {manifest.folder}'s manifest", fix=f"pass --pipeline DIR, or --models {LATENTS.name}"))
    return tuple(spec for spec in (GENERATE, LATENTS) if spec.name in models)


def default_max_batch_size(manifest) -> int:
    """The prompts one engine call takes with the folder's default guidance (4 without a limit)."""
    from hs_runtime.runtime import HybridStitchRuntime

    from .batching import ServingDefaults

    guidance = ServingDefaults.from_manifest(manifest).settings.guidance_scale
    limits = HybridStitchRuntime(None, manifest=manifest).prompt_range(guidance > 1.0)  # reads the manifest only
    return limits[1] if limits else 4


def check_repository(config: RepositoryConfig, out: str | Path | None = None, flag: str = "--out") -> tuple[tuple[ModelSpec, ...], int]:
    """Every check :func:`write_repository` makes before it writes anything (``serve --dry-run``
    makes them too); returns the served models and the batch limit.

    Args:
        out: the repository folder, if already known; ``flag`` is how the user named it.

    Raises:
        ConfigError: bad options, or ``out`` is a file, holds something other than this toolkit's
            models, or cannot be written.
        ManifestError: the engine folder cannot be served, or not on ``config.backend``.
    """
    from hs_runtime.manifest import Manifest

    config.validate()
    manifest = Manifest.load(config.engine_dir)
    if config.backend is not None:
        check_backend(manifest, config.backend)  # what every instance would refuse while loading
    specs = served_models(manifest, config.pipeline, config.models)
    max_batch = config.max_batch_size or default_max_batch_size(manifest)
    if config.dynamic_batching and 0 < config.max_queue < max_batch:
        raise ConfigError(describe("--max-queue is below the batch size", got=f"{config.max_queue} < {max_batch}", expected=f">= {max_batch}, or 0 for no bound", fix="a smaller queue would refuse requests before a batch can fill"))
    if out is not None:
        _check_folder(Path(out), flag)
        _check_sources_outside(Path(out), config, flag)
    return specs, max_batch


def write_repository(config: RepositoryConfig, out: str | Path, log=lambda _: None, flag: str = "--out") -> Repository:
    """Writes (or rewrites) the model repository for ``config`` into ``out`` (named ``flag`` in errors).

    Raises:
        ConfigError, ManifestError: what :func:`check_repository` refuses.
    """
    out = Path(out)
    specs, max_batch = check_repository(config, out, flag)
    engine_dir = Path(config.engine_dir).resolve()
    if GENERATE not in specs and config.models is None:
        log(f"no text encoders/VAE known for {engine_dir} (pass --pipeline DIR): writing {LATENTS.name} only")
    if config.pipeline and not Path(config.pipeline).exists():
        log(f"--pipeline {config.pipeline} is not on this host: it must exist where the server runs")
    _clear(out)
    engines_param = str(engine_dir)
    if config.copy_engines:
        target = out / specs[0].name / "1" / "engines"  # in the version folder: Triton reads any other subfolder as a version and warns
        shutil.copytree(engine_dir, target)
        engines_param = target.relative_to(out).as_posix()
        log(f"copied {engine_dir} to {target}")
    for spec in specs:
        folder = out / spec.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(model_config(spec, config, max_batch, engines_param))
        (folder / "1" / "model.py").write_text(MODEL_PY.format(version=__version__))
    return Repository(out, tuple(s.name for s in specs), max_batch, engine_dir)


_OURS = (GENERATE.name, LATENTS.name)


def _check_folder(out: Path, flag: str) -> None:
    """Refuses a repository folder that is a file, holds other files, or cannot be written."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(describe(f"{flag} {out} is a file", fix="choose a folder"))
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OURS)
        if foreign:
            raise ConfigError(describe(f"{flag} {out} holds other files", got=foreign[:5], fix="choose an empty folder, or one written by hs-export triton-repo"))
    check_writable_folder(out, flag)


def _check_sources_outside(out: Path, config: RepositoryConfig, flag: str) -> None:
    """Refuses an engine or pipeline folder inside a model folder of ``out`` (where
    ``--copy-engines`` puts the engines): rewriting the repository removes those folders first; and
    with ``--copy-engines``, ``out`` inside the engine folder (the copy would copy itself)."""
    for what, source, fix in (
        ("engine folder", config.engine_dir, "pass the engine folder the repository was made from, or write the repository elsewhere"),
        ("--pipeline", config.pipeline, "pass a pipeline folder outside the repository, or write the repository elsewhere"),
    ):
        if source is None or not Path(source).exists():
            continue
        inside = [name for name in _OURS if Path(source).resolve().is_relative_to((out / name).resolve())]
        if inside:
            raise ConfigError(describe(f"the {what} {source} lies inside {flag} {out / inside[0]}, which rewriting the repository removes first", fix=fix))
    if config.copy_engines and out.resolve().is_relative_to(Path(config.engine_dir).resolve()):
        raise ConfigError(describe(f"{flag} {out} lies inside the engine folder {config.engine_dir} that --copy-engines copies into it", fix=f"write the repository outside {config.engine_dir}"))


def _clear(out: Path) -> None:
    """Makes ``out`` (checked by :func:`_check_folder`) an empty or toolkit-only folder; removes the
    models written there before."""
    for name in _OURS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config(spec: ModelSpec, config: RepositoryConfig, max_batch: int, engine_dir: str) -> str:
    """``config.pbtxt`` of one model (protobuf text format)."""

    def tensor(io, is_input: bool) -> str:
        dims = ", ".join(str(d) for d in io.shape)
        optional = " optional: true" if is_input and io.optional else ""
        return f"  {{ name: {_quote(io.name)} data_type: {_CONFIG_DTYPES[io.triton_dtype]} dims: [ {dims} ]{optional} }}"

    kind, gpu = config.device_kind()
    gpus = f" gpus: [ {gpu} ]" if gpu is not None else ""
    lines = [
        f"# Written by hs-export triton-repo (hybridstitch {__version__}); inputs and outputs: hs_export/serve/protocol.py",
        f"name: {_quote(spec.name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [",
        ",\n".join(tensor(io, True) for io in spec.inputs),
        "]",
        "output [",
        ",\n".join(tensor(io, False) for io in spec.outputs),
        "]",
        f"instance_group [ {{ count: {config.instances} kind: {kind}{gpus} }} ]",
    ]
    if config.dynamic_batching:
        queue = f"\n  default_queue_policy {{ max_queue_size: {config.max_queue} }}" if config.max_queue else ""
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(round(config.max_queue_delay_ms * 1000))}{queue}\n}}")
    pipeline = str(Path(config.pipeline).resolve()) if config.pipeline else ""  # absolute, like engine_dir: Triton's working folder is not this one
    parameters = {"engine_dir": engine_dir, "backend": config.backend or "", "pipeline": pipeline, "text_dtype": config.text_dtype or ""}
    lines += [f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in parameters.items()]
    return "\n".join(lines) + "\n"
