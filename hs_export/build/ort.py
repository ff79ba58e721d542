"""ONNX Runtime engines: the exported ONNX file, with ONNX Runtime's fused transformer operators
written into its graph, plus the session settings to load it.

The fusions are rewrites of the graph file alone (:func:`fuse_graph`): the weights stay in the
export's external-data file, untouched and never loaded, so the engine folder still holds the
weights once. What they buy, measured on a 2-core CPU (docs/benchmarks.md): ``FastGelu`` (the
tanh GELU and its bias, one kernel instead of eight) and ``MultiHeadAttention`` (scores, softmax
and the weighted sum in one kernel, no ``[B, heads, q, k]`` tensor, no head transposes) make a
dense large call ~12% faster, a hybrid step ~10%. ONNX Runtime still applies ``ORT_ENABLE_ALL``
(constant folding, LayerNorm and MatMul fusions, layout) when a session loads the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path

# thread_pool "global": the small and large sessions share ONNX Runtime's process-wide pool
# (hs_runtime.backends.onnxruntime_backend.session_options says what that means for a host).
RUNTIME_SETTINGS = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "thread_pool": "global",
    "intra_op_num_threads": 0,
    "intra_op_allow_spinning": False,
    "log_severity_level": 3,
}

MS_DOMAIN = "com.microsoft"


def adopt_model(onnx_path: Path, engine_dir: Path) -> Path:
    """Moves ``onnx_path`` and its ``.data`` file (same names, so the external-data references
    stay valid) into ``engine_dir`` and fuses its graph for ONNX Runtime (:func:`fuse_graph`);
    returns the engine path."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    target = engine_dir / onnx_path.name
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.exists():
        os.replace(data, engine_dir / data.name)
    os.replace(onnx_path, target)
    fuse_graph(target)
    return target


def save_settings(folder: Path, thread_pool: str = RUNTIME_SETTINGS["thread_pool"]) -> Path:
    path = folder / "ort_session.json"
    path.write_text(json.dumps({**RUNTIME_SETTINGS, "thread_pool": thread_pool}, indent=2) + "\n")
    return path


def fuse_graph(path: Path) -> dict[str, int]:
    """Rewrites the graph file at ``path`` with ONNX Runtime's fused operators; returns how many
    of each it wrote (``{"FastGelu": n, "MultiHeadAttention": m}``).

    Only fp32 graphs are rewritten (the CPU kernels of both operators are fp32). External data
    references are kept as they are: the weights are neither read nor written.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    first = model.graph.input[0].type.tensor_type.elem_type if model.graph.input else None
    if first != onnx.TensorProto.FLOAT:
        return {}
    counts = {"FastGelu": _fuse_gelu(model), "MultiHeadAttention": fuse_attention(model)}
    if any(counts.values()):
        _tidy(model)
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))  # still valid ONNX for other tools, not only for ONNX Runtime
    return counts


def _tidy(model) -> None:
    """Nodes back in topological order (a fusion appends its fused node at the end of the list,
    which ONNX Runtime sorts itself but ``onnx.checker`` and other tools refuse), and no shape
    record left for a tensor the fusions removed."""
    try:
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError:  # no GELU fusion either (it needs the same tools): the order is the export's
        OnnxModel = None
    if OnnxModel is not None:
        OnnxModel(model).topological_sort()
    graph = model.graph
    live = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    stale = [v for v in graph.value_info if v.name not in live]
    for v in stale:
        graph.value_info.remove(v)


def _fuse_gelu(model) -> int:
    """ONNX Runtime's own tanh-GELU (+ bias) fusion, from its ``onnxruntime.transformers``
    optimizer (the MMDiT model type), run on the graph only; 0 where that optimizer is absent."""
    try:
        from onnxruntime.transformers.onnx_model import OnnxModel
        from onnxruntime.transformers.fusion_fastgelu import FusionFastGelu
    except ImportError:  # an ONNX Runtime build without its transformers tools
        return 0
    before = sum(1 for n in model.graph.node if n.op_type == "FastGelu")
    quiet = logging.getLogger("fusion_base"), logging.getLogger("onnx_model")
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        wrapped = OnnxModel(model)
        FusionFastGelu(wrapped).apply()  # takes the preceding bias Add in as its bias input
        wrapped.prune_graph()
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return sum(1 for n in model.graph.node if n.op_type == "FastGelu") - before


def _perm(node) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


def _constant_int(name: str, producers: dict) -> int | None:
    """The scalar an ``Unsqueeze(Constant)`` / ``Constant`` chain holds, else ``None``."""
    from onnx import numpy_helper

    node = producers.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Identity"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Constant" or not node.attribute:
        return None
    value = numpy_helper.to_array(node.attribute[0].t).reshape(-1)
    return int(value[0]) if value.size == 1 else None


def fuse_attention(model) -> int:
    """Replaces each exported ``scaled_dot_product_attention`` (split heads, ``q·kᵀ`` scaled,
    softmax, ``·v``, merge heads) by one ``com.microsoft.MultiHeadAttention`` on the ``[B, S, D]``
    query and ``[B, L, D]`` key/value tensors; returns how many it replaced.

    The head count is read from the constant in the query's head-split ``Reshape``; a match whose
    head count or layout cannot be read is left as exported.
    """
    from onnx import helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    replacements = {}
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        scores = producers.get(softmax.input[0])
        users = consumers[softmax.output[0]]
        if scores is None or scores.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
            continue
        weighted = users[0]
        scale_q, scale_k = producers.get(scores.input[0]), producers.get(scores.input[1])
        if scale_q is None or scale_k is None or scale_q.op_type != "Mul" or scale_k.op_type != "Mul":
            continue
        t_q, t_k, t_v = producers.get(scale_q.input[0]), producers.get(scale_k.input[0]), producers.get(weighted.input[1])
        if any(t is None or t.op_type != "Transpose" for t in (t_q, t_k, t_v)):
            continue
        if (_perm(t_q), _perm(t_k), _perm(t_v)) != ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]):
            continue
        r_q, r_k, r_v = (producers.get(t.input[0]) for t in (t_q, t_k, t_v))
        if any(r is None or r.op_type != "Reshape" for r in (r_q, r_k, r_v)):
            continue
        merged = consumers[weighted.output[0]]
        if len(merged) != 1 or merged[0].op_type != "Transpose" or _perm(merged[0]) != [0, 2, 1, 3]:
            continue
        outputs = [n for n in consumers[merged[0].output[0]] if n.op_type == "Reshape"]
        target = producers.get(r_q.input[1])
        if len(outputs) != 1 or target is None or target.op_type != "Concat" or len(target.input) != 4:
            continue
        heads, head_dim = _constant_int(target.input[2], producers), _constant_int(target.input[3], producers)
        if not heads or not head_dim or heads <= 0:
            continue
        replacements[outputs[0].name] = helper.make_node(
            "MultiHeadAttention", [r_q.input[0], r_k.input[0], r_v.input[0]], [outputs[0].output[0]],
            name=f"MultiHeadAttention_{len(replacements)}", domain=MS_DOMAIN, num_heads=heads, scale=1.0 / math.sqrt(head_dim),
        )
    if not replacements:
        return 0
    nodes = [replacements.get(n.name, n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _prune(graph)
    return len(replacements)


def _prune(graph) -> None:
    """Drops the nodes no graph output depends on (the replaced attention's pieces)."""
    producers = {o: n for n in graph.node for o in n.output}
    live, stack = set(), [o.name for o in graph.output]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(i for i in node.input if i)
    kept = [n for n in graph.node if id(n) in live]
    del graph.node[:]
    graph.node.extend(kept)
