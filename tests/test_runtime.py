import json
import shutil
import threading

import pytest
import torch
from click.testing import CliRunner

from hs_export.cli import main
from hs_runtime import HybridStitchRuntime
from hs_runtime.errors import ConcurrencyError, ConfigError, ManifestError, ShapeError
from hs_runtime.pipeline import initial_latents
from hs_runtime.plans import PLAN_NAMES, PlanConfig, make_plan
from hs_runtime.sampler import Conditioning

STEPS = 6


def _conditioning(tiny_conditioning, prompts=1):
    c = tiny_conditioning
    return Conditioning(c.prompt_embeds[:prompts], c.pooled_prompt_embeds[:prompts], c.negative_prompt_embeds[:prompts], c.negative_pooled_prompt_embeds[:prompts])


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_onnxruntime_engines_match_torch_for_every_plan(name, tiny_engine_dir, tiny_conditioning):
    ort = HybridStitchRuntime.from_dir(tiny_engine_dir)
    ref = HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch")
    assert ort.engines.backend == "onnxruntime" and ref.engines.backend == "torch"
    plan = make_plan(name, STEPS, PlanConfig(refresh_every=2))
    latents = initial_latents(1, 128, 128, seed=5)
    cond = _conditioning(tiny_conditioning)
    got = ort.denoise(plan, latents, cond).latents
    want = ref.denoise(plan, latents, cond).latents
    assert (got - want).abs().max() / want.abs().max() <= 1e-4


def _runtime_and_inputs(tiny_engine_dir, tiny_conditioning):
    return HybridStitchRuntime.from_dir(tiny_engine_dir), _conditioning(tiny_conditioning)


def test_resolution_outside_profiles(tiny_engine_dir, tiny_conditioning):
    runtime, cond = _runtime_and_inputs(tiny_engine_dir, tiny_conditioning)
    with pytest.raises(ShapeError, match=r"image size outside the built profiles \| got 128×256 px \| expected width 128 × height 128 px \| rebuild with: hs-export build --preset tiny"):
        runtime.denoise(make_plan("large", 2), initial_latents(1, 256, 128, 0), cond)


def test_prompt_count_outside_profiles(tiny_engine_dir, tiny_conditioning):
    # The sampler feeds engines as they are; the runtime splits prompts to the built count
    # (tests/test_serve.py::test_runtime_pads_and_splits_prompts).
    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir)
    with pytest.raises(ShapeError, match=r"outside the built profiles.*--prompts 1"):
        runtime.sampler().denoise(make_plan("small", 2), initial_latents(2, 128, 128, 0), _conditioning(tiny_conditioning, prompts=2))


def test_wrong_embedding_width(tiny_engine_dir, tiny_conditioning):
    runtime, cond = _runtime_and_inputs(tiny_engine_dir, tiny_conditioning)
    wide = Conditioning(torch.zeros(1, 85, 4096), cond.pooled_prompt_embeds, torch.zeros(1, 85, 4096), cond.negative_pooled_prompt_embeds)
    with pytest.raises(ShapeError, match=r"encoder_hidden_states axis 'joint_dim'.*expected \('batch', 'text_queries', 32\)"):
        runtime.denoise(make_plan("large", 2), initial_latents(1, 128, 128, 0), wide)


def test_precision_of_a_folder_run(tiny_engine_dir, tiny_conditioning):
    """The torch backend runs an engine folder's models in the dtype asked for; the folder's
    own engines refuse any dtype but the one they were built in, before loading."""
    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch", dtype="bf16")
    assert runtime.engines.dtype == torch.bfloat16 and runtime.engines.precision == "bf16"
    assert next(runtime.engines["large"].engine.module.parameters()).dtype == torch.bfloat16
    _, cond = _runtime_and_inputs(tiny_engine_dir, tiny_conditioning)
    assert runtime.denoise(make_plan("hybrid", 2), initial_latents(1, 128, 128, 0), cond).latents.isfinite().all()
    assert HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch").engines.dtype == torch.float32
    assert HybridStitchRuntime.from_dir(tiny_engine_dir, dtype="fp32").engines.backend == "onnxruntime"
    with pytest.raises(ConfigError, match=r"onnxruntime engines compute in the precision they were built in \| got dtype fp16 for .*, built in fp32 \| .*--backend onnxruntime --precision fp16"):
        HybridStitchRuntime.from_dir(tiny_engine_dir, dtype="fp16")
    with pytest.raises(ConfigError, match=r"bf16.*rebuild: .*--backend tensorrt --precision bf16"):
        HybridStitchRuntime.from_dir(tiny_engine_dir, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match=r"unknown precision \| got 'fp8' \| expected fp32 \| fp16 \| bf16"):
        HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch", dtype="fp8")


def test_a_cuda_provider_that_fails_to_start_is_refused_not_run_on_the_cpu(tiny_engine_dir, monkeypatch):
    """ONNX Runtime falls back to its CPU provider when CUDA's fails to load (a missing library),
    logging only; the engine refuses to load instead of running on the wrong device."""
    import onnxruntime as ort

    from hs_runtime.backends.onnxruntime_backend import OrtEngine
    from hs_runtime.errors import EngineLoadError
    from hs_runtime.manifest import Manifest

    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", lambda path, options, providers: real(path, options, providers=["CPUExecutionProvider"]))
    manifest = Manifest.load(tiny_engine_dir)
    with pytest.raises(EngineLoadError, match=r"could not start its CUDA execution provider .*\['CPUExecutionProvider'\].*or run with --device cpu"):
        OrtEngine(manifest.engine_path("small"), "small", manifest.dims("small"), torch.device("cuda:0"))


def test_out_of_memory_is_one_line_with_the_way_out(tiny_engine_dir, tiny_conditioning, tmp_path, monkeypatch):
    """CUDA's, the host's or ONNX Runtime's allocation failure in an engine call becomes
    OutOfMemoryError naming the engine; outside one (text encoders, VAE) the CLI says it in one line."""
    from hs_runtime.errors import OutOfMemoryError, out_of_memory
    from hs_runtime.pipeline import TextAndVae

    ort_oom = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Status Message: Failed to allocate memory for requested buffer of size 1073741824")
    for exc in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(), ort_oom):
        assert isinstance(out_of_memory(exc, "x"), OutOfMemoryError)
    assert out_of_memory(ValueError("a bad value"), "x") is None

    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir)
    large = runtime.engines["large"].engine

    def exhausted(*_args, **_kwargs):
        raise ort_oom

    monkeypatch.setattr(type(large), "__call__", exhausted)  # the `large` plan calls this engine alone
    latents = initial_latents(tiny_conditioning.prompts, 128, 128, 0)
    with pytest.raises(OutOfMemoryError, match=r"the large engine \(cpu\) ran out of memory \| got .*Failed to allocate memory.* \| fewer prompts per call"):
        runtime.denoise(make_plan("large", 2), latents, tiny_conditioning)
    monkeypatch.undo()

    monkeypatch.setattr(TextAndVae, "decode", lambda self, latents: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")))
    result = CliRunner().invoke(main, ["generate", str(tiny_engine_dir), "--prompt", "a red cat", "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Error: the run ran out of memory | got CUDA out of memory. Tried to allocate 512.00 MiB | fewer prompts" in result.output
    assert "Traceback" not in result.output


def test_unknown_backend_is_named_as_such(tiny_engine_dir):
    with pytest.raises(ConfigError, match=r"^unknown backend \| got 'onnx' \| expected torch \| onnxruntime \| tensorrt$"):
        HybridStitchRuntime.from_dir(tiny_engine_dir, backend="onnx")  # not "build onnx engines"


def test_folder_missing_a_graph(tiny_engine_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_engine_dir, broken)
    (broken / "engines" / "large.onnx").unlink()
    with pytest.raises(ManifestError, match=r"missing graph\(s\) \['large'\].*rebuild with"):
        HybridStitchRuntime.from_dir(broken)


def test_manifest_of_another_schema_version(tiny_engine_dir, tmp_path):
    other = tmp_path / "v1"
    shutil.copytree(tiny_engine_dir, other)
    data = json.loads((other / "manifest.json").read_text())
    data["schema_version"] = 2  # a folder of contract v2 (K/V stacked as one tensor)
    (other / "manifest.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["generate", str(other), "--prompt", "x", "--steps", "4"])
    assert result.exit_code == 1
    assert "was built for an older engine contract" in result.output and "got schema 2" in result.output and "expected schema 3" in result.output
    assert "rebuild with: hs-export build --preset tiny" in result.output
    assert "Traceback" not in result.output


def test_not_an_engine_folder(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        HybridStitchRuntime.from_dir(tmp_path)


def test_generate_on_engines_with_compare(tiny_engine_dir, tmp_path):
    out = tmp_path / "img.png"
    result = CliRunner().invoke(main, ["generate", str(tiny_engine_dir), "--prompt", "a red cat", "--steps", "4", "--out", str(out), "--compare"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.output
    from PIL import Image

    assert Image.open(tmp_path / "img_compare.png").size == (384, 128)


def test_text_encoders_and_vae_in_bf16(tiny_engine_dir, tmp_path):
    """``--text-dtype bf16`` loads the text encoders and VAE in bf16 (half their memory) and draws
    the image fp32 draws, up to rounding; the engines are untouched."""
    import numpy as np
    from PIL import Image

    images = {}
    for text_dtype in ("fp32", "bf16"):
        out = tmp_path / f"{text_dtype}.png"
        result = CliRunner().invoke(main, ["generate", str(tiny_engine_dir), "--prompt", "a red cat", "--steps", "4", "--text-dtype", text_dtype, "--out", str(out)])
        assert result.exit_code == 0, result.output
        images[text_dtype] = np.asarray(Image.open(out)).astype(int)
    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir, text_dtype="bf16")
    pipe = runtime.text_and_vae().pipe
    assert {m.dtype for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae)} == {torch.bfloat16}
    assert runtime.engines.dtype == torch.float32
    difference = np.abs(images["fp32"] - images["bf16"])
    assert 0 < difference.mean() < 3 and difference.mean() < images["fp32"].std() / 10
    with pytest.raises(ConfigError, match="unknown precision"):
        HybridStitchRuntime.from_dir(tiny_engine_dir, text_dtype="int8")


def test_overflowing_text_encoders_are_named_with_the_way_out():
    """T5 can overflow in fp16: the error names the text encoders and --text-dtype, not the input."""
    from types import SimpleNamespace

    from hs_runtime.errors import NumericalError
    from hs_runtime.pipeline import TextAndVae

    inf = torch.full((2, 3, 4), float("inf"), dtype=torch.float16)
    pipe = SimpleNamespace(
        text_encoder=SimpleNamespace(dtype=torch.float16, device=torch.device("cpu")),
        encode_prompt=lambda **_: (inf[:1], inf[1:], torch.zeros(1, 4), torch.zeros(1, 4)),
    )
    with pytest.raises(NumericalError, match=r"the prompt embedding from the text encoders holds inf .*overflow in fp16\? load the text encoders in bf16 or fp32 \(--text-dtype\)"):
        TextAndVae(pipe).encode(["x"], None, True, 8)


def test_two_threads_on_one_runtime_fail_loudly(tiny_engine_dir, tiny_conditioning):
    runtime, cond = _runtime_and_inputs(tiny_engine_dir, tiny_conditioning)
    errors = []
    with runtime.engines.exclusive():  # as if another thread were mid-request
        thread = threading.Thread(target=lambda: _catch(errors, runtime, cond))
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], ConcurrencyError)
    runtime.denoise(make_plan("small", 1), initial_latents(1, 128, 128, 0), cond)  # free again


def _catch(errors, runtime, cond):
    try:
        runtime.denoise(make_plan("small", 1), initial_latents(1, 128, 128, 0), cond)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        errors.append(exc)


def test_onnxruntime_denoise_runs_host_work_on_one_torch_thread(tiny_engine_dir, tiny_conditioning):
    """Between ONNX Runtime calls on a CPU the sampler's torch work runs on one thread (its OpenMP
    threads would spin on the cores the next call needs); the thread's count comes back after,
    also when the denoise fails."""
    runtime, cond = _runtime_and_inputs(tiny_engine_dir, tiny_conditioning)
    seen = []

    class Spy:  # the large engine, noting torch's thread count at every call
        def __init__(self, engine):
            self.engine, self.spec, self.dims = engine, engine.spec, engine.dims

        def __call__(self, feeds, outputs=None):
            seen.append(torch.get_num_threads())
            return self.engine(feeds, outputs)

    runtime.engines.engines["large"] = Spy(runtime.engines["large"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runtime.denoise(make_plan("large", 2), initial_latents(1, 128, 128, 0), cond)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        with pytest.raises(ShapeError):
            runtime.denoise(make_plan("large", 2), initial_latents(1, 256, 128, 0), cond)
        assert torch.get_num_threads() == 2
        torch_runtime = HybridStitchRuntime.from_dir(tiny_engine_dir, backend="torch")
        with torch_runtime.engines.host_work():
            assert torch.get_num_threads() == 2  # the torch backend computes in torch: left alone
    finally:
        torch.set_num_threads(before)


def test_torch_threads_restores_each_holders_own_thread():
    """Two denoising threads that overlap: each sees one thread while it holds, and each gets its
    own count back when it leaves, whichever leaves first; the main thread keeps its count."""
    import threading

    from hs_runtime.backends.base import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    inside, first_out = threading.Barrier(2, timeout=30), threading.Event()
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def hold(name: str) -> None:
        torch.set_num_threads(2)
        with torch_threads(1):
            seen[name].append(torch.get_num_threads())
            inside.wait()  # both hold now
            if name == "b":
                assert first_out.wait(30)  # a leaves while b still holds
                seen[name].append(torch.get_num_threads())
        seen[name].append(torch.get_num_threads())
        if name == "a":
            first_out.set()

    try:
        threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert seen == {"a": [1, 2], "b": [1, 1, 2]}
        assert torch.get_num_threads() == 2
        with torch_threads(1), torch_threads(1):  # nested in one thread: back to 2 at the end
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_shapes_checked_once_still_refuse_other_shapes(tiny_engine_dir):
    """The profile check remembers shape sets that passed; a new one is still checked."""
    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir)
    engine = runtime.engines["small"]
    spec = engine.spec
    from hs_runtime.contract import call_sizes

    def feeds(tokens):
        shapes = spec.shapes(call_sizes(2, tokens, 0, 85))
        return {t.name: torch.zeros(shapes[t.name], dtype=torch.int64 if t.name == "token_pos" else torch.float32) for t in spec.inputs}

    for _ in range(2):
        engine(feeds(64), ["velocity_tokens"])
    assert len(engine._accepted) == 1
    with pytest.raises(ShapeError, match="outside the built profiles"):
        engine(feeds(65), ["velocity_tokens"])
    bad = feeds(64)
    bad["pooled_projections"] = torch.zeros(2, 3)
    with pytest.raises(ShapeError, match="pooled_projections"):
        engine(bad, ["velocity_tokens"])


def test_import_is_thin():
    import subprocess
    import sys

    code = "import sys, hs_runtime; print(sorted(m for m in ('diffusers','transformers','onnxruntime','tensorrt','onnx') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_dynamic_shape_build_serves_other_resolutions(tiny_paths, tiny_conditioning, tmp_path):
    from hs_export.build import BuildConfig, build
    from hs_export.build import resolve_models

    selection = resolve_models("tiny", None, None, None, log=lambda *_: None)
    build(selection, BuildConfig(out=tmp_path / "dyn", dynamic_shape=True, token_buckets=2), log=lambda *_: None)
    ort = HybridStitchRuntime.from_dir(tmp_path / "dyn")
    ref = HybridStitchRuntime.from_dir(tmp_path / "dyn", backend="torch")
    plan = make_plan("hybrid", STEPS)
    latents = initial_latents(1, 192, 96, seed=2)  # 24×12 latent: inside half..twice of 16×16
    cond = _conditioning(tiny_conditioning)
    got, want = ort.denoise(plan, latents, cond).latents, ref.denoise(plan, latents, cond).latents
    assert (got - want).abs().max() / want.abs().max() <= 1e-4
    with pytest.raises(ShapeError, match="outside the built profiles"):
        ort.denoise(plan, initial_latents(1, 48, 128, 0), cond)  # 6 rows: below half of 16
    # bench times the folder at a size its profiles cover, not at its build size
    report = tmp_path / "bench.json"
    args = ["bench", str(tmp_path / "dyn"), "--plans", "hybrid", "--steps", "2", "--warmup", "0", "--repeat", "1", "--height", "192", "--width", "96", "--json", str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["latent"] == [24, 12]
