"""FLOP model of each graph call and of whole plans (DESIGN §3), for ideal speedups.

Per sample and block with hidden ``D``, ``q`` queries (image queries + text tokens) and ``k``
keys: linear layers ``24·D²·q``, attention ``4·q·k·D``; a dual-attention layer adds
``8·D²·q_img + 4·q_img·k_img·D``. Modulation, embeddings and the head are negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import ModelDims, complex_token_count
from .plans import Plan


def transformer_flops(dims: ModelDims, query_image_tokens: int, key_image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one sample through all blocks of one transformer."""
    d = dims.hidden
    q = query_image_tokens + text_tokens
    k = key_image_tokens + text_tokens
    per_block = 24 * d * d * q + 4 * q * k * d
    dual_layers = dims.kv_entries - dims.num_layers
    dual = 8 * d * d * query_image_tokens + 4 * query_image_tokens * key_image_tokens * d
    return dims.num_layers * per_block + dual_layers * dual


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


def plan_flops(plan: Plan, small: ModelDims, large: ModelDims, image_tokens: int, text_tokens: int) -> PlanCost:
    """FLOPs of every graph call a plan makes, per sample (the mask's extra small pass included)."""
    n = image_tokens
    large_full = transformer_flops(large, n, n, text_tokens)
    small_full = transformer_flops(small, n, n, text_tokens)
    k = complex_token_count(plan.mask.ratio, n)
    large_tokens = transformer_flops(large, k, n, text_tokens)
    needs_small_for_mask = plan.mask.signal == "disagreement" or plan.carry_offset
    captures = plan.count("capture")
    return PlanCost(
        large=large_full * (plan.count("large") + captures),
        hybrid=(small_full + large_tokens) * plan.count("hybrid"),
        small=small_full * plan.count("small"),
        mask=small_full * captures if needs_small_for_mask else 0.0,
    )


def ideal_speedup(plan: Plan, small: ModelDims, large: ModelDims, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of the all-large plan ÷ FLOPs of ``plan`` at the same steps."""
    baseline = transformer_flops(large, image_tokens, image_tokens, text_tokens) * plan.steps
    return baseline / plan_flops(plan, small, large, image_tokens, text_tokens).total
