"""Prompt to image around the stitched sampler: SD3 text encoders and VAE from diffusers.

Only this module imports diffusers/transformers on the runtime side, and only when constructed.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .backends.base import precision_name
from .errors import ConfigError, ModelLoadError, ShapeError, describe, first_line
from .numerics import check_finite
from .sampler import Conditioning, DenoiseResult, StitchedSampler
from .plans import Plan
from .schedule import DEFAULT_SHIFT
from .validation import check_folder_path, check_int, check_seed


class TextAndVae:
    """The large model's text encoders (CLIP-L, CLIP-G, T5) and VAE, loaded from a diffusers
    folder in one dtype (fp32 by default; bf16/fp16 halve T5-XXL's 19 GB)."""

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def from_pretrained(cls, source: str | Path, device="cpu", dtype=torch.float32) -> "TextAndVae":
        from diffusers import StableDiffusion3Pipeline

        path = check_folder_path(source, "pipeline", ModelLoadError, fix="pass --pipeline DIR, a diffusers StableDiffusion3Pipeline folder")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                describe(f"no SD3 pipeline (text encoders + VAE) at {source}", expected="a diffusers StableDiffusion3Pipeline folder with model_index.json", fix="pass --pipeline DIR or use a preset that has one (tiny, bench, shapes)")
            )
        if not (path / "vae" / "config.json").is_file():
            raise ModelLoadError(describe(f"the pipeline folder {source} has no VAE", expected="vae/config.json beside model_index.json", fix="pass --pipeline DIR with a complete StableDiffusion3Pipeline (text encoders + VAE)"))
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(str(path), transformer=None, dtype=dtype)
        except (OSError, ValueError) as exc:  # diffusers' and safetensors' load failures
            raise ModelLoadError(describe(f"could not load the text encoders and VAE from {source}", got=first_line(exc), fix="copy or download the pipeline folder again")) from exc
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
            if module is not None:
                module.to(device).eval()
        return cls(pipe)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def shift(self) -> float:
        """The flow-matching time shift of the folder's scheduler (SD3 and SD3.5: 3.0), so that a
        fine-tune with another shift draws what diffusers draws from the same folder.

        Raises:
            ConfigError: a scheduler that shifts by resolution (``use_dynamic_shifting``), which
                the sampler's fixed schedule does not do.
        """
        config = getattr(getattr(self.pipe, "scheduler", None), "config", None)
        if config is None:
            return DEFAULT_SHIFT
        if config.get("use_dynamic_shifting"):
            raise ConfigError(describe("the pipeline's scheduler shifts by resolution (use_dynamic_shifting)", fix="use a pipeline folder whose scheduler_config.json has a fixed shift, as SD3 and SD3.5 do"))
        return float(config.get("shift", DEFAULT_SHIFT))

    @torch.inference_mode()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None, cfg: bool, max_sequence_length: int) -> Conditioning:
        device = self.pipe.text_encoder.device
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompts, max_sequence_length=max_sequence_length,
        )
        if self.pipe.text_encoder.dtype != torch.float32:  # T5 can overflow in fp16: say so here, not as a bad input
            for name, tensor in (("prompt", embeds), ("negative prompt", negative)):
                if tensor is not None:
                    check_finite(f"the {name} embedding from the text encoders", tensor, fix=f"overflow in {precision_name(self.pipe.text_encoder.dtype)}? load the text encoders in bf16 or fp32 (--text-dtype)")
        return Conditioning(embeds, pooled, negative, negative_pooled)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor):
        """Latents ``[P, 16, h, w]`` → list of PIL images.

        Raises:
            NumericalError: for NaN/inf latents, or a decoded image with NaN/inf (never a black image).
        """
        check_finite("the latents to decode", latents, fix="the denoise went non-finite: see the step it names")
        vae = self.pipe.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        fix = "latents far outside the VAE's range: a guidance scale or plan that diverged?" if vae.dtype == torch.float32 else "VAE overflow? run the VAE in fp32 (--text-dtype fp32)"
        check_finite("the VAE's decoded image", image, fix=fix)
        return self.pipe.image_processor.postprocess(image, output_type="pil")


def check_image_size(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> None:
    """Pixels must map to whole latent patches: a positive multiple of ``vae_scale · patch`` (16)."""
    multiple = vae_scale_factor * patch_size
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % multiple):
            near = sorted({max(multiple, value // multiple * multiple), value // multiple * multiple + multiple}) if isinstance(value, numbers.Integral) and value > 0 else [multiple]
            raise ShapeError(describe(f"{name} must be a positive multiple of {multiple}", got=value, expected=" or ".join(map(str, near))))


def initial_latents(prompts: int, height: int, width: int, seed: int | Sequence[int], vae_scale_factor: int = 8, channels: int = 16) -> torch.Tensor:
    """Seeded noise ``[P, C, H/8, W/8]`` drawn on the CPU, as diffusers does with a CPU generator.

    Args:
        seed: one int (one generator for all prompts, as diffusers does), or one seed per prompt:
            prompt ``i`` then gets the noise ``torch.Generator("cpu").manual_seed(seed[i])`` draws
            for ``[1, C, H/8, W/8]``, so its noise never depends on the other prompts of the batch.
    """
    prompts = check_int("prompts", prompts)
    if height is None or width is None:
        raise ShapeError(describe("initial latents need a height and a width", got=(height, width)))
    check_image_size(height, width, vae_scale_factor)
    shape = (prompts, channels, height // vae_scale_factor, width // vae_scale_factor)
    if isinstance(seed, (int, np.integer)):
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(check_seed(seed)), dtype=torch.float32)
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Iterable):
        raise ConfigError(describe("seed must be an integer, or one integer per prompt", got=repr(seed)))
    seeds = [check_seed(s) for s in seed]
    if len(seeds) != prompts:
        raise ConfigError(describe("one seed per prompt", got=f"{len(seeds)} seed(s) for {prompts} prompt(s)", fix="pass one int, or a list as long as the prompts"))
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds])


class HybridStitchPipeline:
    """Prompts → images with any plan on any engine set."""

    def __init__(self, sampler: StitchedSampler, text_and_vae: TextAndVae, max_sequence_length: int = 256):
        self.sampler = sampler
        self.text_and_vae = text_and_vae
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts, plan: Plan, height: int, width: int, seed: int | Sequence[int] = 0, negative_prompts=None, profile=True, should_stop=None, conditioning: Conditioning | None = None):
        """Returns ``(images, DenoiseResult)``.

        Args:
            seed: one int for all prompts, or one per prompt (see :func:`initial_latents`).
            should_stop: checked before every denoising step; see :meth:`StitchedSampler.denoise`.
            conditioning: these prompts' :meth:`encode` from an earlier call (negative prompts
                included: none are passed with it), so that several seeds or plans of the same
                prompts run the text encoders once (T5-XXL on a CPU takes seconds).
        """
        prompts, negative_prompts = _prompt_lists(prompts, negative_prompts)
        latents = self.noise(len(prompts), plan, height, width, seed)
        if conditioning is None:
            conditioning = self.text_and_vae.encode(prompts, negative_prompts, self.sampler.cfg, self.max_sequence_length)
        elif not isinstance(conditioning, Conditioning):
            raise ConfigError(describe("conditioning must be a Conditioning", got=type(conditioning).__name__, fix="pass what encode(prompts, negative_prompts) returned, or none"))
        elif negative_prompts is not None:
            raise ConfigError(describe("negative prompts given with a conditioning", fix="they are encoded into it: pass encode(prompts, negative_prompts) alone"))
        elif conditioning.prompts != len(prompts):
            raise ConfigError(describe("the conditioning was encoded for other prompts", got=f"{conditioning.prompts} encoded, {len(prompts)} prompt(s)", fix="pass the encode() of these prompts, or none"))
        result: DenoiseResult = self.sampler.denoise(plan, latents, conditioning, profile=profile, should_stop=should_stop)
        return self.text_and_vae.decode(result.latents), result

    def noise(self, prompts: int, plan: Plan, height: int, width: int, seed: int | Sequence[int] = 0) -> torch.Tensor:
        """The initial latents of a call, the request checked with them: seeds, sizes (the
        models' and the engines' profiles) and the plan are refused here, before the text
        encoders run (T5-XXL on a CPU takes seconds)."""
        latents = initial_latents(prompts, height, width, seed, self.text_and_vae.vae_scale_factor)
        self.sampler.check_request(plan, latents)
        return latents

    def encode(self, prompts, negative_prompts=None) -> Conditioning:
        """The text encoders' output for ``prompts``, to pass as ``conditioning`` to calls that
        render the same prompts again."""
        prompts, negative_prompts = _prompt_lists(prompts, negative_prompts)
        return self.text_and_vae.encode(prompts, negative_prompts, self.sampler.cfg, self.max_sequence_length)


def _prompt_lists(prompts, negative_prompts) -> tuple[list[str], list[str] | None]:
    """Checked prompts and negative prompts as lists (one negative string goes to every prompt)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError(describe("no prompts given", fix="pass at least one prompt"))
    if negative_prompts is not None and isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    for what, texts in (("prompts", prompts), ("negative prompts", negative_prompts or [])):
        odd = [t for t in texts if not isinstance(t, str)]
        if odd:
            raise ConfigError(describe(f"{what} must be strings", got=repr(odd[0])))
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ConfigError(describe("one negative prompt per prompt", got=f"{len(negative_prompts)} for {len(prompts)} prompt(s)", fix="pass one string, or a list as long as the prompts"))
    return prompts, (None if negative_prompts is None else list(negative_prompts))
