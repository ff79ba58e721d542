"""Transformer configs of the presets, and random-weight models built from them with a fixed seed.

``tiny`` and ``bench`` are made for this project (tests, CPU benchmarks); ``sd3-medium``,
``sd3.5-medium`` and ``sd3.5-large`` are the published SD3 / SD3.5 transformer configs, used with
random weights for latency work where the real weights are absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError, describe


def _config(layers, heads, head_dim, pos_max, sample, joint, pooled, dual=(), qk_norm=None) -> dict:
    return dict(
        sample_size=sample,
        patch_size=2,
        in_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=joint,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled,
        out_channels=16,
        pos_embed_max_size=pos_max,
        dual_attention_layers=tuple(dual),
        qk_norm=qk_norm,
    )


@dataclass(frozen=True)
class PresetSpec:
    """A small/large pair and the run sizes it is meant for.

    Attributes:
        height / width: default image size in pixels (latent = image / 8).
        max_sequence_length: T5 tokens; text tokens = ``clip_tokens`` + this.
        clip_tokens: the CLIP tokenizers' length (SD3: 77).
        text_pipeline: whether the preset ships tiny text encoders + VAE (prompt-to-image).
        trained: weights trained here and shipped with the package (else random from ``seed``).
        steps / guidance_scale: what ``generate`` and ``quality`` use unless told otherwise.
    """

    name: str
    small: dict
    large: dict
    height: int
    width: int
    max_sequence_length: int = 256
    clip_tokens: int = 77
    text_pipeline: bool = False
    trained: bool = False
    seed: int = 0
    steps: int = 28
    guidance_scale: float = 7.0
    notes: str = field(default="", compare=False)

    @property
    def text_tokens(self) -> int:
        return self.clip_tokens + self.max_sequence_length


_TINY_TEXT = dict(joint=32, pooled=32)
SD35_MEDIUM_DUAL = tuple(range(13))

PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(
        "tiny",
        small=_config(2, 2, 8, pos_max=16, sample=16, **_TINY_TEXT),
        large=_config(2, 2, 16, pos_max=16, sample=16, dual=(0,), qk_norm="rms_norm", **_TINY_TEXT),
        height=128,
        width=128,
        max_sequence_length=8,
        text_pipeline=True,
        notes="tests: seconds on CPU; large has qk-norm and a dual-attention layer like SD3.5-medium",
    ),
    "bench": PresetSpec(
        "bench",
        small=_config(5, 4, 64, pos_max=64, sample=48, **_TINY_TEXT),
        large=_config(8, 6, 64, pos_max=64, sample=48, **_TINY_TEXT),
        height=384,
        width=384,
        max_sequence_length=77,
        text_pipeline=True,
        notes="CPU benchmarks: 48×48 latent, small/large FLOPs ≈ 0.3",
    ),
    "shapes": PresetSpec(
        "shapes",
        small=_config(4, 4, 32, pos_max=32, sample=16, joint=64, pooled=64, qk_norm="rms_norm"),
        large=_config(8, 5, 32, pos_max=32, sample=16, joint=64, pooled=64, qk_norm="rms_norm"),
        height=128,
        width=128,
        max_sequence_length=20,
        clip_tokens=20,
        text_pipeline=True,
        trained=True,
        steps=20,
        guidance_scale=4.5,
        notes="trained here on synthetic shape scenes (hs-export train-shapes): 128² px, 16×16 latent, small/large FLOPs 0.34",
    ),
}

# The published transformer configs (random weights where the real ones are absent).
MODEL_CONFIGS = {
    "sd3-medium": _config(24, 24, 64, pos_max=192, sample=128, joint=4096, pooled=2048),
    "sd3.5-medium": _config(24, 24, 64, pos_max=384, sample=128, joint=4096, pooled=2048, dual=SD35_MEDIUM_DUAL, qk_norm="rms_norm"),
    "sd3.5-large": _config(38, 38, 64, pos_max=192, sample=128, joint=4096, pooled=2048, qk_norm="rms_norm"),
}
for _name, _small, _large, _notes in (
    ("sd3.5-large", "sd3.5-medium", "sd3.5-large", "SD3.5-large stitched with SD3.5-medium"),
    ("sd3.5-large+sd3-medium", "sd3-medium", "sd3.5-large", "SD3.5-large stitched with SD3-medium"),
    ("sd3.5-medium", "sd3-medium", "sd3.5-medium", "SD3.5-medium stitched with SD3-medium"),
    ("sd3-medium", "sd3-medium", "sd3-medium", "SD3-medium with itself: the token-skipping mechanism alone at real size"),
):
    PRESETS[_name] = PresetSpec(_name, small=MODEL_CONFIGS[_small], large=MODEL_CONFIGS[_large], height=1024, width=1024, notes=_notes)
PRESET_NAMES = tuple(PRESETS)


def get_preset(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise ConfigError(describe("unknown preset", got=repr(name), expected=" | ".join(PRESET_NAMES)))
    return PRESETS[name]


def random_transformer(config: dict, seed: int, dtype: torch.dtype = torch.float32, device="cpu"):
    """An ``SD3Transformer2DModel`` with deterministic random weights (diffusers' init), on ``device``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: SD3.5-large never exists in fp32
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    if model.dtype != dtype:
        model = model.to(dtype)
    return model.eval()
