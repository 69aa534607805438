// Row primitives of the CPU kernels, for one instruction set: included by rows.cpp only, which
// CMake compiles once per ISA with CPU_CAPABILITY set (DEFAULT, AVX2, AVX512, AVX512_BF16), so
// everything here lives in remit::cpu::CPU_CAPABILITY and no copy is shared between ISAs.
//
// A row is read from memory once: elements are converted to the accumulation type (float for
// fp32/bf16/fp16, double for fp64) in registers, with no row buffer; the statistics run online
// (a running max per lane, rescaled block by block) and the gradient converts back on store.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace remit::cpu::CPU_CAPABILITY {

template <typename T>
using acc_type = at::opmath_type<T>;

template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_type<scalar_t>>;

// Elements per step of every row loop: two accumulation vectors (a bf16/fp16 load converts to
// exactly two).
template <typename scalar_t>
constexpr int64_t kStep = 2 * AccVec<scalar_t>::size();

// Row-parallel loops are cheap per row only when V is small; give each task enough elements.
inline int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
}

// Hardware prefetchers follow one stream well but lose it at row ends and across the two
// streams of KD; a software prefetch ~4 KiB ahead keeps the one-read statistics fed (without it
// a one-read loop was slower than two passes on large tensors).
constexpr int64_t kPrefetchBytes = 4096;

template <typename scalar_t>
inline void prefetch(const scalar_t* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 0, 3);
}

// kStep<scalar_t> elements at p, as two accumulation vectors.
template <typename scalar_t>
inline void load2(const scalar_t* p, AccVec<scalar_t>& a, AccVec<scalar_t>& b) {
  using Vec = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  } else {
    at::vec::load_to_float(p, a, b);
  }
}

// Two accumulation vectors rounded to scalar_t and stored at p (kStep<scalar_t> elements).
template <typename scalar_t>
inline void store2(const AccVec<scalar_t>& a, const AccVec<scalar_t>& b, scalar_t* p) {
  using Vec = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    a.store(p);
    b.store(p + Vec::size());
  } else {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // One instruction for 32 elements, round to nearest even as c10::BFloat16 rounds; unlike
      // it, denormal inputs and outputs are flushed to zero (|g| < 1.2e-38 stores as 0).
      const __m512bh h = _mm512_cvtne2ps_pbh(__m512(b), __m512(a));
      _mm512_storeu_si512(reinterpret_cast<void*>(p), reinterpret_cast<__m512i>(h));
      return;
    }
#endif
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
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

// Softmax moments of one row x * scale around its max m:
//   s = sum_v e^{x_v - m},  log_s = log(s),  t = sum_v e^{x_v - m} (x_v - m)  (t only if kWithT).
// log_s is formed as log1p(s - 1) with s - 1 = (#maxima - 1) + (mass below the max) summed apart
// from the maxima: on a confident row s is 1 + 1e-8, and log(s) of a rounded s would lose every
// digit of the log-prob (hence of p_y - 1 in the gradient). Working relative to m keeps t free of
// cancellation, and a -inf logit contributes exactly 0 to t instead of 0 * -inf = NaN.
// A row whose max is +inf or NaN, or that is all -inf, has no softmax: m says which (+inf / NaN /
// -inf) and s, log_s, t are unspecified.
template <typename acc_t>
struct RowMoments {
  acc_t m, s, log_s, t;
};

// One read of the row. Each lane keeps its own running max m_l, the count of elements equal to
// it, the mass below it and t around it; a block of kBlock elements is loaded into registers,
// its max taken, the lanes whose max grew rescaled once (s' = e^{m - m'} s, t' = e^{m - m'}
// (t + s (m - m'))), then the block's terms added around the new max. The lanes are merged at
// the end the same way. Lanes start at the lowest finite value with nothing summed, so -inf
// elements add exactly 0 and an all -inf row is recognised by having no element at its max.
template <typename scalar_t, bool kWithT>
inline RowMoments<acc_type<scalar_t>> row_moments(const scalar_t* x, int64_t V,
                                                  acc_type<scalar_t> scale) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kPairs = 2;  // two load2 per block: 4 vectors
  constexpr int64_t kBlock = kPairs * kStep<scalar_t>;
  constexpr int kVecs = 2 * kPairs;
  const Vec vscale(scale), zero(acc_t(0)), one(acc_t(1));
  Vec vm(std::numeric_limits<acc_t>::lowest()), top(acc_t(0)), below(acc_t(0)), vt(acc_t(0));

  auto block = [&](Vec (&v)[kVecs]) {
    Vec bm = v[0];
    for (int k = 1; k < kVecs; ++k) bm = at::vec::maximum(bm, v[k]);
    const Vec mn = at::vec::maximum(vm, bm);  // NaN stays NaN
    const Vec grew = mn > vm;
    const Vec f = vexp(vm - mn);
    const Vec gone = f == zero;  // the old terms vanish next to the new max
    const Vec s_old = top + below;
    below = Vec::blendv(below, Vec::blendv(f * s_old, zero, gone), grew);
    if constexpr (kWithT) {
      vt = Vec::blendv(vt, Vec::blendv(f * (vt + s_old * (vm - mn)), zero, gone), grew);
    }
    top = Vec::blendv(top, zero, grew);
    vm = mn;
    for (int k = 0; k < kVecs; ++k) {
      const Vec d = v[k] - vm;
      const Vec e = vexp(d);
      const Vec is_top = d == zero;
      below = below + Vec::blendv(e, zero, is_top);
      top = top + Vec::blendv(zero, one, is_top);
      if constexpr (kWithT) vt = vt + Vec::blendv(e * d, zero, e == zero);
    }
  };

  Vec v[kVecs];
  int64_t i = 0;
  for (; i + kBlock <= V; i += kBlock) {
    prefetch(x + i);
    for (int k = 0; k < kPairs; ++k) {
      load2(x + i + k * kStep<scalar_t>, v[2 * k], v[2 * k + 1]);
      v[2 * k] = v[2 * k] * vscale;
      v[2 * k + 1] = v[2 * k + 1] * vscale;
    }
    block(v);
  }
  if (i < V) {  // the tail, padded with -inf (which adds nothing)
    alignas(64) acc_t tail[kBlock];
    std::fill(tail, tail + kBlock, -std::numeric_limits<acc_t>::infinity());
    for (int64_t j = i; j < V; ++j) tail[j - i] = static_cast<acc_t>(x[j]) * scale;
    for (int k = 0; k < kVecs; ++k) v[k] = Vec::loadu(tail + k * Vec::size());
    block(v);
  }

  alignas(64) acc_t lm[Vec::size()], ltop[Vec::size()], lbelow[Vec::size()], lt[Vec::size()];
  vm.store(lm);
  top.store(ltop);
  below.store(lbelow);
  vt.store(lt);
  acc_t m = lm[0];
  for (int l = 1; l < Vec::size(); ++l) m = nan_max(m, lm[l]);
  RowMoments<acc_t> out{m, acc_t(0), acc_t(0), acc_t(0)};
  if (!std::isfinite(m)) return out;  // NaN or +inf
  acc_t n_top = 0, mass = 0, t = 0;
  for (int l = 0; l < Vec::size(); ++l) {
    if (lm[l] == m) {
      n_top += ltop[l];
      mass += lbelow[l];
      if constexpr (kWithT) t += lt[l];
      continue;
    }
    const acc_t f = std::exp(lm[l] - m);
    if (f == acc_t(0)) continue;
    const acc_t s_l = ltop[l] + lbelow[l];
    mass += f * s_l;
    if constexpr (kWithT) t += f * (lt[l] + s_l * (lm[l] - m));
  }
  if (n_top == acc_t(0)) {  // no element at the max: every element is -inf
    out.m = -std::numeric_limits<acc_t>::infinity();
    return out;
  }
  const acc_t s_minus_1 = (n_top - acc_t(1)) + mass;
  out.s = acc_t(1) + s_minus_1;
  out.log_s = std::log1p(s_minus_1);
  out.t = t;
  return out;
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

template <typename scalar_t>
inline void fill_row(scalar_t* out, int64_t V, acc_type<scalar_t> value) {
  std::fill(out, out + V, static_cast<scalar_t>(value));
}

// out_v = g(e^{x_v * scale - lse}) for every v, one read of x and one write of out (out may be
// x): the shared loop of the gradients. g maps a vector of p (and x * scale - lse) to the
// gradient in the accumulation type.
template <typename scalar_t, typename G, typename GScalar>
inline void map_row_p(const scalar_t* x, int64_t V, acc_type<scalar_t> scale,
                      acc_type<scalar_t> lse, scalar_t* out, const G& g, const GScalar& g1) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const Vec vlse(lse), vscale(scale);
  int64_t i = 0;
  for (; i + kStep<scalar_t> <= V; i += kStep<scalar_t>) {
    prefetch(x + i);
    Vec a, b;
    load2(x + i, a, b);
    const Vec la = a * vscale - vlse, lb = b * vscale - vlse;
    store2(g(vexp(la), la), g(vexp(lb), lb), out + i);
  }
  for (; i < V; ++i) {
    const acc_t l = static_cast<acc_t>(x[i]) * scale - lse;
    out[i] = static_cast<scalar_t>(g1(std::exp(l), l));
  }
}

// A target is checked where a kernel reads it (the shape and dtype checks: op_checks.h).
inline void check_target_value(int64_t y, int64_t V, int64_t row, int64_t ignore_index,
                               const char* name = "targets") {
  TORCH_CHECK_VALUE(y >= 0 && y < V, name, ": expected values in [0, ", V,
                    ") or ignore_index=", ignore_index, ", got ", y, " at position ", row);
}

}  // namespace remit::cpu::CPU_CAPABILITY
