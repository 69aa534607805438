// pg_loss epilogue kernel body: after the statistics launch (token_stats.cuh) has written
// a_t = log p(action_t), one thread per token forms loss_t and dlogprob_t = d loss_t / d a_t with
// the formula the CPU kernel uses (pg_terms.h), for the policy-gradient term of METHODS.md
// section 4. O(N) next to the [N, V] pass: a second, tiny launch rather than per-token inputs
// threaded through the row kernel shared by every op.
#pragma once

#include "cuda/token_stats.cuh"
#include "pg_terms.h"

namespace remit::cuda {

constexpr int kPgThreads = 256;

template <typename A>
__global__ void __launch_bounds__(kPgThreads) pg_terms_kernel(const PgParams<A> p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kPgThreads + threadIdx.x;
  if (t >= p.N) return;
  if (load_target(p.targets, p.targets_i32, t) == p.ignore_index) {
    p.loss[t] = p.dlogprob[t] = A(0);
    return;
  }
  const PgCoefs<A> c{p.lo, p.hi, p.kl_beta};
  const PgTerms<A> r = pg_terms(p.logprob[t], p.adv[t], p.old ? p.old + t : nullptr,
                                p.ref ? p.ref + t : nullptr, p.scale ? p.scale + t : nullptr, c);
  p.loss[t] = r.loss;
  p.dlogprob[t] = r.dlogprob;
}

template <typename A>
cudaError_t launch_pg_terms(const PgParams<A>& p, cudaStream_t stream) {
  const int64_t blocks = (p.N + kPgThreads - 1) / kPgThreads;
  REMIT_LAUNCH(pg_terms_kernel<A>, static_cast<unsigned>(blocks), kPgThreads, stream)(p);
  return cudaGetLastError();
}

}  // namespace remit::cuda
