"""What a quality run writes: JSON, the paper's table in Markdown, the fronts plot, the grid."""

from __future__ import annotations

from pathlib import Path

from ..reports import append_section, versions_line
from .stats import MIN_VERDICT_IMAGES

FAMILY_COLOURS = {"large": "black", "small": "grey", "tstitch": "tab:orange", "srdiff": "tab:blue", "hybrid": "tab:red"}


def _fmt(value, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _speedup(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _delta(entry: dict | None, spec: str, match: dict | None = None) -> str:
    """``+0.42 [+0.10, +0.75]`` for a paired difference; ``front`` for the front's own points."""
    if entry is None:
        return "—"
    if entry.get("verdict") == "front":
        return "front"
    low, high = entry["ci95"]
    return f"{entry['mean']:+{spec}} [{low:+{spec}}, {high:+{spec}}]"


def _verdict(entry: dict | None, match: dict | None) -> str:
    if entry is not None:
        return "" if entry["verdict"] == "front" else entry["verdict"]
    why = (match or {}).get("why", "")
    if why.startswith("outside"):
        return "outside front"
    return {"the reference": "reference", "the srdiff front needs two points": "no front"}.get(why, "—")


def _adherence(summary: dict | None) -> str:
    if not summary:
        return "—"
    return " / ".join(f"{summary[k]:.2f}" for k in ("background", "first_shape_colour", "shape_colours", "shape_kinds"))


def markdown_table(report: dict) -> str:
    """Per plan: measured and ideal speedups next to the distance to large (the paper's table)."""
    head = (
        "| plan | stages | speedup (measured) | ideal | ideal at SD3.5 1024² | PSNR to large dB | SSIM | MS-SSIM | LPIPS | PSNR in / out of mask dB |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for p in report["plans"]:
        psnr = "reference" if p["reference"] else f"{_fmt(p['psnr_to_large'])} ± {_fmt(p['psnr_to_large_std'], '.1f')}"
        if not p["reference"] and p.get("identical_to_large"):
            psnr += f" ({p['identical_to_large']} identical, not in the mean)"
        region = "—" if p["reference"] or p["psnr_inside"] is None else f"{_fmt(p['psnr_inside'], '.1f')} / {_fmt(p['psnr_outside'], '.1f')}"
        rows.append(
            f"| {p['name']} | {p['stages']} | {_speedup(p['speedup_vs_large'])} | {p['ideal_speedup']:.2f}× | {p['ideal_speedup_sd35']:.2f}× | "
            f"{psnr} | {_fmt(p['ssim_to_large'], '.3f')} | {_fmt(p['ms_ssim_to_large'], '.3f')} | {_fmt(p['lpips_to_large'], '.3f')} | {region} |"
        )
    notes = f"\nLPIPS: {report['lpips']}.\n" if not report.get("lpips_available") else ""
    return head + "\n".join(rows) + "\n" + notes


def summary_table(report: dict):
    """The same table for the terminal (rich)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"quality vs large — {report['backend']} on {report['device']}, {report['steps']} steps, "
                        f"{len(report['prompts'])} prompt(s) × {len(report['seeds'])} seed(s); LPIPS: {report['lpips']}")
    for column in ("plan", "speedup", "ideal", "ideal SD3.5", "PSNR dB", "SSIM", "MS-SSIM", "LPIPS", "PSNR in/out"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for p in report["plans"]:
        psnr = "reference" if p["reference"] else _fmt(p["psnr_to_large"])
        region = "—" if p["reference"] or p["psnr_inside"] is None else f"{_fmt(p['psnr_inside'], '.1f')}/{_fmt(p['psnr_outside'], '.1f')}"
        table.add_row(
            escape(p["name"]), _speedup(p["speedup_vs_large"]), f"{p['ideal_speedup']:.2f}×", f"{p['ideal_speedup_sd35']:.2f}×", psnr,
            _fmt(p["ssim_to_large"], ".3f"), _fmt(p["ms_ssim_to_large"], ".3f"), _fmt(p["lpips_to_large"], ".3f"), region,
        )
    return table


def paired_markdown_table(report: dict) -> str:
    """Per plan: the paired difference to the srdiff front at the same SD3.5-size ideal speedup,
    its bootstrap 95% interval and verdict, for PSNR and SSIM; adherence and CLIP score."""
    head = (
        "| plan | stages | ideal at SD3.5 1024² | PSNR to large dB | Δ PSNR vs srdiff front dB [95% CI] | verdict | SSIM | Δ SSIM vs front [95% CI] | verdict | "
        "adherence: background / 1st colour / colours / kinds | CLIP score |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for p in report["plans"]:
        psnr_d, ssim_d, match = p.get("delta_psnr_vs_srdiff_front"), p.get("delta_ssim_vs_srdiff_front"), p.get("srdiff_front_match")
        psnr = "reference" if p["reference"] else _fmt(p["psnr_to_large"])
        rows.append(
            f"| {p['name']} | {p['stages']} | {p['ideal_speedup_sd35']:.2f}× | {psnr} | {_delta(psnr_d, '.2f')} | {_verdict(psnr_d, match)} | "
            f"{_fmt(p['ssim_to_large'], '.3f')} | {_delta(ssim_d, '.3f')} | {_verdict(ssim_d, match)} | {_adherence(p.get('adherence'))} | {_fmt(p.get('clip_score'), '.2f')} |"
        )
    paired = report.get("paired") or {}
    boot = paired.get("bootstrap", {})
    note = (
        f"\nΔ: per image, the plan's value minus the srdiff front's, read at the plan's ideal speedup at SD3.5 1024² between the two "
        f"srdiff points that bracket it (small = srdiff with 0 large steps); mean and percentile-bootstrap 95% interval over "
        f"{len(report['prompts']) * len(report['seeds'])} images ({boot.get('resamples', '?')} resamples, seed {boot.get('seed', '?')}); "
        f"verdict above / below when the interval excludes 0 (none under {MIN_VERDICT_IMAGES} images); outside the srdiff points' speed range: no comparison.\n"
    )
    return head + "\n".join(rows) + "\n" + note


def append_markdown(report: dict, path: Path, title: str) -> Path:
    """Appends one dated section (settings, versions, tables) to a Markdown file."""
    timing = report.get("timing")
    timed = (
        f"speedups are medians of {timing['repeat']} round-robin timed rounds, {report['prompts_per_call']} prompt(s) per call"
        if timing else f"no timing rounds (--no-timing; {report['prompts_per_call']} prompt(s) per call): measured speedups not taken"
    )
    section = (
        f"\n### {title} — {report['date'][:10]}\n\n"
        f"Device: {report['device']}, {report['backend']} {report['dtype']}, text encoders + VAE {report.get('text_dtype', 'fp32')}. {report['steps']} steps, guidance {report['guidance_scale']:g}, "
        f"{report['width']}×{report['height']} px ({report['image_tokens']} image + {report['text_tokens']} text tokens), "
        f"{len(report['prompts'])} prompt(s) × {len(report['seeds'])} seed(s); distances to the `large` plan's image of the same prompt and seed "
        f"(mean ± std over images); {timed}. Versions: {versions_line(report['versions'])}.\n\n"
        + markdown_table(report)
        + ("\n" + paired_markdown_table(report) if report.get("paired") else "")
    )
    return append_section(path, section)


def paired_summary_table(report: dict):
    """The paired table for the terminal (rich)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="paired vs the srdiff front at the same ideal speedup (SD3.5 1024²): mean Δ [95% CI] over images")
    for column in ("plan", "ideal SD3.5", "Δ PSNR dB", "verdict", "Δ SSIM", "verdict", "adherence bg/1st/col/kind", "CLIP"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for p in report["plans"]:
        psnr_d, ssim_d, match = p.get("delta_psnr_vs_srdiff_front"), p.get("delta_ssim_vs_srdiff_front"), p.get("srdiff_front_match")
        table.add_row(
            escape(p["name"]), f"{p['ideal_speedup_sd35']:.2f}×", _delta(psnr_d, ".2f"), _verdict(psnr_d, match), _delta(ssim_d, ".3f"),
            _verdict(ssim_d, match), _adherence(p.get("adherence")), _fmt(p.get("clip_score"), ".2f"),
        )
    return table


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup and PSNR, sorted by speedup."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def plot_fronts(report: dict, path: Path) -> Path:
    """PSNR to large against speedup, one front per family: measured (left; only with timing),
    SD3.5-size ideal with the srdiff front's 95% band (middle), and each plan's paired difference
    to that front with its 95% interval (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import front_band

    timed = report.get("timing") is not None
    panels = (["speedup_vs_large"] if timed else []) + ["ideal_speedup_sd35", "delta"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), dpi=120)
    candidates = [p for p in report["plans"] if not p["reference"] and p["psnr_to_large"] is not None]
    labels = {"speedup_vs_large": "measured speedup vs. large", "ideal_speedup_sd35": "FLOP-ideal speedup at SD3.5-large + medium, 1024²"}
    for ax, key in zip(axes, panels):
        if key == "delta":
            _plot_deltas(ax, candidates, report)
            continue
        if key == "ideal_speedup_sd35":
            band = front_band([(p["ideal_speedup_sd35"], (p.get("per_image") or {}).get("psnr") or []) for p in candidates if p.get("on_srdiff_front")])
            if len(band) > 1:
                xs, _means, lows, highs = zip(*band)
                ax.fill_between(xs, lows, highs, color=FAMILY_COLOURS["srdiff"], alpha=0.15, lw=0, label="srdiff front, 95% band")
        for family in ("small", "tstitch", "srdiff", "hybrid"):
            points = [(p[key], p["psnr_to_large"]) for p in candidates if p["family"] == family and p[key] is not None]
            if not points:
                continue
            colour = FAMILY_COLOURS[family]
            ax.scatter(*zip(*points), s=14, color=colour, alpha=0.35)
            front = pareto_front(points)
            ax.plot(*zip(*front), "o-", color=colour, label=family, lw=1.6, ms=4)
            for p in candidates:
                if p["name"] == family:  # mark the default plan of each family
                    ax.scatter([p[key]], [p["psnr_to_large"]], s=90, facecolors="none", edgecolors=colour, lw=1.5)
        ax.set_xlabel(labels[key])
        ax.set_ylabel("PSNR to the large model's image (dB)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="front per family (circled: default)", fontsize=8)
    fig.suptitle(f"speed vs. distance to large — {report.get('preset') or ''} {report['backend']}, {report['steps']} steps, "
                 f"{len(report['prompts'])}×{len(report['seeds'])} images", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_deltas(ax, candidates: list[dict], report: dict) -> None:
    """Paired PSNR difference to the srdiff front per plan, with its 95% interval."""
    ax.axhline(0.0, color=FAMILY_COLOURS["srdiff"], lw=1.2, label="srdiff front")
    for p in candidates:
        entry = p.get("delta_psnr_vs_srdiff_front")
        if entry is None or entry.get("verdict") == "front":
            continue
        low, high = entry["ci95"]
        colour = FAMILY_COLOURS.get(p["family"], "black")
        ax.errorbar([p["ideal_speedup_sd35"]], [entry["mean"]], yerr=[[entry["mean"] - low], [high - entry["mean"]]], fmt="o", color=colour, ms=4, capsize=3, lw=1.2)
        if p["name"] == p["family"]:
            ax.scatter([p["ideal_speedup_sd35"]], [entry["mean"]], s=90, facecolors="none", edgecolors=colour, lw=1.5)
    ax.set_xlabel("FLOP-ideal speedup at SD3.5-large + medium, 1024²")
    ax.set_ylabel("Δ PSNR vs. the srdiff front, paired (dB, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_grid(report: dict, images: dict[str, list], masks: dict, path: Path, tile: int = 160) -> Path:
    """One picture: rows = plans, columns = prompts (first seed); complex tokens tinted red on
    hybrid rows."""
    from PIL import Image, ImageDraw

    from ..generate import mask_overlay

    names = [p["name"] for p in report["plans"] if p["name"] in images]
    by_name = {p["name"]: p for p in report["plans"]}
    columns = max(len(v) for v in images.values())
    label_w, head_h = 150, 46
    canvas = Image.new("RGB", (label_w + columns * tile, head_h + len(names) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for c, prompt in enumerate(report["prompts"][:columns]):
        draw.multiline_text((label_w + c * tile + 3, 3), _wrap(prompt, 30), fill="black", spacing=1)
    for r, name in enumerate(names):
        p = by_name[name]
        y = head_h + r * tile
        speed = p["speedup_vs_large"] if p["speedup_vs_large"] is not None else p["ideal_speedup"]  # ideal when not timed
        stats = "reference" if p["reference"] else f"{speed:.2f}x{'' if p['speedup_vs_large'] is not None else ' ideal'}\n{_fmt(p['psnr_to_large'], '.1f')} dB"
        label = f"{_wrap(name, 24)}\n{_wrap(p['stages'], 24)}\n{stats}".replace("×", "x")  # the default font has no ×
        draw.multiline_text((4, y + 4), label, fill="black", spacing=2)
        for c, image in enumerate(images[name]):
            if name in masks:
                image = mask_overlay(image, masks[name][c], alpha=0.35)
            canvas.paste(image.resize((tile, tile), Image.LANCZOS), (label_w + c * tile, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:4])
