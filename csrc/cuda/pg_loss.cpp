// The RMT/GRPO policy-gradient term on CUDA (METHODS.md section 4): the statistics launch
// (token_stats.cuh: lse and a_t = log p(action_t), one read of each row), then the per-token
// epilogue launch (pg_loss.cuh, the formula of pg_terms.h shared with the CPU kernel); nothing
// waits on the host. The backward is weighted_ce_bwd with coef_t = -upstream_t * dlogprob_t,
// formed in remit_ext/_fakes_autograd.py: three [N, V] passes in all (read, read, write gradient).
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/launch.h"

namespace remit::cuda {

namespace {

// A per-token input: shape, floating dtype (op_checks.h) and the logits' device, then dense in
// the accumulation dtype (a no-op for what OpsBackend passes).
at::Tensor per_token_acc(const at::Tensor& t, int64_t N, const at::Tensor& logits,
                         const char* name) {
  remit::check_per_token_float(t, N, name);
  check_on_device(t, logits, name);
  return t.to(at::toOpMathType(logits.scalar_type())).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_loss_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& actions, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& old_logprob,
    const c10::optional<at::Tensor>& ref_logprob, int64_t ignore_index, double clip_low,
    double clip_high, double kl_beta, bool inplace_backward) {
  check_logits(logits, "logits");
  // Shapes, dtypes and devices only: action *values* are not checked here (that needs a host
  // sync). An out-of-range action gives a NaN log-prob and loss at that token, as in every CUDA
  // and Triton op; the Python API checks values first (remit_ext.set_validation).
  check_targets(actions, logits, "actions");
  check_pg_coefficients(clip_low, clip_high, kl_beta, ref_logprob.has_value());
  (void)inplace_backward;  // read by the backward (remit_ext/_fakes_autograd.py)
  const int64_t N = logits.size(0);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor adv = per_token_acc(advantages, N, logits, "advantages");
  at::Tensor sc, old, ref;  // undefined unless given
  if (scale.has_value()) sc = per_token_acc(*scale, N, logits, "scale");
  if (old_logprob.has_value()) old = per_token_acc(*old_logprob, N, logits, "old_logprob");
  if (ref_logprob.has_value()) ref = per_token_acc(*ref_logprob, N, logits, "ref_logprob");

  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor lse = at::empty({N}, opts), logprob = at::empty({N}, opts), none;
  at::Tensor loss = at::empty({N}, opts), dlogprob = at::empty({N}, opts);
  if (N == 0) return {loss, lse, logprob, dlogprob};  // an empty grid is a launch error
  stats_pass(logits, actions, c10::nullopt, ignore_index, 1.0, lse, logprob, none, none, none);
  const at::Tensor y = actions.contiguous();
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "pg_terms_cuda", [&] {
    auto ptr = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    };
    PgParams<scalar_t> p{};
    p.logprob = logprob.const_data_ptr<scalar_t>();
    p.targets = y.const_data_ptr();
    p.targets_i32 = y.scalar_type() == at::kInt;
    p.adv = adv.const_data_ptr<scalar_t>();
    p.scale = ptr(sc);
    p.old = ptr(old);
    p.ref = ptr(ref);
    // The band in the accumulation dtype, rounded as the CPU kernel and the references round it.
    p.lo = static_cast<scalar_t>(1.0 - clip_low);
    p.hi = static_cast<scalar_t>(1.0 + clip_high);
    p.kl_beta = static_cast<scalar_t>(kl_beta);
    p.loss = loss.mutable_data_ptr<scalar_t>();
    p.dlogprob = dlogprob.mutable_data_ptr<scalar_t>();
    p.N = N;
    p.ignore_index = ignore_index;
    C10_CUDA_CHECK(launch_pg_terms(p, current_stream()));
  });
  return {loss, lse, logprob, dlogprob};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CUDA, m) { m.impl("pg_loss_fwd", &pg_loss_fwd_cuda); }

}  // namespace remit::cuda
