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
from hs_runtime.errors import ConfigError, describe

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
        device: ``cpu`` (``KIND_CPU``) or ``cuda:N`` (``KIND_GPU`` on GPU ``N``); not checked
            against this host, which may only write the repository.
        backend: ``torch`` to serve the PyTorch graphs of the manifest's models (default: the
            folder's own backend).
        pipeline: text encoders + VAE folder (default: the engine folder's); without one only
            ``hybridstitch_latents`` is written.
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
            if odd or not self.models or len(set(self.models)) != len(self.models):
                raise ConfigError(describe("--models names each served model once", got=",".join(self.models) or "nothing", expected=" and/or ".join(known)))
        if self.text_dtype is not None:
            torch_dtype(self.text_dtype)  # an unknown name is refused here, not in every instance

    def device_kind(self) -> tuple[str, int | None]:
        """``("KIND_CPU", None)`` or ``("KIND_GPU", N)`` for ``device``."""
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ConfigError(describe("unknown device", got=repr(self.device), expected="cpu or cuda:N"))
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


def write_repository(config: RepositoryConfig, out: str | Path, log=lambda _: None) -> Repository:
    """Writes (or rewrites) the model repository for ``config`` into ``out``.

    Raises:
        ConfigError: bad options, or ``out`` holds something other than this toolkit's models.
        ManifestError: the engine folder cannot be served.
    """
    from hs_runtime.manifest import Manifest

    config.validate()
    manifest = Manifest.load(config.engine_dir)
    engine_dir = Path(config.engine_dir).resolve()
    specs = served_models(manifest, config.pipeline, config.models)
    if GENERATE not in specs and config.models is None:
        log(f"no text encoders/VAE known for {engine_dir} (pass --pipeline DIR): writing {LATENTS.name} only")
    max_batch = config.max_batch_size or default_max_batch_size(manifest)
    if config.dynamic_batching and 0 < config.max_queue < max_batch:
        raise ConfigError(describe("--max-queue is below the batch size", got=f"{config.max_queue} < {max_batch}", expected=f">= {max_batch}, or 0 for no bound", fix="a smaller queue would refuse requests before a batch can fill"))
    out = Path(out)
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


def _clear(out: Path) -> None:
    """Makes ``out`` an empty or toolkit-only folder; removes the models written there before."""
    ours = {GENERATE.name, LATENTS.name}
    if out.exists():
        if not out.is_dir():
            raise ConfigError(describe(f"--out {out} is a file", fix="choose a folder"))
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise ConfigError(describe(f"--out {out} holds other files", got=foreign[:5], fix="choose an empty folder, or one written by hs-export triton-repo"))
        for name in ours:
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
    parameters = {"engine_dir": engine_dir, "backend": config.backend or "", "pipeline": config.pipeline or "", "text_dtype": config.text_dtype or ""}
    lines += [f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in parameters.items()]
    return "\n".join(lines) + "\n"
