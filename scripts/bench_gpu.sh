#!/usr/bin/env bash
# GPU latency benchmark at real SD3.5 sizes (random weights: latency does not depend on them).
#   SD3.5-large stitched with SD3.5-medium and with SD3-medium, 1024², 28 steps, CFG, bf16,
#   torch backend; TensorRT engines too where TensorRT imports.
# Appends dated tables to docs/benchmarks.md and writes JSON next to it.
# Usage: scripts/bench_gpu.sh [extra hs-export bench options, e.g. --repeat 5]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh needs a CUDA device')"
mkdir -p docs/bench
common=(--device cuda --dtype bf16 --steps 28 --warmup 1 --repeat 3 --height 1024 --width 1024 --markdown docs/benchmarks.md "$@")
for preset in sd3.5-large sd3.5-large+sd3-medium; do
  hs-export bench --preset "$preset" --backend torch "${common[@]}" \
    --sweep-ratio 0.1,0.2,0.3,0.4,0.5 --json "docs/bench/${preset}-torch.json" --plot "docs/bench/${preset}-torch-sweep.png"
  if python3 -c "import tensorrt" 2>/dev/null; then
    hs-export bench --preset "$preset" --backend tensorrt "${common[@]}" --json "docs/bench/${preset}-tensorrt.json"
  else
    echo "TensorRT not importable: skipping the TensorRT run for $preset" >&2
  fi
done
