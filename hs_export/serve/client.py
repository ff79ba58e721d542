"""A KServe v2 client for a HybridStitch server (``tritonclient``, HTTP or gRPC).

Anything that speaks the KServe v2 protocol can call the server; this client adds the protocol's
one rule on top of it: a response whose ``error`` output is not empty is a failed request, raised
here as a one-line :class:`ServingError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from hs_runtime.errors import describe

from .protocol import GENERATE, LATENTS, TIMING_KEYS, ServingError, decode_text, infer_inputs


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
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname:
        raise ServingError(describe("unsupported server URL", got=repr(url), expected="http://HOST:PORT or grpc://HOST:PORT"))
    port = parsed.port or (8001 if parsed.scheme == "grpc" else 8000)
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
        self.timeout_s = timeout_s
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
            status, message = str(exc.status() or ""), (exc.message() or "").strip()
            if "unavailable" in status.lower() or "failed to connect" in message.lower() or "connection refused" in message.lower():
                raise self._unreachable(message) from None
            raise ServingError(describe(f"{what} failed on {self.url}", got=_first_line(message) or status)) from None
        except (OSError, ConnectionError) as exc:
            raise self._unreachable(str(exc) or type(exc).__name__) from None

    def _unreachable(self, reason: str) -> ServingError:
        return ServingError(describe(f"cannot reach a HybridStitch server at {self.url}", got=_first_line(reason), fix="start one with: hs-export serve ENGINE_DIR (and check --url)"))

    # ------------------------------------------------------------------ server state

    def ready(self, model: str = GENERATE.name) -> bool:
        """Whether ``model`` is loaded and warmed up (its ready endpoint; the server's own
        ``/v2/health/ready`` is true before any model is bound)."""
        try:
            return bool(self._client.is_model_ready(model))
        except Exception:  # not reachable yet: not ready
            return False

    def model_config(self, model: str = GENERATE.name) -> dict:
        config = self._call("reading the model config", self._client.get_model_config, model, **({"as_json": True} if self.protocol == "grpc" else {}))
        return config.get("config", config)

    def dynamic_batching(self, model: str = GENERATE.name) -> bool:
        """Whether Triton's dynamic batcher is on for ``model``."""
        return "dynamic_batching" in self.model_config(model)

    # ------------------------------------------------------------------ inference

    def infer(self, spec, values: dict) -> dict[str, np.ndarray]:
        """One request to ``spec``'s model; raises :class:`ServingError` on a non-empty ``error``."""
        inputs = infer_inputs(self._module, spec, {k: v for k, v in values.items() if v is not None})
        outputs = [self._module.InferRequestedOutput(name) for name in spec.output_names]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        response = self._call(f"{spec.name} request", self._client.infer, spec.name, inputs, outputs=outputs, **kwargs)
        result = {name: response.as_numpy(name) for name in spec.output_names}
        error = decode_text(result.get("error"))
        if error:
            raise ServingError(error)
        return result

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


def check_request_values(prompt, seed, steps, guidance_scale, mask_ratio, height, width) -> None:
    """Client-side checks of a ``hybridstitch`` request (the server repeats them)."""
    from hs_runtime.pipeline import check_image_size
    from hs_runtime.plans import MaskConfig
    from hs_runtime.validation import check_int, check_number, check_seed

    if not str(prompt).strip():
        raise ServingError(describe("empty prompt", fix="pass a non-empty --prompt"))
    check_seed(seed)
    if steps is not None:
        check_int("steps", steps)
    if guidance_scale is not None:
        check_number("guidance scale", guidance_scale, minimum=0.0)
    if mask_ratio is not None:
        MaskConfig(ratio=mask_ratio)
    check_image_size(height, width)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""
