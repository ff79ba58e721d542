"""``hs-export``: a thin click skin over the API. Defaults come from the config dataclasses."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from hs_runtime.errors import HybridStitchError
from hs_runtime.plans import MASK_SIGNALS, PLAN_NAMES, MaskConfig, PlanConfig

_PLAN_DEFAULTS = PlanConfig()
_MASK_DEFAULTS = MaskConfig()


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
    from hs_runtime.presets import PRESET_NAMES

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
    """Prompt → image with any plan, on PyTorch models or on an engine folder."""
    from .generate import run_generate
    from .sources import open_runtime

    plan_config = plan_config_from(plan_kwargs)
    runtime, default_size = open_runtime(engine_dir, preset, small_src, large_src, pipeline_src, backend, device, dtype)
    run_generate(
        runtime, plan_name, plan_config, list(prompts), negative_prompt, steps, seed,
        height or default_size[0], width or default_size[1], guidance_scale, out, compare,
    )


if __name__ == "__main__":
    sys.exit(main())
