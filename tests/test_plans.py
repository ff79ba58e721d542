import pytest

from hs_runtime.errors import ConfigError
from hs_runtime.plans import MaskConfig, Plan, PlanConfig, make_plan


def test_hybrid_default_layout():
    plan = make_plan("hybrid", 28)
    a, b = round(0.3 * 28), round(0.5 * 28)
    assert plan.actions[: a - 1] == ("large",) * (a - 1)
    assert plan.actions[a - 1] == "capture"
    assert plan.actions[a:b] == ("hybrid",) * (b - a)
    assert plan.actions[b:] == ("small",) * (28 - b)
    assert plan.mask == MaskConfig(0.1, "detail", False) and plan.carry_offset  # docs/quality.md: the paired front
    assert plan.reuse_text_kv and plan.small_outside_mask and plan.small_at_capture


def test_baselines():
    assert make_plan("large", 5).actions == ("large",) * 5
    assert make_plan("small", 5).actions == ("small",) * 5
    assert make_plan("tstitch", 10).actions == ("small",) * 4 + ("large",) * 6
    assert make_plan("srdiff", 10).actions == ("large",) * 4 + ("small",) * 6


def test_refresh_every_inserts_dense_captures():
    plan = make_plan("hybrid", 20, PlanConfig(large_fraction=0.1, hybrid_end=0.9, refresh_every=4))
    hybrid_stage = plan.actions[2:18]
    assert [i for i, a in enumerate(hybrid_stage) if a == "capture"] == [4, 8, 12]


def test_a_new_schedule_is_data():
    plan = Plan("custom", ("large", "capture", "hybrid", "small", "hybrid"))
    assert plan.count("hybrid") == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_plan("nope", 8),
        lambda: make_plan("hybrid", 0),
        lambda: MaskConfig(ratio=0.0),
        lambda: MaskConfig(ratio=1.5),
        lambda: MaskConfig(signal="edges"),
        lambda: PlanConfig(large_fraction=0.6, hybrid_end=0.5),
        lambda: make_plan("hybrid", 2, PlanConfig(large_fraction=0.2)),  # round(0.4) = 0 large steps before a hybrid stage
        lambda: Plan("bad", ("hybrid", "small")),
    ],
)
def test_bad_plans_raise_config_errors(call):
    with pytest.raises(ConfigError):
        call()
