import re
from dataclasses import replace

import pytest
import torch

from hs_runtime.backends.torch_backend import torch_engines
from hs_runtime.contract import LARGE, VELOCITY
from hs_runtime.errors import ConfigError, ShapeError
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import PLAN_NAMES, MaskConfig, PlanConfig, make_plan
from hs_runtime.sampler import StitchedSampler

STEPS = 6
# The hybrid step without the cheaper settings (on by default): the exactness tests below turn
# each one on alone. Text K/V reuse is exact only within the capture step itself.
PLAIN = dict(reuse_text_kv=False, small_outside_mask=False)


def test_large_plan_matches_diffusers_pipeline(tiny_pipe, tiny_torch_engines, tiny_conditioning):
    c = tiny_conditioning
    expected = tiny_pipe(
        prompt_embeds=c.prompt_embeds, negative_prompt_embeds=c.negative_prompt_embeds,
        pooled_prompt_embeds=c.pooled_prompt_embeds, negative_pooled_prompt_embeds=c.negative_pooled_prompt_embeds,
        num_inference_steps=STEPS, height=128, width=128, guidance_scale=7.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    latents = initial_latents(2, 128, 128, seed=0)
    result = StitchedSampler(tiny_torch_engines, 7.0).denoise(make_plan("large", STEPS), latents, c)
    assert (result.latents - expected).abs().max() <= 1e-4


def test_hybrid_full_ratio_same_model_equals_large(tiny_models, tiny_conditioning):
    _, large = tiny_models
    sampler = StitchedSampler(torch_engines(large, large), 7.0)
    latents = initial_latents(2, 128, 128, seed=3)
    reference = sampler.denoise(make_plan("large", STEPS), latents, tiny_conditioning).latents
    plan = make_plan("hybrid", STEPS, PlanConfig(large_fraction=0.2, hybrid_end=0.8, mask=MaskConfig(ratio=1.0), **PLAIN))
    assert plan.count("hybrid") > 0
    result = sampler.denoise(plan, latents, tiny_conditioning)
    assert (result.latents - reference).abs().max() <= 1e-4
    assert result.masks[0].complex_idx.shape == (2, 64)


def test_each_model_reads_its_own_position_table(tiny_models, tiny_conditioning):
    """SD3.5-medium's position table is 384 patches wide, SD3.5-large's 192: each model's token
    positions index its own table's centre (both used to get the large model's indices). A copy
    of ``large`` whose twice-as-wide table holds large's table in its centre draws what large draws,
    as the small model of every plan."""
    import copy

    _, large = tiny_models
    m, hidden = large.config.pos_embed_max_size, large.config.num_attention_heads * large.config.attention_head_dim
    wide = copy.deepcopy(large)
    table = torch.randn(2 * m, 2 * m, hidden, generator=torch.Generator().manual_seed(0))
    table[m // 2 : m // 2 + m, m // 2 : m // 2 + m] = large.pos_embed.pos_embed.view(m, m, hidden)
    wide.pos_embed.pos_embed = table.view(1, 4 * m * m, hidden)
    wide.pos_embed.pos_embed_max_size = 2 * m
    wide.register_to_config(pos_embed_max_size=2 * m)
    latents = initial_latents(2, 128, 128, seed=5)
    same, stretched = StitchedSampler(torch_engines(large, large), 7.0), StitchedSampler(torch_engines(wide, large), 7.0)
    plans = [make_plan("small", STEPS), make_plan("hybrid", STEPS, PlanConfig(large_fraction=0.2, hybrid_end=0.8, mask=MaskConfig(ratio=0.3, reselect_every=1)))]
    for plan in plans:
        expected = same.denoise(plan, latents, tiny_conditioning).latents
        assert (stretched.denoise(plan, latents, tiny_conditioning).latents - expected).abs().max() <= 1e-5, plan.name


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_every_plan_runs_and_times_its_stages(name, tiny_torch_engines, tiny_conditioning):
    plan = make_plan(name, STEPS, PlanConfig(refresh_every=1))
    result = StitchedSampler(tiny_torch_engines, 7.0).denoise(plan, initial_latents(2, 128, 96, 0), tiny_conditioning, profile=True)
    assert result.latents.shape == (2, 16, 16, 12) and torch.isfinite(result.latents).all()
    times = result.times.as_dict()
    assert times["total"] > 0 and times["overhead"] >= 0
    assert (times["hybrid"] > 0) == (plan.count("hybrid") > 0)
    assert len(result.masks) == plan.count("capture")


def test_profile_calls_times_every_graph_call_by_its_shape(tiny_torch_engines, tiny_conditioning):
    """One entry per graph call, keyed by what its cost depends on; nothing unless asked."""
    plan = make_plan("hybrid", 8, PlanConfig(large_fraction=0.25, hybrid_end=0.875, refreshes=1))
    assert plan.actions == ("large", "capture", "hybrid", "hybrid", "capture", "hybrid", "hybrid", "small")
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 96, 0)
    assert not sampler.denoise(plan, latents, tiny_conditioning, profile=True).times.calls
    calls = sampler.denoise(plan, latents, tiny_conditioning, profile_calls=True).times.calls  # stage times not needed
    assert all(t > 0 for times in calls.values() for t in times)
    count = {shape: len(times) for shape, times in calls.items()}
    image, text = 16 * 12 // 4, tiny_conditioning.prompt_embeds.shape[1]
    subset = [s for s in count if s.graph == LARGE and s.image_context]
    assert len(subset) == 1 and count[subset[0]] == plan.count("hybrid")
    large = subset[0]
    assert large.text_queries == 0 and large.text_context == text and large.image_queries + large.image_context == image
    assert large.batch == 4  # two prompts with CFG
    captures = [s for s in count if s.kv_outputs]
    assert {s.graph for s in captures} == {"small", "large"} and all(count[s] == plan.count("capture") for s in captures)
    assert sum(count.values()) == plan.count("large") + 2 * plan.count("capture") + 2 * plan.count("hybrid") + plan.count("small")
    dense = next(s for s in count if s.graph == LARGE and not s.image_context and not s.kv_outputs)
    assert large.flops(tiny_torch_engines[LARGE].dims) < dense.flops(tiny_torch_engines[LARGE].dims)
    assert large.label().startswith(f"large: {large.image_queries} image + 0 text queries, context {large.image_context} image + {text} text")


def test_a_refresh_on_the_stage_s_last_step_is_a_plain_large_step(tiny_torch_engines, tiny_conditioning):
    """A capture whose cache, mask and offset no later step reads costs a small call for nothing:
    the plan runs a large step there instead, and the image is the same."""
    plan = make_plan("hybrid", STEPS, PlanConfig(large_fraction=0.2, hybrid_end=0.6, refresh_every=2))
    assert plan.actions == ("capture", "hybrid", "hybrid", "large", "small", "small")
    with_capture = replace(plan, actions=("capture", "hybrid", "hybrid", "capture", "small", "small"))
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 128, seed=4)
    assert torch.equal(sampler.denoise(plan, latents, tiny_conditioning).latents, sampler.denoise(with_capture, latents, tiny_conditioning).latents)


def test_a_refresh_frees_the_old_cache_before_writing_the_new(tiny_torch_engines, tiny_conditioning, monkeypatch):
    """Peak memory at a refresh is one capture's K/V, as at the first capture: by the refresh's
    large call no earlier capture's contexts are alive."""
    import gc
    import weakref

    captured, alive_at_capture = [], []
    real_capture, real_call = StitchedSampler._capture, StitchedSampler._call

    def capture(self, *args):
        mask, hybrid = real_capture(self, *args)
        captured.append(weakref.ref(hybrid))
        return mask, hybrid

    def call(self, role, feeds, outputs=(VELOCITY,)):
        if len(outputs) > 1 and role == LARGE:  # a capture step's large call (it returns the K/V)
            gc.collect()
            alive_at_capture.append(sum(ref() is not None for ref in captured))
        return real_call(self, role, feeds, outputs)

    monkeypatch.setattr(StitchedSampler, "_capture", capture)
    monkeypatch.setattr(StitchedSampler, "_call", call)
    plan = make_plan("hybrid", 10, PlanConfig(refreshes=2))
    assert plan.count("capture") == 3
    StitchedSampler(tiny_torch_engines, 7.0).denoise(plan, initial_latents(2, 128, 128, 0), tiny_conditioning)
    assert alive_at_capture == [0, 0, 0]


def test_hybrid_differs_from_small_and_large(tiny_torch_engines, tiny_conditioning):
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 128, 0)
    out = {n: sampler.denoise(make_plan(n, STEPS), latents, tiny_conditioning).latents for n in ("large", "small", "hybrid")}
    assert not torch.allclose(out["hybrid"], out["large"]) and not torch.allclose(out["hybrid"], out["small"])


def test_bad_sizes(tiny_torch_engines, tiny_conditioning):
    with pytest.raises(ShapeError, match="multiple of 16"):
        initial_latents(1, 120, 128, 0)
    with pytest.raises(ShapeError, match="does not fit the small model"):
        StitchedSampler(tiny_torch_engines).denoise(make_plan("large", 2), initial_latents(2, 512, 128, 0), tiny_conditioning)
    with pytest.raises(ShapeError, match="prompt count"):
        StitchedSampler(tiny_torch_engines).denoise(make_plan("large", 2), initial_latents(1, 128, 128, 0), tiny_conditioning)
    sampler, latents = StitchedSampler(tiny_torch_engines), initial_latents(2, 128, 128, 0)
    for bad, message in (
        (latents[:, :, :15], "latent 15×16 does not fit the small model | got a side of 15"),  # not "8 patches per side"
        (latents[:, :, :0], "latent 0×16 does not fit the small model | got a side of 0"),  # not a torch error deep in the mask
        (latents[:, :4], "latents have the wrong channel count | got 4 | expected 16"),
        (latents.numpy(), "latents must be a torch tensor [P, C, H, W] | got ndarray"),
    ):
        with pytest.raises(ShapeError, match=re.escape(message)):
            sampler.denoise(make_plan("large", 2), bad, tiny_conditioning)
    with pytest.raises(ConfigError, match=re.escape("plan must be a Plan | got str")):
        sampler.denoise("hybrid", latents, tiny_conditioning)


@pytest.mark.parametrize("mask", [MaskConfig(0.3, "detail"), MaskConfig(0.3, "disagreement", dilate=True)])
def test_mask_variants_run_end_to_end(mask, tiny_torch_engines, tiny_conditioning):
    plan = make_plan("hybrid", STEPS, PlanConfig(mask=mask))
    result = StitchedSampler(tiny_torch_engines, 7.0).denoise(plan, initial_latents(2, 128, 128, 0), tiny_conditioning)
    assert torch.isfinite(result.latents).all()
    assert result.masks[0].complex_idx.shape == (2, 20)  # ceil(0.3 · 64) tokens per prompt


def test_carry_offset_is_exact_at_full_ratio_and_acts_below_it(tiny_torch_engines, tiny_conditioning):
    """Ratio 1.0 leaves no token outside the mask, so carrying the offset changes nothing and
    the plan still equals srdiff with the same dense steps; below 1.0 it changes the image."""
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 128, 0)
    srdiff = sampler.denoise(make_plan("srdiff", STEPS, PlanConfig(srdiff_large_fraction=0.8)), latents, tiny_conditioning).latents
    full = make_plan("hybrid", STEPS, PlanConfig(large_fraction=0.2, hybrid_end=0.8, carry_offset=True, mask=MaskConfig(ratio=1.0), **PLAIN))
    assert full.carry_offset and full.count("hybrid") > 0
    assert (sampler.denoise(full, latents, tiny_conditioning).latents - srdiff).abs().max() <= 1e-4
    config = PlanConfig(large_fraction=0.2, hybrid_end=0.8, carry_offset=False, mask=MaskConfig(ratio=0.3, signal="detail"), **PLAIN)
    plain = sampler.denoise(make_plan("hybrid", STEPS, config), latents, tiny_conditioning).latents
    carried = sampler.denoise(make_plan("hybrid", STEPS, replace(config, carry_offset=True)), latents, tiny_conditioning).latents
    assert torch.isfinite(carried).all() and not torch.allclose(plain, carried)


def test_small_outside_mask_is_exact_at_full_ratio(tiny_torch_engines, tiny_conditioning):
    """At ratio 1.0 no token is outside the mask: the small call is skipped and the plan still
    equals srdiff at the same boundary."""
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 128, 0)
    srdiff = sampler.denoise(make_plan("srdiff", STEPS, PlanConfig(srdiff_large_fraction=0.8)), latents, tiny_conditioning).latents
    full = make_plan("hybrid", STEPS, PlanConfig(large_fraction=0.2, hybrid_end=0.8, mask=MaskConfig(ratio=1.0), **{**PLAIN, "small_outside_mask": True}))
    assert (sampler.denoise(full, latents, tiny_conditioning).latents - srdiff).abs().max() <= 1e-4


@pytest.mark.parametrize("changes", [dict(reuse_text_kv=True), dict(small_outside_mask=True), dict(reuse_text_kv=True, small_outside_mask=True)])
def test_cheaper_hybrid_steps_change_little_and_really_act(changes, tiny_torch_engines, tiny_conditioning):
    """Text K/V reuse and the small model on the context tokens are approximations: the image
    moves (the settings are really used), and on the tiny random pair it moves far less than the
    hybrid image differs from the small model's."""
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 128, 0)
    config = PlanConfig(large_fraction=0.2, hybrid_end=0.8, **PLAIN)
    base = sampler.denoise(make_plan("hybrid", STEPS, config), latents, tiny_conditioning).latents
    small = sampler.denoise(make_plan("small", STEPS), latents, tiny_conditioning).latents
    cheaper = sampler.denoise(make_plan("hybrid", STEPS, replace(config, **changes)), latents, tiny_conditioning)
    moved = (cheaper.latents - base).abs().mean().item()
    assert torch.isfinite(cheaper.latents).all() and moved > 0
    assert moved < 0.5 * (small - base).abs().mean().item()


def test_text_reuse_with_refresh_needs_no_small_capture(tiny_torch_engines, tiny_conditioning):
    """Text reuse is the large model's alone: with the detail mask and no offset the capture
    steps run no small model, and each refresh re-captures the large model's text K/V."""
    plan = make_plan("hybrid", STEPS, PlanConfig(large_fraction=0.2, hybrid_end=0.8, refresh_every=2, reuse_text_kv=True, small_outside_mask=False, mask=MaskConfig(signal="detail"), carry_offset=False))
    assert not plan.small_at_capture and plan.count("capture") == 2
    result = StitchedSampler(tiny_torch_engines, 7.0).denoise(plan, initial_latents(2, 128, 128, 0), tiny_conditioning, profile=True)
    assert torch.isfinite(result.latents).all() and len(result.masks) == 2


def test_should_stop_ends_a_denoise_between_steps(tiny_torch_engines, tiny_conditioning):
    from hs_runtime.errors import CancelledError

    calls = []
    stop_after = lambda: calls.append(1) or len(calls) >= 3  # noqa: E731
    with pytest.raises(CancelledError, match=r"denoise stopped before step 3 of 6"):
        StitchedSampler(tiny_torch_engines, 7.0).denoise(make_plan("hybrid", STEPS), initial_latents(2, 128, 128, 0), tiny_conditioning, should_stop=stop_after)
    result = StitchedSampler(tiny_torch_engines, 7.0).denoise(make_plan("small", 2), initial_latents(2, 128, 128, 0), tiny_conditioning, should_stop=lambda: False)
    assert torch.isfinite(result.latents).all()


def test_adaptive_mask_runs_end_to_end_and_is_exact_at_its_limit(tiny_torch_engines, tiny_conditioning):
    """The adaptive mask picks one count for the batch within [min_ratio, ratio]; pinned to
    min_ratio = ratio it is the fixed mask, image for image."""
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 128, 0)
    fixed = sampler.denoise(make_plan("hybrid", STEPS, PlanConfig(mask=MaskConfig(0.3))), latents, tiny_conditioning)
    pinned = sampler.denoise(make_plan("hybrid", STEPS, PlanConfig(mask=MaskConfig(0.3, energy=0.5, min_ratio=0.3))), latents, tiny_conditioning)
    assert torch.equal(pinned.latents, fixed.latents)
    adaptive = sampler.denoise(make_plan("hybrid", STEPS, PlanConfig(mask=MaskConfig(0.5, energy=0.5, min_ratio=0.05))), latents, tiny_conditioning)
    count = adaptive.masks[0].complex_idx.shape
    assert count[0] == 2 and 4 <= count[1] <= 32 and count[1] % 4 == 0 and torch.isfinite(adaptive.latents).all()


def test_mask_reselection_is_exact_at_full_ratio_and_moves_the_mask_below_it(tiny_torch_engines, tiny_conditioning):
    """Re-selection keeps the token count and regathers both models' contexts from the capture
    K/V: at ratio 1.0 the mask is every token, so the image is the plain plan's to the bit;
    below it the mask really moves between hybrid steps and the image stays finite."""
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    latents = initial_latents(2, 128, 128, 0)
    steps = 10
    base = PlanConfig(large_fraction=0.2, hybrid_end=0.8, refreshes=0, mask=MaskConfig(ratio=1.0))
    plain = sampler.denoise(make_plan("hybrid", steps, base), latents, tiny_conditioning)
    again = sampler.denoise(make_plan("hybrid", steps, replace(base, mask=MaskConfig(ratio=1.0, reselect_every=1))), latents, tiny_conditioning)
    assert torch.equal(plain.latents, again.latents)
    plan = make_plan("hybrid", steps, replace(base, mask=MaskConfig(ratio=0.3, reselect_every=2)))
    result = sampler.denoise(plan, latents, tiny_conditioning)
    hybrid_steps = plan.count("hybrid")  # 6: re-selected after the 2nd and 4th
    assert len(result.masks) == 1 + (hybrid_steps - 1) // 2
    assert all(m.complex_idx.shape == (2, 20) for m in result.masks)
    assert any(not torch.equal(m.complex_idx, result.masks[0].complex_idx) for m in result.masks[1:])
    fixed = sampler.denoise(make_plan("hybrid", steps, replace(base, mask=MaskConfig(ratio=0.3))), latents, tiny_conditioning)
    assert torch.isfinite(result.latents).all() and not torch.equal(result.latents, fixed.latents)


def test_mask_reselection_needs_the_detail_signal():
    from hs_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="re-selection needs the detail signal"):
        MaskConfig(signal="disagreement", reselect_every=1)
    with pytest.raises(ConfigError, match="reselect_every must be >= 0"):
        MaskConfig(reselect_every=-1)


def test_mask_reselection_keeps_each_tokens_kv_once(tiny_torch_engines, tiny_conditioning, monkeypatch):
    """Memory: with re-selection each model's cache holds the capture step's K/V of every token
    exactly once (context part + query part; at SD3.5-large + medium 1024² the difference to a
    second full copy is ~2.7 GiB per prompt), and a re-selected mask regathers the same values."""
    seen = []
    real_step = StitchedSampler._hybrid_step

    def spy(self, plan, run, hybrid, patches, t):
        seen.append(hybrid)
        return real_step(self, plan, run, hybrid, patches, t)

    monkeypatch.setattr(StitchedSampler, "_hybrid_step", spy)
    sampler = StitchedSampler(tiny_torch_engines, 7.0)
    plan = make_plan("hybrid", 10, PlanConfig(large_fraction=0.2, hybrid_end=0.8, refreshes=0, mask=MaskConfig(ratio=0.3, reselect_every=1)))
    sampler.denoise(plan, initial_latents(2, 128, 128, 0), tiny_conditioning)
    first = seen[0]
    later = next(h for h in seen[1:] if not torch.equal(h.complex_idx, first.complex_idx))  # the mask moved
    for role in ("large", "small"):
        a, b = getattr(first, role), getattr(later, role)
        tokens = a.query_idx.shape[1] + a.context_idx.shape[1]
        for module in range(len(a.image_kv)):
            for which in (0, 1):  # K, V
                def full(ctx):
                    out = torch.full((ctx.image_kv[module][which].shape[0], tokens, ctx.image_kv[module][which].shape[2]), float("nan"))
                    for idx, part in ((ctx.context_idx, ctx.image_kv[module][which]), (ctx.query_idx, ctx.query_kv[module][which])):
                        out.scatter_(1, idx[:, :, None].expand(-1, -1, part.shape[2]), part)
                    return out
                assert a.image_kv[module][which].shape[1] + a.query_kv[module][which].shape[1] == tokens
                assert torch.equal(full(a), full(b)) and not full(a).isnan().any()
    plain = make_plan("hybrid", 10, PlanConfig(large_fraction=0.2, hybrid_end=0.8, refreshes=0, mask=MaskConfig(ratio=0.3)))
    seen.clear()
    sampler.denoise(plain, initial_latents(2, 128, 128, 0), tiny_conditioning)
    assert seen[0].large.query_kv is None and seen[0].small.query_kv is None  # nothing kept without re-selection


def test_profile_clock_waits_on_the_engines_gpu(monkeypatch):
    """Timing on ``cuda:1`` waits for ``cuda:1``: ``torch.cuda.synchronize()`` without a device
    waits on the current one (cuda:0), which would time kernel launches, not kernels."""
    from hs_runtime.sampler import _Clock

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    _Clock(torch.device("cuda", 1), enabled=True).now()
    _Clock(torch.device("cpu"), enabled=True).now()
    assert waited == [torch.device("cuda", 1)]
