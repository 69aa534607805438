// Weighted cross-entropy: forward loss_t = -w_t * log p(y_t) with lse saved for the backward,
// backward grad_t = coef_t * (p_t - onehot(y_t)) (target entry from the saved log-prob), coef_t = upstream_t * w_t (formed in Python).
#include <torch/library.h>

#include "cpu/kernels.h"
#include "op_checks.h"

namespace remit::cpu {

void ce_grad_into(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& logprob, const at::Tensor& coef, int64_t ignore_index,
                  at::Tensor& grad) {
  const at::Tensor y = targets_as_long(targets);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const at::Tensor lse_c = per_token_acc(lse, acc), coef_c = per_token_acc(coef, acc);
  const at::Tensor lp_c = per_token_acc(logprob, acc);
  const CeGradJob job{logits.const_data_ptr(), logits.size(0), logits.size(1), logits.stride(0),
                      y.const_data_ptr<int64_t>(), ignore_index, lse_c.const_data_ptr(),
                      lp_c.const_data_ptr(), coef_c.const_data_ptr(), grad.data_ptr(),
                      grad.stride(0)};
  row_kernels().ce_grad(logits.scalar_type(), job);
}

namespace {

void check_bwd_args(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                    const at::Tensor& logprob, const at::Tensor& coef) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0);
  check_targets(targets, N);
  check_per_token(lse, N, "lse");
  check_per_token(logprob, N, "logprob");
  check_per_token(coef, N, "coef");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_ce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& weights,
    int64_t ignore_index, bool inplace_backward) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0);
  check_targets(targets, N);
  if (weights.has_value()) check_per_token(*weights, N, "weights");
  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  StatsOut st{at::empty({N}, opts), at::empty({N}, opts), {}, {}};
  stats_pass(logits, targets, ignore_index, 1.0, 0, false, st);
  const at::Tensor &lse = st.lse, &logprob = st.logprob;
  at::Tensor loss = -logprob;  // invalid rows have logprob 0, hence loss 0
  // Selected, not multiplied: a NaN/inf weight at an invalid row must stay out (0 * NaN = NaN).
  if (weights.has_value())
    loss = at::where(targets != ignore_index, loss * weights->to(opts.dtype()), 0.0);
  return {loss, lse, logprob};
}

at::Tensor weighted_ce_bwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                               const at::Tensor& lse, const at::Tensor& logprob,
                               const at::Tensor& coef, int64_t ignore_index) {
  check_bwd_args(logits, targets, lse, logprob, coef);
  const at::Tensor x = row_major(logits);
  at::Tensor grad = empty_grad_like(x);
  ce_grad_into(x, targets, lse, logprob, coef, ignore_index, grad);
  return grad;
}

void weighted_ce_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& lse, const at::Tensor& logprob,
                                 const at::Tensor& coef, int64_t ignore_index) {
  check_bwd_args(logits, targets, lse, logprob, coef);
  check_inplace_rows(logits);
  ce_grad_into(logits, targets, lse, logprob, coef, ignore_index, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) {
  m.impl("weighted_ce_fwd", &weighted_ce_fwd_cpu);
  m.impl("weighted_ce_bwd", &weighted_ce_bwd_cpu);
  m.impl("weighted_ce_bwd_", &weighted_ce_bwd_inplace_cpu);
}

}  // namespace remit::cpu
