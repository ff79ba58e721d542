import pytest

from hs_export.build.tensorrt import config_kwargs
from hs_runtime.contract import ModelDims
from hs_runtime.errors import ConfigError, ShapeError
from hs_runtime.presets import MODEL_CONFIGS, PRESETS
from hs_runtime.profiles import BuildShape, axis_ranges, graph_profiles, select_profile, token_buckets

LARGE = ModelDims.from_config(MODEL_CONFIGS["sd3.5-large"])
TINY = ModelDims.from_config(PRESETS["tiny"].large)


def test_dense_profile_first_is_static_at_the_build_size():
    dense, subset = graph_profiles("large", BuildShape(1, 128, 128, 333), LARGE)
    assert dense["patches"] == [[2, 4096, 64]] * 3
    assert dense["encoder_hidden_states"] == [[2, 333, 4096]] * 3
    assert dense["k_context_0"] == [[2, 0, 2432]] * 3 and dense["text_v_context_37"] == [[2, 0, 2432]] * 3


def test_subset_profile_covers_one_to_all_tokens_with_opt_at_ratio():
    _, subset = graph_profiles("large", BuildShape(1, 128, 128, 333, mask_ratio=0.3), LARGE)
    low, opt, high = subset["patches"]
    assert (low[1], opt[1], high[1]) == (1, 1229, 4096)
    low, opt, high = subset["v_context_5"]
    assert (low[1], opt[1], high[1]) == (0, 4096 - 1229, 4095)
    low, opt, high = subset["encoder_hidden_states"]  # text recomputed (333) or reused (0)
    assert (low[1], opt[1], high[1]) == (0, 333, 333)
    assert [r[1] for r in subset["text_k_context_0"]] == [0, 0, 333]
    assert len(subset) == 5 + 2 * (38 + 38)  # a K and a V input per attention module and per block


def test_small_subset_profile_is_tuned_for_the_tokens_outside_the_mask():
    small = ModelDims.from_config(MODEL_CONFIGS["sd3.5-medium"])
    _, subset = graph_profiles("small", BuildShape(1, 128, 128, 333, mask_ratio=0.3), small)
    assert subset["patches"][1][1] == 4096 - 1229 and subset["k_context_0"][1][1] == 1229
    assert small.kv_entries == 24 + 13 and sum(n.startswith("v_context_") for n in subset) == 37


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
    profiles = graph_profiles("large", BuildShape(1, 16, 16, 85, token_buckets=3), TINY)

    def shapes(n, text=85):
        out = {"patches": (2, n, 64), "token_pos": (2, n), "encoder_hidden_states": (2, text, 32), "pooled_projections": (2, 32), "timestep": (2,)}
        out.update({f"{kv}_context_{i}": (2, 64 - n, 32) for i in range(3) for kv in "kv"})
        out.update({f"text_{kv}_context_{j}": (2, 85 - text, 32) for j in range(2) for kv in "kv"})
        return out

    # the dense call takes the dense profile even though a subset profile holds it too
    assert [select_profile(profiles, shapes(n), "large", "") for n in (1, 21, 22, 43, 44, 64)] == [1, 1, 2, 2, 3, 0]
    assert select_profile(profiles, shapes(64, text=0), "large", "") == 3  # all tokens, text reused
    bad = shapes(20)
    bad["encoder_hidden_states"] = (2, 333, 32)
    with pytest.raises(ShapeError, match="encoder_hidden_states outside the built profiles.*rebuild"):
        select_profile(profiles, bad, "large", "rebuild with: X")


def test_builder_config():
    # Strongly typed networks: no fp16/bf16 builder flags (deprecated in TensorRT 10.12, gone in 11).
    assert config_kwargs("fp32") == {"tf32": False, "builder_optimization_level": 3}
    assert config_kwargs("fp16") == {"tf32": True, "builder_optimization_level": 3}
    assert config_kwargs("bf16", 5) == {"tf32": True, "builder_optimization_level": 5}
    with pytest.raises(ConfigError):
        config_kwargs("int4")
    with pytest.raises(ConfigError):
        config_kwargs("fp16", 9)
