"""CUDA and TensorRT runs, skipped with the reason where the hardware or library is absent; and
the CPU-side logic of ``scripts/bench_gpu.py``, which runs everywhere."""

import datetime
import json
import sys
from pathlib import Path

import pytest

from hs_runtime import HybridStitchRuntime
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import make_plan
from hs_runtime.sampler import Conditioning


def _cond(tiny_conditioning):
    c = tiny_conditioning
    return Conditioning(c.prompt_embeds[:1], c.pooled_prompt_embeds[:1], c.negative_prompt_embeds[:1], c.negative_pooled_prompt_embeds[:1])


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu(tiny_engine_dir, tiny_conditioning):
    plan = make_plan("hybrid", 6)
    latents = initial_latents(1, 128, 128, 0)
    cpu = HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch").denoise(plan, latents, _cond(tiny_conditioning)).latents
    cuda = HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch", device="cuda").denoise(plan, latents, _cond(tiny_conditioning)).latents
    assert (cuda.cpu() - cpu).abs().max() / cpu.abs().max() <= 1e-3


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_with_io_binding(tiny_engine_dir, tiny_conditioning):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    plan = make_plan("hybrid", 6)
    latents = initial_latents(1, 128, 128, 0)
    ref = HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch").denoise(plan, latents, _cond(tiny_conditioning)).latents
    got = HybridStitchRuntime.from_dir(tiny_engine_dir, device="cuda").denoise(plan, latents, _cond(tiny_conditioning)).latents
    assert (got.cpu() - ref).abs().max() / ref.abs().max() <= 1e-3


@pytest.mark.tensorrt
def test_tensorrt_build_verify_and_buckets(tiny_paths, tmp_path):
    from hs_export.build import BuildConfig, build
    from hs_export.build import resolve_models
    from hs_export.build.verify import verify

    selection = resolve_models("tiny", None, None, None, log=lambda *_: None)
    out = tmp_path / "trt"
    build(selection, BuildConfig(out=out, backend="tensorrt", token_buckets=2), log=lambda *_: None)
    checks = verify(out, device="cuda", steps=6)
    assert all(c.ok for c in checks), checks


# ---------------------------------------------------------------- TensorRT engines, call by call
# The same kinds of call as tests/test_tensorrt_double.py, on a real GPU and TensorRT: dense,
# subset, text reuse (zero text queries), ratio 1.0 (zero context tokens), one buffer per output,
# profile switches, the caller's stream, and a second device where there is one.


def _trt_feeds(spec, sizes, device, seed):
    from hs_export.build.export import dummy_inputs

    return {k: v.to(device) for k, v in dummy_inputs(spec, sizes, seed=seed).items()}


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def tiny_trt_folder(request, tiny_paths, tmp_path_factory):
    from hs_export.build import BuildConfig, build, resolve_models

    out = tmp_path_factory.mktemp(f"trt-{request.param}")
    build(resolve_models("tiny", None, None, None, log=lambda *_: None), BuildConfig(out=out, backend="tensorrt", precision=request.param, token_buckets=2), log=lambda *_: None)
    return out, request.param


def _large_engine_and_reference(folder, device):
    import torch

    from hs_runtime.backends.loading import load_engine
    from hs_runtime.graphs import TokenGraph
    from hs_runtime.manifest import Manifest
    from hs_runtime.models import load_transformer

    manifest = Manifest.load(folder)
    engine = load_engine(manifest, "large", "tensorrt", torch.device(device))
    module = TokenGraph(load_transformer(manifest.data["models"]["large"]["source"], torch.float32, device), "large").eval()
    return manifest, engine, module


def _check_call(engine, module, sizes, device, seed, rtol):
    import torch

    feeds = _trt_feeds(module.spec, sizes, device, seed)
    with torch.inference_mode():
        ref = dict(zip(module.spec.output_names, module(*[feeds[n] for n in module.spec.input_names])))
    got = engine({n: f.to(engine.dtypes[n]) if f.is_floating_point() and n != "timestep" else f for n, f in feeds.items()})
    for name, want in ref.items():
        assert tuple(got[name].shape) == tuple(want.shape), name
        if want.numel():
            err = (got[name].float() - want).abs().max() / want.abs().max().clamp_min(1e-6)
            assert err <= rtol, (name, float(err))
    return got


@pytest.mark.tensorrt
def test_tensorrt_engine_every_kind_of_call(tiny_trt_folder):
    import torch

    from hs_runtime.contract import call_sizes

    folder, precision = tiny_trt_folder
    manifest, engine, module = _large_engine_and_reference(folder, "cuda")
    shape = manifest.shape
    n_img, text, batch = shape.latent_height // 2 * (shape.latent_width // 2), shape.text_tokens, shape.batch
    rtol = 1e-3 if precision == "fp32" else 3e-2
    cases = [
        ("dense", call_sizes(batch, n_img, 0, text), 0),
        ("subset", call_sizes(batch, 20, n_img - 20, text), 1),
        ("text reuse", call_sizes(batch, 20, n_img - 20, text, reuse_text=True), 1),
        ("ratio 1.0, no context", call_sizes(batch, n_img, 0, text, reuse_text=True), 2),
        ("more tokens, same buffers", call_sizes(batch, 40, n_img - 40, text), 2),
        ("back to dense", call_sizes(batch, n_img, 0, text), 0),
    ]
    starts = {name: buf.data_ptr() for name, buf in engine._buffers.items()}
    for i, (label, sizes, profile) in enumerate(cases):
        got = _check_call(engine, module, sizes, "cuda", seed=i, rtol=rtol)
        assert engine.context.active_optimization_profile == profile, label
        for name in engine.spec.input_names + engine.spec.output_names:  # setTensorAddress: never null
            assert engine.context.get_tensor_address(name) != 0, (label, name)
        assert all(got[n].data_ptr() == starts[n] for n in got if got[n].numel()), label
    assert {name: buf.data_ptr() for name, buf in engine._buffers.items()} == starts
    # On a caller's own stream: the engine orders itself after it and the caller sees the outputs.
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _check_call(engine, module, cases[1][1], "cuda", seed=99, rtol=rtol)
    torch.cuda.synchronize()


@pytest.mark.tensorrt
def test_tensorrt_engine_on_a_second_device(tiny_trt_folder):
    import torch

    from hs_runtime.contract import call_sizes

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    folder, precision = tiny_trt_folder
    manifest, engine, module = _large_engine_and_reference(folder, "cuda:1")
    shape = manifest.shape
    n_img = shape.latent_height // 2 * (shape.latent_width // 2)
    _check_call(engine, module, call_sizes(shape.batch, 20, n_img - 20, shape.text_tokens), "cuda:1", seed=5, rtol=1e-3 if precision == "fp32" else 3e-2)
    assert torch.cuda.current_device() == 0


@pytest.mark.tensorrt
def test_tensorrt_engine_set_shares_one_activation_block(tiny_trt_folder):
    """The small and large engines of a folder get one block, the larger one's need
    (getDeviceMemorySizeV2); ``test_tensorrt_build_verify_and_buckets`` runs a hybrid denoise on it."""
    from hs_runtime.backends.loading import engines_from_manifest
    from hs_runtime.manifest import Manifest

    folder, _ = tiny_trt_folder
    engines = engines_from_manifest(Manifest.load(folder), "tensorrt", "cuda")
    small, large = (engines[name].engine for name in ("small", "large"))  # behind the profile checks
    assert small._activations is large._activations
    assert small._activations.numel() == max(small.activation_bytes, large.activation_bytes)


def _bench_gpu_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_script_keeps_each_stage_and_fails_on_parity(tmp_path, monkeypatch):
    """CPU-side logic of the one-shot GPU script: results written after every stage (a later
    failure keeps them), and a parity past the limit, NaN included, is a non-zero exit, not a row
    in a table."""
    script = _bench_gpu_script()
    row = {"plan": "large", "stages": "large×2", "latency_s_median": 1.0, "speedup": 1.0, "ideal": 1.0, "efficiency": 1.0, "peak_gpu_gib": 0.0, "weights_and_cache_gib": 0.1}
    seen = []

    def latency(preset, device, *args):
        seen.append(sorted(p.name for p in tmp_path.iterdir()) if tmp_path.exists() else [])
        return {"preset": preset, "size": 128, "steps": 2, "repeat": 1, "rows": [row], "calls": {}}

    monkeypatch.setattr(script, "latency", latency)
    monkeypatch.setattr(script, "cuda_parity", lambda device: [{"check": "large dense", "rel": 1e-7}, {"check": "small dense", "rel": float("nan")}])
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--device", "cpu", "--presets", "tiny,tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="CUDA parity failed: small dense nan"):
        script.main()
    stem = f"gpu-{datetime.date.today().isoformat()}"
    assert seen[1] == [f"{stem}.json", f"{stem}.md"]  # the first preset was on disk before the second ran
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert len(report["latency"]) == 2 and len(report["parity"]) == 2
