import json
import re
import shutil
import threading

import pytest
import torch
from click.testing import CliRunner

from hs_export.cli import main
from hs_runtime import HybridStitchRuntime
from hs_runtime.errors import ConcurrencyError, ConfigError, ManifestError, ModelLoadError, ShapeError
from hs_runtime.pipeline import HybridStitchPipeline, initial_latents
from hs_runtime.plans import PLAN_NAMES, MaskConfig, PlanConfig, make_plan
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


def test_runtime_denoise_refuses_what_is_not_a_plan_or_a_tensor(tiny_engine_dir, tiny_conditioning):
    """Before its prompt padding (an index_select on numpy used to be the first to fail)."""
    runtime, cond = _runtime_and_inputs(tiny_engine_dir, tiny_conditioning)
    latents = initial_latents(3, 128, 128, 0)
    with pytest.raises(ShapeError, match=re.escape("latents must be a torch tensor [P, C, H, W] | got ndarray | torch.from_numpy(latents)")):
        runtime.denoise(make_plan("large", 2), latents.numpy(), cond)
    with pytest.raises(ConfigError, match=re.escape("plan must be a Plan | got str")):
        runtime.denoise("large", latents[:1], cond)


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


def test_onnxruntime_on_cuda_waits_for_torchs_stream_before_it_reads_the_inputs(tiny_engine_dir, monkeypatch):
    """Bound CUDA inputs are read on ONNX Runtime's own stream, which does not wait for torch's
    (microsoft/onnxruntime#26609): the engine synchronises torch's stream before the run. The
    binding and run are recorded here on the CPU (no CUDA on these machines)."""
    from hs_runtime.backends.onnxruntime_backend import OrtEngine

    engine = HybridStitchRuntime.from_dir(tiny_engine_dir).engines["small"].engine
    events = []

    class Binding:
        def bind_input(self, name, *args):
            events.append("bind")

        bind_output = bind_input

    class Session:
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            events.append("run")

    class Stream:
        def synchronize(self):
            events.append("synchronize")

    monkeypatch.setattr(engine, "session", Session())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    from hs_export.build.export import dummy_inputs
    from hs_runtime.contract import call_sizes

    OrtEngine._run_bound(engine, dummy_inputs(engine.spec, call_sizes(2, 64, 0, 85), torch.float32, 0), ["velocity_tokens"])
    assert events[-2:] == ["synchronize", "run"] and events.count("synchronize") == 1


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


def test_an_onnxruntime_failure_in_a_call_is_one_line(tiny_engine_dir, tiny_conditioning, tmp_path, monkeypatch):
    """ONNX Runtime's own exception types (no common base but Exception) out of a run become
    EngineRunError with its reason, or OutOfMemoryError for an allocation; the CLI prints one line."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

    from hs_runtime.errors import EngineRunError, OutOfMemoryError

    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir)
    latents = initial_latents(tiny_conditioning.prompts, 128, 128, 0)
    for exc, expected, message in (
        (Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node."), EngineRunError, r"^ONNX Runtime failed running the large engine \(cpu\) \| got \[ONNXRuntimeError\] : 1 : FAIL : Non-zero status"),
        (RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 1073741824"), OutOfMemoryError, r"^the large engine \(cpu\) ran out of memory"),
    ):
        monkeypatch.setattr(runtime.engines["large"].engine.session, "run", lambda *_a, exc=exc, **_k: (_ for _ in ()).throw(exc))
        with pytest.raises(expected, match=message):
            runtime.denoise(make_plan("large", 2), latents, tiny_conditioning)
    monkeypatch.undo()

    failure = Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node.")
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda *_a, **_k: (_ for _ in ()).throw(failure))
    result = CliRunner().invoke(main, ["generate", str(tiny_engine_dir), "--prompt", "a red cat", "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Error: ONNX Runtime failed running the " in result.output and "Traceback" not in result.output


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


def test_a_split_request_keeps_the_engines_between_its_calls(tiny_engine_dir, tiny_conditioning, monkeypatch):
    """A request the runtime splits into engine calls (2 prompts on a 1-prompt build) holds the
    single-request guard from its first call to its last: another thread trying between two calls
    is refused, instead of taking the engines and failing the first request midway."""
    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir)
    batching = runtime.batching_sampler()
    inner, refused = batching.sampler.denoise, []

    def denoise_then_intrude(*args, **kwargs):
        result = inner(*args, **kwargs)
        errors = []
        thread = threading.Thread(target=lambda: _catch(errors, runtime, _conditioning(tiny_conditioning)))
        thread.start()
        thread.join()
        refused.extend(errors)
        return result

    monkeypatch.setattr(batching.sampler, "denoise", denoise_then_intrude)
    result = batching.denoise(make_plan("small", 1), initial_latents(2, 128, 128, [0, 1]), _conditioning(tiny_conditioning, prompts=2))
    assert result.latents.shape[0] == 2
    assert len(refused) == 2 and all(isinstance(e, ConcurrencyError) for e in refused)
    runtime.denoise(make_plan("small", 1), initial_latents(1, 128, 128, 0), _conditioning(tiny_conditioning))  # free again


def test_adaptive_masks_of_split_requests_join_with_each_prompts_own_count(tiny_engine_dir, tiny_conditioning):
    """An adaptive mask picks its token count per engine call, so the calls of a split request
    differ in width (the join raised a raw torch error after every call had run): rows are padded
    with repeats, and ``counts()`` gives each prompt the count it got alone."""
    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir)
    plan = make_plan("hybrid", STEPS, PlanConfig(mask=MaskConfig(ratio=1.0, energy=0.5, min_ratio=0.02)))
    latents = initial_latents(2, 128, 128, [0, 1])
    latents[1] *= 0.05  # little detail: a smaller mask than prompt 0's
    cond = _conditioning(tiny_conditioning, prompts=2)
    joined = runtime.denoise(plan, latents, cond).masks[0]
    alone = [runtime.denoise(plan, latents[i : i + 1], _take_prompt(cond, i)).masks[0] for i in range(2)]
    widths = [m.complex_idx.shape[1] for m in alone]
    assert widths[0] != widths[1], "the prompts' masks must differ for this test"
    assert joined.complex_idx.shape[1] == max(widths) and joined.counts().tolist() == widths
    for i in range(2):
        assert torch.equal(joined.as_grid(8, 8)[i], alone[i].as_grid(8, 8)[0])


class _NoTextEncoders:
    vae_scale_factor = 8

    def encode(self, *args):
        raise AssertionError("the text encoders ran before the inputs were checked")


def _take_prompt(cond, i):
    return Conditioning(*(t[i : i + 1] for t in (cond.prompt_embeds, cond.pooled_prompt_embeds, cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds)))


def test_bad_inputs_to_the_api_are_refused_in_one_line(tiny_engine_dir, tiny_conditioning, tiny_paths):
    """Inputs the API took through to a raw torch/Python error: negatives missing or shaped unlike
    the prompts', latents of the wrong rank, a non-positive shift, non-integer counts and seeds;
    and ``from_models`` engines check the contract's sizes as engine folders do."""
    runtime = HybridStitchRuntime.from_dir(tiny_engine_dir)
    cond, latents, plan = _conditioning(tiny_conditioning), initial_latents(1, 128, 128, 0), make_plan("large", 1)
    no_pooled = Conditioning(cond.prompt_embeds, cond.pooled_prompt_embeds, cond.negative_prompt_embeds, None)
    with pytest.raises(ShapeError, match=re.escape("guidance_scale > 1 needs negative prompt embeddings | got no negative_pooled_prompt_embeds")):
        runtime.denoise(plan, latents, no_pooled)
    short = Conditioning(cond.prompt_embeds, cond.pooled_prompt_embeds, cond.negative_prompt_embeds[:, :-1], cond.negative_pooled_prompt_embeds)
    with pytest.raises(ShapeError, match="negative_prompt_embeds must be shaped as the prompt's"):
        runtime.denoise(plan, latents, short)
    with pytest.raises(ShapeError, match=r"latents must be \[P, C, H, W\]"):
        runtime.sampler().denoise(plan, latents[0], cond)
    with pytest.raises(ConfigError, match=re.escape("shift must be >= 1e-06 | got 0")):
        runtime.sampler(shift=0)
    for make, message in [
        (lambda: make_plan("hybrid", 2.5), "steps must be an integer | got 2.5"),
        (lambda: PlanConfig(refreshes=1.5), "refreshes must be an integer"),
        (lambda: MaskConfig(reselect_every=1.5), "mask reselect_every must be an integer"),
        (lambda: PlanConfig(large_fraction="0.2"), "large_fraction must be a finite number"),
        (lambda: initial_latents(1, 128, 128, None), "seed must be an integer, or one integer per prompt | got None"),
        (lambda: initial_latents(1, 128, 128, 1.5), "seed must be an integer, or one integer per prompt"),
        (lambda: initial_latents(-1, 128, 128, 0), "prompts must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            make()
    pipe = HybridStitchPipeline(runtime.batching_sampler(), _NoTextEncoders())  # checked before any text is encoded
    for call, message in [
        (lambda: pipe(["a", "b"], plan, 128, 128, negative_prompts=["x"]), "one negative prompt per prompt | got 1 for 2 prompt(s)"),
        (lambda: pipe([3], plan, 128, 128), "prompts must be strings | got 3"),
        (lambda: pipe(["a"], plan, 128, 128, seed=[1, 2]), "one seed per prompt | got 2 seed(s) for 1 prompt(s)"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            call()
    models = HybridStitchRuntime.from_models(tiny_paths.small, tiny_paths.large)
    wide = Conditioning(torch.zeros(1, 85, 48), cond.pooled_prompt_embeds, torch.zeros(1, 85, 48), cond.negative_pooled_prompt_embeds)
    with pytest.raises(ShapeError, match=r"encoder_hidden_states axis 'joint_dim'"):
        models.denoise(plan, latents, wide)
    no_t5 = HybridStitchRuntime(models.engines, tiny_paths.large, max_sequence_length=-67)  # a folder built with --text-tokens 10
    with pytest.raises(ModelLoadError, match="these engines take no T5 token"):
        no_t5.text_and_vae()


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


def test_prompt_to_image_takes_the_shift_of_the_pipelines_scheduler(tiny_paths, tmp_path):
    """A fine-tune whose scheduler shifts by another amount draws what diffusers draws from the same
    folder (the shift was fixed at SD3's 3.0); a resolution-dependent shift is refused in one line."""
    from hs_runtime.pipeline import TextAndVae

    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_paths.pipeline, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    assert TextAndVae.from_pretrained(folder).shift == 3.0
    config_path.write_text(json.dumps({**config, "shift": 6.0}))
    text_and_vae = TextAndVae.from_pretrained(folder)
    runtime = HybridStitchRuntime.from_models(tiny_paths.small, tiny_paths.large, str(folder))
    assert runtime.pipeline(7.0, text_and_vae=text_and_vae).sampler.sampler.shift == 6.0
    assert runtime.pipeline(7.0, text_and_vae=text_and_vae, check_finite=False).sampler.sampler.check_finite is False  # bench --no-finite-check --versus
    config_path.write_text(json.dumps({**config, "use_dynamic_shifting": True}))
    with pytest.raises(ConfigError, match="shifts by resolution"):
        TextAndVae.from_pretrained(folder).shift


def test_encoded_prompts_render_as_the_prompts_do(tiny_paths):
    """``pipe.encode`` once and ``conditioning=`` per seed gives the images the prompts give; an
    encoding of other prompts is refused in one line, not a shape error in the first engine call."""
    import numpy as np

    from hs_runtime.plans import make_plan

    pipe = HybridStitchRuntime.from_models(tiny_paths.small, tiny_paths.large, str(tiny_paths.pipeline)).pipeline(7.0)
    plan = make_plan("hybrid", 3)
    prompts = ["a red cat", "a blue dog"]
    direct, _ = pipe(prompts, plan, 128, 128, 1, "blurry")
    encoded, _ = pipe(prompts, plan, 128, 128, 1, conditioning=pipe.encode(prompts, "blurry"))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(direct, encoded))
    with pytest.raises(ConfigError, match=re.escape("the conditioning was encoded for other prompts | got 1 encoded, 2 prompt(s)")):
        pipe(prompts, plan, 128, 128, 1, conditioning=pipe.encode(prompts[:1]))
    with pytest.raises(ConfigError, match=re.escape("negative prompts given with a conditioning")):  # they were encoded into it
        pipe(prompts, plan, 128, 128, 1, "blurry", conditioning=pipe.encode(prompts, "blurry"))
    with pytest.raises(ConfigError, match=re.escape("conditioning must be a Conditioning | got tuple")):
        pipe(prompts, plan, 128, 128, 1, conditioning=(None, None))


def test_a_folder_built_for_clips_tokens_or_fewer_refuses_text_encoders(tiny_engine_dir, tiny_paths, tmp_path):
    """A folder built without a pipeline for <= 77 text tokens records no T5 tokens: given text
    encoders at run time (``serve --pipeline``), it is refused before any engine loads, not with a
    shape error at the first engine call."""
    import json
    import shutil

    folder = tmp_path / "no-t5"
    shutil.copytree(tiny_engine_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["pipeline"], manifest["build"]["max_sequence_length"] = None, 0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    HybridStitchRuntime.from_dir(folder)  # no text encoders: runs on embeddings
    with pytest.raises(ConfigError, match=re.escape(f"engine folder {folder} takes {manifest['build']['shape']['text_tokens']} text tokens: no room for T5's")):
        HybridStitchRuntime.from_dir(folder, pipeline_source=str(tiny_paths.pipeline))
