"""Prompt to image around the stitched sampler: SD3 text encoders and VAE from diffusers.

Only this module imports diffusers/transformers on the runtime side, and only when constructed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError, ShapeError, describe
from .sampler import Conditioning, DenoiseResult, StitchedSampler
from .plans import Plan


class TextAndVae:
    """The large model's text encoders (CLIP-L, CLIP-G, T5) and VAE, loaded from a diffusers folder."""

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def from_pretrained(cls, source: str | Path, device="cpu", dtype=torch.float32) -> "TextAndVae":
        from diffusers import StableDiffusion3Pipeline

        path = Path(source)
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                describe(f"no SD3 pipeline (text encoders + VAE) at {source}", expected="a diffusers StableDiffusion3Pipeline folder with model_index.json", fix="pass --pipeline DIR or use a preset that has one (tiny, bench)")
            )
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), transformer=None, dtype=dtype)
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
            if module is not None:
                module.to(device).eval()
        return cls(pipe)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @torch.inference_mode()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None, cfg: bool, max_sequence_length: int) -> Conditioning:
        device = self.pipe.text_encoder.device
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompts, max_sequence_length=max_sequence_length,
        )
        return Conditioning(embeds, pooled, negative, negative_pooled)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor):
        """Latents ``[P, 16, h, w]`` → list of PIL images."""
        vae = self.pipe.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")


def check_image_size(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> None:
    """Pixels must map to whole latent patches: a positive multiple of ``vae_scale · patch`` (16)."""
    multiple = vae_scale_factor * patch_size
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % multiple):
            raise ShapeError(describe(f"{name} must be a positive multiple of {multiple}", got=value))


def initial_latents(prompts: int, height: int, width: int, seed: int, vae_scale_factor: int = 8, channels: int = 16) -> torch.Tensor:
    """Seeded noise ``[P, C, H/8, W/8]`` drawn on the CPU, as diffusers does with a CPU generator."""
    check_image_size(height, width, vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (prompts, channels, height // vae_scale_factor, width // vae_scale_factor)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


class HybridStitchPipeline:
    """Prompts → images with any plan on any engine set."""

    def __init__(self, sampler: StitchedSampler, text_and_vae: TextAndVae, max_sequence_length: int = 256):
        self.sampler = sampler
        self.text_and_vae = text_and_vae
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts, plan: Plan, height: int, width: int, seed: int = 0, negative_prompts=None, profile=True):
        """Returns ``(images, DenoiseResult)``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative_prompts is not None and isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        conditioning = self.text_and_vae.encode(prompts, negative_prompts, self.sampler.cfg, self.max_sequence_length)
        latents = initial_latents(len(prompts), height, width, seed, self.text_and_vae.vae_scale_factor)
        result: DenoiseResult = self.sampler.denoise(plan, latents, conditioning, profile=profile)
        return self.text_and_vae.decode(result.latents), result
