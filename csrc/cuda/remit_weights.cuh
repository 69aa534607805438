// remit_weights kernel bodies: per-sequence centering of delta = b - a and the clipped scaled
// sigmoid w = clip(2 sigmoid(delta_hat), 1 - eps, 1 + eps) (METHODS.md section 2, steps 3-5),
// then the diagnostics, all on the device (no host synchronisation).
//
// One block per sequence (cu_seqlens segment): pass 1 sums delta over its valid positions, pass
// 2 writes w, delta_hat (and the per-token loss -w a for the fused remit_loss) and this
// sequence's 7 partial sums; a one-block kernel reduces those into the 6 diagnostics. O(N) work,
// negligible next to the [N, V] passes around it, so it favours fp64 sums and determinism
// (no atomics) over speed.
#pragma once

#include "cuda/row_ops.cuh"
#include "cuda/token_stats.cuh"

namespace remit::cuda {

constexpr int kWeightsThreads = 256;


__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

template <typename A>
__global__ void __launch_bounds__(kWeightsThreads) remit_weights_kernel(const WeightsParams<A> p) {
  __shared__ double scratch[32 * kPartials];
  const int64_t seg = blockIdx.x;
  // Offsets are clamped into [0, N] and made non-decreasing on the device: the Python layer
  // validates them, and checking here would need a host synchronisation. A malformed segment
  // reads and writes nothing outside the N tokens.
  auto clamp = [&](int64_t c) { return c < 0 ? int64_t{0} : (c > p.N ? p.N : c); };
  const int64_t begin = clamp(p.cu_seqlens[seg]);
  int64_t end = clamp(p.cu_seqlens[seg + 1]);
  end = end < begin ? begin : end;

  double sums[2] = {0.0, 0.0};  // sum delta, n valid
  for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) {
    if (load_target(p.targets, p.targets_i32, t) == p.ignore_index) continue;
    sums[0] += static_cast<double>(p.b[t] - p.a[t]);
    sums[1] += 1.0;
  }
  block_sum(sums, scratch);
  __shared__ A mu_shared;
  if (threadIdx.x == 0) {
    // mu_s over the valid positions only; a sequence with none contributes nothing.
    mu_shared = sums[1] > 0 ? static_cast<A>(sums[0] / sums[1]) : A(0);
  }
  __syncthreads();
  const A mu = mu_shared;

  double part[kPartials] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) {
    if (load_target(p.targets, p.targets_i32, t) == p.ignore_index) {
      p.w[t] = p.dhat[t] = A(0);
      if (p.loss != nullptr) p.loss[t] = -(A(0) * A(0));  // -0, as the CPU kernel's -(w * a)
      continue;
    }
    const A a = p.a[t], b = p.b[t];
    const A d = (b - a) - mu;
    const A raw = A(1) + tanh_acc(d / A(2));  // 2 sigmoid(d) without overflow
    // The comparisons are false for NaN, so a NaN log-prob survives the clip (as on the CPU).
    const A w = raw < p.lo ? p.lo : (raw > p.hi ? p.hi : raw);
    p.w[t] = w;
    p.dhat[t] = d;
    if (p.loss != nullptr) p.loss[t] = -(w * a);
    const double wd = w;
    part[0] += wd;
    part[1] += wd * wd;
    part[2] += w <= p.lo ? 1.0 : 0.0;
    part[3] += w >= p.hi ? 1.0 : 0.0;
    part[4] += fabs(static_cast<double>(d));
    part[5] += static_cast<double>(b) - static_cast<double>(a);
    part[6] += 1.0;
  }
  block_sum(part, scratch);
  if (threadIdx.x == 0) {
    for (int k = 0; k < kPartials; ++k) p.partial[seg * kPartials + k] = part[k];
  }
}

// One block: the diagnostics [mean w, std w, frac low, frac high, mean |delta_hat|, mean delta]
// over the valid tokens of the batch, from the per-sequence partial sums (fp64, fixed order).
template <typename A>
__global__ void __launch_bounds__(kWeightsThreads) remit_diag_kernel(const WeightsParams<A> p) {
  __shared__ double scratch[32 * kPartials];
  double tot[kPartials] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t s = threadIdx.x; s < p.S; s += blockDim.x) {
#pragma unroll
    for (int k = 0; k < kPartials; ++k) tot[k] += p.partial[s * kPartials + k];
  }
  block_sum(tot, scratch);
  if (threadIdx.x == 0) {
    const double inv = tot[6] > 0 ? 1.0 / tot[6] : 0.0;
    const double mean = tot[0] * inv;
    const double var = tot[1] * inv - mean * mean;
    p.diag[0] = static_cast<A>(mean);
    p.diag[1] = static_cast<A>(sqrt(var < 0 ? 0.0 : var));  // NaN stays NaN
    p.diag[2] = static_cast<A>(tot[2] * inv);
    p.diag[3] = static_cast<A>(tot[3] * inv);
    p.diag[4] = static_cast<A>(tot[4] * inv);
    p.diag[5] = static_cast<A>(tot[5] * inv);
  }
}

template <typename A>
cudaError_t launch_remit_weights(const WeightsParams<A>& p, cudaStream_t stream) {
  REMIT_LAUNCH(remit_weights_kernel<A>, static_cast<unsigned>(p.S), kWeightsThreads, stream)(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  REMIT_LAUNCH(remit_diag_kernel<A>, 1, kWeightsThreads, stream)(p);
  return cudaGetLastError();
}

}  // namespace remit::cuda
