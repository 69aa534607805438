// The fused logits-level ReMiT forward: statistics pass over policy and scorer rows, the
// segmented weight pass, and the per-token loss -w_t a_t. The backward is weighted_ce_bwd with
// coef_t = upstream_t * w_t (or the non-detached coefficient), formed in remit_ext/_fakes_autograd.py.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "op_checks.h"

namespace remit::cpu {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> remit_loss_cpu(
    const at::Tensor& logits, const at::Tensor& targets,
    const std::optional<at::Tensor>& scorer_logits,
    const std::optional<at::Tensor>& scorer_logprob, const at::Tensor& cu_seqlens,
    int64_t ignore_index, double eps, bool detach_weights, bool inplace_backward) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0);
  check_targets(targets, N);
  check_one_scorer(scorer_logits, scorer_logprob);
  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  StatsOut policy{at::empty({N}, opts), at::empty({N}, opts), {}, {}};
  stats_pass(logits, targets, ignore_index, 1.0, 0, false, policy);
  const at::Tensor &lse = policy.lse, &logprob = policy.logprob;
  at::Tensor b;
  if (scorer_logits.has_value()) {
    check_logits(*scorer_logits, "scorer_logits");
    check_same_rows(logits, *scorer_logits, "scorer_logits");
    const auto s_opts = opts.dtype(at::toOpMathType(scorer_logits->scalar_type()));
    StatsOut scorer{at::empty({N}, s_opts), at::empty({N}, s_opts), {}, {}};
    stats_pass(*scorer_logits, targets, ignore_index, 1.0, 0, false, scorer);
    b = scorer.logprob;
  } else {
    check_per_token(*scorer_logprob, N, "scorer_logprob");
    b = *scorer_logprob;
  }
  at::Tensor w = at::empty({N}, opts), dhat = at::empty({N}, opts);
  at::Tensor diag = at::empty({6}, opts);
  remit_weights_into(logprob, b, targets, cu_seqlens, ignore_index, eps, w, dhat, diag);
  at::Tensor loss = -(w * logprob);
  return {loss, w, logprob, lse, dhat, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) { m.impl("remit_loss", &remit_loss_cpu); }

}  // namespace remit::cpu
