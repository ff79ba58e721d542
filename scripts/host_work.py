"""How much of a denoise is the sampler's own host work: the figure behind docs/benchmarks.md
("The sampler's host work at 256 image tokens").

Each plan is denoised on the folder's engines, then again with every engine call answered from
the outputs the first call of the same shapes returned (the inputs still converted as
``OrtEngine`` converts them), alternating round by round. The second time is the host work alone:
guidance, Euler, patchify, the mask, the K/V gathers, the feeds and the finite check; ONNX
Runtime's own Python wrapper around ``run`` is not in it.

    python3 scripts/host_work.py engines/shapes256 [--plans large,hybrid] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hs_export.bench import random_conditioning
from hs_runtime.contract import LARGE, SMALL
from hs_runtime.plans import make_plan
from hs_runtime.runtime import HybridStitchRuntime
from hs_runtime.sampler import StitchedSampler


class Timed:
    """An engine whose calls' wall time is added up (``seconds``)."""

    def __init__(self, engine):
        self.engine, self.spec, self.dims, self.device = engine, engine.spec, engine.dims, engine.device
        self.seconds = 0.0

    def __call__(self, feeds, outputs=None):
        start = time.perf_counter()
        try:
            return self.engine(feeds, outputs)
        finally:
            self.seconds += time.perf_counter() - start


class Replay:
    """An engine that answers every call with the outputs its engine gave the first call of the
    same input shapes and requested outputs."""

    def __init__(self, engine):
        self.engine, self.spec, self.dims, self.device = engine, engine.spec, engine.dims, engine.device
        self.answers: dict = {}
        self.seconds = 0.0  # its calls are the host work being measured

    def __call__(self, feeds, outputs=None):
        key = (tuple(tuple(feeds[n].shape) for n in self.spec.input_names), tuple(outputs or ()))
        if key not in self.answers:
            self.answers[key] = {name: value.clone() for name, value in self.engine(feeds, outputs).items()}
        for name in self.spec.input_names:  # the host side of OrtEngine.__call__
            feeds[name].detach().cpu().numpy()
        return dict(self.answers[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--plans", default="large,hybrid")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    args = parser.parse_args()

    runtime = HybridStitchRuntime.from_dir(args.folder, backend="onnxruntime")
    engines = runtime.engines
    dims = engines[LARGE].dims
    shape = runtime.manifest.shape  # the build's latent size and text tokens
    height, width = shape.latent_height, shape.latent_width
    conditioning = random_conditioning(1, shape.text_tokens, dims.joint_attention_dim, dims.pooled_projection_dim, engines.device, 0)
    latents = torch.randn(1, dims.in_channels, height, width, generator=torch.Generator().manual_seed(0))
    sampler = StitchedSampler(engines, args.guidance_scale)
    checked = {role: engines[role] for role in (SMALL, LARGE)}  # ProfileCheckedEngine wrappers
    real = {role: Timed(wrapper.engine) for role, wrapper in checked.items()}
    replay = {role: Replay(engine) for role, engine in real.items()}

    def denoise(plan, inner) -> tuple[float, float]:
        """The denoise's wall time and the part of it outside the engine calls."""
        for role, wrapper in checked.items():
            wrapper.engine = inner[role]
            wrapper.engine.seconds = 0.0
        start = time.perf_counter()
        sampler.denoise(plan, latents, conditioning)
        total = time.perf_counter() - start
        return total, total - sum(e.seconds for e in inner.values())

    plans = {name: make_plan(name, args.steps) for name in args.plans.split(",")}
    for plan in plans.values():  # warm both, and fill the replay's answers
        denoise(plan, real), denoise(plan, replay)
    rows = {name: [] for name in plans}  # per round: (denoise, outside the calls, host work alone)
    for r in range(args.rounds):
        order = list(plans.items())[:: 1 if r % 2 == 0 else -1]
        for name, plan in order:
            rows[name].append((*denoise(plan, real), denoise(plan, replay)[0]))
    print(f"{args.folder}: {height}×{width} latent, {args.steps} steps, medians of {args.rounds} rounds; shares of the denoise")
    for name, runs in rows.items():
        full, outside, alone = (statistics.median(column) for column in zip(*runs))
        share = lambda i: 100 * statistics.median(run[i] / run[0] for run in runs)  # noqa: E731
        print(f"  {name:8s} denoise {full * 1e3:8.1f} ms   outside the engine calls {outside * 1e3:6.1f} ms ({share(1):.1f}%)   host work alone {alone * 1e3:6.1f} ms ({share(2):.1f}%)")


if __name__ == "__main__":
    main()
