"""``hs-export verify``: file hashes, then every engine against its PyTorch graph, then one end-to-end run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hs_runtime.backends.loading import engines_from_manifest
from hs_runtime.contract import GRAPH_NAMES, GRAPH_SPECS
from hs_runtime.errors import NumericalError, describe
from hs_runtime.manifest import Manifest
from hs_runtime.plans import make_plan
from hs_runtime.sampler import StitchedSampler
from hs_runtime.validation import check_device

from ..bench import random_conditioning
from .export import check_parity, compare_outputs

E2E_RTOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}
GRAPH_RTOL_REDUCED = 2e-2  # fp16 / bf16 engines vs. the fp32 reference


@dataclass(frozen=True)
class Check:
    """One line of the verify table.

    Attributes:
        problem: a failure that is not a number past tolerance (a file whose hash differs,
            NaN/inf outputs); ``None`` when there is none.
        numeric: whether ``max_abs``/``rel``/``tolerance`` mean anything (not for file checks).
        fix: how to repair what this check found.
    """

    name: str
    max_abs: float = 0.0
    rel: float = 0.0
    tolerance: float = 0.0
    problem: str | None = None
    numeric: bool = True
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.rel <= self.tolerance  # NaN fails: nan <= x is False

    def row(self) -> tuple[str, str, str, str, str]:
        """The table cells: check, max abs, relative, tolerance, result."""
        numbers = (f"{self.max_abs:.2e}", f"{self.rel:.2e}", f"{self.tolerance:g}") if self.numeric else ("—",) * 3
        result = "ok" if self.ok else ("FAIL: " + self.problem if self.problem else "FAIL")
        return (self.name, *numbers, result)


def failure_message(checks: list[Check]) -> str | None:
    """One line for the failed checks (``None`` if all passed)."""
    failed = [c for c in checks if not c.ok]
    if not failed:
        return None
    what = "; ".join(f"{c.name} ({c.problem})" if c.problem else f"{c.name} past tolerance" for c in failed)
    return describe("verification failed", got=what, fix=next((c.fix for c in failed if c.fix), None))


def file_checks(manifest: Manifest) -> list[Check]:
    """sha256 of every file against the build's record, one check per file."""
    if not manifest.artifacts:
        return [Check("sha256: no records (built before they existed; a --force rebuild adds them)", numeric=False)]
    return [Check(path, problem=problem, numeric=False, fix=manifest.damaged_fix) for path, problem in manifest.hash_problems()]


def verify(folder, device="cpu", steps: int = 8, plan_name: str = "hybrid") -> list[Check]:
    """Runs the checks; returns them (callers decide how to fail).

    File hashes come first; if any file differs from the build, the engines are not run.
    """
    plan = make_plan(plan_name, steps)
    device = check_device(device)
    manifest = Manifest.load(folder)
    checks = file_checks(manifest)
    if not all(c.ok for c in checks):
        return checks
    precision = manifest.build["precision"]
    engines = engines_from_manifest(manifest, manifest.backend, device)
    reference = engines_from_manifest(manifest, "torch", device)
    shape = manifest.shape
    sizes = {"batch": shape.batch, "height": shape.latent_height, "width": shape.latent_width, "text_tokens": shape.text_tokens}
    io_dtype = engines.dtype
    for name in GRAPH_NAMES:
        module = reference[name].engine.module
        engine = engines[name]
        feeds_engine = _on_device(engine, device, io_dtype)
        parity = check_parity(name, module, feeds_engine, engine.dims, sizes, dtype=torch.float32, seed=11)
        tol = GRAPH_SPECS[name].rtol if precision == "fp32" else GRAPH_RTOL_REDUCED
        problem = "NaN/inf in the engine's or the torch graph's outputs" if math.isnan(parity.rel) else None
        checks.append(Check(f"{name} vs torch", parity.max_abs, parity.rel, tol, problem))
    large = manifest.dims("large")
    conditioning = random_conditioning(shape.prompts, shape.text_tokens, large.joint_attention_dim, large.pooled_projection_dim, "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(shape.prompts, large.in_channels, shape.latent_height, shape.latent_width, generator=g)
    name = f"end-to-end {plan_name}, {steps} steps"
    results = {}
    for label, engine_set in (("engines", engines), ("torch reference", reference)):
        try:
            results[label] = StitchedSampler(engine_set).denoise(plan, latents, conditioning).latents
        except NumericalError as exc:
            checks.append(Check(name, math.nan, math.nan, E2E_RTOL[precision], problem=f"{label}: {exc}"))
            return checks
    max_abs, rel = compare_outputs({"latents": results["torch reference"]}, {"latents": results["engines"]})
    checks.append(Check(name, max_abs, rel, E2E_RTOL[precision]))
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
