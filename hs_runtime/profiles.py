"""Shape profiles of an engine set: the build's ranges per graph input, derived from the contract.

The same pure functions serve the build (TensorRT optimization profiles, manifest) and the
runtime (checking a request against what was built; picking a TensorRT token bucket).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .contract import GRAPH_SPECS, LARGE_TOKENS, ModelDims, complex_token_count
from .errors import ConfigError, ShapeError, describe


@dataclass(frozen=True)
class BuildShape:
    """What one engine set is built for.

    Attributes:
        prompts: prompts per call (the CFG batch is twice this when ``cfg``).
        latent_height / latent_width: latent size (image / 8).
        text_tokens: T_txt (CLIP tokens, 77 in SD3, + T5 tokens).
        mask_ratio: planned mask ratio; ``large.tokens`` is tuned for ``ceil(r · N_img)`` tokens.
        dynamic_shape: batch 1..B prompts and latent sizes from half to twice the build size.
        token_buckets: number of ``large.tokens`` profiles splitting ``N ∈ [1, N_img]``.
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
    """Range of each dynamic axis symbol over the build (``tokens`` handled per bucket)."""
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


def token_buckets(shape: BuildShape, dims: ModelDims) -> list[Range]:
    """Contiguous ``(lo, opt, hi)`` ranges of N covering ``[1, N_img max]``; opt at the planned ratio."""
    ranges = axis_ranges(shape, dims)
    n_max = ranges["image_tokens"][2]
    planned = complex_token_count(shape.mask_ratio, ranges["image_tokens"][1])
    k = min(shape.token_buckets, n_max)
    edges = [round(n_max * i / k) for i in range(k + 1)]
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        lo = lo + 1
        buckets.append((lo, min(max(planned, lo), hi), hi))
    return buckets


def graph_profiles(graph: str, shape: BuildShape, dims: ModelDims) -> list[dict[str, list[list[int]]]]:
    """Per profile, ``{input name: [min shape, opt shape, max shape]}`` for one graph."""
    spec = GRAPH_SPECS[graph]
    ranges = axis_ranges(shape, dims)
    buckets = token_buckets(shape, dims) if graph == LARGE_TOKENS else [None]
    n_img_min, _, n_img_max = ranges["image_tokens"]
    profiles = []
    for bucket in buckets:
        table = dict(ranges)
        if bucket is not None:
            lo, opt, hi = bucket
            table["tokens"] = bucket
            n_opt = ranges["image_tokens"][1]
            table["context_tokens"] = (max(0, n_img_min - hi), max(0, n_opt - opt), max(0, n_img_max - lo))
        profile: dict[str, list[list[int]]] = {}
        levels = [spec.shapes(dims, {k: v[level] for k, v in table.items()}) for level in range(3)]
        for tensor in spec.inputs:
            profile[tensor.name] = [list(level[tensor.name]) for level in levels]
        profiles.append(profile)
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
