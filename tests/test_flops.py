import pytest

from hs_runtime.contract import ModelDims
from hs_runtime.flops import ideal_speedup, plan_flops, transformer_flops
from hs_runtime.plans import MaskConfig, PlanConfig, make_plan
from hs_runtime.presets import MODEL_CONFIGS

N_IMG, TXT = 4096, 333  # 1024², SD3 text


def dims(name):
    return ModelDims.from_config(MODEL_CONFIGS[name])


def test_real_model_ratios_match_design():
    large = transformer_flops(dims("sd3.5-large"), N_IMG, N_IMG, TXT)
    assert large / 1e12 == pytest.approx(31, rel=0.1)  # ~31 TFLOP per sample per step
    assert transformer_flops(dims("sd3.5-medium"), N_IMG, N_IMG, TXT) / large == pytest.approx(0.36, abs=0.03)
    tokens = transformer_flops(dims("sd3.5-large"), 1229, N_IMG, TXT)
    assert tokens / large == pytest.approx(0.35, abs=0.05)


def test_plan_costs():
    small, large = dims("sd3.5-medium"), dims("sd3.5-large")
    assert ideal_speedup(make_plan("large", 28), small, large, N_IMG, TXT) == pytest.approx(1.0)
    hybrid = make_plan("hybrid", 28)
    cost = plan_flops(hybrid, small, large, N_IMG, TXT)
    assert hybrid.count("capture") == 3  # the first and two refreshes: each runs the small model densely
    assert cost.mask == pytest.approx(3 * transformer_flops(small, N_IMG, N_IMG, TXT))
    assert 1.4 < ideal_speedup(hybrid, small, large, N_IMG, TXT) < 2.0
    wider = make_plan("hybrid", 28, PlanConfig(mask=MaskConfig(ratio=0.6)))
    assert ideal_speedup(wider, small, large, N_IMG, TXT) < ideal_speedup(hybrid, small, large, N_IMG, TXT)


def test_cheaper_hybrid_steps_at_sd35_sizes():
    """Text K/V reuse drops the 333 text queries from the large model's hybrid-step calls; the
    small model on the context tokens drops the complex ones: 0.71 → 0.54 of a dense large step,
    and the former default plan (ratio 0.3) from 1.61× to 1.73× ideal; the default until 2026-12-06
    (large 30%, ratio 0.1) has hybrid steps at 0.42 of a dense large step and is 1.76× ideal at 28
    steps, the default (large 15%, two refreshes, ratio 0.02) 0.37 and 1.84×."""
    from hs_runtime.flops import hybrid_step_flops

    small, large = dims("sd3.5-medium"), dims("sd3.5-large")
    dense = transformer_flops(large, N_IMG, N_IMG, TXT)
    plain = dict(large_fraction=0.25, hybrid_end=0.5, refreshes=0, reuse_text_kv=False, small_outside_mask=False, mask=MaskConfig(ratio=0.3))  # the former default
    step = lambda **kw: hybrid_step_flops(make_plan("hybrid", 28, PlanConfig(**{**plain, **kw})), small, large, N_IMG, TXT) / dense  # noqa: E731
    assert step() == pytest.approx(0.714, abs=0.005)
    assert step(reuse_text_kv=True) == pytest.approx(0.639, abs=0.005)
    assert step(reuse_text_kv=True, small_outside_mask=True) == pytest.approx(0.537, abs=0.005)
    both = make_plan("hybrid", 28, PlanConfig(**{**plain, "reuse_text_kv": True, "small_outside_mask": True}))
    assert ideal_speedup(both, small, large, N_IMG, TXT) == pytest.approx(1.730, abs=0.005)
    former = make_plan("hybrid", 28, PlanConfig(large_fraction=0.3, hybrid_end=0.5, refreshes=0, mask=MaskConfig(ratio=0.1)))  # the default until 2026-12-06
    assert hybrid_step_flops(former, small, large, N_IMG, TXT) / dense == pytest.approx(0.420, abs=0.005)
    assert ideal_speedup(former, small, large, N_IMG, TXT) == pytest.approx(1.756, abs=0.01)
    default = make_plan("hybrid", 28)
    assert hybrid_step_flops(default, small, large, N_IMG, TXT) / dense == pytest.approx(0.373, abs=0.005)
    assert ideal_speedup(default, small, large, N_IMG, TXT) == pytest.approx(1.841, abs=0.01)
    # at ratio 1.0 with the small model outside the mask, the small call disappears
    full = make_plan("hybrid", 28, PlanConfig(small_outside_mask=True, reuse_text_kv=False, mask=MaskConfig(ratio=1.0)))
    assert hybrid_step_flops(full, small, large, N_IMG, TXT) == pytest.approx(dense)


def test_the_last_block_projects_text_to_k_and_v_only():
    """SD3's last block (``context_pre_only``) drops its text output: its text tokens cost their K
    and V projections (4·D²·t) and never query; every other block's text tokens cost as much as
    image queries (24·D²·t + 4·t·k·D)."""
    d = dims("sd3.5-medium")
    n, t, width = 1024, 333, d.hidden
    extra = transformer_flops(d, n, n, t, text_queries=t) - transformer_flops(d, n, n, t, text_queries=0)
    per_block = 24 * width**2 * t + 4 * t * (n + t) * width
    assert extra == pytest.approx((d.num_layers - 1) * per_block + 4 * width**2 * t)
