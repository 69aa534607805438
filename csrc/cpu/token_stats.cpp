// token_stats: lse, target log-prob and entropy of policy (and scorer) rows, one read per row.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/row_ops.h"

namespace remit::cpu {

at::Tensor targets_as_long(const at::Tensor& targets) {
  return targets.to(at::kLong).contiguous();
}

namespace {

template <typename scalar_t, bool kEntropy>
void stats_rows(const at::Tensor& logits, const int64_t* y, int64_t ignore_index,
                double temperature, acc_type<scalar_t>* lse, acc_type<scalar_t>* logprob,
                acc_type<scalar_t>* entropy) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const acc_t scale = acc_t(1) / static_cast<acc_t>(temperature);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(V);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t target = y[r];
      if (target == ignore_index) {
        lse[r] = logprob[r] = acc_t(0);
        if constexpr (kEntropy) entropy[r] = acc_t(0);
        continue;
      }
      check_target_value(target, V, r, ignore_index);
      const acc_t* x = load_row(base + r * row_stride, V, scale, buf.data());
      const acc_t m = row_max(x, V);
      if (!std::isfinite(m)) {
        // A +inf or NaN logit, or an all -inf row: softmax is undefined. lse follows
        // torch.logsumexp (+-inf / NaN); everything derived from p is NaN, as log_softmax gives.
        lse[r] = m;
        logprob[r] = std::numeric_limits<acc_t>::quiet_NaN();
        if constexpr (kEntropy) entropy[r] = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      const RowMoments<acc_t> mo = row_moments<acc_t, kEntropy>(x, V, m);
      lse[r] = m + mo.log_s;
      logprob[r] = (x[target] - m) - mo.log_s;
      if constexpr (kEntropy) entropy[r] = mo.log_s - mo.t / mo.s;  // H = LSE - sum p x
    }
  });
}

}  // namespace

void stats_pass(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                double temperature, at::Tensor& lse, at::Tensor& logprob, at::Tensor entropy) {
  const at::Tensor x = row_major(logits);
  const at::Tensor y = targets_as_long(targets);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_stats", [&] {
    using acc_t = acc_type<scalar_t>;
    if (entropy.defined()) {
      stats_rows<scalar_t, true>(x, y.const_data_ptr<int64_t>(), ignore_index, temperature,
                                 lse.data_ptr<acc_t>(), logprob.data_ptr<acc_t>(),
                                 entropy.data_ptr<acc_t>());
    } else {
      stats_rows<scalar_t, false>(x, y.const_data_ptr<int64_t>(), ignore_index, temperature,
                                  lse.data_ptr<acc_t>(), logprob.data_ptr<acc_t>(), nullptr);
    }
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_cpu(
    const at::Tensor& logits, const at::Tensor& targets,
    const std::optional<at::Tensor>& scorer_logits, int64_t ignore_index, double temperature,
    bool with_entropy) {
  check_logits(logits, "logits");
  check_targets(targets, logits.size(0));
  TORCH_CHECK_VALUE(temperature > 0, "temperature: expected > 0, got ", temperature);
  const int64_t N = logits.size(0);
  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor lse = at::empty({N}, opts), logprob = at::empty({N}, opts);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, opts);
  at::Tensor s_lse = at::empty({0}, opts), s_logprob = at::empty({0}, opts);
  stats_pass(logits, targets, ignore_index, temperature, lse, logprob,
             with_entropy ? entropy : at::Tensor());
  if (scorer_logits.has_value()) {
    check_logits(*scorer_logits, "scorer_logits");
    check_same_rows(logits, *scorer_logits, "scorer_logits");
    // The scorer may run in another dtype than the policy: its stats come out in its own
    // accumulation type and are cast to the policy's.
    const auto s_opts = opts.dtype(at::toOpMathType(scorer_logits->scalar_type()));
    s_lse = at::empty({N}, s_opts);
    s_logprob = at::empty({N}, s_opts);
    stats_pass(*scorer_logits, targets, ignore_index, temperature, s_lse, s_logprob, at::Tensor());
    s_lse = s_lse.to(opts.dtype());
    s_logprob = s_logprob.to(opts.dtype());
  }
  return {lse, logprob, entropy, s_lse, s_logprob};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) { m.impl("token_stats", &token_stats_cpu); }

}  // namespace remit::cpu
