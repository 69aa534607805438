// The RMT/GRPO policy-gradient term over sampled tokens (METHODS.md section 4), CPU forward:
// one read of each row gives lse and a_t = log p(action_t), and the per-token epilogue
// (pg_terms.h: loss_t and dlogprob_t = d loss_t / d a_t) runs in the same row loop while a_t is
// in a register (rows.cpp). The backward is weighted_ce_bwd with coef_t = -upstream_t * dlogprob_t
// (remit_ext/_fakes_autograd.py); `inplace_backward` only tells it to write into the logits.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "op_checks.h"

namespace remit::cpu {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_loss_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& actions, const at::Tensor& advantages,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& old_logprob,
    const std::optional<at::Tensor>& ref_logprob, int64_t ignore_index, double clip_low,
    double clip_high, double kl_beta, bool inplace_backward) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0);
  check_targets(actions, N, "actions");
  // Devices need no check here: a tensor elsewhere than the CPU sends the call to that device's
  // kernel (the dispatcher looks at every tensor argument), never to this one.
  check_per_token_float(advantages, N, "advantages");
  if (scale.has_value()) check_per_token_float(*scale, N, "scale");
  if (old_logprob.has_value()) check_per_token_float(*old_logprob, N, "old_logprob");
  if (ref_logprob.has_value()) check_per_token_float(*ref_logprob, N, "ref_logprob");
  check_pg_coefficients(clip_low, clip_high, kl_beta, ref_logprob.has_value());
  (void)inplace_backward;  // read by the backward (remit_ext/_fakes_autograd.py)

  const at::Tensor x = row_major(logits);
  const at::Tensor y = targets_as_long(actions);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  at::Tensor loss = at::empty({N}, opts), lse = at::empty({N}, opts);
  at::Tensor logprob = at::empty({N}, opts), dlogprob = at::empty({N}, opts);
  const at::Tensor adv = per_token_acc(advantages, acc);
  at::Tensor sc, old, ref;  // undefined unless given
  if (scale.has_value()) sc = per_token_acc(*scale, acc);
  if (old_logprob.has_value()) old = per_token_acc(*old_logprob, acc);
  if (ref_logprob.has_value()) ref = per_token_acc(*ref_logprob, acc);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
  const PgJob job{x.const_data_ptr(), N, x.size(1), x.stride(0), y.const_data_ptr<int64_t>(),
                  ignore_index, adv.const_data_ptr(), ptr(sc), ptr(old), ptr(ref), clip_low,
                  clip_high, kl_beta, loss.data_ptr(), lse.data_ptr(), logprob.data_ptr(),
                  dlogprob.data_ptr()};
  row_kernels().pg_fwd(x.scalar_type(), job);
  return {loss, lse, logprob, dlogprob};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) { m.impl("pg_loss_fwd", &pg_loss_fwd_cpu); }

}  // namespace remit::cpu
