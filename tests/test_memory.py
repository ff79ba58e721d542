"""The hybrid stage's cache: the bytes computed from the contract are the bytes the sampler keeps."""

import pytest

from hs_runtime.contract import LARGE, SMALL
from hs_runtime.memory import hybrid_cache, kv_output_bytes
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import MaskConfig, PlanConfig, make_plan
from hs_runtime.presets import get_preset
from hs_runtime.sampler import StitchedSampler


def _nbytes(pairs) -> int:
    return sum(t.nbytes for pair in (pairs or ()) for t in pair)


def _held(hybrid) -> dict:
    """Every K/V and offset byte a ``_Hybrid`` keeps (its index tensors aside)."""
    small = hybrid.small
    return {
        "large_image": _nbytes(hybrid.large.image_kv),
        "large_text": _nbytes(hybrid.large.text_kv),
        "small_image": _nbytes(small.image_kv) if small else 0,
        "queries": _nbytes(hybrid.large.query_kv) + (_nbytes(small.query_kv) if small else 0),
        "offset": hybrid.offset.nbytes if hybrid.offset is not None else 0,
    }


CONFIGS = {
    "default": PlanConfig(),
    "re-selection": PlanConfig(mask=MaskConfig(ratio=0.3, reselect_every=1)),
    "small on every token, no reuse, no offset": PlanConfig(mask=MaskConfig(ratio=0.5), small_outside_mask=False, reuse_text_kv=False, carry_offset=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_hybrid_cache_is_what_the_sampler_keeps(name, tiny_torch_engines, tiny_conditioning, monkeypatch):
    kept = []
    for method in ("_capture", "_reselect"):
        original = getattr(StitchedSampler, method)

        def recording(self, *args, _original=original, **kwargs):
            mask, hybrid = _original(self, *args, **kwargs)
            kept.append(_held(hybrid))
            return mask, hybrid

        monkeypatch.setattr(StitchedSampler, method, recording)
    plan = make_plan("hybrid", 12, CONFIGS[name])
    latents = initial_latents(2, 128, 128, seed=0)
    StitchedSampler(tiny_torch_engines).denoise(plan, latents, tiny_conditioning)

    dims = {role: tiny_torch_engines[role].dims for role in (SMALL, LARGE)}
    n = dims[LARGE].image_tokens(16, 16)
    computed = hybrid_cache(plan, dims, n, tiny_conditioning.prompt_embeds.shape[1], prompts=2, element_bytes=4)
    assert kept and all(k == vars(computed) for k in kept), (kept, computed)
    assert computed.total == sum(vars(computed).values()) > 0
    assert (computed.queries > 0) == (name == "re-selection")


def test_no_cache_without_a_hybrid_stage():
    dims = {role: None for role in (SMALL, LARGE)}
    assert hybrid_cache(make_plan("srdiff", 28), dims, 4096, 333, prompts=1, element_bytes=2).total == 0


def test_sd35_large_cache_and_capture_outputs():
    """At SD3.5-large + SD3.5-medium, 1024², bf16, one prompt with CFG: the default plan keeps
    2.76 GiB of the large model's image K/V and 0.23 GiB of its text K/V; a large capture call
    writes 3.05 GiB of K/V."""
    from hs_runtime.contract import ModelDims

    spec = get_preset("sd3.5-large")
    dims = {SMALL: ModelDims.from_config(spec.small), LARGE: ModelDims.from_config(spec.large)}
    n, text = dims[LARGE].image_tokens(128, 128), spec.text_tokens
    cache = hybrid_cache(make_plan("hybrid", 28), dims, n, text, prompts=1, element_bytes=2)
    k = 82  # ceil(0.02 · 4096)
    assert cache.large_image == 2 * 2 * 38 * (4096 - k) * 2432 * 2
    assert cache.large_text == 2 * 2 * 38 * text * 2432 * 2
    assert cache.small_image == 2 * 2 * dims[SMALL].kv_entries * k * 1536 * 2
    assert cache.offset == 4096 * 64 * 4 and cache.queries == 0
    assert kv_output_bytes(dims[LARGE], 2, n, text, 2) == 2 * 2 * 2432 * 2 * (38 * 4096 + 38 * text)
    assert 3.0 * 2**30 < cache.total < 3.1 * 2**30
