"""``hs-export``: a thin click skin over the API. Defaults come from the config dataclasses."""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path

import click

from hs_runtime.backends.onnxruntime_backend import THREAD_POOLS
from hs_runtime.errors import ConfigError, HybridStitchError, describe, first_line, out_of_memory
from hs_runtime.plans import MASK_SIGNALS, PLAN_NAMES, MaskConfig, PlanConfig
from hs_runtime.presets import PRESET_NAMES
from hs_runtime.validation import check_seed

from .bench import VERSUS_TOOLS, BenchConfig
from .build import BuildConfig
from .quality.runner import QualityConfig
from .serve.bench_serve import ServeBenchConfig
from .serve.repository import RepositoryConfig
from .serve.server import ServeConfig
from .shapes.train import ShapesTrainConfig

_PLAN_DEFAULTS = PlanConfig()
_MASK_DEFAULTS = MaskConfig()


_BUILD_DEFAULTS = BuildConfig()
_QUALITY_DEFAULTS = QualityConfig()
_TRAIN_DEFAULTS = ShapesTrainConfig()
_BENCH_DEFAULTS = BenchConfig()
_TEXT_DTYPE = click.option(
    "--text-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
    help="Precision of the text encoders and VAE (default fp32); bf16 halves their memory on a GPU (T5-XXL is 19 GB in fp32).",
)


_OS_ERROR_FIXES = {
    errno.ENOSPC: "free some space or choose another path", errno.EDQUOT: "free some space or choose another path",
    errno.EROFS: "choose a path on a writable file system", errno.EACCES: "choose a path you may write, or fix its permissions",
    errno.EPERM: "choose a path you may write, or fix its permissions", errno.EISDIR: "name a file, not a folder",
    errno.ENOENT: "check that the path exists",
}


def _one_line_errors(fn):
    """Turns toolkit errors into one ``Error: …`` line and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HybridStitchError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full disk, a read-only folder: what users meet, in one line too
            where = f"I/O error on {exc.filename}" if exc.filename else "I/O error"
            raise click.ClickException(describe(where, got=exc.strerror or first_line(exc), fix=_OS_ERROR_FIXES.get(exc.errno, "check the path and choose another if needed"))) from None
        except (MemoryError, RuntimeError) as exc:  # out of memory outside an engine call (text encoders, VAE, cache)
            oom = out_of_memory(exc, "the run")
            if oom is None:
                raise
            raise click.ClickException(str(oom)) from None

    return wrapper


def plan_options(fn):
    """Options that shape a plan, shared by ``generate`` and ``bench``."""
    options = [
        click.option("--mask-ratio", type=float, default=None, help=f"Share of image tokens the large model refines [default: an engine folder's build ratio (its profiles are tuned for it, its server's default), else {_MASK_DEFAULTS.ratio}]."),
        click.option("--mask-signal", type=click.Choice(MASK_SIGNALS), default=_MASK_DEFAULTS.signal, show_default=True),
        click.option("--dilate/--no-dilate", default=_MASK_DEFAULTS.dilate, show_default=True, help="Spread each token's score to its 8 neighbours before the top-k (a more contiguous mask; the same token count unless --mask-energy picks it)."),
        click.option("--mask-energy", type=float, default=_MASK_DEFAULTS.energy, show_default=True, help="Adaptive mask: per prompt, the fewest tokens holding this share of the score energy, up to --mask-ratio (0: fixed mask)."),
        click.option("--mask-min-ratio", type=float, default=_MASK_DEFAULTS.min_ratio, show_default=True, help="Adaptive mask: the fewest tokens, as a share of the image's."),
        click.option("--mask-reselect-every", type=int, default=_MASK_DEFAULTS.reselect_every, show_default=True, help="Choose the mask again after every k hybrid steps from their merged velocity (detail signal; 0: never)."),
        click.option("--large-fraction", type=float, default=_PLAN_DEFAULTS.large_fraction, show_default=True),
        click.option("--hybrid-end", type=float, default=_PLAN_DEFAULTS.hybrid_end, show_default=True),
        click.option("--small-fraction", type=float, default=_PLAN_DEFAULTS.small_fraction, show_default=True, help="tstitch: small-model share."),
        click.option("--srdiff-large-fraction", type=float, default=_PLAN_DEFAULTS.srdiff_large_fraction, show_default=True),
        click.option("--refresh-every", type=int, default=_PLAN_DEFAULTS.refresh_every, show_default=True, help="Dense large refresh every k hybrid steps (0: use --refreshes)."),
        click.option("--refreshes", type=int, default=None, help=f"Dense large refreshes spread evenly over the hybrid stage [default: {_PLAN_DEFAULTS.refreshes}; --refresh-every replaces it]."),
        click.option("--carry-offset/--no-carry-offset", default=_PLAN_DEFAULTS.carry_offset, show_default=True, help="Hybrid steps add the capture step's large − small offset outside the mask."),
        click.option("--reuse-text-kv/--no-reuse-text-kv", default=_PLAN_DEFAULTS.reuse_text_kv, show_default=True, help="Hybrid steps take the text K/V from the capture step instead of recomputing the text stream."),
        click.option("--small-outside-mask/--no-small-outside-mask", default=_PLAN_DEFAULTS.small_outside_mask, show_default=True, help="Hybrid steps run the small model only on the tokens outside the mask."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plan_config_from(kwargs: dict, engine_dir: Path | None = None) -> PlanConfig:
    """Pops the :func:`plan_options` values out of ``kwargs`` into a validated :class:`PlanConfig`;
    without ``--mask-ratio``, an engine folder's plans refine the share of tokens it was built for."""
    ratio = kwargs.pop("mask_ratio")
    if ratio is None:
        ratio = _MASK_DEFAULTS.ratio if engine_dir is None else _build_mask_ratio(engine_dir)
    mask = MaskConfig(
        ratio=ratio, signal=kwargs.pop("mask_signal"), dilate=kwargs.pop("dilate"),
        energy=kwargs.pop("mask_energy"), min_ratio=kwargs.pop("mask_min_ratio"), reselect_every=kwargs.pop("mask_reselect_every"),
    )
    return PlanConfig(
        large_fraction=kwargs.pop("large_fraction"), hybrid_end=kwargs.pop("hybrid_end"),
        small_fraction=kwargs.pop("small_fraction"), srdiff_large_fraction=kwargs.pop("srdiff_large_fraction"),
        refresh_every=(every := kwargs.pop("refresh_every")), refreshes=_refreshes(kwargs.pop("refreshes"), every), carry_offset=kwargs.pop("carry_offset"),
        reuse_text_kv=kwargs.pop("reuse_text_kv"), small_outside_mask=kwargs.pop("small_outside_mask"), mask=mask,
    )


def _build_mask_ratio(engine_dir: Path) -> float:
    from hs_runtime.manifest import Manifest

    return Manifest.load(engine_dir).shape.mask_ratio


def _refreshes(given: int | None, every: int) -> int:
    """The count of refreshes: a period (``--refresh-every``) replaces it, so both is an error."""
    if given is not None and every:
        raise ConfigError(describe("--refresh-every and --refreshes both given", got=(every, given), fix="give one: a period in hybrid steps, or a count spread over the hybrid stage"))
    return _PLAN_DEFAULTS.refreshes if given is None else given


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
    _quiet_libraries()


def _quiet_libraries() -> None:
    """The CLI prints its own progress: no loading bars or info chatter from diffusers/transformers
    (but a prompt cut to the text encoders' length is said)."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        # except the SD3 pipeline's own warnings: the part of a prompt CLIP or T5 cut off
        logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3").setLevel(logging.WARNING)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # diffusers/transformers only power the build side and prompt-to-image
        pass


@main.command()
@click.argument("engine_dir", required=False, type=click.Path(path_type=Path))
@model_options
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None, help="Default: torch for models, the built backend for an engine folder.")
@click.option("--plan", "plan_name", type=click.Choice(PLAN_NAMES), default="hybrid", show_default=True)
@click.option("--prompt", "prompts", multiple=True, required=True, help="Repeat for several prompts.")
@click.option("--negative-prompt", "negative_prompts", multiple=True, help="Once for every prompt, or once per --prompt in the same order.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the preset's or the build's, else 28).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", "seed_count", type=int, default=1, show_default=True, help="Render seeds SEED … SEED+K−1 (with --compare: one row per image).")
@click.option("--height", type=int, default=None, help="Pixels (default: the preset's or the build's).")
@click.option("--width", type=int, default=None)
@click.option("--guidance-scale", type=float, default=None, help="CFG scale (default: the preset's or the build's, else 7.0).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="torch backend precision (default fp32); an engine folder's own engines refuse any but the one they were built in.")
@_TEXT_DTYPE
@click.option("--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True)
@click.option("--compare", is_flag=True, help="Also write large-only | this plan | mask overlay side by side.")
@plan_options
@_one_line_errors
def generate(engine_dir, preset, small_src, large_src, pipeline_src, backend, plan_name, prompts, negative_prompts, steps, seed, seed_count, height, width, guidance_scale, device, dtype, text_dtype, out, compare, **plan_kwargs):
    """Generate an image with any plan.

    Runs on an engine folder (ENGINE_DIR) or on PyTorch models (--preset or --small/--large) and
    prints per-stage timings.
    """
    from .generate import run_generate
    from .runs import open_runtime

    plan_config = plan_config_from(plan_kwargs, engine_dir)
    if seed_count < 1:
        raise ConfigError(describe("--seeds must be >= 1", got=seed_count))
    check_seed(seed)
    check_seed(seed + seed_count - 1)  # before minutes of loading, not after the earlier seeds ran
    if len(negative_prompts) not in (0, 1, len(prompts)):  # a second one used to replace the first for every prompt
        raise ConfigError(describe("--negative-prompt given neither once nor once per --prompt", got=f"{len(negative_prompts)} negative, {len(prompts)} prompts", fix="give one for every prompt, or one per --prompt in the same order"))
    blank = [p for p in prompts if not p.strip()]
    if blank:  # as the client and the server refuse it; often an unset shell variable
        raise ConfigError(describe("empty --prompt", got=repr(blank[0]), fix="pass the text to draw"))
    negative_prompt = None if not negative_prompts else negative_prompts[0] if len(negative_prompts) == 1 else list(negative_prompts)
    runtime, defaults = open_runtime(engine_dir, preset, small_src, large_src, pipeline_src, backend, device, dtype, text_dtype)
    run_generate(
        runtime, plan_name, plan_config, list(prompts), negative_prompt,
        defaults.steps if steps is None else steps, list(range(seed, seed + seed_count)),
        defaults.height if height is None else height, defaults.width if width is None else width,
        defaults.guidance_scale if guidance_scale is None else guidance_scale, out, compare,
    )


@main.command()
@model_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Engine folder (default: engines/<preset> or engines/custom).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default=_BUILD_DEFAULTS.backend, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=_BUILD_DEFAULTS.precision, show_default=True)
@click.option("--height", type=int, default=None, help="Image pixels (default: the preset's, else 1024).")
@click.option("--width", type=int, default=None)
@click.option("--prompts", type=int, default=_BUILD_DEFAULTS.prompts, show_default=True, help="Prompts per call (CFG doubles the batch).")
@click.option("--text-tokens", type=int, default=None, help="Text tokens (default: CLIP length + T5 length).")
@click.option("--mask-ratio", type=float, default=_BUILD_DEFAULTS.mask_ratio, show_default=True, help="Planned mask ratio: the subset profiles are tuned for it.")
@click.option("--opset", type=int, default=_BUILD_DEFAULTS.opset, show_default=True)
@click.option("--dynamic-shape", is_flag=True, help="Profiles over batch 1..prompts and half to twice the resolution.")
@click.option("--token-buckets", type=int, default=_BUILD_DEFAULTS.token_buckets, show_default=True, help="Subset profiles per graph splitting the token count.")
@click.option("--builder-optimization-level", type=int, default=_BUILD_DEFAULTS.builder_optimization_level, show_default=True)
@click.option("--keep-onnx", is_flag=True, help="Keep the ONNX files of a TensorRT build.")
@click.option("--ort-thread-pool", type=click.Choice(THREAD_POOLS), default=_BUILD_DEFAULTS.ort_thread_pool, show_default=True,
              help="ONNX Runtime engines: share the process's thread pool (faster; the process's other ONNX Runtime sessions must share it too) or one pool per session.")
@click.option("--dry-run", is_flag=True, help="Print every I/O tensor's largest shape, the weights and what the build needs; build nothing.")
@click.option("--force", is_flag=True, help="Rebuild even if up to date; replace a folder built for something else; try a build the host looks too small for.")
@_one_line_errors
def build(preset, small_src, large_src, pipeline_src, out, dry_run, **options):
    """Export one graph per model to ONNX and build engines.

    Writes one engine per model and manifest.json into --out; a repeat build with the same inputs
    is skipped. --dry-run loads no weights (any preset, SD3.5-large included).
    """
    from .build import build as run_build
    from .build import resolve_models
    from .build.builder import dry_run as run_dry_run
    from .build.builder import preset_models

    config = BuildConfig(out=out or Path("engines") / (preset or "custom"), **options)
    selection = resolve_models(preset, small_src, large_src, pipeline_src, log=_log, materialize=False)
    if dry_run:
        run_dry_run(selection, config, log=_log)
        return
    if preset:  # a host too small is refused before the preset's random weights are made (SD3.5: ~40 GiB)
        selection = preset_models(preset, config, pipeline_src, log=_log)
    run_build(selection, config, log=_log)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@_one_line_errors
def inspect(engine_dir):
    """Show what an engine folder holds.

    Graphs, I/O names and shapes, profiles, precision, library versions and file sizes.
    """
    from .build.inspect import inspect_folder

    inspect_folder(engine_dir)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True)
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--plan", "plan_name", type=click.Choice(PLAN_NAMES), default="hybrid", show_default=True)
@_one_line_errors
def verify(engine_dir, device, steps, plan_name):
    """Check engine files and engines against PyTorch.

    Every file's sha256 against the build's record, every engine on fresh random inputs, then one
    end-to-end run; exits non-zero on a changed file, NaN/inf or past tolerance.
    """
    from rich.console import Console
    from rich.table import Table

    from hs_runtime.errors import ToleranceError

    from .build.verify import failure_message
    from .build.verify import verify as run_verify

    checks = run_verify(engine_dir, device, steps, plan_name)
    table = Table(title=f"verify {engine_dir}")
    for column in ("check", "max abs", "relative", "tolerance", "result"):
        table.add_column(column, justify="left" if column == "check" else "right")
    for c in checks:
        table.add_row(*c.row())
    Console().print(table)
    failed = failure_message(checks)
    if failed:
        raise ToleranceError(failed)


@main.command()
@click.argument("engine_dir", required=False, type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None, help="Random-weight models of a preset (no engine folder needed for torch).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None, help="Default: the folder's backend, or torch with --preset.")
@click.option("--backends", "backends_list", default=None, help="Comma-separated backends timed side by side in one run, e.g. onnxruntime,torch.")
@click.option("--versus", type=click.Choice(VERSUS_TOOLS), default=None, help="Also time diffusers' StableDiffusion3Pipeline on the same weights, prompt → image.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="torch backend precision (default fp32); an engine folder's own engines refuse any but the one they were built in.")
@click.option("--plans", default=",".join(_BENCH_DEFAULTS.plans), show_default=True)
@click.option("--steps", type=int, default=_BENCH_DEFAULTS.steps, show_default=True)
@click.option("--warmup", type=int, default=_BENCH_DEFAULTS.warmup, show_default=True)
@click.option("--repeat", type=int, default=_BENCH_DEFAULTS.repeat, show_default=True)
@click.option("--prompts", type=int, default=_BENCH_DEFAULTS.prompts, show_default=True)
@click.option("--guidance-scale", type=float, default=None, help="CFG scale (default: the preset's or the build's, as generate takes it); only on or off (> 1) changes the timing.")
@click.option("--height", type=int, default=None, help="Pixels (default: the preset's or the build's; an engine folder runs sizes its profiles cover).")
@click.option("--width", type=int, default=None)
@click.option("--sweep-ratio", default="", help="Comma-separated mask ratios to sweep, e.g. 0.1,0.2,0.3,0.4,0.5.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG of speedup vs. mask ratio (needs --sweep-ratio).")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None, help="Append the table, with date, device and versions, to this Markdown file.")
@click.option("--finite-check/--no-finite-check", default=_BENCH_DEFAULTS.check_finite, show_default=True, help="Per-step NaN/inf record (off only to measure its cost).")
@click.option("--calls", is_flag=True, help="Also time every graph call: per kind of call its count, median time, and time and FLOPs against a dense large call (a device sync per call on GPUs).")
@plan_options
@_one_line_errors
def bench(engine_dir, preset, backend, backends_list, versus, device, dtype, plans, steps, warmup, repeat, prompts, guidance_scale, height, width, sweep_ratio, json_path, plot_path, markdown_path, finite_check, calls, **plan_kwargs):
    """Benchmark every plan against the large model.

    Per plan: latency (median, min, max), speedup vs. large measured in the same run, the FLOP
    ideal, efficiency, per-stage seconds, overhead and peak memory. --backends times every plan on
    every backend in the same rounds and compares them; --versus diffusers adds prompt → image
    against diffusers' own pipeline; --calls says which graph calls the time goes to.
    """
    from rich.console import Console

    from hs_runtime.errors import ConfigError, describe
    from hs_runtime.validation import check_output_file

    from .bench import append_markdown, open_target, parse_backends, plot_sweep, run_bench, summary_tables
    from .reports import write_json

    plan_list = tuple(p.strip() for p in plans.split(",") if p.strip())
    try:
        ratios = tuple(float(r) for r in sweep_ratio.split(",") if r.strip())
    except ValueError:
        raise ConfigError(describe("--sweep-ratio takes comma-separated numbers", got=sweep_ratio)) from None
    if plot_path and not ratios:
        raise ConfigError(describe("--plot draws the ratio sweep", fix="add --sweep-ratio 0.1,0.2,0.3,0.4,0.5"))
    for flag, path, suffixes in (("--json", json_path, None), ("--plot", plot_path, (".png",)), ("--markdown", markdown_path, None)):
        if path is not None:
            check_output_file(path, flag, suffixes)  # before the run, not after minutes of timing
    if backend and backends_list is not None:
        raise ConfigError(describe("--backend and --backends both given", got=f"--backend {backend} --backends {backends_list}", fix="pass one: --backends onnxruntime,torch times several side by side"))
    backend_names = parse_backends(backends_list)
    if backends_list is not None and not backend_names:
        raise ConfigError(describe("--backends names no backend", got=repr(backends_list), expected="e.g. onnxruntime,torch"))
    plan_config = plan_config_from(plan_kwargs, engine_dir)
    if guidance_scale is None:
        from .runs import default_guidance

        guidance_scale = default_guidance(engine_dir, preset)
    config = BenchConfig(plans=plan_list, steps=steps, warmup=warmup, repeat=repeat, prompts=prompts, guidance_scale=guidance_scale, sweep_ratios=ratios, check_finite=finite_check, backends=backend_names, versus=versus, calls=calls)
    target = open_target(engine_dir, preset, backend_names or (backend,), device, dtype, prompts, height, width, plan_config.mask.ratio, versus=versus, log=_log, guided=guidance_scale > 1.0)
    report = run_bench(target.engines, target.latent[0], target.latent[1], target.text_tokens, config, plan_config, log=_log, loaded_bytes=target.loaded_bytes)
    if versus:
        from hs_runtime.plans import make_plan

        from .versus import add_versus, run_versus

        named = {name: make_plan(name, steps, plan_config) for name in dict.fromkeys(("large", *plan_list))}
        report = add_versus(report, run_versus(target, named, config, log=_log))
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and CI: keep the table on one line per plan
    for table in summary_tables(report):
        console.print(table)
    if json_path:
        _log(f"wrote {write_json(report, json_path)}")
    if plot_path:
        _log(f"wrote {plot_sweep(report, plot_path)}")
    if markdown_path:
        title = f"{preset or engine_dir}, " + (f"{report['backend']} {report['dtype']}" if len(report["backends"]) == 1 else " vs ".join(b["name"] for b in report["backends"]))
        title += " vs diffusers" if versus else ""
        _log(f"appended to {append_markdown(report, markdown_path, title)}")


@main.command()
@click.argument("engine_dir", required=False, type=click.Path(path_type=Path))
@model_options
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None, help="Default: torch for models, the built backend for an engine folder.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="torch backend precision (default fp32); an engine folder's own engines refuse any but the one they were built in.")
@_TEXT_DTYPE
@click.option("--prompts", "prompts_source", default="8", show_default=True, help="N built-in prompts, or a text file with one prompt per line.")
@click.option("--seeds", type=int, default=_QUALITY_DEFAULTS.seeds, show_default=True, help="Seeds 0 … K−1 per prompt.")
@click.option("--plans", default=",".join(_QUALITY_DEFAULTS.plans), show_default=True, help="Named plans; large is always added as the reference.")
@click.option("--sweep", "sweeps", multiple=True, help="FAMILY:KNOB=V1,V2[:KNOB=…] (repeatable; knobs crossed); 'standard' is the sweep of docs/quality.md.")
@click.option("--steps", type=int, default=None, help="Default: the preset's or the build's.")
@click.option("--guidance-scale", type=float, default=None, help="Default: the preset's or the build's.")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--batch", type=int, default=None, help="Prompts per denoise call (default: all).")
@click.option("--warmup", type=int, default=_QUALITY_DEFAULTS.warmup, show_default=True)
@click.option("--repeat", type=int, default=_QUALITY_DEFAULTS.repeat, show_default=True, help="Timed round-robin rounds.")
@click.option("--timing/--no-timing", default=_QUALITY_DEFAULTS.timing, show_default=True, help="--no-timing: render only (batched; an engine folder runs on the torch backend unless --backend says otherwise).")
@click.option("--adherence/--no-adherence", default=None, help="Read each image back against its prompt (default: on for the shapes pair, which alone allows it).")
@click.option("--clip-model", type=click.Path(path_type=Path), default=None, help="Local CLIP folder (save_pretrained) for CLIP score; never downloaded.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None, help="Append the table, with date, device and versions.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG: distance to large vs. speedup, one front per family.")
@click.option("--grid", "grid_path", type=click.Path(path_type=Path), default=None, help="PNG: rows = plans, columns = prompts, mask on hybrid rows.")
@plan_options
@_one_line_errors
def quality(engine_dir, preset, small_src, large_src, pipeline_src, backend, device, dtype, text_dtype, prompts_source, seeds, plans, sweeps, steps, guidance_scale, height, width, batch, warmup, repeat, timing, adherence, clip_model, json_path, markdown_path, plot_path, grid_path, **plan_kwargs):
    """Measure what the speed costs: every plan against the large model's image.

    Every plan renders the same prompts × seeds; each image is compared with the large plan's
    image of the same prompt and seed (PSNR, SSIM, MS-SSIM, LPIPS where its weights are cached,
    PSNR inside/outside the mask), and every plan is timed round-robin in the same run. Per plan
    the paired difference to the srdiff front at the same SD3.5-size ideal speedup (bootstrap 95%
    interval, verdict), prompt adherence on the shapes pair, CLIP score with --clip-model.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .quality import QualityConfig, load_prompts, run_quality
    from .quality.prompts import is_count
    from .quality.sweeps import sweep_points
    from .quality.report import append_markdown, paired_summary_table, plot_fronts, summary_table, write_grid
    from .reports import write_json
    from .runs import open_runtime

    from hs_runtime.validation import check_output_file

    for path, what, suffixes in ((json_path, "--json", None), (markdown_path, "--markdown", None), (plot_path, "--plot", (".png",)), (grid_path, "--grid", (".png",))):
        if path is not None:
            check_output_file(path, what, suffixes)  # before the run, not after it
    plan_config = plan_config_from(plan_kwargs, engine_dir)
    config = QualityConfig(
        plans=tuple(p.strip() for p in plans.split(",") if p.strip()), sweeps=tuple(sweeps), seeds=seeds, steps=steps,
        guidance_scale=guidance_scale, height=height, width=width, batch=batch, warmup=warmup, repeat=repeat,
        timing=timing, adherence=adherence, clip_model=None if clip_model is None else str(clip_model),
    )
    if clip_model is not None:
        from .quality.clip import check_clip_folder

        check_clip_folder(clip_model)  # before loading any model
    # refused before minutes of loading: a typo in --plans / --sweep, a bad prompts file
    sweep_points(config.plans, config.sweeps, plan_config)
    prompts = load_prompts(prompts_source, preset) if preset is not None or not is_count(prompts_source) else None  # a count needs the pair's preset
    if not timing and engine_dir is not None and backend is None:
        backend = "torch"  # nothing is timed: render with the PyTorch graphs of the folder's models, any batch
        _log("--no-timing: rendering on the torch backend (the models the engine folder names)")
    runtime, defaults = open_runtime(engine_dir, preset, small_src, large_src, pipeline_src, backend, device, dtype, text_dtype)
    config.adherence_for(defaults.preset)  # refuses --adherence on a pair without the shapes grammar
    prompts = prompts or load_prompts(prompts_source, defaults.preset)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        def progress(total):
            task = bar.add_task("rendering", total=total)
            return lambda description: bar.update(task, advance=1, description=f"rendering {description}")

        result = run_quality(runtime, defaults, prompts, config, plan_config, log=_log, progress=progress)
    report = result["report"]
    if json_path:  # the measurements first: nothing after the run may lose them
        _log(f"wrote {write_json(report, json_path)}")
    if markdown_path:
        title = f"{defaults.preset or engine_dir or large_src}, {report['backend']}"
        _log(f"appended to {append_markdown(report, markdown_path, title)}")
    if plot_path:
        _log(f"wrote {plot_fronts(report, plot_path)}")
    if grid_path:
        _log(f"wrote {write_grid(report, result['grid_images'], result['grid_masks'], grid_path)}")
    out = Console() if Console().is_terminal else Console(width=170)
    out.print(summary_table(report))
    out.print(paired_summary_table(report))


@main.command("train-shapes")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for large/ (SD3 pipeline), small/transformer and training.json.")
@click.option("--seed", type=int, default=_TRAIN_DEFAULTS.seed, show_default=True)
@click.option("--scenes", type=int, default=_TRAIN_DEFAULTS.scenes, show_default=True, help="Training scenes (rendered and encoded once).")
@click.option("--vae-steps", type=int, default=_TRAIN_DEFAULTS.vae_steps, show_default=True)
@click.option("--text-steps", type=int, default=_TRAIN_DEFAULTS.text_steps, show_default=True, help="Steps teaching the text encoders the grammar (0: leave them random).")
@click.option("--small-steps", type=int, default=_TRAIN_DEFAULTS.small_steps, show_default=True)
@click.option("--large-steps", type=int, default=_TRAIN_DEFAULTS.large_steps, show_default=True)
@click.option("--batch", type=int, default=_TRAIN_DEFAULTS.batch, show_default=True)
@click.option("--budget-minutes", type=float, default=_TRAIN_DEFAULTS.budget_minutes, show_default=True, help="A phase still running past this stops early (and says so); a run cut short before both transformers train writes nothing.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Cache the trained VAE and encoded scenes here (safetensors; one it cannot read is rebuilt), to retrain only the transformers.")
@_one_line_errors
def train_shapes(out, **options):
    """Train the shapes pair (VAE, text encoders, small and large SD3 transformers) on CPU.

    Procedural scenes, SD3's rectified-flow objective, fixed seeds, progress with loss; writes
    fp16 weights read back with from_pretrained. The shipped weights came from the defaults
    (hs-export train-shapes --out hs_export/shapes/model), before the CLIP tokenizer's ids were
    made process-independent: a retrain gives a comparable pair, not the same one.
    """
    from .shapes.train import ShapesTrainConfig, train_shapes as run_training

    run_training(ShapesTrainConfig(out=out, **options), log=_log)


_SERVE_DEFAULTS = ServeConfig()
_REPO_DEFAULTS = RepositoryConfig()
_SERVE_BENCH_DEFAULTS = ServeBenchConfig()


def repository_options(fn):
    """Options of the model repository, shared by ``triton-repo`` and ``serve``."""
    options = [
        click.option("--instances", type=int, default=_REPO_DEFAULTS.instances, show_default=True, help="Instances per model, each a Triton Python-backend process with its own runtime."),
        click.option("--device", default=_REPO_DEFAULTS.device, show_default=True, help="cpu (KIND_CPU) or cuda:N (KIND_GPU on GPU N; one server per GPU)."),
        click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None, help="Default: the folder's own backend."),
        click.option("--pipeline", default=None, help="Text encoders + VAE folder, written as its absolute path (default: the folder's; without one only hybridstitch_latents is served). serve needs it on this host; triton-repo takes an absolute path that exists only where the server runs."),
        _TEXT_DTYPE,
        click.option("--models", default=None, callback=lambda _c, _p, v: None if v is None else tuple(m.strip() for m in v.split(",") if m.strip()),
                     help="Serve only these: hybridstitch and/or hybridstitch_latents, comma-separated (default: both where text encoders are known). Each model's instances hold their own engines."),
        click.option("--dynamic-batching/--no-dynamic-batching", default=_REPO_DEFAULTS.dynamic_batching, show_default=True, help="Triton's dynamic batcher (off: one request per execution, no queue bound)."),
        click.option("--max-batch-size", type=int, default=None, help="Requests per execution (default: the prompts one engine call takes)."),
        click.option("--max-queue-delay-ms", type=float, default=_REPO_DEFAULTS.max_queue_delay_ms, show_default=True, help="How long the batcher may hold a request to fill a batch."),
        click.option("--max-queue", type=int, default=_REPO_DEFAULTS.max_queue, show_default=True, help="Requests that may wait; more are refused at once (UNAVAILABLE, HTTP 503). 0: no bound."),
        click.option("--copy-engines", is_flag=True, help="Copy the engine folder into the repository instead of referencing its path."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("triton-repo")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository folder (created; may hold only this toolkit's models).")
@repository_options
@_one_line_errors
def triton_repo(engine_dir, out, **options):
    """Write a Triton model repository for an engine folder.

    hybridstitch and hybridstitch_latents: config.pbtxt (Python backend, instance group, dynamic
    batching, bounded queue) and 1/model.py. Runs on NVIDIA's tritonserver container as is, or with
    hs-export serve.
    """
    from .serve.preflight import repository_needs
    from .serve.repository import write_repository

    config = RepositoryConfig(engine_dir=engine_dir, **options)
    repository = write_repository(config, out, log=_log)
    _log(f"the serving host needs: {repository_needs(config).summary()}")
    _log(f"models {', '.join(repository.models)} (max batch {repository.max_batch_size}) for {repository.engine_dir}; NVIDIA's container runs it with: tritonserver --model-repository={repository.path} --disable-auto-complete-config")
    click.echo(repository.path)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@repository_options
@click.option("--host", default=_SERVE_DEFAULTS.host, show_default=True, help="Address to listen on (0.0.0.0 or :: for every interface; a name is resolved to its address).")
@click.option("--http-port", type=int, default=_SERVE_DEFAULTS.http_port, show_default=True)
@click.option("--grpc-port", type=int, default=_SERVE_DEFAULTS.grpc_port, show_default=True)
@click.option("--metrics-port", type=int, default=_SERVE_DEFAULTS.metrics_port, show_default=True)
@click.option("--repo", type=click.Path(path_type=Path), default=None, help="Write the model repository here and keep it (default: a temporary folder).")
@click.option("--exit-timeout-secs", "exit_timeout_s", type=int, default=_SERVE_DEFAULTS.exit_timeout_s, show_default=True, help="How long in-flight requests (and open HTTP connections: Triton waits for them) may take to finish after SIGTERM or Ctrl+C (>= 1).")
@click.option("-v", "--verbose", is_flag=True, help="Triton's verbose log, and one line per batch from the models.")
@click.option("--dry-run", is_flag=True, help="Make every check serve makes before it starts (options, ports, memory for the instances on this host) and stop.")
@_one_line_errors
def serve(engine_dir, host, http_port, grpc_port, metrics_port, repo, exit_timeout_s, verbose, dry_run, **options):
    """Serve an engine folder on Triton Inference Server.

    Writes the model repository (as triton-repo does) and runs the tritonserver binary of the
    nvidia-pytriton wheel on it: hybridstitch (prompt → image) and hybridstitch_latents
    (embeddings + noise → latents) behind Triton's dynamic batcher; KServe v2 over HTTP and gRPC,
    Prometheus metrics. Refuses, before Triton starts, instances that cannot fit in the device's
    free memory. Stops, after finishing in-flight requests, on SIGTERM or Ctrl+C.
    """
    from .serve.server import preflight
    from .serve.server import serve as run_serve

    model = RepositoryConfig(engine_dir=engine_dir, **options)
    config = ServeConfig(model, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, repo=repo, exit_timeout_s=exit_timeout_s, verbose=verbose)
    if dry_run:
        _, memory = preflight(config)
        click.echo(f"{memory}\nready to serve: hs-export serve without --dry-run starts tritonserver on {host}")
        return
    run_serve(config, log=_log)


@main.command()
@click.option("--url", default=_SERVE_BENCH_DEFAULTS.url, show_default=True, help="http://HOST:PORT or grpc://HOST:PORT")
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plan", "plan_name", type=click.Choice(PLAN_NAMES), default=None, help="Default: the server's default plan.")
@click.option("--steps", type=int, default=None, help="Default: the server's.")
@click.option("--guidance-scale", type=float, default=None)
@click.option("--mask-ratio", type=float, default=None)
@click.option("--height", type=int, default=None, help="Pixels (default: the engines' build size).")
@click.option("--width", type=int, default=None)
@click.option("--timeout", "timeout_s", type=float, default=_SERVE_BENCH_DEFAULTS.timeout_s, show_default=True, help="Seconds one request may take, queueing included.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True)
@_one_line_errors
def client(url, prompt, negative_prompt, seed, plan_name, steps, guidance_scale, mask_ratio, height, width, timeout_s, out):
    """Ask a running server for one image (KServe v2 via tritonclient)."""
    from hs_runtime.validation import check_output_file

    from .generate import image_suffixes
    from .serve.client import HybridStitchClient, check_request_values

    check_request_values(prompt, seed, steps, guidance_scale, mask_ratio, height, width)  # before connecting
    out = check_output_file(out, "--out", image_suffixes())  # before the request, not after it
    with HybridStitchClient(url, timeout_s) as remote:
        result = remote.generate(prompt, seed, negative_prompt, plan_name, steps, guidance_scale, mask_ratio, height, width)
    path = result.save(out)
    _log("timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()))
    click.echo(path)


@main.command("bench-serve")
@click.argument("url", default=_SERVE_BENCH_DEFAULTS.url)
@click.option("--concurrency", default=",".join(map(str, _SERVE_BENCH_DEFAULTS.concurrency)), show_default=True, help="Comma-separated client concurrencies.")
@click.option("--requests", type=int, default=_SERVE_BENCH_DEFAULTS.requests, show_default=True, help="Requests per concurrency level.")
@click.option("--prompt", default=_SERVE_BENCH_DEFAULTS.prompt, show_default=True)
@click.option("--plan", "plan_name", type=click.Choice(PLAN_NAMES), default=None, help="Default: the server's default plan.")
@click.option("--steps", type=int, default=None, help="Per-request steps (default: the server's).")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--metrics-url", default=None, help="Triton's Prometheus endpoint (default: the URL's host, port 8002).")
@click.option("--timeout", "timeout_s", type=float, default=_SERVE_BENCH_DEFAULTS.timeout_s, show_default=True)
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path), default=None, help="JSON of an earlier run (e.g. batching off): adds the throughput ratio.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None, help="Append the table, with date and mode, to this Markdown file.")
@_one_line_errors
def bench_serve(url, concurrency, requests, prompt, plan_name, steps, height, width, metrics_url, timeout_s, baseline_path, json_path, markdown_path):
    """Benchmark a running server: images/s and latency per concurrency.

    Reports whether the server batches (its model config), p50/p95/p99 latency and the mean
    Triton batch per concurrency level; --baseline adds the ratio to another run.
    """
    from rich.console import Console

    from hs_runtime.errors import ConfigError, describe
    from hs_runtime.validation import check_output_file

    from .reports import write_json
    from .serve import bench_serve as bs

    for flag, path in (("--json", json_path), ("--markdown", markdown_path)):
        if path is not None:
            check_output_file(path, flag)  # before the run, not after it

    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        raise ConfigError(describe("--concurrency takes comma-separated integers", got=concurrency)) from None
    config = ServeBenchConfig(url=url, concurrency=levels, requests=requests, prompt=prompt, plan=plan_name, steps=steps, height=height, width=width, metrics_url=metrics_url, timeout_s=timeout_s)
    baseline = bs.read_json(baseline_path) if baseline_path else None
    report = bs.with_baseline(bs.run_bench_serve(config, log=_log), baseline)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(bs.summary_table(report))
    if json_path:
        _log(f"wrote {write_json(report, json_path)}")
    if markdown_path:
        _log(f"appended to {bs.append_markdown(report, markdown_path, f'bench-serve, {bs.mode(report)}')}")


def _log(message: str) -> None:
    click.echo(message, err=True)


if __name__ == "__main__":
    sys.exit(main())
