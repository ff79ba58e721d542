import pytest

from hs_export.build.tensorrt import config_kwargs
from hs_runtime.contract import ModelDims
from hs_runtime.errors import ConfigError, ShapeError
from hs_runtime.presets import MODEL_CONFIGS, PRESETS
from hs_runtime.profiles import BuildShape, axis_ranges, graph_profiles, select_profile, token_buckets

LARGE = ModelDims.from_config(MODEL_CONFIGS["sd3.5-large"])
TINY = ModelDims.from_config(PRESETS["tiny"].large)


def test_full_graph_profile_is_static_at_the_build_size():
    (profile,) = graph_profiles("large.full", BuildShape(1, 128, 128, 333), LARGE)
    assert profile["hidden_states"] == [[2, 16, 128, 128]] * 3
    assert profile["encoder_hidden_states"] == [[2, 333, 4096]] * 3


def test_tokens_profile_covers_one_to_all_tokens_with_opt_at_ratio():
    (profile,) = graph_profiles("large.tokens", BuildShape(1, 128, 128, 333, mask_ratio=0.3), LARGE)
    low, opt, high = profile["patches"]
    assert (low[1], opt[1], high[1]) == (1, 1229, 4096)
    low, opt, high = profile["kv_context"]
    assert (low[3], opt[3], high[3]) == (0, 4096 - 1229, 4095)
    assert low[:3] == [38, 2, 2] and low[4] == 2432


def test_token_buckets_split_the_range_contiguously():
    buckets = token_buckets(BuildShape(1, 16, 16, 85, mask_ratio=0.3, token_buckets=3), TINY)
    assert buckets[0][0] == 1 and buckets[-1][2] == 64
    assert all(b[0] == a[2] + 1 for a, b in zip(buckets, buckets[1:]))
    assert all(lo <= opt <= hi for lo, opt, hi in buckets)
    assert buckets[0][1] == 20  # ceil(0.3 · 64) falls in the first bucket


def test_dynamic_shape_ranges():
    ranges = axis_ranges(BuildShape(2, 128, 96, 333, dynamic_shape=True), LARGE)
    assert ranges["batch"] == (2, 4, 4)
    assert ranges["height"] == (64, 128, 256) and ranges["width"] == (48, 96, 192)


def test_select_profile_picks_the_bucket_and_names_misses():
    profiles = graph_profiles("large.tokens", BuildShape(1, 16, 16, 85, token_buckets=3), TINY)
    shapes = lambda n: {"patches": (2, n, 64), "token_pos": (2, n), "kv_context": (3, 2, 2, 64 - n, 32), "encoder_hidden_states": (2, 85, 32), "pooled_projections": (2, 32), "timestep": (2,)}  # noqa: E731
    assert [select_profile(profiles, shapes(n), "large.tokens", "") for n in (1, 21, 22, 43, 44, 64)] == [0, 0, 1, 1, 2, 2]
    bad = shapes(20)
    bad["encoder_hidden_states"] = (2, 333, 32)
    with pytest.raises(ShapeError, match="encoder_hidden_states outside the built profiles.*rebuild"):
        select_profile(profiles, bad, "large.tokens", "rebuild with: X")


def test_builder_config():
    assert config_kwargs("fp16") == {"tf32": False, "fp16": True, "bf16": False, "builder_optimization_level": 3}
    assert config_kwargs("bf16", 5)["bf16"] is True
    with pytest.raises(ConfigError):
        config_kwargs("int4")
    with pytest.raises(ConfigError):
        config_kwargs("fp16", 9)
