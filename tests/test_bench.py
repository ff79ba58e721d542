import json

from click.testing import CliRunner

from hs_export.cli import main

KEYS = {"name", "latency_s_median", "speedup_vs_large", "ideal_speedup", "efficiency", "overhead_fraction"}


def test_bench_smoke_on_tiny_engines(tiny_engine_dir, tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "sweep.png"
    result = CliRunner().invoke(
        main,
        ["bench", str(tiny_engine_dir), "--steps", "4", "--warmup", "0", "--repeat", "1", "--plans", "hybrid,small",
         "--sweep-ratio", "0.2,0.5", "--json", str(out), "--plot", str(plot)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [p["name"] for p in report["plans"]]
    assert names == ["large", "hybrid", "small", "hybrid@0.2", "hybrid@0.5"]  # the baseline is always measured
    for plan in report["plans"]:
        assert KEYS <= set(plan)
        assert plan["latency_s_median"] > 0 and plan["ideal_speedup"] > 0
        assert set(plan["stage_seconds"]) == {"large", "mask", "hybrid", "small", "overhead"}
    large = report["plans"][0]
    assert large["speedup_vs_large"] == 1.0 and large["ideal_speedup"] == 1.0
    assert report["backend"] == "onnxruntime" and report["steps"] == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for column in ("speedup", "ideal", "eff."):
        assert column in result.output


def test_bench_preset_torch_and_bad_options(preset_root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--repeat", "1", "--plans", "small"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output
    result = runner.invoke(main, ["bench", "--preset", "tiny", "--plans", "large,fastest"])
    assert result.exit_code == 1 and "unknown plan in --plans" in result.output
    result = runner.invoke(main, ["bench", "--preset", "tiny", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "--sweep-ratio" in result.output
