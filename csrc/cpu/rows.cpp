// Every loop over [N, V] logits rows on the CPU, compiled once per instruction set (rows.h):
// statistics (token_stats, the loss forwards, KD, pg), the cross-entropy gradient, the gradient
// of the statistics (linear_token_stats backward) and KD's. One read of each row, converted in
// registers (row_ops.h); invalid rows (target == ignore_index) get 0.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/row_ops.h"
#include "cpu/rows.h"
#include "pg_terms.h"

#define REMIT_STR2(x) #x
#define REMIT_STR(x) REMIT_STR2(x)

namespace remit::cpu::CPU_CAPABILITY {

namespace {

template <typename T>
const T* in(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* out(void* p) {
  return static_cast<T*>(p);
}

// ------------------------------------------------------------------------------- statistics

// Entropy of the k largest probabilities p_j = e^{x_j - lse} (RMT/RPT token difficulty):
// -sum_j p_j log p_j, or with `renormalize` that of q_j = p_j / sum_j p_j. nth_element on a
// scratch copy finds the k largest in O(V). log p_j is (x_j - m) - log s, not x_j - lse: lse
// rounded to fp32 is off by up to 2.4e-4 at |lse| ~ 5e3, an error every p_j and log p_j would
// carry (one more subtraction on k elements).
template <typename scalar_t>
acc_type<scalar_t> topk_entropy(const scalar_t* x, int64_t V, acc_type<scalar_t> scale,
                                acc_type<scalar_t> m, acc_type<scalar_t> log_s, int64_t k,
                                bool renormalize, std::vector<acc_type<scalar_t>>& scratch) {
  using acc_t = acc_type<scalar_t>;
  k = std::min(k, V);
  scratch.resize(V);
  for (int64_t i = 0; i < V; ++i) scratch[i] = static_cast<acc_t>(x[i]) * scale;
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
void stats_rows(const StatsJob& j) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* base = in<scalar_t>(j.logits);
  const int64_t* y = j.targets;
  acc_t *lse = out<acc_t>(j.lse), *logprob = out<acc_t>(j.logprob);
  acc_t *entropy = out<acc_t>(j.entropy), *topk_ent = out<acc_t>(j.topk_entropy);
  const int64_t V = j.V;
  const acc_t scale = acc_t(1) / static_cast<acc_t>(j.temperature);
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, j.N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t target = y[r];
      if (target == j.ignore_index) {
        lse[r] = logprob[r] = acc_t(0);
        if constexpr (kEntropy) entropy[r] = acc_t(0);
        if (topk_ent) topk_ent[r] = acc_t(0);
        continue;
      }
      check_target_value(target, V, r, j.ignore_index);
      const scalar_t* x = base + r * j.stride;
      const RowMoments<acc_t> mo = row_moments<scalar_t, kEntropy>(x, V, scale);
      if (!std::isfinite(mo.m)) {
        // A +inf or NaN logit, or an all -inf row: softmax is undefined. lse follows
        // torch.logsumexp (+-inf / NaN); everything derived from p is NaN, as log_softmax gives.
        lse[r] = mo.m;
        logprob[r] = kNaN;
        if constexpr (kEntropy) entropy[r] = kNaN;
        if (topk_ent) topk_ent[r] = kNaN;
        continue;
      }
      lse[r] = mo.m + mo.log_s;
      logprob[r] = (static_cast<acc_t>(x[target]) * scale - mo.m) - mo.log_s;
      if constexpr (kEntropy) entropy[r] = mo.log_s - mo.t / mo.s;  // H = LSE - sum p x
      if (topk_ent) {
        topk_ent[r] = topk_entropy(x, V, scale, mo.m, mo.log_s, j.topk, j.topk_renormalize,
                                   scratch);
      }
    }
  });
}

void stats(c10::ScalarType dtype, const StatsJob& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "token_stats", [&] {
    if (j.entropy) {
      stats_rows<scalar_t, true>(j);
    } else {
      stats_rows<scalar_t, false>(j);
    }
  });
}

// ---------------------------------------------------------------- cross-entropy gradient

// out_v = coef (e^{x_v - lse} - [v == y]). The target entry is formed as coef * expm1(a) from
// the saved log-prob a = (x_y - m) - log s (METHODS.md section 5): neither a rounded p_y nor
// x_y - lse, whose rounding of lse alone loses all digits of p_y - 1 on confident rows. The
// other entries are coef e^{-delta} e^{x_v - lse} (lse_rounding): the correction rides in the
// row's coefficient, so an element still costs one subtraction, one exp and one multiply.
template <typename scalar_t>
void ce_grad_rows(const CeGradJob& j) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const scalar_t* src = in<scalar_t>(j.logits);
  scalar_t* dst = out<scalar_t>(j.grad);
  const acc_t *lse = in<acc_t>(j.lse), *logprob = in<acc_t>(j.logprob), *coef = in<acc_t>(j.coef);
  const int64_t V = j.V;
  at::parallel_for(0, j.N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = dst + r * j.out_stride;
      const int64_t y = j.targets[r];
      if (y == j.ignore_index) {
        fill_row(o, V, acc_t(0));
        continue;
      }
      check_target_value(y, V, r, j.ignore_index);
      if (!std::isfinite(lse[r])) {  // undefined softmax (see stats): the whole row is NaN
        fill_row(o, V, std::numeric_limits<acc_t>::quiet_NaN());
        continue;
      }
      const scalar_t* x = src + r * j.in_stride;
      const acc_t target_grad = coef[r] * std::expm1(logprob[r]);
      const acc_t c = coef[r] * std::exp(-lse_rounding(lse[r], logprob[r],
                                                       static_cast<acc_t>(x[y])));
      const Vec vc(c);
      map_row_p(x, V, acc_t(1), lse[r], o, [&](const Vec& p, const Vec&) { return p * vc; },
                [&](acc_t p, acc_t) { return c * p; });
      o[y] = static_cast<scalar_t>(target_grad);
    }
  });
}

void ce_grad(c10::ScalarType dtype, const CeGradJob& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ce_grad",
                                  [&] { ce_grad_rows<scalar_t>(j); });
}

// ------------------------------------------------------------ gradient of the statistics

// With x = z / T, p = softmax(x), a = log p_y, H = -sum p log p:
//   dx = p (alpha - g_ent log p) + g_lp onehot(y),  alpha = g_lse - g_lp - g_ent H,  dz = dx / T,
// p and log p formed as e^{-delta} e^{x - lse} and (x - lse) - delta (lse_rounding), the target
// column as p_y base - g_lp expm1(a) - g_ent p_y a with base = g_lse - g_ent H, so a confident
// row keeps the digits of g_lp (p_y - 1).
// A target outside [0, V) gets the p terms and no one-hot (remit_ext/_grads.py does the same).
// p = 0 contributes 0, never 0 * inf.
template <typename scalar_t>
void stats_grad_rows(const StatsGradJob& j) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const scalar_t* src = in<scalar_t>(j.logits);
  scalar_t* dst = out<scalar_t>(j.grad);
  const acc_t *lse = in<acc_t>(j.lse), *logprob = in<acc_t>(j.logprob);
  const acc_t* entropy = in<acc_t>(j.entropy);
  const acc_t *g_lp = in<acc_t>(j.g_lp), *g_lse = in<acc_t>(j.g_lse);
  const acc_t* g_ent = entropy ? in<acc_t>(j.g_ent) : nullptr;
  const int64_t V = j.V;
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(j.temperature);
  at::parallel_for(0, j.N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = dst + r * j.out_stride;
      const int64_t y = j.targets[r];
      if (y == j.ignore_index) {
        fill_row(o, V, acc_t(0));
        continue;
      }
      if (!std::isfinite(lse[r])) {
        fill_row(o, V, std::numeric_limits<acc_t>::quiet_NaN());
        continue;
      }
      const scalar_t* x = src + r * j.in_stride;
      const acc_t a = logprob[r];
      const acc_t glp = g_lp ? g_lp[r] : acc_t(0);
      const acc_t gent = g_ent ? g_ent[r] : acc_t(0);
      const acc_t base = (g_lse ? g_lse[r] : acc_t(0)) - (g_ent ? gent * entropy[r] : acc_t(0));
      const acc_t alpha = base - glp;
      const bool hit = y >= 0 && y < V;
      const acc_t delta = hit ? lse_rounding(lse[r], a, static_cast<acc_t>(x[y]) * inv_t)
                              : acc_t(0);
      const acc_t c = std::exp(-delta);
      if (g_ent) {
        // p_true (alpha - g_ent log p_true) = p (k1 + k2 logp), over T.
        const acc_t k1 = (alpha + gent * delta) * c * inv_t, k2 = -gent * c * inv_t;
        const Vec vk1(k1), vk2(k2), zero(acc_t(0));
        map_row_p(
            x, V, inv_t, lse[r], o,
            [&](const Vec& p, const Vec& l) {
              return Vec::blendv(p * (vk1 + vk2 * l), zero, p == zero);
            },
            [&](acc_t p, acc_t l) { return p == acc_t(0) ? acc_t(0) : p * (k1 + k2 * l); });
      } else {
        const acc_t k = alpha * c * inv_t;
        const Vec vk(k);
        map_row_p(x, V, inv_t, lse[r], o, [&](const Vec& p, const Vec&) { return p * vk; },
                  [&](acc_t p, acc_t) { return p * k; });
      }
      if (hit) {
        const acc_t p_y = std::exp(a);
        acc_t col = p_y * base - glp * std::expm1(a);
        if (g_ent) col -= gent * (p_y == acc_t(0) ? acc_t(0) : p_y * a);
        o[y] = static_cast<scalar_t>(col * inv_t);
      }
    }
  });
}

void stats_grad(c10::ScalarType dtype, const StatsGradJob& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "token_stats_grad",
                                  [&] { stats_grad_rows<scalar_t>(j); });
}

// -------------------------------------------------------------------------------------- KD

// sum_v e^{xT_v - mT} (x_v - m) over the scaled rows: the teacher-weighted student logit,
// relative to both maxima. A teacher probability of exactly 0 contributes 0 even where the
// student logit is -inf.
template <typename scalar_t>
acc_type<scalar_t> teacher_dot(const scalar_t* x, const scalar_t* xt, int64_t V,
                               acc_type<scalar_t> scale, acc_type<scalar_t> m,
                               acc_type<scalar_t> mt) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const Vec vm(m), vmt(mt), vs(scale), zero(acc_t(0));
  Vec acc(acc_t(0));
  int64_t i = 0;
  for (; i + kStep<scalar_t> <= V; i += kStep<scalar_t>) {
    prefetch(x + i);
    prefetch(xt + i);
    Vec a, b, ta, tb;
    load2(x + i, a, b);
    load2(xt + i, ta, tb);
    const Vec ea = vexp(ta * vs - vmt), eb = vexp(tb * vs - vmt);
    acc = acc + Vec::blendv(ea * (a * vs - vm), zero, ea == zero);
    acc = acc + Vec::blendv(eb * (b * vs - vm), zero, eb == zero);
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](const Vec& p, const Vec& q) { return p + q; }, acc);
  for (; i < V; ++i) {
    const acc_t et = std::exp(static_cast<acc_t>(xt[i]) * scale - mt);
    sum += et == acc_t(0) ? acc_t(0) : et * (static_cast<acc_t>(x[i]) * scale - m);
  }
  return sum;
}

template <typename scalar_t>
void kd_fwd_rows(const KdFwdJob& j) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t *z = in<scalar_t>(j.z), *zt = in<scalar_t>(j.zt);
  acc_t *loss = out<acc_t>(j.loss), *lse = out<acc_t>(j.lse), *lse_t = out<acc_t>(j.lse_t);
  const int64_t V = j.V;
  const acc_t scale = acc_t(1) / static_cast<acc_t>(j.temperature);
  at::parallel_for(0, j.N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = j.targets[r];
      if (y == j.ignore_index) {
        loss[r] = lse[r] = lse_t[r] = acc_t(0);
        continue;
      }
      check_target_value(y, V, r, j.ignore_index);
      const scalar_t *x = z + r * j.z_stride, *xt = zt + r * j.zt_stride;
      const RowMoments<acc_t> mo = row_moments<scalar_t, false>(x, V, scale);
      const RowMoments<acc_t> mo_t = row_moments<scalar_t, false>(xt, V, scale);
      if (!std::isfinite(mo.m) || !std::isfinite(mo_t.m)) {  // undefined softmax on either side
        lse[r] = mo.m;
        lse_t[r] = mo_t.m;
        loss[r] = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      lse[r] = mo.m + mo.log_s;
      lse_t[r] = mo_t.m + mo_t.log_s;
      // LSE(x) - sum q x = log s - sum q (x - m)
      loss[r] = mo.log_s - teacher_dot(x, xt, V, scale, mo.m, mo_t.m) / mo_t.s;
    }
  });
}

void kd_fwd(c10::ScalarType dtype, const KdFwdJob& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kd_fwd",
                                  [&] { kd_fwd_rows<scalar_t>(j); });
}

// grad = coef (p - q) / T
template <typename scalar_t>
void kd_bwd_rows(const KdBwdJob& j) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const scalar_t *z = in<scalar_t>(j.z), *zt = in<scalar_t>(j.zt);
  scalar_t* dst = out<scalar_t>(j.grad);
  const acc_t *lse = in<acc_t>(j.lse), *lse_t = in<acc_t>(j.lse_t), *coef = in<acc_t>(j.coef);
  const int64_t V = j.V;
  const acc_t scale = acc_t(1) / static_cast<acc_t>(j.temperature);
  at::parallel_for(0, j.N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = dst + r * j.out_stride;
      if (j.targets[r] == j.ignore_index) {
        fill_row(o, V, acc_t(0));
        continue;
      }
      if (!std::isfinite(lse[r]) || !std::isfinite(lse_t[r])) {
        fill_row(o, V, std::numeric_limits<acc_t>::quiet_NaN());
        continue;
      }
      const scalar_t *x = z + r * j.z_stride, *xt = zt + r * j.zt_stride;
      const acc_t c = coef[r] * scale, l = lse[r], lt = lse_t[r];  // d(z/T)/dz = 1/T
      const Vec vl(l), vlt(lt), vc(c), vs(scale);
      int64_t i = 0;
      for (; i + kStep<scalar_t> <= V; i += kStep<scalar_t>) {
        prefetch(x + i);
        prefetch(xt + i);
        Vec a, b, ta, tb;
        load2(x + i, a, b);
        load2(xt + i, ta, tb);
        store2((vexp(a * vs - vl) - vexp(ta * vs - vlt)) * vc,
               (vexp(b * vs - vl) - vexp(tb * vs - vlt)) * vc, o + i);
      }
      for (; i < V; ++i) {
        o[i] = static_cast<scalar_t>(c * (std::exp(static_cast<acc_t>(x[i]) * scale - l) -
                                          std::exp(static_cast<acc_t>(xt[i]) * scale - lt)));
      }
    }
  });
}

void kd_bwd(c10::ScalarType dtype, const KdBwdJob& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kd_bwd",
                                  [&] { kd_bwd_rows<scalar_t>(j); });
}

// ----------------------------------------------------------------------- policy gradient

// lse and a_t = log p(action_t) from one read of the row, then the per-token epilogue
// (pg_terms.h: loss_t and dlogprob_t = d loss_t / d a_t) while a_t is in a register.
template <typename scalar_t>
void pg_rows(const PgJob& j) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* base = in<scalar_t>(j.logits);
  const acc_t *adv = in<acc_t>(j.adv), *sc = in<acc_t>(j.scale), *old = in<acc_t>(j.old),
              *ref = in<acc_t>(j.ref);
  acc_t *loss = out<acc_t>(j.loss), *lse = out<acc_t>(j.lse), *logprob = out<acc_t>(j.logprob),
        *dlogprob = out<acc_t>(j.dlogprob);
  // The band in acc_t, rounded as the references round 1 - clip_low and 1 + clip_high.
  const PgCoefs<acc_t> coefs{static_cast<acc_t>(1.0 - j.clip_low),
                             static_cast<acc_t>(1.0 + j.clip_high),
                             static_cast<acc_t>(j.kl_beta)};
  const int64_t V = j.V;
  at::parallel_for(0, j.N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t action = j.actions[r];
      if (action == j.ignore_index) {
        loss[r] = lse[r] = logprob[r] = dlogprob[r] = acc_t(0);
        continue;
      }
      check_target_value(action, V, r, j.ignore_index, "actions");
      const scalar_t* x = base + r * j.stride;
      const RowMoments<acc_t> mo = row_moments<scalar_t, false>(x, V, acc_t(1));
      acc_t a;
      if (std::isfinite(mo.m)) {
        lse[r] = mo.m + mo.log_s;
        a = (static_cast<acc_t>(x[action]) - mo.m) - mo.log_s;  // not x - lse: keeps p -> 1
      } else {
        // Undefined softmax (a +inf or NaN logit, or an all -inf row), as in stats: lse
        // follows torch.logsumexp, the log-prob is NaN and the epilogue carries it along.
        lse[r] = mo.m;
        a = std::numeric_limits<acc_t>::quiet_NaN();
      }
      logprob[r] = a;
      const PgTerms<acc_t> t = pg_terms(a, adv[r], old ? old + r : nullptr,
                                        ref ? ref + r : nullptr, sc ? sc + r : nullptr, coefs);
      loss[r] = t.loss;
      dlogprob[r] = t.dlogprob;
    }
  });
}

void pg_fwd(c10::ScalarType dtype, const PgJob& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pg_loss_fwd",
                                  [&] { pg_rows<scalar_t>(j); });
}

}  // namespace

const RowKernels& kernels() {
  static const RowKernels k{REMIT_STR(CPU_CAPABILITY), &stats, &ce_grad, &stats_grad,
                            &kd_fwd, &kd_bwd, &pg_fwd};
  return k;
}

}  // namespace remit::cpu::CPU_CAPABILITY
