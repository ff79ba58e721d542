"""A build killed mid-export loses nothing: the previous engine folder stays intact and usable, and
the next build removes the stale work folder (and says so). Real ``hs-export build`` subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hs_export.build import BuildConfig, build
from hs_export.build import resolve_models
from hs_export.build.verify import verify
from hs_runtime.manifest import Manifest

START_TIMEOUT_S = 240  # interpreter start, imports and model loading on a busy 2-core machine


def _start_build(out, preset_root):
    # Python's own SIGINT handler, even where this test runs with SIGINT ignored (a background job).
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from hs_export.cli import main; main()"
    cmd = [sys.executable, "-c", code, "build", "--preset", "tiny", "--out", str(out), "--force"]
    env = {**os.environ, "HS_PRESET_DIR": str(preset_root)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_export(process, work):
    """Polls until the build is exporting (its work folder holds ONNX output); bounded."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (work / "onnx").is_dir():
            return
        if process.poll() is not None:
            pytest.fail(f"build exited early with {process.returncode}: {process.stdout.read()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    process.wait(30)
    pytest.fail("build never reached the export phase")


@pytest.fixture
def previous(tiny_engine_dir, tmp_path):
    """A complete engine folder standing in for yesterday's build."""
    return shutil.copytree(tiny_engine_dir, tmp_path / "engines")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_build_killed_mid_export_keeps_the_previous_folder(sig, previous, preset_root):
    before = (previous / "manifest.json").read_bytes()
    process = _start_build(previous, preset_root)
    work = previous.parent / f".{previous.name}.building-{process.pid}"
    try:
        _wait_for_export(process, work)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert process.returncode != 0
    assert (previous / "manifest.json").read_bytes() == before
    Manifest.load(previous)  # sizes as recorded: nothing of the old folder was touched
    if sig == signal.SIGINT:
        assert not work.exists()  # KeyboardInterrupt cleans up on its way out
        assert "build interrupted: removed its work folder" in output and "Traceback" not in output
        return
    assert work.is_dir()  # SIGKILL leaves only the work folder behind
    assert all(c.ok for c in verify(previous, steps=4))
    messages = []
    report = build(resolve_models("tiny", None, None, None, log=lambda *_: None), BuildConfig(out=previous, force=True), log=messages.append)
    assert not report.skipped and not work.exists()
    assert f"removed stale work folder {work} from an interrupted build (pid {process.pid})" in messages
    Manifest.load(previous)
