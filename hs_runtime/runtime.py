"""The object inference hosts embed: engines + sampler + (optionally) text encoders and VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from .backends.base import EngineSet, torch_dtype
from .backends.checked import ProfileCheckedEngine
from .contract import GRAPH_NAMES, SMALL
from .errors import ConfigError, ShapeError, describe
from .mask import TokenMask
from .plans import Plan
from .sampler import Conditioning, DenoiseResult, StageTimes, StitchedSampler
from .schedule import DEFAULT_SHIFT
from .validation import check_device


class HybridStitchRuntime:
    """Runs any plan on one engine set.

    Args:
        engines: the ``small`` and ``large`` engines (torch, ONNX Runtime or TensorRT).
        pipeline_source: a diffusers SD3 folder with the large model's text encoders and VAE,
            needed only for prompt-to-image.
        max_sequence_length: T5 tokens the engines were built for (text tokens = CLIP length + this).
        text_dtype: precision of the text encoders and VAE (a name or torch dtype; fp32 default).
    """

    def __init__(self, engines: EngineSet, pipeline_source: str | Path | None = None, max_sequence_length: int = 256, manifest=None, text_dtype=None):
        self.engines = engines
        self.pipeline_source = pipeline_source
        self.max_sequence_length = max_sequence_length
        self.manifest = manifest
        self.text_dtype = torch.float32 if text_dtype is None else torch_dtype(text_dtype)
        self._text_and_vae = None

    @classmethod
    def from_models(cls, small, large, pipeline_source=None, device="cpu", dtype=None, max_sequence_length: int = 256, text_dtype=None) -> "HybridStitchRuntime":
        """The ``torch`` backend over a small/large pair (folders or hub ids), in ``dtype``
        (a precision name or torch dtype; fp32 by default, as :meth:`from_dir`'s torch backend)."""
        from .backends.torch_backend import torch_engines
        from .models import check_pair, load_transformer

        dtype = torch.float32 if dtype is None else torch_dtype(dtype)
        text_dtype = None if text_dtype is None else torch_dtype(text_dtype)  # refused before any model loads
        device = check_device(device)
        small_model = load_transformer(small, dtype, device)
        large_model = load_transformer(large, dtype, device)
        check_pair(small_model.config, large_model.config)
        engines = torch_engines(small_model, large_model, device, dtype)
        checked = {name: ProfileCheckedEngine(engines[name], None) for name in GRAPH_NAMES}  # the contract's sizes, in one line
        return cls(EngineSet(checked, engines.device, engines.dtype, engines.backend, engines.precision), pipeline_source, max_sequence_length, text_dtype=text_dtype)

    @classmethod
    def from_dir(cls, folder, backend: str | None = None, device="cpu", pipeline_source=None, dtype=None, text_dtype=None) -> "HybridStitchRuntime":
        """Loads an engine folder made by ``hs-export build``; no other flags needed.

        Args:
            backend: the folder's own backend by default; ``torch`` runs the PyTorch graphs of
                the models the manifest names (a reference, or a GPU fast path).
            pipeline_source: text encoders + VAE folder; defaults to the manifest's.
            dtype: the torch backend's precision (default fp32); with the folder's engines it
                must be the one they were built in (they compute in nothing else).
            text_dtype: the text encoders' and VAE's precision (default fp32); bf16 or fp16
                halves their memory on a GPU (T5-XXL alone is 19 GB in fp32), as diffusers'
                ``torch_dtype`` does.

        Raises:
            ConfigError: ``dtype`` differs from the precision of the engines asked for.
        """
        from .backends.loading import engines_from_manifest
        from .manifest import Manifest

        text_dtype = None if text_dtype is None else torch_dtype(text_dtype)  # refused before any engine loads
        manifest = Manifest.load(folder)
        pipeline_source = manifest.data.get("pipeline") if pipeline_source is None else pipeline_source
        max_sequence_length = manifest.build["max_sequence_length"]
        if pipeline_source is not None and max_sequence_length < 1:  # built without text encoders, for CLIP's tokens or fewer
            raise ConfigError(describe(
                f"engine folder {folder} takes {manifest.shape.text_tokens} text tokens: no room for T5's beside CLIP's {manifest.build.get('clip_tokens', 77)}",
                fix="rebuild it with --pipeline DIR (or more --text-tokens) to run it with text encoders",
            ))
        engines = engines_from_manifest(manifest, manifest.backend if backend is None else backend, device, dtype)
        return cls(engines, pipeline_source, max_sequence_length, manifest, text_dtype)

    def sampler(self, guidance_scale: float = 7.0, shift: float = DEFAULT_SHIFT, check_finite: bool = True) -> StitchedSampler:
        return StitchedSampler(self.engines, guidance_scale, shift, check_finite)

    def prompt_range(self, cfg: bool = True) -> tuple[int, int] | None:
        """Prompts one engine call takes, from the built profiles (batch axis of the ``small``
        graph's ``patches``; with guidance a prompt takes two rows). ``None``: no built limit (models
        loaded without a manifest).

        Raises:
            ShapeError: if no prompt count fits (e.g. a batch-1 build run with guidance).
        """
        if self.manifest is None:
            return None
        profiles = self.manifest.graph(SMALL)["profiles"]
        low = min(p["patches"][0][0] for p in profiles)
        high = max(p["patches"][2][0] for p in profiles)
        rows = 2 if cfg else 1
        prompts = (-(-low // rows), high // rows)
        if prompts[0] > prompts[1]:
            raise ShapeError(
                describe("no prompt count fits the built batch range", got=f"batch {low}..{high} with {rows} row(s) per prompt", fix=f"rebuild with: {self.manifest.rebuild_command} --force (adjusting --prompts)")
            )
        return prompts

    def batching_sampler(self, guidance_scale: float = 7.0, shift: float = DEFAULT_SHIFT, check_finite: bool = True) -> "PromptBatchingSampler":
        """A sampler that takes any number of prompts: pads or splits them to :meth:`prompt_range`."""
        sampler = self.sampler(guidance_scale, shift, check_finite)
        return PromptBatchingSampler(sampler, self.prompt_range(sampler.cfg))

    def denoise(self, plan: Plan, latents: torch.Tensor, conditioning: Conditioning, guidance_scale: float = 7.0, profile: bool = False, should_stop=None, shift: float = DEFAULT_SHIFT, profile_calls: bool = False) -> DenoiseResult:
        """Prompt embeddings → latents for any number of prompts (padded or split to what the
        engines were built for); ``shift``: the scheduler's (``TextAndVae.shift`` for a pipeline
        folder's). See :meth:`StitchedSampler.denoise` and :class:`PromptBatchingSampler`."""
        return self.batching_sampler(guidance_scale, shift).denoise(plan, latents, conditioning, profile, should_stop, profile_calls)

    def text_and_vae(self):
        from .pipeline import TextAndVae

        if self._text_and_vae is None:
            from .errors import ModelLoadError, describe

            if self.pipeline_source is None:
                raise ModelLoadError(describe("prompt-to-image needs the text encoders and VAE", fix="pass --pipeline DIR (a diffusers SD3 folder)"))
            if self.max_sequence_length < 1:  # text tokens = CLIP's 77 + T5's: a folder built for random conditioning only
                fix = f"rebuild with: {self.manifest.rebuild_command} --force (--text-tokens above 77)" if self.manifest is not None else "load with a max_sequence_length >= 1"
                raise ModelLoadError(describe("these engines take no T5 token: prompt-to-image needs CLIP's 77 text tokens and T5's", got=f"max_sequence_length {self.max_sequence_length}", fix=fix))
            device = self.engines.device
            self._text_and_vae = TextAndVae.from_pretrained(self.pipeline_source, device=device, dtype=self.text_dtype)
        return self._text_and_vae

    def pipeline(self, guidance_scale: float = 7.0, text_and_vae=None, check_finite: bool = True):
        """A :class:`~hs_runtime.pipeline.HybridStitchPipeline` (prompts → images) for any number
        of prompts.

        Args:
            text_and_vae: text encoders + VAE to use instead of this runtime's own (e.g. one copy
                shared by several runtimes); loaded from ``pipeline_source`` when ``None``.
            check_finite: the sampler's per-step NaN/inf record (see :class:`StitchedSampler`).
        """
        from .pipeline import HybridStitchPipeline

        text_and_vae = text_and_vae or self.text_and_vae()
        return HybridStitchPipeline(self.batching_sampler(guidance_scale, text_and_vae.shift, check_finite), text_and_vae, self.max_sequence_length)


class PromptBatchingSampler:
    """Runs any number of prompts on engines built for a fixed prompt range.

    Fewer prompts than the range's minimum are padded by repeating the last prompt's conditioning
    and latents (the padded results are dropped); more than its maximum are split into chunks. Each
    prompt's result depends only on its own conditioning and latents (up to floating-point
    rounding), so batching never changes what a prompt gets — except with an adaptive mask
    (``MaskConfig.energy > 0``), whose token count is the largest any prompt of an engine call
    asks for. The whole request holds the engines' single-request guard
    (:meth:`EngineSet.exclusive`), so another thread cannot take the engines between its chunks.

    Args:
        sampler: the sampler that runs one engine call's worth of prompts.
        prompt_range: ``(min, max)`` prompts per call, or ``None`` to pass everything through.
    """

    def __init__(self, sampler: StitchedSampler, prompt_range: tuple[int, int] | None):
        self.sampler = sampler
        self.prompt_range = prompt_range

    def __getattr__(self, name):  # cfg, guidance_scale, engines, … of the wrapped sampler
        return getattr(self.sampler, name)

    def denoise(self, plan: Plan, latents: torch.Tensor, conditioning: Conditioning, profile: bool = False, should_stop=None, profile_calls: bool = False) -> DenoiseResult:
        """Denoises ``latents [P, C, H, W]`` for any ``P >= 1``; see :meth:`StitchedSampler.denoise`."""
        self.sampler.check_request(plan, latents)
        n = latents.shape[0]
        if n < 1:
            raise ShapeError(describe("no prompts to denoise", got=tuple(latents.shape), expected="latents [P >= 1, C, H, W]"))
        if self.prompt_range is None or n != conditioning.prompts or self.prompt_range[0] <= n <= self.prompt_range[1]:
            return self.sampler.denoise(plan, latents, conditioning, profile, should_stop, profile_calls)
        low, high = self.prompt_range
        parts = []
        with self.sampler.engines.exclusive():  # reentrant: each chunk's denoise takes it again
            for start in range(0, n, high):
                rows = list(range(start, min(start + high, n)))
                real = len(rows)
                rows += [rows[-1]] * (low - real)
                result = self.sampler.denoise(plan, _take(latents, rows), _take_conditioning(conditioning, rows), profile, should_stop, profile_calls)
                parts.append((result, real))
        return _concat_results(parts)


def _take(tensor: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.index_select(0, torch.tensor(rows, device=tensor.device))


def _take_conditioning(conditioning: Conditioning, rows: list[int]) -> Conditioning:
    c = conditioning
    return Conditioning(
        _take(c.prompt_embeds, rows), _take(c.pooled_prompt_embeds, rows),
        _take(c.negative_prompt_embeds, rows), _take(c.negative_pooled_prompt_embeds, rows),
    )


def _join_index_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Token-index rows of chunks → one ``[P, K]`` tensor. An adaptive mask picks its count per
    engine call, so chunks can differ in width: a narrower row is padded with repeats of its last
    index (the same set of tokens; :meth:`TokenMask.counts` counts each once)."""
    width = max(part.shape[1] for part in parts)
    padded = []
    for part in parts:
        missing = width - part.shape[1]
        if missing and part.shape[1]:
            part = torch.cat([part, part[:, -1:].expand(-1, missing)], dim=1)
        elif missing:  # no token at all (a mask of every token has no context): nothing to repeat
            raise ShapeError(describe("the prompts' masks cannot be joined", got=f"an empty index row beside {width}-wide ones", fix="run these prompts in one engine call, or with a fixed mask (energy 0)"))
        padded.append(part)
    return torch.cat(padded)


def _concat_results(parts: list[tuple[DenoiseResult, int]]) -> DenoiseResult:
    """Chunk results → one result over the real prompts (padding dropped); stage times summed."""
    latents = torch.cat([r.latents[:real] for r, real in parts])
    masks = []
    for k in range(len(parts[0][0].masks)):  # every chunk ran the same plan: same mask count
        chunks = [(r.masks[k], real) for r, real in parts]
        index_rows = ([getattr(m, f)[:real] for m, real in chunks] for f in ("complex_idx", "context_idx"))
        masks.append(TokenMask(*(_join_index_rows(rows) for rows in index_rows), torch.cat([m.scores[:real] for m, real in chunks])))
    times = StageTimes()
    for r, _ in parts:
        for stage, seconds in r.times.seconds.items():
            times.seconds[stage] += seconds
        for action, seconds in r.times.step_seconds.items():
            times.step_seconds[action] += seconds
        for shape, seconds in r.times.calls.items():
            times.calls[shape].extend(seconds)
        times.total += r.times.total
    return DenoiseResult(latents=latents, masks=masks, times=times)
