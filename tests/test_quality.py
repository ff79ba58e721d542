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
    notes = []
    variants = plan_variants(["srdiff"], ["srdiff:large_fraction=0.4,0.5"], 20, PlanConfig(), log=notes.append)
    assert [v.name for v in variants] == ["large", "srdiff", "srdiff[large_fraction=0.5]"]
    assert notes[-1] == "note: srdiff[large_fraction=0.4] is the same schedule as srdiff at 20 steps: rendered once, as srdiff"


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
        ("hybrid:ratio=0.1:ratio=0.2", "names hybrid:ratio twice"),
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
    (tmp_path / "binary.txt").write_bytes(b"a cat\n\xff\xfe\x00")
    for source, message in ((str(tmp_path / "binary.txt"), "prompts file is not UTF-8 text.* got byte 0xff at offset 6"), (str(tmp_path / "empty.txt"), "prompts file is empty"), ("0", "must be >= 1"), ("-2", "must be >= 1"), (str(tmp_path / "nope.txt"), "not found"), (str(tmp_path), "is a folder")):
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
    row["identical_to_large"] = 2  # infinite PSNRs stay out of the mean: said beside it
    assert "24.00 ± 1.0 (2 identical, not in the mean)" in append_markdown(report, tmp_path / "q2.md", "t").read_text()


# ---- prompt adherence (shapes), paired statistics, CLIP score ---------------------------------------


@pytest.mark.parametrize("size", [128, 256])
def test_adherence_reads_rendered_scenes_back(size):
    """The checker on the renderer's own images at the shapes pair's 128² px (and 256²): what it
    reads on generated images is then the model's adherence, not the checker's error."""
    import numpy as np

    from hs_export.quality.adherence import read_scene, score_image, summarise
    from hs_export.shapes import scenes

    rng = np.random.default_rng(2024)
    truth = [scenes.sample_scene(rng) for _ in range(40)]
    rows = [score_image(torch.from_numpy(scenes.render(s, size)).permute(2, 0, 1), s.prompt) for s in truth]
    result = summarise(rows)
    assert result["images"] == 40
    assert result["background"] >= 0.97, result
    assert result["first_shape_colour"] >= 0.95, result
    assert result["shape_colours"] >= 0.93, result
    assert result["shape_kinds"] >= 0.85, result
    # One shape alone (no overlap): colour and kind are read exactly, whatever the texture.
    for kind in scenes.SHAPES:
        for texture in scenes.TEXTURES:
            shape = scenes.Shape(kind, "blue", texture, 0.5, 0.5, 0.2, 0.3, 0.06, 0.0)
            scene = scenes.Scene((shape,), "gradient", "yellow", 1.0)
            reading = read_scene(torch.from_numpy(scenes.render(scene, 256)).permute(2, 0, 1))
            assert reading.background_colour == "yellow" and len(reading.objects) == 1, (kind, texture, reading)
            assert reading.objects[0].colours == ("blue",) and reading.objects[0].kind == kind, (kind, texture, reading)


def test_adherence_scores_a_wrong_image_low_and_parses_only_the_grammar():
    import numpy as np

    from hs_export.quality.adherence import parse_prompt, score_image
    from hs_export.shapes import scenes

    scene = scenes.Scene((scenes.Shape("circle", "red", "striped", 0.3, 0.3, 0.2, 0.0, 0.06, 0.0), scenes.Shape("star", "green", "plain", 0.7, 0.7, 0.2, 0.0, 0.06, 0.0)), "background", "blue", 0.0)
    parsed = parse_prompt(scene.prompt)
    assert parsed.background_colour == "blue" and [(s.colour, s.kind, s.texture) for s in parsed.shapes] == [("red", "circle", "striped"), ("green", "star", "plain")]
    image = torch.from_numpy(scenes.render(scene, 256)).permute(2, 0, 1)
    assert score_image(image, scene.prompt) == {"background": 1.0, "first_shape_colour": 1.0, "shape_colours": 1.0, "shape_kinds": 1.0, "count": 1.0, "score": 1.0}
    wrong = score_image(image, "a yellow square on a white gradient")  # first named shape: the yellow square
    assert wrong["background"] == 0.0 and wrong["first_shape_colour"] == 0.0 and wrong["score"] == 0.0
    flat = score_image(torch.full((3, 256, 256), 0.5), scene.prompt)
    assert flat["shape_colours"] == 0.0 and flat["count"] == 0.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = scenes.sample_scene(rng)
        p = parse_prompt(s.prompt)
        assert p.background_colour == s.background_colour and [(n.kind, n.colour, n.texture) for n in p.shapes] == [(t.kind, t.colour, t.texture) for t in s.shapes]
    with pytest.raises(ConfigError, match="not of the shapes grammar") as error:
        parse_prompt("a photo of a cat")
    assert "\n" not in str(error.value)


def test_bootstrap_interval_holds_the_mean_and_is_reproducible():
    from hs_export.quality.stats import bootstrap_mean, verdict

    values = [0.3, -0.1, 0.8, 0.2, 0.5, 0.1, 0.4, 0.0]
    first, again = bootstrap_mean(values), bootstrap_mean(values)
    assert first == again and first["images"] == 8
    low, high = first["ci95"]
    assert low <= first["mean"] <= high and low < high
    assert bootstrap_mean([1.0])["ci95"] == [1.0, 1.0]
    assert bootstrap_mean([None, math.inf]) is None
    assert verdict({"ci95": [0.1, 0.4]}, "psnr") == "above" and verdict({"ci95": [-0.1, 0.4]}, "psnr") == "level"
    assert verdict({"ci95": [-0.4, -0.1]}, "psnr") == "below" and verdict({"ci95": [-0.4, -0.1]}, "lpips") == "above"


def test_paired_difference_to_the_srdiff_front_is_read_per_image_between_bracketing_points():
    from hs_export.quality.stats import is_front_plan, paired_vs_front

    assert is_front_plan(("large", "large", "small")) and is_front_plan(("small",) * 3)
    assert not is_front_plan(("large",) * 3) and not is_front_plan(("small", "large")) and not is_front_plan(("large", "capture", "hybrid", "small"))
    plans = [
        {"name": "small", "actions": ("small",) * 4, "ideal_speedup_sd35": 2.8},
        {"name": "srdiff[0.25]", "actions": ("large",) + ("small",) * 3, "ideal_speedup_sd35": 2.0},
        {"name": "srdiff[0.5]", "actions": ("large",) * 2 + ("small",) * 2, "ideal_speedup_sd35": 1.5},
        {"name": "hybrid", "actions": ("large", "capture", "hybrid", "small"), "ideal_speedup_sd35": 1.75},
        {"name": "slow", "actions": ("large", "capture", "hybrid", "hybrid"), "ideal_speedup_sd35": 1.2},
    ]
    per_image = {
        "small": {"psnr": [10.0, 12.0, 11.0]},
        "srdiff[0.25]": {"psnr": [20.0, 18.0, 22.0]},
        "srdiff[0.5]": {"psnr": [30.0, 28.0, 26.0]},
        "hybrid": {"psnr": [26.0, 24.0, 25.0]},  # front at 1.75×: halfway, 25 / 23 / 24 → +1 on every image
        "slow": {"psnr": [40.0, 40.0, 40.0]},
    }
    result = paired_vs_front(plans, per_image, ["psnr", "ssim"])
    hybrid = result["hybrid"]
    assert hybrid["match"] == {"at": 1.75, "between": ["srdiff[0.5]", "srdiff[0.25]"]}
    # three images: the interval is reported, a verdict is not (one image alone gives [d, d])
    assert hybrid["psnr"]["mean"] == pytest.approx(1.0) and hybrid["psnr"]["ci95"] == pytest.approx([1.0, 1.0]) and hybrid["psnr"]["verdict"] == "too few images"
    many = {name: {"psnr": values["psnr"] * 4} for name, values in per_image.items()}  # twelve images
    assert paired_vs_front(plans, many, ["psnr"])["hybrid"]["psnr"]["verdict"] == "above"
    assert hybrid["ssim"] is None  # no values for it
    assert result["slow"]["psnr"] is None and "outside the srdiff points' range 1.50×–2.80×" in result["slow"]["match"]["why"]
    assert result["srdiff[0.25]"]["psnr"]["verdict"] == "front"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny randomly initialised CLIP saved with save_pretrained, its tokenizer beside it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from hs_export.presets import clip_tokenizer
    from hs_export.shapes.scenes import VOCABULARY

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = clip_tokenizer(VOCABULARY, 32)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_scorer_scores_each_image_against_its_prompt(tiny_clip):
    from hs_export.quality.clip import ClipScorer

    scorer = ClipScorer(tiny_clip)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores = scorer(images, ["a red circle on a blue background", "a green star on a white gradient", "a red circle on a blue background"])
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)
    assert scorer(images[:1], ["a red circle on a blue background"]) == pytest.approx(scores[:1])  # per image, not a running mean


def test_adherence_by_default_steps_aside_for_prompts_outside_the_grammar():
    from hs_export.quality.runner import QualityConfig, _prompt_scenes

    lines = []
    prompts = ["a red circle on a blue background", "a photo of a cat"]
    assert _prompt_scenes(prompts, QualityConfig(), "shapes", lines.append) is None
    assert len(lines) == 1 and "'a photo of a cat' is not of the shapes grammar" in lines[0]
    with pytest.raises(ConfigError, match="not of the shapes grammar"):
        _prompt_scenes(prompts, QualityConfig(adherence=True), "shapes", lines.append)
    assert _prompt_scenes(prompts, QualityConfig(), None, lines.append) is None and len(lines) == 1


def _quality(args, tmp_path):
    from click.testing import CliRunner

    from hs_export.cli import main

    return CliRunner().invoke(main, ["quality", *args])


def _one_error_line(result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_quality_reports_paired_deltas_adherence_and_clip_score(tmp_path, tiny_clip):
    """The shapes pair, 2 prompts × 1 seed, no timing: every plan carries its paired difference to
    the srdiff front (mean inside its interval), adherence and CLIP score."""
    import json

    out = tmp_path / "q.json"
    args = ["--preset", "shapes", "--prompts", "2", "--seeds", "1", "--steps", "8", "--no-timing", "--plans", "large,small,srdiff,hybrid",
            "--sweep", "srdiff:large_fraction=0.25,0.5,0.75", "--sweep", "hybrid:energy=0.5:ratio=0.5", "--clip-model", str(tiny_clip), "--json", str(out),
            "--markdown", str(tmp_path / "q.md"), "--plot", str(tmp_path / "q.png"), "--grid", str(tmp_path / "grid.png")]
    result = _quality(args, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["timing"] is None and report["paired"]["matched_at"] == "ideal_speedup_sd35" and report["text_dtype"] == "fp32"
    assert report["paired"]["bootstrap"]["resamples"] == 2000
    plans = {p["name"]: p for p in report["plans"]}
    assert all(p["speedup_vs_large"] is None for p in plans.values())
    for name, plan in plans.items():
        assert set(plan["adherence"]) >= {"background", "first_shape_colour", "shape_colours", "shape_kinds", "score"} and plan["adherence"]["images"] == 2
        assert isinstance(plan["clip_score"], float)
        assert len(plan["per_image"]["psnr"]) == 2
    hybrid = plans["hybrid"]
    for metric in ("psnr", "ssim"):
        delta = hybrid[f"delta_{metric}_vs_srdiff_front"]
        low, high = delta["ci95"]
        assert low <= delta["mean"] <= high and delta["images"] == 2 and delta["verdict"] == "too few images"
    assert hybrid["srdiff_front_match"]["at"] == hybrid["ideal_speedup_sd35"]
    assert hybrid["delta_clip_score_vs_srdiff_front"] is not None
    assert plans["srdiff"]["delta_psnr_vs_srdiff_front"]["verdict"] == "front"
    assert plans["large"]["delta_psnr_vs_srdiff_front"] is None
    # The adaptive mask is costed at the share of tokens it used (a multiple of N/16, within its bounds).
    adaptive = plans["hybrid[energy=0.5,ratio=0.5]"]
    share = adaptive["mask_ratio"]
    assert 0.05 <= share <= 0.5 and (share * report["image_tokens"]) % (report["image_tokens"] // 16) == 0
    from hs_export.quality.runner import sd35_ideal_speedup
    from hs_runtime.plans import MaskConfig, PlanConfig, make_plan

    at_cap = sd35_ideal_speedup(make_plan("hybrid", 8, PlanConfig(mask=MaskConfig(0.5))))
    assert adaptive["ideal_speedup_sd35"] >= at_cap
    assert "Δ PSNR vs srdiff front" in (tmp_path / "q.md").read_text() and (tmp_path / "q.png").stat().st_size > 0 and (tmp_path / "grid.png").is_file()


def test_timed_quality_without_clip_model_reports_null_and_bad_requests_are_one_line(tmp_path, preset_root):
    import json

    out = tmp_path / "tiny.json"
    result = _quality(["--preset", "tiny", "--prompts", "2", "--seeds", "1", "--steps", "4", "--warmup", "0", "--repeat", "1", "--plans", "large,srdiff", "--sweep", "hybrid:ratio=0.5", "--json", str(out)], tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["timing"] == {"warmup": 0, "repeat": 1} and report["adherence"] is None and report["clip_model"] is None
    srdiff = next(p for p in report["plans"] if p["name"] == "srdiff")  # no mask of its own: the sweep point's, rendered first
    assert srdiff["psnr_inside"] is not None
    assert all(p["clip_score"] is None and p["adherence"] is None and p["delta_clip_score_vs_srdiff_front"] is None for p in report["plans"])
    assert all(p["speedup_vs_large"] > 0 for p in report["plans"])  # timed: measured speedups

    (tmp_path / "not-clip").mkdir()
    (tmp_path / "not-clip" / "config.json").write_text('{"model_type": "t5"}')
    line = _one_error_line(_quality(["--preset", "tiny", "--prompts", "2", "--clip-model", str(tmp_path / "not-clip")], tmp_path))
    assert "--clip-model holds no CLIP model" in line and "not-clip (t5)" in line
    line = _one_error_line(_quality(["--preset", "tiny", "--prompts", "2", "--clip-model", str(tmp_path / "missing")], tmp_path))
    assert "--clip-model is not a folder" in line
    (tmp_path / "empty-clip").mkdir()
    (tmp_path / "empty-clip" / "config.json").write_text('{"model_type": "clip"}')  # a config, no weights
    line = _one_error_line(_quality(["--preset", "tiny", "--prompts", "2", "--steps", "2", "--no-timing", "--clip-model", str(tmp_path / "empty-clip")], tmp_path))
    assert "--clip-model cannot be loaded" in line and "nothing is downloaded" in line
    line = _one_error_line(_quality(["--preset", "tiny", "--prompts", "2", "--adherence"], tmp_path))
    assert "prompt adherence can only be read back on the shapes pair" in line and "got preset tiny" in line


def test_bad_plans_sweeps_and_prompt_files_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Pure argument errors cost no model load (SD3.5-large + T5-XXL take minutes)."""
    import hs_export.runs

    def never(*args, **kwargs):
        raise AssertionError("models loaded before the arguments were checked")

    monkeypatch.setattr(hs_export.runs, "open_runtime", never)
    for args, message in (
        (["--plans", "large,fast"], "unknown plan in --plans"),
        (["--sweep", "hybrid:ratio=5"], "mask ratio out of range"),
        (["--prompts", str(tmp_path / "nope.txt")], "prompts file not found"),
        (["--prompts", "13"], "only 12 built-in prompts"),
    ):
        assert message in _one_error_line(_quality(["--preset", "tiny", *args], tmp_path))
