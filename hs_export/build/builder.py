"""``hs-export build``: models → graphs → ONNX → engines → manifest, atomically.

Phases: limits (the I/O, memory and disk the build needs, from the configs alone; refused before
anything is exported) → load → export (graph files with the weights streamed beside them) →
engines → check (each engine against its PyTorch graph, one model in memory at a time) → hash.
The large model's weights exist once in the finished folder: ONNX Runtime engines are the
exported files themselves; TensorRT builds delete the ONNX files once the plans are checked
(``--keep-onnx`` keeps them).

The engine folder is assembled in a sibling work folder and swapped in only when complete, so a
folder is never half-overwritten. A build interrupted by SIGINT removes its work folder; one killed
outright leaves only the work folder, which the next build removes (its pid is gone). A second
build with the same inputs (weights, configs, pipeline, flags, library versions) finds the same
fingerprint and skips.
"""

from __future__ import annotations

import datetime
import gc
import glob
import hashlib
import json
import math
import os
import resource
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hs_runtime import __version__
from hs_runtime.backends.base import torch_dtype
from hs_runtime.backends.onnxruntime_backend import THREAD_POOLS
from hs_runtime.contract import GRAPH_NAMES, ModelDims, graph_spec
from hs_runtime.errors import BuildError, ConfigError, ManifestError, NumericalError, ToleranceError, describe
from hs_runtime.graphs import TokenGraph
from hs_runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, artifact_records, write_manifest
from hs_runtime.models import check_pair, load_transformer, resolve_transformer_source
from hs_runtime.pipeline import check_image_size
from hs_runtime.plans import PlanConfig
from hs_runtime.profiles import BuildShape, graph_profiles
from hs_runtime.validation import check_folder_path, check_int, check_pipeline

from . import export as onnx_export
from .limits import BuildNeeds, build_needs, check_gpu, check_limits, format_bytes, format_run_needs, format_table, run_needs
from .precision import apply_precision_plan, precision_plan
from .sources import ModelSelection, model_configs, resolve_models

BACKENDS = ("onnxruntime", "tensorrt")
OPSETS = (14, 20)  # scaled_dot_product_attention exports from opset 14; torch's TorchScript exporter stops at 20


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``hs-export build`` takes besides the models. CLI defaults come from here.

    Attributes:
        height / width: image size in pixels (``None``: the preset's, else 1024).
        text_tokens: T_txt (``None``: 77 + the preset's T5 length, else 333).
        prompts: prompts per call; engines take ``2 × prompts`` rows with guidance.
        force: rebuild a folder that is up to date or built for something else, and try a
            build the host's memory or disk looks too small for.
        keep_onnx: keep the ONNX files of a TensorRT build (ONNX Runtime engines are ONNX files).
        ort_thread_pool: ``global`` (the small and large ONNX Runtime sessions share the process's
            pool; faster, but process-wide: see ``session_options``) or ``session``.
    """

    out: Path | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    height: int | None = None
    width: int | None = None
    prompts: int = 1
    text_tokens: int | None = None
    mask_ratio: float = PlanConfig().mask.ratio
    opset: int = 17
    dynamic_shape: bool = False
    token_buckets: int = 1
    builder_optimization_level: int = 3
    force: bool = False
    keep_onnx: bool = False
    ort_thread_pool: str = "global"
    vae_scale_factor: int = 8

    def validate(self) -> None:
        if self.out is None:
            raise ConfigError(describe("no output folder", fix="set BuildConfig(out=...) or pass --out"))
        if self.backend not in BACKENDS:
            raise ConfigError(describe("unknown backend", got=repr(self.backend), expected=" | ".join(BACKENDS)))
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(describe("unknown precision", got=repr(self.precision), expected="fp32 | fp16 | bf16"))
        if self.backend == "onnxruntime" and self.precision == "bf16":
            raise ConfigError(describe("bf16 engines need TensorRT", got="--backend onnxruntime --precision bf16", fix="use --precision fp32|fp16 or --backend tensorrt"))
        if self.ort_thread_pool not in THREAD_POOLS:
            raise ConfigError(describe("unknown ONNX Runtime thread pool", got=repr(self.ort_thread_pool), expected=" | ".join(THREAD_POOLS)))
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ConfigError(describe("mask ratio out of range", got=self.mask_ratio, expected="a value in (0, 1]"))
        check_folder_path(self.out, "--out", fix="choose another --out")
        check_int("vae scale factor", self.vae_scale_factor)
        check_image_size(self.height, self.width, self.vae_scale_factor)
        check_int("prompts", self.prompts)
        if self.text_tokens is not None:
            check_int("text tokens", self.text_tokens)
        check_int("opset", self.opset, *OPSETS)
        check_int("token buckets", self.token_buckets)
        check_int("builder optimization level", self.builder_optimization_level, 0, 5)


@dataclass
class BuildReport:
    """What a build did: the manifest, whether it was skipped, and seconds per phase."""

    manifest: Manifest
    skipped: bool
    phases: dict = field(default_factory=dict)


def library_versions() -> dict:
    """Versions that change an engine's bytes or numerics."""
    versions = {"hybridstitch": __version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "tensorrt", "diffusers", "polygraphy"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            versions[name] = None
    return versions


def weights_sha256(source: str, model) -> str:
    """sha256 over the weight files of a local model folder (or the loaded tensors for hub ids)."""
    where, subfolder = resolve_transformer_source(source)
    folder = Path(where) / subfolder if subfolder else Path(where)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")) if folder.is_dir() else []
    if files:
        for path in files:
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
    else:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rebuild_command(selection: ModelSelection, config: BuildConfig, height: int, width: int, text_tokens: int) -> str:
    q = shlex.quote  # paths with spaces stay one argument
    models = f"--preset {selection.preset}" if selection.preset else f"--small {q(selection.small)} --large {q(selection.large)}"
    parts = [
        "hs-export build", models, f"--out {q(str(Path(config.out).resolve()))}", f"--backend {config.backend}", f"--precision {config.precision}",
        f"--height {height} --width {width}", f"--prompts {config.prompts}", f"--text-tokens {text_tokens}",
        f"--mask-ratio {config.mask_ratio}", f"--opset {config.opset}",
    ]
    if config.dynamic_shape:
        parts.append("--dynamic-shape")
    if config.token_buckets != 1:
        parts.append(f"--token-buckets {config.token_buckets}")
    if selection.pipeline_given:
        parts.append(f"--pipeline {q(selection.pipeline)}")
    if config.backend == "tensorrt" and config.builder_optimization_level != BuildConfig.builder_optimization_level:
        parts.append(f"--builder-optimization-level {config.builder_optimization_level}")
    if config.keep_onnx:
        parts.append("--keep-onnx")
    if config.backend == "onnxruntime" and config.ort_thread_pool != BuildConfig.ort_thread_pool:
        parts.append(f"--ort-thread-pool {config.ort_thread_pool}")
    return " ".join(parts)


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes: Linux's ``VmHWM`` (its own; a
    child's ``ru_maxrss`` starts at its parent's peak across fork + exec), else ``ru_maxrss``
    (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class _Phases:
    """Per-phase wall times, logged as each phase ends with the process's peak memory so far."""

    def __init__(self, log):
        self.log = log
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str, what: str):
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        self.log(f"[{phase}] {what} ({elapsed:.1f} s, peak memory {peak_rss() / 2**30:.2f} GiB)")


class ForeignFolderError(BuildError):
    """``--out`` holds a complete build of other inputs (or of an earlier fingerprint)."""


def check_out_folder(out: Path, fingerprint: str, force: bool, log=print) -> Manifest | None:
    """Returns a complete, up-to-date manifest to skip with; raises for foreign folders."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildError(describe(f"--out is a file, not a folder: {out}", fix="choose another --out"))
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        if any(out.iterdir()):
            raise BuildError(describe(f"--out {out} is not empty and holds no {MANIFEST_NAME}", fix="refusing to overwrite it: choose a new or empty folder"))
        return None
    data = _manifest_data(out)
    same = data.get("fingerprint") == fingerprint
    if same and data.get("complete") and not force:
        try:
            return Manifest.load(out)
        except ManifestError as exc:
            log(f"{out} is damaged, rebuilding it: {exc}")
            return None
    if not same and not force:
        raise ForeignFolderError(
            describe(
                f"--out {out} holds engines built for something else (other weights, pipeline, flags or library versions; or a build by hs-export before the fingerprint changed on 2026-12-07)",
                got=f"fingerprint {str(data.get('fingerprint'))[:12]}", expected=fingerprint[:12], fix="pass --force to replace them, or choose another --out",
            )
        )
    return None


def _ensure_writable(out: Path) -> None:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(describe(f"cannot create {parent}", got=exc.strerror, fix="choose a writable --out")) from exc
    if not os.access(parent, os.W_OK):
        raise BuildError(describe(f"--out parent folder is not writable: {parent}", fix="choose a writable --out"))


@dataclass(frozen=True)
class BuildPlan:
    """What a build will make, known before any weight is loaded."""

    shape: BuildShape
    height: int
    width: int
    text_tokens: int
    configs: dict
    dims: dict
    needs: BuildNeeds


def plan_build(selection: ModelSelection, config: BuildConfig) -> BuildPlan:
    """Sizes, dims and the limits table from the model configs alone (no weights loaded).

    Raises:
        ConfigError / ShapeError: a setting out of range, a latent the models cannot take.
    """
    config.validate()
    height = selection.height if config.height is None else config.height
    width = selection.width if config.width is None else config.width
    text_tokens = config.text_tokens if config.text_tokens is not None else selection.clip_tokens + selection.max_sequence_length
    if selection.pipeline is not None and text_tokens <= selection.clip_tokens:  # T_txt = CLIP's tokens + T5's: none left for T5
        raise ConfigError(describe("--text-tokens must exceed the CLIP tokens", got=text_tokens, expected=f"> {selection.clip_tokens} ({selection.clip_tokens} CLIP + the T5 tokens)", fix=f"e.g. --text-tokens {selection.clip_tokens + selection.max_sequence_length} (the preset's)"))
    shape = BuildShape(
        prompts=config.prompts, latent_height=height // config.vae_scale_factor, latent_width=width // config.vae_scale_factor,
        text_tokens=text_tokens, mask_ratio=config.mask_ratio, dynamic_shape=config.dynamic_shape, token_buckets=config.token_buckets,
    )
    configs = model_configs(selection)
    check_pair(configs["small"], configs["large"])
    dims = {role: ModelDims.from_config(configs[role]) for role in GRAPH_NAMES}
    for role, d in dims.items():
        d.check_latent(shape.latent_height, shape.latent_width, role)
    image_tokens = (shape.latent_height // dims["large"].patch_size) * (shape.latent_width // dims["large"].patch_size)
    if config.token_buckets > image_tokens:  # one bucket per token count at most
        raise ConfigError(describe("--token-buckets exceeds the image tokens", got=config.token_buckets, expected=f"<= {image_tokens} at {width}×{height} px"))
    needs = build_needs(shape, dims, configs, config.precision, config.backend)
    return BuildPlan(shape, height, width, text_tokens, configs, dims, needs)


def dry_run(selection: ModelSelection, config: BuildConfig, log=print) -> BuildPlan:
    """Prints the limits table and what the build needs; refuses what cannot build (one line)."""
    plan = plan_build(selection, config)
    s = plan.shape
    log(f"{config.backend} {config.precision}, {plan.width}×{plan.height} px, {s.prompts} prompt(s) (batch {s.batch}), {s.text_tokens} text tokens, {len(plan.needs.tensors)} I/O tensors")
    for line in format_table(plan.needs, config.backend):
        log(line)
    log(format_run_needs(run_needs(plan.needs, s, plan.dims, config.precision, config.backend), config.backend))
    check_limits(plan.needs, config.backend, Path(config.out), force=True)  # tensor limits only: a dry run may plan for another host
    log("limits: ok")
    return plan


def check_out(selection: ModelSelection, config: BuildConfig) -> Path:
    """``--out`` resolved (``.`` and a symlinked folder: the swap renames the real folder), refused
    where it is the current folder or holds it; a ``--pipeline`` that is no pipeline refused."""
    check_pipeline(selection.pipeline)
    out = Path(config.out).resolve()
    if Path.cwd().resolve().is_relative_to(out):
        raise ConfigError(describe(f"--out {config.out} is the current folder or holds it", got=str(out), fix="a build replaces --out whole: choose a folder below the current one, e.g. --out engines/NAME"))
    return out


def check_room(selection: ModelSelection, config: BuildConfig, extra_disk: int = 0) -> None:
    """``--out`` and the build's limits from the model configs alone (no weight made or loaded):
    run before a preset's weights are made, so a host too small for the build is refused first.
    ``extra_disk``: bytes the same disk must also hold (a preset's weights, not made yet)."""
    check_out(selection, config)
    needs = plan_build(selection, config).needs
    check_limits(replace(needs, disk_bytes=needs.disk_bytes + extra_disk), config.backend, Path(config.out), config.force, also=f" with the preset's weights (~{format_bytes(extra_disk)})" if extra_disk else "")
    if extra_disk:  # weights not made yet: no folder can be up to date, a build will run
        check_gpu(needs, config.force)


def preset_models(preset: str, config: BuildConfig, pipeline_src: str | None = None, log=print) -> ModelSelection:
    """A preset's models (``pipeline_src``: text encoders + VAE in place of its own) for a build
    into ``config.out``, the host checked first: a preset's random weights (SD3.5: ~40 GiB) are
    made only where they and the build fit together (counted on one disk when both go to the same
    one)."""
    from hs_runtime.validation import same_disk

    from ..presets import pending_preset_bytes

    selection = resolve_models(preset, None, None, pipeline_src, log=log, materialize=False)
    pending, where = pending_preset_bytes(preset)
    check_room(selection, config, extra_disk=pending if where is not None and same_disk(where, config.out) else 0)
    return resolve_models(preset, None, None, pipeline_src, log=log, force=config.force)


def build(selection: ModelSelection, config: BuildConfig, log=print) -> BuildReport:
    """Exports and builds an engine set for ``selection`` as ``config`` says.

    Raises:
        ConfigError: a setting out of range (checked before any model is loaded).
        BuildError: a tensor past the backend's limits, a host without the memory or disk the
            build needs (unless ``force``), or a failed engine build; ``out`` is left as it was.
        ExportError / ToleranceError / NumericalError: export or the engine check failed.
    """
    plan = plan_build(selection, config)
    out = check_out(selection, config)
    _ensure_writable(out)
    remove_stale_work(out, log)
    phases = _Phases(log)
    shape, height, width, text_tokens, dims = plan.shape, plan.height, plan.width, plan.text_tokens, plan.dims
    with phases("limits", f"largest I/O tensor {max(t.elements for t in plan.needs.tensors):,} elements; needs ~{plan.needs.host_bytes / 2**30:.1f} GiB memory, ~{plan.needs.disk_bytes / 2**30:.1f} GiB disk"):
        check_limits(plan.needs, config.backend, out, config.force)
    export_dtype = torch_dtype(config.precision)
    with phases("load", f"small {selection.small} + large {selection.large} ({config.precision})"):
        models = {role: load_transformer(src, export_dtype) for role, src in (("small", selection.small), ("large", selection.large))}
        # Reduced precision: the layers NVIDIA's SD3.5 demo keeps in fp32 stay fp32 (build/precision.py).
        fp32_layers = {role: precision_plan(m.config, config.precision) for role, m in models.items()}
        for role, layers in fp32_layers.items():
            apply_precision_plan(models[role], layers)
        records = {
            role: {"source": src, "config": dict(models[role].config), "dims": dims[role].to_dict(), "sha256": weights_sha256(src, models[role])}
            for role, src in (("small", selection.small), ("large", selection.large))
        }
    versions = library_versions()
    if config.backend == "tensorrt":
        versions["build_device"] = _trt_device()
    build_section = {
        "backend": config.backend, "precision": config.precision, "height": height, "width": width,
        "shape": shape.to_dict(), "max_sequence_length": max(0, text_tokens - selection.clip_tokens),  # below 0 without a pipeline (no text encoders to feed)
        "clip_tokens": selection.clip_tokens, "preset": selection.preset, "opset": config.opset,
        "builder_optimization_level": config.builder_optimization_level if config.backend == "tensorrt" else None, "keep_onnx": config.keep_onnx,
        "ort_thread_pool": config.ort_thread_pool if config.backend == "onnxruntime" else None,
        "command": rebuild_command(selection, config, height, width, text_tokens),
    }
    fingerprint = hashlib.sha256(
        # Not the rebuild command: it names the folder, which a copied folder does not change.
        json.dumps({"schema": SCHEMA_VERSION, "models": {r: (m["sha256"], m["config"]) for r, m in records.items()}, "pipeline": selection.pipeline, "build": {k: v for k, v in build_section.items() if k != "command"}, "versions": versions}, sort_keys=True, default=str).encode()
    ).hexdigest()
    existing = check_out_folder(out, fingerprint, config.force, log)
    if existing is not None:
        log(f"{out} is up to date (same weights, configs, flags and library versions): skipping; pass --force to rebuild")
        return BuildReport(existing, True, phases.seconds)
    check_gpu(plan.needs, config.force)  # a build will run: the engine check's GPU memory, before the export

    work = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    # A TensorRT build that fails keeps its exported ONNX in --out, unless --out holds a complete
    # build (rebuilt with --force): that one stays as it was.
    keep_onnx = config.backend == "tensorrt" and _manifest_data(out).get("complete") is not True
    manifest = {
        "schema_version": SCHEMA_VERSION, "complete": False, "fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": records, "pipeline": selection.pipeline, "build": build_section, "versions": versions,
        "io_dtype": config.precision,
        "fp32_layers": fp32_layers,
        "limits": {"largest_tensor_elements": max(t.elements for t in plan.needs.tensors), "io_bytes": plan.needs.io_bytes, "weights_bytes": plan.needs.weights},
        "default_plan": {
            "name": "hybrid", "config": _plan_config_dict(config.mask_ratio), "steps": selection.steps, "guidance_scale": selection.guidance_scale,
        },
        "graphs": {},
    }
    try:
        _export_all(models, dims, shape, config, work, manifest, phases, export_dtype)
        del models
        gc.collect()  # the engines are built and checked with one model in memory at a time
        write_manifest(work, manifest)
        _build_engines(config, work, manifest, phases, out / "onnx" if keep_onnx else None)
        _check_engines(selection, config, work, manifest, phases, shape)
        if config.backend == "tensorrt" and not config.keep_onnx:
            shutil.rmtree(work / "onnx")
            for graph in manifest["graphs"].values():
                graph["onnx"]["path"] = None
        with phases("hash", "sizes and sha256 of every file, for load-time and verify checks"):
            manifest["artifacts"] = artifact_records(work)
        manifest["complete"] = True
        write_manifest(work, manifest)
    except BuildError:
        if keep_onnx and (work / "onnx").is_dir():
            _swap_in(work, out)  # keep the exported ONNX (manifest says incomplete)
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            log(f"build interrupted: removed its work folder {work}; {out} is unchanged")
        raise
    _swap_in(work, out)
    folder_bytes = sum(a["bytes"] for a in manifest["artifacts"])
    log(f"engines ready in {out} ({sum(phases.seconds.values()):.1f} s, {folder_bytes / 2**30:.2f} GiB on disk, peak memory {peak_rss() / 2**30:.2f} GiB)")
    return BuildReport(Manifest.load(out), False, phases.seconds)


def _plan_config_dict(mask_ratio: float) -> dict:
    config = asdict(PlanConfig())
    config["mask"]["ratio"] = mask_ratio
    return config


def _export_all(models, dims, shape: BuildShape, config: BuildConfig, work: Path, manifest: dict, phases: _Phases, dtype) -> None:
    onnx_dir = work / "onnx"
    for name in GRAPH_NAMES:
        d = dims[name]
        module = TokenGraph(models[name], name).eval()
        sizes = onnx_export.export_sizes(d, shape.latent_height, shape.latent_width, shape.text_tokens, shape.batch)
        path = onnx_dir / f"{name}.onnx"
        with phases("export", f"{name} → {path.name} (+ {path.name}.data)"):
            onnx_export.export_graph(module, sizes, path, config.opset, dtype)
        spec = graph_spec(name, d)
        manifest["graphs"][name] = {
            "model": name,
            "inputs": [{"name": t.name, "dtype": t.dtype, "axes": list(t.axes)} for t in spec.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "axes": list(t.axes)} for t in spec.outputs],
            "dynamic_axes": {k: {str(i): a for i, a in v.items()} for k, v in spec.dynamic_axes().items()},
            "onnx": {"path": f"onnx/{path.name}", "bytes": _size(path)},
            "profiles": graph_profiles(name, shape, d),
        }


def _manifest_data(out: Path) -> dict:
    """``out``'s manifest as JSON, ``{}`` where there is none or it cannot be read (no checks:
    only what an earlier build left there)."""
    try:
        data = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _build_engines(config: BuildConfig, work: Path, manifest: dict, phases: _Phases, kept_onnx: Path | None) -> None:
    """Engines from the exported graphs; ``kept_onnx``: where a failed TensorRT build says its
    ONNX files are kept (``None``: not kept)."""
    engine_dir = work / "engines"
    engine_dir.mkdir(parents=True, exist_ok=True)
    for name in GRAPH_NAMES:
        graph = manifest["graphs"][name]
        onnx_path = work / graph["onnx"]["path"]
        if config.backend == "onnxruntime":
            from .ort import adopt_model, save_settings

            fused = "attention and GELU fused into the graph file" if config.precision == "fp32" else "no fusion: ONNX Runtime's fused CPU kernels are fp32"
            with phases("engine", f"{name}: the ONNX file becomes the ONNX Runtime engine ({fused}; the weights are not rewritten)"):
                engine_path = adopt_model(onnx_path, engine_dir)
                save_settings(work, config.ort_thread_pool)
        else:
            from .tensorrt import build_plan, import_tensorrt

            engine_path = engine_dir / f"{name}.plan"
            with phases("engine", f"{name}: TensorRT {config.precision} plan (strongly typed)"):
                trt = import_tensorrt(kept_onnx)
                manifest["versions"]["tensorrt"] = trt.__version__
                # timing cache keyed by GPU name, compute capability and TensorRT version
                build_plan(onnx_path, engine_path, config.precision, graph["profiles"], None, config.builder_optimization_level)
        graph["engine"] = {"path": f"engines/{engine_path.name}", "backend": config.backend, "precision": config.precision, "bytes": _size(engine_path)}
        if config.backend == "onnxruntime":
            graph["onnx"] = {"path": graph["engine"]["path"], "bytes": graph["engine"]["bytes"]}
    if config.backend == "onnxruntime":
        (work / "onnx").rmdir()  # the ONNX files moved into engines/: no empty folder left behind


def _check_engines(selection: ModelSelection, config: BuildConfig, work: Path, manifest: dict, phases: _Phases, shape: BuildShape) -> None:
    """Each engine against its PyTorch graph (fp32) on fresh inputs of every kind of call: that
    model, then (the model freed) that engine, one graph at a time."""
    from hs_runtime.backends.loading import load_engine
    view = Manifest(work, manifest)
    device = "cuda" if config.backend == "tensorrt" else "cpu"
    rtol_reduced = 2e-2
    sizes, engine_dtype = onnx_export.parity_base_sizes(shape, config.backend), torch_dtype(config.precision)
    for name in GRAPH_NAMES:
        with phases("check", f"{name}: engine vs PyTorch on dense, subset, text-reuse and one-token calls"):
            source = selection.small if name == "small" else selection.large
            # The fp32 reference first (its outputs on the host), then the engine: the model and the
            # engine never share memory (SD3.5-large: a 30 GiB model beside a 16 GiB plan on the
            # GPU, or beside a 30 GiB fp32 ONNX Runtime session on the host).
            module = TokenGraph(load_transformer(source, torch.float32, device), name).eval()
            spec, references = module.spec, onnx_export.reference_outputs(module, sizes)
            del module
            onnx_export.release_memory(device)  # the model's blocks go back before the engine loads
            engine = load_engine(view, name, config.backend, torch.device(device))
            parity = onnx_export.compare_with_references(engine, spec, references, sizes, torch.device(device), engine_dtype=engine_dtype)
            del engine, references
            onnx_export.release_memory(device)
        rtol = graph_spec(name, view.dims(name)).rtol if config.precision == "fp32" else rtol_reduced
        phases.log(f"        max abs {parity.max_abs:.2e}, relative {parity.rel:.2e} over {parity.cases} call(s) (tolerance {rtol:g})")
        if math.isnan(parity.rel):
            hint = "fp16 overflow? build with --precision bf16 (TensorRT) or fp32" if config.precision == "fp16" else "do the model weights hold NaN/inf? export from a clean checkpoint"
            raise NumericalError(describe(f"{name} produced NaN/inf on random inputs (engine or PyTorch)", expected="finite outputs", fix=hint))
        if not parity.ok(rtol):
            raise ToleranceError(describe(f"{name} engine disagrees with PyTorch", got=f"relative error {parity.rel:.2e}", expected=f"<= {rtol:g}", fix="try another --opset"))
        manifest["graphs"][name]["parity"] = asdict(parity)


def _trt_device() -> dict | None:
    """The GPU and TensorRT a plan is built for (part of the fingerprint: a folder built on another
    GPU or TensorRT is rebuilt, not reused); ``None`` where TensorRT or CUDA is missing, so the
    export still runs and the engine phase names what is missing."""
    from .tensorrt import device_fingerprint

    try:
        return device_fingerprint()
    except BuildError:
        return None


def _size(path: Path) -> int:
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_work(out: Path, log=print) -> None:
    """Cleans up after builds of ``out`` that were killed (SIGKILL, power loss).

    Work folders ``.{name}.building-{pid}`` whose process is gone are removed. A folder set aside
    by a swap cut short between its two renames (``.{name}.old-{pid}``) is put back if ``out`` is
    missing, else removed. Folders of live builds are left alone.
    """
    for kind in ("building", "old"):
        for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            pid = path.name.rsplit("-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.replace(path, out)
                log(f"restored {out} from {path}, set aside by an interrupted build (pid {pid})")
            else:
                shutil.rmtree(path, ignore_errors=True)
                log(f"removed stale work folder {path} from an interrupted build (pid {pid})")


def _swap_in(work: Path, out: Path) -> None:
    """Replaces ``out`` with ``work`` by renames, so no reader sees a mix of two builds."""
    trash = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, trash)
    os.replace(work, out)
    shutil.rmtree(trash, ignore_errors=True)
