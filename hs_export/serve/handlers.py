"""The two models' inference callables: a dynamic batch of requests → one response per request.

A handler runs on one :class:`Instance` (one runtime: its own engines, and its own CUDA stream on
a GPU). It never raises for a bad request: PyTriton 0.7 would fail the whole dynamic batch and
send the traceback as the message. A bad row gets its one-line reason in the ``error`` output and
placeholder tensors; the other rows are served. Only a bug (an exception that is not a
:class:`HybridStitchError`) propagates, and then Triton fails the batch.

No PyTriton import here: handlers take any mapping of input name → array, so they are tested
without a server.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from hs_runtime.errors import HybridStitchError
from hs_runtime.runtime import HybridStitchRuntime
from hs_runtime.sampler import Conditioning

from .batching import GenerationRequest, LatentsRequest, Row, ServingDefaults, ServingLimits, group_calls, parse_generation, parse_latents, parse_rows
from .protocol import GENERATE, LATENTS, TIMING_KEYS, ServingError

LOGGER = logging.getLogger("hs_export.serve")


class SharedTextAndVae:
    """One copy of the text encoders + VAE for every instance (T5-XXL alone is ~10 GB in fp16),
    used by one thread at a time; the engines, which dominate the run, stay per instance."""

    def __init__(self, text_and_vae):
        self.inner = text_and_vae
        self.lock = threading.Lock()

    @property
    def vae_scale_factor(self) -> int:
        return self.inner.vae_scale_factor

    def encode(self, *args, **kwargs):
        with self.lock:
            return self.inner.encode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        with self.lock:
            return self.inner.decode(*args, **kwargs)


@dataclass
class Counters:
    """What the handlers of one server did, for logs and tests (Triton's metrics count requests
    and executions; these count the engine calls and their prompts)."""

    executions: int = 0
    rows: int = 0
    errors: int = 0
    denoise_calls: int = 0
    prompts: int = 0
    largest_call: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, rows: int, errors: int, calls: Sequence[int]) -> None:
        with self.lock:
            self.executions += 1
            self.rows += rows
            self.errors += errors
            self.denoise_calls += len(calls)
            self.prompts += sum(calls)
            self.largest_call = max([self.largest_call, *calls])


class Instance:
    """One model instance: a runtime used by one request at a time, on its own CUDA stream.

    The ``hybridstitch`` and ``hybridstitch_latents`` handlers of instance ``i`` share its runtime;
    the lock makes them take turns (waiting, not failing), so the runtime's single-request guard
    never trips.
    """

    def __init__(self, index: int, runtime: HybridStitchRuntime, text_and_vae: SharedTextAndVae | None, defaults: ServingDefaults, limits: ServingLimits, stream=None, profile: bool = True):
        self.index = index
        self.profile = profile  # stage timings synchronise the whole device: off for several GPU instances
        self.runtime = runtime
        self.text_and_vae = text_and_vae
        self.defaults = defaults
        self.limits = limits
        self.stream = stream
        self.lock = threading.Lock()

    @contextmanager
    def exclusive(self):
        with self.lock, (torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()):
            yield

    def max_prompts(self, guidance_scale: float) -> int | None:
        """Prompts one engine call takes with this guidance (``None``: no built limit)."""
        limits = self.runtime.prompt_range(guidance_scale > 1.0)
        return None if limits is None else limits[1]


class _Handler:
    spec = None

    def __init__(self, instance: Instance, counters: Counters | None = None):
        self.instance = instance
        self.counters = counters or Counters()

    def parse(self, inputs: Mapping, row: int):
        raise NotImplementedError

    def run(self, items: list) -> list[dict]:
        """One engine call for ``items`` (same settings); one output dict per item."""
        raise NotImplementedError

    def placeholder(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        start = time.perf_counter()
        rows = parse_rows(requests, self.parse)
        valid = [r for r in rows if not r.error]
        calls = group_calls(valid, key=self.group_key, max_prompts=lambda r: self.instance.max_prompts(r.parsed.settings.guidance_scale))
        outputs: dict[tuple[int, int], dict] = {}
        for call in calls:
            self._serve([valid[i] for i in call], outputs)
        responses = [self._response([r for r in rows if r.request == i], outputs) for i in range(len(requests))]
        errors = sum(1 for r in rows if r.error)
        self.counters.add(len(rows), errors, [len(c) for c in calls])
        LOGGER.debug(
            "%s instance %d: %d request(s), %d row(s) → %d engine call(s) of %s prompt(s), %d error(s), %.2f s",
            self.spec.name, self.instance.index, len(requests), len(rows), len(calls), [len(c) for c in calls], errors, time.perf_counter() - start,
        )
        return responses

    def _serve(self, members: list[Row], outputs: dict) -> None:
        """One engine call; if it fails with a toolkit error (one validation did not foresee, e.g.
        non-finite numbers), each member is retried alone so only the culprit gets the error."""
        try:
            results = self.run([m.parsed for m in members])
        except HybridStitchError as exc:
            if len(members) > 1:
                for m in members:
                    self._serve([m], outputs)
            else:
                members[0].error = str(exc)
            return
        for m, result in zip(members, results):
            outputs[(m.request, m.row)] = result

    def group_key(self, row: Row):
        return row.parsed.settings

    def _response(self, rows: list[Row], outputs: dict) -> dict[str, np.ndarray]:
        """Stacks one request's rows; refused rows get zeros shaped like the served ones."""
        served = [outputs[(r.request, r.row)] for r in rows if not r.error]
        template = served[0] if served else self.placeholder()
        for r in rows:
            if not r.error and any(outputs[(r.request, r.row)][k].shape != template[k].shape for k in template):
                r.error = "rows of one request must share height and width | send them as separate requests"
        stacked = {}
        for name, value in template.items():
            stacked[name] = np.stack([np.zeros_like(value) if r.error else outputs[(r.request, r.row)][name] for r in rows])
        stacked["error"] = np.array([[r.error.encode("utf-8")] for r in rows], dtype=np.object_)
        return stacked


class GenerateHandler(_Handler):
    """``hybridstitch``: prompts → images, grouped into multi-prompt ``denoise`` calls."""

    spec = GENERATE

    def parse(self, inputs, row) -> GenerationRequest:
        return parse_generation(inputs, row, self.instance.defaults, self.instance.limits)

    def placeholder(self) -> dict[str, np.ndarray]:
        return {"image": np.zeros((1, 1, 3), np.uint8), "mask": np.zeros((1, 1), np.uint8), "timings_s": np.zeros(len(TIMING_KEYS), np.float32)}

    def run(self, items: list[GenerationRequest]) -> list[dict]:
        instance = self.instance
        s = items[0].settings
        plan = s.make_plan(instance.defaults.plan_config)
        negatives = [i.negative_prompt or "" for i in items]
        grid_h, grid_w = s.height // instance.limits.vae_scale // instance.limits.patch, s.width // instance.limits.vae_scale // instance.limits.patch
        with instance.exclusive():  # everything that reads device tensors stays on this instance's stream
            start = time.perf_counter()
            pipe = instance.runtime.pipeline(s.guidance_scale, text_and_vae=instance.text_and_vae)
            images, result = pipe([i.prompt for i in items], plan, s.height, s.width, [i.seed for i in items], negatives if any(negatives) else None, profile=instance.profile)
            masks = result.masks[0].as_grid(grid_h, grid_w).to(torch.uint8).cpu().numpy() if result.masks else np.zeros((len(items), grid_h, grid_w), np.uint8)
            elapsed = time.perf_counter() - start
        times = result.times.as_dict() if instance.profile else {**dict.fromkeys(TIMING_KEYS, 0.0), "total": elapsed}
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

    def placeholder(self) -> dict[str, np.ndarray]:
        return {"latents": np.zeros((1, 1, 1), np.float32)}

    def run(self, items: list[LatentsRequest]) -> list[dict]:
        instance = self.instance
        s = items[0].settings
        plan = s.make_plan(instance.defaults.plan_config)
        stack = lambda name: None if getattr(items[0], name) is None else torch.from_numpy(np.stack([getattr(i, name) for i in items]))  # noqa: E731
        conditioning = Conditioning(stack("prompt_embeds"), stack("pooled_prompt_embeds"), stack("negative_prompt_embeds"), stack("negative_pooled_prompt_embeds"))
        with instance.exclusive():
            device = instance.runtime.engines.device
            result = instance.runtime.denoise(plan, stack("latents").to(device), conditioning, guidance_scale=s.guidance_scale)
            latents = result.latents.float().cpu().numpy()
        return [{"latents": np.ascontiguousarray(latents[j])} for j in range(len(items))]


def warm_up(instance: Instance) -> float:
    """Runs the default plan (at most 4 steps) on one prompt, and on a full batch where the build
    takes several batch sizes (``--dynamic-shape``), so every graph, shape, the text encoders and
    the VAE have run before the model reports ready. Returns the seconds it took."""
    start = time.perf_counter()
    d = instance.defaults.settings
    handler = GenerateHandler(instance)
    for steps in (min(4, d.steps), d.steps):
        request = {"prompt": np.array([[b"warm-up"]], dtype=np.object_), "seed": np.array([[0]], dtype=np.int64), "steps": np.array([[steps]], dtype=np.int64)}
        error = handler([request])[0]["error"][0, 0]
        if not error:
            break
    prompts = instance.runtime.prompt_range(d.guidance_scale > 1.0)
    if not error and prompts and prompts[0] < prompts[1]:
        error = handler([request] * prompts[1])[0]["error"][0, 0]
    if error:
        raise ServingError(f"warm-up of instance {instance.index} failed: {error.decode()}")
    return time.perf_counter() - start


def warm_up_latents(instance: Instance) -> float:
    """Warm-up for folders without text encoders: one ``hybridstitch_latents`` call on random
    embeddings and noise of the build's sizes."""
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
    error = LatentsHandler(instance)([request])[0]["error"][0, 0]
    if error:
        raise ServingError(f"warm-up of instance {instance.index} failed: {error.decode()}")
    return time.perf_counter() - start
