"""The build's memory and disk at scale cannot silently regress: measured on a real (small) pair.

The ratios here are what `scripts/measure_build_memory.py --size test` measures (2026-12-07: the
build grows 2.26× the fp32 weights over its imports, 2.75× while the engine check held the
PyTorch model beside the engine; the folder is 1.03× the weights); the previous three-graph build
needed ~7–8× and 3.9×. The margins absorb allocator noise, not a second copy of the weights.
"""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_build_memory.py"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("measure_build_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure("test", tmp_path_factory.mktemp("build-memory"), bench=True, log=lambda *_: None)


def test_build_peak_memory_stays_near_two_copies_of_the_weights(measured):
    # one copy of both models for the export, then one model, then (freed) its ONNX Runtime session
    assert measured["build_growth_over_weights"] <= 2.6, measured


def test_engine_folder_holds_the_weights_once(measured):
    assert measured["folder_over_weights"] <= 1.2, measured


def test_the_builds_own_estimate_covers_what_it_measured(measured):
    """``build --dry-run`` and the host check before a build use the estimate: it must not fall
    below the measured peak, and the folder must be what it says."""
    assert measured["build_peak_rss"] <= measured["estimate_host_bytes"], measured
    assert abs(measured["folder_bytes"] / measured["estimate_folder_bytes"] - 1) < 0.1, measured


def test_a_half_precision_build_is_estimated_with_its_fp32_check(tmp_path_factory):
    """The engine check loads each PyTorch model in fp32 whatever the precision, and ONNX Runtime's
    CPU kernels run an fp16 session in fp32: the fp16 build of the 445M pair peaked at 4.98 GiB
    against an estimate of 2.67 GiB before both were counted."""
    spec = importlib.util.spec_from_file_location("measure_build_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    half = module.measure("test", tmp_path_factory.mktemp("build-memory-fp16"), bench=False, log=lambda *_: None, precision="fp16")
    assert half["build_peak_rss"] <= half["estimate_host_bytes"], half
    assert abs(half["folder_bytes"] / half["estimate_folder_bytes"] - 1) < 0.1, half


def test_runtime_holds_each_model_once(measured):
    growth = measured["bench_peak_rss"] - measured["bench_baseline_rss"]
    assert growth <= 1.5 * measured["weights_bytes_fp32"] + 200 * 2**20, measured
