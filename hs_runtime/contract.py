"""The engine contract, defined once: graph names, tensor names, dtypes and axes.

Export (dynamic axes, dummy inputs), TensorRT profiles, the manifest and the runtime's input
checks all derive from these specs (DESIGN §3). Axis entries are symbols resolved against
:class:`ModelDims` and the run's sizes; symbols in :data:`DYNAMIC_AXES` vary per call.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

from .errors import ShapeError, describe

SMALL_FULL = "small.full"
LARGE_FULL = "large.full"
LARGE_TOKENS = "large.tokens"
GRAPH_NAMES = (SMALL_FULL, LARGE_FULL, LARGE_TOKENS)

# Symbols that change from call to call (ONNX dynamic axes, TensorRT profile ranges).
DYNAMIC_AXES = ("batch", "height", "width", "text_tokens", "image_tokens", "tokens", "context_tokens")


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one SD3 transformer that fix the static axes of its graphs."""

    in_channels: int
    out_channels: int
    patch_size: int
    hidden: int  # heads × head_dim, the D of the KV cache
    num_layers: int
    kv_entries: int  # attention modules that see image tokens: layers + dual-attention layers
    joint_attention_dim: int
    pooled_projection_dim: int
    pos_embed_max_size: int

    @classmethod
    def from_config(cls, config: Mapping) -> "ModelDims":
        """Reads the dims from a diffusers ``SD3Transformer2DModel`` config (a dict or FrozenDict)."""
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        layers = config["num_layers"]
        dual = tuple(config.get("dual_attention_layers") or ())
        return cls(
            in_channels=config["in_channels"],
            out_channels=config.get("out_channels") or config["in_channels"],
            patch_size=config["patch_size"],
            hidden=heads * head_dim,
            num_layers=layers,
            kv_entries=layers + sum(1 for i in dual if i < layers),
            joint_attention_dim=config["joint_attention_dim"],
            pooled_projection_dim=config["pooled_projection_dim"],
            pos_embed_max_size=config["pos_embed_max_size"],
        )

    @property
    def patch_dim(self) -> int:
        """P: values per token of a raw latent patch or a velocity patch."""
        return self.patch_size * self.patch_size * self.out_channels

    def image_tokens(self, height: int, width: int) -> int:
        """N_img for a latent of ``height × width``."""
        return (height // self.patch_size) * (width // self.patch_size)

    def check_latent(self, height: int, width: int, role: str) -> None:
        """Raises :class:`ShapeError` unless a ``height × width`` latent fits this model's patches
        and position table."""
        grid = max(height, width) // self.patch_size
        if height % self.patch_size or width % self.patch_size or grid > self.pos_embed_max_size:
            raise ShapeError(
                describe(
                    f"latent {height}×{width} does not fit the {role} model",
                    got=f"{grid} patches per side",
                    expected=f"a multiple of {self.patch_size} with at most {self.pos_embed_max_size} patches per side (image <= {self.pos_embed_max_size * self.patch_size * 8} px)",
                )
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output: dtype kind and symbolic axes."""

    name: str
    dtype: str  # "float" (the engine's I/O precision), "float32" or "int64"
    axes: tuple[str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """Everything about one graph that export, build and runtime need to agree on."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rtol: float  # fp32 parity tolerance of an engine vs. the PyTorch graph (relative to max |ref|)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` for this graph."""
        return {
            t.name: {i: a for i, a in enumerate(t.axes) if a in DYNAMIC_AXES}
            for t in (*self.inputs, *self.outputs)
        }

    def shapes(self, dims: ModelDims, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every tensor, from model dims and run sizes (batch, height, …)."""
        table = _symbol_table(dims, sizes)
        return {t.name: tuple(table[a] for a in t.axes) for t in (*self.inputs, *self.outputs)}

    def check_feeds(self, feeds: Mapping[str, object], dims: ModelDims) -> None:
        """Raises :class:`ShapeError` naming the first input whose name, rank or static size is off."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ShapeError(describe(f"{self.name}: missing input(s) {missing}", expected=list(self.input_names)))
        static = _symbol_table(dims, {})
        for spec in self.inputs:
            shape = tuple(feeds[spec.name].shape)
            if len(shape) != len(spec.axes):
                raise ShapeError(describe(f"{self.name}: tensor {spec.name}", got=shape, expected=spec.axes))
            for size, axis in zip(shape, spec.axes):
                if axis in static and static[axis] != size:
                    raise ShapeError(
                        describe(f"{self.name}: tensor {spec.name} axis '{axis}'", got=shape, expected=_show(spec.axes, static))
                    )


def _show(axes: tuple[str, ...], table: Mapping[str, int]) -> tuple:
    return tuple(table.get(a, a) for a in axes)


def _symbol_table(dims: ModelDims, sizes: Mapping[str, int]) -> dict[str, int]:
    table = {
        "channels": dims.in_channels,
        "out_channels": dims.out_channels,
        "patch_dim": dims.patch_dim,
        "kv_entries": dims.kv_entries,
        "two": 2,
        "hidden": dims.hidden,
        "joint_dim": dims.joint_attention_dim,
        "pooled_dim": dims.pooled_projection_dim,
    }
    table.update(sizes)
    if "height" in sizes and "width" in sizes and "image_tokens" not in sizes:
        table["image_tokens"] = dims.image_tokens(sizes["height"], sizes["width"])
    if "tokens" in table and "image_tokens" in table and "context_tokens" not in sizes:
        table["context_tokens"] = table["image_tokens"] - table["tokens"]
    return table


_CONDITIONING = (
    TensorSpec("encoder_hidden_states", "float", ("batch", "text_tokens", "joint_dim")),
    TensorSpec("pooled_projections", "float", ("batch", "pooled_dim")),
    TensorSpec("timestep", "float32", ("batch",)),  # fp32 always: bf16 cannot hold 997.0
)
_LATENT = TensorSpec("hidden_states", "float", ("batch", "channels", "height", "width"))
_VELOCITY = TensorSpec("velocity", "float", ("batch", "out_channels", "height", "width"))
_KV_CACHE = TensorSpec("kv_cache", "float", ("kv_entries", "two", "batch", "image_tokens", "hidden"))

GRAPH_SPECS: dict[str, GraphSpec] = {
    SMALL_FULL: GraphSpec(SMALL_FULL, (_LATENT, *_CONDITIONING), (_VELOCITY,), rtol=1e-4),
    LARGE_FULL: GraphSpec(LARGE_FULL, (_LATENT, *_CONDITIONING), (_VELOCITY, _KV_CACHE), rtol=1e-4),
    LARGE_TOKENS: GraphSpec(
        LARGE_TOKENS,
        (
            TensorSpec("patches", "float", ("batch", "tokens", "patch_dim")),
            TensorSpec("token_pos", "int64", ("batch", "tokens")),
            TensorSpec("kv_context", "float", ("kv_entries", "two", "batch", "context_tokens", "hidden")),
            *_CONDITIONING,
        ),
        (TensorSpec("velocity_tokens", "float", ("batch", "tokens", "patch_dim")),),
        rtol=1e-4,
    ),
}


def complex_token_count(ratio: float, image_tokens: int) -> int:
    """``ceil(r · N_img)``, at least one token: the N the hybrid stage feeds ``large.tokens``."""
    return max(1, min(image_tokens, math.ceil(ratio * image_tokens - 1e-9)))
