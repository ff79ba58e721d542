"""Which modules of an SD3 transformer stay in fp32 inside an fp16/bf16 export, and how they do.

A strongly typed TensorRT network computes every layer in the type its ONNX file gives it, so the
precision of an engine is decided here, at export: the transformer is cast to fp16/bf16, the
modules of :func:`precision_plan` are cast back to fp32 by :func:`apply_precision_plan`, and the
casts at their edges export as ONNX ``Cast`` nodes that TensorRT obeys.

The plan follows NVIDIA's TensorRT Diffusion demo (github.com/NVIDIA/TensorRT, read at commit
a892d22, TensorRT 11.1):

* ``demo/Diffusion/demo_diffusion/model/diffusion_transformer.py``, ``SD3TransformerModel.get_model``:
  for ``--version 3.5-large`` it wraps ``transformer_blocks[35]`` in ``UpcastLayer`` (the block's
  weights in fp32, its inputs cast to fp32, its outputs cast back), at every reduced precision
  (the SD3.5 pipeline runs the transformer in fp16 by default, bf16 with ``--bf16``, and its fp8
  builds use bf16). Added with SD3.5 support in the TensorRT 10.11 release (commit 9255eb39); the
  demo gives no reason in code.
* SD3.5-medium (same class, ``--version 3.5-medium``): nothing kept in fp32.
* SD3-medium (``SD3_MMDiTModel``, the demo's own MMDiT in ``utils_sd3/``): the whole model in
  fp16; only the sinusoidal timestep embedding is computed in fp32
  (``utils_sd3/mmdit.py`` ``TimestepEmbedder.timestep_embedding``). Diffusers does the same by
  itself once ``timestep`` is fp32 (the contract keeps it fp32), so the plan names nothing.
* The demo builds strongly typed networks (``demo_diffusion/engine.py`` ``Engine.build``:
  ``polygraphy convert --strongly-typed``), never the fp16/bf16 builder flags.

So a plan is empty except for SD3.5-large (recognised by its published config: 38 blocks of 38
heads × 64, qk RMS norm, no dual attention), whose block 35 is kept in fp32 at fp16 and bf16.
"""

from __future__ import annotations

from typing import Mapping

import torch

from hs_runtime.backends.base import PRECISIONS
from hs_runtime.errors import ConfigError, describe
from hs_runtime.upcast import UPCAST_ATTR, cast_tree as _cast_tree, run_planned  # noqa: F401  (re-exported)


_DEMO_FILE = "NVIDIA/TensorRT demo/Diffusion/demo_diffusion/model/diffusion_transformer.py (SD3TransformerModel.get_model, UpcastLayer)"

# Configs the demo treats specially, by the fields that identify them, and the blocks it keeps in fp32.
_DEMO_FP32_BLOCKS = (
    (
        "sd3.5-large",
        {"num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64, "joint_attention_dim": 4096, "qk_norm": "rms_norm"},
        (35,),
    ),
)


def _matches(config: Mapping, fields: Mapping) -> bool:
    if tuple(config.get("dual_attention_layers") or ()):
        return False  # SD3.5-medium's layout: not SD3.5-large
    return all(config.get(key) == value for key, value in fields.items())


def precision_plan(config: Mapping, precision: str) -> list[dict]:
    """The modules of a diffusers ``SD3Transformer2DModel`` to keep in fp32 at ``precision``.

    Args:
        config: the transformer's config (a dict or diffusers ``FrozenDict``).
        precision: ``fp32``, ``fp16`` or ``bf16``.

    Returns:
        One JSON-ready entry per module, in model order:
        ``{"module": "transformer_blocks.35", "dtype": "fp32", "reason": …, "source": …}``.
        Empty at fp32, and for every model but SD3.5-large (NVIDIA's demo keeps nothing of
        SD3-medium or SD3.5-medium in fp32; see the module docstring).

    Raises:
        ConfigError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ConfigError(describe("unknown precision", got=repr(precision), expected=" | ".join(PRECISIONS)))
    if precision == "fp32":
        return []
    plan = []
    for model, fields, blocks in _DEMO_FP32_BLOCKS:
        if not _matches(config, fields):
            continue
        for index in blocks:
            plan.append({
                "module": f"transformer_blocks.{index}",
                "dtype": "fp32",
                "reason": (
                    f"NVIDIA's TensorRT Diffusion demo runs {model}'s transformer block {index} in fp32 at every reduced "
                    f"precision (its {precision} engines would otherwise compute this block in {precision})"
                ),
                "source": _DEMO_FILE,
            })
    return plan


def _float_dtype(module: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return default


def apply_precision_plan(model: torch.nn.Module, plan: list[dict]) -> list:
    """Makes each planned module of ``model`` compute in fp32 inside a reduced-precision model.

    Call it after casting ``model`` to fp16/bf16 (a later ``model.to(dtype)`` undoes it). Each
    module's parameters and buffers become fp32; forward pre/post hooks cast its floating-point
    inputs to fp32 and its floating-point outputs back to the model's dtype, so ``module(...)``
    calls run in fp32 and ``torch.onnx.export(dynamo=False)`` records them as ``Cast`` nodes.
    The contract's graphs call blocks through ``joint_block(block, …)``; they go through
    :func:`hs_runtime.upcast.run_planned`, which reads the ``hs_upcast`` attribute set here.

    Returns:
        The hook handles (``handle.remove()`` removes the hooks, not the fp32 weights).

    Raises:
        ConfigError: a plan entry names no module of ``model`` or an unsupported dtype.
    """
    handles = []
    for entry in plan:
        name = entry["module"]
        if entry.get("dtype", "fp32") != "fp32":
            raise ConfigError(describe(f"precision plan entry {name}: unsupported dtype", got=entry.get("dtype"), expected="fp32"))
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(describe("precision plan names no module of this model", got=name, fix="compute the plan from this model's config: precision_plan(model.config, precision)")) from exc
        outer = _float_dtype(module, torch.float32)
        if outer == torch.float32:
            outer = _float_dtype(model, torch.float32)
        module.to(torch.float32)
        setattr(module, UPCAST_ATTR, (torch.float32, outer))

        def pre_hook(mod, args, kwargs):
            return _cast_tree(args, torch.float32), _cast_tree(kwargs, torch.float32)

        def post_hook(mod, args, kwargs, output, outer=outer):
            return _cast_tree(output, outer)

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    return handles
