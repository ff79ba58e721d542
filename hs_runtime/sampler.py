"""The stitched sampler: drives any :class:`EngineSet` through a :class:`Plan`.

Per step the plan's action picks the graph calls; the gather (complex tokens → ``large.tokens``)
and the merge (its velocity over the small model's) stay on the latents' device. The only host
synchronisation is optional stage timing (``profile=True``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .backends.base import EngineSet
from .contract import LARGE_FULL, LARGE_TOKENS, SMALL_FULL
from .errors import ShapeError, describe
from .mask import TokenMask, compute_mask
from .numerics import FiniteMonitor
from .plans import Plan
from .schedule import DEFAULT_SHIFT, euler_step, flow_match_sigmas, guide
from .tokens import gather_kv, gather_tokens, patchify, position_ids, scatter_tokens, unpatchify
from .validation import check_number

STAGES = ("large", "mask", "hybrid", "small")


@dataclass
class Conditioning:
    """Prompt embeddings for ``P`` prompts; negatives are needed when guidance is on.

    Attributes:
        prompt_embeds: ``[P, T_txt, joint_dim]``.
        pooled_prompt_embeds: ``[P, pooled_dim]``.
        negative_prompt_embeds / negative_pooled_prompt_embeds: same shapes, or ``None``.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    @property
    def prompts(self) -> int:
        return self.prompt_embeds.shape[0]

    def batch(self, cfg: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[uncond; cond]`` (or cond only) embeddings as engines take them."""
        if cfg and self.negative_prompt_embeds is None:
            raise ShapeError(describe("guidance_scale > 1 needs negative prompt embeddings", fix="pass negative_* or guidance_scale=1"))
        embeds, pooled = self.prompt_embeds, self.pooled_prompt_embeds
        if cfg:
            embeds = torch.cat([self.negative_prompt_embeds, embeds])
            pooled = torch.cat([self.negative_pooled_prompt_embeds, pooled])
        return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)


@dataclass
class StageTimes:
    """Seconds per stage; ``overhead`` is everything outside graph calls (gather, merge, Euler).

    ``seconds`` holds graph-call time per stage, ``step_seconds`` the wall time of whole steps
    per action, so the overhead inside one stage is ``step_seconds[a] − graph time of a``.
    """

    seconds: dict = field(default_factory=lambda: defaultdict(float))
    step_seconds: dict = field(default_factory=lambda: defaultdict(float))
    total: float = 0.0

    @property
    def overhead(self) -> float:
        return max(0.0, self.total - sum(self.seconds.values()))

    def as_dict(self) -> dict:
        out = {s: self.seconds.get(s, 0.0) for s in STAGES}
        out.update(overhead=self.overhead, total=self.total)
        return out


@dataclass
class DenoiseResult:
    """Final latents ``[P, C, H, W]`` (fp32), the masks used, and stage times when profiled."""

    latents: torch.Tensor
    masks: list[TokenMask]
    times: StageTimes


class _Clock:
    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.sync = enabled and device.type == "cuda"
        self.times = StageTimes()

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def stage(self, name: str):
        clock = self

        class _Span:
            def __enter__(self):
                self.start = clock.now() if clock.enabled else 0.0

            def __exit__(self, *exc):
                if clock.enabled:
                    clock.times.seconds[name] += clock.now() - self.start

        return _Span()


class StitchedSampler:
    """Runs a plan on an engine set.

    Args:
        engines: the three engines (any backend).
        guidance_scale: CFG scale; ``<= 1`` disables guidance (batch = prompts, as diffusers).
        shift: flow-matching timestep shift (SD3: 3.0).
        check_finite: record every graph's velocity on the device and raise
            :class:`~hs_runtime.errors.NumericalError` at the end of a denoise that met NaN/inf.
    """

    def __init__(self, engines: EngineSet, guidance_scale: float = 7.0, shift: float = DEFAULT_SHIFT, check_finite: bool = True):
        self.engines = engines
        self.guidance_scale = check_number("guidance scale", guidance_scale, minimum=0.0)
        self.shift = shift
        self.check_finite = check_finite
        self._finite = FiniteMonitor.disabled()
        self.small_dims = engines[SMALL_FULL].dims
        self.large_dims = engines[LARGE_FULL].dims

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def _call(self, graph: str, feeds: dict, outputs=None) -> dict:
        out = self.engines[graph](feeds, outputs)
        self._finite.record(graph, out)  # device-side: no host synchronisation
        return out

    def denoise(self, plan: Plan, latents: torch.Tensor, conditioning: Conditioning, profile: bool = False) -> DenoiseResult:
        """Denoises ``latents [P, C, H, W]`` (initial noise) through every step of ``plan``.

        Raises:
            ConcurrencyError: if the same engines are already serving another thread.
            NumericalError: if a graph produced NaN/inf (naming the first such step and graph).
        """
        with self.engines.exclusive():
            return self._denoise(plan, latents, conditioning, profile)

    def _denoise(self, plan, latents, conditioning, profile) -> DenoiseResult:
        device, dtype, cfg = self.engines.device, self.engines.dtype, self.cfg
        if latents.shape[0] != conditioning.prompts:
            raise ShapeError(describe("latents and prompt embeddings disagree on prompt count", got=(latents.shape[0], conditioning.prompts)))
        sigmas, timesteps = flow_match_sigmas(plan.steps, self.shift)
        sigma_list = sigmas.tolist()  # host floats for the Euler update: no device reads in the loop
        timesteps = timesteps.to(device)  # one copy up front, not one per step
        embeds, pooled = conditioning.batch(cfg, device, dtype)
        x = latents.to(device=device, dtype=torch.float32)
        _, _, height, width = x.shape
        self.small_dims.check_latent(height, width, "small")
        self.large_dims.check_latent(height, width, "large")
        p = self.large_dims.patch_size
        positions = position_ids(height, width, p, self.large_dims.pos_embed_max_size, device=device)
        finite = self._finite = FiniteMonitor(plan.actions, device, getattr(self.engines, "precision", None), self.engines.backend, self.check_finite)
        finite.record_inputs(x, embeds, pooled)

        clock = _Clock(device, profile)
        start = clock.now()
        masks: list[TokenMask] = []
        hybrid_inputs = None  # (complex_idx, token_pos, kv_context, offset) for the CFG batch
        step_start = start
        for i, action in enumerate(plan.actions):
            finite.step = i
            sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
            x_in = torch.cat([x, x]) if cfg else x
            t = timesteps[i].expand(x_in.shape[0])
            full_feeds = {
                "hidden_states": x_in.to(dtype),
                "encoder_hidden_states": embeds,
                "pooled_projections": pooled,
                "timestep": t,
            }
            if action in ("large", "capture"):
                outputs = ("velocity", "kv_cache") if action == "capture" else ("velocity",)
                with clock.stage("large"):
                    out = self._call(LARGE_FULL, full_feeds, outputs)
                v = guide(out["velocity"].float(), self.guidance_scale, cfg)
                if action == "capture":
                    with clock.stage("mask"):
                        mask, hybrid_inputs = self._capture(plan, x, v, sigma, full_feeds, out["kv_cache"], positions)
                    masks.append(mask)
            elif action == "small":
                with clock.stage("small"):
                    out = self._call(SMALL_FULL, full_feeds)
                v = guide(out["velocity"].float(), self.guidance_scale, cfg)
            else:  # hybrid
                complex_idx, token_pos, kv_context, offset = hybrid_inputs
                n_prompts = x.shape[0]
                patches = gather_tokens(patchify(x, p), complex_idx[:n_prompts]).to(dtype)
                token_feeds = {
                    "patches": torch.cat([patches, patches]) if cfg else patches,
                    "token_pos": token_pos,
                    "kv_context": kv_context,
                    "encoder_hidden_states": embeds,
                    "pooled_projections": pooled,
                    "timestep": t,
                }
                with clock.stage("hybrid"):
                    v_small = self._call(SMALL_FULL, full_feeds)["velocity"]
                    v_tokens = self._call(LARGE_TOKENS, token_feeds)["velocity_tokens"]
                v_small = guide(v_small.float(), self.guidance_scale, cfg)
                if offset is not None:
                    v_small = v_small + offset
                v_tokens = guide(v_tokens.float(), self.guidance_scale, cfg)
                merged = scatter_tokens(patchify(v_small, p), complex_idx[:n_prompts], v_tokens)
                v = unpatchify(merged, x.shape[1], height, width, p)
            x = euler_step(x, v, sigma, sigma_next)
            if profile:
                step_end = clock.now()
                clock.times.step_seconds[action] += step_end - step_start
                if i + 1 == plan.steps or plan.actions[i + 1] != action:
                    finite.check(upto=i + 1)  # stage boundary of a profiled run: it synchronises anyway
                    step_end = clock.now()  # the check is no step's time
                step_start = step_end
        clock.times.total = clock.now() - start if profile else 0.0
        finite.check()  # the one read back of an unprofiled run
        return DenoiseResult(latents=x, masks=masks, times=clock.times)

    def _capture(self, plan, x, v_large, sigma, full_feeds, kv_cache, positions):
        """Mask at a capture step, then the hybrid stage's fixed inputs, gathered once per mask
        (and the large − small offset when the plan carries it)."""
        v_small = None
        if plan.mask.signal == "disagreement" or plan.carry_offset:
            v_small = guide(self._call(SMALL_FULL, full_feeds)["velocity"].float(), self.guidance_scale, self.cfg)
        mask = compute_mask(plan.mask, x, v_large, v_small, sigma, self.large_dims.patch_size)
        batch_mask = mask.for_batch(self.cfg)
        token_pos = positions[batch_mask.complex_idx]
        kv_context = gather_kv(kv_cache, batch_mask.context_idx)
        offset = v_large - v_small if plan.carry_offset else None
        return mask, (batch_mask.complex_idx, token_pos, kv_context, offset)
