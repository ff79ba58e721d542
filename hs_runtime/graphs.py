"""The three graphs of the engine contract as PyTorch modules over a loaded diffusers SD3 model.

They hold the diffusers ``SD3Transformer2DModel`` itself (no weight copies) and re-run its blocks
with explicit attention so that image-token K/V can be returned (``large.full``) or taken from a
cache for tokens that are not recomputed (``large.tokens``). No Python branches on tensor
values, so the modules export to ONNX with dynamic batch, resolution and token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .contract import LARGE_FULL, LARGE_TOKENS, SMALL_FULL


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads)


def _project(linear: nn.Module, norm: nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Linear projection plus optional per-head qk-norm, returned as ``[B, N, D]``."""
    y = linear(x)
    if norm is not None:
        y = norm(_split_heads(y, heads)).flatten(2)
    return y


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    q, k, v = (_split_heads(t, heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, n, d).to(q.dtype)


def _with_context(fresh: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return fresh if context is None else torch.cat([fresh, context.to(fresh.dtype)], dim=1)


def joint_attention(attn, img, txt, context_kv=None):
    """SD3 joint attention (image + text stream), with optional cached image K/V context.

    Args:
        attn: a diffusers ``Attention`` with ``added_kv_proj_dim`` (the MMDiT joint attention).
        img: ``[B, N, D]`` normalised image tokens that are recomputed.
        txt: ``[B, T, D]`` normalised text tokens.
        context_kv: ``None`` or ``(k, v)``, each ``[B, M, D]``: image tokens not recomputed.

    Returns:
        ``(img_out [B, N, D], txt_out [B, T, D] or None, k_img, v_img)``.
    """
    h = attn.heads
    q_i = _project(attn.to_q, attn.norm_q, img, h)
    k_i = _project(attn.to_k, attn.norm_k, img, h)
    v_i = attn.to_v(img)
    q_t = _project(attn.add_q_proj, attn.norm_added_q, txt, h)
    k_t = _project(attn.add_k_proj, attn.norm_added_k, txt, h)
    v_t = attn.add_v_proj(txt)
    ctx_k, ctx_v = context_kv if context_kv is not None else (None, None)
    keys = torch.cat([_with_context(k_i, ctx_k), k_t], dim=1)
    values = torch.cat([_with_context(v_i, ctx_v), v_t], dim=1)
    out = _attend(torch.cat([q_i, q_t], dim=1), keys, values, h)
    n = img.shape[1]
    img_out = attn.to_out[1](attn.to_out[0](out[:, :n]))
    txt_out = None if attn.context_pre_only else attn.to_add_out(out[:, n:])
    return img_out, txt_out, k_i, v_i


def self_attention(attn, img, context_kv=None):
    """SD3.5 dual (image-only) attention ``attn2``, with optional cached K/V context."""
    h = attn.heads
    q = _project(attn.to_q, attn.norm_q, img, h)
    k = _project(attn.to_k, attn.norm_k, img, h)
    v = attn.to_v(img)
    ctx_k, ctx_v = context_kv if context_kv is not None else (None, None)
    out = _attend(q, _with_context(k, ctx_k), _with_context(v, ctx_v), h)
    return attn.to_out[1](attn.to_out[0](out)), k, v


def joint_block(block, img, txt, temb, context_kv=()):
    """One ``JointTransformerBlock`` forward, equal to diffusers', exposing image K/V.

    Args:
        context_kv: per attention module of this block that sees image tokens (``attn``, then
            ``attn2`` for dual-attention blocks) a ``(k, v)`` pair of cached context, or empty.

    Returns:
        ``(img, txt, kv)`` where ``kv`` lists the fresh ``(k, v)`` of the image tokens per module.
    """
    ctx = list(context_kv) or [None, None]
    if block.use_dual_attention:
        n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp, n_img2, gate_msa2 = block.norm1(img, emb=temb)
    else:
        n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=temb)
    if block.context_pre_only:
        n_txt = block.norm1_context(txt, temb)
    else:
        n_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=temb)

    attn_img, attn_txt, k, v = joint_attention(block.attn, n_img, n_txt, ctx[0])
    kv = [(k, v)]
    img = img + gate_msa.unsqueeze(1) * attn_img
    if block.use_dual_attention:
        attn_img2, k2, v2 = self_attention(block.attn2, n_img2, ctx[1])
        kv.append((k2, v2))
        img = img + gate_msa2.unsqueeze(1) * attn_img2

    n_img = block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    img = img + gate_mlp.unsqueeze(1) * block.ff(n_img)

    if block.context_pre_only:
        txt = None
    else:
        txt = txt + c_gate_msa.unsqueeze(1) * attn_txt
        n_txt = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        txt = txt + c_gate_mlp.unsqueeze(1) * block.ff_context(n_txt)
    return img, txt, kv


def kv_entries_per_block(transformer) -> list[int]:
    """How many K/V cache entries each block owns (1, or 2 with dual attention)."""
    return [2 if b.use_dual_attention else 1 for b in transformer.transformer_blocks]


class _GraphBase(nn.Module):
    graph_name = ""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def _conditioning(self, encoder_hidden_states, pooled_projections, timestep):
        tr = self.transformer
        return tr.context_embedder(encoder_hidden_states), tr.time_text_embed(timestep, pooled_projections)

    def _blocks(self, img, txt, temb, kv_context=None):
        """Runs all blocks; returns the image stream and the per-entry fresh image K/V."""
        fresh, entry = [], 0
        for block, count in zip(self.transformer.transformer_blocks, kv_entries_per_block(self.transformer)):
            ctx = () if kv_context is None else [(kv_context[entry + i, 0], kv_context[entry + i, 1]) for i in range(count)]
            img, txt, kv = joint_block(block, img, txt, temb, ctx)
            fresh.extend(kv)
            entry += count
        return img, fresh

    def _head(self, img, temb):
        tr = self.transformer
        return tr.proj_out(tr.norm_out(img, temb))

    def _full(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        tr = self.transformer
        p = tr.config.patch_size
        b, _, height, width = hidden_states.shape
        img = tr.pos_embed(hidden_states).contiguous()
        txt, temb = self._conditioning(encoder_hidden_states, pooled_projections, timestep)
        img, fresh = self._blocks(img, txt, temb)
        out = self._head(img, temb)
        out = out.reshape(b, height // p, width // p, p, p, tr.out_channels)
        velocity = torch.einsum("nhwpqc->nchpwq", out).reshape(b, tr.out_channels, height, width)
        return velocity, fresh


class SmallFull(_GraphBase):
    """``small.full``: the whole model on all tokens → ``velocity [B, C, H, W]``."""

    graph_name = SMALL_FULL

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self._full(hidden_states, encoder_hidden_states, pooled_projections, timestep)[0]


class LargeFull(_GraphBase):
    """``large.full``: ``velocity [B, C, H, W]`` and ``kv_cache [L, 2, B, N_img, D]``."""

    graph_name = LARGE_FULL

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        velocity, fresh = self._full(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        kv_cache = torch.stack([torch.stack([k, v]) for k, v in fresh])
        return velocity, kv_cache

    def velocity_only(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """The velocity without materialising the cache (dense steps that need no cache)."""
        return self._full(hidden_states, encoder_hidden_states, pooled_projections, timestep)[0]


class LargeTokens(_GraphBase):
    """``large.tokens``: the large model on ``N`` gathered tokens with cached context K/V.

    Inputs are raw latent patches ``[B, N, P]`` and their indices ``[B, N]`` into the position
    table, so one graph serves every resolution inside ``pos_embed_max_size``.
    """

    graph_name = LARGE_TOKENS

    def forward(self, patches, token_pos, kv_context, encoder_hidden_states, pooled_projections, timestep):
        tr = self.transformer
        conv = tr.pos_embed.proj
        # Conv2d with kernel = stride = p is a linear map of each (row, col, channel) patch.
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
        pos_table = tr.pos_embed.pos_embed[0]
        img = F.linear(patches, weight, conv.bias) + F.embedding(token_pos, pos_table)
        img = img.to(patches.dtype)
        txt, temb = self._conditioning(encoder_hidden_states, pooled_projections, timestep)
        img, _ = self._blocks(img, txt, temb, kv_context)
        return self._head(img, temb)


GRAPH_MODULES = {SMALL_FULL: SmallFull, LARGE_FULL: LargeFull, LARGE_TOKENS: LargeTokens}


def build_graphs(small, large) -> dict[str, nn.Module]:
    """The three graph modules for a small/large transformer pair, in eval mode."""
    return {
        SMALL_FULL: SmallFull(small).eval(),
        LARGE_FULL: LargeFull(large).eval(),
        LARGE_TOKENS: LargeTokens(large).eval(),
    }
