"""The object inference hosts embed: engines + sampler + (optionally) text encoders and VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from .backends.base import EngineSet
from .plans import Plan
from .sampler import Conditioning, DenoiseResult, StitchedSampler

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class HybridStitchRuntime:
    """Runs any plan on one engine set.

    Args:
        engines: the three engines (torch, ONNX Runtime or TensorRT).
        pipeline_source: a diffusers SD3 folder with the large model's text encoders and VAE,
            needed only for prompt-to-image.
        max_sequence_length: T5 tokens the engines were built for (text tokens = 77 + this).
    """

    def __init__(self, engines: EngineSet, pipeline_source: str | Path | None = None, max_sequence_length: int = 256, manifest=None):
        self.engines = engines
        self.pipeline_source = pipeline_source
        self.max_sequence_length = max_sequence_length
        self.manifest = manifest
        self._text_and_vae = None

    @classmethod
    def from_models(cls, small, large, pipeline_source=None, device="cpu", dtype="fp32", max_sequence_length: int = 256) -> "HybridStitchRuntime":
        """The ``torch`` backend over a small/large pair (folders or hub ids)."""
        from .backends.torch_backend import torch_engines
        from .models import check_pair, load_transformer

        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        small_model = load_transformer(small, torch_dtype, device)
        large_model = load_transformer(large, torch_dtype, device)
        check_pair(small_model.config, large_model.config)
        return cls(torch_engines(small_model, large_model, device, torch_dtype), pipeline_source, max_sequence_length)

    @classmethod
    def from_dir(cls, folder, backend: str | None = None, device="cpu", pipeline_source=None) -> "HybridStitchRuntime":
        """Loads an engine folder made by ``hs-export build``; no other flags needed.

        Args:
            backend: the folder's own backend by default; ``torch`` runs the PyTorch graphs of
                the models the manifest names (a reference, or a GPU fast path).
            pipeline_source: text encoders + VAE folder; defaults to the manifest's.
        """
        from .backends.loading import engines_from_manifest
        from .manifest import Manifest

        manifest = Manifest.load(folder)
        engines = engines_from_manifest(manifest, backend or manifest.backend, torch.device(device))
        return cls(engines, pipeline_source or manifest.data.get("pipeline"), manifest.build["max_sequence_length"], manifest)

    def sampler(self, guidance_scale: float = 7.0, shift: float = 3.0) -> StitchedSampler:
        return StitchedSampler(self.engines, guidance_scale, shift)

    def denoise(self, plan: Plan, latents: torch.Tensor, conditioning: Conditioning, guidance_scale: float = 7.0, profile: bool = False) -> DenoiseResult:
        """Prompt embeddings → latents. See :meth:`StitchedSampler.denoise`."""
        return self.sampler(guidance_scale).denoise(plan, latents, conditioning, profile)

    def text_and_vae(self):
        from .pipeline import TextAndVae

        if self._text_and_vae is None:
            from .errors import ModelLoadError, describe

            if self.pipeline_source is None:
                raise ModelLoadError(describe("prompt-to-image needs the text encoders and VAE", fix="pass --pipeline DIR (a diffusers SD3 folder)"))
            device = self.engines.device
            self._text_and_vae = TextAndVae.from_pretrained(self.pipeline_source, device=device)
        return self._text_and_vae

    def pipeline(self, guidance_scale: float = 7.0):
        """A :class:`~hs_runtime.pipeline.HybridStitchPipeline` (prompts → images)."""
        from .pipeline import HybridStitchPipeline

        return HybridStitchPipeline(self.sampler(guidance_scale), self.text_and_vae(), self.max_sequence_length)
