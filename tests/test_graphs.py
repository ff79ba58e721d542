import pytest
import torch

from hs_runtime.contract import VELOCITY, ModelDims, context_names, graph_spec, kv_names, text_context_names, text_kv_names
from hs_runtime.graphs import _FOLDED, build_graphs
from hs_runtime.tokens import gather_tokens, patchify, position_ids, unpatchify

from conftest import random_full_inputs

H, W, T = 16, 12, 85  # non-square latent, tiny text length
N = (H // 2) * (W // 2)


def _feeds(dims, patches, pos, full, image_kv=None, text_kv=None):
    """Graph feeds in spec order: empty contexts unless given; text recomputed unless text_kv."""
    b = patches.shape[0]
    empty = torch.zeros(b, 0, dims.hidden)
    feeds = {
        "patches": patches,
        "token_pos": pos,
        "encoder_hidden_states": full["encoder_hidden_states"] if text_kv is None else full["encoder_hidden_states"][:, :0],
        "pooled_projections": full["pooled_projections"],
        "timestep": full["timestep"],
    }
    for i in range(dims.kv_entries):
        feeds.update(zip(context_names(i), (empty, empty) if image_kv is None else image_kv[i]))
    for j in range(dims.text_entries):
        feeds.update(zip(text_context_names(j), (empty, empty) if text_kv is None else text_kv[j]))
    return feeds


def _run(graph, feeds):
    out = graph(*[feeds[n] for n in graph.spec.input_names])
    return dict(zip(graph.spec.output_names, out))


def _dense(graph, full):
    dims = graph.dims
    pos = position_ids(H, W, 2, dims.pos_embed_max_size)[None].expand(2, -1)
    return _run(graph, _feeds(dims, patchify(full["hidden_states"], 2), pos, full))


def _subset(graph, full, seed, complex_count):
    """A dense pass, then the inputs of a subset call on random complex tokens with the dense
    pass's image K/V of the others as context, and the expected velocity of those tokens."""
    dims = graph.dims
    dense = _dense(graph, full)
    g = torch.Generator().manual_seed(seed)
    complex_idx = torch.stack([torch.randperm(N, generator=g)[:complex_count].sort().values for _ in range(2)])
    chosen = torch.zeros(2, N, dtype=torch.bool).scatter(1, complex_idx, True)
    context_idx = torch.stack([torch.nonzero(~row).squeeze(1) for row in chosen])
    pos = position_ids(H, W, 2, dims.pos_embed_max_size)[complex_idx]
    patches = gather_tokens(patchify(full["hidden_states"], 2), complex_idx)
    context = [tuple(gather_tokens(dense[n], context_idx) for n in kv_names(i)) for i in range(dims.kv_entries)]
    return dense, complex_idx, patches, pos, context, gather_tokens(dense[VELOCITY], complex_idx)


@pytest.fixture(scope="module")
def setup(tiny_models):
    small, large = tiny_models
    graphs = build_graphs(small, large)
    full = random_full_inputs(ModelDims.from_config(large.config), 2, H, W, T)
    return {"small": small, "large": large}, graphs, full


@pytest.mark.parametrize("role", ["small", "large"])
@torch.no_grad()
def test_dense_call_equals_diffusers_forward(setup, role):
    models, graphs, full = setup
    out = _dense(graphs[role], full)
    reference = models[role](*full.values(), return_dict=False)[0]
    assert (unpatchify(out[VELOCITY], 16, H, W, 2) - reference).abs().max() <= 1e-5


@torch.no_grad()
def test_kv_outputs_a_k_and_a_v_tensor_per_module(setup):
    models, graphs, full = setup
    out = _dense(graphs["large"], full)
    dims = graphs["large"].dims
    # 2 layers + 1 dual-attention layer see image tokens; every layer's joint attention sees text
    assert dims.kv_entries == 3 and dims.text_entries == 2
    assert all(out[n].shape == (2, N, dims.hidden) for i in range(3) for n in kv_names(i))
    assert all(out[n].shape == (2, T, dims.hidden) for j in range(2) for n in text_kv_names(j))
    assert not torch.equal(*(out[n] for n in kv_names(0)))  # K is not V
    assert set(graph_spec("large", dims).output_names) == set(out)


@pytest.mark.parametrize("role", ["small", "large"])
@torch.no_grad()
def test_cached_context_makes_token_subset_exact(setup, role):
    _, graphs, full = setup
    graph, dims = graphs[role], graphs[role].dims
    dense, complex_idx, patches, pos, context, expected = _subset(graph, full, seed=1, complex_count=13)
    out = _run(graph, _feeds(dims, patches, pos, full, context))
    assert (out[VELOCITY] - expected).abs().max() <= 1e-4
    # the fresh K/V of the subset are the dense pass's at those tokens
    for name in kv_names(0):
        assert (out[name] - gather_tokens(dense[name], complex_idx)).abs().max() <= 1e-4
    # and a stale or missing context does change the answer (the cache is really used)
    wrong = _run(graph, _feeds(dims, patches, pos, full, [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in context]))
    assert (wrong[VELOCITY] - expected).abs().max() > 1e-3


@pytest.mark.parametrize("role", ["small", "large"])
@torch.no_grad()
def test_text_kv_from_the_same_step_is_exact(setup, role):
    """Text queries 0 with the text K/V that this very step produces = recomputing the text."""
    _, graphs, full = setup
    graph, dims = graphs[role], graphs[role].dims
    dense, _, patches, pos, context, expected = _subset(graph, full, seed=2, complex_count=20)
    text = [tuple(dense[n] for n in text_kv_names(j)) for j in range(dims.text_entries)]
    out = _run(graph, _feeds(dims, patches, pos, full, context, text))
    assert out[text_kv_names(0)[0]].shape == (2, 0, dims.hidden)  # no text recomputed
    assert (out[VELOCITY] - expected).abs().max() <= 1e-4
    stale = _run(graph, _feeds(dims, patches, pos, full, context, [(k.flip(1) * 0.5, v.flip(1) * 0.5) for k, v in text]))
    assert (stale[VELOCITY] - expected).abs().max() > 1e-3


@torch.no_grad()
def test_a_call_without_text_queries_skips_the_text_modulation(setup, monkeypatch):
    """With the text K/V from a cache, each block's text AdaLN linear runs on no rows, so its
    weights (half the block's AdaLN) go unread; with text recomputed, on every sample."""
    _, graphs, full = setup
    graph, dims = graphs["large"], graphs["large"].dims
    dense, _, patches, pos, context, _ = _subset(graph, full, seed=3, complex_count=5)
    text = [tuple(dense[n] for n in text_kv_names(j)) for j in range(dims.text_entries)]
    text_weights = {id(block.norm1_context.linear.weight) for block in graph.transformer.transformer_blocks}
    rows, linear = [], torch.nn.functional.linear

    def spy(x, weight, bias=None):
        if id(weight) in text_weights:
            rows.append(x.shape[:-1].numel())
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    _run(graph, _feeds(dims, patches, pos, full, context, text))
    assert rows == [0] * dims.num_layers
    rows.clear()
    _run(graph, _feeds(dims, patches, pos, full, context))
    assert rows == [2] * dims.num_layers


def test_the_eager_graph_folds_the_adaln_bias_once_per_weights(setup):
    """Under inference mode (the torch backend) each AdaLN bias with its ``1 +`` is made once and
    reused with the values of the per-call form (the export's); an in-place weight update or a
    swapped storage makes a new one."""
    _, graphs, full = setup
    graph = graphs["large"]
    feeds = _feeds(graph.dims, patchify(full["hidden_states"], 2), position_ids(H, W, 2, graph.dims.pos_embed_max_size)[None].expand(2, -1), full)
    linear = graph.transformer.transformer_blocks[0].norm1.linear
    with torch.no_grad():
        expected = _run(graph, feeds)[VELOCITY]  # outside inference mode: folded on every call
    with torch.inference_mode():
        first = _run(graph, feeds)[VELOCITY]
        folded = _FOLDED[linear][-1]
        second = _run(graph, feeds)[VELOCITY]
        assert _FOLDED[linear][-1] is folded
    assert torch.equal(first, expected) and torch.equal(second, expected)
    original = linear.bias.detach().clone()
    try:
        with torch.no_grad():
            linear.bias.add_(0.5)
            changed = _run(graph, feeds)[VELOCITY]
        with torch.inference_mode():
            cached = _run(graph, feeds)[VELOCITY]
        assert _FOLDED[linear][-1] is not folded
        assert torch.equal(cached, changed) and not torch.equal(changed, expected)
        with torch.no_grad():
            linear.bias.data = linear.bias.data * 2  # as module.to(dtype) casts: the same Parameter, new storage
            swapped = _run(graph, feeds)[VELOCITY]
        with torch.inference_mode():
            assert torch.equal(_run(graph, feeds)[VELOCITY], swapped) and not torch.equal(swapped, changed)
    finally:
        with torch.no_grad():
            linear.bias.copy_(original)


def test_patchify_roundtrip_and_positions():
    x = torch.randn(2, 16, 8, 6)
    assert torch.equal(unpatchify(patchify(x, 2), 16, 8, 6, 2), x)
    pos = position_ids(8, 6, 2, pos_embed_max_size=6)
    # a 4×3 grid centred in a 6×6 table: top = 1, left = 1
    assert pos[:3].tolist() == [7, 8, 9] and pos[3].item() == 13
