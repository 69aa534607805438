#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command, with no network (run from anywhere in
# the checkout on the GPU machine):
#   1. build the extension against this machine's CUDA torch (CUDA kernels on, sm_90a by default;
#      TORCH_CUDA_ARCH_LIST=8.0 for an A100);
#   2. the shared correctness tests on CUDA tensors (every backend: torch, triton, cuda);
#   3. compute-sanitizer memcheck over the CUDA backend's tests of each op (small shapes);
#   4. the benchmark suite (`python -m bench`): every op family at the published shapes, bf16
#      and fp32, against eager, torch.compile and, when installed, Liger-Kernel and Cut
#      Cross-Entropy: its ledger and summary, charts, and the backend="auto" table (the README
#      table is then one printed command away).
# Everything lands in OUT_DIR (logs of every step included). Every step runs; the exit status
# is the first failing step's. WHEELS=DIR installs the wheels in DIR first (offline: e.g. liger-kernel,
# cut-cross-entropy, downloaded elsewhere with `pip download --no-deps`).
#
#   bash tools/gpu_check.sh OUT_DIR [--quick]     # --quick: skip the benchmarks
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
OUT=$(cd "$OUT" && pwd)

if [ -n "${WHEELS:-}" ]; then
  echo "== wheels from $WHEELS"
  python -m pip install --no-index --no-deps "$WHEELS"/*.whl >"$OUT/wheels.log" 2>&1 \
    || { tail -n 30 "$OUT/wheels.log"; exit 1; }
fi
export REMIT_CUDA=ON  # fail the build, rather than build without kernels, if CUDA is missing

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -n 60 "$OUT/build.log"; exit 1; }
python -c 'import torch, remit_ext; i = remit_ext.build_info(); print(torch.__version__, torch.cuda.get_device_name(), i, remit_ext.available_backends()); assert i["cuda"], i' \
  | tee "$OUT/build_info.txt"

# Every step runs even when an earlier one failed (a failing test must not cost the
# benchmark data); the exit status is the first failing step's.
status=0
step() {  # step NAME LOG COMMAND...: run, tee to OUT/LOG, remember the first failure
  local name=$1 log=$2; shift 2
  echo "== $name"
  local rc=0
  "$@" 2>&1 | tee "$OUT/$log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "== $name FAILED (exit $rc); see $OUT/$log"
    [ "$status" -ne 0 ] || status=$rc
  fi
}

step "tests (GPU)" pytest.log python -m pytest -q -rs python_tests

# Small, ragged shapes only: memcheck slows kernels ~100x. -k cuda picks the tests parametrised
# with backend="cuda" plus the CUDA-only tests of test_cuda_build.py.
step "compute-sanitizer memcheck (CUDA backend tests)" memcheck.log \
  compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
  python -m pytest -q -x -p no:cacheprovider -k "cuda and not slow and not 64bit" \
    python_tests/test_cuda_build.py python_tests/test_token_stats.py \
    python_tests/test_weighted_ce.py python_tests/test_remit_weights.py \
    python_tests/test_remit_loss.py python_tests/test_pg_loss.py

if [ "$QUICK" != "--quick" ]; then
  step "benchmarks" bench.log python -m bench --out-dir "$OUT"
  LEDGER=$(ls -t "$OUT"/*.csv 2>/dev/null | head -n 1)
  if [ -n "$LEDGER" ]; then
    step "plots" plots.log python -m bench plot --csv "$LEDGER" --out-dir "$OUT/plots"
    cp remit_ext/data/auto_table.json "$OUT/auto_table.json"
    echo "   ledger $LEDGER: append its rows to bench/results/$(basename "$LEDGER"), then"
    echo "   python -m bench table --csv bench/results/$(basename "$LEDGER") --readme README.md"
  fi
fi
echo "== done: $OUT (exit $status)"
exit "$status"
