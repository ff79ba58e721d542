#!/usr/bin/env bash
# One-shot GPU check (under 8 minutes on an H200, no disk beyond the repository):
#   scripts/bench_gpu.py: the torch backend on CUDA at SD3.5-large + SD3.5-medium sizes (random
#   bf16 weights made in GPU memory), every plan, 1024², 28 steps, CFG; CUDA parity of the graphs
#   and of the hybrid plan against the CPU; the TensorRT leg only where TensorRT imports.
# Appends a dated table to docs/benchmarks.md and writes JSON beside it.
# Usage: scripts/bench_gpu.sh [extra scripts/bench_gpu.py options, e.g. --repeat 3]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh needs a CUDA device')"
mkdir -p docs/bench
python3 scripts/bench_gpu.py --json "docs/bench/gpu-$(date +%F).json" --markdown docs/benchmarks.md "$@"
if python3 -c "import tensorrt" 2>/dev/null; then
  # TensorRT engines of the tiny preset, verified against the torch graphs on the GPU.
  hs-export build --preset tiny --backend tensorrt --precision bf16 --out engines/tiny-trt --force
  hs-export verify engines/tiny-trt --device cuda
fi
