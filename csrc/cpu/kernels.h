// Internal entry points shared between the CPU op files (the registered ops are in each .cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>

#include "cpu/rows.h"

namespace remit::cpu {

// One pass over each valid row of `logits` [N, V]: lse, target log-prob and, when those tensors
// are defined, the entropy and the entropy of the `topk` largest probabilities (renormalised on
// request), all of logits/temperature. Invalid rows (target == ignore_index) get 0.
struct StatsOut {
  at::Tensor lse, logprob, entropy, topk_entropy;
};
void stats_pass(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                double temperature, int64_t topk, bool topk_renormalize, StatsOut& out);

// ReMiT weights from policy and scorer log-probs, segment by segment (METHODS.md section 2).
// diag = [mean w, std w, frac clipped low, frac clipped high, mean |delta_hat|, mean delta].
void remit_weights_into(const at::Tensor& logprob, const at::Tensor& scorer_logprob,
                        const at::Tensor& targets, const at::Tensor& cu_seqlens,
                        int64_t ignore_index, double eps, at::Tensor& weights,
                        at::Tensor& delta_hat, at::Tensor& diag);

// grad[t, :] = coef[t] * (softmax(logits[t]) - onehot(y_t)), the target entry coef * expm1(logprob);
// zero for invalid rows.
// `grad` may be `logits` itself (in-place backward).
void ce_grad_into(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& logprob, const at::Tensor& coef, int64_t ignore_index,
                  at::Tensor& grad);

at::Tensor targets_as_long(const at::Tensor& targets);

// Whether fresh gradient buffers ask for transparent huge pages (REMIT_GRAD_HUGEPAGES=0: no;
// read once). bench/grad_buffer_pages.py times both, with both of torch's CPU allocator modes.
inline bool grad_hugepage_hint() {
  static const bool on = [] {
    const char* v = std::getenv("REMIT_GRAD_HUGEPAGES");
    return !(v && v[0] == '0' && v[1] == '\0');
  }();
  return on;
}

// A fresh [N, V] gradient buffer. Its first touch dominates a CPU backward when it is made of
// 4 KiB pages (one fault per page: ~130k faults for 500 MB); asking for transparent huge pages
// on its 2 MiB-aligned interior, as torch's own THP_MEM_ALLOC_ENABLE does, cuts that ~500x.
// madvise is only advice: where THP is off it fails and nothing changes.
inline at::Tensor empty_grad_like(const at::Tensor& logits) {
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
#ifdef MADV_HUGEPAGE
  if (!grad_hugepage_hint()) return grad;
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const auto first = reinterpret_cast<std::uintptr_t>(grad.data_ptr());
  const std::uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (first + grad.nbytes()) & ~(kHuge - 1);
  if (end > begin) {
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return grad;
}

// Per-token tensors as the row kernels read them: the accumulation dtype, dense.
inline at::Tensor per_token_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

}  // namespace remit::cpu
