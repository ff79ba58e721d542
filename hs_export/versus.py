"""``hs-export bench --versus diffusers``: what a user would otherwise run, on the same weights.

diffusers' own ``StableDiffusion3Pipeline``, loaded with ``from_pretrained`` from the engine
folder's pipeline (text encoders, VAE, scheduler) with the folder's large model as its
transformer, renders the same prompts with the same steps, guidance, size and seed as our
``runtime.pipeline()``, in the engines' dtype (``torch_dtype`` for the whole pipeline, as its
users load it for half-precision inference). Both sides are timed end to end, prompt → image (text encoding, denoise,
VAE decode), round-robin in one process with our plans on every backend, so the ratios are of
medians measured side by side. The small model is not involved on diffusers' side: it runs the
large model on every step, which is our ``large`` plan; the image distance of each of our rows to
diffusers' image (PSNR) shows that ``large`` does the same work (and what the faster plans change).

Denoise-only timings (``bench`` without ``--versus``) are a different measure: this table is
reported apart from them.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from hs_runtime.errors import ModelLoadError, describe, first_line
from hs_runtime.plans import Plan

from .bench import load_note

MEASURE = "prompt_to_image"
DIFFUSERS_CLASS = "diffusers.StableDiffusion3Pipeline"


def diffusers_pipeline(pipeline_source: str, large_source: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """diffusers' ``StableDiffusion3Pipeline`` over the pipeline folder, with the large model as
    its transformer, all of it in ``dtype`` (what a diffusers user passes as ``torch_dtype``; the
    engines' precision, so fp16/bf16 engines are not timed against an fp32 pipeline), ``.eval()``,
    progress bar off.

    Raises:
        ModelLoadError: diffusers is missing or cannot load the folder.
    """
    try:
        from diffusers import StableDiffusion3Pipeline
    except ImportError as exc:
        raise ModelLoadError(describe("--versus diffusers needs diffusers", got=first_line(exc), fix="pip install diffusers transformers")) from exc
    from hs_runtime.models import load_transformer

    transformer = load_transformer(large_source, dtype, device)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(pipeline_source), transformer=transformer, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(describe(f"diffusers could not load the pipeline {pipeline_source}", got=first_line(exc), fix="pass an engine folder whose pipeline is a complete StableDiffusion3Pipeline folder")) from exc
    pipe = pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def image_distance(images, reference) -> dict:
    """PSNR (dB, 8-bit) and the largest pixel difference of ``images`` to ``reference`` (PIL lists)."""
    a, b = _pixels(images), _pixels(reference)
    mse = float(np.mean((a - b) ** 2))
    return {"psnr_vs_diffusers_db": None if mse == 0 else 10 * np.log10(255.0**2 / mse), "max_abs_pixel_diff_vs_diffusers": int(np.abs(a - b).max())}


def run_versus(target, plans: dict[str, Plan], config, log=print) -> dict:
    """Times diffusers' pipeline and our prompt → image for ``plans`` on every backend of ``target``.

    Args:
        target: a :class:`~hs_export.bench.BenchTarget` with ``pipeline_source`` and ``large_source``.
        plans: our plans to run prompt → image (``large`` among them).
        config: the :class:`~hs_export.bench.BenchConfig` (steps are the plans', guidance, seed,
            prompts, warm-up and repeat).

    Returns:
        ``{"tool", "measure", "prompts", …, "rows"}``; rows as in ``bench``'s ``plans`` (``name``,
        ``backend``, ``latency_s_median``, …), diffusers' with ``backend: "diffusers"``.
    """
    from .bench import load_average, round_robin
    from .quality.prompts import builtin_prompts

    first = next(iter(target.runtimes.values()))
    device = first.engines.device
    text_and_vae = first.text_and_vae()  # one copy of the text encoders + VAE for all our rows
    scale = text_and_vae.vae_scale_factor
    height, width = target.latent[0] * scale, target.latent[1] * scale
    prompts = builtin_prompts(config.prompts, target.preset)
    steps = {plan.steps for plan in plans.values()}.pop()
    dtype = first.engines.dtype
    log(f"--versus diffusers: loading {DIFFUSERS_CLASS} from {target.pipeline_source} (transformer: {target.large_source}) in {_name(dtype)}")
    pipe = diffusers_pipeline(target.pipeline_source, target.large_source, device, dtype)
    ours = {backend: runtime.pipeline(config.guidance_scale, text_and_vae=text_and_vae, check_finite=config.check_finite) for backend, runtime in target.runtimes.items()}
    # The denoise column needs the stage clock, which on a GPU synchronises the device at every
    # stage; diffusers' row runs without: ours then run unprofiled too, and the column stays empty.
    profiled = device.type != "cuda"
    last_images: dict = {}

    def diffusers_call():
        start = time.perf_counter()
        images = pipe(
            prompt=prompts, num_inference_steps=steps, guidance_scale=config.guidance_scale, height=height, width=width,
            generator=torch.Generator("cpu").manual_seed(config.seed), max_sequence_length=target.max_sequence_length,
        ).images
        last_images[("large", "diffusers")] = images
        return {"total": time.perf_counter() - start}

    def our_call(name, backend):
        def call():
            start = time.perf_counter()
            images, result = ours[backend](prompts, plans[name], height, width, seed=config.seed, profile=profiled)
            last_images[(name, backend)] = images
            return {"total": time.perf_counter() - start, "denoise": result.times.total if profiled else None}

        return call

    jobs = {("large", "diffusers"): diffusers_call}
    jobs.update({(name, backend): our_call(name, backend) for name in plans for backend in target.runtimes})
    load_before = load_average()
    runs, _ = round_robin(jobs, config.warmup, config.repeat, device, log, what="prompt → image round")
    load_after = load_average()
    reference = last_images[("large", "diffusers")]
    baseline = statistics.median(r["total"] for r in runs[("large", "diffusers")])
    rows = []
    for (name, backend), entries in runs.items():
        totals = [r["total"] for r in entries]
        median = statistics.median(totals)
        row = {
            "name": name,
            "backend": backend,
            "measure": MEASURE,
            "latency_s_median": median,
            "latency_s_min": min(totals),
            "latency_s_max": max(totals),
            "speedup_vs_diffusers": baseline / median,
        }
        if backend == "diffusers":
            row.update(pipeline=DIFFUSERS_CLASS, stages=f"large×{steps}")
        else:
            row.update(stages=plans[name].stages(), **image_distance(last_images[(name, backend)], reference))
            if profiled:
                row["denoise_s_median"] = statistics.median(r["denoise"] for r in entries)
        rows.append(row)
    return {
        "tool": "diffusers",
        "pipeline": DIFFUSERS_CLASS,
        "measure": MEASURE,
        "pipeline_source": target.pipeline_source,
        "transformer_source": target.large_source,
        "prompts": prompts,
        "steps": steps,
        "dtype": _name(dtype),
        "guidance_scale": config.guidance_scale,
        "height": height,
        "width": width,
        "seed": config.seed,
        "warmup": config.warmup,
        "repeat": config.repeat,
        "load_average_1min": {"start": load_before, "end": load_after},
        "rows": rows,
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def add_versus(report: dict, versus: dict) -> dict:
    """The bench report with the comparison under ``versus`` and diffusers' row in ``plans``."""
    report["versus"] = versus
    report["plans"] = report["plans"] + [row for row in versus["rows"] if row["backend"] == "diffusers"]
    return report


def _psnr(row: dict) -> str:
    if row["backend"] == "diffusers":
        return "—"
    return "identical" if row["psnr_vs_diffusers_db"] is None else f"{row['psnr_vs_diffusers_db']:.1f}"


def versus_table(versus: dict):
    """The prompt → image comparison as a rich table."""
    from rich.table import Table

    table = Table(title=f"prompt → image (text encoders + denoise + VAE) vs {versus['pipeline']} ({versus.get('dtype', 'float32')}) — {versus['steps']} steps, {versus['width']}×{versus['height']}, "
                        f"guidance {versus['guidance_scale']:g}, seed {versus['seed']}, {len(versus['prompts'])} prompt(s), median of {versus['repeat']}")
    for column in ("plan", "backend", "latency s (min–max)", "of which denoise s", "speedup vs diffusers", "PSNR to diffusers dB"):
        table.add_column(column, justify="left" if column in ("plan", "backend") else "right")
    for r in versus["rows"]:
        table.add_row(
            r["name"], r["backend"], f"{r['latency_s_median']:.3f} ({r['latency_s_min']:.3f}–{r['latency_s_max']:.3f})",
            f"{r['denoise_s_median']:.3f}" if "denoise_s_median" in r else "—", f"{r['speedup_vs_diffusers']:.2f}×", _psnr(r),
        )
    return table


def versus_markdown(versus: dict) -> str:
    """The prompt → image comparison as Markdown."""
    head = (
        f"Prompt → image (text encoders + denoise + VAE decode), against `{versus['pipeline']}` loaded from the same folder in {versus.get('dtype', 'float32')} "
        f"({versus['steps']} steps, {versus['width']}×{versus['height']}, guidance {versus['guidance_scale']:g}, seed {versus['seed']}, "
        f"{len(versus['prompts'])} prompt(s); median of {versus['repeat']} after {versus['warmup']} warm-up, all rows in the same rounds{load_note(versus.get('load_average_1min'))}):\n\n"
        "| plan | backend | latency s median (min–max) | of which denoise s | speedup vs diffusers | PSNR to diffusers' image dB |\n|---|---|---|---|---|---|\n"
    )
    rows = ""
    for r in versus["rows"]:
        denoise = f"{r['denoise_s_median']:.3f}" if "denoise_s_median" in r else "—"
        rows += (
            f"| {r['name']} | {r['backend']} | {r['latency_s_median']:.3f} ({r['latency_s_min']:.3f}–{r['latency_s_max']:.3f}) | "
            f"{denoise} | {r['speedup_vs_diffusers']:.2f}× | {_psnr(r)} |\n"
        )
    return head + rows
