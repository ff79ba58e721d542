import torch

from hs_runtime.contract import ModelDims
from hs_runtime.graphs import build_graphs
from hs_runtime.tokens import gather_kv, gather_tokens, patchify, position_ids, unpatchify

from conftest import random_full_inputs

H, W, T = 16, 12, 85  # non-square latent, tiny text length


def _setup(tiny_models):
    small, large = tiny_models
    graphs = build_graphs(small, large)
    dims = ModelDims.from_config(large.config)
    feeds = random_full_inputs(dims, 2, H, W, T)
    return small, large, graphs, dims, feeds


@torch.no_grad()
def test_full_graphs_equal_diffusers_forward(tiny_models):
    small, large, graphs, _, feeds = _setup(tiny_models)
    args = list(feeds.values())
    velocity, kv_cache = graphs["large.full"](*args)
    assert torch.allclose(velocity, large(*args, return_dict=False)[0], atol=1e-6)
    assert torch.allclose(graphs["small.full"](*args), small(*args, return_dict=False)[0], atol=1e-6)
    # one entry per attention module seeing image tokens: 2 layers + 1 dual-attention layer
    assert kv_cache.shape == (3, 2, 2, (H // 2) * (W // 2), large.config.num_attention_heads * large.config.attention_head_dim)


@torch.no_grad()
def test_tokens_on_all_tokens_equals_full(tiny_models):
    _, _, graphs, dims, feeds = _setup(tiny_models)
    velocity, kv_cache = graphs["large.full"](*feeds.values())
    pos = position_ids(H, W, 2, dims.pos_embed_max_size)[None].expand(2, -1)
    empty_context = kv_cache[:, :, :, :0]
    out = graphs["large.tokens"](patchify(feeds["hidden_states"], 2), pos, empty_context, *list(feeds.values())[1:])
    assert (out - patchify(velocity, 2)).abs().max() <= 1e-5


@torch.no_grad()
def test_kv_cache_makes_token_subset_exact(tiny_models):
    _, _, graphs, dims, feeds = _setup(tiny_models)
    velocity, kv_cache = graphs["large.full"](*feeds.values())
    n = (H // 2) * (W // 2)
    g = torch.Generator().manual_seed(1)
    complex_idx = torch.stack([torch.randperm(n, generator=g)[:13].sort().values for _ in range(2)])
    chosen = torch.zeros(2, n, dtype=torch.bool).scatter(1, complex_idx, True)
    context_idx = torch.stack([torch.nonzero(~row).squeeze(1) for row in chosen])
    pos = position_ids(H, W, 2, dims.pos_embed_max_size)[complex_idx]
    patches = gather_tokens(patchify(feeds["hidden_states"], 2), complex_idx)
    out = graphs["large.tokens"](patches, pos, gather_kv(kv_cache, context_idx), *list(feeds.values())[1:])
    expected = gather_tokens(patchify(velocity, 2), complex_idx)
    assert (out - expected).abs().max() <= 1e-4
    # and a stale or missing context does change the answer (the cache is really used)
    wrong = graphs["large.tokens"](patches, pos, torch.zeros_like(gather_kv(kv_cache, context_idx)), *list(feeds.values())[1:])
    assert (wrong - expected).abs().max() > 1e-3


def test_patchify_roundtrip_and_positions():
    x = torch.randn(2, 16, 8, 6)
    assert torch.equal(unpatchify(patchify(x, 2), 16, 8, 6, 2), x)
    pos = position_ids(8, 6, 2, pos_embed_max_size=6)
    # a 4×3 grid centred in a 6×6 table: top = 1, left = 1
    assert pos[:3].tolist() == [7, 8, 9] and pos[3].item() == 13
