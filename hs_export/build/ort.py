"""ONNX Runtime engines: an offline-optimised model per graph plus the session settings to load it."""

from __future__ import annotations

import json
from pathlib import Path

from hs_runtime.backends.onnxruntime_backend import session_options

# Extended (not ALL) offline: layout-specific rewrites of ENABLE_ALL tie a saved model to the
# build host's CPU; the runtime applies them at load time instead.
OFFLINE_LEVEL = "ORT_ENABLE_EXTENDED"
RUNTIME_SETTINGS = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0, "intra_op_allow_spinning": False, "log_severity_level": 3}


def optimize_model(onnx_path: Path, engine_path: Path, external_data: bool) -> Path:
    """Runs ONNX Runtime's graph optimiser once and saves the optimised model."""
    import onnxruntime as ort

    options = session_options({"graph_optimization_level": OFFLINE_LEVEL})
    options.optimized_model_filepath = str(engine_path)
    if external_data:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", engine_path.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return engine_path


def save_settings(folder: Path) -> Path:
    path = folder / "ort_session.json"
    path.write_text(json.dumps(RUNTIME_SETTINGS, indent=2) + "\n")
    return path
