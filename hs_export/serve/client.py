"""A KServe v2 client for a HybridStitch server (``tritonclient``, HTTP or gRPC).

Anything that speaks the KServe v2 protocol can call the server. A refused request is a KServe
error (HTTP 400 / gRPC ``INVALID_ARGUMENT`` for a bad value, 503 / ``UNAVAILABLE`` when the queue
is full); this client raises it as a one-line :class:`ServingError` carrying the server's own
message and status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from hs_runtime.errors import ConfigError, describe

from .protocol import GENERATE, LATENTS, SERVED_SEED_MAX, TIMING_KEYS, ServingError, infer_inputs


@dataclass
class GenerationResult:
    """One served image.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB.
        mask: ``[H/16, W/16]`` uint8, 1 where the large model refined the token (zeros for plans
            without a hybrid stage).
        timings: seconds per stage of the engine call that served the request (that call may
            have served other prompts too).
    """

    image: np.ndarray
    mask: np.ndarray
    timings: dict[str, float]

    def save(self, path: str | Path) -> Path:
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.image).save(path)
        return path


def split_url(url: str) -> tuple[str, str]:
    """``http://host:port`` / ``grpc://host:port`` / ``host:port`` → (protocol, ``host:port``)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    try:
        port = parsed.port
    except ValueError:  # not a number, or past 65535
        port = 0
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname or port == 0:
        raise ServingError(describe("unsupported server URL", got=repr(url), expected="http://HOST:PORT or grpc://HOST:PORT, PORT in 1..65535"))
    port = port or (8001 if parsed.scheme == "grpc" else 8000)
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return parsed.scheme, f"{host}:{port}"


class HybridStitchClient:
    """Talks to ``hs-export serve``.

    Args:
        url: ``http://HOST:PORT`` (default port 8000) or ``grpc://HOST:PORT`` (8001).
        timeout_s: how long one request may take, queueing included.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 600.0):
        self.url = url
        self.timeout_s = check_timeout(timeout_s)
        self.protocol, self.address = split_url(url)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as module

                self._client = module.InferenceServerClient(self.address)
            else:
                import tritonclient.http as module

                self._client = module.InferenceServerClient(self.address, connection_timeout=min(timeout_s, 10.0), network_timeout=timeout_s)
        except ImportError:
            raise ServingError(describe("the client needs tritonclient", fix="pip install 'hybridstitch[serve]'")) from None
        self._module = module

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HybridStitchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):
        """Runs one tritonclient call; connection and server errors become one line."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            status, message = str(exc.status() or ""), _REQUEST_ID.sub("", _first_line(exc.message() or "")).strip()
            if any(s in message.lower() for s in ("failed to connect", "connection refused", "connect failed")):
                raise self._unreachable(message) from None
            if "maximum queue size" in message.lower():  # UNAVAILABLE: refused at once, not queued
                raise ServingError(describe(f"{what} refused: the server's queue is full", got=message, fix="retry later, or serve with more --instances or a larger --max-queue"), status=status) from None
            if "deadline exceeded" in message.lower() or "timed out" in message.lower():
                raise self._timed_out(what, status) from None
            if "while decoding the response" in message:  # an error status whose body is not KServe's JSON
                raise self._not_triton(message) from None
            raise ServingError(message or describe(f"{what} failed on {self.url}", got=status), status=status) from None
        except TimeoutError:
            raise self._timed_out(what) from None
        except (OSError, ConnectionError) as exc:
            raise self._unreachable(str(exc) or type(exc).__name__) from None
        except ValueError as exc:  # a reply that is not JSON (tritonclient.http's rapidjson.JSONDecodeError)
            raise self._not_triton(f"{type(exc).__name__}: {_first_line(exc)}") from None

    def _not_triton(self, reason: str) -> ServingError:
        return ServingError(describe(f"{self.url} does not answer as a Triton (KServe v2) server", got=_first_line(reason), fix="check --url: the HTTP or gRPC port hs-export serve printed"))

    def _timed_out(self, what: str, status: str | None = None) -> ServingError:
        return ServingError(describe(f"{what} took longer than the client timeout", got=f"{self.timeout_s:g} s", fix="pass a longer --timeout, or ask for fewer steps"), status=status)

    def _unreachable(self, reason: str) -> ServingError:
        return ServingError(describe(f"cannot reach a HybridStitch server at {self.url}", got=_first_line(reason), fix="start one with: hs-export serve ENGINE_DIR (and check --url)"))

    # ------------------------------------------------------------------ server state

    def ready(self, model: str = GENERATE.name) -> bool:
        """Whether ``model`` is loaded and warmed up (its own ready endpoint: the server's
        ``/v2/health/ready`` speaks for all models, and for none on a server without them)."""
        try:
            return bool(self._client.is_model_ready(model, **self._grpc_timeout()))
        except Exception:  # not reachable yet: not ready
            return False

    def model_config(self, model: str = GENERATE.name) -> dict:
        config = self._call("reading the model config", self._client.get_model_config, model, **({"as_json": True, **self._grpc_timeout()} if self.protocol == "grpc" else {}))
        return config.get("config", config)

    def _grpc_timeout(self) -> dict:
        """gRPC calls wait as long as their own ``client_timeout`` (none: gRPC's 20 s connect
        attempt, or for ever on a stalled server); HTTP clients take the timeout at construction."""
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def dynamic_batching(self, model: str = GENERATE.name) -> bool:
        """Whether Triton's dynamic batcher is on for ``model``."""
        return "dynamic_batching" in self.model_config(model)

    # ------------------------------------------------------------------ inference

    def infer(self, spec, values: dict) -> dict[str, np.ndarray]:
        """One request to ``spec``'s model.

        Raises:
            ServingError: the server refused it (its one-line reason; ``status`` is the HTTP
                status or gRPC code), or cannot be reached.
        """
        inputs = infer_inputs(self._module, spec, {k: v for k, v in values.items() if v is not None})
        outputs = [self._module.InferRequestedOutput(name) for name in spec.output_names]
        response = self._call(f"{spec.name} request", self._client.infer, spec.name, inputs, outputs=outputs, **self._grpc_timeout())
        return {name: response.as_numpy(name) for name in spec.output_names}

    def generate(self, prompt: str, seed: int = 0, negative_prompt: str | None = None, plan: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, mask_ratio: float | None = None, height: int | None = None, width: int | None = None) -> GenerationResult:
        """One prompt → one image. Options left ``None`` take the engine folder's defaults.

        Values that need no server (seed range, steps, guidance, ratio, size multiples) are checked
        here first, so a bad one never costs a round trip; the rest the server checks."""
        check_request_values(prompt, seed, steps, guidance_scale, mask_ratio, height, width)
        values = dict(prompt=prompt, seed=seed, negative_prompt=negative_prompt, plan=plan, steps=steps, guidance_scale=guidance_scale, mask_ratio=mask_ratio, height=height, width=width)
        result = self.infer(GENERATE, values)
        timings = dict(zip(TIMING_KEYS, (float(t) for t in result["timings_s"].reshape(-1))))
        return GenerationResult(result["image"][0], result["mask"][0], timings)

    def denoise(self, prompt_embeds: np.ndarray, pooled_prompt_embeds: np.ndarray, latents: np.ndarray, negative_prompt_embeds: np.ndarray | None = None,
                negative_pooled_prompt_embeds: np.ndarray | None = None, plan: str | None = None, steps: int | None = None,
                guidance_scale: float | None = None, mask_ratio: float | None = None) -> np.ndarray:
        """``hybridstitch_latents``: embeddings ``[T, J]``, ``[J']`` and noise ``[C, h, w]`` → latents ``[C, h, w]``."""
        values = dict(
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, latents=latents, plan=plan, steps=steps, guidance_scale=guidance_scale, mask_ratio=mask_ratio,
        )
        return self.infer(LATENTS, values)["latents"][0]


def check_timeout(timeout_s) -> float:
    """A client timeout: a finite number of seconds above 0."""
    from hs_runtime.validation import check_number

    if check_number("--timeout", timeout_s) <= 0:
        raise ConfigError(describe("--timeout must be > 0", got=timeout_s, expected="seconds one request may take, queueing included"))
    return float(timeout_s)


def check_request_values(prompt, seed, steps, guidance_scale, mask_ratio, height, width) -> None:
    """Client-side checks of a ``hybridstitch`` request (the server repeats them)."""
    from hs_runtime.pipeline import check_image_size
    from hs_runtime.plans import MaskConfig
    from hs_runtime.validation import check_int, check_number, check_seed

    if not str(prompt).strip():
        raise ServingError(describe("empty prompt", fix="pass a non-empty --prompt"))
    if check_seed(seed) > SERVED_SEED_MAX:
        raise ConfigError(describe("seed out of range", got=seed, expected=f"an integer in 0..{SERVED_SEED_MAX} (2**63 - 1: the served seed input is INT64)"))
    if steps is not None:
        check_int("steps", steps)
    if guidance_scale is not None:
        check_number("guidance scale", guidance_scale, minimum=0.0)
    if mask_ratio is not None:
        MaskConfig(ratio=mask_ratio)
    check_image_size(height, width)


_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""
