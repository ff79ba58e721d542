"""``torch`` backend: the exported graphs' own PyTorch modules.

The reference every other backend is checked against, and a fast path on GPUs without TensorRT.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..contract import VELOCITY, ModelDims
from ..graphs import build_graphs
from ..validation import check_device
from .base import EngineSet, precision_name


class TorchEngine:
    """Runs one graph module under ``torch.inference_mode``."""

    def __init__(self, module: torch.nn.Module, dims: ModelDims):
        self.module = module
        self.spec = module.spec
        self.dims = dims

    @torch.inference_mode()
    def __call__(self, feeds: Mapping[str, torch.Tensor], outputs: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        args = [feeds[name] for name in self.spec.input_names]
        wanted = set(outputs) if outputs is not None else set(self.spec.output_names)
        result = self.module.run(args, keep_kv=bool(wanted - {VELOCITY}))
        return {n: t for n, t in zip(self.spec.output_names, result) if n in wanted}


def _to(model, device, dtype):
    """Moves a model; casts only when needed (diffusers warns on every ``.to(dtype)``)."""
    model = model.to(device)
    if model.dtype != dtype:
        model = model.to(dtype)
    return model.eval()


def torch_engines(small, large, device="cpu", dtype=torch.float32) -> EngineSet:
    """An :class:`EngineSet` over a loaded small/large ``SD3Transformer2DModel`` pair."""
    device = check_device(device)
    small, large = (_to(m, device, dtype) for m in (small, large))
    dims = {"small": ModelDims.from_config(small.config), "large": ModelDims.from_config(large.config)}
    engines = {name: TorchEngine(module, dims[name]) for name, module in build_graphs(small, large).items()}
    return EngineSet(engines, device, dtype, "torch", precision_name(dtype))
