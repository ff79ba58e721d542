"""What ONNX Runtime's CPU ``MatMul`` reaches at few rows: the rate behind docs/benchmarks.md
("Where the refreshed default's time goes on the CPU").

A chain of the image-stream projections of one transformer (per layer q, k, v, out: D×D; the
MLP: D×4D and 4D×D), constant weights as a built engine holds them, run at M rows: the GEMM time
of a call on M/2 tokens with CFG, without attention, AdaLN or the graph's small nodes.

    python3 scripts/ort_matmul_rate.py [--hidden 384] [--layers 8] [--rows 4,24,128,1460]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def chain(hidden: int, layers: int):
    shapes = [(hidden, hidden)] * 4 + [(hidden, 4 * hidden), (4 * hidden, hidden)]
    shapes = shapes * layers
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i, (a, b) in enumerate(shapes):
        weights.append(numpy_helper.from_array((rng.standard_normal((a, b)) * 0.02).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["M", hidden])  # noqa: E731
    graph = helper.make_graph(nodes, "chain", [io("x")], [io(x)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384, help="the bench preset's large model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", default="4,24,128,1460")
    args = parser.parse_args()
    model, shapes = chain(args.hidden, args.layers)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    params = sum(a * b for a, b in shapes)
    for rows in (int(r) for r in args.rows.split(",")):
        feed = {"x": np.random.default_rng(1).standard_normal((rows, args.hidden)).astype(np.float32)}
        for _ in range(5):
            session.run(None, feed)
        times = []
        for _ in range(30 if rows < 1000 else 5):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        print(f"M={rows:5d}: {t * 1e3:7.2f} ms, {len(shapes)} MatMuls over {params * 4 / 1e6:.0f} MB of weights: "
              f"{params * 4 / t / 1e9:5.1f} GB/s, {2 * rows * params / t / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
