// token_stats: lse, target log-prob, entropy and top-k entropy of policy (and scorer) rows, one
// read per row (the row loop: rows.cpp).
#include <torch/library.h>

#include "cpu/kernels.h"
#include "op_checks.h"

namespace remit::cpu {

at::Tensor targets_as_long(const at::Tensor& targets) {
  return targets.to(at::kLong).contiguous();
}

void stats_pass(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                double temperature, int64_t topk, bool topk_renormalize, StatsOut& out) {
  const at::Tensor x = row_major(logits);
  const at::Tensor y = targets_as_long(targets);
  auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  const StatsJob job{x.const_data_ptr(), x.size(0), x.size(1), x.stride(0),
                     y.const_data_ptr<int64_t>(), ignore_index, temperature, topk,
                     topk_renormalize, out.lse.data_ptr(), out.logprob.data_ptr(),
                     ptr(out.entropy), topk > 0 ? ptr(out.topk_entropy) : nullptr};
  row_kernels().stats(x.scalar_type(), job);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
token_stats_cpu(const at::Tensor& logits, const at::Tensor& targets,
                const std::optional<at::Tensor>& scorer_logits, int64_t ignore_index,
                double temperature, bool with_entropy, int64_t topk, bool topk_renormalize) {
  check_logits(logits, "logits");
  check_targets(targets, logits.size(0));
  check_temperature(temperature);
  check_topk(topk);
  const int64_t N = logits.size(0);
  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  StatsOut out{at::empty({N}, opts), at::empty({N}, opts), at::empty({with_entropy ? N : 0}, opts),
               at::empty({topk > 0 ? N : 0}, opts)};
  at::Tensor entropy = out.entropy, topk_entropy = out.topk_entropy;
  if (!with_entropy) out.entropy = at::Tensor();
  if (topk == 0) out.topk_entropy = at::Tensor();
  stats_pass(logits, targets, ignore_index, temperature, topk, topk_renormalize, out);
  at::Tensor s_lse = at::empty({0}, opts), s_logprob = at::empty({0}, opts);
  if (scorer_logits.has_value()) {
    check_logits(*scorer_logits, "scorer_logits");
    check_same_rows(logits, *scorer_logits, "scorer_logits");
    // The scorer may run in another dtype than the policy: its stats come out in its own
    // accumulation type and are cast to the policy's.
    const auto s_opts = opts.dtype(at::toOpMathType(scorer_logits->scalar_type()));
    StatsOut s_out{at::empty({N}, s_opts), at::empty({N}, s_opts), {}, {}};
    stats_pass(*scorer_logits, targets, ignore_index, temperature, 0, false, s_out);
    s_lse = s_out.lse.to(opts.dtype());
    s_logprob = s_out.logprob.to(opts.dtype());
  }
  return {out.lse, out.logprob, entropy, topk_entropy, s_lse, s_logprob};
}

// The gradient of the statistics into `grad` (which may be `logits`).
void stats_grad_into(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                     const at::Tensor& logprob, const std::optional<at::Tensor>& entropy,
                     const std::optional<at::Tensor>& g_logprob,
                     const std::optional<at::Tensor>& g_entropy,
                     const std::optional<at::Tensor>& g_lse, int64_t ignore_index,
                     double temperature, at::Tensor& grad) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0);
  check_targets(targets, N);
  check_temperature(temperature);
  check_per_token_float(lse, N, "lse");
  check_per_token_float(logprob, N, "logprob");
  const auto acc = at::toOpMathType(logits.scalar_type());
  // Optional per-token tensors in the accumulation dtype; undefined when not given.
  auto opt = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return at::Tensor();
    check_per_token_float(*t, N, name);
    return per_token_acc(*t, acc);
  };
  const at::Tensor ent = opt(entropy, "entropy"), g_lp = opt(g_logprob, "g_logprob");
  const at::Tensor g_ent = opt(g_entropy, "g_entropy"), g_l = opt(g_lse, "g_lse");
  const at::Tensor y = targets_as_long(targets);
  const at::Tensor l = per_token_acc(lse, acc), a = per_token_acc(logprob, acc);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
  const StatsGradJob job{logits.const_data_ptr(), N, logits.size(1), logits.stride(0),
                         y.const_data_ptr<int64_t>(), ignore_index, temperature,
                         l.const_data_ptr(), a.const_data_ptr(), ptr(ent), ptr(g_lp),
                         ptr(g_ent), ptr(g_l), grad.data_ptr(), grad.stride(0)};
  row_kernels().stats_grad(logits.scalar_type(), job);
}

at::Tensor token_stats_bwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                               const at::Tensor& lse, const at::Tensor& logprob,
                               const std::optional<at::Tensor>& entropy,
                               const std::optional<at::Tensor>& g_logprob,
                               const std::optional<at::Tensor>& g_entropy,
                               const std::optional<at::Tensor>& g_lse, int64_t ignore_index,
                               double temperature) {
  check_logits(logits, "logits");
  const at::Tensor x = row_major(logits);
  at::Tensor grad = empty_grad_like(x);
  stats_grad_into(x, targets, lse, logprob, entropy, g_logprob, g_entropy, g_lse, ignore_index,
                  temperature, grad);
  return grad;
}

void token_stats_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& lse, const at::Tensor& logprob,
                                 const std::optional<at::Tensor>& entropy,
                                 const std::optional<at::Tensor>& g_logprob,
                                 const std::optional<at::Tensor>& g_entropy,
                                 const std::optional<at::Tensor>& g_lse, int64_t ignore_index,
                                 double temperature) {
  check_logits(logits, "logits");
  check_inplace_rows(logits);
  stats_grad_into(logits, targets, lse, logprob, entropy, g_logprob, g_entropy, g_lse,
                  ignore_index, temperature, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) {
  m.impl("token_stats", &token_stats_cpu);
  m.impl("token_stats_bwd", &token_stats_bwd_cpu);
  m.impl("token_stats_bwd_", &token_stats_bwd_inplace_cpu);
}

}  // namespace remit::cpu
