"""CUDA and TensorRT runs; skipped with the reason where the hardware or library is absent."""

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
