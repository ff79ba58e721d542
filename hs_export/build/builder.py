"""``hs-export build``: models → graphs → ONNX → engines → manifest, atomically.

The engine folder is assembled in a sibling work folder and swapped in only when complete, so a
folder is never half-overwritten. A build interrupted by SIGINT removes its work folder; one killed
outright leaves only the work folder, which the next build removes (its pid is gone). A second
build with the same inputs (weights, configs, flags, library versions) finds the same fingerprint
and skips.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hs_runtime import __version__
from hs_runtime.contract import GRAPH_NAMES, GRAPH_SPECS, ModelDims
from hs_runtime.errors import BuildError, ConfigError, ManifestError, NumericalError, ToleranceError, describe
from hs_runtime.graphs import build_graphs
from hs_runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, artifact_records, write_manifest
from hs_runtime.models import check_pair, load_transformer, resolve_transformer_source
from hs_runtime.pipeline import check_image_size
from hs_runtime.plans import PlanConfig
from hs_runtime.profiles import BuildShape, graph_profiles
from hs_runtime.validation import check_folder_path, check_int

from . import export as onnx_export
from .sources import ModelSelection

BACKENDS = ("onnxruntime", "tensorrt")
ENGINE_SUFFIX = {"onnxruntime": ".ort.onnx", "tensorrt": ".plan"}
OPSETS = (14, 20)  # scaled_dot_product_attention exports from opset 14; torch's TorchScript exporter stops at 20


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``hs-export build`` takes besides the models. CLI defaults come from here.

    Attributes:
        height / width: image size in pixels (``None``: the preset's, else 1024).
        text_tokens: T_txt (``None``: 77 + the preset's T5 length, else 333).
        prompts: prompts per call; engines take ``2 × prompts`` rows with guidance.
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
    models = f"--preset {selection.preset}" if selection.preset else f"--small {selection.small} --large {selection.large}"
    parts = [
        "hs-export build", models, f"--out {config.out}", f"--backend {config.backend}", f"--precision {config.precision}",
        f"--height {height} --width {width}", f"--prompts {config.prompts}", f"--text-tokens {text_tokens}",
        f"--mask-ratio {config.mask_ratio}", f"--opset {config.opset}",
    ]
    if config.dynamic_shape:
        parts.append("--dynamic-shape")
    if config.token_buckets != 1:
        parts.append(f"--token-buckets {config.token_buckets}")
    return " ".join(parts)


class _Phases:
    """Per-phase wall times, logged as each phase ends."""

    def __init__(self, log):
        self.log = log
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str, what: str):
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        self.log(f"[{phase}] {what} ({elapsed:.1f} s)")


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
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = {}
    data = data if isinstance(data, dict) else {}
    same = data.get("fingerprint") == fingerprint
    if same and data.get("complete") and not force:
        try:
            return Manifest.load(out)
        except ManifestError as exc:
            log(f"{out} is damaged, rebuilding it: {exc}")
            return None
    if not same and not force:
        raise BuildError(
            describe(f"--out {out} holds engines built for something else", got=f"fingerprint {str(data.get('fingerprint'))[:12]}", expected=fingerprint[:12], fix="pass --force to replace them, or choose another --out")
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


def build(selection: ModelSelection, config: BuildConfig, log=print) -> BuildReport:
    """Exports and builds an engine set for ``selection`` as ``config`` says.

    Raises:
        ConfigError: a setting out of range (checked before any model is loaded).
        BuildError / ExportError / ToleranceError / NumericalError: the build failed; ``out``
            is left as it was.
    """
    config.validate()
    out = Path(config.out)
    _ensure_writable(out)
    remove_stale_work(out, log)
    phases = _Phases(log)
    height = selection.height if config.height is None else config.height
    width = selection.width if config.width is None else config.width
    text_tokens = config.text_tokens if config.text_tokens is not None else selection.clip_tokens + selection.max_sequence_length
    shape = BuildShape(
        prompts=config.prompts, latent_height=height // config.vae_scale_factor, latent_width=width // config.vae_scale_factor,
        text_tokens=text_tokens, mask_ratio=config.mask_ratio, dynamic_shape=config.dynamic_shape, token_buckets=config.token_buckets,
    )
    with phases("load", f"small {selection.small} + large {selection.large}"):
        small = load_transformer(selection.small)
        large = load_transformer(selection.large)
        check_pair(small.config, large.config)
        dims = {"small": ModelDims.from_config(small.config), "large": ModelDims.from_config(large.config)}
        for role, d in dims.items():
            d.check_latent(shape.latent_height, shape.latent_width, role)
        models = {
            role: {"source": src, "config": dict(m.config), "dims": dims[role].to_dict(), "sha256": weights_sha256(src, m)}
            for role, src, m in (("small", selection.small, small), ("large", selection.large, large))
        }
    versions = library_versions()
    build_section = {
        "backend": config.backend, "precision": config.precision, "height": height, "width": width,
        "shape": shape.to_dict(), "max_sequence_length": text_tokens - selection.clip_tokens,
        "clip_tokens": selection.clip_tokens, "preset": selection.preset, "opset": config.opset,
        "builder_optimization_level": config.builder_optimization_level,
        "command": rebuild_command(selection, config, height, width, text_tokens),
    }
    fingerprint = hashlib.sha256(
        json.dumps({"schema": SCHEMA_VERSION, "models": {r: (m["sha256"], m["config"]) for r, m in models.items()}, "build": build_section, "versions": versions}, sort_keys=True, default=str).encode()
    ).hexdigest()
    existing = check_out_folder(out, fingerprint, config.force, log)
    if existing is not None:
        log(f"{out} is up to date (same weights, configs, flags and library versions): skipping; pass --force to rebuild")
        return BuildReport(existing, True, phases.seconds)

    work = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    export_dtype = torch.float16 if (config.backend == "onnxruntime" and config.precision == "fp16") else torch.float32
    if export_dtype != torch.float32:
        small, large = small.to(export_dtype), large.to(export_dtype)
    graphs = build_graphs(small, large)
    manifest = {
        "schema_version": SCHEMA_VERSION, "complete": False, "fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": models, "pipeline": selection.pipeline, "build": build_section, "versions": versions,
        "io_dtype": "fp16" if export_dtype == torch.float16 else "fp32",
        "default_plan": {
            "name": "hybrid", "config": _plan_config_dict(config.mask_ratio), "steps": selection.steps, "guidance_scale": selection.guidance_scale,
        },
        "graphs": {},
    }
    try:
        _export_all(graphs, dims, shape, config, work, manifest, phases, export_dtype)
        write_manifest(work, manifest)
        _build_engines(config, work, manifest, phases)
        with phases("hash", "sizes and sha256 of every file, for load-time and verify checks"):
            manifest["artifacts"] = artifact_records(work)
        manifest["complete"] = True
        write_manifest(work, manifest)
    except BuildError:
        if config.backend == "tensorrt" and (work / "onnx").is_dir():
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
    log(f"engines ready in {out} ({sum(phases.seconds.values()):.1f} s)")
    return BuildReport(Manifest.load(out), False, phases.seconds)


def _plan_config_dict(mask_ratio: float) -> dict:
    config = asdict(PlanConfig())
    config["mask"]["ratio"] = mask_ratio
    return config


def _export_all(graphs, dims, shape: BuildShape, config: BuildConfig, work: Path, manifest: dict, phases: _Phases, dtype) -> None:
    from hs_runtime.backends.onnxruntime_backend import OrtEngine

    onnx_dir = work / "onnx"
    for name, module in graphs.items():
        role = "small" if name.startswith("small") else "large"
        d = dims[role]
        sizes = onnx_export.export_sizes(d, shape.latent_height, shape.latent_width, shape.text_tokens, shape.batch)
        path = onnx_dir / f"{name}.onnx"
        scratch = onnx_dir / f".{name}.export"  # per graph: big exports write a file per tensor
        try:
            with phases("export", f"{name} → {path.name}"):
                raw = onnx_export.export_graph(module, d, sizes, scratch / "model.onnx", config.opset, dtype)
            with phases("fold", f"{name}: cleanup, constant folding, onnx.checker, shape inference"):
                onnx_export.fold_and_check(raw, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        with phases("check", f"{name}: ONNX Runtime vs PyTorch on fresh inputs"):
            parity = onnx_export.check_parity(name, module, OrtEngine(path, name, d, torch.device("cpu")), d, _parity_sizes(d, shape), dtype)
        rtol = GRAPH_SPECS[name].rtol if dtype == torch.float32 else 2e-2
        phases.log(f"        max abs {parity.max_abs:.2e}, relative {parity.rel:.2e} over {parity.cases} input(s) (tolerance {rtol:g})")
        if math.isnan(parity.rel):
            hint = "fp16 overflow? build with --precision fp32" if dtype == torch.float16 else "do the model weights hold NaN/inf? export from a clean checkpoint"
            raise NumericalError(describe(f"{name} produced NaN/inf on random inputs (ONNX Runtime or PyTorch)", expected="finite outputs", fix=hint))
        if not parity.ok(rtol):
            raise ToleranceError(describe(f"ONNX {name} disagrees with PyTorch", got=f"relative error {parity.rel:.2e}", expected=f"<= {rtol:g}", fix="try another --opset"))
        spec = GRAPH_SPECS[name]
        manifest["graphs"][name] = {
            "model": role,
            "inputs": [{"name": t.name, "dtype": t.dtype, "axes": list(t.axes)} for t in spec.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "axes": list(t.axes)} for t in spec.outputs],
            "dynamic_axes": {k: {str(i): a for i, a in v.items()} for k, v in spec.dynamic_axes().items()},
            "onnx": {"path": f"onnx/{path.name}", "bytes": _size(path), "parity": asdict(parity)},
            "profiles": graph_profiles(name, shape, d),
        }


def _parity_sizes(dims: ModelDims, shape: BuildShape) -> dict:
    """A small latent (≤ 32×32) is enough to check the graph; the axes are dynamic anyway."""
    return {
        "batch": shape.batch, "height": min(shape.latent_height, 32), "width": min(shape.latent_width, 32),
        "text_tokens": shape.text_tokens,
    }


def _build_engines(config: BuildConfig, work: Path, manifest: dict, phases: _Phases) -> None:
    engine_dir = work / "engines"
    for name in GRAPH_NAMES:
        graph = manifest["graphs"][name]
        onnx_path = work / graph["onnx"]["path"]
        engine_path = engine_dir / f"{name}{ENGINE_SUFFIX[config.backend]}"
        with phases("build", f"{name}: {config.backend} {config.precision} engine"):
            if config.backend == "onnxruntime":
                from .ort import optimize_model, save_settings

                optimize_model(onnx_path, engine_path, external_data=onnx_export._has_external_data(onnx_path))
                save_settings(work)
            else:
                from .tensorrt import build_plan, import_tensorrt

                trt = import_tensorrt(Path(config.out) / "onnx")
                manifest["versions"]["tensorrt"] = trt.__version__
                cache = Path.home() / ".cache" / "hybridstitch" / "trt_timing.cache"
                build_plan(onnx_path, engine_path, config.precision, graph["profiles"], cache, config.builder_optimization_level)
        graph["engine"] = {"path": f"engines/{engine_path.name}", "backend": config.backend, "precision": config.precision, "bytes": _size(engine_path)}


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
