"""Image distances to the large model's image, from torchmetrics.

PSNR and SSIM always; MS-SSIM where the image is large enough for its five scales; LPIPS only
when torchvision and its backbone weights are already in the torch hub cache (nothing is ever
downloaded here). PSNR is also split inside / outside the complex-token region, so a reader sees
where the error sits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

# MS-SSIM with torchmetrics' default 5 betas and an 11-px kernel: torchmetrics refuses a side
# unless side // 2⁴ > 11 − 1, i.e. side >= 176 (161–175 raise inside torchmetrics).
MS_SSIM_MIN_SIDE = 176


@dataclass(frozen=True)
class LpipsStatus:
    available: bool
    reason: str  # why not, in a few words (shown in tables)


def lpips_status(net: str = "alex") -> LpipsStatus:
    """Whether LPIPS can run without a download: torchvision and cached backbone weights."""
    try:
        import torchvision
    except ImportError:
        return LpipsStatus(False, "not available (torchvision not installed)")
    weights = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}[net]
    url = getattr(torchvision.models, weights).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cached.is_file():
        return LpipsStatus(False, f"not available (weights not cached: {cached.name})")
    return LpipsStatus(True, f"LPIPS ({net})")


class ImageDistance:
    """Per-image distances of a batch of images to their references.

    Images are float tensors ``[N, 3, H, W]`` in [0, 1].
    """

    def __init__(self, lpips_net: str = "alex"):
        self.lpips = lpips_status(lpips_net)
        self._lpips_metric = None
        self._lpips_net = lpips_net

    def _lpips(self, images: torch.Tensor, references: torch.Tensor) -> list[float | None]:
        if not self.lpips.available:
            return [None] * images.shape[0]
        if self._lpips_metric is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self._lpips_metric = LearnedPerceptualImagePatchSimilarity(net_type=self._lpips_net, normalize=True).eval()
        return [float(self._lpips_metric(a[None], b[None])) for a, b in zip(images, references)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, references: torch.Tensor, regions: torch.Tensor | None = None) -> list[dict]:
        """Distances per image.

        Args:
            regions: ``[N, H, W]`` bool, the complex-token region in pixels, or ``None``.

        Returns:
            One dict per image: ``psnr``, ``ssim``, ``ms_ssim`` (or ``None``), ``lpips`` (or
            ``None``), ``psnr_inside`` / ``psnr_outside`` (or ``None``). Identical images give
            ``psnr = inf``.
        """
        from torchmetrics.functional.image import (
            multiscale_structural_similarity_index_measure,
            structural_similarity_index_measure,
        )

        images, references = images.float(), references.float()
        squared = (images - references) ** 2
        psnr = [_psnr(e.mean()) for e in squared]
        ssim = structural_similarity_index_measure(images, references, data_range=1.0, reduction="none").tolist()
        if min(images.shape[-2:]) >= MS_SSIM_MIN_SIDE:
            ms_ssim = multiscale_structural_similarity_index_measure(images, references, data_range=1.0, reduction="none").tolist()
        else:
            ms_ssim = [None] * images.shape[0]
        lpips = self._lpips(images, references)
        rows = []
        for i in range(images.shape[0]):
            inside = outside = None
            if regions is not None:
                region = regions[i].to(squared.device)
                per_pixel = squared[i].mean(0)
                inside = _psnr(per_pixel[region].mean()) if region.any() else None
                outside = _psnr(per_pixel[~region].mean()) if (~region).any() else None
            rows.append({"psnr": psnr[i], "ssim": ssim[i], "ms_ssim": ms_ssim[i], "lpips": lpips[i], "psnr_inside": inside, "psnr_outside": outside})
        return rows


def _psnr(mse: torch.Tensor) -> float:
    value = float(mse)
    return math.inf if value <= 0 else 10 * math.log10(1.0 / value)


def to_tensor(images) -> torch.Tensor:
    """PIL images → ``[N, 3, H, W]`` float in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2).float() / 255


def region_pixels(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A token grid ``[N, h, w]`` (bool) blown up to pixels ``[N, height, width]``."""
    n, h, w = grid.shape
    return grid[:, :, None, :, None].expand(n, h, height // h, w, width // w).reshape(n, height, width)
