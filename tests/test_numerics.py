"""Non-finite steps are detected on the device, read back once, and named: step, action, graph, fix."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from hs_export.cli import main
from hs_runtime.backends.torch_backend import torch_engines
from hs_runtime.errors import NumericalError
from hs_runtime.numerics import FiniteMonitor
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import Plan, PlanConfig, make_plan
from hs_runtime.sampler import Conditioning, StitchedSampler


def _cond(tiny_conditioning):
    c = tiny_conditioning
    return Conditioning(c.prompt_embeds[:1], c.pooled_prompt_embeds[:1], c.negative_prompt_embeds[:1], c.negative_pooled_prompt_embeds[:1])


@pytest.fixture(scope="module")
def nan_large(tiny_paths, tmp_path_factory):
    """The tiny preset's large transformer with one weight set to NaN, saved with save_pretrained."""
    from hs_runtime.models import load_transformer

    model = load_transformer(tiny_paths.large)
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight[0, 0] = float("nan")
    folder = tmp_path_factory.mktemp("nan-weights") / "large"
    model.save_pretrained(folder)
    return folder


def test_monitor_names_the_first_bad_step_and_graph():
    monitor = FiniteMonitor(("large", "capture", "hybrid", "hybrid"), "cpu", precision="fp16", backend="onnxruntime")
    for step, graph, value in ((0, "large", 1.0), (2, "small", 1.0), (2, "large", float("inf")), (3, "large", float("nan"))):
        monitor.step = step
        monitor.record(graph, {"velocity_tokens": torch.full((2, 3), value)})
    with pytest.raises(NumericalError) as info:
        monitor.check()
    assert str(info.value) == (
        "step 2 (hybrid): large produced inf | expected finite velocities | "
        "fp16 overflow? rebuild with --precision bf16 (TensorRT) or fp32 (if fp32 fails too, the weights hold NaN/inf)"
    )


def test_monitor_reads_back_once_per_check(monkeypatch):
    monitor = FiniteMonitor(("large",) * 4, "cpu")
    reads = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: reads.append(self.shape) or original(self, *a, **k))
    for step in range(4):
        monitor.step = step
        monitor.record("large", {"velocity_tokens": torch.randn(2, 16, 4, 4)})
    assert reads == []  # recording never reads back
    monitor.check()
    assert len(reads) == 1


def test_nan_conditioning_is_blamed_on_the_input(tiny_torch_engines, tiny_conditioning):
    cond = _cond(tiny_conditioning)
    cond.prompt_embeds = cond.prompt_embeds.clone()
    cond.prompt_embeds[0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"^the denoise input \(prompt embeddings\) holds NaN"):
        StitchedSampler(tiny_torch_engines).denoise(make_plan("small", 2), initial_latents(1, 128, 128, 0), cond)


def test_embeddings_past_fp16s_range_are_blamed_on_the_engines_precision(tiny_models, tiny_conditioning):
    """Finite fp32 embeddings past 65504 turn inf in the cast to fp16 engines: the message names
    that cast and its way out (it blamed T5 in fp16, which had run in fp32)."""
    import copy

    small, large = (copy.deepcopy(m) for m in tiny_models)  # cast in place: not the session's models
    cond = _cond(tiny_conditioning)
    cond.prompt_embeds = cond.prompt_embeds.clone()
    cond.prompt_embeds[0, 0, 0] = 1e5
    with pytest.raises(NumericalError, match=r"^the prompt embeddings exceed fp16's range \| got largest \|value\| 1e\+05 .* build the engines in bf16 or fp32"):
        StitchedSampler(torch_engines(small, large, dtype=torch.float16)).denoise(make_plan("small", 2), initial_latents(1, 128, 128, 0), cond)
    cond = _cond(tiny_conditioning)
    cond.negative_prompt_embeds = cond.negative_prompt_embeds.clone()
    cond.negative_prompt_embeds[0, 0, 0] = -1e5  # the negative prompt's half of the CFG batch
    with pytest.raises(NumericalError, match=r"^the negative prompt embeddings exceed fp16's range"):
        StitchedSampler(torch_engines(small, large, dtype=torch.float16)).denoise(make_plan("small", 2), initial_latents(1, 128, 128, 0), cond)


def test_nan_weights_stop_denoise_with_step_and_graph(tiny_models, nan_large, tiny_conditioning):
    from hs_runtime.models import load_transformer

    engines = torch_engines(tiny_models[0], load_transformer(nan_large))
    plan = make_plan("hybrid", 6, PlanConfig(large_fraction=0.15, hybrid_end=0.55))  # capture hybrid×2 small×3
    with pytest.raises(NumericalError) as info:
        StitchedSampler(engines).denoise(plan, initial_latents(1, 128, 128, 0), _cond(tiny_conditioning))
    assert str(info.value).startswith("step 0 (capture): large produced NaN | expected finite velocities | do the model weights hold NaN/inf")


def test_profiled_run_stops_at_the_first_stage_boundary(tiny_models, nan_large, tiny_conditioning):
    from hs_runtime.models import load_transformer

    engines = torch_engines(tiny_models[0], load_transformer(nan_large))
    small = engines.engines["small"] = _Counting(engines["small"])
    plan = Plan("custom", ("large", "large", "small", "small"))
    with pytest.raises(NumericalError, match=r"step 0 \(large\): large produced NaN"):
        StitchedSampler(engines).denoise(plan, initial_latents(1, 128, 128, 0), _cond(tiny_conditioning), profile=True)
    assert small.calls == 0  # stopped at the large → small boundary


class _Counting:
    """An engine wrapper that counts calls."""

    def __init__(self, inner):
        self.inner, self.spec, self.dims, self.calls = inner, inner.spec, inner.dims, 0

    def __call__(self, feeds, outputs=None):
        self.calls += 1
        return self.inner(feeds, outputs)


def test_check_can_be_switched_off(tiny_models, nan_large, tiny_conditioning):
    from hs_runtime.models import load_transformer

    engines = torch_engines(tiny_models[0], load_transformer(nan_large))
    result = StitchedSampler(engines, check_finite=False).denoise(make_plan("large", 2), initial_latents(1, 128, 128, 0), _cond(tiny_conditioning))
    assert torch.isnan(result.latents).any()  # what the check exists to catch


def test_generate_with_nan_weights_fails_in_one_line_and_writes_nothing(tiny_paths, nan_large, tmp_path):
    out = tmp_path / "img.png"
    args = [
        "generate", "--small", str(tiny_paths.small), "--large", str(nan_large), "--pipeline", str(tiny_paths.pipeline),
        "--prompt", "a red cat", "--steps", "6", "--height", "128", "--width", "128", "--out", str(out), "--compare",
    ]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: step 0 (capture): large produced NaN | expected finite velocities | do the model weights hold NaN/inf "
                      "(a damaged or badly converted checkpoint)? use a clean checkpoint and rebuild from it"]
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no image, no comparison


def test_decode_refuses_non_finite_latents(tiny_pipe):
    from hs_runtime.pipeline import TextAndVae

    latents = torch.zeros(1, 16, 16, 16)
    latents[0, 0, 0, 0] = float("inf")
    with pytest.raises(NumericalError, match="the latents to decode holds inf"):
        TextAndVae(tiny_pipe).decode(latents)


def test_verify_reports_non_finite_outputs_as_failures(tiny_engine_dir, nan_large, tmp_path):
    import json
    import shutil

    from hs_export.build.verify import verify

    folder = shutil.copytree(tiny_engine_dir, tmp_path / "nan-reference")
    data = json.loads((folder / "manifest.json").read_text())
    data["models"]["large"]["source"] = str(nan_large)  # the torch reference now yields NaN
    (folder / "manifest.json").write_text(json.dumps(data))
    checks = verify(folder, steps=6)
    failed = {c.name: c.problem for c in checks if not c.ok}
    assert failed["large vs torch (4 kinds of call)"] == "NaN/inf in the engine's or the torch graph's outputs"
    assert failed["end-to-end hybrid, 6 steps"].startswith("torch reference: step 0 (capture): large produced NaN")
    assert "small vs torch (4 kinds of call)" not in failed
