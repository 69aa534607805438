// The RMT/GRPO policy-gradient term over sampled tokens (METHODS.md section 4), CPU forward:
// one read of each row gives lse and a_t = log p(action_t), and the per-token epilogue
// (pg_terms.h: loss_t and dlogprob_t = d loss_t / d a_t) runs in the same row loop while a_t is
// in a register. The backward is weighted_ce_bwd with coef_t = -upstream_t * dlogprob_t
// (remit_ext/_fakes_autograd.py); `inplace_backward` only tells it to write into the logits.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/row_ops.h"
#include "op_checks.h"
#include "pg_terms.h"

namespace remit::cpu {

namespace {

// The per-token inputs as raw pointers in the accumulation dtype; nullptr when not given.
template <typename acc_t>
struct PgInputs {
  const acc_t* adv;
  const acc_t* scale;
  const acc_t* old;
  const acc_t* ref;
};

template <typename acc_t>
struct PgOutputs {
  acc_t* loss;
  acc_t* lse;
  acc_t* logprob;
  acc_t* dlogprob;
};

template <typename scalar_t>
void pg_rows(const at::Tensor& logits, const int64_t* y, int64_t ignore_index,
             const PgInputs<acc_type<scalar_t>>& in, const PgCoefs<acc_type<scalar_t>>& coefs,
             const PgOutputs<acc_type<scalar_t>>& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(V);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t action = y[r];
      if (action == ignore_index) {
        out.loss[r] = out.lse[r] = out.logprob[r] = out.dlogprob[r] = acc_t(0);
        continue;
      }
      check_target_value(action, V, r, ignore_index, "actions");
      const acc_t* x = load_row(base + r * row_stride, V, acc_t(1), buf.data());
      const acc_t m = row_max(x, V);
      acc_t a;
      if (std::isfinite(m)) {
        const RowMoments<acc_t> mo = row_moments<acc_t, false>(x, V, m);
        out.lse[r] = m + mo.log_s;
        a = (x[action] - m) - mo.log_s;  // not x - lse: keeps p -> 1 rows' digits (row_ops.h)
      } else {
        // Undefined softmax (a +inf or NaN logit, or an all -inf row), as in token_stats: lse
        // follows torch.logsumexp, the log-prob is NaN and the epilogue carries it along.
        out.lse[r] = m;
        a = std::numeric_limits<acc_t>::quiet_NaN();
      }
      out.logprob[r] = a;
      const PgTerms<acc_t> t =
          pg_terms(a, in.adv[r], in.old ? in.old + r : nullptr, in.ref ? in.ref + r : nullptr,
                   in.scale ? in.scale + r : nullptr, coefs);
      out.loss[r] = t.loss;
      out.dlogprob[r] = t.dlogprob;
    }
  });
}

// A per-token input in the accumulation dtype, dense (a no-op for what OpsBackend passes).
at::Tensor per_token_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pg_loss_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    };
    const PgInputs<acc_t> in{adv.const_data_ptr<acc_t>(), ptr(sc), ptr(old), ptr(ref)};
    // The band in acc_t, rounded as the references round 1 - clip_low and 1 + clip_high.
    const PgCoefs<acc_t> coefs{static_cast<acc_t>(1.0 - clip_low),
                               static_cast<acc_t>(1.0 + clip_high), static_cast<acc_t>(kl_beta)};
    const PgOutputs<acc_t> out{loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
                               logprob.data_ptr<acc_t>(), dlogprob.data_ptr<acc_t>()};
    pg_rows<scalar_t>(x, y.const_data_ptr<int64_t>(), ignore_index, in, coefs, out);
  });
  return {loss, lse, logprob, dlogprob};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) { m.impl("pg_loss_fwd", &pg_loss_fwd_cpu); }

}  // namespace remit::cpu
