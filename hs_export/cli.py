"""``hs-export``: a thin click skin over the API. Defaults come from the config dataclasses."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from hs_runtime.errors import HybridStitchError
from hs_runtime.plans import MASK_SIGNALS, PLAN_NAMES, MaskConfig, PlanConfig
from hs_runtime.presets import PRESET_NAMES

from .bench import BenchConfig
from .build import BuildConfig

_PLAN_DEFAULTS = PlanConfig()
_MASK_DEFAULTS = MaskConfig()


_BUILD_DEFAULTS = BuildConfig()
_BENCH_DEFAULTS = BenchConfig()


def _one_line_errors(fn):
    """Turns toolkit errors into one ``Error: …`` line and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HybridStitchError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def plan_options(fn):
    """Options that shape a plan, shared by ``generate`` and ``bench``."""
    options = [
        click.option("--mask-ratio", type=float, default=_MASK_DEFAULTS.ratio, show_default=True, help="Share of image tokens the large model refines."),
        click.option("--mask-signal", type=click.Choice(MASK_SIGNALS), default=_MASK_DEFAULTS.signal, show_default=True),
        click.option("--dilate/--no-dilate", default=_MASK_DEFAULTS.dilate, show_default=True, help="Grow the mask by one token."),
        click.option("--large-fraction", type=float, default=_PLAN_DEFAULTS.large_fraction, show_default=True),
        click.option("--hybrid-end", type=float, default=_PLAN_DEFAULTS.hybrid_end, show_default=True),
        click.option("--small-fraction", type=float, default=_PLAN_DEFAULTS.small_fraction, show_default=True, help="tstitch: small-model share."),
        click.option("--srdiff-large-fraction", type=float, default=_PLAN_DEFAULTS.srdiff_large_fraction, show_default=True),
        click.option("--refresh-every", type=int, default=_PLAN_DEFAULTS.refresh_every, show_default=True, help="Dense large refresh every k hybrid steps (0: never)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plan_config_from(kwargs: dict) -> PlanConfig:
    """Pops the :func:`plan_options` values out of ``kwargs`` into a validated :class:`PlanConfig`."""
    mask = MaskConfig(ratio=kwargs.pop("mask_ratio"), signal=kwargs.pop("mask_signal"), dilate=kwargs.pop("dilate"))
    return PlanConfig(
        large_fraction=kwargs.pop("large_fraction"), hybrid_end=kwargs.pop("hybrid_end"),
        small_fraction=kwargs.pop("small_fraction"), srdiff_large_fraction=kwargs.pop("srdiff_large_fraction"),
        refresh_every=kwargs.pop("refresh_every"), mask=mask,
    )


def model_options(fn):
    """``--preset`` or ``--small/--large`` (+ ``--pipeline``) model selection."""
    options = [
        click.option("--preset", type=click.Choice(PRESET_NAMES), default=None, help="A built-in small/large pair."),
        click.option("--small", "small_src", default=None, help="Small model: diffusers folder or hub id."),
        click.option("--large", "large_src", default=None, help="Large model: diffusers folder or hub id."),
        click.option("--pipeline", "pipeline_src", default=None, help="Folder with the text encoders and VAE (default: --large if it has them)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="hybridstitch")
def main():
    """Export, build, run and benchmark HybridStitch engines for SD3 / SD3.5."""


@main.command()
@click.argument("engine_dir", required=False, type=click.Path(path_type=Path))
@model_options
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None, help="Default: torch for models, the built backend for an engine folder.")
@click.option("--plan", "plan_name", type=click.Choice(PLAN_NAMES), default="hybrid", show_default=True)
@click.option("--prompt", "prompts", multiple=True, required=True, help="Repeat for several prompts.")
@click.option("--negative-prompt", default=None)
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=int, default=None, help="Pixels (default: the preset's or the build's).")
@click.option("--width", type=int, default=None)
@click.option("--guidance-scale", type=float, default=7.0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="torch backend precision.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True)
@click.option("--compare", is_flag=True, help="Also write large-only | this plan | mask overlay side by side.")
@plan_options
@_one_line_errors
def generate(engine_dir, preset, small_src, large_src, pipeline_src, backend, plan_name, prompts, negative_prompt, steps, seed, height, width, guidance_scale, device, dtype, out, compare, **plan_kwargs):
    """Generate an image with any plan.

    Runs on an engine folder (ENGINE_DIR) or on PyTorch models (--preset or --small/--large) and
    prints per-stage timings.
    """
    from .generate import run_generate
    from .sources import open_runtime

    plan_config = plan_config_from(plan_kwargs)
    runtime, default_size = open_runtime(engine_dir, preset, small_src, large_src, pipeline_src, backend, device, dtype)
    run_generate(
        runtime, plan_name, plan_config, list(prompts), negative_prompt, steps, seed,
        height or default_size[0], width or default_size[1], guidance_scale, out, compare,
    )


@main.command()
@model_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Engine folder (default: engines/<preset> or engines/custom).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default=_BUILD_DEFAULTS.backend, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=_BUILD_DEFAULTS.precision, show_default=True)
@click.option("--height", type=int, default=None, help="Image pixels (default: the preset's, else 1024).")
@click.option("--width", type=int, default=None)
@click.option("--prompts", type=int, default=_BUILD_DEFAULTS.prompts, show_default=True, help="Prompts per call (CFG doubles the batch).")
@click.option("--text-tokens", type=int, default=None, help="Text tokens (default: 77 + T5 length).")
@click.option("--mask-ratio", type=float, default=_BUILD_DEFAULTS.mask_ratio, show_default=True, help="Planned mask ratio: large.tokens is tuned for it.")
@click.option("--opset", type=int, default=_BUILD_DEFAULTS.opset, show_default=True)
@click.option("--dynamic-shape", is_flag=True, help="Profiles over batch 1..prompts and half to twice the resolution.")
@click.option("--token-buckets", type=int, default=_BUILD_DEFAULTS.token_buckets, show_default=True, help="TensorRT profiles splitting the complex-token count.")
@click.option("--builder-optimization-level", type=int, default=_BUILD_DEFAULTS.builder_optimization_level, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even if up to date; replace a folder built for something else.")
@_one_line_errors
def build(preset, small_src, large_src, pipeline_src, out, **options):
    """Export the three graphs to ONNX and build engines.

    Writes ONNX files, one engine per graph and manifest.json into --out; a repeat build with the
    same inputs is skipped.
    """
    from .build import build as run_build
    from .sources import resolve_models

    selection = resolve_models(preset, small_src, large_src, pipeline_src, log=_log)
    out = out or Path("engines") / (preset or "custom")
    run_build(selection, BuildConfig(out=out, **options), log=_log)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@_one_line_errors
def inspect(engine_dir):
    """Show what an engine folder holds.

    Graphs, I/O names and shapes, profiles, precision, library versions and file sizes.
    """
    from .inspect import inspect_folder

    inspect_folder(engine_dir)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True)
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--plan", "plan_name", type=click.Choice(PLAN_NAMES), default="hybrid", show_default=True)
@_one_line_errors
def verify(engine_dir, device, steps, plan_name):
    """Check engines against PyTorch.

    Every engine on fresh random inputs, then one end-to-end run; exits non-zero past tolerance.
    """
    from rich.console import Console
    from rich.table import Table

    from hs_runtime.errors import ToleranceError

    from .verify import verify as run_verify

    checks = run_verify(engine_dir, device, steps, plan_name)
    table = Table(title=f"verify {engine_dir}")
    for column in ("check", "max abs", "relative", "tolerance", "result"):
        table.add_column(column, justify="left" if column == "check" else "right")
    for c in checks:
        table.add_row(c.name, f"{c.max_abs:.2e}", f"{c.rel:.2e}", f"{c.tolerance:g}", "ok" if c.ok else "FAIL")
    Console().print(table)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise ToleranceError(f"verification failed: {', '.join(failed)} past tolerance")


@main.command()
@click.argument("engine_dir", required=False, type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None, help="Random-weight models of a preset (no engine folder needed for torch).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None, help="Default: the folder's backend, or torch with --preset.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="torch backend precision.")
@click.option("--plans", default=",".join(_BENCH_DEFAULTS.plans), show_default=True)
@click.option("--steps", type=int, default=_BENCH_DEFAULTS.steps, show_default=True)
@click.option("--warmup", type=int, default=_BENCH_DEFAULTS.warmup, show_default=True)
@click.option("--repeat", type=int, default=_BENCH_DEFAULTS.repeat, show_default=True)
@click.option("--prompts", type=int, default=_BENCH_DEFAULTS.prompts, show_default=True)
@click.option("--height", type=int, default=None, help="Pixels (presets only; default: the preset's).")
@click.option("--width", type=int, default=None)
@click.option("--sweep-ratio", default="", help="Comma-separated mask ratios to sweep, e.g. 0.1,0.2,0.3,0.4,0.5.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG of speedup vs. mask ratio (needs --sweep-ratio).")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None, help="Append the table, with date, device and versions, to this Markdown file.")
@plan_options
@_one_line_errors
def bench(engine_dir, preset, backend, device, dtype, plans, steps, warmup, repeat, prompts, height, width, sweep_ratio, json_path, plot_path, markdown_path, **plan_kwargs):
    """Benchmark every plan against the large model.

    Per plan: latency (median, min, max), speedup vs. large measured in the same run, the FLOP
    ideal, efficiency, per-stage seconds, overhead and peak memory.
    """
    from rich.console import Console

    from hs_runtime.errors import ConfigError, describe

    from .bench import append_markdown, plot_sweep, run_bench, summary_table, write_json
    from .sources import bench_engines

    plan_list = tuple(p.strip() for p in plans.split(",") if p.strip())
    try:
        ratios = tuple(float(r) for r in sweep_ratio.split(",") if r.strip())
    except ValueError:
        raise ConfigError(describe("--sweep-ratio takes comma-separated numbers", got=sweep_ratio)) from None
    if plot_path and not ratios:
        raise ConfigError(describe("--plot draws the ratio sweep", fix="add --sweep-ratio 0.1,0.2,0.3,0.4,0.5"))
    plan_config = plan_config_from(plan_kwargs)
    config = BenchConfig(plans=plan_list, steps=steps, warmup=warmup, repeat=repeat, prompts=prompts, sweep_ratios=ratios)
    engines, latent, text_tokens = bench_engines(engine_dir, preset, backend, device, dtype, prompts, height, width, plan_config.mask.ratio, log=_log)
    report = run_bench(engines, latent[0], latent[1], text_tokens, config, plan_config, log=_log)
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and CI: keep the table on one line per plan
    console.print(summary_table(report))
    if json_path:
        _log(f"wrote {write_json(report, json_path)}")
    if plot_path:
        _log(f"wrote {plot_sweep(report, plot_path)}")
    if markdown_path:
        title = f"{preset or engine_dir}, {report['backend']} {report['dtype']}"
        _log(f"appended to {append_markdown(report, markdown_path, title)}")


def _log(message: str) -> None:
    click.echo(message, err=True)


if __name__ == "__main__":
    sys.exit(main())
