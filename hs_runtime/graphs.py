"""The engine contract's graph as a PyTorch module over a loaded diffusers SD3 model.

:class:`TokenGraph` holds the diffusers ``SD3Transformer2DModel`` itself (no weight copies) and
re-runs its blocks with explicit attention, so the query tokens' image and text K/V can be
returned and the K/V of tokens that are not recomputed can be taken from inputs. No Python
branches on tensor values, so the module exports to ONNX with dynamic batch, token, context and
text counts (zero included).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .contract import GRAPH_NAMES, ModelDims, graph_spec
from .upcast import run_planned


# Reshapes spell every size out (head count and width as Python ints, never -1): ONNX Runtime
# cannot infer a -1 from a tensor with zero elements, and the contract's token axes can be 0.
def _split_heads(x: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, width // heads)


def _merge_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], width)


def _project(linear: nn.Module, norm: nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Linear projection plus optional per-head qk-norm, returned as ``[B, N, D]``."""
    y = linear(x)
    if norm is not None:
        y = _merge_heads(norm(_split_heads(y, heads, linear.out_features)), linear.out_features)
    return y


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    q, k, v = (_split_heads(t, heads, width).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return _merge_heads(out.transpose(1, 2), width).to(q.dtype)


def _with_context(fresh: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return fresh if context is None else torch.cat([fresh, context.to(fresh.dtype)], dim=1)


def joint_attention(attn, img, txt, counts, context_kv=None, text_context_kv=None):
    """SD3 joint attention (image + text stream), with optional cached image and text K/V.

    Keys are ``[fresh image; cached image; fresh text; cached text]``; softmax attention does not
    depend on key order, so any split of the tokens into fresh and cached gives diffusers' result
    when the cached K/V are those the tokens would produce.

    Args:
        attn: a diffusers ``Attention`` with ``added_kv_proj_dim`` (the MMDiT joint attention).
        img: ``[B, N, D]`` normalised image tokens that are recomputed.
        txt: ``[B, T_q, D]`` normalised text tokens that are recomputed (``T_q`` may be 0).
        counts: ``(N, T_q)``, read once off the graph's inputs (:class:`TokenGraph`), so the
            export reads the shapes once per graph rather than once per block.
        context_kv / text_context_kv: ``None`` or ``(k, v)``, each ``[B, M, D]`` / ``[B, T_c, D]``.

    Returns:
        ``(img_out [B, N, D], txt_out [B, T_q, D] or None, (k_img, v_img), (k_txt, v_txt))``.
    """
    h = attn.heads
    q_i = _project(attn.to_q, attn.norm_q, img, h)
    k_i = _project(attn.to_k, attn.norm_k, img, h)
    v_i = attn.to_v(img)
    k_t = _project(attn.add_k_proj, attn.norm_added_k, txt, h)
    v_t = attn.add_v_proj(txt)
    ctx_k, ctx_v = context_kv if context_kv is not None else (None, None)
    tctx_k, tctx_v = text_context_kv if text_context_kv is not None else (None, None)
    keys = torch.cat([_with_context(k_i, ctx_k), _with_context(k_t, tctx_k)], dim=1)
    values = torch.cat([_with_context(v_i, ctx_v), _with_context(v_t, tctx_v)], dim=1)
    width = attn.to_q.out_features
    if attn.context_pre_only:  # the last block drops its text output: no text queries needed
        out_img = _attend(q_i, keys, values, h, width)
        txt_out = None
    else:
        q_t = _project(attn.add_q_proj, attn.norm_added_q, txt, h)
        out = _attend(torch.cat([q_i, q_t], dim=1), keys, values, h, width)
        out_img, out_txt = out.split(list(counts), dim=1)
        txt_out = attn.to_add_out(out_txt)
    img_out = attn.to_out[1](attn.to_out[0](out_img))
    return img_out, txt_out, (k_i, v_i), (k_t, v_t)


def self_attention(attn, img, context_kv=None):
    """SD3.5 dual (image-only) attention ``attn2``, with optional cached K/V context."""
    h = attn.heads
    q = _project(attn.to_q, attn.norm_q, img, h)
    k = _project(attn.to_k, attn.norm_k, img, h)
    v = attn.to_v(img)
    ctx_k, ctx_v = context_kv if context_kv is not None else (None, None)
    out = _attend(q, _with_context(k, ctx_k), _with_context(v, ctx_v), h, attn.to_q.out_features)
    return attn.to_out[1](attn.to_out[0](out)), k, v


# linear → (the tensor the folded bias was made from, (its in-place version, address, dtype, device, scales, width), folded bias)
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _folded_bias(linear: nn.Module, width: int, scales: tuple[int, ...]) -> torch.Tensor | None:
    """``linear``'s bias with 1 added to the chunks at ``scales`` (see :func:`modulation`).

    Exported, it stays an expression of the weights with scalar constants only (no
    ``[parts·D]`` constant in the graph file; the runtimes fold it at load). Run eagerly under
    ``torch.inference_mode`` (the torch backend) it is made once per weights and reused, instead
    of a split, an add per scale and a concatenation per norm on every call (~100 small kernels
    per SD3.5-large call). The cache holds the bias tensor it was made from, that tensor's
    in-place version and its storage (address, dtype, device), so replaced, moved, cast (in place
    too: ``module.to`` swaps ``param.data``) or reloaded weights make a new one. In-place edits
    through ``param.data`` bump no version: after those, ``_FOLDED.clear()``."""
    bias = linear.bias
    if not scales:
        return bias
    source = bias if bias is not None else linear.weight
    # weights made under inference mode keep no version counter: those are folded on every call
    eager = torch.is_inference_mode_enabled() and not (source.is_inference() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())
    if eager:
        cached = _FOLDED.get(linear)
        key = (source._version, source.data_ptr(), source.dtype, source.device, scales, width)
        if cached is not None and cached[0] is source and cached[1] == key:
            return cached[2]
    if bias is None:
        bias = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
    folded = torch.cat([b + 1 if i in scales else b for i, b in enumerate(bias.split(width))])
    if eager:
        _FOLDED[linear] = (source, key, folded)
    return folded


def modulation(norm: nn.Module, temb: torch.Tensor, parts: int, scales: tuple[int, ...] = (), dtype: torch.dtype | None = None, tokens=None) -> tuple[torch.Tensor, ...]:
    """An AdaLN module's ``linear(silu(temb))`` cut into ``parts`` tensors ``[B, 1, D]`` that
    broadcast over tokens; the chunks at ``scales`` come back as ``1 + chunk``.

    ``tokens``: the token count of the stream modulated, where it may be 0 (the text stream of a
    call that takes its text K/V from a cache). With no tokens the linear runs on no rows and the
    chunks are ``[B, 0, D]``: half of a block's AdaLN weights (its text half, as large as its
    attention projections) is then not read on such a call.

    diffusers' ``emb.chunk(k, dim=1)`` followed by ``[:, None]`` exports as shape arithmetic plus
    one Slice and one Unsqueeze per chunk (~20 ONNX nodes per norm, ~40 per block); one Unsqueeze
    and one Split of fixed sizes compute the same values (the sizes are Python ints here). The
    ``1 +`` of diffusers' ``norm(x) * (1 + scale)`` goes into the linear's bias: a constant
    expression of weights that ONNX Runtime folds at session start and TensorRT at build, instead
    of one Add per scale on every call (two to four per block).
    """
    act = norm.silu(temb)
    act = act if dtype is None else act.to(dtype)
    linear = norm.linear
    width = linear.out_features // parts
    bias = _folded_bias(linear, width, scales)
    if tokens is None:
        emb = F.linear(act, linear.weight, bias).unsqueeze(1)
    else:  # [B, 1, C][:, :tokens] is [B, 0, C] or [B, 1, C]: a slice's end is clamped to the axis
        # (torch and ONNX Slice alike), so no arithmetic on the count, and no Reshape to a
        # computed 0, which ONNX reads as "copy this axis from the input" (TensorRT Developer
        # Guide, "Working with Empty Tensors": matrix multiply and slice take empty tensors; a
        # shuffle needs its placeholder zero off to make one)
        emb = F.linear(act.unsqueeze(1)[:, :tokens], linear.weight, bias)
    return emb.split([width] * parts, dim=2)


def ada_norm_zero(norm: nn.Module, x: torch.Tensor, temb: torch.Tensor, tokens=None) -> tuple[torch.Tensor, ...]:
    """diffusers' ``AdaLayerNormZero`` (SD3) or ``SD35AdaLayerNormZeroX`` (SD3.5 dual attention)
    forward with :func:`modulation`: the same values, the gates and MLP modulations ``[B, 1, D]``
    (the MLP scale as its factor ``1 + scale``)."""
    kind = type(norm).__name__
    if kind == "SD35AdaLayerNormZeroX":
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = modulation(norm, temb, 9, scales=(1, 4, 7), tokens=tokens)
        normed = norm.norm(x)
        return normed * scale + shift, gate, shift_mlp, scale_mlp, gate_mlp, normed * scale2 + shift2, gate2
    if kind == "AdaLayerNormZero" and norm.emb is None:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = modulation(norm, temb, 6, scales=(1, 4), tokens=tokens)
        return norm.norm(x) * scale + shift, gate, shift_mlp, scale_mlp, gate_mlp
    raise NotImplementedError(f"the SD3 graph does not know the norm {kind}")


def ada_norm_continuous(norm: nn.Module, x: torch.Tensor, temb: torch.Tensor, tokens=None) -> torch.Tensor:
    """diffusers' ``AdaLayerNormContinuous`` forward (``norm_out``, the last block's text norm)
    with :func:`modulation`."""
    scale, shift = modulation(norm, temb, 2, scales=(0,), dtype=x.dtype, tokens=tokens)
    return norm.norm(x) * scale + shift


def joint_block(block, img, txt, temb, context_kv=(), text_context_kv=None, counts=None):
    """One ``JointTransformerBlock`` forward, equal to diffusers', exposing image and text K/V.

    Args:
        context_kv: per attention module of this block that sees image tokens (``attn``, then
            ``attn2`` for dual-attention blocks) a ``(k, v)`` pair of cached context, or empty.
        text_context_kv: ``(k, v)`` of cached text tokens for ``attn``, or ``None``.
        counts: ``(N, T_q)``, as in :func:`joint_attention`; ``None`` reads them off ``img`` and ``txt``.

    Returns:
        ``(img, txt, kv, text_kv)``: ``kv`` lists the fresh image ``(k, v)`` per module,
        ``text_kv`` is the fresh text ``(k, v)`` of this block.
    """
    ctx = list(context_kv) or [None, None]
    counts = counts or (img.shape[1], txt.shape[1])
    if block.use_dual_attention:
        n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp, n_img2, gate_msa2 = ada_norm_zero(block.norm1, img, temb)
    else:
        n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_norm_zero(block.norm1, img, temb)
    if block.context_pre_only:
        n_txt = ada_norm_continuous(block.norm1_context, txt, temb, counts[1])
    else:
        n_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ada_norm_zero(block.norm1_context, txt, temb, counts[1])

    attn_img, attn_txt, kv_img, kv_txt = joint_attention(block.attn, n_img, n_txt, counts, ctx[0], text_context_kv)
    kv = [kv_img]
    img = img + gate_msa * attn_img
    if block.use_dual_attention:
        attn_img2, k2, v2 = self_attention(block.attn2, n_img2, ctx[1])
        kv.append((k2, v2))
        img = img + gate_msa2 * attn_img2

    n_img = block.norm2(img) * scale_mlp + shift_mlp
    img = img + gate_mlp * block.ff(n_img)

    if block.context_pre_only:
        txt = None
    else:
        txt = txt + c_gate_msa * attn_txt
        n_txt = block.norm2_context(txt) * c_scale_mlp + c_shift_mlp
        txt = txt + c_gate_mlp * block.ff_context(n_txt)
    return img, txt, kv, kv_txt


def kv_entries_per_block(transformer) -> list[int]:
    """How many image K/V entries each block owns (1, or 2 with dual attention)."""
    return [2 if b.use_dual_attention else 1 for b in transformer.transformer_blocks]


class TokenGraph(nn.Module):
    """One model's graph (``small`` or ``large``): the transformer on ``N`` query tokens.

    ``forward`` takes the inputs of :func:`~hs_runtime.contract.graph_spec` in order —
    ``patches [B, N, P]``, ``token_pos [B, N]``, ``encoder_hidden_states [B, T_q, J]``,
    ``pooled_projections [B, Q]``, ``timestep [B]``, then the image context K and V
    ``[B, M, D]`` per attention module and the text context K and V ``[B, T_c, D]`` per block —
    and returns its outputs in order: ``velocity_tokens [B, N, P]``, the fresh image K and V
    ``[B, N, D]`` per module and the fresh text K and V ``[B, T_q, D]`` per block.

    Patches are raw latent patches in (row, column, channel) order and ``token_pos`` indexes the
    model's ``pos_embed_max_size²`` position table, so one graph serves every resolution.
    """

    def __init__(self, transformer, name: str):
        super().__init__()
        if name not in GRAPH_NAMES:
            raise ValueError(f"graph name must be one of {GRAPH_NAMES}, got {name!r}")
        self.transformer = transformer
        self.graph_name = name
        self.dims = ModelDims.from_config(transformer.config)
        self.spec = graph_spec(name, self.dims)

    def forward(self, *inputs):
        return self.run(inputs, keep_kv=True)

    def run(self, inputs, keep_kv: bool = True) -> tuple[torch.Tensor, ...]:
        """The outputs in spec order; with ``keep_kv=False`` only ``(velocity_tokens,)`` (the torch
        backend's dense steps skip returning K/V nobody reads)."""
        patches, token_pos, encoder_hidden_states, pooled_projections, timestep, *contexts = inputs
        tr = self.transformer
        entries, layers = self.dims.kv_entries, self.dims.text_entries
        if len(contexts) != 2 * (entries + layers):
            raise ValueError(f"{self.graph_name}: expected {5 + 2 * (entries + layers)} inputs, got {5 + len(contexts)}")
        pairs = [(contexts[2 * i], contexts[2 * i + 1]) for i in range(entries + layers)]  # (k, v) per module
        image_context, text_context = pairs[:entries], pairs[entries:]
        conv = tr.pos_embed.proj
        # Conv2d with kernel = stride = p is a linear map of each (row, col, channel) patch.
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
        pos_table = tr.pos_embed.pos_embed[0]
        img = (F.linear(patches, weight, conv.bias) + F.embedding(token_pos, pos_table)).to(patches.dtype)
        txt = tr.context_embedder(encoder_hidden_states)
        temb = tr.time_text_embed(timestep, pooled_projections)
        counts = (patches.shape[1], encoder_hidden_states.shape[1])
        fresh, fresh_text, entry = [], [], 0
        for layer, (block, count) in enumerate(zip(tr.transformer_blocks, kv_entries_per_block(tr))):
            ctx = image_context[entry : entry + count]
            # blocks a reduced-precision build keeps in fp32 cast at their edges (hs_runtime.upcast)
            img, txt, kv, kv_txt = run_planned(block, joint_block, block, img, txt, temb, ctx, text_context[layer], counts)
            fresh.extend(kv)
            fresh_text.append(kv_txt)
            entry += count
        velocity = tr.proj_out(ada_norm_continuous(tr.norm_out, img, temb))
        if not keep_kv:
            return (velocity,)
        return (velocity, *(t for kv in fresh for t in kv), *(t for kv in fresh_text for t in kv))


def build_graphs(small, large) -> dict[str, TokenGraph]:
    """The two graph modules for a small/large transformer pair, in eval mode."""
    return {"small": TokenGraph(small, "small").eval(), "large": TokenGraph(large, "large").eval()}
