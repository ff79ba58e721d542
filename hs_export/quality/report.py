"""What a quality run writes: JSON, the paper's table in Markdown, the fronts plot, the grid."""

from __future__ import annotations

from pathlib import Path

from ..reports import append_section, versions_line

FAMILY_COLOURS = {"large": "black", "small": "grey", "tstitch": "tab:orange", "srdiff": "tab:blue", "hybrid": "tab:red"}


def _fmt(value, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    """Per plan: measured and ideal speedups next to the distance to large (the paper's table)."""
    head = (
        "| plan | stages | speedup (measured) | ideal | ideal at SD3.5 1024² | PSNR to large dB | SSIM | MS-SSIM | LPIPS | PSNR in / out of mask dB |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for p in report["plans"]:
        psnr = "reference" if p["reference"] else f"{_fmt(p['psnr_to_large'])} ± {_fmt(p['psnr_to_large_std'], '.1f')}"
        region = "—" if p["reference"] or p["psnr_inside"] is None else f"{_fmt(p['psnr_inside'], '.1f')} / {_fmt(p['psnr_outside'], '.1f')}"
        rows.append(
            f"| {p['name']} | {p['stages']} | {p['speedup_vs_large']:.2f}× | {p['ideal_speedup']:.2f}× | {p['ideal_speedup_sd35']:.2f}× | "
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
            escape(p["name"]), f"{p['speedup_vs_large']:.2f}×", f"{p['ideal_speedup']:.2f}×", f"{p['ideal_speedup_sd35']:.2f}×", psnr,
            _fmt(p["ssim_to_large"], ".3f"), _fmt(p["ms_ssim_to_large"], ".3f"), _fmt(p["lpips_to_large"], ".3f"), region,
        )
    return table


def append_markdown(report: dict, path: Path, title: str) -> Path:
    """Appends one dated section (settings, versions, table) to a Markdown file."""
    section = (
        f"\n### {title} — {report['date'][:10]}\n\n"
        f"Device: {report['device']}, {report['backend']} {report['dtype']}. {report['steps']} steps, guidance {report['guidance_scale']:g}, "
        f"{report['width']}×{report['height']} px ({report['image_tokens']} image + {report['text_tokens']} text tokens), "
        f"{len(report['prompts'])} prompt(s) × {len(report['seeds'])} seed(s); distances to the `large` plan's image of the same prompt and seed "
        f"(mean ± std over images); speedups are medians of {report['timing']['repeat']} round-robin timed rounds, "
        f"{report['prompts_per_call']} prompt(s) per call. Versions: {versions_line(report['versions'])}.\n\n"
        + markdown_table(report)
    )
    return append_section(path, section)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup and PSNR, sorted by speedup."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def plot_fronts(report: dict, path: Path) -> Path:
    """PSNR to large against speedup, one front per family: measured (left), SD3.5-size ideal (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    candidates = [p for p in report["plans"] if not p["reference"] and p["psnr_to_large"] is not None]
    for ax, key, label in ((axes[0], "speedup_vs_large", "measured speedup vs. large"), (axes[1], "ideal_speedup_sd35", "FLOP-ideal speedup at SD3.5-large + medium, 1024²")):
        for family in ("small", "tstitch", "srdiff", "hybrid"):
            points = [(p[key], p["psnr_to_large"]) for p in candidates if p["family"] == family]
            if not points:
                continue
            colour = FAMILY_COLOURS[family]
            ax.scatter(*zip(*points), s=14, color=colour, alpha=0.35)
            front = pareto_front(points)
            ax.plot(*zip(*front), "o-", color=colour, label=family, lw=1.6, ms=4)
            for p in candidates:
                if p["name"] == family:  # mark the default plan of each family
                    ax.scatter([p[key]], [p["psnr_to_large"]], s=90, facecolors="none", edgecolors=colour, lw=1.5)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR to the large model's image (dB)")
    axes[0].legend(title="front per family (circled: default)", fontsize=8)
    fig.suptitle(f"speed vs. distance to large — {report.get('preset') or ''} {report['backend']}, {report['steps']} steps, "
                 f"{len(report['prompts'])}×{len(report['seeds'])} images", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
        stats = "reference" if p["reference"] else f"{p['speedup_vs_large']:.2f}x\n{_fmt(p['psnr_to_large'], '.1f')} dB"
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
