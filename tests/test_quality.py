"""hs-export quality: sweeps, fronts, prompts and metrics (no trained model needed here)."""

import math

import pytest
import torch

from hs_export.quality.metrics import ImageDistance, lpips_status, region_pixels
from hs_export.quality.prompts import load_prompts
from hs_export.quality.report import pareto_front
from hs_export.quality.sweeps import STANDARD_SWEEP, parse_sweep, plan_variants
from hs_runtime.errors import ConfigError
from hs_runtime.plans import PlanConfig


def test_sweep_crosses_knobs_and_maps_to_plan_settings():
    family, knobs = parse_sweep("hybrid:ratio=0.2,0.5:large_fraction=0.3:signal=detail:dilate=true")
    assert family == "hybrid" and knobs == {"ratio": [0.2, 0.5], "large_fraction": [0.3], "signal": ["detail"], "dilate": [True]}
    variants = plan_variants(["hybrid"], ["hybrid:ratio=0.2,0.5:large_fraction=0.3", "srdiff:large_fraction=0.25"], 20, PlanConfig(), log=lambda *_: None)
    names = [v.name for v in variants]
    assert names[0] == "large"  # always added, first: the reference
    assert "hybrid[ratio=0.2,large_fraction=0.3]" in names and "srdiff[large_fraction=0.25]" in names
    point = next(v for v in variants if v.name == "hybrid[ratio=0.5,large_fraction=0.3]")
    assert point.plan.mask.ratio == 0.5 and point.plan.actions[:6] == ("large",) * 5 + ("capture",)
    srdiff = next(v for v in variants if v.family == "srdiff")
    assert srdiff.plan.count("large") == 5  # srdiff:large_fraction is srdiff_large_fraction


def test_sweep_drops_duplicates_of_named_plans():
    # srdiff at 0.4 of 20 steps is the default srdiff plan: measured once.
    variants = plan_variants(["srdiff"], ["srdiff:large_fraction=0.4,0.5"], 20, PlanConfig(), log=lambda *_: None)
    assert [v.name for v in variants] == ["large", "srdiff", "srdiff[large_fraction=0.5]"]


def test_standard_sweep_is_valid():
    variants = plan_variants(["large", "small", "tstitch", "srdiff", "hybrid"], ["standard"], 20, PlanConfig(), log=lambda *_: None)
    assert {v.family for v in variants} == {"large", "small", "tstitch", "srdiff", "hybrid"}
    assert len(STANDARD_SWEEP) >= 3 and len(variants) > 20


@pytest.mark.parametrize(
    "text, message",
    [
        ("fast:ratio=0.1", "unknown family"),
        ("hybrid", "names no knob"),
        ("hybrid:speed=2", "unknown hybrid knob"),
        ("hybrid:ratio=abc", "is not a float"),
        ("hybrid:ratio=1.5", "mask ratio out of range"),
        ("srdiff:large_fraction=", "has no values"),
    ],
)
def test_bad_sweeps_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message):
        plan_variants(["hybrid"], [text], 20, PlanConfig(), log=lambda *_: None)


def test_plans_without_large_get_it_with_a_note():
    lines = []
    variants = plan_variants(["hybrid"], [], 8, PlanConfig(), log=lines.append)
    assert variants[0].name == "large" and len(lines) == 1 and "added 'large'" in lines[0]


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 30.0), (1.5, 25.0), (1.4, 20.0), (2.0, 18.0), (2.0, 19.0), (1.2, 24.0)]
    assert pareto_front(points) == [(1.0, 30.0), (1.5, 25.0), (2.0, 19.0)]


def test_prompts_from_file_count_and_bad_sources(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\n\n# a comment\na blue dog\n")
    assert load_prompts(str(path), None) == ["a red cat", "a blue dog"]
    assert len(load_prompts("3", None)) == 3
    shapes = load_prompts("4", "shapes")
    assert len(shapes) == 4 and all(" on " in p for p in shapes)
    assert load_prompts("4", "shapes") == shapes  # fixed seed
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    for source, message in ((str(tmp_path / "empty.txt"), "prompts file is empty"), ("0", "must be >= 1"), (str(tmp_path / "nope.txt"), "not found"), (str(tmp_path), "is a folder")):
        with pytest.raises(ConfigError, match=message):
            load_prompts(source, None)


def test_distances_and_region_split():
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(2, 3, 64, 64, generator=g)
    image = reference.clone()
    image[:, :, :32] += 0.1  # error only in the top half
    grid = torch.zeros(2, 4, 4, dtype=torch.bool)
    grid[:, :2] = True  # the top half is the "complex" region
    rows = ImageDistance()(image.clamp(0, 1), reference, region_pixels(grid, 64, 64))
    for row in rows:
        assert math.isinf(row["psnr_outside"]) and row["psnr_inside"] < 25
        assert 0 < row["ssim"] < 1 and row["ms_ssim"] is None  # 64 px is too small for MS-SSIM
    same = ImageDistance()(reference, reference)[0]
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0)


def test_lpips_is_reported_unavailable_instead_of_downloading():
    status = lpips_status()
    if not status.available:
        assert status.reason.startswith("not available (")


def test_tables_show_a_region_without_pixels_as_a_dash(tmp_path):
    """Ratio 1.0 leaves no pixel outside the mask: its PSNR there is None, shown as "—"."""
    from rich.console import Console

    from hs_export.quality.report import append_markdown, summary_table

    row = {"name": "hybrid[ratio=1]", "family": "hybrid", "stages": "large×5 capture hybrid×5 small×10", "reference": False,
           "speedup_vs_large": 1.5, "ideal_speedup": 1.4, "ideal_speedup_sd35": 1.4, "psnr_to_large": 24.0,
           "ssim_to_large": 0.9, "ms_ssim_to_large": None, "lpips_to_large": None, "psnr_inside": 24.0, "psnr_outside": None, "psnr_to_large_std": 1.0}
    report = {"backend": "onnxruntime", "device": "CPU", "steps": 20, "prompts": ["p"], "seeds": [0], "lpips": "not available (x)",
              "date": "2026-11-24", "versions": {}, "plans": [row], "dtype": "float32", "guidance_scale": 4.5, "width": 256, "height": 256,
              "image_tokens": 256, "text_tokens": 40, "timing": {"repeat": 2}, "prompts_per_call": 1}
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    assert "24.0/—" in console.export_text()
    assert "24.0 / —" in append_markdown(report, tmp_path / "q.md", "t").read_text()
