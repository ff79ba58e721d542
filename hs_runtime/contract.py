"""The engine contract, defined once: graph names, tensor names, dtypes and axes (contract v3).

One graph per model, one signature (DESIGN §3). Each graph runs its transformer on ``N`` query
tokens — raw latent patches and their indices into the position table — attending to
``M`` context image tokens and ``T_c`` context text tokens through K/V given as inputs, and
returns the query tokens' velocity patches and their fresh K/V. So one graph serves every step
of its model:

* dense: all image tokens, no context (``M = 0``), text recomputed (``T_q = T``, ``T_c = 0``);
* capture: the same, keeping the fresh image and text K/V outputs;
* hybrid: a token subset with the cached K/V of the rest, the text stream recomputed
  (``T_q = T``) or taken from the capture step (``T_q = 0``, ``T_c = T``).

K and V travel as two tensors per attention module (``[B, tokens, D]`` each), never one tensor
for all layers, so no tensor comes near TensorRT's 2³¹−1-element limit at SD3.5-large sizes; and
never stacked as ``[2, B, tokens, D]``, whose stack and split were a copy of every K/V on every
call (contract v3: about 100 fewer nodes per call in ONNX Runtime's graph of the ``shapes`` large
model, docs/benchmarks.md).

Export (dynamic axes, dummy inputs), TensorRT profiles, the manifest, the limits table and the
runtime's input checks all derive from :func:`graph_spec`. Axis entries are symbols resolved
against :class:`ModelDims` and a call's sizes; symbols in :data:`DYNAMIC_AXES` vary per call.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Mapping

from .errors import ShapeError, describe

SMALL = "small"
LARGE = "large"
GRAPH_NAMES = (SMALL, LARGE)

# Symbols that change from call to call (ONNX dynamic axes, TensorRT profile ranges).
DYNAMIC_AXES = ("batch", "tokens", "context_tokens", "text_queries", "text_context")

VELOCITY = "velocity_tokens"


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one SD3 transformer that fix the static axes of its graph."""

    in_channels: int
    out_channels: int
    patch_size: int
    hidden: int  # heads × head_dim, the D of every K/V tensor
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
    def text_entries(self) -> int:
        """Attention modules that see text tokens: the joint attention of every block."""
        return self.num_layers

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
        uneven = [side for side in (height, width) if side % self.patch_size or side < self.patch_size]
        if uneven or grid > self.pos_embed_max_size:
            raise ShapeError(
                describe(
                    f"latent {height}×{width} does not fit the {role} model",
                    got=f"a side of {uneven[0]}" if uneven else f"{grid} patches per side",
                    expected=f"a positive multiple of {self.patch_size} with at most {self.pos_embed_max_size} patches per side (image <= {self.pos_embed_max_size * self.patch_size * 8} px)",
                )
            )

    def to_dict(self) -> dict:
        return asdict(self)


def kv_names(entry: int) -> tuple[str, str]:
    """Outputs: fresh image K and V ``[B, N, D]`` of the query tokens at attention module ``entry``."""
    return f"k_{entry}", f"v_{entry}"


def context_names(entry: int) -> tuple[str, str]:
    """Inputs: cached image K and V ``[B, M, D]`` of the context tokens at module ``entry``."""
    return f"k_context_{entry}", f"v_context_{entry}"


def text_kv_names(layer: int) -> tuple[str, str]:
    """Outputs: fresh text K and V ``[B, T_q, D]`` of block ``layer``'s joint attention."""
    return f"text_k_{layer}", f"text_v_{layer}"


def text_context_names(layer: int) -> tuple[str, str]:
    """Inputs: cached text K and V ``[B, T_c, D]`` for block ``layer``'s joint attention."""
    return f"text_k_context_{layer}", f"text_v_context_{layer}"


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output: dtype kind and symbolic axes."""

    name: str
    dtype: str  # "float" (the engine's I/O precision), "float32" or "int64"
    axes: tuple[str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """Everything about one model's graph that export, build and runtime need to agree on."""

    name: str
    dims: ModelDims
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rtol: float  # fp32 parity tolerance of an engine vs. the PyTorch graph (relative to max |ref|)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def kv_outputs(self) -> tuple[str, ...]:
        """Every K/V output (image then text): what a capture step keeps."""
        return tuple(t.name for t in self.outputs if t.name != VELOCITY)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` for this graph."""
        return {
            t.name: {i: a for i, a in enumerate(t.axes) if a in DYNAMIC_AXES}
            for t in (*self.inputs, *self.outputs)
        }

    def shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every tensor for a call's sizes (batch, tokens, …)."""
        table = {**_static_table(self.dims), **sizes}
        return {t.name: tuple(table[a] for a in t.axes) for t in (*self.inputs, *self.outputs)}

    def check_feeds(self, feeds: Mapping[str, object]) -> None:
        """Raises :class:`ShapeError` naming the first input whose name, rank or static size is off,
        or whose dynamic sizes disagree between inputs (e.g. ``patches`` vs ``token_pos`` tokens)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            shown = missing if len(missing) <= 4 else [*missing[:4], f"… {len(missing) - 4} more"]
            raise ShapeError(describe(f"{self.name}: missing input(s) {shown}", expected=f"{len(self.inputs)} inputs: {', '.join(self.input_names[:6])}, …"))
        static = _static_table(self.dims)
        seen: dict[str, tuple[int, str]] = {}
        for spec in self.inputs:
            shape = tuple(feeds[spec.name].shape)
            if len(shape) != len(spec.axes):
                raise ShapeError(describe(f"{self.name}: tensor {spec.name}", got=shape, expected=spec.axes))
            for size, axis in zip(shape, spec.axes):
                if axis in static and static[axis] != size:
                    raise ShapeError(describe(f"{self.name}: tensor {spec.name} axis '{axis}'", got=shape, expected=_show(spec.axes, static)))
                if axis in DYNAMIC_AXES:
                    first = seen.setdefault(axis, (size, spec.name))
                    if first[0] != size:
                        raise ShapeError(describe(f"{self.name}: axis '{axis}' differs between {first[1]} and {spec.name}", got=(first[0], size), expected="one size"))


def _show(axes: tuple[str, ...], table: Mapping[str, int]) -> tuple:
    return tuple(table.get(a, a) for a in axes)


def _static_table(dims: ModelDims) -> dict[str, int]:
    return {
        "hidden": dims.hidden,
        "patch_dim": dims.patch_dim,
        "joint_dim": dims.joint_attention_dim,
        "pooled_dim": dims.pooled_projection_dim,
    }


def call_sizes(batch: int, tokens: int, context_tokens: int = 0, text_tokens: int = 0, reuse_text: bool = False) -> dict[str, int]:
    """The dynamic sizes of one graph call: ``tokens`` queries, ``context_tokens`` cached image
    tokens, and ``text_tokens`` text tokens recomputed or (``reuse_text``) taken from a cache."""
    return {
        "batch": batch,
        "tokens": tokens,
        "context_tokens": context_tokens,
        "text_queries": 0 if reuse_text else text_tokens,
        "text_context": text_tokens if reuse_text else 0,
    }


@lru_cache(maxsize=None)
def graph_spec(name: str, dims: ModelDims) -> GraphSpec:
    """The spec of one model's graph (``small`` or ``large``); inputs and outputs in call order."""
    if name not in GRAPH_NAMES:
        raise ShapeError(describe("unknown graph", got=repr(name), expected=" | ".join(GRAPH_NAMES)))
    kv_axes = ("batch", "context_tokens", "hidden")
    text_ctx_axes = ("batch", "text_context", "hidden")
    inputs = (
        TensorSpec("patches", "float", ("batch", "tokens", "patch_dim")),
        TensorSpec("token_pos", "int64", ("batch", "tokens")),
        TensorSpec("encoder_hidden_states", "float", ("batch", "text_queries", "joint_dim")),
        TensorSpec("pooled_projections", "float", ("batch", "pooled_dim")),
        TensorSpec("timestep", "float32", ("batch",)),  # fp32 always: bf16 cannot hold 997.0
        *(TensorSpec(n, "float", kv_axes) for i in range(dims.kv_entries) for n in context_names(i)),
        *(TensorSpec(n, "float", text_ctx_axes) for j in range(dims.text_entries) for n in text_context_names(j)),
    )
    outputs = (
        TensorSpec(VELOCITY, "float", ("batch", "tokens", "patch_dim")),
        *(TensorSpec(n, "float", ("batch", "tokens", "hidden")) for i in range(dims.kv_entries) for n in kv_names(i)),
        *(TensorSpec(n, "float", ("batch", "text_queries", "hidden")) for j in range(dims.text_entries) for n in text_kv_names(j)),
    )
    return GraphSpec(name, dims, inputs, outputs, rtol=1e-4)


def complex_token_count(ratio: float, image_tokens: int) -> int:
    """``ceil(r · N_img)``, at least one token: the N the hybrid stage feeds the large graph."""
    return max(1, min(image_tokens, math.ceil(ratio * image_tokens - 1e-9)))
