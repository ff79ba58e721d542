"""CLIP score (torchmetrics ``CLIPScore``) from a local CLIP folder: prompt adherence for any weights.

``--clip-model DIR`` names a folder saved with ``CLIPModel.save_pretrained`` and
``CLIPProcessor.save_pretrained`` (``config.json``, the weights, the tokenizer and
``preprocessor_config.json``), e.g. a local copy of ``openai/clip-vit-large-patch14``. It is
loaded with ``local_files_only``: nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hs_runtime.errors import ConfigError, describe, first_line

_EXPECTED = "a folder saved with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained (config.json with model_type 'clip', weights, tokenizer, preprocessor config)"
_FIX = "pass a local CLIP folder (e.g. a saved copy of openai/clip-vit-large-patch14); nothing is downloaded"


def check_clip_folder(folder) -> Path:
    """Cheap checks before a run: ``folder`` exists and its ``config.json`` is a CLIP model's.

    Raises:
        ConfigError: one line naming what is wrong.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(describe("--clip-model is not a folder", got=str(path), expected=_EXPECTED, fix=_FIX))
    config = path / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None if config.is_file() else "no config.json"
    if model_type != "clip":
        raise ConfigError(describe("--clip-model holds no CLIP model", got=f"{path} ({model_type or 'unreadable config.json'})", expected=_EXPECTED, fix=_FIX))
    return path


class _Features(torch.nn.Module):
    """``CLIPModel`` as torchmetrics calls it: ``get_*_features`` returning tensors (transformers ≥ 5
    returns an output object whose ``pooler_output`` holds the projected features)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class ClipScorer:
    """Per-image CLIP score of images against their prompts (``max(100·cos, 0)``, torchmetrics)."""

    def __init__(self, folder):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        self.folder = check_clip_folder(folder)
        try:
            model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as exc:  # a damaged or partial folder: transformers' own reason, in one line
            raise ConfigError(describe("--clip-model cannot be loaded", got=f"{self.folder}: {first_line(exc)}", expected=_EXPECTED, fix=_FIX)) from None
        self.metric = CLIPScore(model_name_or_path=lambda: (_Features(model), processor))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        """Scores ``images`` ``[N, 3, H, W]`` (float, [0, 1]) against ``prompts`` (one each)."""
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        scores = []
        for image, prompt in zip(pixels, prompts):
            scores.append(float(self.metric(image, prompt)))  # forward: this image's score alone
        self.metric.reset()
        return scores
