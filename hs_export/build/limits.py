"""What a build needs, computed from the contract and the model configs before anything is exported.

Every engine I/O tensor's largest shape over the build's profiles (elements and bytes), each
engine's weights, and from those the host memory and disk the build needs. ``hs-export build
--dry-run`` prints it for any preset or model pair, without loading a weight; a real build
refuses, in one line, a tensor past a backend's limit and a host that cannot hold the build.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from hs_runtime.backends.base import PRECISIONS
from hs_runtime.contract import GRAPH_NAMES, LARGE, SMALL, ModelDims, graph_spec
from hs_runtime.errors import BuildError, describe
from hs_runtime.validation import nearest_existing
from hs_runtime.memory import hybrid_cache, kv_output_bytes
from hs_runtime.plans import MaskConfig, PlanConfig, make_plan
from hs_runtime.profiles import BuildShape, profile_sizes

# A conservative policy, not a rule of TensorRT's headers: its layers indexed tensors with 32-bit
# volumes (NVIDIA/TensorRT#3815, "tensor number < 2^31-1"), and only the 10.10 release notes say
# "most layers" now handle large tensors. SD3.5's largest tensor at 1024² is ~1% of it (~4% with --dynamic-shape).
TRT_MAX_ELEMENTS = 2**31 - 1
ELEMENT_BYTES = {name: dtype.itemsize for name, dtype in PRECISIONS.items()}  # {"fp32": 4, "fp16": 2, "bf16": 2}
GiB = 2**30
HOST_OVERHEAD = 1 * GiB  # interpreter, torch, ONNX Runtime/TensorRT libraries, graph protos
TEXT_AND_VAE = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")  # a diffusers SD3 folder's subfolders
TRT_BUILD_FACTOR = 1.0  # TensorRT builder: the serialized plan beside the parsed weights (an estimate: not run here)
# An ONNX Runtime build's peak resident memory beyond both models' fp32 bytes and the 1 GiB
# overhead, as a multiple of the larger model's: the export (both models loaded, and more) or the
# engine check (the fp32 PyTorch model, freed before the fp32 session it is compared with loads;
# ONNX Runtime's CPU kernels are fp32 whatever the precision). Measured with
# scripts/measure_build_memory.py (2026-12-07, fp32 / fp16 builds: peaks of 0.85 / 0.84 GiB for
# models of 0.23 GiB fp32 in all, the larger 0.21; 3.27 / 3.39 for 1.81 and 1.67; 6.55 / 6.44 for
# 3.63 and 3.49: at most 0.55× the larger beyond both and 1 GiB); 0.75× leaves ≥ 0.5 GiB at each.
# Model and session held together, before that day, needed 2.5× the larger model alone.
ORT_BUILD_EXTRA = 0.75


@dataclass(frozen=True)
class TensorLimit:
    """One engine I/O tensor at the build's profile maxima."""

    graph: str
    tensor: str
    direction: str  # "in" | "out"
    max_shape: tuple[int, ...]
    elements: int
    bytes: int


@dataclass(frozen=True)
class BuildNeeds:
    """The limits table and the resources the build needs."""

    tensors: list[TensorLimit]
    weights: dict[str, int]  # graph → weight bytes in the export precision
    io_bytes: dict[str, int]  # graph → all I/O buffers at their maxima (a TensorRT backend's allocation)
    host_bytes: int
    disk_bytes: int
    folder_bytes: int  # what stays in the engine folder
    gpu_bytes: int = 0  # TensorRT: at least what the engine check holds on the GPU; 0 for a CPU build

    def over_limit(self, backend: str) -> list[TensorLimit]:
        """Tensors a backend cannot hold (TensorRT: more than 2³¹−1 elements)."""
        return [t for t in self.tensors if backend == "tensorrt" and t.elements > TRT_MAX_ELEMENTS]


def weight_count(config: dict) -> int:
    """Parameters + buffers of a diffusers ``SD3Transformer2DModel`` built on the meta device
    (no memory): what the ONNX file and the engine hold."""
    return _weight_count(json.dumps(dict(config), sort_keys=True, default=list))


@lru_cache(maxsize=16)
def _weight_count(config_json: str, module: str = "") -> int:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(json.loads(config_json))
    part = model.get_submodule(module) if module else model
    return sum(t.numel() for t in part.parameters()) + sum(t.numel() for t in part.buffers())


def weight_bytes(config: dict, precision: str) -> int:
    """What a model's engine holds at ``precision``: every weight in it, except the modules
    :func:`~hs_export.build.precision.precision_plan` keeps in fp32 (SD3.5-large's block 35 at
    fp16/bf16: 0.4 GiB)."""
    from .precision import precision_plan

    element = ELEMENT_BYTES[precision]
    key = json.dumps(dict(config), sort_keys=True, default=list)
    kept = sum(_weight_count(key, entry["module"]) for entry in precision_plan(config, precision))
    return weight_count(config) * element + kept * (ELEMENT_BYTES["fp32"] - element)


def _element_bytes(dtype_kind: str, precision: str) -> int:
    return {"float": ELEMENT_BYTES[precision], "float32": 4, "int64": 8}[dtype_kind]


def io_limits(shape: BuildShape, dims: dict[str, ModelDims], precision: str) -> list[TensorLimit]:
    """Every graph's I/O tensors at the largest size of each axis over its profiles."""
    rows = []
    for name in GRAPH_NAMES:
        spec = graph_spec(name, dims[name])
        profiles = profile_sizes(name, shape, dims[name])
        biggest = {axis: max(p[axis][2] for p in profiles) for axis in profiles[0]}
        shapes = spec.shapes(biggest)
        for direction, tensors in (("in", spec.inputs), ("out", spec.outputs)):
            for t in tensors:
                elements = 1
                for size in shapes[t.name]:
                    elements *= size
                rows.append(TensorLimit(name, t.name, direction, shapes[t.name], elements, elements * _element_bytes(t.dtype, precision)))
    return rows


def build_needs(shape: BuildShape, dims: dict[str, ModelDims], configs: dict[str, dict], precision: str, backend: str) -> BuildNeeds:
    """The limits table and the build's host memory and disk needs.

    Host memory, the largest of its phases, + 1 GiB: both models loaded for the export; per graph
    one model and the TensorRT builder's copy of it; per graph the engine check's PyTorch model,
    always loaded in fp32 on the host (then moved to the GPU for TensorRT), and after it the
    reference outputs it keeps (TensorRT) or the fp32 ONNX Runtime session it checks. An ONNX
    Runtime build is sized by its measured peak (both fp32 models + ``ORT_BUILD_EXTRA`` × the
    larger). Disk: the ONNX files and the engines (TensorRT: both until the ONNX files are deleted).
    """
    tensors = io_limits(shape, dims, precision)
    weights = {name: weight_bytes(configs[name], precision) for name in GRAPH_NAMES}
    io_bytes = {name: sum(t.bytes for t in tensors if t.graph == name) for name in GRAPH_NAMES}
    total, largest = sum(weights.values()), max(weights.values())
    build_phase = largest + TRT_BUILD_FACTOR * largest if backend == "tensorrt" else 0
    fp32 = {name: weight_count(configs[name]) * ELEMENT_BYTES["fp32"] for name in GRAPH_NAMES}
    gpu = 0
    if backend == "onnxruntime":
        # ONNX Runtime's CPU provider runs an fp16 graph with fp32 kernels behind inserted Casts
        # (maintainers, microsoft/onnxruntime#11831), its weights cast when the session is made: an
        # fp16 build of the 0.93 B pair peaked at 6.44 GiB, its fp32 build at 6.55.
        check_phase = sum(fp32.values()) + ORT_BUILD_EXTRA * max(fp32.values())
    else:  # the model's host copy until it moves to the GPU, then the reference outputs kept on the host beside the mapped plan
        check = {name: parity_case_bytes(name, shape, dims[name], precision, backend) for name in GRAPH_NAMES}
        check_phase = max(max(fp32[name], check[name].references + weights[name]) for name in GRAPH_NAMES)
        if backend == "tensorrt":
            # TensorRT's engine check (builder._check_engines) runs the fp32 PyTorch model on the GPU,
            # then frees it and loads the engine (its weights and its output buffers at their maxima),
            # each with one call's inputs: a lower bound, as activations and the CUDA context come on top.
            outputs = {name: sum(t.bytes for t in tensors if t.graph == name and t.direction == "out") for name in GRAPH_NAMES}
            gpu = max(max(fp32[name] + check[name].model_call, weights[name] + outputs[name] + check[name].engine_inputs) for name in GRAPH_NAMES)
    host = int(max(total, build_phase, check_phase) + HOST_OVERHEAD)
    disk = 2 * total if backend == "tensorrt" else total
    return BuildNeeds(tensors, weights, io_bytes, host, disk, total, gpu)


@dataclass(frozen=True)
class ParityBytes:
    """What the engine check's calls of one graph hold besides the weights."""

    model_call: int  # the largest call's fp32 inputs and outputs
    engine_inputs: int  # the largest call's inputs in the engine's precision
    references: int  # every call's fp32 outputs, kept for the comparison


def parity_case_bytes(name: str, shape: BuildShape, dims: ModelDims, precision: str, backend: str) -> ParityBytes:
    """:class:`ParityBytes` of ``name``'s engine check, from the contract (``export.parity_sizes``)."""
    from .export import parity_base_sizes, parity_sizes

    spec = graph_spec(name, dims)
    model_call = engine_inputs = references = 0
    for sizes in parity_sizes(dims, parity_base_sizes(shape, backend)):
        shapes = spec.shapes(sizes)
        count = lambda tensors: sum(math.prod(shapes[t.name]) for t in tensors if t.dtype == "float")  # noqa: E731
        outputs = 4 * count(spec.outputs)
        model_call = max(model_call, 4 * count(spec.inputs) + outputs)
        engine_inputs = max(engine_inputs, ELEMENT_BYTES[precision] * count(spec.inputs))
        references += outputs
    return ParityBytes(model_call, engine_inputs, references)


@dataclass(frozen=True)
class RunNeeds:
    """What one runtime over the engine set holds while it runs the default ``hybrid`` at the
    build size, from the contract (the engines' own activation memory comes on top)."""

    weights: int
    outputs: int  # TensorRT: every output buffer at its maxima; else the capture step's K/V outputs
    cache: int  # the hybrid stage's K/V cache and carried offset (hs_runtime.memory)
    ratio: float

    @property
    def total(self) -> int:
        return self.weights + self.outputs + self.cache


def run_needs(needs: BuildNeeds, shape: BuildShape, dims: dict[str, ModelDims], precision: str, backend: str) -> RunNeeds:
    """Weights, output memory and the default plan's cache for one run at the build size.

    TensorRT engines keep one buffer per output, sized for the profiles' maxima, for their
    lifetime (``hs_runtime/backends/tensorrt_backend.py``); ONNX Runtime and torch return new
    tensors, of which a capture step's K/V of both models are alive together until the cache is
    gathered from them.
    """
    element = ELEMENT_BYTES[precision]
    n = dims[LARGE].image_tokens(shape.latent_height, shape.latent_width)
    if backend == "tensorrt":
        outputs = sum(t.bytes for t in needs.tensors if t.direction == "out")
    else:
        outputs = sum(kv_output_bytes(dims[role], shape.batch, n, shape.text_tokens, element) for role in (SMALL, LARGE))
    plan = make_plan("hybrid", 28, PlanConfig(mask=MaskConfig(ratio=shape.mask_ratio)))  # the cache does not depend on the step count
    cache = hybrid_cache(plan, dims, n, shape.text_tokens, shape.prompts, element, shape.cfg).total
    return RunNeeds(sum(needs.weights.values()), outputs, cache, shape.mask_ratio)


def folder_run_needs(manifest, backend: str | None = None) -> tuple[RunNeeds, str]:
    """:func:`run_needs` for an engine folder run on ``backend`` (default: its own), and that
    backend. The torch backend runs the manifest's models in fp32 (``from_dir``'s default)."""
    backend = backend or manifest.build["backend"]
    precision = "fp32" if backend == "torch" else manifest.build["precision"]
    shape = manifest.shape
    dims = {role: manifest.dims(role) for role in GRAPH_NAMES}
    configs = {role: manifest.data["models"][role]["config"] for role in GRAPH_NAMES}
    needs = build_needs(shape, dims, configs, precision, backend)
    return run_needs(needs, shape, dims, precision, backend), backend


def text_and_vae_elements(source) -> int | None:
    """The text encoders' and VAE's parameter count, from the headers of a local diffusers
    folder's ``*.safetensors`` (no weight is read; variant files such as ``model.fp16.safetensors``
    beside the plain ones are not what loads, so not counted); ``None`` where the folder is not on
    this host, not given, or a component has no plain safetensors (sizes unknown without loading)."""
    from safetensors import safe_open

    folder = Path(source) if source else None
    if folder is None or not folder.is_dir():
        return None
    elements = 0
    for sub in TEXT_AND_VAE:
        if not (folder / sub).is_dir():
            continue
        files = [f for f in sorted((folder / sub).glob("*.safetensors")) if "." not in f.name.removesuffix(".safetensors")]
        if not files:
            return None
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                elements += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return elements


def format_run_needs(run: RunNeeds, backend: str) -> str:
    """The one line ``--dry-run`` and ``inspect`` print."""
    outputs = "output buffers" if backend == "tensorrt" else "a capture step's K/V outputs"
    engine = "TensorRT's activation memory (one block for both engines, the larger one's)" if backend == "tensorrt" else "the activations of one call"
    return (
        f"run needs (default hybrid at mask ratio {run.ratio:g}, build size): ~{format_bytes(run.total)} = weights {format_bytes(run.weights)}"
        f" + {outputs} {format_bytes(run.outputs)} + hybrid K/V cache {format_bytes(run.cache)}, plus {engine}"
    )


def format_bytes(n: float) -> str:
    """Bytes as GiB, or MiB below 0.01 GiB."""
    return f"{n / GiB:.2f} GiB" if n >= 0.01 * GiB else f"{n / 2**20:.2f} MiB"


def format_table(needs: BuildNeeds, backend: str, compact: bool = True) -> list[str]:
    """The table as text lines. ``compact`` folds the per-module K/V rows of each graph into the
    largest one with a count (SD3.5-large has 38 of each)."""
    lines = [f"{'graph':6} {'tensor':24} {'dir':3} {'max shape':28} {'elements':>14} {'bytes':>12}"]
    over = {(t.graph, t.tensor) for t in needs.over_limit(backend)}
    groups: dict[tuple, list[TensorLimit]] = {}
    for t in needs.tensors:
        family = t.tensor.rstrip("0123456789") if compact else t.tensor
        groups.setdefault((t.graph, family, t.direction), []).append(t)
    for (graph, family, direction), rows in groups.items():
        t = max(rows, key=lambda r: r.elements)
        name = f"{family}* ×{len(rows)}" if len(rows) > 1 else t.tensor
        flag = "  OVER 2^31-1" if any((r.graph, r.tensor) in over for r in rows) else ""
        lines.append(f"{graph:6} {name:24} {direction:3} {str(list(t.max_shape)):28} {t.elements:>14,} {format_bytes(t.bytes):>12}{flag}")
    for name in GRAPH_NAMES:
        lines.append(f"{name:6} {'(all I/O at maxima)':24} {'':3} {'':28} {'':>14} {format_bytes(needs.io_bytes[name]):>12}   weights {format_bytes(needs.weights[name])}")
    lines.append(f"largest tensor: {max(t.elements for t in needs.tensors):,} elements (TensorRT limit {TRT_MAX_ELEMENTS:,})")
    lines.append(f"build needs: host memory ~{format_bytes(needs.host_bytes)}, disk ~{format_bytes(needs.disk_bytes)}; the engine folder keeps ~{format_bytes(needs.folder_bytes)}")
    if needs.gpu_bytes:
        lines.append(f"GPU memory: at least {format_bytes(needs.gpu_bytes)} for the engine check (the fp32 PyTorch model, then the engine, each with one call's tensors; activations on top)")
    return lines


def available_memory() -> int:
    """Bytes the host can give a new process now (``MemAvailable``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def free_gpu_memory() -> tuple[int, str] | None:
    """Free bytes of the current CUDA device, where a TensorRT build runs, and its name
    (``torch.cuda.mem_get_info``: cudaMemGetInfo); ``None`` where torch sees no GPU (the build then
    stops at its engine phase, naming what is missing)."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free), f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"


def check_gpu(needs: BuildNeeds, force: bool) -> None:
    """Refuses, in one line, a GPU with less free memory than the TensorRT engine check needs at
    least (unless ``force``): run once the build is known to happen (not for an up-to-date folder),
    before its export and engine build; no GPU or an ONNX Runtime build pass.

    Raises:
        BuildError: naming the device, both numbers and the way out.
    """
    gpu = None if force or not needs.gpu_bytes else free_gpu_memory()
    if gpu is not None and needs.gpu_bytes > gpu[0]:
        raise BuildError(
            describe(
                f"{gpu[1]} lacks the memory the build's engine check needs", got=f"{format_bytes(gpu[0])} free",
                expected=f"at least {format_bytes(needs.gpu_bytes)}: the fp32 PyTorch model and then the engine, each with one call's tensors (hs-export build --dry-run shows it)",
                fix="build on a GPU with more free memory (CUDA_VISIBLE_DEVICES picks one), or pass --force to try anyway",
            )
        )


def check_limits(needs: BuildNeeds, backend: str, out: Path, force: bool, also: str = "") -> None:
    """Refuses, in one line, a tensor past the backend's limit (always) and a host without the
    memory or disk the build needs (unless ``force``; ``also`` says what the disk need includes).
    The GPU's: :func:`check_gpu`.

    Raises:
        BuildError: naming the tensor or both numbers, and the way out.
    """
    over = needs.over_limit(backend)
    if over:
        t = max(over, key=lambda r: r.elements)
        raise BuildError(
            describe(
                f"{t.graph}: tensor {t.tensor} would exceed TensorRT's element limit", got=f"{list(t.max_shape)} = {t.elements:,} elements",
                expected=f"<= {TRT_MAX_ELEMENTS:,}", fix="build for fewer --prompts or a smaller --height/--width (or without --dynamic-shape)",
            )
        )
    if force:
        return
    memory = available_memory()
    if needs.host_bytes > memory:
        raise BuildError(
            describe("this host lacks the memory the build needs", got=f"{format_bytes(memory)} available", expected=f"~{format_bytes(needs.host_bytes)} (hs-export build --dry-run shows why)", fix="build on a larger host, or pass --force to try anyway")
        )
    target = nearest_existing(out.resolve())
    free = shutil.disk_usage(target).free
    if needs.disk_bytes > free:
        raise BuildError(
            describe(f"not enough free disk for the build under {target}", got=f"{format_bytes(free)} free", expected=f"~{format_bytes(needs.disk_bytes)}{also}", fix="free disk or choose another --out, or pass --force to try anyway")
        )
