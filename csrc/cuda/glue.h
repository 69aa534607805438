// Torch-side helpers shared by the CUDA op files: dtype mapping onto the CUDA types the kernel
// bodies use, argument checks for direct torch.ops calls (the Python layer gives friendlier
// ones first), and the internal entry points the fused remit_loss reuses.
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

inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK_VALUE(logits.is_cuda(), name, ": expected a CUDA tensor, got ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, name, ": expected a 2-D [N, V] tensor, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), name,
                    ": expected a floating dtype, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, name, ": expected V >= 1, got shape ", logits.sizes());
  // Column indices are 32-bit inside a row (row offsets are 64-bit); grids are 32-bit in rows.
  // The column loops step `i += kGroup` (up to 512) past the last column before they stop, so
  // V leaves that much headroom below 2^31 (else the int index overflows: undefined behaviour).
  constexpr int64_t kMaxV = std::numeric_limits<int32_t>::max() - 1024;
  TORCH_CHECK_VALUE(logits.size(1) <= kMaxV &&
                        logits.size(0) <= std::numeric_limits<int32_t>::max(),
                    name, ": the CUDA kernels take N < 2^31 and V <= 2^31 - 1025, got shape ",
                    logits.sizes());
}

inline void check_targets(const at::Tensor& targets, const at::Tensor& logits,
                          const char* name = "targets") {
  const int64_t N = logits.size(0);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == N, name,
                    ": expected a 1-D tensor of ", N, " elements, got shape ", targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, name,
                    ": expected int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), name, ": expected a tensor on ",
                    logits.device(), ", got ", targets.device());
}

inline void check_per_token(const at::Tensor& t, int64_t N, const at::Tensor& logits,
                            const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, name, ": expected shape [", N, "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, ": expected a tensor on ",
                    logits.device(), ", got ", t.device());
}

// Rows are addressed through a row stride; only the vocabulary dimension must be dense.
inline at::Tensor row_major(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
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
