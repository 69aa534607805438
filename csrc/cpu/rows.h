// The CPU row kernels behind the ops, and the run-time choice of the instruction set they run.
//
// csrc/cpu/rows.cpp holds every loop over the [N, V] logits (statistics, gradients). CMake
// compiles it once per instruction set the compiler can target (DEFAULT, AVX2, AVX512,
// AVX512_BF16), each copy in its own namespace remit::cpu::<ISA>; dispatch.cpp picks, at first
// use, the best copy the running CPU supports (REMIT_CPU_CAPABILITY caps it, as
// ATEN_CPU_CAPABILITY does for ATen), and the op files (token_stats.cpp, weighted_ce.cpp, ...)
// check arguments, allocate outputs and call `row_kernels()`. No torch tensor crosses this
// header: jobs carry raw pointers, every per-token array in the logits' accumulation dtype
// (float for fp32/bf16/fp16, double for fp64), so the ISA copies need only ATen's vector and
// parallel headers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

namespace remit::cpu {

// lse, target log-prob and, where the pointers are set, entropy and top-k entropy of each valid
// row of logits / temperature; rows whose target is ignore_index get 0.
struct StatsJob {
  const void* logits;
  int64_t N, V, stride;
  const int64_t* targets;
  int64_t ignore_index;
  double temperature;
  int64_t topk;
  bool topk_renormalize;
  void* lse;
  void* logprob;
  void* entropy;       // nullable
  void* topk_entropy;  // nullable
};

// grad[t] = coef_t (softmax(logits[t]) - onehot(y_t)), target entry coef_t expm1(logprob_t);
// 0 on invalid rows. grad may be logits itself.
struct CeGradJob {
  const void* logits;
  int64_t N, V, in_stride;
  const int64_t* targets;
  int64_t ignore_index;
  const void* lse;
  const void* logprob;
  const void* coef;
  void* grad;
  int64_t out_stride;
};

// d(sum_t g_lp a_t + g_ent H_t + g_lse lse_t) / dz for x = z / T (remit_ext/_grads.py,
// token_stats_grad, is the same formula in torch ops). Null cotangents count as 0.
struct StatsGradJob {
  const void* logits;
  int64_t N, V, in_stride;
  const int64_t* targets;
  int64_t ignore_index;
  double temperature;
  const void* lse;
  const void* logprob;
  const void* entropy;  // nullable (then g_ent is ignored)
  const void* g_lp;     // nullable
  const void* g_ent;    // nullable
  const void* g_lse;    // nullable
  void* grad;
  int64_t out_stride;
};

struct KdFwdJob {
  const void* z;
  const void* zt;
  int64_t N, V, z_stride, zt_stride;
  const int64_t* targets;
  int64_t ignore_index;
  double temperature;
  void* loss;
  void* lse;
  void* lse_t;
};

struct KdBwdJob {
  const void* z;
  const void* zt;
  int64_t N, V, z_stride, zt_stride;
  const int64_t* targets;
  int64_t ignore_index;
  double temperature;
  const void* lse;
  const void* lse_t;
  const void* coef;
  void* grad;
  int64_t out_stride;
};

// pg_loss_fwd's statistics and per-token epilogue (pg_terms.h).
struct PgJob {
  const void* logits;
  int64_t N, V, stride;
  const int64_t* actions;
  int64_t ignore_index;
  const void* adv;
  const void* scale;  // nullable
  const void* old;    // nullable
  const void* ref;    // nullable
  double clip_low, clip_high, kl_beta;
  void* loss;
  void* lse;
  void* logprob;
  void* dlogprob;
};

// One compiled copy of the row kernels; `dtype` is the logits' dtype.
struct RowKernels {
  const char* capability;
  void (*stats)(c10::ScalarType dtype, const StatsJob&);
  void (*ce_grad)(c10::ScalarType dtype, const CeGradJob&);
  void (*stats_grad)(c10::ScalarType dtype, const StatsGradJob&);
  void (*kd_fwd)(c10::ScalarType dtype, const KdFwdJob&);
  void (*kd_bwd)(c10::ScalarType dtype, const KdBwdJob&);
  void (*pg_fwd)(c10::ScalarType dtype, const PgJob&);
};

// The copy in use (chosen on first call).
const RowKernels& row_kernels();

// Reported by remit_ext._C (module.cpp): the copy in use, every copy compiled into this build,
// the ones this CPU can run (worst to best), and a switch between the latter for tests and
// benchmarks (returns the previous one; refuses one this CPU cannot run).
std::string cpu_capability();
std::vector<std::string> cpu_capabilities_compiled();
std::vector<std::string> cpu_capabilities_supported();
std::string set_cpu_capability(const std::string& name);

}  // namespace remit::cpu
