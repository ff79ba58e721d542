"""``hs-export bench``: every plan against the large model, per stage, next to the FLOP ideal.

Plans are timed round-robin (large, small, …, large, small, …) so machine noise lands on all of
them alike; speedups are ratios of medians measured in the same run. Timings are synchronised
with the device (``profile=True``). Nothing here is asserted by tests except the output format.
"""

from __future__ import annotations

import datetime
import platform
import resource
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from hs_runtime.contract import LARGE, SMALL
from hs_runtime.flops import ideal_speedup, plan_flops
from hs_runtime.errors import ConfigError, describe
from hs_runtime.plans import PLAN_NAMES, MaskConfig, PlanConfig, make_plan, with_mask
from hs_runtime.sampler import STAGES, Conditioning, StitchedSampler
from hs_runtime.validation import check_int, check_number, check_seed

from .build import library_versions
from .reports import append_section, versions_line


@dataclass(frozen=True)
class BenchConfig:
    """Bench settings; CLI defaults come from here.

    Attributes:
        check_finite: the sampler's per-step NaN/inf record (off only to measure its cost).
    """

    plans: tuple[str, ...] = ("large", "small", "tstitch", "srdiff", "hybrid")
    steps: int = 28
    warmup: int = 1
    repeat: int = 3
    prompts: int = 1
    guidance_scale: float = 7.0
    seed: int = 0
    sweep_ratios: tuple[float, ...] = ()
    check_finite: bool = True

    def __post_init__(self):
        unknown = [p for p in self.plans if p not in PLAN_NAMES]
        if unknown or not self.plans:
            raise ConfigError(describe("unknown plan in --plans", got=unknown or "none", expected=" | ".join(PLAN_NAMES)))
        if self.repeat < 1 or self.warmup < 0 or self.steps < 1:
            raise ConfigError(describe("need repeat >= 1, warmup >= 0 and steps >= 1", got=(self.repeat, self.warmup, self.steps)))
        check_int("prompts", self.prompts)
        check_seed(self.seed)
        check_number("guidance scale", self.guidance_scale, minimum=0.0)
        for ratio in self.sweep_ratios:
            MaskConfig(ratio=ratio)  # raises ConfigError outside (0, 1]


def random_conditioning(prompts: int, text_tokens: int, joint_dim: int, pooled_dim: int, device, seed: int) -> Conditioning:
    """Random prompt embeddings: latency does not depend on what the text says."""
    g = torch.Generator().manual_seed(seed)
    e, ne = (torch.randn(prompts, text_tokens, joint_dim, generator=g) for _ in range(2))
    p, np_ = (torch.randn(prompts, pooled_dim, generator=g) for _ in range(2))
    return Conditioning(e.to(device), p.to(device), ne.to(device), np_.to(device))


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (includes everything loaded so far)"


def _median_times(runs: list[dict]) -> dict:
    keys = set().union(*(r.keys() for r in runs))
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def time_plans(denoise, plans: dict, latents, conditioning, warmup: int, repeat: int, device: torch.device, log=print) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Times every plan round-robin (all plans once per round), so machine noise lands on all
    of them alike.

    Args:
        denoise: ``denoise(plan, latents, conditioning, profile=True) -> DenoiseResult``.

    Returns:
        Per plan name, the timed rounds' stage times (``StageTimes.as_dict()`` plus
        ``step:<action>`` wall times); and per plan name the peak memory in bytes.
    """
    runs: dict[str, list[dict]] = {name: [] for name in plans}
    peaks: dict[str, int] = {}
    for round_index in range(warmup + repeat):
        timed = round_index >= warmup
        for name, plan in plans.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result = denoise(plan, latents, conditioning, profile=True)
            if timed:
                times = result.times
                runs[name].append({**times.as_dict(), **{f"step:{a}": s for a, s in times.step_seconds.items()}})
                peaks[name] = max(peaks.get(name, 0), _peak_memory(device)[0])
        log(f"{'warm-up' if not timed else 'timed'} round {round_index + 1}/{warmup + repeat} done")
    return runs, peaks


def run_bench(engines, latent_height: int, latent_width: int, text_tokens: int, config: BenchConfig, plan_config: PlanConfig | None = None, log=print) -> dict:
    """Times every plan (and the ratio sweep) on one engine set; returns the JSON-ready report."""
    plan_config = plan_config or PlanConfig()
    device = engines.device
    large_dims, small_dims = engines[LARGE].dims, engines[SMALL].dims
    n_img = large_dims.image_tokens(latent_height, latent_width)
    names = list(dict.fromkeys(("large", *config.plans)))  # the baseline always runs
    plans = {name: make_plan(name, config.steps, plan_config) for name in names}
    for ratio in config.sweep_ratios:
        plans[f"hybrid@{ratio:g}"] = with_mask(make_plan("hybrid", config.steps, plan_config), ratio=ratio)
    sampler = StitchedSampler(engines, config.guidance_scale, check_finite=config.check_finite)
    cond = random_conditioning(config.prompts, text_tokens, large_dims.joint_attention_dim, large_dims.pooled_projection_dim, device, config.seed)
    g = torch.Generator().manual_seed(config.seed)
    latents = torch.randn(config.prompts, large_dims.in_channels, latent_height, latent_width, generator=g)

    runs, peaks = time_plans(sampler.denoise, plans, latents, cond, config.warmup, config.repeat, device, log)

    baseline = statistics.median(r["total"] for r in runs["large"])
    report_plans = []
    for name, plan in plans.items():
        totals = [r["total"] for r in runs[name]]
        med = _median_times(runs[name])
        ideal = ideal_speedup(plan, small_dims, large_dims, n_img, text_tokens)
        speedup = baseline / statistics.median(totals)
        hybrid_wall = med.get("step:hybrid", 0.0)
        report_plans.append({
            "name": name,
            "stages": plan.stages(),
            "mask_ratio": plan.mask.ratio if plan.count("hybrid") else None,
            "latency_s_median": statistics.median(totals),
            "latency_s_min": min(totals),
            "latency_s_max": max(totals),
            "speedup_vs_large": speedup,
            "ideal_speedup": ideal,
            "efficiency": speedup / ideal,
            "overhead_fraction": med["overhead"] / med["total"],
            "hybrid_overhead_fraction": (hybrid_wall - med["hybrid"]) / hybrid_wall if hybrid_wall else None,
            "stage_seconds": {s: med[s] for s in (*STAGES, "overhead")},
            "flops_per_sample": plan_flops(plan, small_dims, large_dims, n_img, text_tokens).total,
            "peak_memory_bytes": peaks[name],
        })
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backend": engines.backend,
        "dtype": str(engines.dtype).replace("torch.", ""),
        "latent": [latent_height, latent_width],
        "image_tokens": n_img,
        "text_tokens": text_tokens,
        "prompts": config.prompts,
        "steps": config.steps,
        "warmup": config.warmup,
        "repeat": config.repeat,
        "peak_memory_kind": _peak_memory(device)[1],
        "versions": library_versions(),
        "plans": report_plans,
    }


def summary_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['backend']} {report['dtype']} on {report['device']} — {report['steps']} steps, "
                        f"{report['image_tokens']} image + {report['text_tokens']} text tokens, median of {report['repeat']}")
    for column in ("plan", "latency s (min–max)", "speedup", "ideal", "eff.", *STAGES, "overhead", "peak MiB"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for p in report["plans"]:
        stages = [f"{p['stage_seconds'][s]:.2f}" for s in (*STAGES, "overhead")]
        table.add_row(
            p["name"], f"{p['latency_s_median']:.2f} ({p['latency_s_min']:.2f}–{p['latency_s_max']:.2f})",
            f"{p['speedup_vs_large']:.2f}×", f"{p['ideal_speedup']:.2f}×", f"{p['efficiency']:.2f}", *stages,
            f"{p['peak_memory_bytes'] / 2**20:.0f}",
        )
    return table


def markdown_table(report: dict) -> str:
    """The same table as Markdown, for docs/benchmarks.md."""
    head = "| plan | stages | latency s median (min–max) | speedup vs large | ideal | efficiency | overhead | peak MiB |\n|---|---|---|---|---|---|---|---|\n"
    rows = "".join(
        f"| {p['name']} | {p['stages']} | {p['latency_s_median']:.3f} ({p['latency_s_min']:.3f}–{p['latency_s_max']:.3f}) | "
        f"{p['speedup_vs_large']:.2f}× | {p['ideal_speedup']:.2f}× | {p['efficiency']:.2f} | {100 * p['overhead_fraction']:.1f}% | {p['peak_memory_bytes'] / 2**20:.0f} |\n"
        for p in report["plans"]
    )
    return head + rows


def plot_sweep(report: dict, path: Path) -> Path:
    """Speedup vs. mask ratio, measured and ideal, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted((p for p in report["plans"] if p["name"].startswith("hybrid@")), key=lambda p: p["mask_ratio"])
    if not sweep:
        sweep = [p for p in report["plans"] if p["mask_ratio"] is not None]
    ratios = [p["mask_ratio"] for p in sweep]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ratios, [p["speedup_vs_large"] for p in sweep], "o-", label="measured")
    ax.plot(ratios, [p["ideal_speedup"] for p in sweep], "s--", label="FLOP ideal")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("mask ratio (share of tokens refined by the large model)")
    ax.set_ylabel("speedup vs. large")
    ax.set_title(f"hybrid, {report['backend']} on {report['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def append_markdown(report: dict, path: Path, title: str) -> Path:
    """Appends one dated section (device, versions, table) to a Markdown file."""
    section = (
        f"\n### {title} — {report['date'][:10]}\n\n"
        f"Device: {report['device']}. {report['steps']} steps, {report['prompts']} prompt(s) with CFG, "
        f"latent {report['latent'][0]}×{report['latent'][1]} ({report['image_tokens']} image + {report['text_tokens']} text tokens), "
        f"median of {report['repeat']} after {report['warmup']} warm-up. Versions: {versions_line(report['versions'])}.\n\n"
        + markdown_table(report)
    )
    return append_section(path, section)
