"""Serving: per-prompt seeds and prompt padding in the runtime, request validation and grouping,
the handlers without Triton (per-request errors, cancellation, stats), then a real Triton server
started by ``hs-export serve`` on loopback ports (8 concurrent clients, batching, KServe errors
among good requests, the latents model, bench-serve, SIGTERM). The repository run directly on
``tritonserver`` is in ``test_triton_repo.py``, which shares this file's server helpers."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hs_export.cli import main
from hs_export.serve.batching import RunSettings, ServingDefaults, ServingLimits, _plan_config, group_calls, parse_generation, parse_rows
from hs_export.serve.handlers import CANCELLED, INTERNAL, INVALID_ARG, GenerateHandler, Instance, LatentsHandler
from hs_export.serve.protocol import GENERATE, LATENTS, TIMING_KEYS, ServingError
from hs_runtime import HybridStitchRuntime
from hs_runtime.errors import CancelledError, EngineRunError, HybridStitchError, OutOfMemoryError
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import MaskConfig, PlanConfig, make_plan
from hs_runtime.sampler import Conditioning

STEPS = 4
PROMPTS = ("a red cat", "a photo of a dog in the city", "a blue lake at night", "a portrait of an astronaut")
MAX_PIXEL_DIFF = 2  # "up to floating-point rounding": at most 2 levels of 255 on any pixel


@pytest.fixture(scope="session")
def tiny4_engine_dir(tiny_paths, tmp_path_factory):
    """Tiny ONNX Runtime engines built for 4 prompts per call (batch 8 with guidance)."""
    from hs_export.build import BuildConfig, build
    from hs_export.build import resolve_models

    out = tmp_path_factory.getbasetemp() / "engines4" / "tiny4"  # one path per session: test_triton_repo's copy of this fixture finds the build done
    build(resolve_models("tiny", None, None, None, log=lambda *_: None), BuildConfig(out=out, prompts=4), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny4_runtime(tiny4_engine_dir):
    return HybridStitchRuntime.from_dir(tiny4_engine_dir)


@pytest.fixture(scope="session")
def instance(tiny4_runtime):
    m = tiny4_runtime.manifest
    return Instance("test", tiny4_runtime, tiny4_runtime.text_and_vae(), ServingDefaults.from_manifest(m), ServingLimits.from_manifest(m))


def _alone(runtime, prompt, seed, steps=STEPS, plan=None):
    """What ``hs-export generate`` computes for one prompt (the same pipeline call)."""
    d = ServingDefaults.from_manifest(runtime.manifest).settings
    images, _ = runtime.pipeline(d.guidance_scale)([prompt], make_plan(plan or d.plan, steps), d.height, d.width, seed)
    return np.asarray(images[0], dtype=np.int16)


def _request(prompt="a red cat", seed=0, **options) -> dict[str, np.ndarray]:
    """A Triton request as the handler receives it: name → [1, 1] array."""
    values = {"prompt": prompt, "seed": seed, **options}
    return {name: _array(name, value) for name, value in values.items()}


def _array(name, value):
    spec = GENERATE.input(name)
    if spec.dtype is np.bytes_:
        return np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_)
    return np.array([[value]], dtype=spec.dtype)


# ----------------------------------------------------------------------------- runtime


def test_initial_latents_per_prompt_seeds():
    batched = initial_latents(3, 128, 128, [5, 6, 7])
    for i, seed in enumerate((5, 6, 7)):
        assert torch.equal(batched[i : i + 1], initial_latents(1, 128, 128, seed))
    assert torch.equal(initial_latents(2, 128, 128, 3), initial_latents(2, 128, 128, 3))  # an int keeps today's behaviour
    with pytest.raises(HybridStitchError, match="one seed per prompt"):
        initial_latents(2, 128, 128, [1])


@pytest.mark.parametrize("prompts", [1, 3, 5])
def test_runtime_pads_and_splits_prompts(tiny4_runtime, tiny_conditioning, prompts):
    """1 and 3 prompts are padded to the built 4; 5 are split into 4 + 1 (padded): every prompt
    gets what it gets alone, masks and latents sliced alike."""
    assert tiny4_runtime.prompt_range(cfg=True) == (4, 4) and tiny4_runtime.prompt_range(cfg=False) == (8, 8)
    c = tiny_conditioning
    rows = [i % c.prompts for i in range(prompts)]
    pick = lambda t: t[rows]  # noqa: E731
    cond = Conditioning(pick(c.prompt_embeds), pick(c.pooled_prompt_embeds), pick(c.negative_prompt_embeds), pick(c.negative_pooled_prompt_embeds))
    seeds = list(range(10, 10 + prompts))
    plan = make_plan("hybrid", 6)
    result = tiny4_runtime.denoise(plan, initial_latents(prompts, 128, 128, seeds), cond)
    assert result.latents.shape == (prompts, 16, 16, 16)
    assert len(result.masks) == plan.count("capture") and all(m.complex_idx.shape[0] == prompts for m in result.masks)
    for i in range(prompts):
        one = Conditioning(*(t[i : i + 1] for t in (cond.prompt_embeds, cond.pooled_prompt_embeds, cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds)))
        alone = tiny4_runtime.denoise(plan, initial_latents(1, 128, 128, seeds[i]), one)
        assert torch.allclose(result.latents[i], alone.latents[0], atol=1e-4)
        assert all(torch.equal(m.complex_idx[i], a.complex_idx[0]) for m, a in zip(result.masks, alone.masks, strict=True))


def test_split_requests_keep_every_calls_timing(tiny4_runtime, tiny_conditioning):
    """``profile_calls`` reaches every engine call of a request split into calls of the built count
    (5 prompts: 4 + 1 padded), and the joined result keeps them all."""
    c = tiny_conditioning
    rows = [i % c.prompts for i in range(5)]
    cond = Conditioning(*(t[rows] for t in (c.prompt_embeds, c.pooled_prompt_embeds, c.negative_prompt_embeds, c.negative_pooled_prompt_embeds)))
    result = tiny4_runtime.denoise(make_plan("small", 2), initial_latents(5, 128, 128, 0), cond, profile_calls=True)
    assert sum(len(times) for times in result.times.calls.values()) == 2 * 2  # two engine calls × two steps


# ----------------------------------------------------------------------------- validation and grouping


def test_defaults_and_limits_come_from_the_manifest(tiny4_runtime):
    defaults = ServingDefaults.from_manifest(tiny4_runtime.manifest)
    limits = ServingLimits.from_manifest(tiny4_runtime.manifest)
    assert defaults.settings.plan == "hybrid" and (defaults.settings.height, defaults.settings.width) == (128, 128)
    assert defaults.settings.mask_ratio == pytest.approx(MaskConfig().ratio)  # the build's planned ratio: the default
    assert limits.latent_height == (16, 16) and limits.text_tokens == 85 and limits.vae_scale == 8


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(plan="fastest"), "unknown plan | got 'fastest'"),
        (dict(height=256), "height outside the built profiles | got 256 px | expected 128..128 px | rebuild with: hs-export build"),
        (dict(width=100), "width must be a positive multiple of 16"),
        (dict(mask_ratio=0.0), "mask ratio out of range"),
        (dict(mask_ratio=1.5), "mask ratio out of range"),
        (dict(steps=0), "steps out of range | got 0"),
        (dict(prompt="   "), "empty prompt"),
        (dict(prompt=b"\xff\xfe"), "input prompt is not UTF-8 text"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(seed=-1), "seed out of range | got -1"),
    ],
)
def test_bad_rows_get_one_line_reasons(instance, options, message):
    rows = parse_rows([_request(**{"prompt": "ok", "seed": 1, **options})], lambda inputs, r: parse_generation(inputs, r, instance.defaults, instance.limits))
    assert len(rows) == 1 and message in rows[0].error and "\n" not in rows[0].error


def test_missing_required_inputs_are_refused(instance):
    # Triton 2.51 passes a request without a required input on to the model: the handler refuses it.
    parse = lambda inputs, r: parse_generation(inputs, r, instance.defaults, instance.limits)  # noqa: E731
    no_prompt = {"seed": np.array([[1]], np.int64)}
    no_seed = {"prompt": np.array([[b"x"]], dtype=np.object_)}
    assert "missing input prompt" in parse_rows([no_prompt], parse)[0].error
    assert "missing input seed" in parse_rows([no_seed], parse)[0].error


def test_group_calls_by_settings_in_arrival_order():
    a = RunSettings("hybrid", 4, 7.0, 0.3, 128, 128)
    b = RunSettings("small", 4, 7.0, 0.3, 128, 128)
    items = [a, a, b, a, a, a, b]
    assert group_calls(items, key=lambda s: s, max_prompts=lambda s: 4) == [[0, 1, 3, 4], [5], [2, 6]]
    assert group_calls(items, key=lambda s: s, max_prompts=lambda s: None) == [[0, 1, 3, 4, 5], [2, 6]]


# ----------------------------------------------------------------------------- handlers (no Triton)


def _placeholders(items) -> list[dict]:
    return [{"image": np.zeros((1, 1, 3), np.uint8), "mask": np.zeros((1, 1), np.uint8), "timings_s": np.zeros(len(TIMING_KEYS), np.float32)} for _ in items]


def test_handler_serves_a_batch_around_a_bad_request(instance, tiny4_runtime):
    """One dynamic batch: good, bad, good, good. The bad one fails alone with INVALID_ARG and its
    one-line reason; the three good ones run in one engine call and equal their images alone; the
    stats count stages, images and mask tokens."""
    handler = GenerateHandler(instance)
    requests = [_request(PROMPTS[0], 1, steps=STEPS), _request(PROMPTS[1], 2, steps=STEPS, plan="fastest"), _request(PROMPTS[2], 3, steps=STEPS), _request(PROMPTS[3], 4, steps=STEPS, negative_prompt="blurry")]
    out = handler(requests)
    assert out[1].code == INVALID_ARG and out[1].outputs is None
    assert out[1].error == "unknown plan | got 'fastest' | expected large | small | tstitch | srdiff | hybrid"
    stats = handler.stats
    assert stats.denoise_calls == 1 and stats.largest_call == 3 and stats.refused == {INVALID_ARG: 1}
    for i in (0, 2):
        assert out[i].error == "" and out[i].outputs["image"].shape == (1, 128, 128, 3) and out[i].outputs["mask"].shape == (1, 8, 8)
        assert out[i].outputs["timings_s"].shape == (1, len(TIMING_KEYS))
        assert np.abs(out[i].outputs["image"][0].astype(np.int16) - _alone(tiny4_runtime, PROMPTS[i], i + 1)).max() <= MAX_PIXEL_DIFF
    tokens = int(np.ceil(MaskConfig().ratio * 64))  # the default hybrid plan's share of 8×8 tokens
    assert out[0].outputs["mask"].sum() == tokens
    assert stats.images == {"hybrid": 3} and stats.mask_tokens == {"hybrid": 3 * tokens}
    assert all(stats.stage_seconds[s] > 0 for s in ("large", "mask", "hybrid", "small", "text_encoding", "vae_decode")), stats.stage_seconds


def test_a_request_with_several_rows(instance, tiny4_runtime):
    """A client may send [N, 1] arrays: each row is a prompt. A request with a bad row fails as a
    whole, naming the row; a request beside it is served."""
    rows = lambda prompts: {"prompt": np.array([[p.encode()] for p in prompts], dtype=np.object_), "seed": np.array([[s] for s in range(1, len(prompts) + 1)], np.int64), "steps": np.array([[STEPS]] * len(prompts), np.int64)}  # noqa: E731
    out = GenerateHandler(instance)([rows(["a red cat", PROMPTS[1]]), rows(["a red cat", " ", "x"])])
    assert out[0].outputs["image"].shape == (2, 128, 128, 3) and out[0].outputs["mask"].shape == (2, 8, 8)
    assert np.abs(out[0].outputs["image"][1].astype(np.int16) - _alone(tiny4_runtime, PROMPTS[1], 2)).max() <= MAX_PIXEL_DIFF
    assert out[1].code == INVALID_ARG and out[1].error == "row 1 of 3: empty prompt | send a non-empty prompt"


def test_engine_call_errors_stay_with_their_requests(instance, caplog):
    """A toolkit error validation did not foresee fails one engine call: its members are retried
    alone, so only the culprit gets it. A bug fails the requests of its engine call alone, with a
    one-line INTERNAL message; the traceback goes to the log."""

    class Fussy(GenerateHandler):
        def run(self, items, should_stop=None):
            if any(i.prompt == "boom" for i in items):
                raise HybridStitchError("boom | got a prompt the engines refuse")
            if any(i.prompt == "huge" for i in items):
                raise OutOfMemoryError("the large engine (cpu) ran out of memory | got CUDA out of memory")
            if any(i.prompt == "bug" for i in items):
                return {}["no such key"]
            if any(i.prompt == "failing" for i in items):
                raise EngineRunError("TensorRT execution of large failed | got an illegal memory access")
            return _placeholders(items)

    with caplog.at_level("ERROR", logger="hs_export.serve"):
        out = Fussy(instance)([_request("a", 1), _request("boom", 2), _request("c", 3), _request("bug", 4, plan="small"), _request("d", 5, plan="large"), _request("huge", 6), _request("failing", 7)])
    assert [o.code for o in out] == ["", INVALID_ARG, "", INTERNAL, "", INTERNAL, INTERNAL]  # out of memory or the engine failing even alone: the server's
    assert out[5].error.startswith("the large engine (cpu) ran out of memory")
    assert out[6].error == "TensorRT execution of large failed | got an illegal memory access"
    assert out[1].error == "boom | got a prompt the engines refuse"
    assert out[3].error == "internal error in hybridstitch | got KeyError: 'no such key' | see the server log for the traceback"
    assert "Traceback" in caplog.text and "no such key" in caplog.text


def test_a_sent_default_batches_with_requests_that_leave_it_out(instance):
    """A mask ratio or guidance scale travels as FP32: a client that sends the folder's default
    (0.02 arrives as 0.0199999995…) shares the engine call of requests that send nothing, and a
    sent 0.3 is the 0.3 ``generate`` takes."""
    seen = []

    class Recording(GenerateHandler):
        def run(self, items, should_stop=None):
            seen.append([(i.prompt, i.settings.mask_ratio, i.settings.guidance_scale) for i in items])
            return _placeholders(items)

    d = instance.defaults.settings
    out = Recording(instance)([_request("a", 1), _request("b", 2, mask_ratio=d.mask_ratio), _request("c", 3, guidance_scale=d.guidance_scale), _request("d", 4, mask_ratio=0.3)])
    assert [o.code for o in out] == [""] * 4
    assert seen == [[("a", d.mask_ratio, d.guidance_scale), ("b", d.mask_ratio, d.guidance_scale), ("c", d.mask_ratio, d.guidance_scale)], [("d", 0.3, d.guidance_scale)]]


def test_cancelled_requests_never_reach_an_engine(instance):
    """Cancelled before the batch runs, or while an earlier engine call of the same batch runs:
    CANCELLED, and no engine call for it."""
    seen = []
    gone = {1}

    class Recording(GenerateHandler):
        def run(self, items, should_stop=None):
            seen.append([i.prompt for i in items])
            gone.add(2)  # request 2's client leaves while this call runs
            return _placeholders(items)

    requests = [_request("a", 1), _request("b", 2), _request("c", 3, plan="small")]
    out = Recording(instance)(requests, cancelled=[lambda i=i: i in gone for i in range(3)])
    assert [o.code for o in out] == ["", CANCELLED, CANCELLED]
    assert seen == [["a"]]


def test_an_engine_call_stopped_for_its_cancelled_requests_answers_cancelled(instance):
    """The handler's side of the runtime hook: ``should_stop`` is true only once every request of
    the call is cancelled, and the runtime's CancelledError becomes CANCELLED (not a refusal, and
    no retry)."""
    gone: set[int] = set()
    runs = []

    class Stopping(GenerateHandler):
        def run(self, items, should_stop=None):
            runs.append([i.prompt for i in items])
            assert not should_stop()
            gone.update({0, 1})  # both clients leave mid-call
            if should_stop():
                raise CancelledError("denoise stopped before step 2 of 1000 | got should_stop() is True")
            return _placeholders(items)

    out = Stopping(instance)([_request("a", 1), _request("b", 2)], cancelled=[lambda i=i: i in gone for i in range(2)])
    assert [o.code for o in out] == [CANCELLED, CANCELLED] and runs == [["a", "b"]]


def test_all_cancelled_engine_call_stops_at_the_next_step(instance, tiny_conditioning):
    """With every request of an engine call cancelled, the runtime stops at the next step
    (1000 large steps take ~4 s on tiny engines; this must take a fraction)."""
    c = tiny_conditioning
    latents_request = {
        "prompt_embeds": c.prompt_embeds[:1].numpy(), "pooled_prompt_embeds": c.pooled_prompt_embeds[:1].numpy(), "negative_prompt_embeds": c.negative_prompt_embeds[:1].numpy(),
        "negative_pooled_prompt_embeds": c.negative_pooled_prompt_embeds[:1].numpy(), "latents": initial_latents(1, 128, 128, 0).numpy(),
        "steps": np.array([[1000]], np.int64), "plan": np.array([[b"large"]], dtype=np.object_),
    }
    for handler, request in ((GenerateHandler(instance), _request("a red cat", 1, steps=1000, plan="large")), (LatentsHandler(instance), latents_request)):
        asked = []
        cancelled = lambda: asked.append(1) or len(asked) > 3  # noqa: E731  (gone after the first step)
        start = time.perf_counter()
        out = handler([request], cancelled=[cancelled])
        assert out[0].code == CANCELLED and time.perf_counter() - start < 1.5, (out[0], time.perf_counter() - start)


def test_latents_handler_matches_the_runtime(instance, tiny4_runtime, tiny_conditioning):
    c = tiny_conditioning
    noise = initial_latents(2, 128, 128, [7, 8]).numpy()
    requests = [
        {"prompt_embeds": c.prompt_embeds[i : i + 1].numpy(), "pooled_prompt_embeds": c.pooled_prompt_embeds[i : i + 1].numpy(),
         "negative_prompt_embeds": c.negative_prompt_embeds[i : i + 1].numpy(), "negative_pooled_prompt_embeds": c.negative_pooled_prompt_embeds[i : i + 1].numpy(),
         "latents": noise[i : i + 1], "steps": np.array([[STEPS]], np.int64)}
        for i in range(2)
    ]
    bad = dict(requests[0], latents=noise[:1, :, :8])  # 8×16 latent: outside the built profile
    handler = LatentsHandler(instance)
    out = handler([*requests, bad])
    want = tiny4_runtime.denoise(make_plan("hybrid", STEPS), torch.from_numpy(noise), c).latents.numpy()
    for i in range(2):
        assert out[i].error == ""
        np.testing.assert_allclose(out[i].outputs["latents"][0], want[i], atol=1e-4)
    assert out[2].code == INVALID_ARG and out[2].error.startswith("height outside the built profiles")
    assert handler.stats.images == {"hybrid": 2} and handler.stats.stage_seconds["large"] > 0


# ----------------------------------------------------------------------------- a real server (helpers shared with test_triton_repo.py)


EXIT_TIMEOUT_S = 20  # the module's server: long enough for the drain test's requests on a loaded host


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def session_processes(session: int) -> list[tuple[int, str]]:
    """(pid, name) of every live process in ``session`` (the server was started as its leader)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":
            found.append((int(entry.name), name))
    return found


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text → {(name, {(label, value), …}): value}."""
    import re

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for match in re.finditer(r"^(\w+)(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$", text, flags=re.M):
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        out[(match.group(1), labels)] = float(match.group(3))
    return out


def scrape_until(url: str, done, timeout_s: float = 15.0) -> dict[tuple[str, frozenset], float]:
    """Scrapes until ``done(values)`` or ``timeout_s`` (bounded): Triton counts a request once its
    response is sent, so a scrape right after the last client returns can miss the last few
    (seen in CI: 28 of 32)."""
    deadline = time.monotonic() + timeout_s
    values = scrape(url)
    while not done(values) and time.monotonic() < deadline:
        time.sleep(0.2)
        values = scrape(url)
    return values


def metric(values: dict, name: str, **labels) -> float:
    """The series of ``name`` whose labels include ``labels`` (0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, l), v in values.items() if n == name and want <= l)


class Server:
    """A server process started as the leader of its own session, so everything it starts
    (``tritonserver``, the Python-backend processes) can be found and never left behind."""

    def __init__(self, proc: subprocess.Popen, ports: list[int], log: Path):
        self.proc, self.log = proc, log
        self.url = f"http://127.0.0.1:{ports[0]}"
        self.grpc_url = f"grpc://127.0.0.1:{ports[1]}"
        self.metrics_url = f"http://127.0.0.1:{ports[2]}/metrics"

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, timeout_s: float = 60.0) -> list[tuple[int, str]]:
        """SIGTERM, wait; kill the whole session if it does not exit; return processes left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        left = session_processes(self.proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = session_processes(self.proc.pid)
        for pid, _ in left:  # never leave anything behind, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def start_process(cmd: list[str], ports: list[int], log: Path, env: dict, models=(GENERATE.name, LATENTS.name), ready_timeout_s: float = 180.0) -> Server:
    """Starts ``cmd`` and waits (bounded) until every model's ready endpoint answers."""
    pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (pip install '.[serve]')")
    pytest.importorskip("tritonclient.http", reason="serving needs tritonclient (pip install '.[serve]')")
    handle = log.open("w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**env, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    handle.close()
    server = Server(proc, ports, log)
    deadline = time.monotonic() + ready_timeout_s
    pending = list(models)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            pytest.fail(f"{cmd[0]} exited with {proc.returncode}:\n{server.log_tail()}")
        for model in list(pending):  # the model's endpoint: a model is ready only once warmed up
            try:
                with urllib.request.urlopen(f"{server.url}/v2/models/{model}/ready", timeout=2) as response:
                    if response.status == 200:
                        pending.remove(model)
            except OSError:
                pass
        if pending:
            time.sleep(0.5)
    if pending:
        left = server.stop()
        pytest.fail(f"models {pending} not ready after {ready_timeout_s:.0f} s (left {left}):\n{server.log_tail()}")
    return server


def start_server(engine_dir: Path, log: Path, preset_root: Path, *extra: str) -> Server:
    """``hs-export serve`` on free loopback ports."""
    ports = free_ports(3)
    cmd = [
        sys.executable, "-c", "from hs_export.cli import main; main()", "serve", str(engine_dir), "--host", "127.0.0.1",
        "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *extra,
    ]
    return start_process(cmd, ports, log, {**os.environ, "HS_PRESET_DIR": str(preset_root)})


def generate_cli_image(engine_dir: Path, prompt: str, seed: int, out: Path) -> np.ndarray:
    """``hs-export generate`` on the same folder, prompt, seed and steps."""
    from PIL import Image

    done = CliRunner().invoke(main, ["generate", str(engine_dir), "--prompt", prompt, "--seed", str(seed), "--steps", str(STEPS), "--out", str(out)])
    assert done.exit_code == 0, done.output
    return np.asarray(Image.open(out), dtype=np.int16)


@pytest.fixture(scope="module")
def server(tiny4_engine_dir, preset_root, tmp_path_factory):
    s = start_server(tiny4_engine_dir, tmp_path_factory.mktemp("serve") / "serve.log", preset_root, "--instances", "2", "--exit-timeout-secs", str(EXIT_TIMEOUT_S))
    yield s
    left = s.stop()
    assert not left, f"processes left behind: {left}"


def test_eight_concurrent_clients_get_the_images_generate_makes(server, tiny4_runtime, tmp_path):
    """8 clients × 4 requests (HTTP and gRPC), distinct seeds: every image equals the one made
    alone; Triton batched them (fewer executions than requests)."""
    from hs_export.serve.client import HybridStitchClient

    before = scrape(server.metrics_url)

    def client(c: int):
        url = server.url if c % 2 == 0 else server.grpc_url
        with HybridStitchClient(url, timeout_s=120) as remote:
            return [(c * 4 + k, remote.generate(PROMPTS[(c + k) % 4], seed=100 + c * 4 + k, steps=STEPS)) for k in range(4)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8), timeout=300) for r in rs]
    assert len(results) == 32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine may be shared
    try:
        for index, result in results:
            c, k = divmod(index, 4)
            assert result.image.shape == (128, 128, 3) and result.mask.shape == (8, 8)
            assert set(result.timings) == set(TIMING_KEYS) and result.timings["total"] > 0
            want = _alone(tiny4_runtime, PROMPTS[(c + k) % 4], 100 + index)
            assert np.abs(result.image.astype(np.int16) - want).max() <= MAX_PIXEL_DIFF, f"request {index}"
    finally:
        torch.set_num_threads(threads)
    counted = lambda values, name: metric(values, name, model=GENERATE.name) - metric(before, name, model=GENERATE.name)  # noqa: E731
    after = scrape_until(server.metrics_url, lambda v: counted(v, "nv_inference_count") >= 32 and counted(v, "hybridstitch_images_total") >= 32)
    delta = lambda name: counted(after, name)  # noqa: E731
    assert delta("nv_inference_count") == 32 and delta("hybridstitch_images_total") == 32
    assert delta("nv_inference_exec_count") < 32, "Triton never put two requests in one execution"
    assert delta("hybridstitch_engine_calls_total") < 32, "no engine call served two requests"
    want = generate_cli_image(tiny4_runtime.manifest.folder, PROMPTS[0], 100, tmp_path / "generate.png")
    assert np.abs(want - results[0][1].image).max() <= MAX_PIXEL_DIFF


def test_bad_requests_among_good_ones(server, tmp_path):
    """Bad requests fail alone as KServe errors (HTTP 400 / gRPC INVALID_ARGUMENT) with the one-line
    reason; the good ones sent with them succeed, and the server keeps answering."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from hs_export.serve.client import HybridStitchClient

    def good(i):
        with HybridStitchClient(server.url, timeout_s=120) as remote:
            return remote.generate(PROMPTS[i % 4], seed=i, steps=STEPS, plan="hybrid").image.shape

    def bad(index_options):
        index, options = index_options
        with HybridStitchClient(server.url if index % 2 == 0 else server.grpc_url, timeout_s=120) as remote:
            try:
                # infer(), not generate(): the client's own checks would stop these before the server sees them
                remote.infer(GENERATE, {"prompt": "a red cat", "seed": 1, "steps": STEPS, "plan": "hybrid", **options})
            except ServingError as exc:
                return exc.status, str(exc)
        return None, "no error"

    bad_options = [dict(plan="fastest"), dict(steps=0), dict(prompt="  "), dict(height=1000), dict(mask_ratio=0.0), dict(height=256)]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        goods = [pool.submit(good, i) for i in range(4)]
        bads = list(pool.map(bad, enumerate(bad_options), timeout=120))
        assert [g.result(timeout=120) for g in goods] == [(128, 128, 3)] * 4
    reasons = ["unknown plan", "steps out of range", "empty prompt", "height must be a positive multiple of 16", "mask ratio out of range", "height outside the built profiles | got 256 px"]
    for index, ((status, reason), expected) in enumerate(zip(bads, reasons)):
        assert status == ("400" if index % 2 == 0 else "StatusCode.INVALID_ARGUMENT"), (status, reason)
        assert reason.startswith(expected) and "\n" not in reason and "Traceback" not in reason, reason

    def raw_input(name, triton_dtype, value):
        item = http.InferInput(name, [1, 1], triton_dtype)
        item.set_data_from_numpy(np.array([[value]], dtype=np.object_ if triton_dtype == "BYTES" else np.int64))
        return item

    raw = http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        # A plain tritonclient call with an unknown plan: a KServe error, HTTP 400, the one-line reason.
        with pytest.raises(InferenceServerException) as refused:
            raw.infer(GENERATE.name, [raw_input("prompt", "BYTES", b"a cat"), raw_input("seed", "INT64", 1), raw_input("plan", "BYTES", b"fastest")])
        assert refused.value.status() == "400" and "unknown plan | got 'fastest' | expected large | small | tstitch | srdiff | hybrid" in refused.value.message()
        # Wrong dtype, too few inputs: Triton refuses the request itself, with its own reason.
        with pytest.raises(InferenceServerException, match="data-type is 'INT64', but model 'hybridstitch' expects 'BYTES'"):
            raw.infer(GENERATE.name, [raw_input("prompt", "INT64", 1), raw_input("seed", "INT64", 1)])
        with pytest.raises(InferenceServerException, match=r"missing required input\(s\) \['seed'\]"):
            raw.infer(GENERATE.name, [raw_input("prompt", "BYTES", b"a cat")])
        # A required input missing among enough others: Triton passes it on; the model refuses it.
        with pytest.raises(InferenceServerException) as refused:
            raw.infer(GENERATE.name, [raw_input("seed", "INT64", 1), raw_input("steps", "INT64", STEPS)])
        assert refused.value.status() == "400" and refused.value.message().endswith("missing input prompt | send prompt with every hybridstitch request")
        assert raw.infer(GENERATE.name, [raw_input("prompt", "BYTES", b"a cat"), raw_input("seed", "INT64", 1), raw_input("steps", "INT64", STEPS)]).as_numpy("image").shape == (1, 128, 128, 3)
    finally:
        raw.close()  # an open keep-alive connection holds Triton's shutdown for its exit timeout

    # The client command: one line, exit 1, from the client's own check or from the server.
    done = CliRunner().invoke(main, ["client", "--url", server.url, "--prompt", "a red cat", "--plan", "large", "--steps", "0", "--out", str(tmp_path / "x.png")])
    assert done.exit_code == 1 and done.output.strip() == "Error: steps must be >= 1 | got 0"  # checked by the client, no round trip
    done = CliRunner().invoke(main, ["client", "--url", server.url, "--prompt", "a red cat", "--height", "256", "--out", str(tmp_path / "x.png")])
    assert done.exit_code == 1 and done.output.startswith("Error: height outside the built profiles | got 256 px") and len(done.output.strip().splitlines()) == 1, done.output
    done = CliRunner().invoke(main, ["client", "--url", server.url, "--prompt", "a red cat", "--seed", "5", "--steps", str(STEPS), "--out", str(tmp_path / "ok.png")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "ok.png").is_file()


def test_latents_model_over_the_wire(server, tiny4_runtime, tiny_conditioning):
    from hs_export.serve.client import HybridStitchClient

    c = tiny_conditioning
    noise = initial_latents(1, 128, 128, 3)
    with HybridStitchClient(server.grpc_url, timeout_s=120) as remote:
        assert remote.ready(LATENTS.name)
        got = remote.denoise(c.prompt_embeds[0].numpy(), c.pooled_prompt_embeds[0].numpy(), noise[0].numpy(), c.negative_prompt_embeds[0].numpy(), c.negative_pooled_prompt_embeds[0].numpy(), steps=STEPS)
        with pytest.raises(ServingError, match="^guidance_scale > 1 needs negative_prompt_embeds"):
            remote.denoise(c.prompt_embeds[0].numpy(), c.pooled_prompt_embeds[0].numpy(), noise[0].numpy(), steps=STEPS)
    one = Conditioning(c.prompt_embeds[:1], c.pooled_prompt_embeds[:1], c.negative_prompt_embeds[:1], c.negative_pooled_prompt_embeds[:1])
    want = tiny4_runtime.denoise(make_plan("hybrid", STEPS), noise, one).latents[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_readme_python_example_runs(server):
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S) if "tritonclient.http" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(blocks[0].replace("127.0.0.1:8000", server.url.removeprefix("http://")), namespace)  # noqa: S102
    assert namespace["image"].shape == (128, 128, 3)
    bad = blocks[0].replace("127.0.0.1:8000", server.url.removeprefix("http://")).replace('("steps", 8, "INT64")', '("steps", 0, "INT64")')
    with pytest.raises(SystemExit, match=r"^Error \(HTTP 400\): steps out of range \| got 0"):
        exec(bad, {})  # noqa: S102


def test_bench_serve_reports_mode_and_percentiles(server, tmp_path):
    out = tmp_path / "bench.json"
    done = CliRunner().invoke(main, ["bench-serve", server.url, "--concurrency", "1,4", "--requests", "4", "--steps", "2", "--plan", "small", "--metrics-url", server.metrics_url, "--json", str(out)])
    assert done.exit_code == 0, done.output
    report = json.loads(out.read_text())
    assert report["dynamic_batching"] is True and report["max_batch_size"] == 4 and report["instances"] == 2
    assert [r["concurrency"] for r in report["rows"]] == [1, 4]
    for row in report["rows"]:
        assert row["ok"] == 4 and row["errors"] == 0 and row["images_per_s"] > 0 and row["p50_s"] <= row["p95_s"] <= row["p99_s"]
    assert "dynamic batching on" in done.output


def test_client_without_a_server_says_how_to_start_one(tmp_path):
    port = free_ports(1)[0]
    done = CliRunner().invoke(main, ["client", "--url", f"http://127.0.0.1:{port}", "--prompt", "x", "--out", str(tmp_path / "x.png")])
    assert done.exit_code == 1
    assert f"cannot reach a HybridStitch server at http://127.0.0.1:{port}" in done.output and "hs-export serve ENGINE_DIR" in done.output
    assert "Traceback" not in done.output

    # Refused before any request: with no server there, the reply would be "cannot reach".
    url = f"http://127.0.0.1:{port}"
    cases = [
        (["--out", str(tmp_path / "x.foo")], "--out needs an image file name | got 'x.foo'"),
        (["--out", str(tmp_path / "x")], "--out needs an image file name | got 'x'"),
        (["--out", str(tmp_path)], f"--out {tmp_path} is a folder, not a file"),
        (["--seed", str(2**63)], f"seed out of range | got {2**63} | expected an integer in 0..{2**63 - 1} (2**63 - 1: the served seed input is INT64)"),
        (["--steps", str(2**63)], f"input steps out of range | got {2**63} | expected a value INT64 holds"),
        (["--url", "http://127.0.0.1:99999"], "unsupported server URL | got 'http://127.0.0.1:99999' | expected http://HOST:PORT or grpc://HOST:PORT, PORT in 1..65535"),
        (["--url", "http://127.0.0.1:x"], "unsupported server URL | got 'http://127.0.0.1:x'"),
        (["--url", "grpc://127.0.0.1:0"], "unsupported server URL | got 'grpc://127.0.0.1:0'"),  # not the default port instead
        (["--timeout", "-1"], "--timeout must be > 0 | got -1.0"),
        (["--timeout", "0"], "--timeout must be > 0 | got 0.0"),
        (["--timeout", "nan"], "--timeout must be a finite number | got nan"),
        (["--negative-prompt", "\udcff"], "input negative_prompt is not UTF-8 text | got '\\udcff'"),  # undecodable argv bytes, as click hands them on
    ]
    for args, message in cases:
        done = CliRunner().invoke(main, ["client", "--url", url, "--prompt", "x", "--out", str(tmp_path / "x.png"), *args])
        assert done.exit_code == 1 and done.output.startswith(f"Error: {message}") and len(done.output.strip().splitlines()) == 1, (args, done.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bench_serve_refuses_bad_input_before_any_request(tmp_path):
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "empty.json").write_text("{}")
    cases = [
        (["http://127.0.0.1:99999"], "unsupported server URL | got 'http://127.0.0.1:99999'"),
        (["http://127.0.0.1:x"], "unsupported server URL | got 'http://127.0.0.1:x'"),
        ([url, "--timeout", "-1"], "--timeout must be > 0 | got -1.0"),
        ([url, "--timeout", "0"], "--timeout must be > 0 | got 0.0"),
        ([url, "--metrics-url", "notaurl"], "--metrics-url is not an HTTP URL | got 'notaurl'"),
        ([url, "--baseline", str(tmp_path / "list.json")], f"the baseline {tmp_path / 'list.json'} is not a bench-serve report | got a JSON list"),
        ([url, "--baseline", str(tmp_path / "binary.json")], f"cannot read the baseline {tmp_path / 'binary.json'} | got 'utf-8' codec can't decode"),
        ([url, "--baseline", str(tmp_path / "empty.json")], f"the baseline {tmp_path / 'empty.json'} is not a bench-serve report | got no rows"),
        ([url, "--json", str(tmp_path)], f"--json {tmp_path} is a folder, not a file"),
    ]
    for args, message in cases:
        done = CliRunner().invoke(main, ["bench-serve", *args, "--requests", "1", "--concurrency", "1"])
        assert done.exit_code == 1 and done.output.startswith(f"Error: {message}") and len(done.output.strip().splitlines()) == 1, (args, done.output)


def test_a_server_that_is_not_triton_is_named_in_one_line(tmp_path):
    """An HTTP server that answers 200 with HTML (or an error page): not a KServe server."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status = 404 if "missing" in self.path else 200
            self.send_response(status)
            self.send_header("Content-Length", "18")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        do_POST = do_GET

        def log_message(self, *_):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_address[1]}"
    try:
        for command in (["client", "--url", url, "--prompt", "x", "--out", str(tmp_path / "x.png")], ["bench-serve", url, "--requests", "1", "--concurrency", "1"]):
            done = CliRunner().invoke(main, command)
            assert done.exit_code == 1 and done.output.startswith(f"Error: {url} does not answer as a Triton (KServe v2) server | got ") and len(done.output.strip().splitlines()) == 1, done.output
        from hs_export.serve.client import HybridStitchClient

        with HybridStitchClient(url, timeout_s=10) as remote, pytest.raises(ServingError, match="does not answer as a Triton .* while decoding the response"):
            remote.model_config("missing")  # an error status with an HTML body
    finally:
        web.shutdown()
        web.server_close()


def test_a_silent_grpc_port_answers_within_the_client_timeout():
    """A port that takes the connection and never answers: every gRPC call gives up at the
    client's timeout (reading the config waited for gRPC's own 20 s, and bench-serve with it)."""
    import socket
    import time

    from hs_export.serve.client import HybridStitchClient

    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"grpc://127.0.0.1:{silent.getsockname()[1]}"
        with HybridStitchClient(url, timeout_s=1) as remote:
            began = time.monotonic()
            assert remote.ready() is False
            with pytest.raises(ServingError, match="took longer than the client timeout|cannot reach"):
                remote.model_config()
            assert time.monotonic() - began < 10


def test_serve_refuses_bad_setups_in_one_line(tiny4_engine_dir, tmp_path):
    pytest.importorskip("pytriton")
    done = CliRunner().invoke(main, ["serve", str(tmp_path / "nowhere")])
    assert done.exit_code == 1 and "engine folder not found" in done.output
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--instances", "0"])
    assert done.exit_code == 1 and "--instances must be >= 1" in done.output
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--max-queue", "2"])
    assert done.exit_code == 1 and "--max-queue is below the batch size | got 2 < 4" in done.output
    if not torch.cuda.is_available():
        done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--device", "cuda:0"])
        assert done.exit_code == 1 and "--device cuda:0: no such CUDA device here" in done.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--http-port", str(port)])
    assert done.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in done.output and "Traceback" not in done.output
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--exit-timeout-secs", "0"])
    assert done.exit_code == 1 and "--exit-timeout-secs must be >= 1 | got 0" in done.output
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--host", "no-such-host.invalid"])
    assert done.exit_code == 1 and "--host 'no-such-host.invalid' does not resolve to an address" in done.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--repo", str(foreign)])  # names serve's flag, not triton-repo's --out
    assert done.exit_code == 1 and done.output.strip() == f"Error: --repo {foreign} holds other files | got ['notes.txt'] | choose an empty folder, or one written by hs-export triton-repo"


def test_triton_gets_ip_addresses_in_the_forms_it_binds(tmp_path):
    """Triton's HTTP and metrics endpoints bind IP literals only (``localhost`` binds
    255.255.255.255), IPv6 as ``ipv6:[…]``; gRPC takes ``[…]`` and appends the port."""
    from hs_export.serve.server import ServeConfig, TritonDist, listen_address

    assert ServeConfig(host="localhost").address == "127.0.0.1" and listen_address("::1") == "::1"
    dist = TritonDist(Path("tritonserver"), tmp_path, tmp_path, tmp_path)
    flags = lambda address: {f.split("=")[0]: f.split("=", 1)[1] for f in dist.command(tmp_path, tmp_path, address, 1, 2, 3) if f.split("=")[0].endswith("-address")}  # noqa: E731
    assert flags("127.0.0.1") == {"--http-address": "127.0.0.1", "--grpc-address": "127.0.0.1", "--metrics-address": "127.0.0.1"}
    assert flags("::") == {"--http-address": "ipv6:[::]", "--grpc-address": "[::]", "--metrics-address": "ipv6:[::]"}
    assert "--disable-auto-complete-config" in dist.command(tmp_path, tmp_path, "::1", 1, 2, 3)


def test_text_and_vae_elements_are_the_parameters_the_runtime_loads(tiny_paths, tiny_pipe, tmp_path):
    from hs_export.serve.preflight import text_and_vae_elements

    modules = (tiny_pipe.text_encoder, tiny_pipe.text_encoder_2, tiny_pipe.text_encoder_3, tiny_pipe.vae)
    assert text_and_vae_elements(tiny_paths.large) == sum(p.numel() for m in modules for p in m.parameters())
    assert text_and_vae_elements(tmp_path / "elsewhere") is None  # not on this host: not counted, not guessed
    copy = tmp_path / "pipeline"
    shutil.copytree(tiny_paths.large, copy)
    shutil.copy(copy / "text_encoder" / "model.safetensors", copy / "text_encoder" / "model.fp16.safetensors")
    assert text_and_vae_elements(copy) == text_and_vae_elements(tiny_paths.large)  # a variant beside the plain file does not load
    (copy / "vae" / "diffusion_pytorch_model.safetensors").rename(copy / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    assert text_and_vae_elements(copy) is None  # only a variant: not what loads without one, so unknown


def test_serve_needs_count_every_instance_of_both_models(tiny4_engine_dir):
    from hs_export.build.limits import folder_run_needs
    from hs_export.serve.preflight import CPU_PROCESS_BYTES, check_serve_memory, serve_needs, text_and_vae_elements
    from hs_runtime.manifest import Manifest

    manifest = Manifest.load(tiny4_engine_dir)
    needs = serve_needs(manifest, (GENERATE.name, LATENTS.name), 3, "cpu", None, None)
    runtime, text = folder_run_needs(manifest)[0].total, 4 * text_and_vae_elements(manifest.data["pipeline"])  # fp32, as TextAndVae loads them
    assert needs.per_instance == {GENERATE.name: runtime + text, LATENTS.name: runtime}
    assert needs.per_process == {name: n + CPU_PROCESS_BYTES for name, n in needs.per_instance.items()}  # each instance is a process
    one = sum(needs.per_process.values())
    assert needs.total == 3 * one and not needs.unknown and "6 process(es) × 0.44 GiB of libraries" in needs.summary()
    gpu = serve_needs(manifest, (GENERATE.name, LATENTS.name), 3, "cuda:0", None, None)
    assert gpu.total == 3 * sum(needs.per_instance.values())  # device memory: the processes' libraries are on the host
    assert "3 instance(s)" in check_serve_memory(needs, 3 * one)
    with pytest.raises(HybridStitchError, match=rf"would not fit in memory on cpu .*serve with --instances 2 or fewer.*or serve one model \(--models {GENERATE.name} fits\)"):
        check_serve_memory(needs, 3 * one - 1)
    with pytest.raises(HybridStitchError, match="free memory on cpu, or serve on a larger host"):
        check_serve_memory(needs, one - 1)
    assert "not checked" in check_serve_memory(needs, None)
    halved = serve_needs(manifest, (GENERATE.name, LATENTS.name), 3, "cpu", None, None, text_dtype="bf16")
    assert halved.per_instance[GENERATE.name] == runtime + text // 2 and "in bf16" in halved.summary()
    with pytest.raises(HybridStitchError, match=r"or pass --text-dtype bf16 .*then it fits"):
        check_serve_memory(needs, halved.total)
    no_pipeline = serve_needs(manifest, (GENERATE.name,), 1, "cpu", None, "org/remote-pipeline")
    assert no_pipeline.per_instance[GENERATE.name] == runtime and "org/remote-pipeline" in no_pipeline.unknown[0]


def test_free_gpu_memory_is_asked_in_a_process_of_its_own(monkeypatch):
    """cudaMemGetInfo in a short-lived process (the serving process holds no CUDA context); a
    failed probe is "unknown", never a guess."""
    from hs_export.serve import preflight

    asked = []

    def run(command, **_):
        asked.append(command[-1])
        return subprocess.CompletedProcess(command, 0, stdout="7516192768\n", stderr="")

    monkeypatch.setattr(preflight.subprocess, "run", run)
    assert preflight.free_memory("cuda:1") == 7516192768 and "torch.cuda.mem_get_info(1)" in asked[-1]
    assert preflight.free_memory("cuda") == 7516192768 and "mem_get_info(0)" in asked[-1]
    monkeypatch.setattr(preflight.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1, stdout="", stderr="no CUDA"))
    assert preflight.free_memory("cuda:0") is None


def test_serve_refuses_instances_that_cannot_fit_before_triton_starts(tiny4_engine_dir, monkeypatch):
    pytest.importorskip("pytriton")
    from hs_export.serve import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda: 2**20)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--instances", "4"])
    assert done.exit_code == 1 and "the server would not fit in memory on cpu | got 1.00 MiB free" in done.output, done.output
    assert "4 instance(s) × (hybridstitch" in done.output and "Traceback" not in done.output and not started


def test_serve_dry_run_checks_and_starts_nothing(tiny4_engine_dir, monkeypatch):
    pytest.importorskip("pytriton")
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--dry-run", "--instances", "2", "--models", GENERATE.name])
    assert done.exit_code == 0 and "memory: 2 instance(s) × (hybridstitch " in done.output and "ready to serve" in done.output, done.output
    done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--dry-run", "--instances", "100000"])
    assert done.exit_code == 1 and "the server would not fit in memory on cpu" in done.output
    assert not started


def test_serve_dry_run_refuses_what_serve_refuses(tiny4_engine_dir, tmp_path, unwritable_folders):
    """--dry-run makes the checks writing the repository makes (and the memory check for every
    device it may run on): each of these passed --dry-run once and failed only the real serve."""
    foreign, readonly = unwritable_folders
    cases = [
        (["--device", "cpu:0", "--instances", "100"], "unknown device | got 'cpu:0' | expected cpu or cuda:N | Triton's CPU instances take no device index: pass --device cpu"),
        (["--repo", str(foreign)], f"--repo {foreign} holds other files | got ['notes.txt']"),
        (["--repo", str(readonly)], f"--repo {readonly} cannot be written | got no write permission on {readonly}"),
        (["--backend", "tensorrt"], f"engine folder {tiny4_engine_dir} holds onnxruntime engines | got --backend tensorrt | expected onnxruntime or torch"),
        (["--pipeline", "nonexist"], "--pipeline nonexist is not an SD3 pipeline folder | got no such folder"),
        (["--pipeline", str(tmp_path / "nowhere")], f"--pipeline {tmp_path / 'nowhere'} is not an SD3 pipeline folder | got no such folder"),  # the server runs here
        (["--pipeline", str(foreign)], f"--pipeline {foreign} is not an SD3 pipeline folder | got no model_index.json in it"),
        (["--max-batch-size", "4", "--max-queue", "2"], "--max-queue is below the batch size | got 2 < 4"),
        (["--models", "foo"], "--models: not a model this repository serves | got foo | expected hybridstitch | hybridstitch_latents"),
    ]
    for args, message in cases:
        done = CliRunner().invoke(main, ["serve", str(tiny4_engine_dir), "--dry-run", *args])
        assert done.exit_code == 1 and done.output.startswith(f"Error: {message}") and len(done.output.strip().splitlines()) == 1, (args, done.output)
    assert list(readonly.iterdir()) == [] and [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_sigterm_drains_in_flight_requests(server):
    """Last: stops the module's server. Requests in flight when SIGTERM arrives complete; the
    process exits 0; no tritonserver (or anything else of its session) is left. An idle
    keep-alive HTTP connection, open throughout, holds Triton's stop until its exit timeout, after
    which Triton exits 1: ``serve`` says so and still exits 0."""
    from hs_export.serve.client import HybridStitchClient

    def slow(i):
        with HybridStitchClient(server.url, timeout_s=120) as remote:
            remote.generate(PROMPTS[i], seed=i, steps=600, plan="large")  # ~2.5 s on tiny engines
            return time.monotonic()

    idle = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)
    idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n")
    assert idle.recv(100).startswith(b"HTTP/1.1 200")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(slow, i) for i in range(4)]
        time.sleep(1.0)
        assert not any(f.done() for f in futures), "requests finished before SIGTERM: make them slower"
        names = [name for _, name in session_processes(server.proc.pid)]
        assert "tritonserver" in names
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        finished = [f.result(timeout=120) for f in futures]
    assert max(finished) > signalled
    try:
        assert server.proc.wait(timeout=60) == 0, server.log_tail()
    finally:
        idle.close()
    assert server.stop() == []
    log = server.log_tail(20000)
    assert "SIGTERM: draining in-flight requests" in log and f"stopped at --exit-timeout-secs {EXIT_TIMEOUT_S}: Triton waits for every open HTTP connection" in log


def test_a_folder_built_before_refreshes_serves_the_plan_it_recorded():
    """Manifests written before ``refreshes`` existed ran their hybrid stage without refreshes."""
    old = {k: v for k, v in asdict(PlanConfig(large_fraction=0.3, hybrid_end=0.5, mask=MaskConfig(ratio=0.1))).items() if k != "refreshes"}
    assert _plan_config(old).refreshes == 0 and _plan_config(old).large_fraction == 0.3
    assert _plan_config(asdict(PlanConfig())) == PlanConfig()
