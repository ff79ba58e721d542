"""Measures what a build costs at scale: peak resident memory, folder bytes, build time, and the
run-time peak of the runtime on the folder (the ``large`` and ``hybrid`` plans) — each in a fresh process.

The models are random ``SD3Transformer2DModel`` pairs saved with ``save_pretrained`` (the real
loading path). ``--size 445m`` is the issue-15 measurement (a 445 M-parameter large transformer,
12 layers × D 1024, with a 4-layer × 512 small one, 256², 32 text tokens); ``--size test`` is the
small pair the memory regression test uses.

    python scripts/measure_build_memory.py --size 445m --work /tmp/hs-mem --json docs/build_memory_445m.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # issue 15: SD3Transformer2DModel(num_layers=12, attention_head_dim=64, num_attention_heads=16, ...)
    "445m": dict(large=(12, 16), small=(4, 8), height=256, text_tokens=32, bench_steps=4),
    "test": dict(large=(6, 8), small=(2, 4), height=128, text_tokens=16, bench_steps=4),
    # the largest pair measured on the 24 GiB development host: 16 layers × D 1280 (0.93 B), with the 445m small one
    "1b": dict(large=(16, 20), small=(4, 8), height=256, text_tokens=32, bench_steps=4),
}

CHILD = r"""
import json, sys, time, psutil
from hs_export.build import BuildConfig, build, resolve_models
from hs_export.build.builder import peak_rss
import onnxruntime, diffusers  # imported before the baseline: they are the fixed cost
baseline = psutil.Process().memory_info().rss
start = time.perf_counter()
args = json.loads(sys.argv[1])
selection = resolve_models(None, args["small"], args["large"], None, log=lambda *_: None)
build(selection, BuildConfig(out=args["out"], height=args["height"], width=args["height"], text_tokens=args["text_tokens"], precision=args["precision"], force=True), log=print)
print("RESULT " + json.dumps({"baseline": baseline, "peak": peak_rss(), "seconds": time.perf_counter() - start}))
"""

BENCH_CHILD = r"""
import json, sys, psutil, torch
from hs_runtime import Conditioning, HybridStitchRuntime, make_plan
from hs_export.build.builder import peak_rss
baseline = psutil.Process().memory_info().rss
folder, steps = sys.argv[1], int(sys.argv[2])
runtime = HybridStitchRuntime.from_dir(folder)
shape, dims = runtime.manifest.shape, runtime.manifest.dims("large")
g = torch.Generator().manual_seed(0)
embeds = lambda: torch.randn(shape.prompts, shape.text_tokens, dims.joint_attention_dim, generator=g)
pooled = lambda: torch.randn(shape.prompts, dims.pooled_projection_dim, generator=g)
conditioning = Conditioning(embeds(), pooled(), embeds(), pooled())
latents = torch.randn(shape.prompts, dims.in_channels, shape.latent_height, shape.latent_width, generator=g)
for name in ("large", "hybrid"):
    runtime.denoise(make_plan(name, steps), latents, conditioning)
print("RESULT " + json.dumps({"baseline": baseline, "peak": peak_rss()}))
"""


def make_pair(work: Path, size: dict) -> tuple[Path, Path, int]:
    """Saves a random small/large pair under ``work`` (once); returns their folders and the fp32
    bytes of both."""

    paths, total = [], 0
    for role, (layers, heads) in (("small", size["small"]), ("large", size["large"])):
        path = work / role
        if not (path / "config.json").is_file():
            import torch
            from diffusers import SD3Transformer2DModel

            torch.manual_seed(0 if role == "small" else 1)
            model = SD3Transformer2DModel(
                num_layers=layers, attention_head_dim=64, num_attention_heads=heads, caption_projection_dim=heads * 64,
                joint_attention_dim=256, pooled_projection_dim=128, pos_embed_max_size=64, sample_size=32,
            )
            model.save_pretrained(path)
            del model
        total += sum(p.stat().st_size for p in path.glob("*.safetensors"))
        paths.append(path)
    return paths[0], paths[1], total


def _result(output: str) -> dict:
    line = next(l for l in output.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def estimate(small: Path, large: Path, out: Path, size: dict, precision: str) -> dict:
    """What ``hs-export build --dry-run`` says the same build needs (host memory, folder)."""
    from hs_export.build import BuildConfig, resolve_models
    from hs_export.build.builder import plan_build

    selection = resolve_models(None, str(small), str(large), None, log=lambda *_: None)
    needs = plan_build(selection, BuildConfig(out=out, height=size["height"], width=size["height"], text_tokens=size["text_tokens"], precision=precision)).needs
    return {"estimate_host_bytes": needs.host_bytes, "estimate_folder_bytes": needs.folder_bytes}


def measure(size_name: str, work: Path, bench: bool = True, log=print, precision: str = "fp32") -> dict:
    """Builds the ``size_name`` pair in ``precision`` (ONNX Runtime) in a fresh process and
    measures it, beside the build's own estimate of the same build."""
    size = SIZES[size_name]
    work.mkdir(parents=True, exist_ok=True)
    # Each in a process of its own, whose peak (VmHWM: builder.peak_rss) counts that process alone.
    subprocess.run([sys.executable, __file__, "--make-pair", "--size", size_name, "--work", str(work)], check=True)
    small, large, weights = make_pair(work, size)  # already saved: only reads sizes
    out = work / "engines"
    args = json.dumps({"small": str(small), "large": str(large), "out": str(out), "height": size["height"], "text_tokens": size["text_tokens"], "precision": precision})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"build failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.stdout[-2000:]}")
    for line in proc.stdout.splitlines():
        if not line.startswith("RESULT "):
            log(line)
    built = _result(proc.stdout)
    folder = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {
        "size": size_name, "precision": precision, "weights_bytes_fp32": weights, **estimate(small, large, out, size, precision), "build_peak_rss": built["peak"], "build_baseline_rss": built["baseline"],
        "build_seconds": built["seconds"], "build_wall_seconds": time.perf_counter() - start, "folder_bytes": folder,
    }
    result["build_peak_over_weights"] = built["peak"] / weights
    result["build_growth_over_weights"] = (built["peak"] - built["baseline"]) / weights
    result["folder_over_weights"] = folder / weights
    if bench:
        proc = subprocess.run([sys.executable, "-c", BENCH_CHILD, str(out), str(size["bench_steps"])], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench failed: {proc.stderr.strip()[-2000:]}")
        ran = _result(proc.stdout)
        result.update(bench_peak_rss=ran["peak"], bench_baseline_rss=ran["baseline"], bench_peak_over_weights=ran["peak"] / weights)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--size", choices=sorted(SIZES), default="445m")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="export precision (the parity check still loads each model in fp32)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hs-build-memory"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--clean", action="store_true", help="remove --work afterwards")
    parser.add_argument("--make-pair", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_pair:
        make_pair(args.work, SIZES[args.size])
        return
    result = measure(args.size, args.work, bench=not args.no_bench, precision=args.precision)
    gib = 2**30
    print(f"weights (fp32, both models) {result['weights_bytes_fp32'] / gib:.2f} GiB")
    print(f"build: peak RSS {result['build_peak_rss'] / gib:.2f} GiB = {result['build_peak_over_weights']:.2f}× weights "
          f"(growth over the {result['build_baseline_rss'] / gib:.2f} GiB after imports: {result['build_growth_over_weights']:.2f}×), {result['build_seconds']:.0f} s")
    print(f"estimate (build --dry-run): host memory {result['estimate_host_bytes'] / gib:.2f} GiB (measured peak {result['build_peak_rss'] / gib:.2f}), folder {result['estimate_folder_bytes'] / gib:.2f} GiB")
    print(f"folder: {result['folder_bytes'] / gib:.2f} GiB = {result['folder_over_weights']:.2f}× weights")
    if "bench_peak_rss" in result:
        print(f"bench: peak RSS {result['bench_peak_rss'] / gib:.2f} GiB = weights + {(result['bench_peak_rss'] - result['weights_bytes_fp32']) / gib:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
