// The host-side interface of the CUDA kernels: parameter blocks and launchers, no device code
// and no torch. The launchers are defined in the .cuh kernel bodies and instantiated once, for
// fp32/bf16/fp16/fp64, in kernels.cu; the torch glue (the other .cu files) only declares them,
// so the kernels are compiled once and the glue compiles fast.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace remit::cuda {

// Accumulation type: fp32 for fp32/bf16/fp16 rows, fp64 for fp64 rows (gradcheck).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// ---- token_stats (token_stats.cuh)

template <typename T>
struct StatsParams {
  using A = acc_t<T>;
  const T* x;         // policy logits, rows x + r * x_stride (unit stride inside a row)
  int64_t x_stride;
  const T* s;         // scorer logits (same dtype) or nullptr
  int64_t s_stride;
  const void* targets;  // int64, or int32 when targets_i32
  bool targets_i32;
  A* lse;
  A* logprob;
  A* entropy;  // nullptr unless asked (the kernel is then instantiated with kEntropy)
  A* s_lse;
  A* s_logprob;
  int64_t N;
  int V;
  int64_t ignore_index;
  A scale;  // 1 / temperature
};

// One launch over N rows (N >= 1, N < 2^31, V < 2^31: the caller checks); returns the launch's
// cudaGetLastError().
template <typename T>
cudaError_t launch_token_stats(const StatsParams<T>& p, cudaStream_t stream);

// ---- remit_weights (remit_weights.cuh)

constexpr int kPartials = 7;  // sum w, sum w^2, #low, #high, sum |delta_hat|, sum delta, n

template <typename A>
struct WeightsParams {
  const A* a;  // policy log-probs
  const A* b;  // scorer log-probs
  const void* targets;
  bool targets_i32;
  const int64_t* cu_seqlens;  // S + 1 offsets
  int64_t S;
  int64_t N;
  int64_t ignore_index;
  A lo, hi;  // 1 - eps, 1 + eps
  A* w;
  A* dhat;
  A* loss;           // -w a per token, or nullptr
  double* partial;   // [S, kPartials]
  A* diag;           // [6]
};

// Two launches: one block per segment (S >= 1; p.partial holds S * kPartials doubles), then the
// one-block diagnostics reduction.
template <typename A>
cudaError_t launch_remit_weights(const WeightsParams<A>& p, cudaStream_t stream);

// ---- cross-entropy gradient (ce_grad.cuh)

template <typename T>
struct GradParams {
  using A = acc_t<T>;
  const T* x;  // logits rows x + r * x_stride
  int64_t x_stride;
  T* g;        // gradient rows g + r * g_stride; may equal x (in place)
  int64_t g_stride;
  const void* targets;
  bool targets_i32;
  const A* lse;
  const A* logprob;
  const A* coef;
  int64_t N;
  int V;
  int64_t ignore_index;
};

template <typename T>
cudaError_t launch_ce_grad(const GradParams<T>& p, cudaStream_t stream);

// ---- pg_loss epilogue (pg_loss.cuh)

template <typename A>
struct PgParams {
  const A* logprob;  // a_t from the statistics pass (0 at ignored positions)
  const void* targets;  // the actions: int64, or int32 when targets_i32
  bool targets_i32;
  const A* adv;
  const A* scale;  // nullptr: 1
  const A* old;    // nullptr: plain policy gradient (no PPO ratio)
  const A* ref;    // nullptr: no KL term
  A lo, hi, kl_beta;  // [1 - clip_low, 1 + clip_high], the KL weight
  A* loss;
  A* dlogprob;
  int64_t N;
  int64_t ignore_index;
};

// One thread per token (N >= 1); returns the launch's cudaGetLastError().
template <typename A>
cudaError_t launch_pg_terms(const PgParams<A>& p, cudaStream_t stream);

#define REMIT_CUDA_ROW_TYPES(X) X(float) X(__nv_bfloat16) X(__half) X(double)
#define REMIT_CUDA_ACC_TYPES(X) X(float) X(double)

#define REMIT_EXTERN_ROW(T)                                                       \
  extern template cudaError_t launch_token_stats<T>(const StatsParams<T>&, cudaStream_t); \
  extern template cudaError_t launch_ce_grad<T>(const GradParams<T>&, cudaStream_t);
#define REMIT_EXTERN_ACC(A)                                                                   \
  extern template cudaError_t launch_remit_weights<A>(const WeightsParams<A>&, cudaStream_t); \
  extern template cudaError_t launch_pg_terms<A>(const PgParams<A>&, cudaStream_t);
REMIT_CUDA_ROW_TYPES(REMIT_EXTERN_ROW)
REMIT_CUDA_ACC_TYPES(REMIT_EXTERN_ACC)
#undef REMIT_EXTERN_ROW
#undef REMIT_EXTERN_ACC

}  // namespace remit::cuda
