import pytest
import torch

from hs_runtime.errors import ConfigError
from hs_runtime.mask import adaptive_token_count, compute_mask, dilate_scores, select_tokens
from hs_runtime.plans import MaskConfig


def test_top_r_tokens_and_complement():
    scores = torch.tensor([[0.1, 5.0, 0.2, 3.0, 0.0, 4.0, 0.3, 0.4, 0.5, 0.6]])
    mask = select_tokens(scores, 0.3)
    assert mask.complex_idx.tolist() == [[1, 3, 5]]
    assert mask.context_idx.tolist() == [[0, 2, 4, 6, 7, 8, 9]]


def test_ratio_rounds_up_and_caps():
    scores = torch.rand(2, 64)
    assert select_tokens(scores, 0.01).complex_idx.shape == (2, 1)
    assert select_tokens(scores, 0.3).complex_idx.shape == (2, 20)  # ceil(19.2)
    full = select_tokens(scores, 1.0)
    assert full.complex_idx.tolist() == [list(range(64))] * 2 and full.context_idx.shape == (2, 0)


def test_cfg_halves_share_one_mask():
    x, vl, vs = torch.randn(3, 2, 16, 8, 8).unbind(0)  # two prompts with different masks
    mask = compute_mask(MaskConfig(0.25), x, vl, vs, 0.5, 2)
    assert not torch.equal(mask.complex_idx[0], mask.complex_idx[1])
    batch = mask.for_batch(cfg=True)
    assert batch.complex_idx.shape == (4, 4)
    assert torch.equal(batch.complex_idx[:2], batch.complex_idx[2:])


def test_disagreement_picks_where_models_differ():
    vl = torch.zeros(1, 16, 8, 8)
    vs = torch.zeros(1, 16, 8, 8)
    vs[:, :, 2:4, 4:6] = 1.0  # token (row 1, col 2) of the 4×4 grid
    mask = compute_mask(MaskConfig(1 / 16, "disagreement"), vl, vl, vs, 0.5, 2)
    assert mask.complex_idx.tolist() == [[1 * 4 + 2]]


def test_detail_signal_finds_high_frequency():
    x = torch.zeros(1, 16, 8, 8)
    x[:, :, 5, 1] = 10.0  # a spike in token (2, 0)
    mask = compute_mask(MaskConfig(1 / 16, signal="detail"), x, torch.zeros_like(x), None, 0.5, 2)
    assert mask.complex_idx.tolist() == [[2 * 4 + 0]]


def test_dilation_spreads_to_neighbours():
    scores = torch.zeros(1, 16)
    scores[0, 5] = 1.0
    dilated = dilate_scores(scores, 4, 4)
    assert set(torch.nonzero(dilated[0]).squeeze(1).tolist()) == {0, 1, 2, 4, 5, 6, 8, 9, 10}



def test_adaptive_mask_takes_the_fewest_tokens_holding_the_energy_share():
    scores = torch.zeros(1, 64)
    scores[0, [3, 9, 20, 41]] = 1.0  # all of the energy in 4 tokens (a multiple of the N/16 step)
    config = MaskConfig(ratio=0.5, energy=0.9)
    assert select_tokens(scores, 0.5, adaptive_token_count(scores, config)).complex_idx.tolist() == [[3, 9, 20, 41]]
    flat = torch.zeros(1, 16, 16, 16)  # no disagreement anywhere: the lower bound
    assert compute_mask(MaskConfig(ratio=0.5, energy=0.9, min_ratio=0.1), flat, flat, flat, 0.5, 2).complex_idx.shape == (1, 7)


def test_adaptive_count_batch_shares_its_largest_clamped_and_snapped():
    scores = torch.zeros(2, 64)
    scores[0, :4] = 1.0
    scores[1] = 1.0  # uniform: 90% of the energy needs 58 tokens, clamped to ceil(0.5 · 64) = 32
    assert adaptive_token_count(scores, MaskConfig(ratio=0.5, energy=0.9)) == 32
    assert adaptive_token_count(scores[:1], MaskConfig(ratio=0.5, energy=0.9, min_ratio=0.25)) == 16  # lower clamp
    scores[0, :5] = 1.0  # 5 tokens → snapped up to 8 (steps of 64 / 16 = 4)
    assert adaptive_token_count(scores[:1], MaskConfig(ratio=0.5, energy=1.0)) == 8


def test_adaptive_mask_at_its_limits_is_the_fixed_mask():
    scores = torch.rand(3, 64) + 0.1
    fixed = select_tokens(scores, 0.3).complex_idx.shape[1]
    assert adaptive_token_count(scores, MaskConfig(ratio=0.3, energy=0.5, min_ratio=0.3)) == fixed
    assert adaptive_token_count(scores, MaskConfig(ratio=0.3, energy=1.0)) == fixed  # all the energy: the cap


def test_adaptive_mask_settings_are_checked():
    with pytest.raises(ConfigError, match="energy"):
        MaskConfig(energy=1.5)
    with pytest.raises(ConfigError, match="min_ratio"):
        MaskConfig(ratio=0.2, energy=0.5, min_ratio=0.3)
    with pytest.raises(ConfigError, match="min_ratio"):
        MaskConfig(min_ratio=0.0)
    # a fixed mask below the adaptive bound's default is a setting of its own, not an error
    assert MaskConfig(ratio=0.02).min_ratio > MaskConfig(ratio=0.02).ratio


def test_refined_tokens_are_every_mask_of_a_run_and_shares_count_each_token_once():
    """A plan with refreshes picks a new mask at each capture: the tokens the large model refined
    (overlays, PSNR inside/outside, the served mask) are their union. A row padded with repeats
    (one result joined from calls of different mask widths) counts each token once."""
    from hs_runtime.mask import TokenMask, refined_grid, used_shares

    scores = torch.zeros(2, 8)
    first = TokenMask(torch.tensor([[0, 1, 2], [3, 4, 4]]), torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 5, 6]]), scores)
    second = TokenMask(torch.tensor([[6, 7, 7], [3, 4, 5]]), torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 6, 7]]), scores)
    grid = refined_grid([first, second], 2, 4)
    assert grid.shape == (2, 2, 4)
    assert grid.reshape(2, 8).nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 6], [0, 7], [1, 3], [1, 4], [1, 5]]
    assert used_shares([first, second]).tolist() == pytest.approx([(3 + 2) / 2 / 8, (2 + 3) / 2 / 8])


def test_tied_scores_go_to_the_lower_token_index():
    """A flat region's equal scores are split by token index, the same on every device
    (``torch.topk`` picked positions 42–44 here on the CPU, others on CUDA)."""
    scores = torch.zeros(2, 64)
    scores[0, 40], scores[1, 5] = 1.0, 2.0
    assert select_tokens(scores, 4 / 64).complex_idx.tolist() == [[0, 1, 2, 40], [0, 1, 2, 5]]
