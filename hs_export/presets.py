"""Materialises presets on disk with ``save_pretrained`` so every run goes through the real
``from_pretrained`` loading path.

A preset folder holds ``large/`` (a full ``StableDiffusion3Pipeline``: transformer, tiny CLIP ×2
and T5 with tokenizers made from a local vocabulary, tiny 16-channel VAE, scheduler) when the
preset has a text pipeline, else ``large/transformer``; and ``small/transformer``.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from hs_runtime.presets import PresetSpec, get_preset, random_transformer

PRESET_FORMAT = 1
_MARKER = "preset.json"


@dataclass(frozen=True)
class PresetPaths:
    """Where a materialised preset lives: model sources for ``--small`` / ``--large``."""

    root: Path
    small: Path
    large: Path
    pipeline: Path | None  # folder with text encoders + VAE, if the preset has them


def default_preset_root() -> Path:
    """``$HS_PRESET_DIR`` or ``~/.cache/hybridstitch/presets``."""
    return Path(os.environ.get("HS_PRESET_DIR", Path.home() / ".cache" / "hybridstitch" / "presets"))


def _words() -> list[str]:
    # A local vocabulary: letters, digits, punctuation and a few common prompt words.
    return [
        "a", "an", "the", "of", "in", "on", "with", "and", "photo", "painting", "cat", "dog", "city",
        "night", "mountain", "lake", "red", "blue", "green", "portrait", "astronaut", "horse", "forest",
    ]


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    symbols = [c for c in string.printable if not c.isspace()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in symbols + [s + "</w>" for s in symbols] + [w + "</w>" for w in _words()]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in _words():  # left-to-right merges so whole words become one token
        for i in range(1, len(word)):
            left, right = word[:i], word[i] + ("</w>" if i == len(word) - 1 else "")
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _words()]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_text_pipeline(large_transformer, seed: int):
    """A tiny offline ``StableDiffusion3Pipeline`` around ``large_transformer`` (all ``.eval()``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    joint = large_transformer.config.joint_attention_dim
    pooled = large_transformer.config.pooled_projection_dim
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(seed)
    clip_cfg = dict(
        vocab_size=len(clip_tok), hidden_size=joint // 2, intermediate_size=2 * joint, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=pooled // 2, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    text_encoder_3 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=joint, d_ff=2 * joint, d_kv=joint // 2, num_layers=2, num_heads=2, decoder_start_token_id=0)
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=128, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=large_transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )


def preset_paths(spec: PresetSpec, root: Path) -> PresetPaths:
    folder = root / spec.name
    return PresetPaths(folder, folder / "small" / "transformer", folder / "large", folder / "large" if spec.text_pipeline else None)


def ensure_preset(name: str, root: Path | None = None, log=print) -> PresetPaths:
    """Builds preset ``name`` under ``root`` once (seeded, so identical everywhere) and returns its paths."""
    spec = get_preset(name)
    paths = preset_paths(spec, Path(root) if root else default_preset_root())
    marker = paths.root / _MARKER
    expected = {"format": PRESET_FORMAT, "name": spec.name, "small": spec.small, "large": spec.large, "seed": spec.seed}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(expected)):
        return paths
    log(f"building preset '{name}' in {paths.root} (random weights, seed {spec.seed})")
    small = random_transformer(spec.small, spec.seed + 1)
    large = random_transformer(spec.large, spec.seed + 2)
    small.save_pretrained(paths.small)
    if spec.text_pipeline:
        build_text_pipeline(large, spec.seed + 3).save_pretrained(paths.large)
    else:
        large.save_pretrained(paths.large / "transformer")
    marker.write_text(json.dumps(expected, indent=2))
    return paths
