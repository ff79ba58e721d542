"""ONNX Runtime engines: the exported ONNX file itself plus the session settings to load it.

No offline-optimised copy is written: that would be a second full copy of the weights on disk
and in the build's memory. The session optimises the graph (``ORT_ENABLE_ALL``: constant
folding, fusions, layout) when it loads, on the host that runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUNTIME_SETTINGS = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0, "intra_op_allow_spinning": False, "log_severity_level": 3}


def adopt_model(onnx_path: Path, engine_dir: Path) -> Path:
    """Moves ``onnx_path`` and its ``.data`` file (same names, so the external-data references
    stay valid) into ``engine_dir``; returns the engine path."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    target = engine_dir / onnx_path.name
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.exists():
        os.replace(data, engine_dir / data.name)
    os.replace(onnx_path, target)
    return target


def save_settings(folder: Path) -> Path:
    path = folder / "ort_session.json"
    path.write_text(json.dumps(RUNTIME_SETTINGS, indent=2) + "\n")
    return path
