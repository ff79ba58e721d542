"""Triton requests → typed requests → engine calls. Pure functions: no Triton, no engines.

A dynamic batch from Triton is a list of requests, each a mapping of input name → array with a
leading batch axis (one row per prompt; clients normally send one). Every row is validated on its
own into a :class:`GenerationRequest` (or :class:`LatentsRequest`); a row that fails validation
gets its one-line reason and never reaches an engine. Valid rows that can share one ``denoise``
call (same :class:`RunSettings`: plan, steps, guidance, mask ratio, size) are grouped, in arrival
order, into calls of at most the engines' prompt count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np

from hs_runtime.profiles import axis_ranges
from hs_runtime.errors import ConfigError, HybridStitchError, ShapeError, describe
from hs_runtime.pipeline import check_image_size
from hs_runtime.plans import MaskConfig, Plan, PlanConfig, make_plan

#: Upper bound on per-request steps: one request must not hold an instance for hours.
MAX_STEPS = 1000

T = TypeVar("T")


@dataclass(frozen=True)
class RunSettings:
    """What requests must share to run in one ``denoise`` call."""

    plan: str
    steps: int
    guidance_scale: float
    mask_ratio: float
    height: int  # pixels
    width: int

    def make_plan(self, base: PlanConfig) -> Plan:
        """The :class:`Plan` these settings name, on top of the engine folder's plan config."""
        config = replace(base, mask=replace(base.mask, ratio=self.mask_ratio))  # the folder's mask settings, the request's ratio
        return make_plan(self.plan, self.steps, config)


@dataclass(frozen=True)
class ServingDefaults:
    """Settings a request does not send: the engine folder's default plan and build size."""

    settings: RunSettings
    plan_config: PlanConfig

    @classmethod
    def from_manifest(cls, manifest) -> "ServingDefaults":
        default = manifest.data.get("default_plan", {})
        config = _plan_config(default.get("config") or {})
        build = manifest.build
        settings = RunSettings(
            plan=default.get("name", "hybrid"), steps=int(default.get("steps", 28)),
            guidance_scale=float(default.get("guidance_scale", 7.0)), mask_ratio=float(config.mask.ratio),
            height=int(build["height"]), width=int(build["width"]),
        )
        return cls(settings, config)


def _plan_config(data: dict) -> PlanConfig:
    """``PlanConfig`` from the manifest's JSON, ignoring keys this version does not know."""
    known = {f.name for f in fields(PlanConfig)} - {"mask"}
    mask_known = {f.name for f in fields(MaskConfig)}
    mask = MaskConfig(**{k: v for k, v in (data.get("mask") or {}).items() if k in mask_known})
    recorded = {k: v for k, v in data.items() if k in known}
    if data:  # a folder built before `refreshes` existed ran its hybrid stage without them
        recorded.setdefault("refreshes", 0)
    return PlanConfig(**recorded, mask=mask)


@dataclass(frozen=True)
class ServingLimits:
    """What the engine folder accepts: latent sizes from the built profiles, embedding widths.

    Attributes:
        latent_height / latent_width: ``(min, max)`` latent rows/columns the profiles allow.
        vae_scale: pixels per latent pixel.
        patch: latent pixels per token side.
    """

    latent_height: tuple[int, int]
    latent_width: tuple[int, int]
    vae_scale: int
    patch: int
    channels: int
    text_tokens: int
    joint_dim: int
    pooled_dim: int
    rebuild_command: str

    @classmethod
    def from_manifest(cls, manifest) -> "ServingLimits":
        shape, dims = manifest.shape, manifest.dims("large")
        ranges = axis_ranges(shape, dims)  # the latent sizes the build's profiles were made for
        return cls(
            latent_height=(ranges["height"][0], ranges["height"][2]),
            latent_width=(ranges["width"][0], ranges["width"][2]),
            vae_scale=manifest.vae_scale,
            patch=dims.patch_size, channels=dims.in_channels, text_tokens=shape.text_tokens,
            joint_dim=dims.joint_attention_dim, pooled_dim=dims.pooled_projection_dim,
            rebuild_command=manifest.rebuild_command,
        )

    def check_size(self, height: int, width: int, unit: str = "latent") -> None:
        """Raises :class:`ShapeError` unless ``height × width`` (``latent`` or ``px``) is inside
        the built profiles."""
        scale = self.vae_scale if unit == "px" else 1
        for name, value, (low, high) in (("height", height, self.latent_height), ("width", width, self.latent_width)):
            if not low * scale <= value <= high * scale:
                raise ShapeError(
                    describe(
                        f"{name} outside the built profiles", got=f"{value} {unit}",
                        expected=f"{low * scale}..{high * scale} {unit}", fix=f"rebuild with: {self.rebuild_command} --force (adjusting --height/--width or --dynamic-shape)",
                    )
                )


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt of a ``hybridstitch`` request, validated."""

    prompt: str
    negative_prompt: str | None
    seed: int
    settings: RunSettings


@dataclass(frozen=True)
class LatentsRequest:
    """One row of a ``hybridstitch_latents`` request, validated. Arrays are per prompt (no batch axis)."""

    prompt_embeds: np.ndarray  # [T_txt, joint_dim]
    pooled_prompt_embeds: np.ndarray  # [pooled_dim]
    negative_prompt_embeds: np.ndarray | None
    negative_pooled_prompt_embeds: np.ndarray | None
    latents: np.ndarray  # [C, h, w]
    settings: RunSettings

    @property
    def group_key(self) -> Hashable:
        return (self.settings, self.negative_prompt_embeds is not None)


# ----------------------------------------------------------------------------- validation


def rows_of(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows (prompts) in one Triton request: its inputs share the leading batch axis."""
    return max((int(np.shape(v)[0]) for v in inputs.values() if np.ndim(v) > 0), default=0)


def _value(inputs: Mapping[str, np.ndarray], name: str, row: int):
    """Element ``row`` of a one-element-per-row input (``None`` when the input is absent)."""
    if name not in inputs:
        return None
    array = np.asarray(inputs[name])
    if array.ndim == 0 or array.shape[0] <= row or array[row].size != 1:
        raise ShapeError(describe(f"input {name} must hold one element per request", got=list(array.shape), expected="[1, 1]"))
    return array[row].reshape(-1)[0]


def _text(inputs, name: str, row: int) -> str | None:
    value = _value(inputs, name, row)
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(describe(f"input {name} is not UTF-8 text", got=repr(bytes(value)[:40]))) from None
    return str(value)


def _int(inputs, name: str, row: int) -> int | None:
    value = _value(inputs, name, row)
    return None if value is None else int(value)


def _float(inputs, name: str, row: int) -> float | None:
    """The number the client was given, not its FP32 wire value widened (0.3, not
    0.30000001192…): so a sent default batches with requests that leave it out, and a mask ratio
    picks the tokens ``generate`` picks for it."""
    value = _value(inputs, name, row)
    return None if value is None else float(np.format_float_positional(np.float32(value), unique=True))


def _required(value, name: str, model: str):
    if value is None:
        raise ConfigError(describe(f"missing input {name}", fix=f"send {name} with every {model} request"))
    return value


def parse_settings(inputs: Mapping[str, np.ndarray], row: int, defaults: ServingDefaults, height: int | None, width: int | None) -> RunSettings:
    """The per-request plan inputs (or the folder's defaults), validated by building the plan."""
    d = defaults.settings
    plan = _text(inputs, "plan", row)
    steps = _int(inputs, "steps", row)
    guidance = _float(inputs, "guidance_scale", row)
    ratio = _float(inputs, "mask_ratio", row)
    settings = RunSettings(
        plan=d.plan if plan is None else plan.strip(), steps=d.steps if steps is None else steps,
        guidance_scale=d.guidance_scale if guidance is None else guidance, mask_ratio=d.mask_ratio if ratio is None else ratio,
        height=d.height if height is None else height, width=d.width if width is None else width,
    )
    if not 1 <= settings.steps <= MAX_STEPS:
        raise ConfigError(describe("steps out of range", got=settings.steps, expected=f"1..{MAX_STEPS}"))
    if not math.isfinite(settings.guidance_scale) or settings.guidance_scale < 0:
        raise ConfigError(describe("guidance_scale must be a finite number >= 0", got=settings.guidance_scale))
    settings.make_plan(defaults.plan_config)  # unknown plan, ratio outside (0, 1], too few steps
    return settings


def parse_generation(inputs: Mapping[str, np.ndarray], row: int, defaults: ServingDefaults, limits: ServingLimits) -> GenerationRequest:
    """Validates row ``row`` of a ``hybridstitch`` request.

    Raises:
        HybridStitchError: the one-line reason (missing or empty prompt, unknown plan, size
            outside the built profiles, ratio outside (0, 1], steps < 1, …).
    """
    prompt = _required(_text(inputs, "prompt", row), "prompt", "hybridstitch")
    if not prompt.strip():
        raise ConfigError(describe("empty prompt", fix="send a non-empty prompt"))
    seed = _required(_int(inputs, "seed", row), "seed", "hybridstitch")
    if seed < 0:  # INT64 on the wire; torch generators take 0 … 2**64 − 1
        raise ConfigError(describe("seed out of range", got=seed, expected=f"0..{2**63 - 1}"))
    height, width = _int(inputs, "height", row), _int(inputs, "width", row)
    d = defaults.settings
    height, width = d.height if height is None else height, d.width if width is None else width
    check_image_size(height, width, limits.vae_scale, limits.patch)
    limits.check_size(height, width, unit="px")
    negative = _text(inputs, "negative_prompt", row)
    return GenerationRequest(prompt, negative or None, seed, parse_settings(inputs, row, defaults, height, width))


def _embedding(inputs, name: str, row: int, shape: tuple[int, ...]) -> np.ndarray | None:
    if name not in inputs:
        return None
    array = np.asarray(inputs[name])[row]
    if tuple(array.shape) != shape:
        raise ShapeError(describe(f"input {name} has the wrong shape", got=list(array.shape), expected=list(shape)))
    if not np.isfinite(array).all():
        raise ConfigError(describe(f"input {name} holds NaN or Inf"))
    return np.ascontiguousarray(array, dtype=np.float32)


def parse_latents(inputs: Mapping[str, np.ndarray], row: int, defaults: ServingDefaults, limits: ServingLimits) -> LatentsRequest:
    """Validates row ``row`` of a ``hybridstitch_latents`` request (see :func:`parse_generation`)."""
    text = (limits.text_tokens, limits.joint_dim)
    embeds = _required(_embedding(inputs, "prompt_embeds", row, text), "prompt_embeds", "hybridstitch_latents")
    pooled = _required(_embedding(inputs, "pooled_prompt_embeds", row, (limits.pooled_dim,)), "pooled_prompt_embeds", "hybridstitch_latents")
    latents = np.asarray(_required(inputs["latents"] if "latents" in inputs else None, "latents", "hybridstitch_latents"))[row]
    if latents.ndim != 3 or latents.shape[0] != limits.channels:
        raise ShapeError(describe("input latents has the wrong shape", got=list(latents.shape), expected=f"[{limits.channels}, H/{limits.vae_scale}, W/{limits.vae_scale}]"))
    _, h, w = latents.shape
    if h % limits.patch or w % limits.patch:
        raise ShapeError(describe(f"latent size must be a multiple of {limits.patch}", got=f"{h}×{w}"))
    limits.check_size(h, w)
    if not np.isfinite(latents).all():
        raise ConfigError(describe("input latents holds NaN or Inf"))
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    settings = parse_settings(inputs, row, defaults, h * limits.vae_scale, w * limits.vae_scale)
    negative = _embedding(inputs, "negative_prompt_embeds", row, text)
    negative_pooled = _embedding(inputs, "negative_pooled_prompt_embeds", row, (limits.pooled_dim,))
    if settings.guidance_scale > 1.0:
        if negative is None or negative_pooled is None:
            raise ConfigError(
                describe("guidance_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds", got=f"guidance_scale {settings.guidance_scale}", fix="send both, or guidance_scale <= 1")
            )
    else:
        negative = negative_pooled = None  # unused without guidance
    return LatentsRequest(embeds, pooled, negative, negative_pooled, latents, settings)


# ----------------------------------------------------------------------------- grouping


@dataclass
class Row:
    """One row of one request in a dynamic batch: its parsed form or the reason it was refused."""

    request: int
    row: int
    parsed: object | None = None
    error: str = ""


def parse_rows(requests: Sequence[Mapping[str, np.ndarray]], parse: Callable[[Mapping, int], T]) -> list[Row]:
    """Every row of every request, parsed with ``parse``; a :class:`HybridStitchError` becomes
    that row's ``error`` (the others are unaffected). A request with no rows gets one error row."""
    rows = []
    for i, inputs in enumerate(requests):
        n = rows_of(inputs)
        if n == 0:
            rows.append(Row(i, 0, error=describe("empty request", fix="send [1, 1] arrays, one element per input")))
        for r in range(n):
            try:
                rows.append(Row(i, r, parsed=parse(inputs, r)))
            except HybridStitchError as exc:
                rows.append(Row(i, r, error=str(exc)))
    return rows


def group_calls(items: Sequence[T], key: Callable[[T], Hashable], max_prompts: Callable[[T], int | None]) -> list[list[int]]:
    """Indices of ``items`` grouped into engine calls: same ``key``, first-come order, at most
    ``max_prompts(item)`` per call (``None``: no limit)."""
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    calls = []
    for indices in groups.values():
        size = max_prompts(items[indices[0]]) or len(indices)
        calls.extend(indices[start:start + size] for start in range(0, len(indices), size))
    return calls
