// The fused logits-level ReMiT forward on CUDA: one statistics launch over policy and scorer
// rows, the segmented weight launch (which also writes the per-token loss -w_t a_t) and the
// diagnostics launch; nothing waits on the host. The backward is weighted_ce_bwd with
// coef_t = upstream_t * w_t (or the non-detached coefficient), formed in remit_ext/_fakes_autograd.py:
// four [N, V] passes in all (read policy, read scorer, read policy, write gradient).
#include <torch/library.h>

#include "cuda/glue.h"

namespace remit::cuda {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
remit_loss_cuda(const at::Tensor& logits, const at::Tensor& targets,
                const c10::optional<at::Tensor>& scorer_logits,
                const c10::optional<at::Tensor>& scorer_logprob, const at::Tensor& cu_seqlens,
                int64_t ignore_index, double eps, bool detach_weights, bool inplace_backward) {
  check_logits(logits, "logits");
  check_targets(targets, logits);
  const int64_t N = logits.size(0);
  check_one_scorer(scorer_logits, scorer_logprob);
  if (scorer_logits.has_value()) {
    check_scorer_logits(*scorer_logits, logits);
  } else {
    check_per_token(*scorer_logprob, N, logits, "scorer_logprob");
  }
  // detach_weights and inplace_backward shape the backward only (remit_ext/_fakes_autograd.py).
  (void)detach_weights;
  (void)inplace_backward;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor lse = at::empty({N}, opts), logprob = at::empty({N}, opts), none;
  at::Tensor s_lse, b;
  if (scorer_logits.has_value()) {
    s_lse = at::empty({N}, opts);
    b = at::empty({N}, opts);
  } else {
    b = *scorer_logprob;
  }
  stats_pass(logits, targets, scorer_logits, ignore_index, 1.0, lse, logprob, none, s_lse, b);
  // Zeros: tokens no (clamped, malformed) cu_seqlens segment covers stay 0 (remit_weights.cpp).
  at::Tensor w = at::zeros({N}, opts), dhat = at::zeros({N}, opts), loss = at::zeros({N}, opts);
  at::Tensor diag = at::empty({6}, opts);
  remit_weights_into(logprob, b, targets, cu_seqlens, ignore_index, eps, w, dhat, diag, loss);
  return {loss, w, logprob, lse, dhat, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CUDA, m) { m.impl("remit_loss", &remit_loss_cuda); }

}  // namespace remit::cuda
