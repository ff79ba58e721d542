"""``hs-export generate``: prompt → image, per-stage timings, optional side-by-side comparison."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hs_runtime.plans import make_plan
from hs_runtime.sampler import STAGES
from hs_runtime.validation import check_output_file

console = Console(stderr=True)


def timing_table(title: str, times: dict, steps: int) -> Table:
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = times["total"] or 1e-12
    for stage in (*STAGES, "overhead", "total"):
        table.add_row(stage, f"{times[stage]:.3f}", f"{100 * times[stage] / total:.1f}%")
    return table


def mask_overlay(image, mask_grid: torch.Tensor, alpha: float = 0.5):
    """Tints the complex tokens of ``mask_grid [h, w]`` red on a copy of ``image``."""
    from PIL import Image

    overlay = Image.fromarray((mask_grid.float().cpu().numpy() * 255).astype("uint8")).resize(image.size, Image.NEAREST)
    red = Image.new("RGB", image.size, (255, 0, 0))
    return Image.composite(Image.blend(image, red, alpha), image, overlay)


def side_by_side(images):
    from PIL import Image

    width = sum(i.width for i in images)
    canvas = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    return canvas


def image_suffixes() -> tuple[str, ...]:
    """File extensions PIL can write, the common ones first."""
    from PIL import Image

    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    common = tuple(e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff") if e in writable)
    return common + tuple(sorted(writable - set(common)))


def run_generate(runtime, plan_name, plan_config, prompts, negative_prompt, steps, seed, height, width, guidance_scale, out: Path, compare: bool):
    out = check_output_file(out, "--out", image_suffixes())
    plan = make_plan(plan_name, steps, plan_config)
    pipe = runtime.pipeline(guidance_scale)
    console.print(f"[bold]{plan.name}[/]: {plan.stages()} on {runtime.engines.backend} ({runtime.engines.device})")
    images, result = pipe(prompts, plan, height, width, seed, negative_prompt)
    console.print(timing_table(f"{plan.name}: {steps} steps, {len(prompts)} prompt(s), {width}×{height}", result.times.as_dict(), steps))
    if compare:  # every run before any file is written: a run that fails leaves nothing behind
        baseline_images, baseline = pipe(prompts, make_plan("large", steps, plan_config), height, width, seed, negative_prompt)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = _save(images, out)
    if compare:
        rows = []
        for i, (base, mine) in enumerate(zip(baseline_images, images)):
            panels = [base, mine]
            if result.masks:
                p = runtime.engines["large"].dims.patch_size
                scale = pipe.text_and_vae.vae_scale_factor
                grid = result.masks[0].as_grid(height // scale // p, width // scale // p)[i]
                panels.append(mask_overlay(mine, grid))
            rows.append(side_by_side(panels))
        compare_path = out.with_name(out.stem + "_compare" + out.suffix)
        _save(rows, compare_path)
        diff = (baseline.latents - result.latents).abs().mean().item()
        console.print(f"compare: large-only | {plan.name} | mask overlay → {compare_path} (mean |Δlatent| {diff:.4f})")
    for path in paths:
        print(path)
    return result


def _save(images, out: Path) -> list[Path]:
    if len(images) == 1:
        images[0].save(out)
        return [out]
    paths = [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths
