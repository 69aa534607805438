// Small kernels that pin down the emulator's own semantics (emu.h), called from
// python_tests/test_cuda_emu.py: what the project's kernels rely on (per-block shared memory,
// barriers with exited threads dropping out, shuffles and votes) gives the GPU's results, and
// what is undefined on the GPU (divergent barriers, full-mask warp ops in a partial warp, a
// block that can never leave its barriers, bad launch shapes) is a launch error.
#include <cuda_runtime.h>

#include <cstdint>

#define EMU_API extern "C" __attribute__((visibility("default")))

namespace {

// out[block] = sum of in[block * blockDim + t] through shared memory and two barriers; threads
// past `n` return first (they drop out of the barriers).
__global__ void block_sum_kernel(const int* in, int n, int* out) {
  __shared__ int partial[1024];
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  partial[t] = in[i];
  __syncthreads();
  if (t == 0) {
    int s = 0;
    const int base = static_cast<int>(blockIdx.x * blockDim.x);
    for (int j = 0; j < static_cast<int>(blockDim.x) && base + j < n; ++j) {
      s += partial[j];
    }
    out[blockIdx.x] = s;
  }
  __syncthreads();
}

// out[t] = butterfly sum over the warp (each lane ends with the warp's total), any[t] =
// __any_sync(lane == 7 of warp 1), orv[t] = __syncthreads_or(t == blockDim - 1).
__global__ void warp_kernel(const float* in, float* out, int* any, int* orv) {
  const int t = threadIdx.x;
  float v = in[t];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[t] = v;
  any[t] = __any_sync(0xffffffffu, t == 32 + 7);
  orv[t] = __syncthreads_or(t == static_cast<int>(blockDim.x) - 1);
}

__global__ void divergent_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void deadlock_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void exit_during_shuffle_kernel(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

}  // namespace

EMU_API const char* selftest_error_message() { return emu::error_state().message.c_str(); }

EMU_API int selftest_block_sum(const int* in, int n, int threads, int* out) {
  REMIT_LAUNCH(block_sum_kernel, (n + threads - 1) / threads, threads, nullptr)(in, n, out);
  return static_cast<int>(cudaGetLastError());
}

EMU_API int selftest_warp(const float* in, int threads, float* out, int* any, int* orv) {
  REMIT_LAUNCH(warp_kernel, 1, threads, nullptr)(in, out, any, orv);
  return static_cast<int>(cudaGetLastError());
}

// 0 divergent barrier, 1 deadlock, 2 shuffle in a partial warp, 3 lane exits mid-shuffle,
// 4 a block of 1025 threads, 5 an empty grid.
EMU_API int selftest_bad(int which, float* buf) {
  int* ibuf = reinterpret_cast<int*>(buf);
  switch (which) {
    case 0: REMIT_LAUNCH(divergent_kernel, 1, 64, nullptr)(ibuf); break;
    case 1: REMIT_LAUNCH(deadlock_kernel, 1, 32, nullptr)(buf); break;
    case 2: REMIT_LAUNCH(partial_warp_kernel, 1, 48, nullptr)(buf); break;
    case 3: REMIT_LAUNCH(exit_during_shuffle_kernel, 1, 32, nullptr)(buf); break;
    case 4: REMIT_LAUNCH(partial_warp_kernel, 1, 1025, nullptr)(buf); break;
    case 5: REMIT_LAUNCH(partial_warp_kernel, 0, 32, nullptr)(buf); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
