// Weighted cross-entropy: forward loss_t = -w_t * log p(y_t) with lse saved for the backward,
// backward grad_t = coef_t * (p_t - onehot(y_t)) (target entry from the saved log-prob), coef_t = upstream_t * w_t (formed in Python).
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/row_ops.h"
#include "op_checks.h"

namespace remit::cpu {

namespace {

template <typename scalar_t>
void ce_grad_rows(const at::Tensor& logits, const int64_t* y, const acc_type<scalar_t>* lse,
                  const acc_type<scalar_t>* logprob, const acc_type<scalar_t>* coef,
                  int64_t ignore_index, at::Tensor& grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t in_stride = logits.stride(0), out_stride = grad.stride(0);
  const scalar_t* in = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(V);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out_row = out + r * out_stride;
      if (y[r] == ignore_index) {
        zero_row(out_row, V);
        continue;
      }
      check_target_value(y[r], V, r, ignore_index);
      const acc_t* x = load_row(in + r * in_stride, V, acc_t(1), buf.data());
      write_ce_grad(x, V, lse[r], logprob[r], coef[r], y[r], out_row, buf.data());
    }
  });
}

}  // namespace

void ce_grad_into(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& logprob, const at::Tensor& coef, int64_t ignore_index,
                  at::Tensor& grad) {
  const at::Tensor y = targets_as_long(targets);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const at::Tensor lse_c = lse.to(acc).contiguous(), coef_c = coef.to(acc).contiguous();
  const at::Tensor lp_c = logprob.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_grad", [&] {
    using acc_t = acc_type<scalar_t>;
    ce_grad_rows<scalar_t>(logits, y.const_data_ptr<int64_t>(), lse_c.const_data_ptr<acc_t>(),
                           lp_c.const_data_ptr<acc_t>(), coef_c.const_data_ptr<acc_t>(),
                           ignore_index, grad);
  });
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
