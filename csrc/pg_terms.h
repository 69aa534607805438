// The per-token epilogue of pg_loss_fwd (METHODS.md section 4): from a_t = log pi(action_t),
// loss_t = scale_t * (pg_t + kl_beta * kl_t) and its slope d loss_t / d a_t.
//
// One formula for two backends: the CPU kernel (cpu/pg_loss.cpp) calls it in its row loop, the
// CUDA epilogue kernel (cuda/pg_loss.cuh) once per token. Where there is no GPU the CUDA path is
// compile-checked only, so sharing the arithmetic means the CPU tests run the very code the GPU
// runs. Plain C++: no torch and no CUDA header (the kernel bodies compile with a bare nvcc).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define REMIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define REMIT_HOST_DEVICE inline
#endif

namespace remit {

// Per-call constants: the PPO band [lo, hi] = [1 - clip_low, 1 + clip_high] and the KL weight.
template <typename A>
struct PgCoefs {
  A lo, hi, kl_beta;
};

template <typename A>
struct PgTerms {
  A loss, dlogprob;
};

// `old`, `ref` and `scale` point at this token's value, or are nullptr when not given (plain
// policy gradient, no KL, scale 1). Results follow reference.pg_token_terms, NaN for NaN.
template <typename A>
REMIT_HOST_DEVICE PgTerms<A> pg_terms(A a, A adv, const A* old, const A* ref, const A* scale,
                                      const PgCoefs<A>& c) {
  PgTerms<A> t;
  if (old == nullptr) {
    t.loss = -adv * a;
    t.dlogprob = -adv;
  } else {
    const A ratio = std::exp(a - *old);
    // -min(rho A, clip(rho) A) as a select: the clipped branch is the minimum, with zero
    // slope, exactly when the ratio left the band on the side the advantage's sign rewards;
    // elsewhere the minimum is rho A. A select, not min(): with pi_old = 0 (old = -inf) rho is
    // inf, and rho * 0 = NaN would win min() for A = 0. A = 0 has slope 0 on either branch;
    // `>=` puts it on the clipped one, an exact 0 then. clip_frac counts A = 0 as not clipped
    // (functional.py). A NaN ratio fails every comparison and stays NaN (torch.clamp and
    // torch.minimum keep a NaN too).
    const bool active = (adv >= A(0) && ratio > c.hi) || (adv < A(0) && ratio < c.lo);
    t.loss = active ? -((ratio > c.hi ? c.hi : c.lo) * adv) : -(ratio * adv);
    t.dlogprob = active ? A(0) : -ratio * adv;
  }
  if (ref != nullptr) {
    // k3 with d = ref - a: exp(d) - d - 1 = expm1(d) - d, which keeps its digits while the
    // policy is near the reference (|d| small), where exp(d) - 1 rounds them away. Slope
    // d kl / d a = 1 - exp(d) = -expm1(d).
    const A d = *ref - a;
    const A em1 = std::expm1(d);
    t.loss += c.kl_beta * (em1 - d);
    t.dlogprob -= c.kl_beta * em1;
  }
  if (scale != nullptr) {
    t.loss *= *scale;
    t.dlogprob *= *scale;
  }
  return t;
}

}  // namespace remit
