"""``hs-export quality``: what the speed costs, measured in one run.

Every plan renders the same prompts × seeds; each image is compared with the ``large`` plan's
image of the same prompt and seed; the same run times every plan round-robin (``bench``'s
timing), so each row holds measured speedup, FLOP-ideal speedup and distance to large.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
from dataclasses import dataclass

import torch

from hs_runtime.contract import LARGE, SMALL, ModelDims
from hs_runtime.errors import ConfigError, describe
from hs_runtime.flops import ideal_speedup, plan_flops
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import PlanConfig
from hs_runtime.presets import MODEL_CONFIGS

from ..bench import time_plans
from ..build import library_versions
from .metrics import ImageDistance, region_pixels, to_tensor
from .sweeps import PlanVariant, plan_variants

METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "psnr_inside", "psnr_outside")
# The FLOP model at the sizes the paper measures: SD3.5-large with SD3.5-medium at 1024².
SD35_IMAGE_TOKENS, SD35_TEXT_TOKENS = 4096, 333


@dataclass(frozen=True)
class QualityConfig:
    """Settings of a quality run; CLI defaults come from here.

    Attributes:
        seeds: seeds ``0 … seeds−1`` per prompt.
        steps / guidance_scale / height / width: ``None`` uses the preset's or the build's.
        batch: prompts per denoise call (``None``: all prompts at once).
        repeat / warmup: timing rounds (round-robin over every plan).
        grid_prompts: columns of the ``--grid`` picture.
    """

    plans: tuple[str, ...] = ("large", "small", "tstitch", "srdiff", "hybrid")
    sweeps: tuple[str, ...] = ()
    seeds: int = 2
    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch: int | None = None
    warmup: int = 1
    repeat: int = 2
    grid_prompts: int = 8

    def __post_init__(self):
        if self.seeds < 1:
            raise ConfigError(describe("--seeds must be >= 1", got=self.seeds, fix="pass --seeds 1 or more (seeds 0 … K−1 are used)"))
        for name in ("steps", "batch", "height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(describe(f"--{name} must be >= 1", got=value))
        if self.repeat < 1 or self.warmup < 0:
            raise ConfigError(describe("need repeat >= 1 and warmup >= 0", got=(self.repeat, self.warmup)))
        if self.guidance_scale is not None and self.guidance_scale <= 0:
            raise ConfigError(describe("--guidance-scale must be > 0", got=self.guidance_scale))


def sd35_ideal_speedup(plan) -> float:
    """The plan's FLOP-ideal speedup at SD3.5-large + SD3.5-medium, 1024² (4096 + 333 tokens)."""
    small = ModelDims.from_config(MODEL_CONFIGS["sd3.5-medium"])
    large = ModelDims.from_config(MODEL_CONFIGS["sd3.5-large"])
    return ideal_speedup(plan, small, large, SD35_IMAGE_TOKENS, SD35_TEXT_TOKENS)


def run_quality(runtime, defaults, prompts: list[str], config: QualityConfig, plan_config: PlanConfig | None = None, log=print, progress=None) -> dict:
    """Renders, compares and times every plan; returns the JSON-ready report.

    Args:
        runtime: a :class:`~hs_runtime.HybridStitchRuntime` with text encoders and VAE.
        defaults: :class:`~hs_export.build.sources.RunDefaults` for unset sizes, steps, guidance.
        progress: ``progress(total) -> advance(description)``, for a progress bar.
    """
    if not prompts:
        raise ConfigError(describe("no prompts to render", fix="give --prompts N (built-in prompts) or a file with one prompt per line"))
    steps = defaults.steps if config.steps is None else config.steps
    guidance = defaults.guidance_scale if config.guidance_scale is None else config.guidance_scale
    height = defaults.height if config.height is None else config.height
    width = defaults.width if config.width is None else config.width
    variants = plan_variants(config.plans, config.sweeps, steps, plan_config or PlanConfig(), log)
    text_and_vae = runtime.text_and_vae()
    engines = runtime.engines
    small_dims, large_dims = engines[SMALL].dims, engines[LARGE].dims
    scale = text_and_vae.vae_scale_factor
    grid_h, grid_w = height // scale // large_dims.patch_size, width // scale // large_dims.patch_size
    cfg = guidance > 1.0
    conditioning = text_and_vae.encode(prompts, None, cfg, runtime.max_sequence_length)
    batch = config.batch or len(prompts)
    distance = ImageDistance()
    seeds = list(range(config.seeds))
    noise = {s: initial_latents(1, height, width, s, scale).expand(len(prompts), -1, -1, -1).contiguous() for s in seeds}
    advance = progress(len(variants) * len(seeds)) if progress else (lambda _description: None)

    def render(variant: PlanVariant, seed: int):
        latents, masks = [], []
        for start in range(0, len(prompts), batch):
            chunk = slice(start, start + batch)
            part = _slice_conditioning(conditioning, chunk)
            result = runtime.denoise(variant.plan, noise[seed][chunk], part, guidance_scale=guidance)
            latents.append(result.latents)
            if result.masks:
                masks.append(result.masks[0].as_grid(grid_h, grid_w).cpu())
        images = text_and_vae.decode(torch.cat(latents))
        advance(f"{variant.name} · seed {seed}")
        return images, (torch.cat(masks) if masks else None)

    reference: dict[int, torch.Tensor] = {}
    reference_regions: dict[int, torch.Tensor] = {}
    rows: dict[str, list[dict]] = {}
    grid_images: dict[str, list] = {}
    grid_masks: dict[str, torch.Tensor] = {}
    # large first (the reference), then the named hybrid (its mask is the region for plans without one).
    ordered = sorted(variants, key=lambda v: (v.name != "large", v.name != "hybrid"))
    for variant in ordered:
        rows[variant.name] = []
        for seed in seeds:
            images, masks = render(variant, seed)
            pixels = to_tensor(images)
            if variant.name == "large":
                reference[seed] = pixels
            if masks is not None and seed not in reference_regions:
                reference_regions[seed] = masks
            regions = masks if masks is not None else reference_regions.get(seed)
            region_px = region_pixels(regions, height, width) if regions is not None else None
            rows[variant.name] += distance(pixels, reference[seed], region_px)
            if seed == seeds[0] and variant.name == variant.family:  # named plans go into the grid
                grid_images[variant.name] = images[: config.grid_prompts]
                if masks is not None:
                    grid_masks[variant.name] = masks[: config.grid_prompts]

    log(f"timing {len(variants)} plans round-robin ({config.warmup} warm-up + {config.repeat} timed rounds, {min(batch, len(prompts))} prompt(s) per call)")
    timing_prompts = slice(0, min(batch, len(prompts)))
    runs, _ = time_plans(
        lambda plan, latents, cond, profile: runtime.denoise(plan, latents, cond, guidance_scale=guidance, profile=profile),
        {v.name: v.plan for v in variants}, noise[seeds[0]][timing_prompts], _slice_conditioning(conditioning, timing_prompts),
        config.warmup, config.repeat, engines.device, log,
    )
    medians = {name: statistics.median(r["total"] for r in entries) for name, entries in runs.items()}
    n_img = large_dims.image_tokens(height // scale, width // scale)
    text_tokens = conditioning.prompt_embeds.shape[1]
    plans = []
    for variant in variants:
        plan = variant.plan
        summary = {
            "name": variant.name,
            "family": variant.family,
            "knobs": variant.knobs,
            "stages": plan.stages(),
            "mask_ratio": plan.mask.ratio if plan.count("hybrid") else None,
            "latency_s_median": medians[variant.name],
            "speedup_vs_large": medians["large"] / medians[variant.name],
            "ideal_speedup": ideal_speedup(plan, small_dims, large_dims, n_img, text_tokens),
            "ideal_speedup_sd35": sd35_ideal_speedup(plan),
            "flops_per_sample": plan_flops(plan, small_dims, large_dims, n_img, text_tokens).total,
            "reference": variant.name == "large",
        }
        for metric in METRICS:
            summary[f"{metric}_to_large" if metric in ("psnr", "ssim", "ms_ssim", "lpips") else metric] = _mean(r[metric] for r in rows[variant.name])
        summary["psnr_to_large_std"] = _std(r["psnr"] for r in rows[variant.name])
        plans.append(summary)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(engines.device) if engines.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backend": engines.backend,
        "dtype": str(engines.dtype).replace("torch.", ""),
        "preset": defaults.preset,
        "steps": steps,
        "guidance_scale": guidance,
        "height": height,
        "width": width,
        "image_tokens": n_img,
        "text_tokens": text_tokens,
        "prompts": prompts,
        "seeds": seeds,
        "prompts_per_call": min(batch, len(prompts)),
        "timing": {"warmup": config.warmup, "repeat": config.repeat},
        "lpips": distance.lpips.reason if not distance.lpips.available else distance.lpips.reason,
        "lpips_available": distance.lpips.available,
        "versions": library_versions(),
        "plans": plans,
    }
    return {"report": report, "grid_images": grid_images, "grid_masks": grid_masks}


def _slice_conditioning(conditioning, part: slice):
    from hs_runtime.sampler import Conditioning

    def cut(t):
        return None if t is None else t[part]

    return Conditioning(cut(conditioning.prompt_embeds), cut(conditioning.pooled_prompt_embeds), cut(conditioning.negative_prompt_embeds), cut(conditioning.negative_pooled_prompt_embeds))


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values) -> float | None:
    finite = _finite(values)
    return statistics.fmean(finite) if finite else None


def _std(values) -> float | None:
    finite = _finite(values)
    return statistics.pstdev(finite) if len(finite) > 1 else None
