"""The two models' request handlers: a dynamic batch of requests → one :class:`Response` each.

A handler runs on one :class:`Instance` (one runtime: its own engines, and its own CUDA stream on
a GPU); in Triton that is one Python-backend process, which ``hs_export.serve.triton_model`` turns
into a thin skin over these handlers. Every request gets its own outcome:

- served: its output tensors;
- ``INVALID_ARG``: a bad value (the toolkit's one-line reason); the rest of the batch is served;
- ``CANCELLED``: its client went away: before it was served (it never reaches an engine), or
  while it was (an engine call whose requests are all cancelled stops at the next step);
- ``INTERNAL``: a server bug in the engine call it took part in: a one-line message, the
  traceback in the server log; requests in other engine calls are unaffected. Also a request
  that runs out of memory even alone (an engine call out of memory is retried request by
  request first, as any toolkit error is).

No Triton import here: handlers take any mapping of input name → array, so they are tested
without a server.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from hs_runtime.errors import CancelledError, EngineRunError, HybridStitchError, OutOfMemoryError, describe, first_line
from hs_runtime.mask import refined_grid
from hs_runtime.runtime import HybridStitchRuntime
from hs_runtime.sampler import STAGES, Conditioning

from .batching import GenerationRequest, LatentsRequest, Row, ServingDefaults, ServingLimits, group_calls, parse_generation, parse_latents, parse_rows
from .protocol import GENERATE, LATENTS, TIMING_KEYS, ServingError

LOGGER = logging.getLogger("hs_export.serve")

INVALID_ARG, CANCELLED, INTERNAL = "INVALID_ARG", "CANCELLED", "INTERNAL"

#: Stages the served-seconds metric is split into: the denoising stages, then the pipeline's own.
METRIC_STAGES = (*STAGES, "text_encoding", "vae_decode")


@dataclass
class Response:
    """One request's outcome: ``outputs`` (name → ``[rows, *shape]`` array), or ``error`` with its
    Triton error ``code``."""

    outputs: dict[str, np.ndarray] | None = None
    error: str = ""
    code: str = ""

    @classmethod
    def failed(cls, error: str, code: str = INVALID_ARG) -> "Response":
        return cls(None, error, code)


class ServeStats:
    """What the handlers of one instance did: the in-process record behind the served metrics
    (``triton_model.TritonMetrics`` also exports every update to Triton's metrics port).

    Triton's own metrics count requests and executions; these count what they became: engine
    calls, their prompts, seconds per stage, images per plan, mask tokens and refusals by code.
    """

    def __init__(self):
        self.executions = 0
        self.requests = 0
        self.refused: dict[str, int] = {}
        self.denoise_calls = 0
        self.prompts = 0
        self.largest_call = 0
        self.stage_seconds = dict.fromkeys(METRIC_STAGES, 0.0)
        self.images: dict[str, int] = {}
        self.mask_tokens: dict[str, int] = {}

    def execution(self, requests: int, refused: Mapping[str, int]) -> None:
        """One Triton execution of ``requests`` requests, ``refused`` of them by error code."""
        self.executions += 1
        self.requests += requests
        for code, n in refused.items():
            self.refused[code] = self.refused.get(code, 0) + n

    def engine_call(self, plan: str, prompts: int, stage_seconds: Mapping[str, float], mask_tokens: int) -> None:
        """One ``denoise`` call that served ``prompts`` prompts with ``plan``."""
        self.denoise_calls += 1
        self.prompts += prompts
        self.largest_call = max(self.largest_call, prompts)
        for stage, seconds in stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.images[plan] = self.images.get(plan, 0) + prompts
        self.mask_tokens[plan] = self.mask_tokens.get(plan, 0) + mask_tokens


class TimedTextAndVae:
    """Text encoders + VAE that add up the seconds spent encoding prompts and decoding latents."""

    def __init__(self, inner, device: torch.device):
        self.inner = inner
        self.device = torch.device(device)
        self.seconds = {"text_encoding": 0.0, "vae_decode": 0.0}

    @property
    def vae_scale_factor(self) -> int:
        return self.inner.vae_scale_factor

    @property
    def shift(self) -> float:
        return self.inner.shift

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the encoders and the VAE run asynchronously on a GPU
            self.seconds[stage] += time.perf_counter() - start

    def encode(self, *args, **kwargs):
        with self._timed("text_encoding"):
            return self.inner.encode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        with self._timed("vae_decode"):
            return self.inner.decode(*args, **kwargs)

    def take(self) -> dict[str, float]:
        """The seconds since the last ``take``."""
        seconds, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return seconds


class Instance:
    """One model instance: a runtime used by one request at a time, on its own CUDA stream."""

    def __init__(self, name: str, runtime: HybridStitchRuntime, text_and_vae, defaults: ServingDefaults, limits: ServingLimits, stream=None):
        self.name = name  # for logs, e.g. Triton's instance name hybridstitch_0_1
        self.runtime = runtime
        self.text_and_vae = None if text_and_vae is None else TimedTextAndVae(text_and_vae, runtime.engines.device)
        self.defaults = defaults
        self.limits = limits
        self.stream = stream

    @classmethod
    def load(cls, name: str, engine_dir, device: str = "cpu", backend: str | None = None, pipeline: str | None = None, with_text: bool = True, text_dtype: str | None = None) -> "Instance":
        """Loads the runtime (and, ``with_text``, the text encoders + VAE in ``text_dtype``) of one instance."""
        device = torch.device(device)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():  # TensorRT engines bind the current stream
            runtime = HybridStitchRuntime.from_dir(engine_dir, backend=backend, device=str(device), pipeline_source=pipeline or None, text_dtype=text_dtype)
            text_and_vae = runtime.text_and_vae() if with_text else None
        m = runtime.manifest
        return cls(name, runtime, text_and_vae, ServingDefaults.from_manifest(m), ServingLimits.from_manifest(m), stream)

    def device_context(self):
        """Everything that reads device tensors stays on this instance's stream."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def max_prompts(self, guidance_scale: float) -> int | None:
        """Prompts one engine call takes with this guidance (``None``: no built limit)."""
        limits = self.runtime.prompt_range(guidance_scale > 1.0)
        return None if limits is None else limits[1]


class _Handler:
    spec = None

    def __init__(self, instance: Instance, stats: ServeStats | None = None):
        self.instance = instance
        self.stats = stats or ServeStats()

    def parse(self, inputs: Mapping, row: int):
        raise NotImplementedError

    def run(self, items: list, should_stop: Callable[[], bool] | None) -> list[dict]:
        """One engine call for ``items`` (same settings); one output dict per item. The runtime
        calls ``should_stop`` before each step and raises ``CancelledError`` when it is true."""
        raise NotImplementedError

    def group_key(self, row: Row):
        return row.parsed.settings

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]], cancelled: Sequence[Callable[[], bool]] | None = None) -> list[Response]:
        """One dynamic batch → one :class:`Response` per request, in order.

        Args:
            requests: input name → ``[rows, *shape]`` array, per request.
            cancelled: per request, a callable that says whether its client has gone.
        """
        start = time.perf_counter()
        is_cancelled = (lambda i: bool(cancelled[i]())) if cancelled is not None else (lambda i: False)  # noqa: E731
        responses: list[Response | None] = [None] * len(requests)
        rows = parse_rows(requests, self.parse)
        for r in rows:  # a request is refused as a whole, for its first bad row
            if r.error and responses[r.request] is None:
                rows_of_request = sum(1 for x in rows if x.request == r.request)
                responses[r.request] = Response.failed(r.error if rows_of_request == 1 else f"row {r.row} of {rows_of_request}: {r.error}")
        for i in range(len(requests)):
            if responses[i] is None and is_cancelled(i):
                responses[i] = Response.failed("cancelled by the client before it was served", CANCELLED)
        for i in range(len(requests)):
            sizes = {(r.parsed.settings.height, r.parsed.settings.width) for r in rows if r.request == i and not r.error}
            if responses[i] is None and len(sizes) > 1:
                responses[i] = Response.failed(describe("rows of one request must share height and width", got=sorted(sizes), fix="send them as separate requests"))
        valid = [r for r in rows if responses[r.request] is None]
        calls = group_calls(valid, key=self.group_key, max_prompts=lambda r: self.instance.max_prompts(r.parsed.settings.guidance_scale))
        outputs: dict[tuple[int, int], dict] = {}
        for call in calls:
            members = [valid[i] for i in call]
            for m in members:  # cancelled while an earlier engine call of this batch ran
                if responses[m.request] is None and is_cancelled(m.request):
                    responses[m.request] = Response.failed("cancelled by the client before it was served", CANCELLED)
            members = [m for m in members if responses[m.request] is None]
            if members:
                self._serve(members, outputs, responses, is_cancelled)
        for i in range(len(requests)):
            if responses[i] is None:
                mine = [r for r in rows if r.request == i]
                responses[i] = Response({name: np.stack([outputs[(r.request, r.row)][name] for r in mine]) for name in outputs[(mine[0].request, mine[0].row)]})
        refused: dict[str, int] = {}
        for response in responses:
            if response.error:
                refused[response.code] = refused.get(response.code, 0) + 1
        self.stats.execution(len(requests), refused)
        LOGGER.debug(
            "%s: %d request(s) → %d engine call(s) of %s prompt(s), refused %s, %.2f s",
            self.instance.name, len(requests), len(calls), [len(c) for c in calls], refused, time.perf_counter() - start,
        )
        return responses

    def _serve(self, members: list[Row], outputs: dict, responses: list, is_cancelled: Callable[[int], bool]) -> None:
        """One engine call, stopped at the next step once all its requests are cancelled. A
        toolkit error that validation did not foresee (e.g. non-finite numbers) is retried member
        by member, so only the culprit gets it; a bug fails the members of this call alone."""
        requests = {m.request for m in members}
        try:
            results = self.run([m.parsed for m in members], lambda: all(is_cancelled(i) for i in requests))
        except CancelledError:
            for i in requests:
                responses[i] = Response.failed("cancelled by the client while it was served", CANCELLED)
            return
        except HybridStitchError as exc:
            if len(members) > 1:
                for m in members:
                    if responses[m.request] is None:
                        self._serve([m], outputs, responses, is_cancelled)
            else:  # out of memory or an engine library's failure even alone: the server's, not the request's values
                responses[members[0].request] = Response.failed(str(exc), INTERNAL if isinstance(exc, (OutOfMemoryError, EngineRunError)) else INVALID_ARG)
            return
        except Exception as exc:  # a bug: the traceback goes to the server log, one line to the client
            LOGGER.exception("%s: engine call for %d request(s) failed", self.instance.name, len(requests))
            message = describe(f"internal error in {self.spec.name}", got=f"{type(exc).__name__}: {first_line(exc)}", fix="see the server log for the traceback")
            for i in requests:
                responses[i] = Response.failed(message, INTERNAL)
            return
        for m, result in zip(members, results):
            outputs[(m.request, m.row)] = result


def _mask_tokens(result) -> int:
    """Tokens the large model refined, per image, summed over the masks of one engine call."""
    return int(sum(m.complex_idx.numel() for m in result.masks))


class GenerateHandler(_Handler):
    """``hybridstitch``: prompts → images, grouped into multi-prompt ``denoise`` calls."""

    spec = GENERATE

    def parse(self, inputs, row) -> GenerationRequest:
        return parse_generation(inputs, row, self.instance.defaults, self.instance.limits)

    def run(self, items: list[GenerationRequest], should_stop=None) -> list[dict]:
        instance = self.instance
        s = items[0].settings
        plan = s.make_plan(instance.defaults.plan_config)
        negatives = [i.negative_prompt or "" for i in items]
        grid_h, grid_w = s.height // instance.limits.vae_scale // instance.limits.patch, s.width // instance.limits.vae_scale // instance.limits.patch
        instance.text_and_vae.take()
        with instance.device_context():
            pipe = instance.runtime.pipeline(s.guidance_scale, text_and_vae=instance.text_and_vae)
            images, result = pipe([i.prompt for i in items], plan, s.height, s.width, [i.seed for i in items], negatives if any(negatives) else None, profile=True, should_stop=should_stop)
            masks = refined_grid(result.masks, grid_h, grid_w).to(torch.uint8).cpu().numpy() if result.masks else np.zeros((len(items), grid_h, grid_w), np.uint8)
        times = result.times.as_dict()
        self.stats.engine_call(s.plan, len(items), {**{k: times[k] for k in STAGES}, **instance.text_and_vae.take()}, _mask_tokens(result))
        timings = np.array([times[k] for k in TIMING_KEYS], dtype=np.float32)
        return [
            {"image": np.asarray(image.convert("RGB"), dtype=np.uint8), "mask": np.ascontiguousarray(masks[j]), "timings_s": timings}
            for j, image in enumerate(images)
        ]


class LatentsHandler(_Handler):
    """``hybridstitch_latents``: prompt embeddings + noise → latents (the denoise step alone)."""

    spec = LATENTS

    def parse(self, inputs, row) -> LatentsRequest:
        return parse_latents(inputs, row, self.instance.defaults, self.instance.limits)

    def group_key(self, row: Row):
        return row.parsed.group_key

    def run(self, items: list[LatentsRequest], should_stop=None) -> list[dict]:
        instance = self.instance
        s = items[0].settings
        plan = s.make_plan(instance.defaults.plan_config)
        stack = lambda name: None if getattr(items[0], name) is None else torch.from_numpy(np.stack([getattr(i, name) for i in items]))  # noqa: E731
        conditioning = Conditioning(stack("prompt_embeds"), stack("pooled_prompt_embeds"), stack("negative_prompt_embeds"), stack("negative_pooled_prompt_embeds"))
        with instance.device_context():
            device = instance.runtime.engines.device
            result = instance.runtime.denoise(plan, stack("latents").to(device), conditioning, guidance_scale=s.guidance_scale, profile=True, should_stop=should_stop)
            latents = result.latents.float().cpu().numpy()
        times = result.times.as_dict()
        self.stats.engine_call(s.plan, len(items), {k: times[k] for k in STAGES}, _mask_tokens(result))
        return [{"latents": np.ascontiguousarray(latents[j])} for j in range(len(items))]


HANDLERS = {GENERATE.name: GenerateHandler, LATENTS.name: LatentsHandler}


def _check_warm(response: Response, instance: Instance) -> None:
    if response.error:
        raise ServingError(f"warm-up of {instance.name} on {instance.runtime.manifest.folder} failed: {response.error}")


def warm_up(instance: Instance) -> float:
    """Runs the default plan (at most 4 steps) on one prompt, and on a full batch where the build
    takes several batch sizes (``--dynamic-shape``), so every graph, shape, the text encoders and
    the VAE have run before the model reports ready. Returns the seconds it took."""
    start = time.perf_counter()
    d = instance.defaults.settings
    handler = GenerateHandler(instance)
    for steps in (min(4, d.steps), d.steps):
        request = {"prompt": np.array([[b"warm-up"]], dtype=np.object_), "seed": np.array([[0]], dtype=np.int64), "steps": np.array([[steps]], dtype=np.int64)}
        response = handler([request])[0]
        if not response.error:
            break
    _check_warm(response, instance)
    prompts = instance.runtime.prompt_range(d.guidance_scale > 1.0)
    if prompts and prompts[0] < prompts[1]:
        _check_warm(handler([request] * prompts[1])[0], instance)
    return time.perf_counter() - start


def warm_up_latents(instance: Instance) -> float:
    """Warm-up for ``hybridstitch_latents``: one call on random embeddings and noise of the
    build's sizes."""
    start = time.perf_counter()
    l, d = instance.limits, instance.defaults.settings
    rng = np.random.default_rng(0)
    h, w = d.height // l.vae_scale, d.width // l.vae_scale
    request = {
        "prompt_embeds": rng.standard_normal((1, l.text_tokens, l.joint_dim), dtype=np.float32),
        "pooled_prompt_embeds": rng.standard_normal((1, l.pooled_dim), dtype=np.float32),
        "negative_prompt_embeds": rng.standard_normal((1, l.text_tokens, l.joint_dim), dtype=np.float32),
        "negative_pooled_prompt_embeds": rng.standard_normal((1, l.pooled_dim), dtype=np.float32),
        "latents": rng.standard_normal((1, l.channels, h, w), dtype=np.float32),
        "steps": np.array([[min(4, d.steps)]], dtype=np.int64),
    }
    _check_warm(LatentsHandler(instance)([request])[0], instance)
    return time.perf_counter() - start
