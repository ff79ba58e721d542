"""The limits table: computed from the contract and the configs alone, before anything is exported."""

import pytest
from click.testing import CliRunner

from hs_export.build import BuildConfig, resolve_models
from hs_export.build import limits
from hs_export.build.builder import dry_run, plan_build
from hs_export.cli import main
from hs_runtime.contract import ModelDims
from hs_runtime.errors import BuildError
from hs_runtime.presets import MODEL_CONFIGS
from hs_runtime.profiles import BuildShape

SD35 = {"small": MODEL_CONFIGS["sd3.5-medium"], "large": MODEL_CONFIGS["sd3.5-large"]}
DIMS = {role: ModelDims.from_config(c) for role, c in SD35.items()}


def _needs(prompts=2, backend="tensorrt", precision="bf16", **shape):
    return limits.build_needs(BuildShape(prompts, 128, 128, 333, **shape), DIMS, SD35, precision, backend)


def test_sd35_large_two_prompts_fits_tensorrt_per_module_kv():
    needs = _needs()
    biggest = max(needs.tensors, key=lambda t: t.elements)
    assert biggest.tensor.startswith(("k_", "v_")) and biggest.max_shape == (4, 4096, 2432)
    assert biggest.elements == 39_845_888 and biggest.bytes == 2 * biggest.elements  # bf16 I/O
    assert not needs.over_limit("tensorrt")
    # the old one-tensor cache [38, 2, 4, 4096, 2432] would have been 3.0e9 elements
    assert 2 * 38 * biggest.elements > limits.TRT_MAX_ELEMENTS
    # weights from the configs on the meta device: SD3.5-large ~8.1 B parameters, medium ~2.5 B
    assert limits.weight_count(SD35["large"]) == pytest.approx(8.1e9, rel=0.03)
    assert limits.weight_count(SD35["small"]) == pytest.approx(2.47e9, rel=0.03)
    assert needs.host_bytes < 64 * 2**30  # the 64 GB host


def test_sd35_build_needs_are_pinned():
    """Host memory, disk and folder of the SD3.5 build, so a change of the formulas shows here.
    SD3.5-large keeps block 35 (212,999,680 weights) in fp32 at bf16/fp16 (precision_plan); the
    engine check loads each PyTorch model in fp32 on the host, then (freed) the ONNX Runtime
    session it checks, whose CPU kernels hold fp16 initializers cast to fp32; an ONNX Runtime build is sized
    by its measured peak, both fp32 models + ``ORT_BUILD_EXTRA`` × the larger (a 0.93 B pair:
    6.55 GiB fp32, 6.44 fp16, since the check frees the model before the session loads)."""
    gib = 2**30
    count = {role: limits.weight_count(config) for role, config in SD35.items()}
    trt = _needs(prompts=1)
    assert trt.weights["large"] == 2 * count["large"] + 2 * 212_999_680 and trt.weights["small"] == 2 * count["small"]
    assert (round(trt.host_bytes / gib, 2), round(trt.disk_bytes / gib, 2), round(trt.folder_bytes / gib, 2)) == (32.14, 40.34, 20.17)
    assert trt.host_bytes == 2 * trt.weights["large"] + 2**30  # the builder's copy beside the model
    ort = _needs(prompts=1, backend="onnxruntime", precision="fp16")
    # the measured peak's factor over the larger fp32 model (fp32 kernels on the CPU, fp16 or not)
    assert ort.host_bytes == int(4 * (count["large"] + count["small"]) + 4 * count["large"] * limits.ORT_BUILD_EXTRA + 2**30)
    assert round(ort.host_bytes / gib, 2) == 63.31
    assert ort.disk_bytes == ort.folder_bytes == sum(ort.weights.values())
    # TensorRT's engine check: the fp32 large model with its largest call's tensors, then (freed)
    # the engine with its output buffers: the model phase is the larger (it was 48.97 GiB when
    # both were on the GPU at once)
    assert round(trt.gpu_bytes / gib, 2) == 36.46 and ort.gpu_bytes == 0
    check = limits.parity_case_bytes("large", BuildShape(1, 128, 128, 333), DIMS["large"], "bf16", "tensorrt")
    assert trt.gpu_bytes == 4 * count["large"] + check.model_call
    outputs = sum(t.bytes for t in trt.tensors if t.graph == "large" and t.direction == "out")
    assert trt.weights["large"] + outputs + check.engine_inputs < trt.gpu_bytes
    assert round(check.references / gib, 2) == 10.32  # every call's fp32 outputs, kept on the host


def test_a_tensor_past_the_element_limit_is_refused_in_one_line(tmp_path):
    needs = _needs(prompts=120)  # kv_* [2, 240, 4096, 2432] = 4.8e9 elements
    over = needs.over_limit("tensorrt")
    assert over and not needs.over_limit("onnxruntime")
    with pytest.raises(BuildError) as info:
        limits.check_limits(needs, "tensorrt", tmp_path / "out", force=True)  # force does not lift it
    message = str(info.value)
    assert "would exceed TensorRT's element limit" in message and "2,147,483,647" in message and "\n" not in message
    assert "--prompts" in message


def test_host_memory_and_disk_are_checked_unless_forced(tmp_path, monkeypatch):
    needs = _needs()
    monkeypatch.setattr(limits, "free_gpu_memory", lambda: None)  # no GPU: the build's engine phase says so
    monkeypatch.setattr(limits, "available_memory", lambda: 8 * 2**30)
    with pytest.raises(BuildError, match=r"lacks the memory .* 8.00 GiB available .* --force to try anyway"):
        limits.check_limits(needs, "tensorrt", tmp_path / "out", force=False)
    limits.check_limits(needs, "tensorrt", tmp_path / "out", force=True)
    monkeypatch.setattr(limits, "available_memory", lambda: 10**15)
    monkeypatch.setattr(limits.shutil, "disk_usage", lambda _: type("U", (), {"free": 2**30})())
    with pytest.raises(BuildError, match=r"not enough free disk .* 1.00 GiB free"):
        limits.check_limits(needs, "tensorrt", tmp_path / "out", force=False)


def test_dry_run_loads_no_weights_and_prints_the_table(tmp_path):
    selection = resolve_models("sd3.5-large", None, None, None, materialize=False)
    assert selection.small is None  # the preset was not written to disk
    lines = []
    plan = dry_run(selection, BuildConfig(out=tmp_path / "e", backend="tensorrt", precision="bf16", prompts=2), log=lines.append)
    text = "\n".join(lines)
    assert "k_* ×38" in text and "v_context_* ×38" in text and "[4, 4096, 2432]" in text and "limits: ok" in text
    assert "host memory" in text and plan.shape.batch == 4
    assert "run needs (default hybrid at mask ratio 0.02, build size)" in text and "hybrid K/V cache" in text
    assert not (tmp_path / "e").exists()


def test_run_needs_at_sd35_large():
    """One TensorRT runtime at SD3.5-large + SD3.5-medium, 1024², bf16, one prompt with CFG: both
    engines' weights, every output buffer at its profiles' maxima, and the default plan's cache."""
    needs = _needs(prompts=1, mask_ratio=0.02)
    shape = BuildShape(1, 128, 128, 333, mask_ratio=0.02)
    run = limits.run_needs(needs, shape, DIMS, "bf16", "tensorrt")
    assert run.weights == sum(needs.weights.values())
    assert run.outputs == sum(t.bytes for t in needs.tensors if t.direction == "out")
    assert 4.5 * 2**30 < run.outputs < 5.0 * 2**30 and 3.0 * 2**30 < run.cache < 3.1 * 2**30
    assert 27 * 2**30 < run.total < 28.5 * 2**30  # + TensorRT's activations: one instance per 80 GB GPU leaves room
    # what the TensorRT backend allocates: one buffer per output at the largest size any profile allows
    from hs_runtime.backends.tensorrt_backend import output_capacity
    from hs_runtime.contract import graph_spec
    from hs_runtime.profiles import graph_profiles

    allocated = sum(
        n * 2 for name, d in DIMS.items() for n in output_capacity(graph_spec(name, d), graph_profiles(name, shape, d)).values()
    )
    assert run.outputs == allocated
    ort = limits.run_needs(limits.build_needs(shape, DIMS, SD35, "fp16", "onnxruntime"), shape, DIMS, "fp16", "onnxruntime")
    assert ort.cache == run.cache and ort.outputs < run.outputs  # a capture step's K/V, not every buffer at its maxima


def test_cli_dry_run(tmp_path):
    result = CliRunner().invoke(main, ["build", "--preset", "sd3.5-large", "--backend", "tensorrt", "--precision", "bf16", "--prompts", "2", "--dry-run", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "largest tensor: 39,845,888 elements" in result.output
    result = CliRunner().invoke(main, ["build", "--preset", "sd3.5-large", "--backend", "tensorrt", "--prompts", "200", "--dry-run", "--out", str(tmp_path / "e")])
    assert result.exit_code == 1 and result.output.count("\n") >= 1 and "would exceed TensorRT's element limit" in result.output.splitlines()[-1]


def test_tiny_plan_matches_the_built_profiles(tiny_paths, tmp_path):
    selection = resolve_models("tiny", None, None, None, log=lambda *_: None)
    plan = plan_build(selection, BuildConfig(out=tmp_path / "e"))
    rows = {(t.graph, t.tensor): t for t in plan.needs.tensors}
    assert rows[("large", "patches")].max_shape == (2, 64, 64)
    assert rows[("large", "k_context_0")].max_shape == (2, 63, 32)  # one query token, the rest context
    assert rows[("large", "encoder_hidden_states")].max_shape == (2, 85, 32)


def test_a_preset_too_big_for_the_host_is_refused_before_its_weights_are_made(tmp_path, monkeypatch):
    """`build --preset sd3.5-large` made ~40 GiB of random fp32 weights (and wrote them to disk)
    before the limits check, so a small host met an out-of-memory traceback, not the one line."""
    monkeypatch.setenv("HS_PRESET_DIR", str(tmp_path / "presets"))
    monkeypatch.setattr(limits, "available_memory", lambda: 2 * 2**30)
    result = CliRunner().invoke(main, ["build", "--preset", "sd3.5-large", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "this host lacks the memory the build needs" in result.output, result.output
    assert not (tmp_path / "presets").exists() and not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)
    here = CliRunner().invoke(main, ["build", "--preset", "sd3.5-large", "--out", "."])  # refused before any weight is made
    assert here.exit_code == 1 and "is the current folder or holds it" in here.output and not (tmp_path / "presets").exists(), here.output


def test_a_preset_and_its_build_on_one_disk_are_checked_together(tmp_path, monkeypatch):
    """The preset's ~40 GiB of random weights and the build's ~40 GiB land on one disk: a host with
    room for either alone was let through, made the weights, and was refused only then."""
    monkeypatch.setenv("HS_PRESET_DIR", str(tmp_path / "presets"))
    monkeypatch.setattr(limits, "available_memory", lambda: 10**15)
    monkeypatch.setattr(limits.shutil, "disk_usage", lambda _: type("U", (), {"free": 60 * 2**30})())  # more than either need alone
    result = CliRunner().invoke(main, ["build", "--preset", "sd3.5-large", "--backend", "tensorrt", "--precision", "bf16", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "not enough free disk for the build" in result.output and "with the preset's weights (~" in result.output, result.output
    assert not (tmp_path / "presets").exists() and not (tmp_path / "out").exists()


def test_a_preset_whose_weights_do_not_fit_is_refused_in_one_line(tmp_path, monkeypatch):
    from hs_export.presets import ensure_preset

    monkeypatch.setattr(limits, "available_memory", lambda: 1024)
    with pytest.raises(BuildError, match=r"preset 'tiny' needs ~.* of memory for its random fp32 weights \| got 0\.00 MiB available"):
        ensure_preset("tiny", tmp_path / "presets", log=lambda *_: None)
    assert not (tmp_path / "presets").exists()
    assert ensure_preset("tiny", tmp_path / "presets", log=lambda *_: None, check_room=False).small.is_dir()  # build --force tries anyway


def test_a_gpu_too_small_for_the_tensorrt_engine_check_is_refused_before_the_build(tmp_path, monkeypatch):
    """The engine check runs the fp32 model on the GPU (at least ~36 GiB at SD3.5-large 1024²
    bf16): a 24 GiB card is refused in one line, not out of memory after the export and the engine
    build; --force tries anyway, and an ONNX Runtime build asks nothing of the GPU."""
    needs = _needs(prompts=1)
    monkeypatch.setattr(limits, "available_memory", lambda: 10**15)
    monkeypatch.setattr(limits.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**15})())
    monkeypatch.setattr(limits, "free_gpu_memory", lambda: (24 * 2**30, "cuda:0 (NVIDIA L4)"))
    with pytest.raises(BuildError, match=r"^cuda:0 \(NVIDIA L4\) lacks the memory the build's engine check needs \| got 24.00 GiB free \| expected at least 36.46 GiB"):
        limits.check_gpu(needs, force=False)
    limits.check_gpu(needs, force=True)
    limits.check_limits(needs, "tensorrt", tmp_path / "out", force=False)  # host and disk only: an up-to-date folder needs no GPU
    limits.check_gpu(_needs(prompts=1, backend="onnxruntime", precision="fp32"), force=False)
    monkeypatch.setattr(limits, "free_gpu_memory", lambda: (80 * 2**30, "cuda:0 (NVIDIA H100)"))
    limits.check_gpu(needs, force=False)


def test_a_preset_build_keeps_the_pipeline_it_was_given(tiny_paths, tmp_path):
    """`build --preset P --pipeline DIR` runs the preset's transformers with DIR's text encoders
    and VAE, the host checked first as for any preset build."""
    import shutil

    from hs_export.build import BuildConfig
    from hs_export.build.builder import preset_models

    mine = tmp_path / "my-pipeline"
    shutil.copytree(tiny_paths.pipeline, mine)
    selection = preset_models("tiny", BuildConfig(out=tmp_path / "e"), str(mine), log=lambda *_: None)
    assert selection.pipeline == str(mine.resolve()) and selection.pipeline_given, selection
    assert preset_models("tiny", BuildConfig(out=tmp_path / "e"), log=lambda *_: None).pipeline == str(tiny_paths.pipeline)


def test_a_tensorrt_build_is_refused_a_small_gpu_before_its_export(tiny_paths, tmp_path, monkeypatch):
    """The GPU check comes once the build is known to run (after the up-to-date skip), before the
    export: nothing is written."""
    from hs_export.build import BuildConfig, build, resolve_models

    monkeypatch.setattr(limits, "free_gpu_memory", lambda: (2**20, "cuda:0 (a busy GPU)"))
    selection = resolve_models(None, str(tiny_paths.small), str(tiny_paths.large), str(tiny_paths.pipeline), log=lambda *_: None)
    with pytest.raises(BuildError, match=r"^cuda:0 \(a busy GPU\) lacks the memory the build's engine check needs"):
        build(selection, BuildConfig(out=tmp_path / "trt", backend="tensorrt", height=128, width=128), log=lambda *_: None)
    assert not (tmp_path / "trt").exists() and not list(tmp_path.glob(".trt.building-*"))
