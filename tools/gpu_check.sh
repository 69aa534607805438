#!/usr/bin/env bash
# Everything the CUDA backend needs a GPU for, in one command (run from the repository root on
# the GPU machine; no network needed):
#   1. build the extension against this machine's CUDA torch (CUDA kernels on, sm_90a by default);
#   2. the shared correctness tests on CUDA tensors (every backend: torch, triton, cuda);
#   3. compute-sanitizer memcheck over the CUDA backend's tests of each op;
#   4. the benchmarks, writing their CSV/markdown to OUT_DIR and the backend="auto" table.
# Logs of every step go to OUT_DIR. Exit status: the first failing step's.
#
#   bash tools/gpu_check.sh OUT_DIR [--quick]     # --quick: skip the benchmarks
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export REMIT_CUDA=ON  # fail the build, rather than build without kernels, if CUDA is missing

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -n 60 "$OUT/build.log"; exit 1; }
python -c 'import torch, remit_ext; i = remit_ext.build_info(); print(torch.__version__, torch.cuda.get_device_name(), i, remit_ext.available_backends()); assert i["cuda"], i' \
  | tee "$OUT/build_info.txt"

echo "== tests (GPU)"
python -m pytest -q -rs python_tests 2>&1 | tee "$OUT/pytest.log"

echo "== compute-sanitizer memcheck (CUDA backend tests)"
# Small, ragged shapes only: memcheck slows kernels ~100x. -k cuda picks the tests parametrised
# with backend="cuda" plus the CUDA-only tests of test_cuda_build.py.
compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
  python -m pytest -q -x -p no:cacheprovider -k "cuda and not slow and not 64bit" \
    python_tests/test_cuda_build.py python_tests/test_token_stats.py \
    python_tests/test_weighted_ce.py python_tests/test_remit_weights.py \
    python_tests/test_remit_loss.py 2>&1 | tee "$OUT/memcheck.log"

if [ "$QUICK" != "--quick" ]; then
  echo "== benchmarks"
  python bench/bench_triton_gpu.py --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
  cp remit_ext/data/auto_table.json "$OUT/auto_table.json"
fi
echo "== done: $OUT"
