from dataclasses import replace

import pytest

from hs_runtime.errors import ConfigError
from hs_runtime.plans import MaskConfig, Plan, PlanConfig, make_plan


def test_hybrid_default_layout():
    """docs/quality.md: large for 15% of the steps, a hybrid stage to 75% that two dense large
    steps refresh, then small; a 2% detail mask, the carried offset and both cheaper hybrid calls."""
    plan = make_plan("hybrid", 20)
    assert plan.stages() == "large×2 capture hybrid×4 capture hybrid×3 capture hybrid×3 small×5"
    assert make_plan("hybrid", 28).stages() == "large×3 capture hybrid×6 capture hybrid×4 capture hybrid×5 small×7"
    assert plan.mask == MaskConfig(0.02, "detail", False) and plan.carry_offset  # docs/quality.md: the paired front
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
    # a refresh due on the stage's last step, or just before another one: no hybrid step reads its
    # cache, so a large step
    ends_on_one = make_plan("hybrid", 20, PlanConfig(large_fraction=0.1, hybrid_end=0.45, refresh_every=3)).actions
    assert ends_on_one == ("large", "capture", "hybrid", "hybrid", "hybrid", "capture", "hybrid", "hybrid", "large", *("small",) * 11)
    assert make_plan("hybrid", 8).stages() == "capture hybrid×2 large capture hybrid small×2"  # refreshes at stage steps 2 and 3


def test_refreshes_keep_their_share_of_the_stage_at_any_step_count():
    """Two refreshes split the hybrid stage in three at 20 steps (as ``refresh_every=4``) and at 28
    (where a period of 4 would make four)."""
    config = PlanConfig(large_fraction=0.15, hybrid_end=0.75, refreshes=2)
    assert make_plan("hybrid", 20, config).actions == make_plan("hybrid", 20, replace(config, refreshes=0, refresh_every=4)).actions
    assert make_plan("hybrid", 20, config).stages() == "large×2 capture hybrid×4 capture hybrid×3 capture hybrid×3 small×5"
    assert make_plan("hybrid", 28, config).stages() == "large×3 capture hybrid×6 capture hybrid×4 capture hybrid×5 small×7"
    assert make_plan("hybrid", 20, replace(config, refresh_every=6)).stages() == "large×2 capture hybrid×6 capture hybrid×5 small×5"  # a period replaces the count


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
        lambda: PlanConfig(refreshes=-1),
        lambda: make_plan("hybrid", 2, PlanConfig(large_fraction=0.0)),  # no large step before the hybrid stage
        lambda: Plan("bad", ("hybrid", "small")),
    ],
)
def test_bad_plans_raise_config_errors(call):
    with pytest.raises(ConfigError):
        call()
