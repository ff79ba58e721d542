import torch

from hs_runtime.mask import compute_mask, dilate_scores, select_tokens
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
    mask = compute_mask(MaskConfig(1 / 16), vl, vl, vs, 0.5, 2)
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
