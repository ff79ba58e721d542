"""Does ONNX Runtime's ``SkipLayerNormalization`` pay on the CPU? The measurement behind
docs/benchmarks.md ("Add + LayerNorm as one SkipLayerNormalization: slower, not kept").

ONNX Runtime's own fusion finds nothing in the exported graphs (it needs shape inference, which
fails on the dynamic contract), so each residual ``Add`` feeding a ``LayerNormalization`` is
replaced here by hand with one ``com.microsoft.SkipLayerNormalization`` (its fourth output is
the sum the next residual add reads). The fused copy of a model's graph shares the engine's
weights file (written beside the engine for the run, then removed: ONNX Runtime refuses
external data outside the graph's folder, symlinks resolved); both sessions take the folder's settings, and every kind of call the
default ``hybrid`` makes is timed alternating the two, order flipped each round.

    python3 scripts/ort_skip_layernorm.py engines/shapes256 [--graph large] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from onnxruntime.transformers.onnx_model import OnnxModel

from hs_export.build.export import dummy_inputs
from hs_runtime.backends.onnxruntime_backend import load_settings, session_options
from hs_runtime.contract import call_sizes, complex_token_count, graph_spec
from hs_runtime.manifest import Manifest


def fuse_skip_layernorm(model) -> int:
    """Add(a, b) → LayerNormalization(axis -1) becomes SkipLayerNormalization(a, b, γ, β)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {n.output[0] for n in graph.node if n.op_type == "Constant"} | {i.name for i in graph.initializer}
    fused, dropped = {}, set()
    for norm in (n for n in graph.node if n.op_type == "LayerNormalization"):
        add = producers.get(norm.input[0])
        attributes = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        if add is None or add.op_type != "Add" or any(i in constants for i in add.input) or attributes.get("axis", -1) != -1 or len(norm.input) < 2:
            continue
        fused[norm.name] = helper.make_node(
            "SkipLayerNormalization", [*add.input, *norm.input[1:]], [norm.output[0], "", "", add.output[0]],
            name=f"SkipLayerNormalization_{len(fused)}", domain="com.microsoft", epsilon=attributes.get("epsilon", 1e-5),
        )
        dropped.add(add.name)
    nodes = [fused.get(n.name, n) for n in graph.node if n.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    OnnxModel(model).topological_sort()
    return len(fused)


def fused_copy(engine: Path) -> tuple[Path, int]:
    model = onnx.load(str(engine), load_external_data=False)
    count = fuse_skip_layernorm(model)
    target = engine.with_name(engine.stem + ".skip_layernorm.onnx")
    onnx.save_model(model, str(target))
    return target, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--graph", default="large", choices=("small", "large"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--mask-ratio", type=float, default=0.02)
    args = parser.parse_args()
    manifest = Manifest.load(args.folder)
    dims, shape = manifest.dims(args.graph), manifest.shape
    spec = graph_spec(args.graph, dims)
    engine = args.folder / "engines" / f"{args.graph}.onnx"
    settings = load_settings(args.folder)
    tokens = shape.latent_height * shape.latent_width // dims.patch_size**2
    masked = complex_token_count(args.mask_ratio, tokens)
    calls = {  # the default hybrid's calls, CFG batch 2
        "dense": (call_sizes(2, tokens, 0, shape.text_tokens), spec.output_names[:1]),
        "dense, K/V out": (call_sizes(2, tokens, 0, shape.text_tokens), spec.output_names),
        f"on the mask ({masked})": (call_sizes(2, masked, tokens, shape.text_tokens, reuse_text=True), spec.output_names[:1]),
        f"outside the mask ({tokens - masked})": (call_sizes(2, tokens - masked, masked, shape.text_tokens), spec.output_names[:1]),
    }
    fused, count = fused_copy(engine)
    try:
        print(f"{engine}: {count} Add + LayerNormalization pairs fused")
        sessions = [ort.InferenceSession(str(path), session_options(settings), providers=["CPUExecutionProvider"]) for path in (engine, fused)]
        for label, (sizes, outputs) in calls.items():
            feeds = {k: v.numpy() for k, v in dummy_inputs(spec, sizes, torch.float32, seed=1).items()}
            exported, rewritten = (s.run(list(outputs), feeds) for s in sessions)
            error = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)) for a, b in zip(exported, rewritten))
            times = [[], []]
            for r in range(args.rounds):
                for k in (0, 1) if r % 2 == 0 else (1, 0):
                    start = time.perf_counter()
                    sessions[k].run(list(outputs), feeds)
                    times[k].append(time.perf_counter() - start)
            a, b = (statistics.median(t) * 1e3 for t in times)
            print(f"{args.graph} {label:24s} exported {a:8.2f} ms  SkipLayerNormalization {b:8.2f} ms  ratio {b / a:.3f}  max rel. diff {error:.1e}")
    finally:
        fused.unlink()


if __name__ == "__main__":
    main()
