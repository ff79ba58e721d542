"""Materialises presets on disk with ``save_pretrained`` so every run goes through the real
``from_pretrained`` loading path.

A preset folder holds ``large/`` (a full ``StableDiffusion3Pipeline``: transformer, tiny CLIP ×2
and T5 with tokenizers made from a local vocabulary, tiny 16-channel VAE, scheduler) when the
preset has a text pipeline, else ``large/transformer``; and ``small/transformer``.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from hs_runtime.errors import BuildError, ModelLoadError, describe
from hs_runtime.presets import PresetSpec, get_preset, random_transformer
from hs_runtime.validation import nearest_existing

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


PROMPT_WORDS = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "painting", "cat", "dog", "city",
    "night", "mountain", "lake", "red", "blue", "green", "portrait", "astronaut", "horse", "forest",
)


def clip_tokenizer(words=PROMPT_WORDS, max_length: int = 77):
    """A CLIP BPE tokenizer from a local vocabulary: each of ``words`` is one token, anything
    else falls back to single characters (so every prompt tokenizes, offline).

    The merges come from training BPE on ``words`` (the ``tokenizers`` library), which keeps
    them consistent: hand-written per-word merges collide across words that share letters.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    symbols = [c for c in string.printable if not c.isspace()]
    word_ends = [c + "</w>" for c in symbols]  # unknown words spell out, never hit <unk>
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # The word-final characters go in as special tokens only to fix their ids: left to the trainer
    # they are numbered in hash order, which differs between processes, and since ties between
    # merges are broken by id, so would the merges and every id after them. Fixed, the same words
    # give the same tokenizer, and a seeded text encoder the same embeddings, in every run.
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=1, special_tokens=["<|startoftext|>", "<|endoftext|>", *word_ends],
        initial_alphabet=symbols, end_of_word_suffix="</w>", show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)], trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(words=PROMPT_WORDS):
    """A T5 sentencepiece tokenizer from a local vocabulary (whole words, then characters)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def text_components(joint: int, pooled: int, seed: int, words=PROMPT_WORDS, clip_length: int = 77) -> dict:
    """Tiny CLIP ×2 and T5 text encoders (random, ``.eval()``) with local tokenizers, as the
    ``StableDiffusion3Pipeline`` keyword arguments. Text tokens = ``clip_length`` + T5 length."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(words, clip_length), t5_tokenizer(words)
    torch.manual_seed(seed)
    clip_cfg = dict(
        vocab_size=len(clip_tok), hidden_size=joint // 2, intermediate_size=2 * joint, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=max(77, clip_length), projection_dim=pooled // 2, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    text_encoder_3 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=joint, d_ff=2 * joint, d_kv=joint // 2, num_layers=2, num_heads=2, decoder_start_token_id=0)
    ).eval()
    return dict(
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )


def build_text_pipeline(large_transformer, seed: int):
    """A tiny offline ``StableDiffusion3Pipeline`` around ``large_transformer`` (all ``.eval()``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    joint = large_transformer.config.joint_attention_dim
    pooled = large_transformer.config.pooled_projection_dim
    text = text_components(joint, pooled, seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=128, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    ).eval()
    return StableDiffusion3Pipeline(transformer=large_transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, **text)


# Trained presets ship their weights inside the package (fp16 safetensors), written by
# ``hs-export train-shapes --out <this folder>/<name>``.
SHIPPED_ROOT = Path(__file__).resolve().parent / "shapes" / "model"


def preset_paths(spec: PresetSpec, root: Path) -> PresetPaths:
    folder = root / spec.name
    return PresetPaths(folder, folder / "small" / "transformer", folder / "large", folder / "large" if spec.text_pipeline else None)


def shipped_preset(spec: PresetSpec) -> PresetPaths:
    """The paths of a trained preset's shipped weights; says how to retrain them if absent."""
    paths = PresetPaths(SHIPPED_ROOT, SHIPPED_ROOT / "small" / "transformer", SHIPPED_ROOT / "large", SHIPPED_ROOT / "large")
    if not (paths.small / "config.json").is_file() or not (paths.large / "model_index.json").is_file():
        raise ModelLoadError(
            describe(f"the trained '{spec.name}' weights are missing from {SHIPPED_ROOT}", fix=f"retrain them with: hs-export train-shapes --out {SHIPPED_ROOT}")
        )
    return paths


def _check_room(spec: PresetSpec, root: Path) -> None:
    """Refuses, in one line, a host that cannot hold a preset's random fp32 weights in memory (both
    models at once) or on disk, before minutes of making them (SD3.5-large + medium: ~40 GiB)."""
    from .build.limits import available_memory, format_bytes, weight_count

    needed = 4 * (weight_count(spec.small) + weight_count(spec.large))
    memory, free = available_memory(), shutil.disk_usage(nearest_existing(root.absolute())).free
    for what, have in (("memory", memory), (f"free disk under {root}", free)):
        if needed > have:
            raise BuildError(describe(
                f"preset '{spec.name}' needs ~{format_bytes(needed)} of {what} for its random fp32 weights", got=f"{format_bytes(have)} available",
                fix=f"use a larger host (or HS_PRESET_DIR on a larger disk), or pass --force to try anyway; hs-export build --preset {spec.name} --dry-run sizes the build without them",
            ))


def _marker(spec: PresetSpec) -> dict:
    return {"format": PRESET_FORMAT, "name": spec.name, "small": spec.small, "large": spec.large, "seed": spec.seed}


def _is_made(paths: PresetPaths, spec: PresetSpec) -> bool:
    marker = paths.root / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(_marker(spec)))


def pending_preset_bytes(name: str, root: Path | None = None) -> tuple[int, Path | None]:
    """Disk the preset's random fp32 weights will take, and the folder they go to, when they are
    not made yet (``(0, None)`` when made, or for the trained preset)."""
    from .build.limits import weight_count

    spec = get_preset(name)
    if spec.trained:
        return 0, None
    paths = preset_paths(spec, Path(root) if root else default_preset_root())
    if _is_made(paths, spec):
        return 0, None
    return 4 * (weight_count(spec.small) + weight_count(spec.large)), paths.root


def ensure_preset(name: str, root: Path | None = None, log=print, check_room: bool = True) -> PresetPaths:
    """Builds preset ``name`` under ``root`` once (seeded, so identical everywhere) and returns its
    paths; a trained preset returns its shipped weights. ``check_room``: refuse a host that looks
    too small for the weights first (``build --force`` tries anyway)."""
    spec = get_preset(name)
    if spec.trained:
        return shipped_preset(spec)
    paths = preset_paths(spec, Path(root) if root else default_preset_root())
    marker = paths.root / _MARKER
    expected = _marker(spec)
    if _is_made(paths, spec):
        return paths
    if check_room:
        _check_room(spec, paths.root)
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
