"""ONNX export of the contract's graphs: export, clean up and fold, check, and parity vs PyTorch."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from hs_runtime.contract import GRAPH_SPECS, LARGE_TOKENS, GraphSpec, ModelDims
from hs_runtime.errors import ExportError, describe

TWO_GB = 2**31


def dummy_inputs(spec: GraphSpec, dims: ModelDims, sizes: dict, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random feeds for ``spec`` at ``sizes`` (valid token positions and timesteps included)."""
    g = torch.Generator().manual_seed(seed)
    shapes = spec.shapes(dims, sizes)
    feeds = {}
    for tensor in spec.inputs:
        shape = shapes[tensor.name]
        if tensor.name == "token_pos":
            table = dims.pos_embed_max_size**2
            feeds[tensor.name] = torch.stack([torch.randperm(table, generator=g)[: shape[1]] for _ in range(shape[0])])
        elif tensor.name == "timestep":
            feeds[tensor.name] = torch.rand(shape, generator=g) * 1000
        else:
            feeds[tensor.name] = torch.randn(shape, generator=g).to(dtype)
    return feeds


def export_sizes(dims: ModelDims, latent_height: int, latent_width: int, text_tokens: int, batch: int) -> dict:
    """Example sizes for tracing: distinct values on every dynamic axis so none is frozen."""
    n_img = dims.image_tokens(latent_height, latent_width)
    tokens = max(1, min(n_img - 1, n_img // 3 + 1))
    return {"batch": max(batch, 2), "height": latent_height, "width": latent_width, "text_tokens": text_tokens, "tokens": tokens}


def export_graph(module: torch.nn.Module, dims: ModelDims, sizes: dict, path: Path, opset: int = 17, dtype=torch.float32) -> Path:
    """``torch.onnx.export`` (TorchScript exporter) with the contract's names and dynamic axes.

    Past 2 GB the exporter writes one external file per tensor beside ``path``: give each graph a
    scratch folder of its own and let :func:`fold_and_check` consolidate.
    """
    spec = GRAPH_SPECS[module.graph_name]
    feeds = dummy_inputs(spec, dims, sizes, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(p.numel() * p.element_size() for p in module.parameters()) >= TWO_GB
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(feeds.values()),
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
                external_data=large,
            )
    except Exception as exc:  # torch raises many types here; all mean the same to the user
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExportError(describe(f"torch.onnx.export of {spec.name} failed", got=f"{type(exc).__name__}: {first}", fix=f"try another --opset (now {opset})")) from exc
    return path


def fold_and_check(source: Path, path: Path) -> Path:
    """Cleans up and folds constants with Polygraphy, saves to ``path`` (weights in one
    ``path.data`` file when the model passes 2 GB), then runs ``onnx.checker`` and shape inference.
    """
    import logging

    import onnx
    import onnxruntime
    from polygraphy.backend.onnx import fold_constants, onnx_from_path
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    onnxruntime.set_default_logger_severity(3)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    external = _has_external_data(source)
    with contextlib.redirect_stdout(io.StringIO()):  # symbolic shape inference prints sympy doubts
        model = fold_constants(onnx_from_path(str(source)), error_ok=False)
    # onnx.save_model moves tensors out before serialising, so it works past protobuf's 2 GB.
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    del model
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path))
    except Exception as exc:
        raise ExportError(describe(f"ONNX checks failed for {path.name}", got=str(exc).splitlines()[0])) from exc
    return path


def _has_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@dataclass(frozen=True)
class Parity:
    """Worst error of an engine vs. its PyTorch graph over several fresh inputs."""

    max_abs: float
    rel: float  # max_abs / max |reference|
    cases: int

    def ok(self, rtol: float) -> bool:
        return self.rel <= rtol


def parity_sizes(graph: str, dims: ModelDims, base: dict) -> list[dict]:
    """Input sizes to check: for ``large.tokens`` several N (1, a middle one, all tokens)."""
    if graph != LARGE_TOKENS:
        return [base]
    n_img = dims.image_tokens(base["height"], base["width"])
    return [{**base, "tokens": n} for n in sorted({1, max(1, n_img // 3), n_img})]


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


def check_parity(graph: str, module: torch.nn.Module, engine, dims: ModelDims, base_sizes: dict, dtype=torch.float32, seed: int = 1) -> Parity:
    """Runs ``engine`` (any backend) and ``module`` on fresh random inputs and reports the worst error."""
    spec = GRAPH_SPECS[graph]
    worst_abs = worst_rel = 0.0
    cases = parity_sizes(graph, dims, base_sizes)
    for i, sizes in enumerate(cases):
        feeds = dummy_inputs(spec, dims, sizes, dtype, seed=seed + i)
        with torch.inference_mode():
            ref = module(*feeds.values())
        ref = dict(zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)))
        got = engine(feeds)
        a, r = compare_outputs(ref, got)
        if math.isnan(r):  # non-finite outputs: no tolerance can pass them
            return Parity(math.nan, math.nan, len(cases))
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
    return Parity(worst_abs, worst_rel, len(cases))
