"""FLOP model of each graph call and of whole plans (DESIGN §3), for ideal speedups.

Per sample and block with hidden ``D``, ``q`` queries (image queries + text tokens) and ``k``
keys: linear layers ``24·D²·q``, attention ``4·q·k·D``; a dual-attention layer adds
``8·D²·q_img + 4·q_img·k_img·D``. The last block (``context_pre_only``) drops its text output, so
its text tokens are only projected to K and V (``4·D²·t``) and do not query (corrected
2026-12-07: counting them as full queries put `bench`'s and `shapes`' ideals 0.6–1.3% low; at SD3.5
sizes 0.1%). Modulation, embeddings and the head are negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import ModelDims, complex_token_count
from .plans import Plan


def transformer_flops(dims: ModelDims, query_image_tokens: int, key_image_tokens: int, text_tokens: int, text_queries: int | None = None) -> float:
    """FLOPs of one sample through all blocks of one transformer.

    Args:
        query_image_tokens / key_image_tokens: image tokens recomputed / attended to.
        text_tokens: text tokens attended to.
        text_queries: text tokens recomputed (``text_tokens`` by default; 0 when their K/V
            come from a cache).
    """
    d = dims.hidden
    text = text_tokens if text_queries is None else text_queries
    q = query_image_tokens + text
    k = key_image_tokens + text_tokens
    per_block = 24 * d * d * q + 4 * q * k * d
    last_block = 24 * d * d * query_image_tokens + 4 * d * d * text + 4 * query_image_tokens * k * d  # text: K and V only
    dual_layers = dims.kv_entries - dims.num_layers
    dual = 8 * d * d * query_image_tokens + 4 * query_image_tokens * key_image_tokens * d
    return (dims.num_layers - 1) * per_block + last_block + dual_layers * dual


@dataclass(frozen=True)
class PlanCost:
    """FLOPs per sample of a plan, split by stage."""

    large: float
    hybrid: float
    small: float
    mask: float

    @property
    def total(self) -> float:
        return self.large + self.hybrid + self.small + self.mask


def hybrid_step_flops(plan: Plan, small: ModelDims, large: ModelDims, image_tokens: int, text_tokens: int) -> float:
    """FLOPs per sample of one hybrid step: the large model on the complex tokens, the small one
    on every token or (``small_outside_mask``) on the others; the large model's text stream
    recomputed or (``reuse_text_kv``) reused, the small model's always recomputed."""
    n = image_tokens
    k = complex_token_count(plan.mask.ratio, n)
    small_queries = n - k if plan.small_outside_mask else n
    small_part = transformer_flops(small, small_queries, n, text_tokens) if small_queries else 0.0
    return transformer_flops(large, k, n, text_tokens, 0 if plan.reuse_text_kv else text_tokens) + small_part


def plan_flops(plan: Plan, small: ModelDims, large: ModelDims, image_tokens: int, text_tokens: int) -> PlanCost:
    """FLOPs of every graph call a plan makes, per sample (the capture step's small pass included)."""
    n = image_tokens
    large_full = transformer_flops(large, n, n, text_tokens)
    small_full = transformer_flops(small, n, n, text_tokens)
    captures = plan.count("capture")
    return PlanCost(
        large=large_full * (plan.count("large") + captures),
        hybrid=hybrid_step_flops(plan, small, large, n, text_tokens) * plan.count("hybrid"),
        small=small_full * plan.count("small"),
        mask=small_full * captures if plan.small_at_capture else 0.0,
    )


def ideal_speedup(plan: Plan, small: ModelDims, large: ModelDims, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of the all-large plan ÷ FLOPs of ``plan`` at the same steps."""
    baseline = transformer_flops(large, image_tokens, image_tokens, text_tokens) * plan.steps
    return baseline / plan_flops(plan, small, large, image_tokens, text_tokens).total
