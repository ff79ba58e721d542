"""What a denoise holds between graph calls, computed from the contract (no engine needed).

A plan's hybrid stage keeps the last capture step's K/V that its calls reuse: the large model's
image K/V of every token outside the mask (and its text K/V with text reuse), the small model's of
the mask tokens, and the carried large − small offset. At SD3.5-large sizes that cache is gigabytes,
so ``hs-export build --dry-run`` adds it to what a run needs, and ``tests/test_memory.py`` holds it
equal to the bytes the sampler really keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .contract import LARGE, SMALL, ModelDims, complex_token_count
from .plans import Plan

FP32_BYTES = 4  # the sampler keeps velocities (and so the carried offset) in fp32


def kv_output_bytes(dims: ModelDims, batch: int, image_tokens: int, text_tokens: int, element_bytes: int) -> int:
    """Bytes of every K/V output of one dense capture call (image and text, keys and values)."""
    return 2 * batch * dims.hidden * element_bytes * (dims.kv_entries * image_tokens + dims.text_entries * text_tokens)


@dataclass(frozen=True)
class HybridCache:
    """Bytes the sampler holds through a plan's hybrid stage, per part."""

    large_image: int  # the large model's K/V of the tokens outside the mask
    large_text: int  # its text K/V (text reuse)
    small_image: int  # the small model's K/V of the mask tokens (small model outside the mask)
    queries: int  # both models' K/V of their own query tokens (mask re-selection only)
    offset: int  # the carried large − small velocity offset (fp32)

    @property
    def total(self) -> int:
        return self.large_image + self.large_text + self.small_image + self.queries + self.offset


def hybrid_cache(plan: Plan, dims: Mapping[str, ModelDims], image_tokens: int, text_tokens: int, prompts: int, element_bytes: int, cfg: bool = True) -> HybridCache:
    """What ``plan``'s hybrid stage keeps for ``prompts`` prompts (all zero without hybrid steps).

    The mask holds ``ceil(ratio · N)`` tokens (an adaptive mask holds at most that many, so its
    small-model part is at most this and its large-model part grows by the tokens it leaves out).
    A capture step frees the old cache before it makes the new one: this is also the stage's peak.
    """
    if not plan.count("hybrid"):
        return HybridCache(0, 0, 0, 0, 0)
    batch = prompts * (2 if cfg else 1)
    large, small = dims[LARGE], dims[SMALL]
    k = complex_token_count(plan.mask.ratio, image_tokens)
    m = image_tokens - k

    def image_kv(d: ModelDims, tokens: int) -> int:
        return kv_output_bytes(d, batch, tokens, 0, element_bytes)

    large_text = kv_output_bytes(large, batch, 0, text_tokens, element_bytes) if plan.reuse_text_kv else 0
    small_image = image_kv(small, k) if plan.small_outside_mask else 0
    queries = (image_kv(large, k) + (image_kv(small, m) if plan.small_outside_mask else 0)) if plan.mask.reselect_every else 0
    offset = prompts * image_tokens * large.patch_dim * FP32_BYTES if plan.carry_offset else 0
    return HybridCache(image_kv(large, m), large_text, small_image, queries, offset)
