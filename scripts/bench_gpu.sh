#!/usr/bin/env bash
# One-shot GPU check (under 8 minutes on an H200, no disk beyond the repository):
#   scripts/bench_gpu.py: the torch backend on CUDA at SD3.5-large + SD3.5-medium sizes (random
#   bf16 weights made in GPU memory), every plan, 1024², 28 steps, CFG; CUDA parity of the graphs
#   and of the hybrid plan against the CPU (non-zero exit past 1e-4); the TensorRT leg only where
#   TensorRT imports.
# Writes gpu-DATE.json and gpu-DATE.md after every stage to $HS_BENCH_OUT, else $OUT (the folder a
# lent device machine sends back), else docs/bench; copy the Markdown into docs/benchmarks.md.
# Runs from a copied, uninstalled repository: diffusers, if absent, comes from .whl/diffusers-*.whl
# (pure Python; `pip download diffusers==0.42.1 --no-deps -d .whl` on a machine with a network).
# Usage: scripts/bench_gpu.sh [extra scripts/bench_gpu.py options, e.g. --repeat 3]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh needs a CUDA device')"
if ! python3 -c "import diffusers" 2>/dev/null; then
  wheel=$(ls .whl/diffusers-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    echo "bench_gpu.sh needs diffusers (the random SD3 transformers are diffusers models): pip install diffusers, or put its wheel in .whl/ (pip download diffusers==0.42.1 --no-deps -d .whl)" >&2
    exit 1
  fi
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --target "$site" "$wheel"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import diffusers" || { echo "bench_gpu.sh: $wheel installed but diffusers does not import (see above)" >&2; exit 1; }
fi
out="${HS_BENCH_OUT:-${OUT:-docs/bench}}"
python3 scripts/bench_gpu.py --out "$out" "$@"
if python3 -c "import tensorrt" 2>/dev/null; then
  # TensorRT engines of the tiny preset, verified against the torch graphs on the GPU
  # (python3 -m: the repository may be copied, not installed, so no hs-export on PATH).
  python3 -m hs_export.cli build --preset tiny --backend tensorrt --precision bf16 --out engines/tiny-trt --force
  python3 -m hs_export.cli verify engines/tiny-trt --device cuda
fi
echo "bench_gpu.sh: results in $out"
