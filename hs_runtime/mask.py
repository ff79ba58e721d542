"""Complexity mask: which image tokens the large model keeps refining in the hybrid stage.

Everything stays on the latents' device; the token count ``K = ceil(r·N)`` is a host integer, so
selecting a fixed mask needs no host synchronisation (the adaptive mask reads one integer back
per capture step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .contract import complex_token_count
from .plans import MaskConfig
from .tokens import patchify


@dataclass
class TokenMask:
    """The complex/context split of the image tokens, per prompt.

    Attributes:
        complex_idx: ``[P, K]`` sorted indices of complex tokens.
        context_idx: ``[P, N_img − K]`` sorted indices of the other tokens.
        scores: ``[P, N_img]`` the scores the split came from.
    """

    complex_idx: torch.Tensor
    context_idx: torch.Tensor
    scores: torch.Tensor

    def for_batch(self, cfg: bool) -> "TokenMask":
        """Repeats the mask for a ``[uncond; cond]`` CFG batch: both halves share one mask."""
        if not cfg:
            return self
        return TokenMask(*(torch.cat([t, t]) for t in (self.complex_idx, self.context_idx, self.scores)))

    def counts(self) -> torch.Tensor:
        """``[P]`` complex tokens per prompt (a row padded with repeats counts each token once:
        prompts of one result denoised in separate calls with an adaptive mask)."""
        return self.as_grid(1, self.scores.shape[1]).sum(dim=(1, 2))

    def as_grid(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """``[P, h, w]`` bool map of complex tokens (for overlays)."""
        p, n = self.scores.shape
        grid = torch.zeros(p, n, dtype=torch.bool, device=self.scores.device)
        grid.scatter_(1, self.complex_idx, True)
        return grid.reshape(p, grid_h, grid_w)


def refined_grid(masks, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[P, h, w]`` bool map of every token the large model refined in a run: the union of its
    masks (a plan with refreshes or re-selection picks a new mask at each capture step)."""
    return torch.stack([m.as_grid(grid_h, grid_w) for m in masks]).any(dim=0)


def used_shares(masks) -> torch.Tensor:
    """``[P]`` share of the image tokens a run's masks held per prompt, averaged over its masks
    (from :meth:`TokenMask.counts`, not the index width, which repeats pad where one result joins
    several calls): what an adaptive mask costs."""
    return torch.stack([m.counts() for m in masks]).float().mean(0) / masks[0].scores.shape[1]


def disagreement_scores(v_large: torch.Tensor, v_small: torch.Tensor, patch_size: int) -> torch.Tensor:
    """‖v_large − v_small‖₂ per token of the guided velocities: ``[P, C, H, W]`` → ``[P, N]``."""
    return patchify((v_large - v_small).float(), patch_size).norm(dim=-1)


def detail_scores(latents: torch.Tensor, v_large: torch.Tensor, sigma: float, patch_size: int) -> torch.Tensor:
    """Local high-frequency energy of the predicted clean latent ``x̂0 = x − σ·v`` per token."""
    x0 = (latents.float() - sigma * v_large.float())
    blurred = F.avg_pool2d(F.pad(x0, (1, 1, 1, 1), mode="replicate"), kernel_size=3, stride=1)
    return patchify((x0 - blurred) ** 2, patch_size).sum(dim=-1)


def dilate_scores(scores: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Max over each token's 3×3 neighbourhood, so neighbours of complex tokens rank high too."""
    grid = scores.reshape(-1, 1, grid_h, grid_w)
    return F.max_pool2d(grid, kernel_size=3, stride=1, padding=1).reshape(scores.shape)


SNAP_STEPS = 16  # adaptive counts are rounded up to N/16 steps: few distinct shapes per engine


def adaptive_token_count(scores: torch.Tensor, config: MaskConfig) -> int:
    """The adaptive mask's token count for a batch of ``[P, N]`` scores (see :class:`MaskConfig`).

    Per prompt, the fewest top tokens whose energy reaches ``energy`` of the total (squared
    scores for ``disagreement``, a norm; the ``detail`` score is an energy already); the
    batch's largest, rounded up to a multiple of ``ceil(N / 16)`` and clamped to
    ``[ceil(min_ratio·N), ceil(ratio·N)]``. Reads one integer back to the host (once per capture
    step): the graphs' token count is a host-side shape.
    """
    n = scores.shape[1]
    low, high = complex_token_count(config.min_ratio, n), complex_token_count(config.ratio, n)
    weights = scores.float().pow(2) if config.signal == "disagreement" else scores.float().clamp_min(0)
    energy = weights.sort(dim=1, descending=True).values.cumsum(dim=1)
    needed = config.energy * energy[:, -1:] * (1 - 1e-6)  # float sums: energy=1 must reach N
    per_prompt = (energy < needed).sum(dim=1) + 1
    count = int(per_prompt.max())
    step = -(-n // SNAP_STEPS)
    return max(low, min(high, -(-count // step) * step))


def select_tokens(scores: torch.Tensor, ratio: float, count: int | None = None) -> TokenMask:
    """Top ``count`` (default ``ceil(ratio · N)``) tokens by score and their complement.

    Exact ties (a flat region's equal scores) go to the lower token index on every device: a
    stable sort, where ``torch.topk`` breaks them one way on the CPU and another on CUDA.
    """
    n = scores.shape[1]
    k = complex_token_count(ratio, n) if count is None else count
    complex_idx = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    chosen = torch.zeros_like(scores, dtype=torch.int8).scatter_(1, complex_idx, 1)
    # Stable sort puts the unchosen (0) positions first, in index order.
    context_idx = torch.sort(chosen, dim=1, stable=True).indices[:, : n - k]
    return TokenMask(complex_idx, context_idx, scores)


def compute_mask(
    config: MaskConfig,
    latents: torch.Tensor,
    v_large: torch.Tensor,
    v_small: torch.Tensor | None,
    sigma: float,
    patch_size: int,
    count: int | None = None,
) -> TokenMask:
    """Scores the tokens with the configured signal and selects the complex ones, per prompt.

    Args:
        latents: ``[P, C, H, W]`` latents of the step the mask is taken at.
        v_large / v_small: ``[P, C, H, W]`` guided velocities there (``v_small`` only for
            ``disagreement``).
        count: a fixed token count (re-selection keeps the capture step's); default: the
            config's ratio, or the adaptive count.
    """
    if config.signal == "disagreement":
        scores = disagreement_scores(v_large, v_small, patch_size)
    else:
        scores = detail_scores(latents, v_large, sigma, patch_size)
    if config.dilate:
        h, w = latents.shape[-2] // patch_size, latents.shape[-1] // patch_size
        scores = dilate_scores(scores, h, w)
    if count is None and config.energy:
        count = adaptive_token_count(scores, config)
    return select_tokens(scores, config.ratio, count)
