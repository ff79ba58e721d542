"""ONNX export of the contract's graphs without copies of the weights, and parity vs PyTorch.

``torch.onnx.export`` writes the graph alone (``export_params=False``: the weights become graph
inputs named after the module's parameters); :func:`attach_weights` then streams each parameter
from the loaded model into one external-data file and turns those inputs into initializers. So
the export holds the model once (plus one tensor at a time) instead of building a protobuf copy
of every weight, and ``onnx.checker`` / shape inference run on the graph file without reading
the weights. Constants are not folded here: ONNX Runtime folds at session start and TensorRT at
build time, both over the weights they load anyway.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from hs_runtime.contract import GraphSpec, ModelDims, call_sizes
from hs_runtime.errors import ExportError, describe

ALIGN = 64 * 1024  # external tensors start on 64 KiB boundaries, so ONNX Runtime can map them
INLINE_BYTES = 1024  # smaller tensors stay inside the graph file


def dummy_inputs(spec: GraphSpec, sizes: dict, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random feeds for ``spec`` at ``sizes`` (distinct valid token positions and timesteps)."""
    g = torch.Generator().manual_seed(seed)
    shapes = spec.shapes(sizes)
    feeds = {}
    for tensor in spec.inputs:
        shape = shapes[tensor.name]
        if tensor.name == "token_pos":
            table = spec.dims.pos_embed_max_size**2
            feeds[tensor.name] = torch.stack([torch.randperm(table, generator=g)[: shape[1]] for _ in range(shape[0])])
        elif tensor.name == "timestep":
            feeds[tensor.name] = torch.rand(shape, generator=g) * 1000
        else:
            feeds[tensor.name] = torch.randn(shape, generator=g).to(dtype)
    return feeds


def export_sizes(dims: ModelDims, latent_height: int, latent_width: int, text_tokens: int, batch: int) -> dict:
    """Example sizes for tracing: a non-zero, distinct value on every dynamic axis, so none is
    frozen (the graph is exported with a token subset, context and both kinds of text)."""
    n_img = dims.image_tokens(latent_height, latent_width)
    tokens = max(1, min(n_img - 1, n_img // 3 + 1))
    sizes = call_sizes(max(batch, 2), tokens, max(1, n_img - tokens), text_tokens)
    sizes["text_context"] = 3 if text_tokens != 3 else 5  # exported with both text kinds present
    return sizes


def export_graph(module: torch.nn.Module, sizes: dict, path: Path, opset: int = 17, dtype=torch.float32) -> Path:
    """``torch.onnx.export`` of the graph alone (TorchScript exporter, ``export_params=False``)
    with the contract's names and dynamic axes, then :func:`attach_weights`.

    Raises:
        ExportError: the exporter failed (its one-line reason), or the graph uses a tensor that is
            neither a contract input nor a parameter/buffer of ``module``.
    """
    spec = module.spec
    feeds = dummy_inputs(spec, sizes, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(feeds[n] for n in spec.input_names),
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                export_params=False,  # no protobuf copy of the weights: attach_weights streams them
                do_constant_folding=False,  # folding would turn parameters into unnamed tensors
                dynamo=False,
            )
    except Exception as exc:  # torch raises many types here; all mean the same to the user
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExportError(describe(f"torch.onnx.export of {spec.name} failed", got=f"{type(exc).__name__}: {first}", fix=f"try another --opset (now {opset})")) from exc
    return attach_weights(path, module, spec)


def attach_weights(path: Path, module: torch.nn.Module, spec: GraphSpec) -> Path:
    """Moves every non-contract graph input into ``path.data`` as an initializer, streaming the
    tensors from ``module`` one at a time; checks and shape-infers the graph file.

    The graph file holds the graph and tensors under :data:`INLINE_BYTES`; the data file holds
    the rest, each at a :data:`ALIGN`-byte offset (ONNX external-data format).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    tensors = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    contract = set(spec.input_names)
    keep, data_path = [], path.with_name(path.name + ".data")
    offset = 0
    with data_path.open("wb") as data:
        for value in model.graph.input:
            if value.name in contract:
                keep.append(value)
                continue
            tensor = tensors.get(value.name)
            if tensor is None:
                raise ExportError(describe(f"{spec.name}: the exported graph takes an unknown input", got=value.name, expected=f"the contract's inputs or a parameter of the {spec.name} model"))
            tensor = tensor.detach().cpu().contiguous()
            raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
            array = raw.numpy()
            if array.nbytes < INLINE_BYTES:
                proto = numpy_helper.from_array(array, value.name)
            else:
                offset = -(-offset // ALIGN) * ALIGN
                data.seek(offset)
                data.write(memoryview(array).cast("B"))
                proto = onnx.TensorProto(name=value.name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
                proto.data_location = onnx.TensorProto.EXTERNAL
                for key, field in (("location", data_path.name), ("offset", offset), ("length", array.nbytes)):
                    proto.external_data.add(key=key, value=str(field))
                offset += array.nbytes
            if tensor.dtype == torch.bfloat16:
                proto.data_type = onnx.TensorProto.BFLOAT16
            model.graph.initializer.append(proto)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save_model(model, str(path))
    del model
    if offset == 0:
        os.remove(data_path)
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path))
    except Exception as exc:
        raise ExportError(describe(f"ONNX checks failed for {path.name}", got=str(exc).splitlines()[0])) from exc
    return path


@dataclass(frozen=True)
class Parity:
    """Worst error of an engine vs. its PyTorch graph over several fresh inputs."""

    max_abs: float
    rel: float  # max_abs / max |reference|
    cases: int

    def ok(self, rtol: float) -> bool:
        return self.rel <= rtol


def parity_sizes(dims: ModelDims, base: dict) -> list[dict]:
    """The calls to check: dense, a subset with context and text recomputed, the same with the
    text reused, and one token with all others as context (the profile minimum)."""
    n_img = dims.image_tokens(base["height"], base["width"])
    batch, text = base["batch"], base["text_tokens"]
    third = max(1, n_img // 3)
    return [
        call_sizes(batch, n_img, 0, text),
        call_sizes(batch, third, n_img - third, text),
        call_sizes(batch, third, n_img - third, text, reuse_text=True),
        call_sizes(batch, 1, n_img - 1, text, reuse_text=True),
    ]


def compare_outputs(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> tuple[float, float]:
    """``(max_abs, max_abs / max|ref|)`` over the outputs both hold; ``(nan, nan)`` if either side
    holds NaN/inf, so a non-finite output never passes as "within tolerance"."""
    worst_abs, worst_rel = 0.0, 0.0
    for name, ref in reference.items():
        if name not in candidate:
            continue
        ref = ref.detach().float().cpu()
        got = candidate[name].detach().float().cpu()
        if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
            return math.nan, math.nan
        err = (ref - got).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 1.0
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(scale, 1e-12))
    return worst_abs, worst_rel


def built_sizes(shape) -> dict:
    """The call sizes a build is for (``shape``: a :class:`~hs_runtime.profiles.BuildShape`)."""
    return {"batch": shape.batch, "height": shape.latent_height, "width": shape.latent_width, "text_tokens": shape.text_tokens}


def parity_base_sizes(shape, backend: str) -> dict:
    """The sizes the engine check runs at. ONNX Runtime has no profiles: a small latent (≤ 32×32)
    checks the graph. A TensorRT engine is checked at the built size (its dense profile may hold
    only that one)."""
    sizes = built_sizes(shape)
    if backend == "onnxruntime":
        sizes.update(height=min(sizes["height"], 32), width=min(sizes["width"], 32))
    return sizes


def _case_feeds(spec, sizes: dict, dtype, seed: int, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in dummy_inputs(spec, sizes, dtype, seed=seed).items()}


def _engine_feeds(spec, feeds: dict, engine_dtype) -> dict[str, torch.Tensor]:
    if engine_dtype is None:
        return feeds
    return {t.name: feeds[t.name].to(engine_dtype) if t.dtype == "float" else feeds[t.name] for t in spec.inputs}


def _worst(pairs, count: int) -> Parity:
    """The worst error over ``(reference, engine outputs)`` pairs; NaN as soon as one is non-finite."""
    worst_abs = worst_rel = 0.0
    for ref, got in pairs:
        a, r = compare_outputs(ref, got)
        if math.isnan(r):  # non-finite outputs: no tolerance can pass them
            return Parity(math.nan, math.nan, count)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
    return Parity(worst_abs, worst_rel, count)


def release_memory(device) -> None:
    """Hands back what the objects just dropped held before the next big load on ``device``: the
    garbage they leave, and on a GPU torch's cached blocks, which TensorRT (allocating outside
    torch's cache) could not reuse."""
    gc.collect()
    if torch.device(device).type == "cuda":
        with torch.cuda.device(device):  # this device's cache, whichever is current
            torch.cuda.empty_cache()


def reference_outputs(module: torch.nn.Module, base_sizes: dict, dtype=torch.float32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``module``'s outputs for each of :func:`parity_sizes`' calls, made on the module's device in
    ``dtype`` from seeded inputs and kept on the host: with :func:`compare_with_references` a check
    runs the model, frees it, then loads the engine, so the two never share memory (SD3.5-large: a
    30 GiB fp32 model beside a 16 GiB TensorRT engine on the GPU, or a 30 GiB fp32 ONNX Runtime
    session on the host)."""
    spec = module.spec
    device = next(module.parameters()).device
    references = []
    for i, sizes in enumerate(parity_sizes(spec.dims, base_sizes)):
        feeds = _case_feeds(spec, sizes, dtype, seed + i, device)
        with torch.inference_mode():
            outputs = module(*[feeds[n] for n in spec.input_names])
        references.append({name: t.detach().cpu() for name, t in zip(spec.output_names, outputs)})
        del feeds, outputs
    return references


def compare_with_references(engine, spec, references: list[dict[str, torch.Tensor]], base_sizes: dict, device, dtype=torch.float32, seed: int = 1, engine_dtype=None) -> Parity:
    """Runs ``engine`` (any backend) on the inputs :func:`reference_outputs` used, re-made from the
    same seeds on ``device`` and cast to ``engine_dtype``, and reports the worst error over the
    calls and every output (NaN when either side is non-finite)."""
    cases = parity_sizes(spec.dims, base_sizes)
    if len(references) != len(cases):
        raise ValueError(f"{len(references)} reference outputs for {len(cases)} checked calls: make them with reference_outputs at the same sizes")
    pairs = ((ref, engine(_engine_feeds(spec, _case_feeds(spec, sizes, dtype, seed + i, device), engine_dtype))) for i, (sizes, ref) in enumerate(zip(cases, references)))
    return _worst(pairs, len(cases))
