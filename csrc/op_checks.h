// Argument checks for direct torch.ops calls, shared by the CPU op files (csrc/cpu) and the CUDA
// glue (csrc/cuda/*.cpp); the Python layer gives friendlier ones first. They look at dtypes,
// shapes and strides only, never at devices or data: the CUDA glue layers its device and 32-bit
// size checks on top (cuda/glue.h), and the CPU files check values where they read them.
//
// Host-only and ATen-only, so the glue still compiles against a CPU wheel's headers
// (tools/nvcc_check.py). The messages are matched by python_tests/test_errors.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace remit {

inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK_VALUE(logits.dim() == 2, name, ": expected a 2-D [N, V] tensor, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), name,
                    ": expected a floating dtype, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, name, ": expected V >= 1, got shape ", logits.sizes());
}

inline void check_targets(const at::Tensor& targets, int64_t N, const char* name = "targets") {
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == N, name,
                    ": expected a 1-D tensor of ", N, " elements, got shape ", targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, name,
                    ": expected int64 or int32, got ", targets.scalar_type());
}

// `b` (scorer or teacher rows) must match `a` element for element.
inline void check_same_rows(const at::Tensor& a, const at::Tensor& b, const char* name,
                            const char* a_name = "logits") {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), name, ": expected the same shape as ", a_name, " ",
                    a.sizes(), ", got ", b.sizes());
}

// One value per token: weights, lse, log-probs, backward coefficients.
inline void check_per_token(const at::Tensor& t, int64_t N, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, name, ": expected shape [", N, "], got ",
                    t.sizes());
}

// pg_loss_fwd's per-token inputs (advantages, scale, old and reference log-probs): one float
// per token, read by the kernels in the accumulation dtype.
inline void check_per_token_float(const at::Tensor& t, int64_t N, const char* name) {
  check_per_token(t, N, name);
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name,
                    ": expected a floating dtype, got ", t.scalar_type());
}

// The PPO band [1 - clip_low, 1 + clip_high] must hold ratios near 1, and a KL weight needs the
// reference log-probs it weighs (as the Python API insists; silently dropping it would hide a
// missing argument).
inline void check_pg_coefficients(double clip_low, double clip_high, double kl_beta,
                                  bool has_ref_logprob) {
  TORCH_CHECK_VALUE(clip_low >= 0 && clip_low < 1, "clip_low: expected a value in [0, 1), got ",
                    clip_low);
  TORCH_CHECK_VALUE(clip_high >= 0, "clip_high: expected a value >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(kl_beta >= 0, "kl_beta: expected a value >= 0, got ", kl_beta);
  TORCH_CHECK_VALUE(kl_beta == 0 || has_ref_logprob, "kl_beta: ", kl_beta,
                    " > 0 needs ref_logprob, got None");
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(temperature > 0, "temperature: expected > 0, got ", temperature);
}

inline void check_topk(int64_t topk) {
  TORCH_CHECK_VALUE(topk >= 0, "topk: expected >= 0 (0: not computed), got ", topk);
}

// remit_loss takes the scorer as logits or as log-probs, never both.
inline void check_one_scorer(const std::optional<at::Tensor>& scorer_logits,
                             const std::optional<at::Tensor>& scorer_logprob) {
  TORCH_CHECK_VALUE(scorer_logits.has_value() != scorer_logprob.has_value(),
                    "remit_loss: expected exactly one of scorer_logits and scorer_logprob");
}

// The registered remit_weights op: policy and scorer log-probs, one per token, in fp32/fp64.
inline void check_remit_weights_args(const at::Tensor& logprob, const at::Tensor& scorer_logprob,
                                     const at::Tensor& targets) {
  TORCH_CHECK_VALUE(logprob.dim() == 1, "logprob: expected a 1-D tensor, got shape ",
                    logprob.sizes());
  TORCH_CHECK_VALUE(logprob.scalar_type() == at::kFloat || logprob.scalar_type() == at::kDouble,
                    "logprob: expected float32 or float64, got ", logprob.scalar_type());
  check_same_rows(logprob, scorer_logprob, "scorer_logprob", "logprob");
  check_targets(targets, logprob.size(0));
}

inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(eps > 0 && eps < 1, "eps: expected a value in (0, 1), got ", eps);
}

// Shape and dtype only: the offsets themselves are checked where they are read (the CPU kernel;
// the CUDA kernel clamps, so that the op never waits on a device-to-host copy).
inline void check_cu_seqlens(const at::Tensor& cu_seqlens) {
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2,
                    "cu_seqlens: expected a 1-D tensor of at least 2 offsets, got shape ",
                    cu_seqlens.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kLong || cu_seqlens.scalar_type() == at::kInt,
                    "cu_seqlens: expected int32 or int64, got ", cu_seqlens.scalar_type());
}

// weighted_ce_bwd_ writes the gradient over the logits, and the kernels write whole rows with
// vector stores: it cannot fall back to a dense copy as the out-of-place backward does. Rows
// that share memory (an expand, stride(0) < V) would be written by several rows' threads at
// once and read after being overwritten.
inline void check_inplace_rows(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) <= 1,
                    "logits: the in-place backward needs rows with unit stride, got strides ",
                    logits.strides());
  TORCH_CHECK_VALUE(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
                    "logits: the in-place backward needs rows that do not overlap in memory "
                    "(row stride >= V), got sizes ", logits.sizes(), " and strides ",
                    logits.strides());
}

// Rows are addressed through a row stride; only the vocabulary dimension must be dense.
inline at::Tensor row_major(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace remit
