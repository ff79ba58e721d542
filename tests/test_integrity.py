"""Damaged engine folders are named before any engine library reads them: sizes on load, hashes in
verify; what the sizes cannot catch, the load boundary turns into one line with the library's reason."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from hs_export.build import remove_stale_work
from hs_export.build.verify import failure_message, verify
from hs_runtime import HybridStitchRuntime
from hs_runtime.errors import EngineLoadError, ManifestError
from hs_runtime.manifest import Manifest, sha256_file

ENGINE = "engines/large.onnx"


@pytest.fixture
def copy(tiny_engine_dir, tmp_path):
    """A private copy of the tiny engine folder to damage."""
    return shutil.copytree(tiny_engine_dir, tmp_path / "engines-copy")


def _edit_manifest(folder, change):
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_manifest_records_every_file(tiny_engine_dir):
    manifest = Manifest.load(tiny_engine_dir)
    recorded = {a["path"]: a for a in manifest.artifacts}
    on_disk = {p.relative_to(tiny_engine_dir).as_posix() for p in tiny_engine_dir.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(recorded) == on_disk
    assert {ENGINE, ENGINE + ".data", "ort_session.json"} <= on_disk
    for path, record in recorded.items():
        assert record["bytes"] == (tiny_engine_dir / path).stat().st_size
        assert record["sha256"] == sha256_file(tiny_engine_dir / path)


def test_truncated_engine_is_named_before_onnxruntime_sees_it(copy):
    data = (copy / ENGINE).read_bytes()
    (copy / ENGINE).write_bytes(data[:1000])
    with pytest.raises(ManifestError) as info:
        HybridStitchRuntime.from_dir(copy)
    message = str(info.value)
    assert f"{ENGINE} has the wrong size | got 1000 bytes | expected {len(data)} bytes" in message
    assert "rebuild with: hs-export build --preset tiny" in message and message.endswith("--force")
    assert "\n" not in message


@pytest.mark.parametrize("change, message", [
    (lambda d: d["build"].update(precision="fp8"), "unknown build.precision | got 'fp8'"),
    (lambda d: d["build"].update(shape=None), "build.shape is not a build shape"),
    (lambda d: d["build"].update(height="128"), "build.height is not a positive integer | got '128'"),
    (lambda d: d.update(build=[]), "build is not an object | got list"),
    (lambda d: d["artifacts"][0].update(path="../../../etc/passwd"), "a recorded file lies outside the folder | got '../../../etc/passwd'"),
    (lambda d: d.update(schema_version="3"), "got schema '3' | expected schema 3"),
    (lambda d: d["artifacts"][0].update(bytes="big"), "a file record is not {path, bytes, sha256}"),  # not a "partial copy"
    (lambda d: d.update(artifacts={}), "artifacts is not a list | got dict"),
    # read by inspect / verify / loading, which used to stop with a KeyError, TypeError or ZeroDivisionError
    (lambda d: d["graphs"]["small"].pop("parity"), "graphs.small lacks its profiles, onnx or parity record"),
    (lambda d: d["models"]["large"].pop("dims"), "models.large lacks its source, sha256 or dims"),
    (lambda d: d.update(models="x"), "models.small lacks its source, sha256 or dims"),
    (lambda d: d["models"]["small"].update(dims={"width": 3}), "models.small.dims are not model dimensions"),
    (lambda d: d.pop("versions"), "versions is not an object"),
    (lambda d: d["build"]["shape"].update(latent_height=0), "build.shape has a size below 1"),
    # found by a review: each reached a KeyError, TypeError, ZeroDivisionError or ONNX Runtime's own error, or ran
    (lambda d: d["build"].pop("max_sequence_length"), "build.max_sequence_length is not an integer | got None"),
    (lambda d: d.update(io_dtype="fp16"), "io_dtype is not the build's precision | got 'fp16' for fp32 engines"),
    (lambda d: d["build"]["shape"].update(latent_height="16"), "build.shape.latent_height is not an int | got '16'"),
    (lambda d: d["build"]["shape"].update(prompts=1.5), "build.shape.prompts is not an int | got 1.5"),
    (lambda d: d["build"]["shape"].update(mask_ratio="x"), "build.shape.mask_ratio is not a float | got 'x'"),
    (lambda d: d["build"]["shape"].update(mask_ratio=0), "a mask ratio outside (0, 1]"),
    (lambda d: d["graphs"]["large"].update(profiles=[]), "graphs.large.profiles are not [min, opt, max] shapes of every input"),
    (lambda d: d["graphs"]["large"].update(profiles=[1]), "graphs.large.profiles are not [min, opt, max] shapes of every input"),
    (lambda d: d["graphs"]["small"]["profiles"][0].pop("patches"), "graphs.small.profiles are not [min, opt, max] shapes of every input"),
    (lambda d: d["models"]["small"]["dims"].update(hidden="32"), "models.small.dims.hidden is not a positive integer | got '32'"),
    (lambda d: d["models"]["large"]["dims"].update(patch_size=0), "models.large.dims.patch_size is not a positive integer | got 0"),
])
def test_a_hand_edited_manifest_names_its_fault(copy, change, message):
    """Fields every command reads, of the wrong type or value, and paths outside the folder: one
    line at load, not a KeyError or TypeError in whichever command reads them first."""
    _edit_manifest(copy, change)
    with pytest.raises(ManifestError, match=re.escape(message)):
        Manifest.load(copy)


def test_an_engine_of_other_dims_is_named_when_its_session_opens(copy):
    """An ONNX file whose tensors are not the ones its dims make (another model's graph) is named
    when ONNX Runtime opens it, as TensorRT's loader does, not by ONNX Runtime's 'required inputs
    are missing' at the first call. (A manifest edited alone is caught earlier, by its profiles.)"""
    from hs_runtime.backends.onnxruntime_backend import OrtEngine

    manifest = Manifest.load(copy)
    with pytest.raises(EngineLoadError, match=re.escape(f"{copy / 'engines' / 'small.onnx'} is not a large engine of this contract | got tensors differ: ")):
        OrtEngine(copy / "engines" / "small.onnx", "large", manifest.dims("large"), torch.device("cpu"))
    _edit_manifest(copy, lambda d: d["models"]["large"]["dims"].update(kv_entries=d["models"]["large"]["dims"]["kv_entries"] + 1))
    with pytest.raises(ManifestError, match=re.escape("graphs.large.profiles are not [min, opt, max] shapes of every input")):
        HybridStitchRuntime.from_dir(copy)


def test_recorded_size_that_disagrees(copy):
    _edit_manifest(copy, lambda d: next(a for a in d["artifacts"] if a["path"] == "ort_session.json").update(bytes=1))
    with pytest.raises(ManifestError, match=r"ort_session.json has the wrong size .* expected 1 bytes"):
        Manifest.load(copy)


def test_missing_recorded_file(copy):
    (copy / "engines" / "small.onnx.data").unlink()
    with pytest.raises(ManifestError, match=r"engines/small.onnx.data is missing"):
        Manifest.load(copy)


def test_recorded_hash_that_disagrees_fails_verify_before_engines_run(copy):
    _edit_manifest(copy, lambda d: next(a for a in d["artifacts"] if a["path"] == ENGINE).update(sha256="0" * 64))
    Manifest.load(copy)  # sizes agree: loading is cheap and says nothing
    checks = verify(copy, steps=4)
    assert [c.name for c in checks if not c.ok] == [ENGINE]
    assert not any("vs torch" in c.name for c in checks)  # the engines never ran
    message = failure_message(checks)
    assert message.startswith(f"verification failed | got {ENGINE} (sha256 differs)") and "--force" in message


def test_engine_library_errors_become_one_line_with_the_reason(copy):
    """A folder built before records existed (or a same-size corruption) reaches ONNX Runtime."""
    _edit_manifest(copy, lambda d: d.pop("artifacts"))
    (copy / ENGINE).write_bytes(b"\0" * 100)
    with pytest.raises(EngineLoadError) as info:
        HybridStitchRuntime.from_dir(copy)
    message = str(info.value)
    assert message.startswith(f"ONNX Runtime cannot load large engine {copy / ENGINE}")
    assert "INVALID_PROTOBUF" in message and "rebuild with: hs-export build" in message and "\n" not in message


def test_old_folder_without_records_still_loads_and_verify_says_so(copy):
    _edit_manifest(copy, lambda d: d.pop("artifacts"))
    assert Manifest.load(copy).artifacts == []
    checks = verify(copy, steps=4)
    assert all(c.ok for c in checks) and "no records" in checks[0].name


def test_stale_work_folders_are_removed_and_a_set_aside_folder_restored(tmp_path):
    dead = _dead_pid()
    out = tmp_path / "engines"
    (tmp_path / f".engines.building-{dead}").mkdir()
    (tmp_path / f".engines.building-{os.getpid()}").mkdir()  # this process: a live build
    (tmp_path / f".engines.old-{dead}").mkdir()  # swap cut between its two renames
    (tmp_path / f".engines.old-{dead}" / "manifest.json").write_text("{}")
    messages = []
    remove_stale_work(out, messages.append)
    assert not (tmp_path / f".engines.building-{dead}").exists()
    assert (tmp_path / f".engines.building-{os.getpid()}").exists()
    assert (out / "manifest.json").is_file()
    assert f"removed stale work folder {tmp_path / f'.engines.building-{dead}'} from an interrupted build (pid {dead})" in messages
    assert any(m.startswith(f"restored {out}") for m in messages)


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_tensorrt_logger_keeps_the_library_reason(capsys):
    """TensorRT's deserialize returns None and logs why; the recording logger keeps that line."""
    import types

    from hs_runtime.backends.tensorrt_backend import recording_logger

    class ILogger:  # the shape of tensorrt.ILogger: severities as attributes, log() overridden
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    logger = recording_logger(types.SimpleNamespace(ILogger=ILogger))
    logger.log(ILogger.INFO, "loaded")
    logger.log(ILogger.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag mismatch)")
    assert logger.errors == ["IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag mismatch)"]
    assert "loaded" not in capsys.readouterr().err


@pytest.mark.tensorrt
def test_tensorrt_plan_of_right_size_but_wrong_bytes(tiny_paths, tmp_path):
    from hs_export.build import BuildConfig, build
    from hs_export.build import resolve_models

    out = tmp_path / "trt"
    build(resolve_models("tiny", None, None, None, log=lambda *_: None), BuildConfig(out=out, backend="tensorrt"), log=lambda *_: None)
    plan = out / "engines" / "large.plan"
    plan.write_bytes(b"\0" * plan.stat().st_size)
    with pytest.raises(EngineLoadError, match=r"TensorRT .* cannot load large engine .*rebuild with: hs-export build"):
        HybridStitchRuntime.from_dir(out, device="cuda")


def test_the_rebuild_hint_names_this_folder_even_for_an_unquoted_older_command(copy):
    """Commands recorded before 2026-12-07 held --out unquoted: a path with a space spans words."""
    _edit_manifest(copy, lambda d: d["build"].update(command="hs-export build --preset tiny --out /old/my engines/tiny --backend onnxruntime"))
    assert Manifest.load(copy).rebuild_command == f"hs-export build --preset tiny --out {copy.resolve()} --backend onnxruntime"
