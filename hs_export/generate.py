"""``hs-export generate``: prompt → image, per-stage timings, optional side-by-side comparison."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from hs_runtime.mask import refined_grid
from hs_runtime.plans import make_plan
from hs_runtime.sampler import STAGES
from hs_runtime.validation import check_output_file

console = Console(stderr=True)


def timing_table(title: str, times: dict, steps: int) -> Group:
    """The per-stage seconds under ``title`` (on its own line: rich wraps a table's title to its width)."""
    table = Table()
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = times["total"] or 1e-12
    for stage in (*STAGES, "overhead", "total"):
        table.add_row(stage, f"{times[stage]:.3f}", f"{100 * times[stage] / total:.1f}%")
    return Group(Text(title, style="italic"), table)


def mask_overlay(image, mask_grid: torch.Tensor, alpha: float = 0.5):
    """Tints the complex tokens of ``mask_grid [h, w]`` red on a copy of ``image``."""
    from PIL import Image

    overlay = Image.fromarray((mask_grid.float().cpu().numpy() * 255).astype("uint8")).resize(image.size, Image.NEAREST)
    red = Image.new("RGB", image.size, (255, 0, 0))
    return Image.composite(Image.blend(image, red, alpha), image, overlay)


def join(images, vertical: bool = False, gap: int = 0):
    """Images side by side (or, ``vertical``, one above the other) on white, ``gap`` px apart."""
    from PIL import Image

    along = [i.height if vertical else i.width for i in images]
    across = max(i.width if vertical else i.height for i in images)
    length = sum(along) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (across, length) if vertical else (length, across), "white")
    offset = 0
    for image, size in zip(images, along):
        canvas.paste(image, (0, offset) if vertical else (offset, 0))
        offset += size + gap
    return canvas


def image_suffixes() -> tuple[str, ...]:
    """File extensions PIL can write, the common ones first."""
    from PIL import Image

    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    common = tuple(e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff") if e in writable)
    return common + tuple(sorted(writable - set(common)))


def run_generate(runtime, plan_name, plan_config, prompts, negative_prompt, steps, seeds, height, width, guidance_scale, out: Path, compare: bool):
    """Every prompt at every seed of ``seeds``; images in seed-major order (``out_0``, ``out_1`` …
    when more than one), each seed's written as soon as it has run."""
    out = check_output_file(out, "--out", image_suffixes())
    plan = make_plan(plan_name, steps, plan_config)
    pipe = runtime.pipeline(guidance_scale)
    mask_note = f", mask {plan.mask.ratio * 100:g}% of the tokens" if plan.count("hybrid") else ""
    console.print(f"[bold]{plan.name}[/]: {plan.stages()}{mask_note} on {runtime.engines.backend} ({runtime.engines.device})")
    for seed in seeds:  # every seed and the size refused before the text encoders run
        pipe.noise(len(prompts), plan, height, width, seed)
    conditioning = pipe.encode(prompts, negative_prompt)  # once: every seed and --compare render the same prompts
    paths = _image_paths(out, len(prompts) * len(seeds))
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for k, seed in enumerate(_progress(seeds, plan.name)):
        runs.append(pipe(prompts, plan, height, width, seed, conditioning=conditioning))
        for image, path in zip(runs[-1][0], paths[k * len(prompts):]):
            image.save(path)
    seed_note = f", seed {seeds[0]}" + (f" (of {len(seeds)})" if len(seeds) > 1 else "")
    console.print(timing_table(f"{plan.name}: {steps} steps, {len(prompts)} prompt(s), {width}×{height}{seed_note}", runs[0][1].times.as_dict(), steps))
    if compare:
        large = make_plan("large", steps, plan_config)
        baselines = [pipe(prompts, large, height, width, seed, conditioning=conditioning) for seed in _progress(seeds, "large (--compare)")]
        rows, diffs = [], []
        p = runtime.engines["large"].dims.patch_size
        scale = pipe.text_and_vae.vae_scale_factor
        for (images, result), (baseline_images, baseline) in zip(runs, baselines):
            for i, (base, mine) in enumerate(zip(baseline_images, images)):
                panels = [base, mine]
                if result.masks:
                    panels.append(mask_overlay(mine, refined_grid(result.masks, height // scale // p, width // scale // p)[i]))
                rows.append(join(panels))
            diffs.append((baseline.latents - result.latents).abs().mean().item())
        compare_path = out.with_name(out.stem + "_compare" + out.suffix)
        join(rows, vertical=True, gap=4).save(compare_path)
        console.print(f"compare: large-only | {plan.name} | mask overlay, one row per image → {compare_path} (mean |Δlatent| {sum(diffs) / len(diffs):.4f})")
    for path in paths:
        print(path)
    return runs[0][1]


def _progress(seeds, what: str):
    """``seeds`` with a progress bar on stderr when there are several."""
    if len(seeds) < 2:
        return seeds
    from rich.progress import track

    return track(seeds, description=f"{what}: {len(seeds)} seeds", console=console, transient=True)


def _image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image, else ``out_0`` … ``out_{count-1}`` beside it."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
