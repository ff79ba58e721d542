"""Shape profiles of an engine set: the build's ranges per graph input, derived from the contract.

Each graph gets a *dense* profile (every image token, no context, text recomputed: the large,
capture and small steps) first, then one *subset* profile per token bucket (a token subset with
cached context, text recomputed or reused: the hybrid steps), so each kind of call is tuned on
its own. The same pure functions serve the build (TensorRT optimization profiles, manifest,
limits) and the runtime (checking a request against what was built; picking a profile).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .contract import LARGE, ModelDims, complex_token_count, graph_spec
from .errors import ConfigError, ShapeError, describe


@dataclass(frozen=True)
class BuildShape:
    """What one engine set is built for.

    Attributes:
        prompts: prompts per call (the CFG batch is twice this when ``cfg``).
        latent_height / latent_width: latent size (image / 8).
        text_tokens: T_txt (CLIP tokens, 77 in SD3, + T5 tokens).
        mask_ratio: planned mask ratio; the subset profiles are tuned for ``ceil(r · N_img)``
            large-model tokens (and the rest for the small model).
        dynamic_shape: batch 1..B prompts and latent sizes from half to twice the build size.
        token_buckets: number of subset profiles per graph splitting ``N ∈ [1, N_img]``.
    """

    prompts: int
    latent_height: int
    latent_width: int
    text_tokens: int
    mask_ratio: float = 0.3
    cfg: bool = True
    dynamic_shape: bool = False
    token_buckets: int = 1

    def __post_init__(self):
        if self.prompts < 1:
            raise ConfigError(describe("prompts must be >= 1", got=self.prompts))
        if self.token_buckets < 1:
            raise ConfigError(describe("token buckets must be >= 1", got=self.token_buckets))

    @property
    def batch(self) -> int:
        return self.prompts * (2 if self.cfg else 1)

    def to_dict(self) -> dict:
        return asdict(self)


Range = tuple[int, int, int]  # (min, opt, max)


def axis_ranges(shape: BuildShape, dims: ModelDims) -> dict[str, Range]:
    """Range of batch, latent height/width, text tokens and image tokens over the build."""
    b, h, w = shape.batch, shape.latent_height, shape.latent_width
    if shape.dynamic_shape:
        step = 2 * dims.patch_size
        limit = dims.pos_embed_max_size * dims.patch_size
        low = lambda v: max(step, (v // 2) // step * step)  # noqa: E731
        high = lambda v: min(limit, 2 * v)  # noqa: E731
        batch = (2 if shape.cfg else 1, b, b)
        height, width = (low(h), h, high(h)), (low(w), w, high(w))
    else:
        batch, height, width = (b, b, b), (h, h, h), (w, w, w)
    n = lambda hh, ww: dims.image_tokens(hh, ww)  # noqa: E731
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "text_tokens": (shape.text_tokens,) * 3,
        "image_tokens": (n(height[0], width[0]), n(h, w), n(height[2], width[2])),
    }


def planned_tokens(graph: str, shape: BuildShape, dims: ModelDims) -> int:
    """Query tokens of a planned hybrid call: the complex tokens for the large graph, the others
    for the small one (at least one)."""
    n_opt = axis_ranges(shape, dims)["image_tokens"][1]
    k = complex_token_count(shape.mask_ratio, n_opt)
    return k if graph == LARGE else max(1, n_opt - k)


def token_buckets(shape: BuildShape, dims: ModelDims, planned: int | None = None) -> list[Range]:
    """Contiguous ``(lo, opt, hi)`` ranges of N covering ``[1, N_img max]``; opt at ``planned``
    (default: the large graph's planned complex-token count)."""
    ranges = axis_ranges(shape, dims)
    n_max = ranges["image_tokens"][2]
    planned = planned_tokens(LARGE, shape, dims) if planned is None else planned
    k = min(shape.token_buckets, n_max)
    edges = [round(n_max * i / k) for i in range(k + 1)]
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        lo = lo + 1
        buckets.append((lo, min(max(planned, lo), hi), hi))
    return buckets


def profile_sizes(graph: str, shape: BuildShape, dims: ModelDims) -> list[dict[str, Range]]:
    """Per profile, the ``(min, opt, max)`` of every dynamic axis: the dense profile, then one
    subset profile per token bucket."""
    ranges = axis_ranges(shape, dims)
    n_min, n_opt, n_max = ranges["image_tokens"]
    t = shape.text_tokens
    dense = {"batch": ranges["batch"], "tokens": ranges["image_tokens"], "context_tokens": (0, 0, 0), "text_queries": (t, t, t), "text_context": (0, 0, 0)}
    profiles = [dense]
    for lo, opt, hi in token_buckets(shape, dims, planned_tokens(graph, shape, dims)):
        profiles.append({
            "batch": ranges["batch"],
            "tokens": (lo, opt, hi),
            "context_tokens": (max(0, n_min - hi), max(0, n_opt - opt), max(0, n_max - lo)),
            "text_queries": (0, t, t),  # t: recomputed (the default); 0: reused from the capture step
            "text_context": (0, 0, t),
        })
    return profiles


def graph_profiles(graph: str, shape: BuildShape, dims: ModelDims) -> list[dict[str, list[list[int]]]]:
    """Per profile, ``{input name: [min shape, opt shape, max shape]}`` for one graph."""
    spec = graph_spec(graph, dims)
    profiles = []
    for sizes in profile_sizes(graph, shape, dims):
        levels = [spec.shapes({axis: r[level] for axis, r in sizes.items()}) for level in range(3)]
        profiles.append({t.name: [list(level[t.name]) for level in levels] for t in spec.inputs})
    return profiles


def select_profile(profiles: list[dict[str, list[list[int]]]], feeds_shapes: dict[str, tuple[int, ...]], graph: str, rebuild_hint: str) -> int:
    """Index of the first profile whose ranges hold every input shape.

    Raises:
        ShapeError: naming the input, the shape and the built range, and how to rebuild.
    """
    for index, profile in enumerate(profiles):
        if all(_inside(feeds_shapes[name], bounds) for name, bounds in profile.items() if name in feeds_shapes):
            return index
    # Report the first input that fits no profile.
    for name in profiles[0]:
        if name in feeds_shapes and not any(_inside(feeds_shapes[name], p[name]) for p in profiles):
            ranges = " or ".join(f"{p[name][0]}..{p[name][2]}" for p in profiles)
            raise ShapeError(describe(f"{graph}: tensor {name} outside the built profiles", got=list(feeds_shapes[name]), expected=ranges, fix=rebuild_hint))
    raise ShapeError(describe(f"{graph}: input shapes fit no single built profile", got=feeds_shapes, fix=rebuild_hint))


def _inside(shape, bounds) -> bool:
    low, _, high = bounds
    return len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))


def check_latent_size(shape: BuildShape, dims: ModelDims, latent_height: int, latent_width: int, rebuild_hint: str, vae_scale: int = 8) -> None:
    """Raises :class:`ShapeError` unless a latent size is one the build's profiles were made for.

    The graphs see token counts only, so this names the image size a request asked for instead
    of a tensor shape it implies.
    """
    ranges = axis_ranges(shape, dims)
    (h_lo, _, h_hi), (w_lo, _, w_hi) = ranges["height"], ranges["width"]
    if not (h_lo <= latent_height <= h_hi and w_lo <= latent_width <= w_hi):
        px = lambda lo, hi: f"{lo * vae_scale}" if lo == hi else f"{lo * vae_scale}..{hi * vae_scale}"  # noqa: E731
        raise ShapeError(
            describe(
                "image size outside the built profiles", got=f"{latent_width * vae_scale}×{latent_height * vae_scale} px",
                expected=f"width {px(w_lo, w_hi)} × height {px(h_lo, h_hi)} px", fix=f"{rebuild_hint} (--height/--width, or --dynamic-shape)",
            )
        )
