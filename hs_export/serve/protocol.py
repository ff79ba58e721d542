"""The served models' inputs and outputs, defined once (like ``hs_runtime.contract`` for engines).

The model repository's ``config.pbtxt`` files, the client and the serving benchmark are all made
from these specs. Every tensor is per request: Triton prepends the batch axis, so a client sends
``[1, 1]`` for a one-element input (``[1, *shape]`` in general).

Errors are KServe errors, one per request: a bad value fails its request alone with
``INVALID_ARG`` (HTTP 400) and the toolkit's one-line reason, while the requests batched with it
are served. Malformed requests (wrong dtype, wrong rank) are refused by Triton itself, per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hs_runtime.errors import HybridStitchError, describe
from hs_runtime.sampler import STAGES

GENERATE_MODEL = "hybridstitch"
LATENTS_MODEL = "hybridstitch_latents"

#: The largest seed a request can carry: the ``seed`` input is INT64.
SERVED_SEED_MAX = 2**63 - 1

#: Order of the ``timings_s`` output: graph seconds per stage, then overhead and the total.
TIMING_KEYS = (*STAGES, "overhead", "total")

_TRITON_DTYPES = {np.bytes_: "BYTES", np.int64: "INT64", np.float32: "FP32", np.uint8: "UINT8"}


class ServingError(HybridStitchError):
    """A served request failed, the server cannot start, or a client cannot reach a server.

    Attributes:
        status: for a refused request, the server's status (HTTP status such as ``400``/``503``,
            or the gRPC code); ``None`` otherwise.
    """

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a served model.

    Attributes:
        shape: per-request shape, without Triton's batch axis (``-1``: any size).
        optional: inputs only; a missing optional input takes the engine folder's default.
    """

    name: str
    dtype: type
    shape: tuple[int, ...]
    optional: bool = False
    doc: str = ""

    @property
    def triton_dtype(self) -> str:
        return _TRITON_DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]

    def input(self, name: str) -> IOSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _one(name, dtype, optional=False, doc=""):
    return IOSpec(name, dtype, (1,), optional, doc)


# Per-request settings shared by both models; defaults come from the engine folder's manifest.
_PLAN_INPUTS = (
    _one("plan", np.bytes_, True, "large | small | tstitch | srdiff | hybrid (default: the folder's default plan)"),
    _one("steps", np.int64, True, "denoising steps (default: the folder's default plan's)"),
    _one("guidance_scale", np.float32, True, "CFG scale; <= 1 turns guidance off (default: the folder's)"),
    _one("mask_ratio", np.float32, True, "share of complex tokens, in (0, 1] (default: the build's)"),
)

GENERATE = ModelSpec(
    GENERATE_MODEL,
    inputs=(
        _one("prompt", np.bytes_, doc="UTF-8 prompt, not empty"),
        _one("negative_prompt", np.bytes_, True, "UTF-8 negative prompt (default: empty)"),
        _one("seed", np.int64, doc="seed of this prompt's initial noise (its own generator)"),
        *_PLAN_INPUTS,
        _one("height", np.int64, True, "pixels, a multiple of 16 within the built profiles (default: the build's)"),
        _one("width", np.int64, True, "pixels (default: the build's)"),
    ),
    outputs=(
        IOSpec("image", np.uint8, (-1, -1, 3), doc="RGB image [H, W, 3]"),
        IOSpec("mask", np.uint8, (-1, -1), doc="complex-token grid [H/16, W/16], 1 = refined by the large model; zeros for plans without one"),
        IOSpec("timings_s", np.float32, (len(TIMING_KEYS),), doc="seconds per stage of the engine call that served the request: " + ", ".join(TIMING_KEYS) + ""),
    ),
)

LATENTS = ModelSpec(
    LATENTS_MODEL,
    inputs=(
        IOSpec("prompt_embeds", np.float32, (-1, -1), doc="[T_txt, joint_dim] prompt embeddings"),
        IOSpec("pooled_prompt_embeds", np.float32, (-1,), doc="[pooled_dim]"),
        IOSpec("negative_prompt_embeds", np.float32, (-1, -1), True, "[T_txt, joint_dim]; needed when guidance_scale > 1"),
        IOSpec("negative_pooled_prompt_embeds", np.float32, (-1,), True, "[pooled_dim]; needed when guidance_scale > 1"),
        IOSpec("latents", np.float32, (-1, -1, -1), doc="initial noise [C, H/8, W/8]"),
        *_PLAN_INPUTS,
    ),
    outputs=(
        IOSpec("latents", np.float32, (-1, -1, -1), doc="denoised latents [C, H/8, W/8]"),
    ),
)

MODELS = {spec.name: spec for spec in (GENERATE, LATENTS)}


def as_array(spec: IOSpec, value) -> np.ndarray:
    """One request's value → the ``[1, *shape]`` array a client sends for ``spec``."""
    if spec.dtype is np.bytes_:
        try:  # click hands on undecodable argv bytes as lone surrogates, which UTF-8 cannot hold
            text = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        except UnicodeEncodeError:
            raise ServingError(describe(f"input {spec.name} is not UTF-8 text", got=ascii(value)[:60], fix="pass the text in UTF-8")) from None
        return np.array([[text]], dtype=np.object_)
    try:
        array = np.asarray(value, dtype=spec.dtype)
    except OverflowError:
        raise ServingError(describe(f"input {spec.name} out of range", got=value, expected=f"a value {spec.triton_dtype} holds")) from None
    if spec.shape == (1,):
        array = array.reshape(1)
    return array[np.newaxis]


def infer_inputs(client_module, spec: ModelSpec, values: dict) -> list:
    """``tritonclient.http`` or ``.grpc`` ``InferInput`` objects for the given (non-``None``) values."""
    unknown = sorted(set(values) - set(spec.input_names))
    if unknown:
        raise ServingError(f"unknown input(s) {unknown} for model {spec.name} | expected some of {list(spec.input_names)}")
    inputs = []
    for io in spec.inputs:
        value = values.get(io.name)
        if value is None:
            continue
        array = as_array(io, value)
        item = client_module.InferInput(io.name, list(array.shape), io.triton_dtype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs

