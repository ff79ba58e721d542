"""``hs-export inspect``: one screen that says what an engine folder holds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from hs_runtime.backends.onnxruntime_backend import load_settings, thread_pool
from hs_runtime.manifest import Manifest


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _range(bounds) -> str:
    low, opt, high = bounds
    return str(low) if low == high else f"{low} … {opt} … {high}"


def _families(tensors: list[dict]) -> list[tuple[str, list[dict]]]:
    """Groups the per-module tensors (``k_context_0`` … ``k_context_37``) into one row each."""
    groups: dict[str, list[dict]] = {}
    for t in tensors:
        stem = t["name"].rstrip("0123456789")
        groups.setdefault(stem if stem.endswith("_") else t["name"], []).append(t)
    return list(groups.items())


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
    for column in ("graph", "onnx", "engine", "profiles", "engine vs torch (rel)"):
        graphs.add_column(column)
    tensors = Table(title="I/O (min … opt … max per profile)")
    for column in ("graph", "tensor", "dtype", "axes", "shape"):
        tensors.add_column(column)
    for name, graph in manifest.data["graphs"].items():
        onnx = graph["onnx"]
        onnx_cell = "deleted (--keep-onnx keeps it)" if onnx["path"] is None else ("= engine" if onnx["path"] == graph["engine"]["path"] else _mib(onnx["bytes"]))
        graphs.add_row(name, onnx_cell, _mib(graph["engine"]["bytes"]), str(len(graph["profiles"])), f"{graph['parity']['rel']:.1e}")
        for arrow, key in (("→ ", "inputs"), ("← ", "outputs")):
            for family, members in _families(graph[key]):
                t = members[0]
                label = arrow + (f"{family}0 … {family}{len(members) - 1}" if len(members) > 1 else t["name"])
                shapes = "\n".join(_range(p[t["name"]]) for p in graph["profiles"]) if key == "inputs" else ""
                tensors.add_row(name, label, t["dtype"], ", ".join(t["axes"]), shapes)
    console.print(graphs)
    console.print(tensors)
    versions = ", ".join(f"{k} {v}" for k, v in manifest.data["versions"].items() if v)
    console.print(f"versions: {versions}")
    ort = load_settings(folder) if build["backend"] == "onnxruntime" else {}
    if ort:
        console.print(f"onnxruntime session: thread pool {thread_pool(ort)}, intra-op threads {ort.get('intra_op_num_threads', 0) or 'one per core'}, {ort.get('graph_optimization_level')}")
    for role in ("small", "large"):
        model = manifest.data["models"][role]
        console.print(f"{role}: {model['source']} (sha256 {model['sha256'][:12]})")
    artifacts = manifest.artifacts
    if artifacts:
        total = sum(a["bytes"] for a in artifacts)
        console.print(f"files: {len(artifacts)}, {_mib(total)}; sizes checked on load, sha256 by hs-export verify")
    else:
        console.print("files: no size/sha256 records (built before they existed); a --force rebuild adds them")
    console.print(_run_needs_line(manifest))
    console.print(_text_and_vae_line(manifest))
    console.print(f"rebuild: {manifest.rebuild_command}")


def _text_and_vae_line(manifest) -> str:
    """What prompt → image loads besides: the text encoders and VAE of the manifest's pipeline."""
    from .limits import ELEMENT_BYTES, format_bytes, text_and_vae_elements

    source = manifest.data.get("pipeline")
    elements = text_and_vae_elements(source)
    if elements is None:
        return f"prompt → image also loads the text encoders + VAE of {source or '--pipeline DIR'} (not on this host: size unknown)"
    sizes = ", ".join(f"{format_bytes(elements * ELEMENT_BYTES[p])} in {p}" for p in ("fp32", "bf16"))
    return f"prompt → image also loads the text encoders + VAE: {elements / 1e6:,.1f} M parameters, {sizes} (--text-dtype)"


def _run_needs_line(manifest) -> str:
    """What one runtime over this folder holds while it runs the default ``hybrid`` (``--dry-run``'s line)."""
    from .limits import folder_run_needs, format_run_needs

    return format_run_needs(*folder_run_needs(manifest))
