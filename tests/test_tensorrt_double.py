"""The TensorRT backend and build helpers against a CPU double of TensorRT's documented rules.

``tests/trt_double.py`` enforces what TensorRT's headers require (each rule cited there); these
tests drive the real :class:`TrtEngine` through it with the tiny preset's large graph, and show
that each earlier bug (null address for empty tensors, default stream, no device guard, freed
temporaries, shapes outside the profile) is caught. ``tests/test_gpu.py`` runs the same kinds of
call on a real GPU wherever TensorRT imports.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from hs_export.build.export import dummy_inputs

import trt_double
from hs_runtime.backends import tensorrt_backend
from hs_runtime.backends.tensorrt_backend import TrtEngine, output_capacity
from hs_runtime.contract import ModelDims, call_sizes, graph_spec
from hs_runtime.errors import BuildError, ConfigError, EngineLoadError, EngineRunError, ShapeError
from hs_runtime.presets import get_preset
from hs_runtime.profiles import BuildShape, graph_profiles

DIMS = ModelDims.from_config(get_preset("tiny").large)
SPEC = graph_spec("large", DIMS)
TEXT = 85
SHAPE = BuildShape(1, 16, 16, TEXT, token_buckets=2)  # profiles: dense, N 1..32, N 33..64
PROFILES = graph_profiles("large", SHAPE, DIMS)
N_IMG = 64

DENSE = call_sizes(2, N_IMG, 0, TEXT)
SUBSET = call_sizes(2, 20, N_IMG - 20, TEXT)
SUBSET_REUSE = call_sizes(2, 20, N_IMG - 20, TEXT, reuse_text=True)
FULL_RATIO_REUSE = call_sizes(2, N_IMG, 0, TEXT, reuse_text=True)  # ratio 1.0: no context, profile minimum


@pytest.fixture
def world(monkeypatch):
    return trt_double.install(monkeypatch)


def feeds_for(sizes, seed=0, dtype=torch.float32):
    return dummy_inputs(SPEC, sizes, dtype, seed)


def expected(feeds, sizes, dtype=torch.float32):
    io = {n: (f.to(dtype) if f.is_floating_point() and n != "timestep" else f) for n, f in feeds.items()}
    shapes = SPEC.shapes(sizes)
    return {n: v.to(dtype) for n, v in trt_double.reference_outputs(io, {n: shapes[n] for n in SPEC.output_names}).items()}


def make_engine(tmp_path, precision="fp32", device="cuda:0", **kwargs):
    plan = trt_double.write_plan(tmp_path / f"large-{precision}.plan", SPEC, PROFILES, precision)
    return TrtEngine(plan, "large", DIMS, torch.device(device), PROFILES, **kwargs)


def assert_outputs(got, feeds, sizes, dtype=torch.float32):
    want = expected(feeds, sizes, dtype)
    shapes = SPEC.shapes(sizes)
    assert set(got) == set(SPEC.output_names)
    for name, value in got.items():
        assert tuple(value.shape) == shapes[name] and value.dtype == dtype, name
        torch.testing.assert_close(value, want[name], msg=name)


# ---------------------------------------------------------------- the backend, rules obeyed


def test_dense_call_binds_empty_contexts_to_the_dummy(world, tmp_path):
    engine = make_engine(tmp_path)
    feeds = feeds_for(DENSE)
    assert feeds["k_context_0"].numel() == 0 and feeds["k_context_0"].data_ptr() == 0  # what torch gives
    assert_outputs(engine(feeds), feeds, DENSE)
    assert engine.context.addresses["k_context_0"] == engine.dummy_address("k_context_0") != 0
    assert engine.context.addresses["v_context_0"] == engine.dummy_address("v_context_0") != engine.dummy_address("k_context_0")
    assert engine.context.active_optimization_profile == 0


def test_subset_call_reads_its_context(world, tmp_path):
    engine = make_engine(tmp_path)
    feeds = feeds_for(SUBSET, seed=1)
    assert_outputs(engine(feeds), feeds, SUBSET)
    assert engine.context.active_optimization_profile == 1


def test_text_reuse_call_has_empty_text_queries_and_outputs(world, tmp_path):
    engine = make_engine(tmp_path)
    feeds = feeds_for(SUBSET_REUSE, seed=2)
    got = engine(feeds)
    assert_outputs(got, feeds, SUBSET_REUSE)
    assert got["text_k_0"].shape == (2, 0, DIMS.hidden)
    assert engine.context.addresses["encoder_hidden_states"] == engine.dummy_address("encoder_hidden_states")
    assert engine.context.addresses["text_k_0"] == engine.dummy_address("text_k_0") != engine.dummy_address("encoder_hidden_states")  # an output of its own


def test_full_ratio_call_with_no_context_in_a_subset_profile(world, tmp_path):
    engine = make_engine(tmp_path)
    feeds = feeds_for(FULL_RATIO_REUSE, seed=3)
    assert_outputs(engine(feeds), feeds, FULL_RATIO_REUSE)
    assert engine.context.active_optimization_profile == 2


def test_every_output_shape_reuses_one_buffer_sized_for_the_profile_maxima(world, tmp_path):
    engine = make_engine(tmp_path)
    capacity = output_capacity(SPEC, PROFILES)
    assert capacity["k_0"] == 2 * N_IMG * DIMS.hidden and capacity["text_v_0"] == 2 * TEXT * DIMS.hidden
    starts = {name: buf.data_ptr() for name, buf in engine._buffers.items()}
    for i, n in enumerate((20, 25, 32, 40, 64)):
        sizes = call_sizes(2, n, N_IMG - n, TEXT)
        feeds = feeds_for(sizes, seed=10 + i)
        got = engine(feeds)
        assert_outputs(got, feeds, sizes)
        assert all(got[name].data_ptr() == starts[name] for name in SPEC.output_names if got[name].numel())
    assert {name: buf.data_ptr() for name, buf in engine._buffers.items()} == starts  # nothing new allocated
    assert {name: buf.numel() for name, buf in engine._buffers.items()} == capacity


def test_profile_switches_only_when_the_profile_changes(world, tmp_path):
    engine = make_engine(tmp_path)
    for i, sizes in enumerate((DENSE, DENSE, SUBSET, SUBSET_REUSE, FULL_RATIO_REUSE, DENSE)):
        feeds = feeds_for(sizes, seed=20 + i)
        assert_outputs(engine(feeds), feeds, sizes)
    switches = [c[1] for c in world.calls if c[0] == "set_optimization_profile_async"]
    assert switches == [0, 1, 2, 0]


def test_fp16_engine_takes_fp32_feeds_and_keeps_timestep_fp32(world, tmp_path):
    engine = make_engine(tmp_path, "fp16")
    assert engine.dtypes["k_context_0"] == torch.float16 and engine.dtypes["timestep"] == torch.float32
    feeds = feeds_for(SUBSET, seed=4)
    got = engine(feeds)
    assert_outputs(got, feeds, SUBSET, torch.float16)


def test_only_asked_outputs_are_returned_but_all_are_bound(world, tmp_path):
    engine = make_engine(tmp_path)
    feeds = feeds_for(DENSE, seed=5)
    got = engine(feeds, outputs=["velocity_tokens"])
    assert list(got) == ["velocity_tokens"]
    assert all(engine.context.addresses.get(name) for name in SPEC.output_names)


def test_misaligned_input_views_are_copied(world, tmp_path):
    engine = make_engine(tmp_path)
    feeds = feeds_for(SUBSET, seed=6)
    backing = torch.randn(feeds["patches"].numel() + 1)
    feeds["patches"] = backing[1:].view(feeds["patches"].shape)  # 4 bytes past an aligned start
    assert feeds["patches"].data_ptr() % trt_double.ALIGNMENT
    assert_outputs(engine(feeds), feeds, SUBSET)


def test_private_stream_is_ordered_against_the_callers_stream(world, tmp_path):
    engine = make_engine(tmp_path)
    private, caller = engine.stream.cuda_stream, world.default[0].cuda_stream
    assert private not in trt_double.DEFAULT_HANDLES
    engine(feeds_for(DENSE))
    assert world.waits == [(private, caller), (caller, private)]
    assert [c[1] for c in world.calls if c[0] == "execute_async_v3"] == [private]
    assert world.current[0] is world.default[0]  # the caller's current stream is restored


def test_engine_on_a_second_device_makes_it_current(world, tmp_path):
    world.memory_device = 1
    engine = make_engine(tmp_path, device="cuda:1")
    assert engine.engine.device == 1 and engine.stream.device_index == 1
    feeds = feeds_for(DENSE, seed=7)
    assert_outputs(engine(feeds), feeds, DENSE)
    assert world.current_device == 0  # restored after the call


def test_a_shared_stream_can_be_passed_but_not_the_default_one(world, tmp_path):
    shared = torch.cuda.Stream(torch.device("cuda:0"))
    engine = make_engine(tmp_path, stream=shared)
    engine(feeds_for(DENSE))
    assert [c[1] for c in world.calls if c[0] == "execute_async_v3"] == [shared.cuda_stream]
    with pytest.raises(ConfigError, match="non-default"):
        make_engine(tmp_path, stream=torch.cuda.current_stream())


def _small_engine(tmp_path, device_memory=None, stream=None):
    dims = ModelDims.from_config(get_preset("tiny").small)
    spec, profiles = graph_spec("small", dims), graph_profiles("small", SHAPE, dims)
    return TrtEngine(trt_double.write_plan(tmp_path / "small.plan", spec, profiles, device_memory=device_memory), "small", dims, torch.device("cuda:0"), profiles, stream=stream)


def _assert_spec_outputs(engine, feeds, sizes):
    shapes = engine.spec.shapes(sizes)
    want = trt_double.reference_outputs(feeds, {n: shapes[n] for n in engine.spec.output_names})
    for name, value in engine(feeds).items():
        torch.testing.assert_close(value, want[name], msg=name)


def test_an_engine_alone_allocates_its_activation_memory_at_its_first_call(world, tmp_path):
    engine = make_engine(tmp_path)
    assert ("create_execution_context", "USER_MANAGED") in world.calls and engine.context.device_memory is None
    feeds = feeds_for(SUBSET, seed=4)
    assert_outputs(engine(feeds), feeds, SUBSET)  # the double scribbled over the block meanwhile
    assert engine.context.device_memory == (engine._activations.data_ptr(), engine.activation_bytes) and engine.activation_bytes == 4096 * DIMS.num_layers
    engine(feeds)
    assert sum(call[0] == "set_device_memory" for call in world.calls) == 1  # kept, not reallocated


def test_an_engine_set_shares_one_activation_block(world, tmp_path):
    """small and large never run in parallel: one block the larger one's size serves both, and
    alternating calls stay right though each call's activations overwrite the other's."""
    stream = torch.cuda.Stream(torch.device("cuda:0"))
    small, large = _small_engine(tmp_path, device_memory=1000, stream=stream), make_engine(tmp_path, stream=stream)
    block = tensorrt_backend.share_activation_memory([small, large])
    assert block.numel() == large.activation_bytes > small.activation_bytes
    assert small.context.device_memory == large.context.device_memory == (block.data_ptr(), large.activation_bytes)
    for seed in range(3):
        feeds = feeds_for(SUBSET, seed=seed)
        assert_outputs(large(feeds), feeds, SUBSET)
        _assert_spec_outputs(small, dummy_inputs(small.spec, DENSE, torch.float32, seed), DENSE)
    with pytest.raises(ConfigError, match="activation memory too small"):
        large.use_activation_memory(torch.empty(large.activation_bytes - 1, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="engines sharing activation memory must be on one device"):
        tensorrt_backend.share_activation_memory([large, make_engine(tmp_path, device="cuda:1")])


def test_callers_on_different_streams_are_ordered_for_the_shared_block_and_the_outputs(world, tmp_path):
    """A host may call from one stream, then another (``EngineSet.exclusive`` only stops calls at
    the same time): the shared block must not be used by two enqueues unordered, nor an engine's
    outputs overwritten while the stream of the call before may still read them."""
    stream = torch.cuda.Stream(torch.device("cuda:0"))
    small = _small_engine(tmp_path, device_memory=1000, stream=stream)
    large = make_engine(tmp_path, stream=stream)
    tensorrt_backend.share_activation_memory([small, large])
    a, b = torch.cuda.Stream(torch.device("cuda:0")), torch.cuda.Stream(torch.device("cuda:0"))
    for seed, (first, second) in enumerate([(a, b), (b, a), (a, a)]):
        with torch.cuda.stream(first):
            feeds = feeds_for(SUBSET, seed=seed)
            assert_outputs(large(feeds), feeds, SUBSET)
        with torch.cuda.stream(second):
            _assert_spec_outputs(small, dummy_inputs(small.spec, DENSE, torch.float32, seed), DENSE)
            large(feeds)  # overwrites the outputs the first stream received


def test_the_double_catches_unordered_reuse(world, tmp_path):
    """Engines on their own streams sharing a block, called from two streams: nothing orders the
    second enqueue after the first; and outputs rewritten without waiting for their reader."""
    small, large = _small_engine(tmp_path, device_memory=1000), make_engine(tmp_path)
    block = torch.empty(large.activation_bytes, dtype=torch.uint8)  # shared as share_activation_memory would, but on two streams
    small.use_activation_memory(block)
    large.use_activation_memory(block)
    a, b = torch.cuda.Stream(torch.device("cuda:0")), torch.cuda.Stream(torch.device("cuda:0"))
    with torch.cuda.stream(a):
        large(feeds_for(SUBSET))
    with torch.cuda.stream(b), pytest.raises(trt_double.PreconditionViolation, match="activation memory: in use by an enqueue"):
        small(dummy_inputs(small.spec, DENSE, torch.float32, 0))
    alone = make_engine(tmp_path)
    with torch.cuda.stream(a):
        alone(feeds_for(SUBSET))
    alone._last_caller = None  # the backend's memory of the previous caller, removed
    with torch.cuda.stream(b), pytest.raises(trt_double.PreconditionViolation, match="may still read them"):
        alone(feeds_for(SUBSET))


def test_a_refused_address_or_enqueue_names_this_calls_reason(world, tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    engine.logger.log(trt_double.ILogger.ERROR, "an old error from an earlier, refused call")
    monkeypatch.setattr(type(engine.context), "execute_async_v3", lambda self, stream: False)
    with pytest.raises(EngineRunError, match=r"execution of large failed \| got execute_async_v3 returned False"):
        engine(feeds_for(DENSE))
    monkeypatch.setattr(type(engine.context), "set_tensor_address", lambda self, name, memory: False)
    with pytest.raises(EngineRunError, match="TensorRT refused the address of patches"):
        engine(feeds_for(DENSE))


def test_infer_shapes_failure_is_one_line(world, tmp_path, monkeypatch):
    """The binding raises ``RuntimeError("infer_shapes error code: -1")`` when a dimension comes out
    negative (pyCore.cpp); it reaches the host as the toolkit's ShapeError, not a bare RuntimeError."""
    engine = make_engine(tmp_path)

    def refuse(self):
        raise RuntimeError("infer_shapes error code: -1")

    monkeypatch.setattr(type(engine.context), "infer_shapes", refuse)
    with pytest.raises(ShapeError, match=r"large: TensorRT cannot infer the shapes of this call in profile 0 \| got infer_shapes error code: -1"):
        engine(feeds_for(DENSE))


def test_a_shared_block_is_allocated_on_the_engines_stream(world, tmp_path, monkeypatch):
    """Made on the caller's stream, the block could be memory that stream's queued kernels still
    use while the engines' stream writes activations into it (setDeviceMemoryV2)."""
    stream, caller = torch.cuda.Stream(torch.device("cuda:0")), torch.cuda.Stream(torch.device("cuda:0"))
    small, large = _small_engine(tmp_path, device_memory=1000, stream=stream), make_engine(tmp_path, stream=stream)
    made_on, empty = [], torch.empty

    def recording_empty(*args, **kwargs):
        made_on.append(torch.cuda.current_stream(0).cuda_stream)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    with torch.cuda.stream(caller):
        tensorrt_backend.share_activation_memory([small, large])
    assert made_on == [stream.cuda_stream]


def test_the_backend_aligns_addresses_as_tensorrt_documents():
    """256 bytes (NvInferRuntime.h, setTensorAddress); the double's CPU tests run at 64, so this
    is where a change of the backend's constant would show."""
    assert tensorrt_backend.ADDRESS_ALIGNMENT == 256


def test_a_plan_built_with_detailed_profiling_runs_with_layer_names_only(world, tmp_path):
    """Plans built through Polygraphy's default (DETAILED) pay NVTX latency in every enqueueV3: the
    context lowers it, as TensorRT allows (never above what the plan was built with)."""
    engine = make_engine(tmp_path)  # the double's plans record DETAILED, as the older builds did
    assert engine.context.nvtx_verbosity == trt_double.ProfilingVerbosity.LAYER_NAMES_ONLY


def test_engines_sharing_a_block_must_share_a_stream(world, tmp_path):
    small, large = _small_engine(tmp_path, device_memory=1000), make_engine(tmp_path)
    with pytest.raises(ConfigError, match="one CUDA stream"):
        tensorrt_backend.share_activation_memory([small, large])
    with pytest.raises(ConfigError, match="stream on cuda:1"):
        make_engine(tmp_path, stream=torch.cuda.Stream(torch.device("cuda:1")))


def test_engines_from_a_folder_share_their_activation_memory(world, tmp_path, tiny_engine_dir, monkeypatch):
    from hs_runtime.backends import loading
    from hs_runtime.manifest import Manifest

    manifest = Manifest.load(tiny_engine_dir)
    manifest.data["build"]["backend"] = "tensorrt"  # the folder's profiles, served by double plans
    made = {}

    def load_engine(m, name, backend, device, stream=None):
        spec, profiles = graph_spec(name, m.dims(name)), m.graph(name)["profiles"]
        plan = trt_double.write_plan(tmp_path / f"{name}.plan", spec, profiles, device_memory={"small": 1000, "large": 3000}[name])
        made[name] = TrtEngine(plan, name, m.dims(name), device, profiles, stream=stream)
        return made[name]

    monkeypatch.setattr(loading, "load_engine", load_engine)
    loading.engines_from_manifest(manifest, "tensorrt", "cuda:0")
    assert made["small"].context.device_memory == made["large"].context.device_memory == (made["large"]._activations.data_ptr(), 3000)
    assert made["small"].stream is made["large"].stream  # one stream: the block's users run in order


def test_plans_built_for_another_gpu_architecture_or_tensorrt_are_refused_before_loading(world, tiny_engine_dir):
    """TensorRT plans run on the compute capability and TensorRT version that built them (no
    version or hardware compatibility at build): refused from the manifest's record, before any
    plan (or verify's torch reference) is loaded; another GPU model of the same capability loads."""
    from hs_runtime.backends.loading import check_loadable
    from hs_runtime.manifest import Manifest

    manifest = Manifest.load(tiny_engine_dir)
    manifest.data["build"]["backend"] = "tensorrt"
    record = {"gpu_name": "NVIDIA H200", "compute_capability": "9.0", "trt_version": "10.99.0-double"}  # the double: sm 9.0
    manifest.data["versions"]["build_device"] = record
    check_loadable(manifest, "tensorrt", "cuda:0")
    for changed, shown in (({"compute_capability": "8.0", "gpu_name": "NVIDIA A100"}, r"expected sm 8.0 \(NVIDIA A100\), TensorRT 10.99.0-double"), ({"trt_version": "10.13.0.35"}, r"expected sm 9.0 \(NVIDIA H200\), TensorRT 10.13.0.35")):
        manifest.data["versions"]["build_device"] = {**record, **changed}
        with pytest.raises(EngineLoadError, match=r"^the TensorRT plans of .* were built for another GPU architecture or TensorRT version \| got cuda:0: sm 9.0 \(NVIDIA Double GPU\), TensorRT 10.99.0-double \| " + shown + r" \| rebuild on this host: hs-export build .* --force$"):
            check_loadable(manifest, "tensorrt", "cuda:0")
    manifest.data["versions"].pop("build_device")  # folders without the record: the load decides
    check_loadable(manifest, "tensorrt", "cuda:0")


def test_tensorrt_older_than_10_1_is_refused_in_one_line(world, tmp_path, monkeypatch):
    import sys

    from hs_export.build.tensorrt import import_tensorrt

    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.0.1.6")
    for load in (lambda: make_engine(tmp_path), import_tensorrt):
        with pytest.raises(BuildError, match=r"TensorRT 10.0.1.6 is too old \| expected >= 10.1 \| pip install -U 'tensorrt>=10.1'"):
            load()


def test_a_plan_that_wants_a_tensor_in_host_memory_is_refused(world, tmp_path):
    """The backend binds device memory to every tensor; a kHOST tensor (a shape tensor) must not get it."""
    import json

    plan = trt_double.write_plan(tmp_path / "host.plan", SPEC, PROFILES)
    body = json.loads(plan.read_bytes()[len(trt_double.MAGIC):])
    body["inputs"][0]["location"] = "HOST"
    plan.write_bytes(trt_double.MAGIC + json.dumps(body).encode())
    with pytest.raises(EngineLoadError, match=re.escape(f"wants tensors in host memory | got ['{SPEC.inputs[0].name}']")):
        TrtEngine(plan, "large", DIMS, torch.device("cuda:0"), PROFILES)


def test_foreign_or_damaged_plans_are_refused_with_the_reason(world, tmp_path):
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"not a plan")
    with pytest.raises(EngineLoadError, match="Magic tag"):
        TrtEngine(bad, "large", DIMS, torch.device("cuda:0"), PROFILES)
    small = graph_spec("small", ModelDims.from_config(get_preset("tiny").small))
    other = trt_double.write_plan(tmp_path / "small.plan", small, graph_profiles("small", SHAPE, small.dims))
    with pytest.raises(EngineLoadError, match="not a large engine"):
        TrtEngine(other, "large", DIMS, torch.device("cuda:0"), PROFILES)


def test_plans_are_memory_mapped_not_read_into_a_private_copy(world, tmp_path, monkeypatch):
    """Triton instances loading one plan share its file-backed pages instead of each holding a copy."""
    import mmap

    given = []
    original = trt_double.Runtime.deserialize_cuda_engine
    monkeypatch.setattr(trt_double.Runtime, "deserialize_cuda_engine", lambda self, data: given.append(type(data)) or original(self, data))
    make_engine(tmp_path)
    assert given == [mmap.mmap]
    empty = tmp_path / "empty.plan"
    empty.write_bytes(b"")
    for path, reason in ((empty, "cannot mmap an empty file"), (tmp_path / "missing.plan", "No such file")):
        with pytest.raises(EngineLoadError, match=f"cannot read large engine {path} \\| .*{reason}"):
            TrtEngine(path, "large", DIMS, torch.device("cuda:0"), PROFILES)


def test_shapes_outside_every_profile_are_refused_before_tensorrt(world, tmp_path):
    engine = make_engine(tmp_path)
    with pytest.raises(ShapeError, match="outside the built profiles"):
        engine(feeds_for(call_sizes(4, 20, N_IMG - 20, TEXT)))


# ---------------------------------------------------------------- the rules, broken


def test_null_address_for_empty_tensors_is_caught(world, tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    monkeypatch.setattr(TrtEngine, "_address", lambda self, tensor, name=None: tensor.data_ptr())  # the old binding
    with pytest.raises(trt_double.PreconditionViolation, match="k_context_0.*null address"):
        engine(feeds_for(DENSE))


def test_an_output_sharing_an_address_is_caught(world, tmp_path, monkeypatch):
    """One dummy for every empty tensor (the old binding) put the empty text outputs of a
    text-reuse call on the address of its empty text input."""
    engine = make_engine(tmp_path)
    monkeypatch.setattr(TrtEngine, "dummy_address", lambda self, name: self._dummies.data_ptr())
    with pytest.raises(trt_double.PreconditionViolation, match="output text_k_0: bound to the address of encoder_hidden_states"):
        engine(feeds_for(SUBSET_REUSE))


def test_legacy_default_stream_is_caught(world, tmp_path):
    engine = make_engine(tmp_path)
    engine.stream = torch.cuda.current_stream()  # the old backend: the caller's (default) stream
    with pytest.raises(trt_double.PreconditionViolation, match="default stream"):
        engine(feeds_for(DENSE))


def test_missing_device_guard_is_caught(world, tmp_path, monkeypatch):
    world.memory_device = 1
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # never makes cuda:1 current
    engine = make_engine(tmp_path, device="cuda:1")
    with pytest.raises(trt_double.PreconditionViolation, match="device"):
        engine(feeds_for(DENSE))


def test_inputs_not_kept_for_the_stream_are_caught(world, tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    with pytest.raises(trt_double.PreconditionViolation, match="record_stream"):
        engine(feeds_for(SUBSET))


def test_wrong_profile_is_refused_by_set_input_shape(world, tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    monkeypatch.setattr(tensorrt_backend, "select_profile", lambda *a, **k: 0)  # dense profile for a subset call
    with pytest.raises(ShapeError, match="refused the shape of patches in profile 0"):
        engine(feeds_for(SUBSET))


def test_the_double_enforces_each_rule_on_direct_calls(world, tmp_path):
    trt = __import__("tensorrt")
    runtime = trt.Runtime(trt.ILogger())
    engine = runtime.deserialize_cuda_engine(trt_double.plan_bytes(SPEC, PROFILES))
    context = engine.create_execution_context()
    feeds = feeds_for(SUBSET)
    stream = torch.cuda.Stream()
    context.set_optimization_profile_async(1, stream.cuda_stream)
    for name in SPEC.input_names:
        assert context.set_input_shape(name, feeds[name].shape)
    assert context.infer_shapes() == []
    with pytest.raises(trt_double.PreconditionViolation, match="null address"):
        context.execute_async_v3(stream.cuda_stream)  # no addresses yet
    with pytest.raises(trt_double.PreconditionViolation, match="default stream"):
        context.execute_async_v3(0)
    with pytest.raises(trt_double.PreconditionViolation, match="without synchronisation"):
        context.execute_async_v3(torch.cuda.Stream().cuda_stream)
    assert not context.set_input_shape("patches", (2, 40, DIMS.patch_dim))  # 40 tokens: outside profile 1
    context.set_optimization_profile_async(2, stream.cuda_stream)  # forgets the shapes set before
    assert "patches" in context.infer_shapes()
    with pytest.raises(trt_double.PreconditionViolation, match="shape not set"):
        context.execute_async_v3(stream.cuda_stream)
    with pytest.raises(RuntimeError):
        context.set_optimization_profile_async(len(PROFILES), stream.cuda_stream)
    keep = torch.empty(64)
    for name in SPEC.input_names + SPEC.output_names:
        assert context.set_tensor_address(name, keep.data_ptr() + 4)  # taken; the alignment rule binds at enqueue
    context.set_optimization_profile_async(1, stream.cuda_stream)
    for name in SPEC.input_names:
        context.set_input_shape(name, feeds[name].shape)
    with pytest.raises(trt_double.PreconditionViolation, match="aligned"):
        context.execute_async_v3(stream.cuda_stream)
    with world.device_guard(1), pytest.raises(trt_double.PreconditionViolation, match="device"):
        context.execute_async_v3(stream.cuda_stream)
    with world.device_guard(1), pytest.raises(trt_double.PreconditionViolation, match="create_execution_context"):
        engine.create_execution_context()


# ---------------------------------------------------------------- build helpers (pure, and the Polygraphy call)


def test_builder_settings_are_strongly_typed_without_precision_flags():
    from hs_export.build.tensorrt import config_kwargs, network_kwargs

    for precision in ("fp32", "fp16", "bf16"):
        kwargs = config_kwargs(precision)
        assert not {"fp16", "bf16", "int8", "fp8", "precision_constraints"} & set(kwargs)
    assert config_kwargs("fp32")["tf32"] is False and config_kwargs("bf16")["tf32"] is True
    assert network_kwargs() == {"strongly_typed": True}


def test_timing_cache_is_keyed_by_gpu_capability_and_tensorrt():
    from hs_export.build.tensorrt import timing_cache_path

    a = timing_cache_path("NVIDIA H200", "9.0", "10.13.0.35")
    assert a.name == "trt_timing-nvidia-h200-sm9.0-trt10.13.0.35.cache"
    others = {timing_cache_path("NVIDIA A100-SXM4-80GB", "8.0", "10.13.0.35"), timing_cache_path("NVIDIA H200", "9.0", "11.1.0"), timing_cache_path("NVIDIA H200", "9.0", "10.13.0.35", root=a.parent / "x")}
    assert a not in others and len(others) == 3
    assert timing_cache_path("a/b c", "8.6", "10").parent == a.parent  # names cannot escape the folder


def test_device_fingerprint_reads_the_gpu_and_tensorrt(world):
    from hs_export.build.tensorrt import device_fingerprint, timing_cache_path

    fp = device_fingerprint()
    assert fp == {"gpu_name": "NVIDIA Double GPU", "compute_capability": "9.0", "trt_version": "10.99.0-double"}
    assert "nvidia-double-gpu-sm9.0-trt10.99.0-double" in timing_cache_path(**fp).name
    assert device_fingerprint("cuda:1") == fp


def _onnx_file(path, patches_type, timestep_type):
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("patches", patches_type, [2, "tokens", 64]), helper.make_tensor_value_info("timestep", timestep_type, [2]), helper.make_tensor_value_info("token_pos", TensorProto.INT64, [2, "tokens"])]
    outputs = [helper.make_tensor_value_info("velocity_tokens", patches_type, [2, "tokens", 64])]
    graph = helper.make_graph([helper.make_node("Identity", ["patches"], ["velocity_tokens"])], "g", inputs, outputs)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_build_plan_asks_polygraphy_for_a_strongly_typed_network(world, tmp_path, monkeypatch):
    import polygraphy.backend.trt as poly
    from onnx import TensorProto

    from hs_export.build.tensorrt import build_plan

    class HostMemory(bytearray):
        """Like TensorRT's IHostMemory: a buffer; a bytes() copy of a plan as large as the weights fails here."""

        def __bytes__(self):
            raise AssertionError("the plan was copied into bytes")

    seen = {}
    monkeypatch.setattr(poly, "network_from_onnx_path", lambda path, **kw: seen.setdefault("network", (path, kw)))
    monkeypatch.setattr(poly, "CreateConfig", lambda **kw: seen.setdefault("config", kw))
    monkeypatch.setattr(poly, "engine_bytes_from_network", lambda network, config, save_timing_cache: seen.setdefault("save", save_timing_cache) and HostMemory(b"plan"))
    onnx_path = _onnx_file(tmp_path / "large.onnx", TensorProto.FLOAT16, TensorProto.FLOAT)
    profiles = [{"patches": [[2, 1, 64], [2, 20, 64], [2, 64, 64]]}]
    cache = tmp_path / "cache" / "t.cache"
    out = build_plan(onnx_path, tmp_path / "engines" / "large.plan", "fp16", profiles, cache)
    assert out.read_bytes() == b"plan"
    assert seen["network"][1] == {"strongly_typed": True}
    assert not {"fp16", "bf16"} & set(seen["config"]) and seen["config"]["tf32"] is True
    # TensorRT's default NVTX verbosity, not Polygraphy's DETAILED (which slows every enqueueV3)
    assert seen["config"]["profiling_verbosity"] == trt_double.ProfilingVerbosity.LAYER_NAMES_ONLY
    assert seen["save"] == str(cache)


def test_build_plan_refuses_an_onnx_in_another_precision(world, tmp_path):
    from onnx import TensorProto

    from hs_export.build.tensorrt import build_plan

    fp32 = _onnx_file(tmp_path / "a.onnx", TensorProto.FLOAT, TensorProto.FLOAT)
    with pytest.raises(BuildError, match="patches is fp32.*fp16"):
        build_plan(fp32, tmp_path / "a.plan", "fp16", [], tmp_path / "c")
    half_time = _onnx_file(tmp_path / "b.onnx", TensorProto.FLOAT16, TensorProto.FLOAT16)
    with pytest.raises(BuildError, match="timestep is fp16"):
        build_plan(half_time, tmp_path / "b.plan", "fp16", [], tmp_path / "c")


# ---------------------------------------------------------------- real CUDA, TensorRT still the double
# On a GPU machine without TensorRT: torch's own devices, streams, allocator and 256-byte alignment,
# and the double's "kernels" run on the enqueue stream, so stream ordering is exercised for real.


@pytest.fixture
def real_world(monkeypatch):
    return trt_double.install_real_cuda(monkeypatch)


@pytest.mark.gpu
def test_real_cuda_every_kind_of_call(real_world, tmp_path):
    engine = make_engine(tmp_path)
    assert engine.stream.cuda_stream not in trt_double.DEFAULT_HANDLES
    assert torch.empty(2, 0, DIMS.hidden, device="cuda").data_ptr() == 0  # why the dummy exists
    starts = {name: buf.data_ptr() for name, buf in engine._buffers.items()}
    side = torch.cuda.Stream()
    cases = [DENSE, SUBSET, SUBSET_REUSE, FULL_RATIO_REUSE, call_sizes(2, 40, N_IMG - 40, TEXT), DENSE]
    for i, sizes in enumerate(cases):
        feeds = feeds_for(sizes, seed=30 + i)
        on_device = {n: f.cuda() for n, f in feeds.items()} if i % 2 else feeds  # host feeds are copied in
        with torch.cuda.stream(side if i >= 3 else torch.cuda.current_stream()):
            got = engine(on_device)
            got = {n: v.cpu() for n, v in got.items()}  # read on the caller's stream: ordered after the engine
        assert_outputs(got, feeds, sizes)
        assert engine.context.addresses["k_context_0"] != 0
    assert {name: buf.data_ptr() for name, buf in engine._buffers.items()} == starts
    assert [c[1] for c in real_world.calls if c[0] == "set_optimization_profile_async"] == [0, 1, 2, 0]


@pytest.mark.gpu
def test_real_cuda_fp16_engine_and_misaligned_views(real_world, tmp_path):
    engine = make_engine(tmp_path, "fp16")
    feeds = feeds_for(SUBSET, seed=40)
    on_device = {n: f.cuda() for n, f in feeds.items()}
    backing = torch.randn(feeds["patches"].numel() + 1, device="cuda")
    on_device["patches"] = backing[1:].view(feeds["patches"].shape)
    feeds["patches"] = on_device["patches"].cpu()
    assert on_device["patches"].data_ptr() % 256
    got = {n: v.cpu() for n, v in engine(on_device).items()}
    assert_outputs(got, feeds, SUBSET, torch.float16)


@pytest.mark.gpu
def test_real_cuda_null_address_is_caught(real_world, tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    monkeypatch.setattr(TrtEngine, "_address", lambda self, tensor, name=None: tensor.data_ptr())
    with pytest.raises(trt_double.PreconditionViolation, match="null address"):
        engine({n: f.cuda() for n, f in feeds_for(DENSE).items()})
