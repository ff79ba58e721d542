"""The stitched sampler: drives any :class:`EngineSet` through a :class:`Plan`.

Per step the plan's action picks the graph calls: dense calls feed every image token with no
context; a capture step keeps both models' K/V; a hybrid step feeds the large graph the complex
tokens (and the small graph all tokens, or only the others) with the cached K/V of the rest. The
gathers and the merge stay on the latents' device. The only host synchronisation in the step loop
is optional stage timing (``profile=True``); fp16 engines read one flag before it (the embeddings'
cast to fp16 stayed finite).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .backends.base import EngineSet
from .contract import LARGE, SMALL, VELOCITY, context_names, kv_names, text_context_names, text_kv_names
from .errors import CancelledError, ConfigError, NumericalError, ShapeError, describe
from .flops import transformer_flops
from .mask import TokenMask, compute_mask
from .numerics import FiniteMonitor
from .plans import Plan
from .schedule import DEFAULT_SHIFT, euler_step, flow_match_sigmas, guide
from .tokens import gather_tokens, join_tokens, patchify, position_ids, scatter_tokens, unpatchify
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
        """``[uncond; cond]`` (or cond only) embeddings as engines take them.

        Raises:
            ShapeError: embeddings of the wrong rank or prompt count, negatives missing (with
                guidance) or shaped unlike the positives.
        """
        embeds, pooled = self.prompt_embeds, self.pooled_prompt_embeds
        if embeds.dim() != 3 or pooled.dim() != 2 or pooled.shape[0] != embeds.shape[0]:
            raise ShapeError(describe("prompt embeddings must be [P, T, D] and pooled ones [P, D]", got=(tuple(embeds.shape), tuple(pooled.shape))))
        if cfg:
            negatives = {"negative_prompt_embeds": (self.negative_prompt_embeds, embeds), "negative_pooled_prompt_embeds": (self.negative_pooled_prompt_embeds, pooled)}
            missing = [name for name, (negative, _) in negatives.items() if negative is None]
            if missing:
                raise ShapeError(describe("guidance_scale > 1 needs negative prompt embeddings", got=f"no {' or '.join(missing)}", fix="pass both negative_* or guidance_scale=1"))
            for name, (negative, positive) in negatives.items():
                if negative.shape != positive.shape:
                    raise ShapeError(describe(f"{name} must be shaped as the prompt's", got=tuple(negative.shape), expected=tuple(positive.shape), fix="encode the negative prompts as the prompts (same text length)"))
        if cfg:
            embeds = torch.cat([self.negative_prompt_embeds, embeds])
            pooled = torch.cat([self.negative_pooled_prompt_embeds, pooled])
        cast = embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
        # Finite fp32 past 65504 turns inf in this cast, not in the text encoders: one device read
        # before the step loop (the details only when it failed).
        if dtype == torch.float16 and not bool(torch.isfinite(cast[0]).all() & torch.isfinite(cast[1]).all()):
            for name, source, narrowed in (("prompt embeddings", embeds, cast[0]), ("pooled prompt embeddings", pooled, cast[1])):
                if not bool(torch.isfinite(narrowed).all()) and bool(torch.isfinite(source).all()):
                    rows = torch.isfinite(narrowed).flatten(1).all(1).logical_not().nonzero().flatten().tolist()
                    half = self.prompts if cfg else 0  # [uncond; cond] with guidance
                    which = "negative " if cfg and all(r < half for r in rows) else ""
                    raise NumericalError(describe(f"the {which}{name} exceed fp16's range", got=f"largest |value| {source.abs().max().item():.4g}", expected="<= 65504 for fp16 engines", fix="build the engines in bf16 or fp32 (--precision)"))
        return cast


@dataclass(frozen=True)
class CallShape:
    """The sizes of one graph call, which its cost depends on: the CFG batch, image tokens
    recomputed and taken from the cached context, text tokens recomputed and cached, and whether
    it returns the K/V outputs (a capture step's calls)."""

    graph: str
    batch: int
    image_queries: int
    image_context: int
    text_queries: int
    text_context: int
    kv_outputs: bool

    def flops(self, dims) -> float:
        """The FLOP model's count for this call, the whole batch (:mod:`hs_runtime.flops`)."""
        keys = self.image_queries + self.image_context
        return self.batch * transformer_flops(dims, self.image_queries, keys, self.text_queries + self.text_context, self.text_queries)

    def label(self) -> str:
        """E.g. ``large: 12 image + 0 text queries, context 564 image + 154 text``."""
        context = f", context {self.image_context} image + {self.text_context} text" if self.image_context or self.text_context else ""
        return f"{self.graph}: {self.image_queries} image + {self.text_queries} text queries{context}{', K/V out' if self.kv_outputs else ''}"


@dataclass
class StageTimes:
    """Seconds per stage; ``overhead`` is the time outside the stages' spans (the Euler update,
    patchify, the large steps' guidance).

    ``seconds`` holds each stage's span: its graph calls and the host work around them (a hybrid
    step's gathers, merge and guidance; a capture's mask and context gathers under ``mask``; a
    small step's guidance), so ``overhead`` is not all host work: on ``bench`` it read 0.3% of a
    denoise where timing every call put the host work at 1.8–1.9% (docs/benchmarks.md).
    ``step_seconds`` holds the wall time of whole steps per action; ``calls`` (``profile_calls``)
    every graph call's seconds by :class:`CallShape`, which separates graph time from the rest.
    """

    seconds: dict = field(default_factory=lambda: defaultdict(float))
    step_seconds: dict = field(default_factory=lambda: defaultdict(float))
    calls: dict = field(default_factory=lambda: defaultdict(list))
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
    def __init__(self, device: torch.device, enabled: bool, calls: bool = False):
        self.enabled = enabled
        self.calls = calls
        self.sync = (enabled or calls) and device.type == "cuda"
        self.device = device
        self.times = StageTimes()

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)  # without a device it waits on the current one, cuda:0
        return time.perf_counter()

    def stage(self, name: str) -> "_Span":
        return _Span(self, name)


class _Span:
    """One stage's time added to its clock (nothing measured when the clock is off)."""

    def __init__(self, clock: _Clock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        self.start = self.clock.now() if self.clock.enabled else 0.0

    def __exit__(self, *exc):
        if self.clock.enabled:
            self.clock.times.seconds[self.name] += self.clock.now() - self.start


@dataclass
class _Context:
    """What one model's hybrid-step calls reuse from the last capture step, for the CFG batch.

    Attributes:
        query_idx: ``[B, N]`` the image tokens this model recomputes.
        token_pos: ``[B, N]`` their indices into the position table.
        image_kv: per attention module, the cached ``(k, v)``, each ``[B, M, D]``, of the other tokens.
        text_kv: per block, the capture step's text ``(k, v)``, each ``[B, T, D]`` (text reuse), or ``None``.
        context_idx: ``[B, M]`` the tokens ``image_kv`` holds.
        query_kv: mask re-selection only: per module, the capture step's ``(k, v)`` of the query
            tokens, so that ``image_kv`` and ``query_kv`` hold every token's K/V exactly once.
    """

    query_idx: torch.Tensor
    token_pos: torch.Tensor
    image_kv: list
    text_kv: list | None
    context_idx: torch.Tensor
    query_kv: list | None = None


@dataclass
class _Hybrid:
    """The hybrid stage's fixed inputs, made once per capture step."""

    complex_idx: torch.Tensor  # [P, K]
    context_idx: torch.Tensor  # [P, M]
    large: _Context
    small: _Context | None  # None: the small model runs on every token
    offset: torch.Tensor | None  # [P, N, P_dim] large − small at capture (carry_offset)
    steps: int = 0  # hybrid steps run on this mask's capture


class StitchedSampler:
    """Runs a plan on an engine set.

    Args:
        engines: the ``small`` and ``large`` engines (any backend).
        guidance_scale: CFG scale; ``<= 1`` disables guidance (batch = prompts, as diffusers).
        shift: flow-matching timestep shift (SD3: 3.0).
        check_finite: record every graph's velocity on the device and raise
            :class:`~hs_runtime.errors.NumericalError` at the end of a denoise that met NaN/inf.
    """

    def __init__(self, engines: EngineSet, guidance_scale: float = 7.0, shift: float = DEFAULT_SHIFT, check_finite: bool = True):
        self.engines = engines
        self.guidance_scale = check_number("guidance scale", guidance_scale, minimum=0.0)
        self.shift = check_number("shift", shift, minimum=1e-6)  # > 0: the flow-matching time shift
        self.check_finite = check_finite
        self._finite = FiniteMonitor.disabled()
        self.small_dims = engines[SMALL].dims
        self.large_dims = engines[LARGE].dims
        self._clock = _Clock(engines.device, False)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def _call(self, graph: str, feeds: dict, outputs=(VELOCITY,)) -> dict:
        clock = self._clock
        start = clock.now() if clock.calls else 0.0
        out = self.engines[graph](feeds, outputs)
        if clock.calls:
            clock.times.calls[self._call_shape(graph, feeds, outputs)].append(clock.now() - start)
        self._finite.record(graph, out)  # device-side: no host synchronisation
        return out

    def _call_shape(self, graph: str, feeds: dict, outputs) -> CallShape:
        dims = self.engines[graph].dims
        patches = feeds["patches"]
        context = feeds[context_names(0)[0]].shape[1] if dims.kv_entries else 0
        text_context = feeds[text_context_names(0)[0]].shape[1] if dims.text_entries else 0
        return CallShape(graph, patches.shape[0], patches.shape[1], context, feeds["encoder_hidden_states"].shape[1], text_context, len(tuple(outputs)) > 1)

    def denoise(self, plan: Plan, latents: torch.Tensor, conditioning: Conditioning, profile: bool = False, should_stop: Callable[[], bool] | None = None, profile_calls: bool = False) -> DenoiseResult:
        """Denoises ``latents [P, C, H, W]`` (initial noise) through every step of ``plan``.

        Args:
            profile: stage times in the result (synchronising the device at stage edges).
            should_stop: called before every step after the first (a host-side check, no device
                synchronisation); ``True`` stops the denoise with :class:`CancelledError`.
            profile_calls: every graph call's time by :class:`CallShape` (``times.calls``); on a
                GPU that synchronises the device around every call, so the two calls of a hybrid
                step no longer overlap the host's work.

        Raises:
            ConcurrencyError: if the same engines are already serving another thread.
            NumericalError: if a graph produced NaN/inf (naming the first such step and graph).
            CancelledError: if ``should_stop`` said so.
        """
        with self.engines.exclusive(), self.engines.host_work():
            return self._denoise(plan, latents, conditioning, profile, should_stop, profile_calls)

    def check_request(self, plan, latents) -> None:
        """Refuses, in one line, a plan that is not a :class:`Plan` and latents that are not a
        ``[P, C, H, W]`` tensor with the models' channels and a size the models and engines take
        (before they reach a tensor op; callers check a request with it before costly work)."""
        if not isinstance(plan, Plan):
            raise ConfigError(describe("plan must be a Plan", got=type(plan).__name__, fix='make one with hs_runtime.make_plan("hybrid", steps)'))
        if not isinstance(latents, torch.Tensor):
            raise ShapeError(describe("latents must be a torch tensor [P, C, H, W]", got=type(latents).__name__, fix="torch.from_numpy(latents)"))
        if latents.dim() != 4:
            raise ShapeError(describe("latents must be [P, C, H, W]", got=tuple(latents.shape)))
        if latents.shape[1] != self.large_dims.in_channels:
            raise ShapeError(describe("latents have the wrong channel count", got=latents.shape[1], expected=f"{self.large_dims.in_channels} (the models' in_channels)"))
        height, width = latents.shape[2:]
        self.small_dims.check_latent(height, width, "small")
        self.large_dims.check_latent(height, width, "large")
        if getattr(self.engines, "check_size", None) is not None:  # engines built for some sizes only
            self.engines.check_size(height, width)

    def _denoise(self, plan, latents, conditioning, profile, should_stop=None, profile_calls=False) -> DenoiseResult:
        device, dtype, cfg = self.engines.device, self.engines.dtype, self.cfg
        self.check_request(plan, latents)
        if latents.shape[0] != conditioning.prompts:
            raise ShapeError(describe("latents and prompt embeddings disagree on prompt count", got=(latents.shape[0], conditioning.prompts)))
        sigmas, timesteps = flow_match_sigmas(plan.steps, self.shift)
        sigma_list = sigmas.tolist()  # host floats for the Euler update: no device reads in the loop
        timesteps = timesteps.to(device)  # one copy up front, not one per step
        embeds, pooled = conditioning.batch(cfg, device, dtype)
        x = latents.to(device=device, dtype=torch.float32)
        _, channels, height, width = x.shape
        p = self.large_dims.patch_size
        batch = embeds.shape[0]
        positions = {role: position_ids(height, width, p, self.engines[role].dims.pos_embed_max_size, device=device).expand(batch, -1) for role in (SMALL, LARGE)}
        run = _RunInputs(self.engines, embeds, pooled, positions, cfg, dtype)
        finite = self._finite = FiniteMonitor(plan.actions, device, getattr(self.engines, "precision", None), self.engines.backend, self.check_finite)
        finite.record_inputs(x, embeds, pooled)

        clock = self._clock = _Clock(device, profile, profile_calls)
        start = clock.now()
        masks: list[TokenMask] = []
        hybrid: _Hybrid | None = None
        step_start = start
        for i, action in enumerate(plan.actions):
            if i and should_stop is not None and should_stop():
                raise CancelledError(describe(f"denoise stopped before step {i} of {plan.steps}", got="should_stop() is True (e.g. every request cancelled)"))
            finite.step = i
            sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
            t = timesteps[i].expand(batch)
            patches = patchify(x, p)  # [P, N, P_dim], fp32
            if action in ("large", "capture"):
                if action == "capture":
                    hybrid = None  # a refresh replaces the cache: free the old one before writing the new
                outputs = self.engines[LARGE].spec.output_names if action == "capture" else (VELOCITY,)
                with clock.stage("large"):
                    out = self._call(LARGE, run.dense(LARGE, patches, t), outputs)
                v_tokens = self._guide(out[VELOCITY])
                if action == "capture":
                    with clock.stage("mask"):
                        mask, hybrid = self._capture(plan, run, x, patches, v_tokens, sigma, t, out)
                    masks.append(mask)
            elif action == "small":
                with clock.stage("small"):
                    v_tokens = self._guide(self._call(SMALL, run.dense(SMALL, patches, t))[VELOCITY])
            else:  # hybrid
                with clock.stage("hybrid"):
                    v_tokens = self._hybrid_step(plan, run, hybrid, patches, t)
                hybrid.steps += 1
                every = plan.mask.reselect_every
                if every and hybrid.steps % every == 0 and i + 1 < plan.steps and plan.actions[i + 1] == "hybrid":
                    with clock.stage("mask"):
                        mask, hybrid = self._reselect(plan, run, x, v_tokens, sigma, hybrid)
                    masks.append(mask)
            x = euler_step(x, unpatchify(v_tokens, channels, height, width, p), sigma, sigma_next)
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

    def _guide(self, velocity_tokens: torch.Tensor) -> torch.Tensor:
        """Engine output ``[B, N, P_dim]`` → guided fp32 ``[P, N, P_dim]``."""
        return guide(velocity_tokens.float(), self.guidance_scale, self.cfg)

    def _hybrid_step(self, plan: Plan, run: "_RunInputs", hybrid: _Hybrid, patches: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One hybrid step → guided velocity tokens ``[P, N, P_dim]``."""
        v_large = self._guide(self._call(LARGE, run.subset(LARGE, patches, hybrid.large, t))[VELOCITY])
        if hybrid.small is None:  # the small model on every token
            v_small = self._guide(self._call(SMALL, run.dense(SMALL, patches, t))[VELOCITY])
            if hybrid.offset is not None:
                v_small = v_small + hybrid.offset
            return scatter_tokens(v_small, hybrid.complex_idx, v_large)
        parts = [(hybrid.complex_idx, v_large)]
        if hybrid.context_idx.shape[1]:  # no token outside the mask at ratio 1.0: no small call
            v_small = self._guide(self._call(SMALL, run.subset(SMALL, patches, hybrid.small, t))[VELOCITY])
            if hybrid.offset is not None:
                v_small = v_small + gather_tokens(hybrid.offset, hybrid.context_idx)
            parts.append((hybrid.context_idx, v_small))
        return join_tokens(patches.shape[1], *parts)  # the two index sets partition the tokens

    def _capture(self, plan, run, x, patches, v_large, sigma, t, large_out):
        """Mask at a capture step, then the hybrid stage's fixed inputs, gathered once per mask
        (the small model's K/V and the large − small offset when the plan uses them)."""
        channels, height, width = x.shape[1:]
        p = self.large_dims.patch_size
        small_out, v_small = None, None
        if plan.small_at_capture:
            outputs = self.engines[SMALL].spec.output_names if plan.small_outside_mask else (VELOCITY,)
            small_out = self._call(SMALL, run.dense(SMALL, patches, t), outputs)
            v_small = self._guide(small_out[VELOCITY])
        as_latent = lambda v: None if v is None else unpatchify(v, channels, height, width, p)  # noqa: E731
        mask = compute_mask(plan.mask, x, as_latent(v_large), as_latent(v_small), sigma, p)
        both = mask.for_batch(self.cfg)
        # Text K/V reuse is the large model's only: the small model reusing its own measured worse
        # than recomputing (docs/quality.md), and its text stream is a small share of its call.
        keep = plan.mask.reselect_every > 0
        large = run.context(LARGE, large_out, both.complex_idx, both.context_idx, plan.reuse_text_kv, keep_queries=keep)
        small = run.context(SMALL, small_out, both.context_idx, both.complex_idx, False, keep_queries=keep) if plan.small_outside_mask else None
        offset = v_large - v_small if plan.carry_offset else None
        return mask, _Hybrid(mask.complex_idx, mask.context_idx, large, small, offset)

    def _reselect(self, plan, run, x, v_tokens, sigma, hybrid: _Hybrid):
        """A new mask of the same size from the ``detail`` score of a hybrid step's merged
        velocity ``v_tokens``, and both models' contexts gathered again from the capture K/V."""
        channels, height, width = x.shape[1:]
        p = self.large_dims.patch_size
        count = hybrid.complex_idx.shape[1]
        mask = compute_mask(plan.mask, x, unpatchify(v_tokens, channels, height, width, p), None, sigma, p, count=count)
        both = mask.for_batch(self.cfg)
        large = run.regather(LARGE, hybrid.large, both.complex_idx, both.context_idx)
        small = run.regather(SMALL, hybrid.small, both.context_idx, both.complex_idx) if hybrid.small is not None else None
        return mask, replace(hybrid, complex_idx=mask.complex_idx, context_idx=mask.context_idx, large=large, small=small)


class _RunInputs:
    """Builds graph feeds for one denoise: conditioning, positions and the empty contexts.

    ``positions`` holds each model's own token positions (``{role: [B, N]}``): they index that
    model's position table, whose size differs within a pair (SD3.5-medium 384, SD3.5-large 192).

    An empty context is one ``[B, 0, D]`` tensor per model, shared by every context input (a
    zero-volume tensor; the TensorRT backend binds a dummy address for it).
    """

    def __init__(self, engines: EngineSet, embeds, pooled, positions, cfg: bool, dtype):
        self.engines, self.embeds, self.pooled, self.positions, self.cfg = engines, embeds, pooled, positions, cfg
        self.dtype = dtype
        batch = embeds.shape[0]
        self.empty = {
            role: torch.empty(batch, 0, engines[role].dims.hidden, dtype=dtype, device=embeds.device) for role in (SMALL, LARGE)
        }

    def _batch(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prompt-level ``[P, …]`` → the CFG batch ``[B, …]`` in the engines' dtype."""
        tokens = tokens.to(self.dtype)
        return torch.cat([tokens, tokens]) if self.cfg else tokens

    def feeds(self, role, patches, token_pos, t, image_kv=None, text_kv=None) -> dict:
        dims, empty = self.engines[role].dims, self.empty[role]
        feeds = {
            "patches": patches,
            "token_pos": token_pos,
            "encoder_hidden_states": self.embeds if text_kv is None else self.embeds[:, :0],
            "pooled_projections": self.pooled,
            "timestep": t,
        }
        for i in range(dims.kv_entries):
            for n, name in enumerate(context_names(i)):
                feeds[name] = empty if image_kv is None else image_kv[i][n]
        for j in range(dims.text_entries):
            for n, name in enumerate(text_context_names(j)):
                feeds[name] = empty if text_kv is None else text_kv[j][n]
        return feeds

    def dense(self, role, patches, t) -> dict:
        """All image tokens, no image context, text recomputed."""
        return self.feeds(role, self._batch(patches), self.positions[role], t)

    def subset(self, role, patches, context: _Context, t) -> dict:
        """``context``'s query tokens (CFG batch) with its cached K/V of the other tokens."""
        queried = self._batch(gather_tokens(patches, context.query_idx[: patches.shape[0]]))
        return self.feeds(role, queried, context.token_pos, t, context.image_kv, context.text_kv)

    def text_kv(self, role, out) -> list:
        """``role``'s per-block text K/V from its capture outputs (copied: engines reuse buffers)."""
        return [tuple(out[n].clone() for n in text_kv_names(j)) for j in range(self.engines[role].dims.text_entries)]

    def context(self, role, out, query_idx, other_idx, reuse_text: bool, keep_queries: bool = False) -> _Context:
        """What ``role``'s hybrid calls on ``query_idx`` reuse from its capture outputs ``out``;
        ``keep_queries`` (mask re-selection) also keeps the query tokens' own K/V, gathered (so
        copied: engines may reuse their output buffers)."""
        image = [tuple(out[n] for n in kv_names(i)) for i in range(self.engines[role].dims.kv_entries)]
        image_kv = [tuple(gather_tokens(t, other_idx) for t in kv) for kv in image]
        query_kv = [tuple(gather_tokens(t, query_idx) for t in kv) for kv in image] if keep_queries else None
        text_kv = self.text_kv(role, out) if reuse_text else None
        return self._context(role, query_idx, other_idx, image_kv, text_kv, query_kv)

    def _context(self, role, query_idx, other_idx, image_kv, text_kv, query_kv) -> _Context:
        return _Context(query_idx, torch.gather(self.positions[role], 1, query_idx), image_kv, text_kv, other_idx, query_kv)

    def regather(self, role, ctx: _Context, query_idx, other_idx) -> _Context:
        """``ctx`` for a re-selected mask: each module's K/V of every token is put back together
        from the context and query parts (one module at a time, so the transient peak is one
        module's K and V, not the whole cache) and split again at the new indices."""
        tokens = self.positions[role].shape[1]
        image_kv, query_kv = [], []
        for context_pair, query_pair in zip(ctx.image_kv, ctx.query_kv):
            full = [join_tokens(tokens, (ctx.context_idx, c), (ctx.query_idx, q)) for c, q in zip(context_pair, query_pair)]
            image_kv.append(tuple(gather_tokens(t, other_idx) for t in full))
            query_kv.append(tuple(gather_tokens(t, query_idx) for t in full))
        return self._context(role, query_idx, other_idx, image_kv, ctx.text_kv, query_kv)
