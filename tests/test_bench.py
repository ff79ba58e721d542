import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from hs_export.call_profile import call_rows, dense_large_reference
from hs_export.cli import main
from hs_runtime.contract import ModelDims
from hs_runtime.plans import make_plan
from hs_runtime.sampler import CallShape

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
        assert "calls" not in plan  # graph calls are timed on request (--calls)
    large = report["plans"][0]
    assert large["speedup_vs_large"] == 1.0 and large["ideal_speedup"] == 1.0
    assert report["backend"] == "onnxruntime" and report["steps"] == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for column in ("speedup", "ideal", "eff."):
        assert column in result.output


def test_bench_reports_efficiency_paired_by_round(tiny_engine_dir, tmp_path):
    """Each plan's per-round ratio to `large` of the same round, over the FLOP ideal: its mean and
    bootstrap interval, in the JSON and in the table."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main, ["bench", str(tiny_engine_dir), "--steps", "2", "--warmup", "0", "--repeat", "3", "--plans", "hybrid", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    large, hybrid = json.loads(out.read_text())["plans"]
    assert large["efficiency_paired"] == {"mean": 1.0, "ci95": [1.0, 1.0], "rounds": 3}
    paired = hybrid["efficiency_paired"]
    assert paired["rounds"] == 3 and paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]
    assert f"[{paired['ci95'][0]:.2f}, {paired['ci95'][1]:.2f}]" in result.output
    report = json.loads(out.read_text())  # what the timings depend on, and the rounds themselves
    assert len(hybrid["latency_s_rounds"]) == 3 and hybrid["latency_s_median"] == sorted(hybrid["latency_s_rounds"])[1]
    assert report["seed"] == 0 and report["check_finite"] is True and report["calls_timed"] is False
    assert report["plan_config"]["mask"]["ratio"] == 0.02 and "refreshes" in report["plan_config"]
    assert report["memory_note"].endswith("with --warmup 0 the first round, where the memory is sampled (a thread waking every 5 ms), is also timed")


def test_bench_calls_says_which_graph_calls_the_time_goes_to(tiny_engine_dir, tmp_path):
    """--calls: per plan, each kind of graph call with its count per denoise, median time and
    its time and FLOPs against the dense large call of the `large` plan (which is 1 on both)."""
    out, notes = tmp_path / "bench.json", tmp_path / "bench.md"
    result = CliRunner().invoke(
        main, ["bench", str(tiny_engine_dir), "--steps", "8", "--warmup", "0", "--repeat", "2", "--plans", "hybrid", "--calls", "--json", str(out), "--markdown", str(notes)]
    )
    assert result.exit_code == 0, result.output
    large, hybrid = json.loads(out.read_text())["plans"]
    (dense,) = large["calls"]
    assert dense["graph"] == "large" and dense["per_denoise"] == 8 and dense["time_vs_dense_large"] == 1.0 and dense["efficiency"] == 1.0
    calls = {(c["graph"], c["image_context"] > 0, c["kv_outputs"]): c for c in hybrid["calls"]}
    plan = make_plan("hybrid", 8)
    assert calls[("large", True, False)]["per_denoise"] == plan.count("hybrid")
    assert calls[("large", True, False)]["text_queries"] == 0 and calls[("large", True, False)]["flops_vs_dense_large"] < 0.2
    assert calls[("large", False, True)]["per_denoise"] == calls[("small", False, True)]["per_denoise"] == plan.count("capture")
    assert sum(c["per_denoise"] for c in hybrid["calls"]) == plan.count("large") + 2 * plan.count("capture") + 2 * plan.count("hybrid") + plan.count("small")
    assert all(c["median_s"] > 0 and c["gflops"] > 0 for c in hybrid["calls"])
    assert "graph calls per denoise" in result.output and calls[("large", True, False)]["call"] in result.output
    assert "Graph calls per denoise" in notes.read_text()


def test_bench_on_a_folder_refines_the_share_it_was_built_for(tiny_engine_dir, tmp_path):
    """Without --mask-ratio an engine folder runs the ratio its profiles are tuned for (and its
    server defaults to), not the CLI's own default."""
    folder = tmp_path / "ratio"
    shutil.copytree(tiny_engine_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["build"]["shape"]["mask_ratio"] = 0.5
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for extra, ratio in (([], 0.5), (["--mask-ratio", "0.25"], 0.25)):
        out = tmp_path / "bench.json"
        args = ["bench", str(folder), "--plans", "hybrid", "--steps", "4", "--warmup", "0", "--repeat", "1", "--json", str(out), *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert [p["mask_ratio"] for p in json.loads(out.read_text())["plans"]] == [None, ratio]


def test_bench_guidance_defaults_to_the_builds_or_the_presets(tiny_engine_dir, tmp_path):
    """Without --guidance-scale bench takes the folder's or the preset's guidance, as generate and
    quality do (it took 7.0 whatever the build recorded; the shapes preset is 4.5)."""
    from hs_export.runs import default_guidance

    folder = tmp_path / "guided"
    shutil.copytree(tiny_engine_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["default_plan"]["guidance_scale"] = 3.0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for extra, guidance in (([], 3.0), (["--guidance-scale", "5"], 5.0)):
        out = tmp_path / "bench.json"
        result = CliRunner().invoke(main, ["bench", str(folder), "--plans", "large", "--steps", "2", "--warmup", "0", "--repeat", "1", "--json", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["guidance_scale"] == guidance
    assert default_guidance(None, "shapes") == 4.5 and default_guidance(None, "tiny") == 7.0


def test_call_rows_price_each_call_against_the_dense_large_call():
    """time × and FLOPs × are multiples of the reference call; efficiency is their ratio; the
    count per denoise is per round, and rows come costliest per denoise first."""
    dims = {"large": ModelDims(16, 16, 2, 64, 2, 2, 32, 32, 16), "small": ModelDims(16, 16, 2, 32, 2, 2, 32, 32, 16)}
    dense = CallShape("large", 2, 64, 0, 10, 0, False)
    subset = CallShape("large", 2, 4, 60, 0, 10, False)
    small = CallShape("small", 2, 64, 0, 10, 0, False)
    rounds = [{dense: [1.0], subset: [0.2, 0.2, 0.2], small: [0.5]}, {dense: [1.0], subset: [0.2, 0.2, 0.2], small: [0.5]}]
    reference = dense_large_reference(rounds, dims)
    assert reference == (1.0, dense.flops(dims["large"]))
    rows = {r["call"]: r for r in call_rows(rounds, dims, reference)}
    assert [r["call"] for r in call_rows(rounds, dims, reference)] == [dense.label(), subset.label(), small.label()]  # 1.0, 0.6, 0.5 s per denoise
    row = rows[subset.label()]
    assert row["per_denoise"] == 3 and row["seconds_per_denoise"] == pytest.approx(0.6) and row["time_vs_dense_large"] == pytest.approx(0.2)
    assert row["flops_vs_dense_large"] == pytest.approx(subset.flops(dims["large"]) / dense.flops(dims["large"]))
    assert row["efficiency"] == pytest.approx(row["flops_vs_dense_large"] / 0.2) and row["efficiency"] < 1
    assert rows[dense.label()]["efficiency"] == 1.0
    assert "efficiency" not in call_rows(rounds, dims, None)[0]  # no dense large call timed: no multiples


def test_bench_preset_torch_and_bad_options(preset_root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--repeat", "1", "--plans", "small"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output
    result = runner.invoke(main, ["bench", "--preset", "tiny", "--plans", "large,fastest"])
    assert result.exit_code == 1 and "unknown plan in --plans" in result.output
    result = runner.invoke(main, ["bench", "--preset", "tiny", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "--sweep-ratio" in result.output


def test_bench_backends_side_by_side_versus_diffusers(tiny_engine_dir, tmp_path):
    out, notes = tmp_path / "bench.json", tmp_path / "bench.md"
    result = CliRunner().invoke(
        main,
        ["bench", str(tiny_engine_dir), "--backends", "onnxruntime,torch", "--versus", "diffusers", "--steps", "2", "--warmup", "0",
         "--repeat", "1", "--plans", "large,small", "--json", str(out), "--markdown", str(notes)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {(p["name"], p["backend"]): p for p in report["plans"]}
    assert len(rows) == len(report["plans"])  # one row per plan and backend
    assert set(rows) == {("large", "onnxruntime"), ("large", "torch"), ("small", "onnxruntime"), ("small", "torch"), ("large", "diffusers")}
    for row in rows.values():
        assert row["latency_s_median"] > 0
    assert rows[("large", "diffusers")]["measure"] == "prompt_to_image"
    assert rows[("small", "torch")]["measure"] == "denoise" and set(rows[("small", "torch")]["latency_vs_backends"]) == {"onnxruntime"}
    assert [b["name"] for b in report["backends"]] == ["onnxruntime", "torch"]
    assert {r["name"] for r in report["side_by_side"]} == {"large", "small"} and "onnxruntime/torch" in report["side_by_side"][0]["ratios"]
    paired = report["side_by_side"][0]["ratios_paired"]["onnxruntime/torch"]  # one round: the round's own ratio
    assert paired["rounds"] == 1 and paired["ci95"][0] == paired["mean"] == paired["ci95"][1]
    versus = report["versus"]
    assert versus["steps"] == 2 and versus["pipeline"] == "diffusers.StableDiffusion3Pipeline" and versus["dtype"] == "float32"
    ours = {(r["name"], r["backend"]): r for r in versus["rows"] if r["backend"] != "diffusers"}
    assert set(ours) == {("large", "onnxruntime"), ("large", "torch"), ("small", "onnxruntime"), ("small", "torch")}
    # same weights, prompt, steps, guidance, size and seed: our large plan draws diffusers' image
    assert ours[("large", "torch")]["max_abs_pixel_diff_vs_diffusers"] <= 2
    for title in ("backends side by side", "prompt → image"):
        assert title in result.output and title in notes.read_text().lower()


def test_versus_diffusers_runs_in_the_engines_precision(tiny_paths):
    """diffusers is loaded the way its users load it for half-precision engines (``torch_dtype``
    for the whole pipeline), not left in fp32 against bf16/fp16 engines."""
    from hs_export.versus import diffusers_pipeline

    pipe = diffusers_pipeline(tiny_paths.pipeline, tiny_paths.large, torch.device("cpu"), torch.bfloat16)
    dtypes = {name: module.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    assert set(dtypes) >= {"transformer", "vae", "text_encoder"} and set(dtypes.values()) == {torch.bfloat16}, dtypes


def test_bench_backends_run_torch_in_the_engines_precision(tiny_paths, tmp_path):
    """Side by side, the torch backend runs in the precision the folder's engines were built in
    (like for like), and the table says which precision each backend ran in."""
    from hs_export.build import BuildConfig, build, resolve_models

    folder = tmp_path / "tiny16"
    build(resolve_models("tiny", None, None, None, log=lambda *_: None), BuildConfig(out=folder, precision="fp16"), log=lambda *_: None)
    out = tmp_path / "bench.json"
    args = ["bench", str(folder), "--backends", "onnxruntime,torch", "--plans", "hybrid", "--steps", "2", "--warmup", "0", "--repeat", "1", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [(b["name"], b["precision"]) for b in json.loads(out.read_text())["backends"]] == [("onnxruntime", "fp16"), ("torch", "fp16")]
    assert "torch runs in fp16" in result.output and "torch fp16 s" in result.output
    result = CliRunner().invoke(main, [*args, "--dtype", "fp32"])  # the engines cannot follow
    assert result.exit_code == 1 and "built in fp16" in result.output, result.output


def test_bench_backends_errors(tiny_engine_dir, preset_root, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # no engines/ folder here
    no_pipeline = tmp_path / "no-pipeline"
    shutil.copytree(tiny_engine_dir, no_pipeline)
    manifest = json.loads((no_pipeline / "manifest.json").read_text())
    (no_pipeline / "manifest.json").write_text(json.dumps({**manifest, "pipeline": None}))
    cases = [
        (["bench", str(tiny_engine_dir), "--backends", "onnxruntime,tensorflow"], "unknown backend in --backends | got 'tensorflow' | expected torch | onnxruntime | tensorrt"),
        (["bench", str(tiny_engine_dir), "--backend", "torch", "--backends", "onnxruntime,torch"], "--backend and --backends both given"),
        (["bench", str(tiny_engine_dir), "--backends", "onnxruntime,tensorrt"], "holds onnxruntime engines"),
        (["bench", "--preset", "sd3-medium", "--versus", "diffusers"], "--versus diffusers runs prompt → image, which needs text encoders and a VAE; preset sd3-medium has none"),
        (["bench", str(no_pipeline), "--versus", "diffusers"], f"engine folder {no_pipeline} records none"),
        # an engine folder runs the sizes its profiles cover, not silently its build size
        (["bench", str(tiny_engine_dir), "--height", str(2 * manifest["build"]["height"])], "image size outside the built profiles"),
        (["bench", str(tiny_engine_dir), "--width", "40"], "width must be a positive multiple of 16"),
        # --dtype is the torch backend's precision; the folder's engines were built in one
        (["bench", str(tiny_engine_dir), "--dtype", "fp16"], "onnxruntime engines compute in the precision they were built in | got dtype fp16"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output


def test_bench_preset_with_one_engine_backend_builds_its_folder_first(preset_root, tmp_path, monkeypatch):
    """The README's `bench --preset bench --backend onnxruntime …` builds the preset's engines, and
    remakes its own folder when it holds engines of other settings."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--backend", "onnxruntime", "--plans", "large", "--steps", "2", "--warmup", "0", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "engines" / "tiny-onnxruntime" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "fingerprint": "0" * 64}))  # built by other settings or an older hs-export
    again = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--backend", "onnxruntime", "--plans", "large", "--steps", "2", "--warmup", "0", "--repeat", "1"])
    assert again.exit_code == 0 and "rebuilding it (bench's own engine folder)" in again.output, again.output


def test_bench_preset_backends_side_by_side_build_in_a_child_process(preset_root, tmp_path, monkeypatch):
    """`--backends` with `--preset` builds each engine backend's folder first, in a process of its
    own (the build and its up-to-date check read both models: this process's loaded and peak
    memory figures count the run alone), before any backend loads, whatever their order; a
    build's refusal comes back as its own one line, with the build command bench runs."""
    import hs_export.build
    import hs_export.build.builder
    from hs_export import runs
    from hs_runtime.runtime import HybridStitchRuntime

    monkeypatch.chdir(tmp_path)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "tiny-onnxruntime").write_text("not a folder")
    args = ["bench", "--preset", "tiny", "--backends", "torch,onnxruntime", "--plans", "large", "--steps", "2", "--warmup", "0", "--repeat", "1"]
    refused = CliRunner().invoke(main, args)
    last = refused.output.strip().splitlines()[-1]
    assert refused.exit_code == 1 and last.startswith("Error: --out engines/tiny-onnxruntime is a file"), refused.output
    assert "(bench builds its engines with: hs-export build --preset tiny --backend onnxruntime --precision fp32" in last, last
    (tmp_path / "engines" / "tiny-onnxruntime").unlink()

    def no_build_here(*args, **kwargs):
        raise AssertionError("the build ran in bench's own process")

    events, child, from_models = [], runs._in_child, HybridStitchRuntime.from_models.__func__
    for module in (hs_export.build, hs_export.build.builder):  # the child imports its own
        monkeypatch.setattr(module, "build", no_build_here)
    monkeypatch.setattr(runs, "_in_child", lambda *a, **k: (events.append("build"), child(*a, **k)))
    monkeypatch.setattr(HybridStitchRuntime, "from_models", classmethod(lambda cls, *a, **k: (events.append("load"), from_models(cls, *a, **k))[1]))
    done = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "b.json")])
    assert done.exit_code == 0 and "[export]" in done.output, done.output  # the child's log, relayed
    assert events == ["build", "load"], events  # torch named first, loaded after the build
    assert {b["name"] for b in json.loads((tmp_path / "b.json").read_text())["backends"]} == {"onnxruntime", "torch"}


def test_bench_takes_the_prompt_counts_a_folder_was_built_for(tmp_path):
    """A folder built for up to 2 prompts (``--dynamic-shape``) is timed with bench's default of
    1; a count outside the build is refused with the one that fits."""
    from hs_export.bench import open_target

    folder = tmp_path / "dyn2"
    done = CliRunner().invoke(main, ["build", "--preset", "tiny", "--out", str(folder), "--dynamic-shape", "--prompts", "2"])
    assert done.exit_code == 0, done.output
    open_target(folder, None, (None,), "cpu", None, 1, None, None, 0.02, log=lambda *_: None)
    done = CliRunner().invoke(main, ["bench", str(folder), "--prompts", "3", "--steps", "2"])
    assert done.exit_code == 1 and "--prompts outside what the engine build takes | got 3 | expected 1..2 | pass --prompts 2" in done.output, done.output


def test_bench_costs_an_adaptive_mask_at_the_share_it_used(tiny_engine_dir, tmp_path):
    """An adaptive mask (--mask-energy) picks fewer tokens than --mask-ratio allows: the ideal, the
    FLOPs and the label are those of the share it used (they were those of the upper bound, so the
    efficiency read high)."""
    from hs_runtime.contract import ModelDims as Dims
    from hs_runtime.flops import ideal_speedup
    from hs_runtime.manifest import Manifest
    from hs_runtime.plans import MaskConfig, PlanConfig

    out = tmp_path / "bench.json"
    done = CliRunner().invoke(main, ["bench", str(tiny_engine_dir), "--steps", "6", "--warmup", "0", "--repeat", "1", "--plans", "hybrid",
                                     "--mask-ratio", "0.5", "--mask-energy", "0.3", "--json", str(out)])
    assert done.exit_code == 0, done.output
    row = next(p for p in json.loads(out.read_text())["plans"] if p["name"] == "hybrid")
    assert 0 < row["mask_ratio"] < 0.5
    manifest = Manifest.load(tiny_engine_dir)
    small, large = (Dims(**manifest.data["models"][r]["dims"]) for r in ("small", "large"))
    used = make_plan("hybrid", 6, PlanConfig(mask=MaskConfig(ratio=row["mask_ratio"])))
    assert row["ideal_speedup"] == pytest.approx(ideal_speedup(used, small, large, 64, manifest.shape.text_tokens))


def test_unguided_bench_on_an_engine_folder_counts_one_row_per_prompt(tiny_engine_dir, tmp_path):
    """`--guidance-scale 1` makes one row per prompt: the folder's batch-2 profile takes 2 prompts
    then, and 1 prompt is refused naming the count that fits (it used to fail inside the engine).
    Its Markdown says it ran without CFG (it said "with CFG" for every run)."""
    args = ["bench", str(tiny_engine_dir), "--plans", "large", "--steps", "2", "--warmup", "0", "--repeat", "1", "--guidance-scale", "1"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "--prompts outside what the engine build takes | got 1 | expected 2 | pass --prompts 2" in refused.output, refused.output
    result = CliRunner().invoke(main, args + ["--prompts", "2", "--markdown", str(tmp_path / "notes.md")])
    assert result.exit_code == 0, result.output
    assert "2 prompt(s) without CFG (guidance 1)," in (tmp_path / "notes.md").read_text()


def test_paired_ratios_are_geometric_means_with_a_t_interval():
    """a/b and b/a give reciprocal figures (an arithmetic mean made both 1.17 for rounds
    a = [1, 1, 1], b = [0.5, 2, 1]), and three rounds get a t interval, not a bootstrap's
    interval that covered the true value 74% of the time."""
    from hs_export.bootstrap import ratio_interval

    a, b = [1.0, 1.0, 1.0], [0.5, 2.0, 1.0]
    ab, ba = ratio_interval([x / y for x, y in zip(a, b)]), ratio_interval([y / x for x, y in zip(a, b)])
    assert ab["mean"] == pytest.approx(1.0) == ba["mean"] and ab["rounds"] == 3
    assert ab["ci95"][0] == pytest.approx(1 / ba["ci95"][1]) and ab["ci95"][1] == pytest.approx(1 / ba["ci95"][0])
    spread = ratio_interval([0.9, 1.0, 1.1])  # logs' sd 0.1003 over 3 rounds, t(2) = 4.303: ±0.249 around log 0.99666
    assert spread["mean"] == pytest.approx(0.99666, rel=1e-4)
    assert spread["ci95"] == [pytest.approx(0.77670, rel=1e-4), pytest.approx(1.27890, rel=1e-4)]
    assert ratio_interval([1.2]) == {"mean": pytest.approx(1.2), "ci95": [pytest.approx(1.2), pytest.approx(1.2)], "rounds": 1}
    assert ratio_interval([float("nan"), 0.0]) is None


def test_a_child_build_left_behind_is_interrupted_before_it_is_killed(monkeypatch):
    """An interrupted bench gives its child build time to exit (a terminal's Ctrl+C reached it and
    it removes its work folder), then a SIGINT of its own, and kills it only after that."""
    import signal
    import subprocess
    import sys

    from hs_export import runs

    monkeypatch.setattr(runs, "CHILD_GRACE_S", 0.5)
    polite = subprocess.Popen(["sleep", "30"])
    runs._stop(polite)
    assert polite.returncode == -signal.SIGINT
    deaf = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print(flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    deaf.stdout.readline()  # SIGINT ignored from here on
    runs._stop(deaf)
    assert deaf.returncode == -signal.SIGKILL


def test_gpu_memory_in_use_is_the_devices_not_torchs(monkeypatch):
    """On a GPU a backend's load is measured on the device (cudaMemGetInfo), where TensorRT's
    engine weights and ONNX Runtime's arena are; torch's memory_allocated sees none of them."""
    import contextlib

    from hs_export import bench

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "device", lambda device: calls.append(("device", device)) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: calls.append(("mem_get_info", device)) or (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: pytest.fail("torch's allocator alone misses the engine libraries' memory"))
    device = torch.device("cuda", 1)
    assert bench.memory_in_use(device) == 77 * 2**30  # total − free
    assert calls == [("synchronize", device), ("device", device), ("empty_cache",), ("mem_get_info", device)]  # context made, torch's free cache handed back, then read
