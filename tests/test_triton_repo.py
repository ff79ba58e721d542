"""``hs-export triton-repo``: the model repository it writes, then that repository run by the test
on the wheel's ``tritonserver --model-repository REPO`` directly (not through ``serve``): the image
``generate`` makes, the custom per-stage metrics, a flood past ``--max-queue`` refused at once,
requests cancelled while queued and while running, and a clean SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from hs_export.cli import main
from hs_export.serve.protocol import GENERATE, LATENTS, ServingError
from hs_export.serve.repository import served_models
from hs_runtime.plans import MaskConfig

from test_serve import MAX_PIXEL_DIFF, PROMPTS, STEPS, free_ports, generate_cli_image, metric, scrape, scrape_until, start_process, tiny4_engine_dir  # noqa: F401  (a fixture)

MAX_QUEUE = 4


def _write(*args: str):
    return CliRunner().invoke(main, ["triton-repo", *args])


def test_triton_repo_writes_both_models(tiny4_engine_dir, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    done = _write(str(tiny4_engine_dir), "--out", str(repo), "--instances", "2", "--max-queue", "8", "--max-queue-delay-ms", "20")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in repo.iterdir()) == [GENERATE.name, LATENTS.name]
    config = (repo / GENERATE.name / "config.pbtxt").read_text()
    for line in (
        'name: "hybridstitch"', 'backend: "python"', "max_batch_size: 4", "instance_group [ { count: 2 kind: KIND_CPU } ]",
        "max_queue_delay_microseconds: 20000", "default_queue_policy { max_queue_size: 8 }",
        '{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }', '{ name: "plan" data_type: TYPE_STRING dims: [ 1 ] optional: true }',
        '{ name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }',
        f'parameters {{ key: "engine_dir" value: {{ string_value: "{tiny4_engine_dir.resolve()}" }} }}',
    ):
        assert line in config, line
    assert "error" not in config.replace("# Written", "")  # no in-band error output any more
    assert '{ name: "latents" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }' in (repo / LATENTS.name / "config.pbtxt").read_text()
    assert "from hs_export.serve.triton_model import TritonPythonModel" in (repo / GENERATE.name / "1" / "model.py").read_text()
    assert "the serving host needs: 2 instance(s) × (hybridstitch " in done.output  # to size --instances on the host that serves it

    # Rewriting is fine; a GPU repository is written on a CPU host; batching off has no batcher.
    done = _write(str(tiny4_engine_dir), "--out", str(repo), "--device", "cuda:1", "--no-dynamic-batching", "--copy-engines")
    assert done.exit_code == 0, done.output
    config = (repo / GENERATE.name / "config.pbtxt").read_text()
    assert "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 1 ] } ]" in config and "dynamic_batching" not in config
    assert 'string_value: "hybridstitch/1/engines"' in config and (repo / GENERATE.name / "1" / "engines" / "manifest.json").is_file()
    assert 'string_value: "hybridstitch/1/engines"' in (repo / LATENTS.name / "config.pbtxt").read_text()
    copied = repo / GENERATE.name / "1" / "engines"  # rewriting from the copy would remove it before reading it
    done = _write(str(copied), "--out", str(repo))
    assert done.exit_code == 1 and f"the engine folder {copied} lies inside --out {repo / GENERATE.name}, which rewriting" in done.output, done.output
    assert (copied / "manifest.json").is_file()
    done = _write(str(copied), "--out", str(copied / "repo"), "--copy-engines")  # the copy would copy itself, without end
    assert done.exit_code == 1 and f"--out {copied / 'repo'} lies inside the engine folder {copied} that --copy-engines copies" in done.output, done.output
    assert not (copied / "repo").exists()

    # a relative --pipeline is written absolute, like the engine folder (Triton does not run where this command ran)
    pipeline = Path(json.loads((tiny4_engine_dir / "manifest.json").read_text())["pipeline"]).resolve()
    monkeypatch.chdir(pipeline.parent)
    done = _write(str(tiny4_engine_dir.resolve()), "--out", str(repo), "--pipeline", pipeline.name)
    assert done.exit_code == 0, done.output
    assert f'parameters {{ key: "pipeline" value: {{ string_value: "{pipeline}" }} }}' in (repo / GENERATE.name / "config.pbtxt").read_text()
    elsewhere = tmp_path / "in-the-container"  # an absolute path may exist only where the server runs: written, and said so
    done = _write(str(tiny4_engine_dir.resolve()), "--out", str(repo), "--pipeline", str(elsewhere))
    assert done.exit_code == 0 and f"--pipeline {elsewhere} is not on this host: it must exist where the server runs" in done.output, done.output
    assert f'string_value: "{elsewhere}"' in (repo / GENERATE.name / "config.pbtxt").read_text()

    # the text encoders' precision travels as a parameter the model reads (as Triton hands it over, in JSON)
    done = _write(str(tiny4_engine_dir), "--out", str(repo), "--text-dtype", "bf16")
    assert done.exit_code == 0 and "(text encoders + VAE " in done.output and " in bf16)" in done.output, done.output
    assert 'parameters { key: "text_dtype" value: { string_value: "bf16" } }' in (repo / GENERATE.name / "config.pbtxt").read_text()
    from hs_export.serve.triton_model import model_parameters

    params = model_parameters({"name": GENERATE.name, "parameters": {"engine_dir": {"string_value": "e"}, "text_dtype": {"string_value": "bf16"}}}, repo)
    assert params["text_dtype"] == "bf16" and params["engine_dir"] == repo / "e" and params["backend"] is None


def test_serving_one_model_only(tiny4_engine_dir, tmp_path):
    """--models writes (and counts the memory of) the models asked for; prompt → image is refused
    without text encoders, with the way out."""
    from types import SimpleNamespace

    from hs_export.serve.repository import served_models
    from hs_runtime.errors import ConfigError

    repo = tmp_path / "repo"
    done = _write(str(tiny4_engine_dir), "--out", str(repo), "--models", GENERATE.name, "--instances", "2")
    assert done.exit_code == 0, done.output
    assert [p.name for p in repo.iterdir()] == [GENERATE.name] and "2 instance(s) × (hybridstitch " in done.output and LATENTS.name not in done.output
    done = _write(str(tiny4_engine_dir), "--out", str(repo), "--models", f" {LATENTS.name} ")  # rewritten: the other model's folder goes
    assert done.exit_code == 0 and [p.name for p in repo.iterdir()] == [LATENTS.name], done.output
    no_text = SimpleNamespace(data={}, folder="engines/x")
    assert served_models(no_text, None) == (LATENTS,)
    with pytest.raises(ConfigError, match=f"{GENERATE.name} needs the text encoders and VAE .* pass --pipeline DIR, or --models {LATENTS.name}"):
        served_models(no_text, None, (GENERATE.name,))


def test_triton_repo_refuses_in_one_line(tiny4_engine_dir, tmp_path, monkeypatch, unwritable_folders):
    foreign, readonly = unwritable_folders
    r = str(tmp_path / "r")
    monkeypatch.chdir(tmp_path)
    cases = [
        ((str(tiny4_engine_dir), "--out", str(foreign)), f"--out {foreign} holds other files | got ['notes.txt']"),
        ((str(tiny4_engine_dir), "--out", str(readonly)), f"--out {readonly} cannot be written | got no write permission on {readonly}"),
        ((str(tiny4_engine_dir), "--out", str(readonly / "repo")), f"--out {readonly / 'repo'} cannot be written | got no write permission on {readonly}"),
        ((str(tiny4_engine_dir), "--out", r, "--max-queue", "2"), "--max-queue is below the batch size | got 2 < 4"),
        ((str(tiny4_engine_dir), "--out", r, "--device", "tpu"), "unknown device | got 'tpu'"),
        ((str(tiny4_engine_dir), "--out", r, "--device", "cpu:3"), "unknown device | got 'cpu:3' | expected cpu or cuda:N | Triton's CPU instances take no device index: pass --device cpu"),
        ((str(tiny4_engine_dir), "--out", r, "--backend", "tensorrt"), f"engine folder {tiny4_engine_dir} holds onnxruntime engines | got --backend tensorrt | expected onnxruntime or torch"),
        ((str(tiny4_engine_dir), "--out", r, "--pipeline", "nowhere"), "--pipeline nowhere is not an SD3 pipeline folder | got no such folder"),  # relative: a folder here
        ((str(tiny4_engine_dir), "--out", r, "--pipeline", str(foreign)), f"--pipeline {foreign} is not an SD3 pipeline folder | got no model_index.json in it"),
        ((str(tmp_path / "nowhere"), "--out", r), "engine folder not found"),
        ((str(tiny4_engine_dir), "--out", r, "--models", "hybridstitch,latents"), "--models: not a model this repository serves | got latents | expected hybridstitch | hybridstitch_latents"),
        ((str(tiny4_engine_dir), "--out", r, "--models", "foo"), "--models: not a model this repository serves | got foo | expected hybridstitch | hybridstitch_latents"),
        ((str(tiny4_engine_dir), "--out", r, "--models", "hybridstitch,hybridstitch"), "--models names each served model once | got hybridstitch,hybridstitch"),
        ((str(tiny4_engine_dir), "--out", r, "--models", ","), "--models names each served model once | got nothing"),
    ]
    for args, message in cases:
        done = _write(*args)
        assert done.exit_code == 1 and message in done.output and len(done.output.strip().splitlines()) == 1, done.output
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "r").exists() and list(readonly.iterdir()) == []


def test_without_text_encoders_only_the_latents_model_is_written():
    assert served_models(SimpleNamespace(data={"pipeline": None}), None) == (LATENTS,)
    assert served_models(SimpleNamespace(data={"pipeline": None}), "/pipelines/sd35") == (GENERATE, LATENTS)


def test_a_model_that_fails_to_load_is_named_in_one_line():
    """What ``serve`` reports when Triton exits during start-up: the model and its own reason."""
    import io

    from hs_export.serve.server import _Output

    log = (
        b'E1204 14:08:47.194308 22765 model_lifecycle.cc:642] "failed to load \'hybridstitch\' version 1: Internal: ModelLoadError: no SD3 pipeline at /nope'
        b' | pass --pipeline DIR\\n\\nAt:\\n  /x/hs_runtime/pipeline.py(33): from_pretrained\\n"\n'
        b"error: creating server: Internal - failed to load all models\n"
    )
    output = _Output(io.BytesIO(log), io.StringIO())
    output.thread.join(timeout=5)
    assert output.reason() == "model hybridstitch failed to load: ModelLoadError: no SD3 pipeline at /nope | pass --pipeline DIR"
    output = _Output(io.BytesIO(b"I... loading\nerror: creating server: Internal - failed to load all models\nbye\n"), io.StringIO())
    output.thread.join(timeout=5)
    assert output.reason() == "error: creating server: Internal - failed to load all models"


def test_tritons_log_is_read_to_its_end_when_our_stdout_breaks():
    """``serve | head`` closes our stdout: the copy stops, the reading goes on (a pipe nobody reads
    fills and blocks every Triton thread that logs)."""
    import io

    from hs_export.serve.server import _Output

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    output = _Output(io.BytesIO(b"".join(b"line %d\n" % i for i in range(1000))), Closed())
    output.thread.join(timeout=5)
    assert not output.thread.is_alive() and output.lines[-1] == "line 999"


def test_a_triton_that_outlives_the_drain_is_killed(monkeypatch):
    """Killed after --exit-timeout-secs and the margin, and reported as killed (``serve`` then
    says so instead of letting its last log line stand in as the reason)."""
    import os
    import subprocess
    import threading

    from hs_export.serve import server

    monkeypatch.setattr(server, "EXIT_MARGIN_S", 0.5)
    stubborn = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: os.setpgid(0, 0))
    stopping = threading.Event()
    stopping.set()
    assert server._wait_exit(SimpleNamespace(exit_timeout_s=0), stubborn, stopping) is True
    assert stubborn.returncode == -signal.SIGKILL
    quick = subprocess.Popen(["true"], preexec_fn=lambda: os.setpgid(0, 0))
    assert server._wait_exit(SimpleNamespace(exit_timeout_s=0), quick, stopping) is False


# ----------------------------------------------------------------------------- the repository on tritonserver itself


@pytest.fixture(scope="module")
def direct(tiny4_engine_dir, preset_root, tmp_path_factory):
    """``triton-repo`` output (one instance, a queue of 4) run on ``tritonserver`` by this test."""
    from hs_export.serve.server import TritonDist

    pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (pip install '.[serve]')")
    work = tmp_path_factory.mktemp("direct")
    done = _write(str(tiny4_engine_dir), "--out", str(work / "repo"), "--max-queue", str(MAX_QUEUE), "--max-queue-delay-ms", "20")
    assert done.exit_code == 0, done.output
    dist = TritonDist.find()
    ports = free_ports(3)
    cmd = dist.command(work / "repo", dist.backend_directory(work), "127.0.0.1", *ports, exit_timeout_s=30)
    assert cmd[:2] == [str(dist.binary), f"--model-repository={work / 'repo'}"]
    server = start_process(cmd, ports, work / "tritonserver.log", {**dist.environment(), "HS_PRESET_DIR": str(preset_root)})
    yield server
    left = server.stop()
    assert not left, f"processes left behind: {left}"


def _slow(url: str, seed: int = 0, steps: int = 600):
    """One request that holds the only instance (600 large steps on tiny engines: ~1.5 s on a
    quiet machine, ~2.5 s on a busy one)."""
    from hs_export.serve.client import HybridStitchClient

    with HybridStitchClient(url, timeout_s=120) as remote:
        remote.generate(PROMPTS[0], seed=seed, steps=steps, plan="large")
    return time.monotonic()


def test_repository_serves_the_image_generate_makes(direct, tiny4_engine_dir, tmp_path):
    from hs_export.serve.client import HybridStitchClient

    with HybridStitchClient(direct.url, timeout_s=120) as remote:
        got = remote.generate(PROMPTS[1], seed=11, steps=STEPS)
        with pytest.raises(ServingError, match=r"^unknown plan \| got 'fastest'") as refused:
            remote.infer(GENERATE, {"prompt": "a red cat", "seed": 1, "plan": "fastest"})
    assert refused.value.status == "400"
    want = generate_cli_image(tiny4_engine_dir, PROMPTS[1], 11, tmp_path / "generate.png")
    assert np.abs(got.image.astype(np.int16) - want).max() <= MAX_PIXEL_DIFF


def test_custom_metrics_grow_with_served_requests(direct):
    from hs_export.serve.client import HybridStitchClient

    before = scrape(direct.metrics_url)
    stages = ("large", "mask", "hybrid", "small", "text_encoding", "vae_decode")
    for stage in stages:  # on the metrics port beside Triton's own, from the start
        assert ("hybridstitch_stage_seconds_total", frozenset({("model", GENERATE.name), ("stage", stage)})) in before
    assert metric(before, "nv_inference_count", model=GENERATE.name) >= 0
    with HybridStitchClient(direct.url, timeout_s=120) as remote:
        for seed in range(2):
            remote.generate(PROMPTS[0], seed=seed, steps=STEPS, plan="hybrid")
    counted = lambda values, name, **labels: metric(values, name, model=GENERATE.name, **labels) - metric(before, name, model=GENERATE.name, **labels)  # noqa: E731
    after = scrape_until(direct.metrics_url, lambda v: counted(v, "hybridstitch_images_total", plan="hybrid") >= 2)
    delta = lambda name, **labels: counted(after, name, **labels)  # noqa: E731
    for stage in stages:
        assert delta("hybridstitch_stage_seconds_total", stage=stage) > 0, stage
    assert delta("hybridstitch_images_total", plan="hybrid") == 2
    assert delta("hybridstitch_mask_tokens_total", plan="hybrid") == 2 * int(np.ceil(MaskConfig().ratio * 64))
    assert delta("hybridstitch_engine_calls_total", plan="hybrid") == 2


def test_a_flood_past_the_queue_is_refused_at_once(direct):
    """While the only instance is busy, at most --max-queue requests wait; the others are refused
    at once (UNAVAILABLE, HTTP 503), not after a timeout, and every admitted request completes."""
    from hs_export.serve.client import HybridStitchClient

    def one(seed):
        began = time.monotonic()
        with HybridStitchClient(direct.url, timeout_s=120) as remote:
            try:
                return "ok", remote.generate(PROMPTS[seed % 4], seed=seed, steps=STEPS).image.shape, time.monotonic() - began
            except ServingError as exc:
                return "refused", (exc.status, str(exc)), time.monotonic() - began

    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        slow = pool.submit(_slow, direct.url)
        time.sleep(1.0)  # the slow request is executing: the flood meets a busy instance
        assert not slow.done()
        outcomes = list(pool.map(one, range(16), timeout=120))
        slow.result(timeout=120)
    served = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert len(served) + len(refused) == 16 and 1 <= len(served) <= MAX_QUEUE + 1 and len(refused) >= 16 - MAX_QUEUE - 1, outcomes
    assert all(o[1] == (128, 128, 3) for o in served)
    for _, (status, message), seconds in refused:
        assert status == "503" and seconds < 2.0, (status, message, seconds)
        assert message == "hybridstitch request refused: the server's queue is full | got Exceeds maximum queue size | retry later, or serve with more --instances or a larger --max-queue"


def test_a_request_cancelled_while_queued_is_never_run(direct):
    """A gRPC client that gives up (its deadline) while its request waits behind a busy instance:
    Triton counts it cancelled and the model never runs it."""
    from hs_export.serve.client import HybridStitchClient

    before = scrape(direct.metrics_url)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # long enough that the impatient request's deadline (~2 s in) passes while it still waits
        slow = pool.submit(_slow, direct.url, 1, 1000)
        time.sleep(1.0)
        with HybridStitchClient(direct.grpc_url, timeout_s=1.0) as impatient:
            with pytest.raises(ServingError, match="took longer than the client timeout"):
                impatient.generate(PROMPTS[2], seed=3, steps=STEPS, plan="small")
        slow.result(timeout=120)
    with HybridStitchClient(direct.url, timeout_s=120) as remote:  # the server answers afterwards
        remote.generate(PROMPTS[3], seed=4, steps=STEPS)
    counted = lambda values, name, **labels: metric(values, name, model=GENERATE.name, **labels) - metric(before, name, model=GENERATE.name, **labels)  # noqa: E731
    after = scrape_until(direct.metrics_url, lambda v: counted(v, "nv_inference_request_failure", reason="CANCELED") >= 1 and counted(v, "hybridstitch_images_total") >= 2)
    delta = lambda name, **labels: counted(after, name, **labels)  # noqa: E731
    assert delta("nv_inference_request_failure", reason="CANCELED") == 1
    assert delta("hybridstitch_images_total", plan="small") == 0 and delta("hybridstitch_images_total") == 2


def test_a_running_request_cancelled_by_its_client_stops_at_the_next_step(direct):
    """A gRPC client that gives up while its request runs (1000 large steps, ~4 s): the model sees
    the cancellation at the next step, answers CANCELLED and is free for the next request at once."""
    from hs_export.serve.client import HybridStitchClient

    before = scrape(direct.metrics_url)
    began = time.monotonic()
    with HybridStitchClient(direct.grpc_url, timeout_s=1.0) as impatient:
        with pytest.raises(ServingError, match="took longer than the client timeout"):
            impatient.generate(PROMPTS[0], seed=5, steps=1000, plan="large")
    with HybridStitchClient(direct.url, timeout_s=120) as remote:
        remote.generate(PROMPTS[1], seed=6, steps=STEPS)
    took = time.monotonic() - began
    counted = lambda values, name, **labels: metric(values, name, model=GENERATE.name, **labels) - metric(before, name, model=GENERATE.name, **labels)  # noqa: E731
    after = scrape_until(direct.metrics_url, lambda v: counted(v, "hybridstitch_refused_total", code="CANCELLED") >= 1 and counted(v, "hybridstitch_images_total") >= 1)
    delta = lambda name, **labels: counted(after, name, **labels)  # noqa: E731
    assert delta("hybridstitch_refused_total", code="CANCELLED") == 1  # the model stopped it, not Triton's queue
    assert delta("hybridstitch_images_total", plan="large") == 0 and delta("hybridstitch_images_total") == 1
    assert took < 3.0, f"the next request waited {took:.1f} s: the cancelled denoise ran on"


def test_sigterm_stops_the_repository_server_cleanly(direct):
    """Last: SIGTERM to tritonserver itself: exit 0, no Python-backend process left."""
    direct.proc.send_signal(signal.SIGTERM)
    assert direct.proc.wait(timeout=60) == 0, direct.log_tail()
    assert direct.stop() == []

