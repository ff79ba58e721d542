"""Modules that run in fp32 inside a reduced-precision model (the layers a build keeps in fp32).

The build marks such a module with :data:`UPCAST_ATTR` (``hs_export/build/precision.py``); code
that runs the module through a function rather than its ``forward`` — the graphs call
``joint_block(block, …)`` — goes through :func:`run_planned`, which casts at the module's edges.
``Tensor.to`` casts export as ONNX ``Cast`` nodes, which a strongly typed TensorRT network obeys.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# The module attribute: (compute dtype, dtype of the surrounding model).
UPCAST_ATTR = "hs_upcast"


def cast_tree(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it (through tuples, lists, dicts) cast to
    ``dtype``; integer tensors (``token_pos``) and other objects unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(cast_tree(v, dtype) for v in value)
    if isinstance(value, list):
        return [cast_tree(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: cast_tree(v, dtype) for k, v in value.items()}
    return value


def run_planned(module: torch.nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` in ``module``'s planned precision: when the module is marked,
    floating-point tensors in the arguments are cast to its compute dtype and those in the result
    back to the model's dtype; otherwise a plain call."""
    marker = getattr(module, UPCAST_ATTR, None)
    if marker is None:
        return fn(*args, **kwargs)
    inner, outer = marker
    return cast_tree(fn(*cast_tree(args, inner), **cast_tree(kwargs, inner)), outer)
