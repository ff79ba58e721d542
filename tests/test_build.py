import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hs_export.build import BuildConfig, build
from hs_export.build.builder import plan_build
from hs_export.cli import main
from hs_export.build.export import dummy_inputs
from hs_export.build import resolve_models
from hs_runtime.backends.onnxruntime_backend import OrtEngine
from hs_runtime.contract import GRAPH_NAMES, call_sizes, graph_spec
from hs_runtime.errors import BuildError, ConfigError, ManifestError
from hs_runtime.graphs import build_graphs
from hs_runtime.manifest import Manifest

QUIET = dict(log=lambda *_: None)


def test_manifest_records_the_build(tiny_engine_dir):
    manifest = Manifest.load(tiny_engine_dir)
    data = manifest.data
    assert data["schema_version"] == 3 and data["complete"]
    assert set(data["graphs"]) == set(GRAPH_NAMES)
    assert {"torch", "onnx", "onnxruntime"} <= set(data["versions"])
    for role in ("small", "large"):
        assert len(data["models"][role]["sha256"]) == 64 and data["models"][role]["config"]["num_layers"] == 2
    large = data["graphs"]["large"]
    assert large["dynamic_axes"]["patches"] == {"0": "batch", "1": "tokens"}
    assert large["dynamic_axes"]["k_context_0"] == {"0": "batch", "1": "context_tokens"}
    assert large["dynamic_axes"]["text_v_context_1"] == {"0": "batch", "1": "text_context"}
    for graph in data["graphs"].values():
        assert graph["parity"]["rel"] <= 1e-4 and graph["parity"]["cases"] == 4
        assert len(graph["profiles"]) == 2  # dense + one subset profile
    assert data["default_plan"]["name"] == "hybrid"


def test_onnx_parity_with_dynamic_token_counts_in_one_session(tiny_engine_dir, tiny_models):
    manifest = Manifest.load(tiny_engine_dir)
    graphs = build_graphs(*tiny_models)
    for name in GRAPH_NAMES:
        dims = manifest.dims(name)
        engine = OrtEngine(manifest.engine_path(name), name, dims, torch.device("cpu"))
        spec = graph_spec(name, dims)
        # several N (and M = 64 − N) through one session, text recomputed or reused, other batches
        for n, reuse, batch in ((1, True, 2), (7, False, 2), (33, True, 4), (64, False, 2)):
            feeds = dummy_inputs(spec, call_sizes(batch, n, 64 - n, 85, reuse), seed=n)
            with torch.no_grad():
                ref = graphs[name](*feeds.values())
            got = engine(feeds)
            assert got["velocity_tokens"].shape == (batch, n, 64)
            for out_name, expected in zip(spec.output_names, ref):
                assert got[out_name].shape == expected.shape
                if expected.numel():  # text K/V outputs are empty when the text is reused
                    assert (got[out_name] - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_folder_holds_the_weights_once(tiny_engine_dir):
    manifest = Manifest.load(tiny_engine_dir)
    files = {a["path"] for a in manifest.artifacts}
    assert files == {"engines/small.onnx", "engines/small.onnx.data", "engines/large.onnx", "engines/large.onnx.data", "ort_session.json"}


def test_cli_inspect_and_verify(tiny_engine_dir):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tiny_engine_dir)])
    assert result.exit_code == 0, result.output
    for name in GRAPH_NAMES:
        assert name in result.output
    assert "onnxruntime session: thread pool global" in " ".join(result.output.split())
    assert "run needs (default hybrid at mask ratio 0.02, build size)" in " ".join(result.output.split())
    assert "prompt → image also loads the text encoders + VAE: 0.1 M parameters, 0.28 MiB in fp32, 0.14 MiB in bf16" in " ".join(result.output.split())
    result = runner.invoke(main, ["verify", str(tiny_engine_dir), "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert "end-to-end hybrid" in result.output and "FAIL" not in result.output


def test_second_build_skips_and_force_rebuilds(tiny_engine_dir):
    selection = resolve_models("tiny", None, None, None, **QUIET)
    messages = []
    report = build(selection, BuildConfig(out=tiny_engine_dir), log=messages.append)
    assert report.skipped and any("up to date" in m for m in messages)
    relative = Path(os.path.relpath(tiny_engine_dir))  # the same folder, spelled otherwise
    assert build(selection, BuildConfig(out=relative), **QUIET).skipped
    assert f"--out {tiny_engine_dir.resolve()} " in Manifest.load(tiny_engine_dir).rebuild_command  # works from any directory
    assert not (tiny_engine_dir / "onnx").exists()  # ONNX Runtime engines are the ONNX files: no empty folder left
    before = (tiny_engine_dir / "manifest.json").stat().st_mtime_ns
    report = build(selection, BuildConfig(out=tiny_engine_dir, force=True), **QUIET)
    assert not report.skipped and (tiny_engine_dir / "manifest.json").stat().st_mtime_ns != before
    Manifest.load(tiny_engine_dir)


def test_sizes_that_leave_nothing_to_build_are_refused(tmp_path):
    selection = resolve_models("tiny", None, None, None, **QUIET)
    with pytest.raises(ConfigError, match=re.escape("--text-tokens must exceed the CLIP tokens | got 77 | expected > 77")):
        plan_build(selection, BuildConfig(out=tmp_path / "e", text_tokens=77))  # no T5 token: max_sequence_length 0
    with pytest.raises(ConfigError, match=re.escape("--token-buckets exceeds the image tokens | got 65 | expected <= 64 at 128×128 px")):
        plan_build(selection, BuildConfig(out=tmp_path / "e", token_buckets=65))


def test_folder_built_for_something_else_is_left_alone(tiny_engine_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_engine_dir, other)
    selection = resolve_models("tiny", None, None, None, **QUIET)
    with pytest.raises(BuildError, match="built for something else"):
        build(selection, BuildConfig(out=other, mask_ratio=0.5), **QUIET)
    assert json.loads((other / "manifest.json").read_text()) == json.loads((tiny_engine_dir / "manifest.json").read_text())


def test_foreign_and_unwritable_out_folders(tiny_paths, tmp_path):
    runner = CliRunner()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    result = runner.invoke(main, ["build", "--preset", "tiny", "--out", str(foreign)])
    assert result.exit_code == 1 and "refusing to overwrite" in result.output
    assert (foreign / "holiday.jpg").read_bytes() == b"x"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(main, ["build", "--preset", "tiny", "--out", str(blocker / "engines")])
    assert result.exit_code == 1 and "writable --out" in result.output and "Traceback" not in result.output


def test_missing_model_path(tmp_path):
    result = CliRunner().invoke(main, ["build", "--small", str(tmp_path / "no"), "--large", str(tmp_path / "no"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 1 and "model path does not exist" in result.output


def test_tensorrt_missing_keeps_onnx(tiny_paths, tmp_path):
    pytest.importorskip("polygraphy")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "trt"
    result = CliRunner().invoke(main, ["build", "--preset", "tiny", "--backend", "tensorrt", "--out", str(out)])
    assert result.exit_code == 1
    assert "TensorRT is not installed" in result.output and "ONNX files were kept" in result.output
    assert all((out / "onnx" / f"{g}.onnx").is_file() and (out / "onnx" / f"{g}.onnx.data").is_file() for g in GRAPH_NAMES)
    with pytest.raises(ManifestError, match="did not finish"):
        Manifest.load(out)


def test_a_failed_tensorrt_rebuild_leaves_a_complete_folder_as_it_was(tiny_engine_dir, tmp_path):
    """`--backend tensorrt --force` over a working folder, on a host where the engine phase fails:
    the working folder stays (before, the ONNX-only work folder replaced it)."""
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "working"
    shutil.copytree(tiny_engine_dir, out)
    result = CliRunner().invoke(main, ["build", "--preset", "tiny", "--backend", "tensorrt", "--out", str(out), "--force"])
    assert result.exit_code == 1 and "TensorRT is not installed" in result.output and "were kept" not in result.output
    assert Manifest.load(out).build["backend"] == "onnxruntime"
    assert not list(tmp_path.glob(".working.*"))  # no work folder left beside it


def test_fp16_onnxruntime_build_verifies(tiny_paths, tmp_path):
    from hs_export.build.verify import verify

    selection = resolve_models("tiny", None, None, None, **QUIET)
    build(selection, BuildConfig(out=tmp_path / "fp16", precision="fp16"), **QUIET)
    manifest = Manifest.load(tmp_path / "fp16")
    assert manifest.data["io_dtype"] == "fp16" and manifest.build["precision"] == "fp16"
    checks = verify(tmp_path / "fp16", steps=6)
    assert all(c.ok for c in checks), checks
    assert 0 < checks[-1].rel  # really reduced precision, not the fp32 graph again


def test_bf16_needs_tensorrt(tmp_path):
    result = CliRunner().invoke(main, ["build", "--preset", "tiny", "--precision", "bf16", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "bf16 engines need TensorRT" in result.output


def test_verify_fails_when_engines_and_models_disagree(tiny_engine_dir, tmp_path):
    from hs_runtime.presets import PRESETS, random_transformer

    other = tmp_path / "other-weights"
    random_transformer(PRESETS["tiny"].large, seed=99).save_pretrained(other)
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_engine_dir, tampered)
    data = json.loads((tampered / "manifest.json").read_text())
    data["models"]["large"]["source"] = str(other)  # the torch reference is now another model
    (tampered / "manifest.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["verify", str(tampered), "--steps", "4"])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "verification failed" in result.output


def test_ort_thread_pool_choice_is_saved_and_checked(tmp_path):
    """The build writes its thread-pool choice into ort_session.json and its rebuild command;
    a name ONNX Runtime's backend does not know is one line before anything is exported."""
    from hs_export.build.builder import rebuild_command
    from hs_export.build.ort import save_settings

    assert json.loads(save_settings(tmp_path, "session").read_text())["thread_pool"] == "session"
    assert json.loads(save_settings(tmp_path).read_text())["thread_pool"] == "global"
    selection = resolve_models("tiny", None, None, None, log=lambda *_: None)
    assert "--ort-thread-pool session" in rebuild_command(selection, BuildConfig(out=tmp_path, ort_thread_pool="session"), 64, 64, 20)
    assert "--ort-thread-pool" not in rebuild_command(selection, BuildConfig(out=tmp_path), 64, 64, 20)
    with pytest.raises(ConfigError, match=r"unknown ONNX Runtime thread pool \| got 'shared' \| expected global \| session"):
        BuildConfig(out=tmp_path / "e", ort_thread_pool="shared").validate()


def test_sources_and_rebuild_command_name_the_same_files_from_anywhere(tiny_paths, tmp_path, monkeypatch):
    """Relative --small/--large/--pipeline are recorded absolute (verify from another folder loads
    the same weights); the rebuild command repeats --pipeline and names the folder it is read from
    (a copy's hint must not --force-rebuild the original); a missing --pipeline is refused at
    build time; the ONNX Runtime fingerprint ignores TensorRT's optimisation level."""
    work = tmp_path / "work"
    work.mkdir()
    for name, src in (("small", tiny_paths.small), ("large", tiny_paths.large)):
        shutil.copytree(src, work / name)
    monkeypatch.chdir(work)
    args = ["build", "--small", "small", "--large", "large", "--pipeline", "large", "--out", "out", "--height", "128", "--width", "128", "--text-tokens", "85"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(work / "out")
    assert manifest.data["models"]["small"]["source"] == str(work / "small") and manifest.data["pipeline"] == str(work / "large")
    assert f"--pipeline {work / 'large'}" in manifest.rebuild_command
    again = CliRunner().invoke(main, args + ["--builder-optimization-level", "0"])
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    shutil.copytree(work / "out", tmp_path / "copy")
    assert f"--out {tmp_path / 'copy'} " in Manifest.load(tmp_path / "copy").rebuild_command
    missing = CliRunner().invoke(main, args[:5] + ["--pipeline", str(tmp_path / "nope")] + args[7:] + ["--force"])
    assert missing.exit_code == 1 and "is not an SD3 pipeline folder | got no such folder" in missing.output, missing.output
    here = CliRunner().invoke(main, ["build", "--preset", "tiny", "--out", "."])
    assert here.exit_code == 1 and "is the current folder or holds it" in here.output, here.output


def test_fused_onnxruntime_engines_are_valid_onnx(tiny_engine_dir):
    """The fusions append their nodes at the end of the graph: sorted again, the engine files pass
    onnx.checker (other ONNX tools refuse unsorted graphs; ONNX Runtime sorts them itself)."""
    import onnx

    for graph in GRAPH_NAMES:
        path = tiny_engine_dir / "engines" / f"{graph}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        assert any(n.op_type == "FastGelu" for n in model.graph.node)
        onnx.checker.check_model(str(path))


def test_the_engine_check_compares_with_references_made_before_the_engine_loads(tiny_engine_dir, tiny_models):
    """The build and verify run the PyTorch model for every call first (outputs kept on the host),
    free it, then run the engine on the same inputs made again from the seeds: the figures are those
    of model and engine on one input, and a disagreement shows."""
    from hs_export.build.export import compare_outputs, compare_with_references, dummy_inputs, parity_base_sizes, parity_sizes, reference_outputs

    manifest = Manifest.load(tiny_engine_dir)
    graphs = build_graphs(*tiny_models)
    sizes = parity_base_sizes(manifest.shape, "tensorrt")  # the built size, as a TensorRT check runs
    for name in GRAPH_NAMES:
        engine = OrtEngine(manifest.engine_path(name), name, manifest.dims(name), torch.device("cpu"))
        module = graphs[name].eval()
        references = reference_outputs(module, sizes)
        assert all(t.device.type == "cpu" for ref in references for t in ref.values())
        parity = compare_with_references(engine, module.spec, references, sizes, torch.device("cpu"))
        direct = []
        for i, case in enumerate(parity_sizes(module.spec.dims, sizes)):  # model and engine on one input, side by side
            feeds = dummy_inputs(module.spec, case, seed=1 + i)
            with torch.inference_mode():
                ref = dict(zip(module.spec.output_names, module(*[feeds[n] for n in module.spec.input_names])))
            direct.append(compare_outputs(ref, engine(feeds)))
        assert (parity.max_abs, parity.rel) == tuple(map(max, zip(*direct))) and parity.cases == 4 and parity.rel < 1e-4
        spoiled = [{k: v + 1 for k, v in ref.items()} for ref in references]
        assert compare_with_references(engine, module.spec, spoiled, sizes, torch.device("cpu")).max_abs > 0.5


def test_verify_refuses_a_device_its_engines_cannot_run_on_before_the_reference_runs(tiny_engine_dir, tmp_path, monkeypatch):
    """verify runs the torch reference first (both fp32 models, every check): a TensorRT folder on
    the CPU is refused before that work, not after it."""
    from hs_export.build import verify as verify_module
    from hs_runtime.errors import ManifestError

    folder = shutil.copytree(tiny_engine_dir, tmp_path / "trt")
    data = json.loads((folder / "manifest.json").read_text())
    data["build"]["backend"] = "tensorrt"
    (folder / "manifest.json").write_text(json.dumps(data))
    loaded = []
    monkeypatch.setattr(verify_module, "engines_from_manifest", lambda manifest, backend, device, *a: loaded.append(backend))
    with pytest.raises(ManifestError, match="TensorRT engines run on CUDA devices"):
        verify_module.verify(folder, device="cpu", steps=2)
    assert loaded == []
