// Row primitives shared by every CPU kernel: one row of logits is read from memory once, turned
// into the accumulation type (float for fp32/bf16/fp16, double for fp64), and every statistic or
// gradient of that row is formed from that cache-resident copy.
//
// The data flow, by file:  token_stats.cpp (lse, log-prob, entropy)  ->  remit_weights.cpp
// (segmented centering, clipped sigmoid)  ->  weighted_ce.cpp (per-token loss, w(p - onehot))
// and remit_loss.cpp (all three fused); kd_loss.cpp is the soft-target twin.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace remit::cpu {

template <typename T>
using acc_type = at::opmath_type<T>;

// Row-parallel loops are cheap per row only when V is small; give each task enough elements.
inline int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
}

template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& x) {
  // exp_u20 is the softmax-grade Sleef exp (max 20 ulp) ATen uses for float softmax.
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// max that keeps a NaN from either side (std::max drops one depending on argument order).
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// Returns a pointer to the row in acc_t, scaled by `scale` (1/temperature). fp32/fp64 rows with
// scale 1 are used in place; everything else is converted into `buf` (length >= V).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* src, int64_t V, acc_t scale, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (scale == acc_t(1)) return src;
  }
  if (scale == acc_t(1)) {
    for (int64_t i = 0; i < V; ++i) buf[i] = static_cast<acc_t>(src[i]);
  } else {
    for (int64_t i = 0; i < V; ++i) buf[i] = static_cast<acc_t>(src[i]) * scale;
  }
  return buf;
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t V) {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  if (V >= Vec::size()) {
    Vec vm(m);
    for (; i + Vec::size() <= V; i += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + i));
    m = at::vec::vec_reduce_all<acc_t>(
        [](const Vec& p, const Vec& q) { return at::vec::maximum(p, q); }, vm);
  }
  for (; i < V; ++i) m = nan_max(m, x[i]);
  return m;
}

// Softmax moments of a row around its (finite) max m:
//   s = sum_v e^{x_v - m},  log_s = log(s),  t = sum_v e^{x_v - m} (x_v - m)  (t only if kWithT).
// log_s is formed as log1p(s - 1) with s - 1 = (#maxima - 1) + (mass below the max) summed apart
// from the maxima: on a confident row s is 1 + 1e-8, and log(s) of a rounded s would lose every
// digit of the log-prob (hence of p_y - 1 in the gradient). Working relative to m keeps t free of
// cancellation, and a -inf logit contributes exactly 0 to t instead of 0 * -inf = NaN.
template <typename acc_t>
struct RowMoments {
  acc_t s, log_s, t;
};

template <typename acc_t, bool kWithT>
inline RowMoments<acc_t> row_moments(const acc_t* x, int64_t V, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vm(m), zero(acc_t(0)), one(acc_t(1));
  Vec vbelow(acc_t(0)), vtop(acc_t(0)), vt(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= V; i += Vec::size()) {
    const Vec d = Vec::loadu(x + i) - vm;
    const Vec e = vexp(d);
    const Vec is_top = d == zero;
    vbelow = vbelow + Vec::blendv(e, zero, is_top);
    vtop = vtop + Vec::blendv(zero, one, is_top);
    if constexpr (kWithT) vt = vt + Vec::blendv(e * d, zero, e == zero);
  }
  auto add = [](const Vec& p, const Vec& q) { return p + q; };
  acc_t below = at::vec::vec_reduce_all<acc_t>(add, vbelow);
  acc_t top = at::vec::vec_reduce_all<acc_t>(add, vtop);
  acc_t t = kWithT ? at::vec::vec_reduce_all<acc_t>(add, vt) : acc_t(0);
  for (; i < V; ++i) {
    const acc_t d = x[i] - m;
    if (d == acc_t(0)) {
      top += acc_t(1);
      continue;
    }
    const acc_t e = std::exp(d);
    below += e;
    if constexpr (kWithT) t += (e == acc_t(0)) ? acc_t(0) : e * d;
  }
  const acc_t s_minus_1 = (top - acc_t(1)) + below;
  return {acc_t(1) + s_minus_1, std::log1p(s_minus_1), t};
}

// The part of LSE that the saved lse = m + log s lost to rounding: lse_true = lse + delta.
// At |lse| ~ 5e3 an fp32 lse is off by up to half an ulp, 2.4e-4, and e^{x_v - lse} carries
// that as a relative error of every p_v (the statistics themselves are formed around m and keep
// it). The saved log-prob a = (x_y - m) - log s is an O(1) number whose rounding is far smaller,
// and x_y - a = m + log s, so delta = (x_y - lse) - a, off by ~an ulp of a. It is taken only
// where that is finer than lse's own ulp (|a| <= |lse| / 2: a target within ~lse of the top) and
// where it is a rounding (|delta| <= an ulp of lse: a caller's unrelated pair, a -inf or NaN
// target logit or log-prob fail it); elsewhere lse is used as given.
template <typename acc_t>
inline acc_t lse_rounding(acc_t lse, acc_t logprob, acc_t x_y) {
  const acc_t delta = (x_y - lse) - logprob;
  const acc_t ulp = std::abs(lse) * std::numeric_limits<acc_t>::epsilon();
  return std::abs(logprob) <= std::abs(lse) * acc_t(0.5) && std::abs(delta) <= ulp ? delta
                                                                                   : acc_t(0);
}

// Cross-entropy gradient of one row: out_v = coef * (e^{x_v - lse} - [v == y]).
// The target entry is formed as coef * expm1(a) from the saved log-prob a = (x_y - m) - log s
// (METHODS.md section 5): neither a rounded p_y nor x_y - lse, whose rounding of lse alone loses
// all digits of p_y - 1 on confident rows. The other entries are coef e^{-delta} e^{x_v - lse}
// (lse_rounding): the correction rides in the row's coefficient, so an element still costs one
// subtraction, one exp and one multiply. `out` may alias the source row (in-place backward):
// every element is read before it is written.
template <typename scalar_t, typename acc_t>
inline void write_ce_grad(const acc_t* x, int64_t V, acc_t lse, acc_t logprob, acc_t coef,
                          int64_t y, scalar_t* out, acc_t* buf) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (!std::isfinite(lse)) {  // undefined softmax (see token_stats): the whole row is NaN
    std::fill(out, out + V, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
  const acc_t target_grad = coef * std::expm1(logprob);
  coef *= std::exp(-lse_rounding(lse, logprob, x[y]));
  acc_t* dst = nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    dst = out;
  } else {
    dst = buf;  // half types: form in acc_t (buf may be the row itself), round once at the end
  }
  const Vec vlse(lse), vcoef(coef);
  int64_t i = 0;
  for (; i + Vec::size() <= V; i += Vec::size()) {
    (vexp(Vec::loadu(x + i) - vlse) * vcoef).store(dst + i);
  }
  for (; i < V; ++i) dst[i] = coef * std::exp(x[i] - lse);
  dst[y] = target_grad;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < V; ++j) out[j] = static_cast<scalar_t>(dst[j]);
  }
}

// A fresh [N, V] gradient buffer. Its first touch dominates a CPU backward when it is made of
// 4 KiB pages (one fault per page: ~130k faults for 500 MB); asking for transparent huge pages
// on its 2 MiB-aligned interior, as torch's own THP_MEM_ALLOC_ENABLE does, cuts that ~500x.
// madvise is only advice: where THP is off it fails and nothing changes.
inline at::Tensor empty_grad_like(const at::Tensor& logits) {
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
#ifdef MADV_HUGEPAGE
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const auto first = reinterpret_cast<std::uintptr_t>(grad.data_ptr());
  const std::uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (first + grad.nbytes()) & ~(kHuge - 1);
  if (end > begin) {
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return grad;
}

template <typename scalar_t>
inline void zero_row(scalar_t* out, int64_t V) {
  std::fill(out, out + V, scalar_t(0));
}

// A target is checked where a kernel reads it (the shape and dtype checks: op_checks.h).
inline void check_target_value(int64_t y, int64_t V, int64_t row, int64_t ignore_index,
                               const char* name = "targets") {
  TORCH_CHECK_VALUE(y >= 0 && y < V, name, ": expected values in [0, ", V,
                    ") or ignore_index=", ignore_index, ", got ", y, " at position ", row);
}

}  // namespace remit::cpu
