// Device primitives shared by every CUDA kernel of remit_ext: dtype plumbing, 128-bit row
// access with an alignment peel, the online-softmax state and its warp/block reductions.
//
// This header (and every other .cuh here) includes CUDA headers only, never torch: the kernel
// bodies compile with a bare nvcc. kernels.cu instantiates them all; tools/nvcc_check.py compiles
// it for sm_80 and sm_90a on machines without a CUDA torch. The torch glue is in the other .cu.
//
// The data flow, by file:  token_stats.cuh (lse, log-prob, entropy; policy + scorer rows)  ->
// remit_weights.cuh (segmented centering, clipped sigmoid, diagnostics)  ->  ce_grad.cuh
// (coef * (softmax - onehot), optionally in place). The numerics follow csrc/cpu/row_ops.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"

// The two constructs host C++ cannot parse, behind macros so that tools/cuda_emu/emu.h (forced in
// with -include when the kernels are built as host code for the emulation tests) can supply
// host versions; nvcc always takes these definitions. A `<<<` launch or an `asm` statement written
// outside them fails the emulation build (g++ rejects both), so none slips through untranslated.
#ifndef REMIT_CUDA_EMU
// kernel<<<grid, block, 0, stream>>>: REMIT_LAUNCH(kernel, grid, block, stream)(args...).
#define REMIT_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace remit::cuda {

// ------------------------------------------------------------------------------ dtypes


__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}
template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return static_cast<A>(NAN);
}
__device__ __forceinline__ bool is_finite(float x) { return isfinite(x); }
__device__ __forceinline__ bool is_finite(double x) { return isfinite(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }
__device__ __forceinline__ float expm1_acc(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_acc(double x) { return expm1(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float abs_acc(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_acc(double x) { return fabs(x); }
// |x| times the machine epsilon of its type: an ulp of x, within a factor 2.
__device__ __forceinline__ float ulp_bound(float x) { return fabsf(x) * 1.1920928955078125e-7f; }
__device__ __forceinline__ double ulp_bound(double x) { return fabs(x) * 2.220446049250313e-16; }

// The part of LSE that a saved lse = m + log s lost to rounding, LSE = lse + delta (up to half
// an ulp of lse: 2.4e-4 at |lse| ~ 5e3 in fp32, a relative error of every e^{x - lse}). The
// forward's log-prob a = (x_y - m) - log s is an O(1) number that kept those digits, and
// x_y - a = m + log s: delta = (x_y - lse) - a, off by ~an ulp of a. Taken only where that is
// finer than lse's ulp (|a| <= |lse| / 2) and where it is a rounding (a pair from one forward);
// 0 for a caller's unrelated pair or a non-finite x_y or a. As csrc/cpu/row_ops.h.
template <typename A>
__device__ __forceinline__ A lse_rounding(A lse, A logprob, A x_y) {
  const A delta = (x_y - lse) - logprob;
  const bool finer = abs_acc(logprob) <= abs_acc(lse) * A(0.5);
  return finer && abs_acc(delta) <= ulp_bound(lse) ? delta : A(0);
}

// v / temperature as the kernels use it: the product rounded to A before any other use. Under
// nvcc's default -fmad=true (NVPTX fuses aggressively, even a product with other uses) a plain
// `x * scale - m` becomes fma(x, scale, -m): for the row's maximum that is the rounding error of
// x * scale instead of 0, so the maximum is missed as `top`, s - 1 is formed as below - 1 with
// cancellation (it can come out negative: a positive log-prob) and the log1p trick is lost on
// confident rows. __fmul_rn / __dmul_rn are never contracted; the CPU kernels likewise round the
// scaled row first (csrc/cpu/rows.cpp is compiled with -ffp-contract=off).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
template <typename T>
__device__ __forceinline__ acc_t<T> scaled(T v, acc_t<T> scale) {
  return mul_rn(to_acc(v), scale);
}

// e^d for the d <= 0 the kernels form (d = x - max or x - lse; -inf gives 0, NaN stays NaN).
// bf16/fp16 rows use the hardware ex2 (2 ulp): their inputs carry 2^-8 / 2^-11 relative error,
// and the exp is what bounds these kernels on H100 once memory is saturated. fp32 rows keep the
// libm-grade expf so that fp32 results stay as close to fp64 as PyTorch's own fp32 math.
#ifndef REMIT_CUDA_EMU
// 2^x by the MUFU unit (ex2.approx.ftz: subnormal input and output flushed to 0).
__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
#endif
template <typename T>
struct RowExp {
  __device__ __forceinline__ static float eval(float d) {
    return ex2_approx_ftz(d * 1.4426950408889634f);
  }
};
template <>
struct RowExp<float> {
  __device__ __forceinline__ static float eval(float d) { return expf(d); }
};
template <>
struct RowExp<double> {
  __device__ __forceinline__ static double eval(double d) { return exp(d); }
};

// ---------------------------------------------------------------- 128-bit row access

// 16 bytes of a row: 8 bf16/fp16, 4 fp32 or 2 fp64 elements.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Streaming (evict-first) 128-bit load: every pass reads a row once and a [N, V] tensor of a
// few GB never fits in L2, so caching it would only evict the small per-token vectors. Plain
// ld.global.cs, not the read-only .nc path: the in-place backward writes the rows it reads.
template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  Vec<T> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// A row of V elements split for 16-byte accesses: scalar head up to the first 16-byte boundary
// (rows of a tensor with V * sizeof(T) not a multiple of 16, or a sliced tensor, start anywhere),
// nvec whole vectors from row + head, then a scalar tail from `tail`. Torch allocations are
// 16-byte aligned and V = 128256 bf16 rows are 256512 bytes, so on the hot shapes head = 0.
struct RowSplit {
  int head, nvec, tail;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int V) {
  constexpr int kVec = Vec<T>::kSize;
  const auto misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) & 15u);
  int head = ((16 - misalign) & 15) / static_cast<int>(sizeof(T));
  head = head < V ? head : V;
  const int nvec = (V - head) / kVec;
  return {head, nvec, head + nvec * kVec};
}

// ------------------------------------------------------------------ online softmax

// Softmax moments of (a part of) a row x, around its running max m:
//   below = sum_{x_v != m} e^{x_v - m},  top = #{v : x_v = m},  t = sum_v e^{x_v - m} (x_v - m).
// The maxima are counted apart from the mass below them so that log s = log1p((top - 1) + below)
// keeps every digit of the log-prob on confident rows (csrc/cpu/row_ops.h, RowMoments), and t is
// taken around m so a -inf logit adds exactly 0 instead of 0 * -inf.
// `poison` records a NaN met while the state was still empty (m = -inf), where it cannot reach
// `below`; once m is finite a NaN logit turns `below` into NaN by itself.
template <typename A>
struct Softmax {
  A m, below, top, t;
  bool poison;
};

template <typename A>
__device__ __forceinline__ Softmax<A> softmax_empty() {
  return {neg_inf<A>(), A(0), A(0), A(0), false};
}

// Rebase a non-empty state from its max onto M >= s.m: everything becomes mass below M.
// Where e^shift underflows to 0 the state adds exactly 0 to t (as absorb's e > 0 guard and the
// CPU's e == 0 guard give): shift * (below + top) may overflow to -inf for a huge spread of
// maxima (or shift itself be -inf, M = +inf), and 0 * -inf would invent a NaN entropy.
template <typename T, bool kT, typename A>
__device__ __forceinline__ void rebase(Softmax<A>& s, A M) {
  const A shift = s.m - M;
  const A f = RowExp<T>::eval(shift);
  if (kT) s.t = f > A(0) ? f * (s.t + shift * (s.below + s.top)) : A(0);
  s.below = f * (s.below + s.top);
  s.top = A(0);
  s.m = M;
}

// Fold K values (already converted and scaled) into the state: one max and at most one
// rescale per chunk, then one exp per element.
template <typename T, bool kT, int K, typename A>
__device__ __forceinline__ void absorb(Softmax<A>& s, const A (&x)[K]) {
  A cm = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cm = max_acc(cm, x[k]);  // NaN-dropping max; NaN handled below
  if (cm > s.m) {
    if (s.m == neg_inf<A>()) {
      s.m = cm;  // the state was empty: nothing to rescale (and -inf - cm must not be formed)
    } else {
      rebase<T, kT>(s, cm);
    }
  }
  if (s.m == neg_inf<A>()) {
    // Every value is -inf or NaN and nothing finite came before: only a NaN matters. Rare.
#pragma unroll
    for (int k = 0; k < K; ++k) s.poison |= (x[k] != x[k]);
    return;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A d = x[k] - s.m;
    const bool at_top = d == A(0);
    const A e = RowExp<T>::eval(d);
    s.below += at_top ? A(0) : e;
    s.top += at_top ? A(1) : A(0);
    if (kT) s.t += e > A(0) ? e * d : A(0);  // 0, not 0 * -inf (and NaN e stays in `below`)
  }
}

template <typename T, bool kT, typename A>
__device__ __forceinline__ Softmax<A> merge(Softmax<A> a, Softmax<A> b) {
  const bool poison = a.poison || b.poison;
  if (b.m == neg_inf<A>()) {
    a.poison = poison;
    return a;
  }
  if (a.m == neg_inf<A>()) {
    b.poison = poison;
    return b;
  }
  const A M = max_acc(a.m, b.m);
  if (a.m < M) rebase<T, kT>(a, M);
  if (b.m < M) rebase<T, kT>(b, M);
  return {M, a.below + b.below, a.top + b.top, kT ? a.t + b.t : A(0), poison};
}

template <typename T, bool kT, typename A>
__device__ __forceinline__ Softmax<A> warp_merge(Softmax<A> s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Softmax<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, s.m, off);
    o.below = __shfl_xor_sync(0xffffffffu, s.below, off);
    o.top = __shfl_xor_sync(0xffffffffu, s.top, off);
    o.t = kT ? __shfl_xor_sync(0xffffffffu, s.t, off) : A(0);
    o.poison = __shfl_xor_sync(0xffffffffu, static_cast<int>(s.poison), off) != 0;
    s = merge<T, kT>(s, o);
  }
  return s;
}

// The whole group's state, in every thread of the group. kGroup = 32: one warp per row, shuffles
// only (several rows share a block, so no __syncthreads). kGroup > 32: the block is the row.
// `scratch` holds kGroup / 32 + 1 states; the trailing barrier lets the caller reuse it.
template <typename T, bool kT, int kGroup, typename A>
__device__ __forceinline__ Softmax<A> group_merge(Softmax<A> s, Softmax<A>* scratch) {
  s = warp_merge<T, kT>(s);
  if constexpr (kGroup > 32) {
    constexpr int kWarps = kGroup / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    if (warp == 0) {
      s = lane < kWarps ? scratch[lane] : softmax_empty<A>();
      s = warp_merge<T, kT>(s);
      if (lane == 0) scratch[kWarps] = s;
    }
    __syncthreads();
    s = scratch[kWarps];
    __syncthreads();
  }
  return s;
}

template <int kGroup>
__device__ __forceinline__ bool group_any(bool p) {
  if constexpr (kGroup == 32) {
    return __any_sync(0xffffffffu, p) != 0;
  } else {
    return __syncthreads_or(p) != 0;
  }
}

// Block-wide sum of kN doubles (blockDim.x a multiple of 32, at most 1024 threads); the result
// is valid in thread 0. `scratch` holds 32 * kN doubles.
template <int kN>
__device__ __forceinline__ void block_sum(double (&v)[kN], double* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) scratch[warp * kN + k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      v[k] = lane < warps ? scratch[lane * kN + k] : 0.0;
      for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
    }
  }
}

// ------------------------------------------------------------------ launch shapes

// Threads per row, chosen by the row's length in 16-byte vectors: one warp for short rows
// (several rows per block, no barriers), a 256- or 512-thread block for long ones. On
// (16384, 128256) bf16 a row is 16032 vectors: 512 threads, ~31 vectors each.
inline int group_size(long long V, int elem_size) {
  const long long nvec = (V * elem_size + 15) / 16;
  if (nvec <= 512) return 32;
  if (nvec <= 4096) return 256;
  return 512;
}

// Blocks of at least 128 threads (4 rows of one warp each); up to 1024 resident threads per SM
// for every kGroup, i.e. at most 64 registers a thread: with kUnroll = 4 loads of 16 bytes in
// flight per thread that is 64 KiB per SM, well above what HBM3's latency-bandwidth product asks.
// fp64 rows get half the residency (128 registers): their doubles would spill under 64.
template <int kGroup, typename T = float>
struct GroupShape {
  static constexpr int kThreads = kGroup > 128 ? kGroup : 128;
  static constexpr int kRowsPerBlock = kThreads / kGroup;
  static constexpr int kMinBlocks = 1024 / kThreads / (sizeof(T) == 8 ? 2 : 1);
};

// 16-byte loads each thread issues before using any: 4 (64 bytes) for 2- and 4-byte types; 2 for
// fp64, a correctness path whose doubles would otherwise spill under the 64-register cap.
template <typename T>
inline constexpr int kUnroll = sizeof(T) == 8 ? 2 : 4;

// Launches a row kernel over p.N rows of p.V elements of T with the group size group_size picks:
// `kernel_for(std::integral_constant<int, G>{})` names the kernel's instantiation for group G.
template <typename T, typename Params, typename KernelFor>
cudaError_t launch_rows(const Params& p, cudaStream_t stream, KernelFor kernel_for) {
  auto go = [&](auto group) {
    using Shape = GroupShape<decltype(group)::value, T>;
    const int64_t blocks = (p.N + Shape::kRowsPerBlock - 1) / Shape::kRowsPerBlock;
    REMIT_LAUNCH(kernel_for(group), static_cast<unsigned>(blocks), Shape::kThreads, stream)(p);
    return cudaGetLastError();
  };
  switch (group_size(p.V, sizeof(T))) {
    case 32:
      return go(std::integral_constant<int, 32>{});
    case 256:
      return go(std::integral_constant<int, 256>{});
    default:
      return go(std::integral_constant<int, 512>{});
  }
}

}  // namespace remit::cuda
