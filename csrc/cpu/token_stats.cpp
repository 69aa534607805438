// token_stats: lse, target log-prob, entropy and top-k entropy of policy (and scorer) rows, one
// read per row.
#include <torch/library.h>

#include <algorithm>
#include <functional>

#include "cpu/kernels.h"
#include "cpu/row_ops.h"
#include "op_checks.h"

namespace remit::cpu {

at::Tensor targets_as_long(const at::Tensor& targets) {
  return targets.to(at::kLong).contiguous();
}

namespace {

// Entropy of the k largest probabilities p_j = e^{x_j - lse} (RMT/RPT token difficulty):
// -sum_j p_j log p_j, or with `renormalize` that of q_j = p_j / sum_j p_j. nth_element on a
// scratch copy finds the k largest in O(V). log p_j is (x_j - m) - log s, not x_j - lse: lse
// rounded to fp32 is off by up to 2.4e-4 at |lse| ~ 5e3, an error every p_j and log p_j would
// carry (one more subtraction on k elements).
template <typename acc_t>
acc_t topk_entropy(const acc_t* x, int64_t V, acc_t m, acc_t log_s, int64_t k, bool renormalize,
                   std::vector<acc_t>& scratch) {
  k = std::min(k, V);
  scratch.assign(x, x + V);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<>());
  acc_t h = 0, mass = 0;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t logp = (scratch[j] - m) - log_s;
    const acc_t p = std::exp(logp);
    mass += p;
    if (p > acc_t(0)) h -= p * logp;
  }
  // -sum q log q = (h + mass log mass) / mass  with q = p / mass
  return renormalize ? (mass > acc_t(0) ? h / mass + std::log(mass) : acc_t(0)) : h;
}

template <typename scalar_t, bool kEntropy>
void stats_rows(const at::Tensor& logits, const int64_t* y, int64_t ignore_index,
                double temperature, int64_t topk, bool topk_renormalize, acc_type<scalar_t>* lse,
                acc_type<scalar_t>* logprob, acc_type<scalar_t>* entropy,
                acc_type<scalar_t>* topk_ent) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const acc_t scale = acc_t(1) / static_cast<acc_t>(temperature);
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(V), scratch;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t target = y[r];
      if (target == ignore_index) {
        lse[r] = logprob[r] = acc_t(0);
        if constexpr (kEntropy) entropy[r] = acc_t(0);
        if (topk_ent) topk_ent[r] = acc_t(0);
        continue;
      }
      check_target_value(target, V, r, ignore_index);
      const acc_t* x = load_row(base + r * row_stride, V, scale, buf.data());
      const acc_t m = row_max(x, V);
      if (!std::isfinite(m)) {
        // A +inf or NaN logit, or an all -inf row: softmax is undefined. lse follows
        // torch.logsumexp (+-inf / NaN); everything derived from p is NaN, as log_softmax gives.
        lse[r] = m;
        logprob[r] = kNaN;
        if constexpr (kEntropy) entropy[r] = kNaN;
        if (topk_ent) topk_ent[r] = kNaN;
        continue;
      }
      const RowMoments<acc_t> mo = row_moments<acc_t, kEntropy>(x, V, m);
      lse[r] = m + mo.log_s;
      logprob[r] = (x[target] - m) - mo.log_s;
      if constexpr (kEntropy) entropy[r] = mo.log_s - mo.t / mo.s;  // H = LSE - sum p x
      if (topk_ent) {
        topk_ent[r] = topk_entropy(x, V, m, mo.log_s, topk, topk_renormalize, scratch);
      }
    }
  });
}

}  // namespace

void stats_pass(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                double temperature, int64_t topk, bool topk_renormalize, StatsOut& out) {
  const at::Tensor x = row_major(logits);
  const at::Tensor y = targets_as_long(targets);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_stats", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* topk_ent = out.topk_entropy.defined() ? out.topk_entropy.data_ptr<acc_t>() : nullptr;
    if (out.entropy.defined()) {
      stats_rows<scalar_t, true>(x, y.const_data_ptr<int64_t>(), ignore_index, temperature, topk,
                                 topk_renormalize, out.lse.data_ptr<acc_t>(),
                                 out.logprob.data_ptr<acc_t>(), out.entropy.data_ptr<acc_t>(),
                                 topk_ent);
    } else {
      stats_rows<scalar_t, false>(x, y.const_data_ptr<int64_t>(), ignore_index, temperature,
                                  topk, topk_renormalize, out.lse.data_ptr<acc_t>(),
                                  out.logprob.data_ptr<acc_t>(), nullptr, topk_ent);
    }
  });
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

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) { m.impl("token_stats", &token_stats_cpu); }

}  // namespace remit::cpu
