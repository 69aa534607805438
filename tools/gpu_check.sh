#!/usr/bin/env bash
# The GPU check in stages, each fitting one device command (<= 8 minutes), most valuable first:
#   1 build (sm_90a, CUDA kernels required) + import + build_info   (always runs first)
#   2 every GPU-relevant test file in its own process, time-capped, bad-input files last
#   3 compute-sanitizer memcheck/racecheck/synccheck/initcheck on a targeted set
#   4 the benchmark suite's logits-level ops at a published shape (ledger, plots, auto table)
#   5 the fused-linear GPU rows
# OUT_DIR gets four files: summary.md, gpu_check.log, results.tar, state.json.
#
#   bash tools/gpu_check.sh [--stages 1,2,3] [--dry-run] [--wheels DIR] OUT_DIR
#   bash tools/gpu_check.sh --dry-run OUT_DIR    # rehearse on CPU (CI runs this)
#
# No network on the GPU machine: wheels (docs/gpu.md) come with --wheels DIR or WHEELS=DIR.
# TORCH_CUDA_ARCH_LIST=8.0 builds for an A100 instead. Details: tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(command -v python3 || command -v python)
exec "$PY" tools/gpu_check.py "$@"
