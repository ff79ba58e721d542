"""The fp32-kept layers of reduced-precision exports: the plan (pure) and applying it to a model."""

import pytest
import torch

from hs_export.build.precision import UPCAST_ATTR, apply_precision_plan, precision_plan, run_planned
from hs_runtime.errors import ConfigError
from hs_runtime.presets import MODEL_CONFIGS, get_preset, random_transformer

TINY = get_preset("tiny").large


def test_plan_follows_nvidias_demo():
    for precision in ("fp16", "bf16"):
        (entry,) = precision_plan(MODEL_CONFIGS["sd3.5-large"], precision)
        assert entry["module"] == "transformer_blocks.35" and entry["dtype"] == "fp32"
        assert "demo" in entry["reason"] and "diffusion_transformer.py" in entry["source"]
    assert precision_plan(MODEL_CONFIGS["sd3.5-large"], "fp32") == []
    for name in ("sd3-medium", "sd3.5-medium"):
        assert precision_plan(MODEL_CONFIGS[name], "fp16") == []
    assert precision_plan(TINY, "fp16") == []
    with pytest.raises(ConfigError):
        precision_plan(TINY, "int8")


def _block_plan():
    return [{"module": "transformer_blocks.1", "dtype": "fp32", "reason": "test", "source": "test"}]


def test_planned_block_runs_in_fp32_inside_an_fp16_model():
    model = random_transformer(TINY, seed=0, dtype=torch.float16).eval()
    apply_precision_plan(model, _block_plan())
    block = model.transformer_blocks[1]
    assert all(p.dtype == torch.float32 for p in block.parameters())
    assert all(p.dtype == torch.float16 for p in model.transformer_blocks[0].parameters())
    assert getattr(block, UPCAST_ATTR) == (torch.float32, torch.float16)
    seen = {}
    block.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(dtype=kwargs["hidden_states"].dtype), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        out = model(
            hidden_states=torch.randn(2, 16, 16, 16, generator=g).half(),
            encoder_hidden_states=torch.randn(2, 8, TINY["joint_attention_dim"], generator=g).half(),
            pooled_projections=torch.randn(2, TINY["pooled_projection_dim"], generator=g).half(),
            timestep=torch.tensor([500.0, 20.0]),
        ).sample
    assert seen["dtype"] == torch.float32  # hooks run in registration order: the plan's cast came first
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_run_planned_casts_a_functional_call_through_the_block():
    model = random_transformer(TINY, seed=0, dtype=torch.float16)
    apply_precision_plan(model, _block_plan())
    block = model.transformer_blocks[1]

    def fn(b, x, pair, *, scale):
        assert x.dtype == pair[0].dtype == scale.dtype == torch.float32 and pair[1].dtype == torch.int64
        return b.norm2(x), [x.sum()]

    x = torch.randn(2, 3, block.norm2.normalized_shape[0]).half()
    out, (total,) = run_planned(block, fn, block, x, (x, torch.ones(2, dtype=torch.int64)), scale=torch.ones(1).half())
    assert out.dtype == total.dtype == torch.float16
    plain = run_planned(model.transformer_blocks[0], lambda v: v, x)  # not planned: untouched
    assert plain is x


def test_plan_exports_as_cast_nodes_around_fp32_weights(tmp_path):
    import onnx

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).half().eval()
    apply_precision_plan(model, [{"module": "2", "dtype": "fp32", "reason": "test"}])
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(2, 8).half(),), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    graph = onnx.load(str(path)).graph
    casts = [n for n in graph.node if n.op_type == "Cast"]
    targets = sorted(a.i for n in casts for a in n.attribute if a.name == "to")
    assert targets == sorted([onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16])
    types = {i.name: i.data_type for i in graph.initializer}
    assert types["2.weight"] == onnx.TensorProto.FLOAT and types["0.weight"] == onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_plan_naming_no_module_is_refused():
    model = random_transformer(TINY, seed=0, dtype=torch.float16)
    with pytest.raises(ConfigError, match="names no module"):
        apply_precision_plan(model, precision_plan(MODEL_CONFIGS["sd3.5-large"], "fp16"))
