"""``hs-export verify``: file hashes, then every engine against its PyTorch graph, then one end-to-end run.

Parity inputs are made on the device of the torch reference (``--device``), so ``verify --device
cuda`` compares CUDA engines with CUDA modules. The torch reference runs first and its results wait
on the host while the engines run, so the two never hold the device's memory at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from hs_runtime.backends.loading import check_loadable, engines_from_manifest
from hs_runtime.contract import GRAPH_NAMES
from hs_runtime.errors import NumericalError, describe
from hs_runtime.manifest import Manifest
from hs_runtime.plans import make_plan
from hs_runtime.sampler import StitchedSampler
from hs_runtime.validation import check_device

from ..bench import random_conditioning
from .export import built_sizes, compare_outputs, compare_with_references, reference_outputs, release_memory

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
    shape = manifest.shape
    sizes = built_sizes(shape)  # whatever the backend: verify runs what a request runs
    large = manifest.dims("large")
    conditioning = random_conditioning(shape.prompts, shape.text_tokens, large.joint_attention_dim, large.pooled_projection_dim, "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(shape.prompts, large.in_channels, shape.latent_height, shape.latent_width, generator=g)
    runs = [(plan, "")]
    if "hybrid" in plan.actions:  # the cheaper settings change only hybrid steps
        runs.append((replace(plan, reuse_text_kv=True, small_outside_mask=True), " (text K/V reuse, small model outside the mask)"))

    # The torch reference first, its results kept on the host, then the engines: on a GPU the fp32
    # models (40 GiB at SD3.5-large + medium) and the engines (20 GiB) never share its memory.
    check_loadable(manifest, manifest.backend, device)  # a wrong device or no TensorRT: refused before the reference runs
    reference = engines_from_manifest(manifest, "torch", device)
    graph_references = {}
    for name in GRAPH_NAMES:
        module = reference[name].engine.module  # the torch graph, on `device`: feeds are made there
        graph_references[name] = (module.spec, reference_outputs(module, sizes, seed=11))
    run_references = []
    for run_plan, _ in runs:
        try:
            run_references.append(StitchedSampler(reference).denoise(run_plan, latents, conditioning).latents.cpu())
        except NumericalError as exc:
            run_references.append(str(exc))  # the message only: the exception's traceback would keep the models alive
    del reference, module
    release_memory(device)

    engines = engines_from_manifest(manifest, manifest.backend, device)
    for name in GRAPH_NAMES:
        spec, references = graph_references[name]
        parity = compare_with_references(engines[name], spec, references, sizes, device, seed=11, engine_dtype=engines.dtype)
        tol = spec.rtol if precision == "fp32" else GRAPH_RTOL_REDUCED
        problem = "NaN/inf in the engine's or the torch graph's outputs" if math.isnan(parity.rel) else None
        checks.append(Check(f"{name} vs torch ({parity.cases} kinds of call)", parity.max_abs, parity.rel, tol, problem))
    for (run_plan, label), expected in zip(runs, run_references):
        name = f"end-to-end {plan_name}, {steps} steps{label}"
        if isinstance(expected, str):
            checks.append(Check(name, math.nan, math.nan, E2E_RTOL[precision], problem=f"torch reference: {expected}"))
            return checks
        try:
            got = StitchedSampler(engines).denoise(run_plan, latents, conditioning).latents
        except NumericalError as exc:
            checks.append(Check(name, math.nan, math.nan, E2E_RTOL[precision], problem=f"engines: {exc}"))
            return checks
        max_abs, rel = compare_outputs({"latents": expected}, {"latents": got})
        checks.append(Check(name, max_abs, rel, E2E_RTOL[precision]))
    return checks
