"""Latent ↔ token layout and device-side gather/scatter used by the mask and the merge.

A token is one ``p × p`` latent patch flattened in (row, column, channel) order — the order
SD3's ``proj_out`` emits velocity patches in — so raw latent patches and velocity patches share
one layout ``[B, N, P]`` with ``P = p² · C``.
"""

from __future__ import annotations

import torch


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, N, p²·C]`` with tokens in row-major grid order."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, channels: int, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, p²·C]`` → ``[B, C, H, W]``."""
    b = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(b, height // p, width // p, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)


def position_ids(height: int, width: int, patch_size: int, pos_embed_max_size: int, device=None) -> torch.Tensor:
    """Indices ``[N_img]`` of each image token into the model's ``max² `` position table.

    Mirrors diffusers' ``PatchEmbed.cropped_pos_embed``: the grid is centred in the table.
    """
    h, w = height // patch_size, width // patch_size
    top = (pos_embed_max_size - h) // 2
    left = (pos_embed_max_size - w) // 2
    rows = torch.arange(top, top + h, device=device)
    cols = torch.arange(left, left + w, device=device)
    return (rows[:, None] * pos_embed_max_size + cols[None, :]).reshape(-1)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N, X]``, ``index [B, K]`` → ``[B, K, X]``."""
    return torch.gather(tokens, 1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(tokens: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Returns ``tokens`` with rows ``index [B, K]`` replaced by ``values [B, K, X]`` (out of place)."""
    return tokens.scatter(1, index[:, :, None].expand(-1, -1, tokens.shape[-1]), values)
