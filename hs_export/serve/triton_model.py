"""The Triton Python-backend model behind ``hybridstitch`` and ``hybridstitch_latents``.

Each model folder's ``1/model.py`` (written by ``hs-export triton-repo``) imports
:class:`TritonPythonModel` from here, so this is where Triton meets the handlers: ``initialize``
loads one runtime and warms it up (the model is ready only when it can serve), ``execute`` maps
requests to responses one for one with per-request errors, ``finalize`` frees. The settings are
the model's ``config.pbtxt`` parameters. ``triton_python_backend_utils`` exists only inside
Triton's Python stub, so it is imported in ``initialize``.

Custom metrics (``pb_utils.MetricFamily``), scraped from Triton's metrics port beside its own:

- ``hybridstitch_stage_seconds_total{model, stage}``: seconds per stage (large, mask, hybrid,
  small, text_encoding, vae_decode);
- ``hybridstitch_images_total{model, plan}``: prompts served (images, or latents);
- ``hybridstitch_mask_tokens_total{model, plan}``: tokens the large model refined;
- ``hybridstitch_engine_calls_total{model, plan}``: ``denoise`` calls (images ÷ calls = prompts
  per call);
- ``hybridstitch_refused_total{model, code}``: requests failed, by Triton error code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from hs_runtime.backends.base import precision_name
from hs_runtime.errors import describe, first_line

from .handlers import CANCELLED, HANDLERS, INTERNAL, INVALID_ARG, LOGGER, METRIC_STAGES, Instance, Response, ServeStats, warm_up, warm_up_latents
from .protocol import GENERATE, ServingError

#: Environment variable the models' processes read for their log level (``DEBUG`` logs every batch).
LOG_LEVEL_ENV = "HYBRIDSTITCH_LOG_LEVEL"

_FAMILIES = {
    "stage_seconds": ("hybridstitch_stage_seconds_total", "Seconds spent per stage of the served engine calls"),
    "images": ("hybridstitch_images_total", "Prompts served (images, or latents for hybridstitch_latents), per plan"),
    "mask_tokens": ("hybridstitch_mask_tokens_total", "Image tokens the large model refined (complex tokens per image, summed over masks), per plan"),
    "engine_calls": ("hybridstitch_engine_calls_total", "denoise calls (one per group of requests sharing plan, steps and size), per plan"),
    "refused": ("hybridstitch_refused_total", "Requests failed with a per-request error, by Triton error code"),
}


class TritonMetrics(ServeStats):
    """:class:`ServeStats` that also counts every update in Triton's custom metrics."""

    def __init__(self, pb_utils, model: str):
        super().__init__()
        self.model = model
        # Instances of one model (separate processes) share these families and labels: Triton
        # sums them into one series per label set.
        self._families = {k: pb_utils.MetricFamily(name=name, description=doc, kind=pb_utils.MetricFamily.COUNTER) for k, (name, doc) in _FAMILIES.items()}
        self._metrics: dict[tuple[str, str, str], object] = {}
        for stage in METRIC_STAGES:
            self._metric("stage_seconds", "stage", stage)  # present (at 0) from the start

    def _metric(self, family: str, label: str, value: str):
        key = (family, label, value)
        if key not in self._metrics:
            self._metrics[key] = self._families[family].Metric(labels={"model": self.model, label: value})
        return self._metrics[key]

    def execution(self, requests, refused) -> None:
        super().execution(requests, refused)
        for code, n in refused.items():
            self._metric("refused", "code", code).increment(n)

    def engine_call(self, plan, prompts, stage_seconds, mask_tokens) -> None:
        super().engine_call(plan, prompts, stage_seconds, mask_tokens)
        for stage, seconds in stage_seconds.items():
            self._metric("stage_seconds", "stage", stage).increment(float(seconds))
        self._metric("images", "plan", plan).increment(prompts)
        self._metric("mask_tokens", "plan", plan).increment(mask_tokens)
        self._metric("engine_calls", "plan", plan).increment(1)

    def close(self) -> None:
        self._metrics.clear()  # metrics before their families, as the Python backend asks
        self._families.clear()


def model_parameters(model_config: dict, repository: Path) -> dict[str, str | Path | None]:
    """The ``parameters`` of a ``config.pbtxt`` written by ``triton-repo``; a relative engine
    folder is resolved against the repository root."""
    params = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
    engine_dir = Path(params.get("engine_dir", ""))
    if not params.get("engine_dir"):
        raise ServingError(describe(f"model {model_config.get('name')} has no engine_dir parameter", fix="write the repository with: hs-export triton-repo ENGINE_DIR --out REPO"))
    return {
        "engine_dir": engine_dir if engine_dir.is_absolute() else repository / engine_dir,
        "backend": params.get("backend") or None,
        "pipeline": params.get("pipeline") or None,
        "text_dtype": params.get("text_dtype") or None,
    }


def _log_to_stderr() -> None:
    """The stub's stderr ends up in Triton's log: the toolkit's messages and tracebacks go there."""
    if not any(getattr(h, "_hybridstitch", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        handler._hybridstitch = True
        LOGGER.addHandler(handler)
        LOGGER.setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())
        LOGGER.propagate = False


class TritonPythonModel:
    """One instance of ``hybridstitch`` or ``hybridstitch_latents`` in Triton's Python backend."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        _log_to_stderr()
        self._pb = pb_utils
        config = json.loads(args["model_config"])
        name = args["model_name"]
        model_dir = Path(args["model_repository"])
        params = model_parameters(config, model_dir.parent)
        device = f"cuda:{args['model_instance_device_id']}" if args.get("model_instance_kind") == "GPU" else "cpu"
        start = time.perf_counter()
        instance = Instance.load(args.get("model_instance_name", name), params["engine_dir"], device, params["backend"], params["pipeline"], with_text=name == GENERATE.name, text_dtype=params["text_dtype"])
        loaded = time.perf_counter() - start
        warm = (warm_up if name == GENERATE.name else warm_up_latents)(instance)
        self.handler = HANDLERS[name](instance, TritonMetrics(pb_utils, name))
        self._codes = {INVALID_ARG: pb_utils.TritonError.INVALID_ARG, CANCELLED: pb_utils.TritonError.CANCELLED, INTERNAL: pb_utils.TritonError.INTERNAL}
        self._outputs = [o["name"] for o in config.get("output", [])]
        text = f", text encoders + VAE in {precision_name(instance.runtime.text_dtype)}" if instance.text_and_vae is not None else ""
        LOGGER.info("%s: engines loaded in %.1f s, warmed up in %.1f s (%s on %s%s)", instance.name, loaded, warm, instance.runtime.engines.backend, instance.runtime.engines.device, text)

    def execute(self, requests: list) -> list:
        pb = self._pb
        try:
            inputs = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
            responses = self.handler(inputs, cancelled=[request.is_cancelled for request in requests])
        except Exception as exc:  # a bug outside any one engine call: every request of this batch
            LOGGER.exception("%s: execute failed for %d request(s)", self.handler.instance.name, len(requests))
            message = describe(f"internal error in {self.handler.spec.name}", got=f"{type(exc).__name__}: {first_line(exc)}", fix="see the server log for the traceback")
            responses = [Response.failed(message, INTERNAL)] * len(requests)
        return [
            pb.InferenceResponse(error=pb.TritonError(r.error, self._codes[r.code])) if r.error
            else pb.InferenceResponse(output_tensors=[pb.Tensor(name, r.outputs[name]) for name in self._outputs])
            for r in responses
        ]

    def finalize(self) -> None:
        if getattr(self, "handler", None) is None:  # initialize failed
            return
        stats = self.handler.stats
        LOGGER.info("%s: stopped after %d execution(s), %d request(s), %d engine call(s), refused %s", self.handler.instance.name, stats.executions, stats.requests, stats.denoise_calls, stats.refused or "none")
        stats.close()
        self.handler = None
