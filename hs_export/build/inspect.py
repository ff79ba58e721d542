"""``hs-export inspect``: one screen that says what an engine folder holds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from hs_runtime.manifest import Manifest


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _range(bounds) -> str:
    low, opt, high = bounds
    return str(low) if low == high else f"{low} … {opt} … {high}"


def inspect_folder(folder) -> None:
    """Prints what ``folder`` holds (after the manifest's own checks, file sizes included)."""
    manifest = Manifest.load(folder)
    console = Console()
    build, shape = manifest.build, manifest.shape
    console.print(
        f"[bold]{folder}[/]: {build['backend']} {build['precision']}, {build['width']}×{build['height']} px, "
        f"{shape.prompts} prompt(s) (batch {shape.batch}), {shape.text_tokens} text tokens, schema {manifest.data['schema_version']}"
    )
    graphs = Table(title="graphs")
    for column in ("graph", "model", "onnx", "engine", "profiles", "ONNX vs torch (rel)"):
        graphs.add_column(column)
    tensors = Table(title="I/O (min … opt … max per profile)")
    for column in ("graph", "tensor", "dtype", "axes", "shape"):
        tensors.add_column(column)
    for name, graph in manifest.data["graphs"].items():
        graphs.add_row(name, graph["model"], _mib(graph["onnx"]["bytes"]), _mib(graph["engine"]["bytes"]), str(len(graph["profiles"])), f"{graph['onnx']['parity']['rel']:.1e}")
        for t in graph["inputs"]:
            shapes = "\n".join(_range(p[t["name"]]) for p in graph["profiles"])
            tensors.add_row(name, "→ " + t["name"], t["dtype"], ", ".join(t["axes"]), shapes)
        for t in graph["outputs"]:
            tensors.add_row(name, "← " + t["name"], t["dtype"], ", ".join(t["axes"]), "")
    console.print(graphs)
    console.print(tensors)
    versions = ", ".join(f"{k} {v}" for k, v in manifest.data["versions"].items() if v)
    console.print(f"versions: {versions}")
    for role in ("small", "large"):
        model = manifest.data["models"][role]
        console.print(f"{role}: {model['source']} (sha256 {model['sha256'][:12]})")
    artifacts = manifest.artifacts
    if artifacts:
        total = sum(a["bytes"] for a in artifacts)
        console.print(f"files: {len(artifacts)}, {_mib(total)}; sizes checked on load, sha256 by hs-export verify")
    else:
        console.print("files: no size/sha256 records (built before they existed); a --force rebuild adds them")
    console.print(f"rebuild: {manifest.rebuild_command}")
