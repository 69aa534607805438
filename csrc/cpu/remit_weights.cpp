// remit_weights: per-sequence centering of delta = b - a and the clipped scaled sigmoid
// w = clip(2 sigmoid(delta_hat), 1 - eps, 1 + eps)  (METHODS.md section 2, steps 3-5).
#include <torch/library.h>

#include "cpu/kernels.h"
#include "op_checks.h"

namespace remit::cpu {

namespace {

at::Tensor checked_cu_seqlens(const at::Tensor& cu_seqlens, int64_t N) {
  check_cu_seqlens(cu_seqlens);
  at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* c = cu.const_data_ptr<int64_t>();
  const int64_t S = cu.size(0) - 1;
  TORCH_CHECK_VALUE(c[0] == 0 && c[S] == N, "cu_seqlens: expected to start at 0 and end at the ",
                    "number of tokens ", N, ", got ", c[0], " ... ", c[S]);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(c[s + 1] >= c[s], "cu_seqlens: expected non-decreasing offsets, got ",
                      c[s], " then ", c[s + 1], " at index ", s);
  }
  return cu;
}

template <typename acc_t>
void weights_segments(const acc_t* a, const acc_t* b, const int64_t* y, const int64_t* cu,
                      int64_t S, int64_t ignore_index, acc_t eps, acc_t* w, acc_t* dhat,
                      acc_t* diag) {
  const acc_t lo = acc_t(1) - eps, hi = acc_t(1) + eps;
  at::parallel_for(0, S, 1, [&](int64_t s_begin, int64_t s_end) {
    for (int64_t s = s_begin; s < s_end; ++s) {
      // mu_s over the valid positions only; a sequence with none contributes nothing.
      acc_t sum = 0;
      int64_t n = 0;
      for (int64_t t = cu[s]; t < cu[s + 1]; ++t) {
        if (y[t] == ignore_index) continue;
        sum += b[t] - a[t];
        ++n;
      }
      const acc_t mu = n > 0 ? sum / static_cast<acc_t>(n) : acc_t(0);
      for (int64_t t = cu[s]; t < cu[s + 1]; ++t) {
        if (y[t] == ignore_index) {
          w[t] = dhat[t] = acc_t(0);
          continue;
        }
        const acc_t d = (b[t] - a[t]) - mu;
        const acc_t raw = acc_t(1) + std::tanh(d / acc_t(2));  // 2 sigmoid(d), no overflow
        dhat[t] = d;
        w[t] = raw < lo ? lo : (raw > hi ? hi : raw);
      }
    }
  });
  // Diagnostics over the valid tokens, in double: N is small next to N*V, so one serial pass.
  double sw = 0, sww = 0, sabs = 0, sdelta = 0;
  int64_t n = 0, n_lo = 0, n_hi = 0;
  const int64_t N = cu[S];
  for (int64_t t = 0; t < N; ++t) {
    if (y[t] == ignore_index) continue;
    const double wt = w[t];
    ++n;
    sw += wt;
    sww += wt * wt;
    n_lo += wt <= lo;
    n_hi += wt >= hi;
    sabs += std::abs(static_cast<double>(dhat[t]));
    sdelta += static_cast<double>(b[t]) - static_cast<double>(a[t]);
  }
  const double inv = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  const double mean = sw * inv;
  diag[0] = static_cast<acc_t>(mean);
  // Cancellation can leave a tiny negative variance: 0 then. NaN (a NaN / inf weight) stays
  // NaN (std::max(0.0, NaN) would give 0).
  const double var = sww * inv - mean * mean;
  diag[1] = static_cast<acc_t>(std::sqrt(var < 0.0 ? 0.0 : var));
  diag[2] = static_cast<acc_t>(n_lo * inv);
  diag[3] = static_cast<acc_t>(n_hi * inv);
  diag[4] = static_cast<acc_t>(sabs * inv);
  diag[5] = static_cast<acc_t>(sdelta * inv);
}

}  // namespace

void remit_weights_into(const at::Tensor& logprob, const at::Tensor& scorer_logprob,
                        const at::Tensor& targets, const at::Tensor& cu_seqlens,
                        int64_t ignore_index, double eps, at::Tensor& weights,
                        at::Tensor& delta_hat, at::Tensor& diag) {
  const int64_t N = logprob.size(0);
  check_eps(eps);
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, N);
  const at::Tensor y = targets_as_long(targets);
  const at::Tensor a = logprob.contiguous();
  const at::Tensor b = scorer_logprob.to(a.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "remit_weights", [&] {
    weights_segments<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                               y.const_data_ptr<int64_t>(), cu.const_data_ptr<int64_t>(),
                               cu.size(0) - 1, ignore_index, static_cast<scalar_t>(eps),
                               weights.data_ptr<scalar_t>(), delta_hat.data_ptr<scalar_t>(),
                               diag.data_ptr<scalar_t>());
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> remit_weights_cpu(
    const at::Tensor& logprob, const at::Tensor& scorer_logprob, const at::Tensor& targets,
    const at::Tensor& cu_seqlens, int64_t ignore_index, double eps) {
  check_remit_weights_args(logprob, scorer_logprob, targets);
  const auto opts = logprob.options();
  at::Tensor w = at::empty_like(logprob), dhat = at::empty_like(logprob);
  at::Tensor diag = at::empty({6}, opts);
  remit_weights_into(logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps, w, dhat,
                     diag);
  return {w, dhat, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) { m.impl("remit_weights", &remit_weights_cpu); }

}  // namespace remit::cpu
