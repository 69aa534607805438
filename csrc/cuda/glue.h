// Torch-side helpers shared by the CUDA op files: dtype mapping onto the CUDA types the kernel
// bodies use, the CUDA layer of the argument checks for direct torch.ops calls (the shared,
// device-agnostic layer is op_checks.h), and the internal entry points the fused remit_loss
// reuses.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers): the glue then compiles against a CPU wheel's headers plus the bare CUDA toolkit,
// which is how tools/nvcc_check.py checks it on machines without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits>

#include "op_checks.h"

namespace remit::cuda {

// at::Half / at::BFloat16 share the bit layout of __half / __nv_bfloat16.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
inline auto* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
inline auto* cuda_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The argument checks of op_checks.h plus what the CUDA kernels need on top: every tensor they
// dereference on the logits' device, and 32-bit sizes. These hide remit::check_logits etc.
// inside remit::cuda, where the device-agnostic ones are called by their full name.

inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK_VALUE(logits.is_cuda(), name, ": expected a CUDA tensor, got ", logits.device());
  remit::check_logits(logits, name);
  // Column indices are 32-bit inside a row (row offsets are 64-bit); grids are 32-bit in rows.
  // The column loops step `i += kGroup` (up to 512) past the last column before they stop, so
  // V leaves that much headroom below 2^31 (else the int index overflows: undefined behaviour).
  constexpr int64_t kMaxV = std::numeric_limits<int32_t>::max() - 1024;
  TORCH_CHECK_VALUE(logits.size(1) <= kMaxV &&
                        logits.size(0) <= std::numeric_limits<int32_t>::max(),
                    name, ": the CUDA kernels take N < 2^31 and V <= 2^31 - 1025, got shape ",
                    logits.sizes());
}

inline void check_on_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected a tensor on ", like.device(),
                    ", got ", t.device());
}

inline void check_targets(const at::Tensor& targets, const at::Tensor& logits,
                          const char* name = "targets") {
  remit::check_targets(targets, logits.size(0), name);
  check_on_device(targets, logits, name);
}

inline void check_per_token(const at::Tensor& t, int64_t N, const at::Tensor& logits,
                            const char* name) {
  remit::check_per_token(t, N, name);
  check_on_device(t, logits, name);
}

inline void check_scorer_logits(const at::Tensor& scorer_logits, const at::Tensor& logits) {
  check_logits(scorer_logits, "scorer_logits");
  check_same_rows(logits, scorer_logits, "scorer_logits");
  TORCH_CHECK_VALUE(scorer_logits.device() == logits.device(),
                    "scorer_logits: expected a tensor on ", logits.device());
}

// ---- internal entry points (defined in token_stats.cu, remit_weights.cu, weighted_ce.cu) ----

// lse, log-prob and (when `entropy` is defined) entropy of logits / temperature, for the policy
// rows and, when `scorer` is given, the scorer rows into s_lse / s_logprob (in the policy's
// accumulation dtype). Invalid rows get 0. One launch when both share a dtype.
void stats_pass(const at::Tensor& logits, const at::Tensor& targets,
                const c10::optional<at::Tensor>& scorer, int64_t ignore_index,
                double temperature, at::Tensor& lse, at::Tensor& logprob, at::Tensor& entropy,
                at::Tensor& s_lse, at::Tensor& s_logprob);

// ReMiT weights per cu_seqlens segment, and the diagnostics; `loss`, when defined, gets -w a.
void remit_weights_into(const at::Tensor& logprob, const at::Tensor& scorer_logprob,
                        const at::Tensor& targets, const at::Tensor& cu_seqlens,
                        int64_t ignore_index, double eps, at::Tensor& weights,
                        at::Tensor& delta_hat, at::Tensor& diag, at::Tensor& loss);

// grad[t] = coef[t] * (softmax(logits[t]) - onehot(y_t)); `grad` may be `logits` (in place).
void ce_grad_into(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& logprob, const at::Tensor& coef, int64_t ignore_index,
                  at::Tensor& grad);

}  // namespace remit::cuda
