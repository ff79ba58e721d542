"""``hs-export verify``: every engine against its PyTorch graph, then one end-to-end run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hs_runtime.backends.loading import engines_from_manifest
from hs_runtime.contract import GRAPH_NAMES, GRAPH_SPECS
from hs_runtime.manifest import Manifest
from hs_runtime.plans import make_plan
from hs_runtime.sampler import StitchedSampler

from .bench import random_conditioning
from .onnx_export import check_parity, compare_outputs

E2E_RTOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}
GRAPH_RTOL_REDUCED = 2e-2  # fp16 / bf16 engines vs. the fp32 reference


@dataclass(frozen=True)
class Check:
    name: str
    max_abs: float
    rel: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.tolerance


def verify(folder, device="cpu", steps: int = 8, plan_name: str = "hybrid") -> list[Check]:
    """Runs the checks; returns them (callers decide how to fail)."""
    manifest = Manifest.load(folder)
    device = torch.device(device)
    precision = manifest.build["precision"]
    engines = engines_from_manifest(manifest, manifest.backend, device)
    reference = engines_from_manifest(manifest, "torch", device)
    shape = manifest.shape
    sizes = {"batch": shape.batch, "height": shape.latent_height, "width": shape.latent_width, "text_tokens": shape.text_tokens}
    io_dtype = engines.dtype
    checks = []
    for name in GRAPH_NAMES:
        module = reference[name].engine.module
        engine = engines[name]
        feeds_engine = _on_device(engine, device, io_dtype)
        parity = check_parity(name, module, feeds_engine, engine.dims, sizes, dtype=torch.float32, seed=11)
        tol = GRAPH_SPECS[name].rtol if precision == "fp32" else GRAPH_RTOL_REDUCED
        checks.append(Check(f"{name} vs torch", parity.max_abs, parity.rel, tol))
    plan = make_plan(plan_name, steps)
    large = manifest.dims("large")
    conditioning = random_conditioning(shape.prompts, shape.text_tokens, large.joint_attention_dim, large.pooled_projection_dim, "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(shape.prompts, manifest.dims("large").in_channels, shape.latent_height, shape.latent_width, generator=g)
    got = StitchedSampler(engines).denoise(plan, latents, conditioning).latents
    want = StitchedSampler(reference).denoise(plan, latents, conditioning).latents
    max_abs, rel = compare_outputs({"latents": want}, {"latents": got})
    checks.append(Check(f"end-to-end {plan_name}, {steps} steps", max_abs, rel, E2E_RTOL[precision]))
    return checks


def _on_device(engine, device, io_dtype):
    """Adapts fp32 CPU feeds to the engine's device and I/O dtype (timestep/int64 untouched)."""

    def run(feeds, outputs=None):
        moved = {}
        for spec in engine.spec.inputs:
            t = feeds[spec.name].to(device)
            moved[spec.name] = t.to(io_dtype) if spec.dtype == "float" else t
        return engine(moved, outputs)

    return run
