"""``hs-export quality``: what the speed costs, measured in one run.

Every plan renders the same prompts × seeds; each image is compared with the ``large`` plan's
image of the same prompt and seed; the same run times every plan round-robin (``bench``'s
timing), so each row holds measured speedup, FLOP-ideal speedup and distance to large. Per plan
the run also reports the paired difference to the ``srdiff`` front at the same SD3.5-size ideal
speedup with a bootstrap interval (:mod:`.stats`), prompt adherence on the ``shapes`` pair
(:mod:`.adherence`) and CLIP score with a local CLIP model (:mod:`.clip`). Without timing
(``timing=False``) it only renders, batched, and leaves the measured columns empty.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
from collections import defaultdict
from dataclasses import dataclass

import torch

from hs_runtime.backends.base import precision_name
from hs_runtime.contract import LARGE, SMALL, ModelDims
from hs_runtime.errors import ConfigError, describe
from hs_runtime.flops import ideal_speedup, plan_flops
from hs_runtime.mask import refined_grid, used_shares
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import PlanConfig, with_mask
from hs_runtime.presets import MODEL_CONFIGS

from ..bench import time_plans
from ..build import library_versions
from . import adherence as adherence_lib
from . import stats
from .metrics import ImageDistance, region_pixels, to_tensor
from .sweeps import PlanVariant, plan_variants

METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "psnr_inside", "psnr_outside")
# Compared image by image with the srdiff front (JSON: ``delta_<metric>_vs_srdiff_front``).
PAIRED_METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "clip_score")
ADHERENCE_PRESETS = ("shapes",)
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
        timing: ``False`` skips the timing rounds (render only; measured speedups are ``None``).
        grid_prompts: columns of the ``--grid`` picture.
        adherence: read each image back against its prompt (:mod:`.adherence`); ``None``: on
            for the ``shapes`` pair, off otherwise; ``True`` on any other pair is an error.
        clip_model: a local CLIP folder for CLIP score (``None``: no CLIP score).
        resamples / bootstrap_seed: the bootstrap of the paired intervals.
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
    timing: bool = True
    grid_prompts: int = 8
    adherence: bool | None = None
    clip_model: str | None = None
    resamples: int = stats.RESAMPLES
    bootstrap_seed: int = stats.SEED

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
        if self.resamples < 1:
            raise ConfigError(describe("resamples must be >= 1", got=self.resamples))

    def adherence_for(self, preset: str | None) -> bool:
        """Whether this run checks adherence for a pair of ``preset``.

        Raises:
            ConfigError: adherence asked for on a pair whose prompts have no grammar to read back.
        """
        if self.adherence and preset not in ADHERENCE_PRESETS:
            raise ConfigError(
                describe(
                    "prompt adherence can only be read back on the shapes pair", got=f"preset {preset or 'none (your own weights)'}",
                    expected=" | ".join(ADHERENCE_PRESETS), fix="drop --adherence; for your own weights pass --clip-model DIR for CLIP score",
                )
            )
        return preset in ADHERENCE_PRESETS if self.adherence is None else self.adherence


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
    # Everything that can refuse the run does so before minutes of rendering.
    scenes = _prompt_scenes(prompts, config, defaults.preset, log)
    steps = defaults.steps if config.steps is None else config.steps
    guidance = defaults.guidance_scale if config.guidance_scale is None else config.guidance_scale
    height = defaults.height if config.height is None else config.height
    width = defaults.width if config.width is None else config.width
    variants = plan_variants(config.plans, config.sweeps, steps, plan_config or PlanConfig(), log)
    clip = None
    if config.clip_model is not None:  # after the plans: a typo there costs no CLIP load
        from .clip import ClipScorer

        clip = ClipScorer(config.clip_model)
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

    mask_shares: dict[str, list[float]] = defaultdict(list)  # per plan, per image: complex-token share used

    def render(variant: PlanVariant, seed: int):
        latents, masks = [], []
        for start in range(0, len(prompts), batch):
            chunk = slice(start, start + batch)
            part = _slice_conditioning(conditioning, chunk)
            result = runtime.denoise(variant.plan, noise[seed][chunk], part, guidance_scale=guidance, shift=text_and_vae.shift)
            latents.append(result.latents)
            if result.masks:
                masks.append(refined_grid(result.masks, grid_h, grid_w).cpu())
                mask_shares[variant.name] += used_shares(result.masks).tolist()
        images = text_and_vae.decode(torch.cat(latents))
        advance(f"{variant.name} · seed {seed}")
        return images, (torch.cat(masks) if masks else None)

    reference: dict[int, torch.Tensor] = {}
    reference_regions: dict[int, torch.Tensor] = {}
    rows: dict[str, list[dict]] = {}  # per plan, one dict per image: seed-major (seed 0's prompts, then seed 1's …)
    grid_images: dict[str, list] = {}
    grid_masks: dict[str, torch.Tensor] = {}
    # large first (the reference), then the named hybrid (its mask is the region for plans without
    # one), then every other plan with a mask, so no plan without one renders before a region exists.
    ordered = sorted(variants, key=lambda v: (v.name != "large", v.name != "hybrid", not v.plan.count("hybrid")))
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
            image_rows = distance(pixels, reference[seed], region_px)
            if scenes is not None:
                for row, image, scene in zip(image_rows, pixels, scenes):
                    row["adherence"] = adherence_lib.score_image(image, scene)
            if clip is not None:
                for row, score in zip(image_rows, clip(pixels, prompts)):
                    row["clip_score"] = score
            rows[variant.name] += image_rows
            if seed == seeds[0] and variant.name == variant.family:  # named plans go into the grid
                grid_images[variant.name] = images[: config.grid_prompts]
                if masks is not None:
                    grid_masks[variant.name] = masks[: config.grid_prompts]

    medians = {v.name: None for v in variants}
    if config.timing:
        log(f"timing {len(variants)} plans round-robin ({config.warmup} warm-up + {config.repeat} timed rounds, {min(batch, len(prompts))} prompt(s) per call)")
        timing_prompts = slice(0, min(batch, len(prompts)))
        runs = time_plans(
            lambda plan, latents, cond, profile: runtime.denoise(plan, latents, cond, guidance_scale=guidance, profile=profile, shift=text_and_vae.shift),
            {v.name: v.plan for v in variants}, noise[seeds[0]][timing_prompts], _slice_conditioning(conditioning, timing_prompts),
            config.warmup, config.repeat, engines.device, log,
        )
        medians = {name: statistics.median(r["total"] for r in entries) for name, entries in runs.items()}
    n_img = large_dims.image_tokens(height // scale, width // scale)
    text_tokens = conditioning.prompt_embeds.shape[1]
    plans = []
    for variant in variants:
        plan = variant.plan
        if plan.mask.energy and mask_shares[variant.name]:  # adaptive mask: cost at the share it used
            share = statistics.mean(mask_shares[variant.name])
            plan = with_mask(plan, ratio=share, energy=0.0)
        summary = {
            "name": variant.name,
            "family": variant.family,
            "knobs": variant.knobs,
            "stages": plan.stages(),
            "mask_ratio": plan.mask.ratio if plan.count("hybrid") else None,
            "latency_s_median": medians[variant.name],
            "speedup_vs_large": None if medians[variant.name] is None else medians["large"] / medians[variant.name],
            "ideal_speedup": ideal_speedup(plan, small_dims, large_dims, n_img, text_tokens),
            "ideal_speedup_sd35": sd35_ideal_speedup(plan),
            "flops_per_sample": plan_flops(plan, small_dims, large_dims, n_img, text_tokens).total,
            "reference": variant.name == "large",
        }
        for metric in METRICS:
            summary[f"{metric}_to_large" if metric in ("psnr", "ssim", "ms_ssim", "lpips") else metric] = _mean(r[metric] for r in rows[variant.name])
        summary["psnr_to_large_std"] = _std(r["psnr"] for r in rows[variant.name])
        # an image equal to large's has infinite PSNR: left out of the means above, and counted here
        summary["identical_to_large"] = sum(1 for r in rows[variant.name] if r["psnr"] == math.inf)
        summary["clip_score"] = _mean(r["clip_score"] for r in rows[variant.name]) if clip is not None else None
        summary["adherence"] = adherence_lib.summarise([r["adherence"] for r in rows[variant.name]]) if scenes is not None else None
        plans.append(summary)
    per_image = {v.name: _per_image(rows[v.name]) for v in variants}
    _add_paired(plans, variants, per_image, config)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(engines.device) if engines.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backend": engines.backend,
        "dtype": str(engines.dtype).replace("torch.", ""),
        "text_dtype": precision_name(runtime.text_dtype),  # the text encoders and VAE (--text-dtype)
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
        "timing": {"warmup": config.warmup, "repeat": config.repeat} if config.timing else None,
        "image_order": "seed-major: every prompt at seed 0, then every prompt at seed 1, …",
        "paired": {
            "front": "srdiff (large for the first k steps, then small; small is k = 0)",
            "matched_at": "ideal_speedup_sd35",
            "interpolation": "per image, linear between the two front points bracketing the plan's ideal_speedup_sd35; outside their range: no comparison (null)",
            "bootstrap": {"resamples": config.resamples, "seed": config.bootstrap_seed, "level": stats.LEVEL, "over": "images (prompt × seed)"},
            "verdict": f"above / below: the whole 95% interval on the better / worse side of 0; else level; front: the points that make the front; {stats.FEW_IMAGES}: under {stats.MIN_VERDICT_IMAGES} images",
        },
        "adherence": "shapes scene read back from the pixels (hs_export/quality/adherence.py)" if scenes is not None else None,
        "clip_model": str(config.clip_model) if clip is not None else None,
        "lpips": distance.lpips.reason if not distance.lpips.available else distance.lpips.reason,
        "lpips_available": distance.lpips.available,
        "versions": library_versions(),
        "plans": plans,
    }
    return {"report": report, "grid_images": grid_images, "grid_masks": grid_masks}


def _prompt_scenes(prompts: list[str], config: QualityConfig, preset: str | None, log) -> list | None:
    """What each prompt asks for, when this run checks adherence; ``None`` when it does not.

    Asked for (``adherence=True``), a prompt outside the shapes grammar is an error; by default it
    turns adherence off with a note.
    """
    if not config.adherence_for(preset):
        return None
    try:
        return [adherence_lib.parse_prompt(p) for p in prompts]
    except ConfigError:
        if config.adherence:
            raise
        bad = next(p for p in prompts if _unparsable(p))
        log(f"note: no adherence column: prompt {bad!r} is not of the shapes grammar (--adherence makes this an error)")
        return None


def _unparsable(prompt: str) -> bool:
    try:
        adherence_lib.parse_prompt(prompt)
    except ConfigError:
        return True
    return False


def _per_image(rows: list[dict]) -> dict[str, list]:
    """One list per metric in image order (non-finite values, e.g. PSNR of an identical image, as ``None``)."""
    names = [m for m in PAIRED_METRICS if any(r.get(m) is not None for r in rows)]
    table = {m: [_json_number(r.get(m)) for r in rows] for m in names}
    if rows and "adherence" in rows[0]:
        table["adherence_score"] = [r["adherence"]["score"] for r in rows]
    return table


def _json_number(value):
    return value if value is None or math.isfinite(value) else None


def _add_paired(plans: list[dict], variants: list[PlanVariant], per_image: dict, config: QualityConfig) -> None:
    """Adds ``delta_<metric>_vs_srdiff_front`` (mean, 95% interval, verdict) and the per-image values to every plan."""
    actions = {v.name: v.plan.actions for v in variants}
    entries = [{"name": p["name"], "actions": actions[p["name"]], "ideal_speedup_sd35": p["ideal_speedup_sd35"]} for p in plans]
    # Distances to large are undefined for large itself (PSNR inf): it takes part as nothing but the reference.
    compared = [e for e in entries if e["name"] != "large"]
    paired = stats.paired_vs_front(compared, per_image, PAIRED_METRICS, config.resamples, config.bootstrap_seed)
    for plan in plans:
        entry = paired.get(plan["name"])
        for metric in PAIRED_METRICS:
            plan[f"delta_{metric}_vs_srdiff_front"] = None if entry is None else entry.get(metric)
        plan["srdiff_front_match"] = {"at": plan["ideal_speedup_sd35"], "why": "the reference"} if entry is None else entry["match"]
        plan["verdict_vs_srdiff_front"] = (plan["delta_psnr_vs_srdiff_front"] or {}).get("verdict")
        plan["on_srdiff_front"] = plan["name"] != "large" and stats.is_front_plan(actions[plan["name"]])
        plan["per_image"] = per_image[plan["name"]]


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
