"""Flow-matching Euler schedule and classifier-free guidance, as SD3 uses them.

Kept free of diffusers so the runtime core needs only torch; tests assert equality with
diffusers' ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0


def flow_match_sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas ``[T+1]`` (ending in 0) and model timesteps ``[T]`` for ``steps`` Euler steps.

    Same arithmetic as ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``,
    including its shifted ``sigma_min`` bound.
    """
    n = NUM_TRAIN_TIMESTEPS
    train_sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n
    train_sigmas = shift * train_sigmas / (1 + (shift - 1) * train_sigmas)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    timesteps = sigmas * n
    return torch.cat([sigmas, torch.zeros(1)]), timesteps


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """``x ← x + (σ_next − σ) · v`` in fp32, returned in the latents' dtype (as diffusers does)."""
    out = latents.to(torch.float32) + (sigma_next - sigma) * velocity.to(torch.float32)
    return out.to(latents.dtype)


def guide(prediction: torch.Tensor, scale: float, cfg: bool) -> torch.Tensor:
    """Classifier-free guidance over a batch laid out ``[uncond; cond]``."""
    if not cfg:
        return prediction
    uncond, cond = prediction.chunk(2)
    return uncond + scale * (cond - uncond)
