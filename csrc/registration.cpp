// Every remit_ext op schema, in one place. Backends register kernels in csrc/<backend>/*;
// fakes and autograd live in remit_ext/_fakes_autograd.py (loaded through set_python_module).
//
// Conventions: logits are 2-D [N, V] (the Python layer flattens batch dims), targets 1-D [N]
// int64/int32 with `ignore_index` marking invalid positions; statistics come out in the
// accumulation dtype (float32, or float64 for float64 logits); gradients in the logits' dtype.
#include <torch/library.h>

TORCH_LIBRARY(remit_ext, m) {
  // Where the fakes live. impl_abstract_pystub is set_python_module's older name; both exist in
  // every torch we support (2.11-2.13), and only the old one is certain in the oldest.
  m.impl_abstract_pystub("remit_ext._fakes_autograd");

  // Section 1 of METHODS.md: one pass per row -> lse, target log-prob, optional entropy and
  // top-k entropy (topk > 0; renormalised on request), for the policy and (optionally) the
  // scorer rows in the same call. Empty outputs for what was not asked.
  m.def(
      "token_stats(Tensor logits, Tensor targets, Tensor? scorer_logits, int ignore_index, "
      "float temperature, bool with_entropy, int topk, bool topk_renormalize) -> "
      "(Tensor lse, Tensor logprob, Tensor entropy, Tensor topk_entropy, Tensor scorer_lse, "
      "Tensor scorer_logprob)");

  // The gradient of token_stats' lse / logprob / entropy with cotangents g_lse / g_logprob /
  // g_entropy (None: 0), through logits / temperature; the target column from the saved
  // log-prob (remit_ext/_grads.py, token_stats_grad, is the same formula in torch ops). A target
  // outside [0, V) gets no one-hot. CPU only: the fused-linear backward's chunk kernel.
  m.def(
      "token_stats_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor logprob, "
      "Tensor? entropy, Tensor? g_logprob, Tensor? g_entropy, Tensor? g_lse, int ignore_index, "
      "float temperature) -> Tensor");
  m.def(
      "token_stats_bwd_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor logprob, "
      "Tensor? entropy, Tensor? g_logprob, Tensor? g_entropy, Tensor? g_lse, int ignore_index, "
      "float temperature) -> ()");

  // Section 2, steps 3-5: segmented centering (cu_seqlens offsets), clipped scaled sigmoid,
  // diagnostics [mean w, std w, frac low, frac high, mean |delta_hat|, mean delta].
  m.def(
      "remit_weights(Tensor logprob, Tensor scorer_logprob, Tensor targets, Tensor cu_seqlens, "
      "int ignore_index, float eps) -> (Tensor weights, Tensor delta_hat, Tensor diagnostics)");

  // Weighted cross-entropy: per-token loss -w_t log p(y_t), lse and log-prob for the backward.
  // `inplace_backward` makes the registered backward write the gradient into `logits`.
  m.def(
      "weighted_ce_fwd(Tensor logits, Tensor targets, Tensor? weights, int ignore_index, "
      "bool inplace_backward) -> (Tensor loss, Tensor lse, Tensor logprob)");
  // grad_t = coef_t * (softmax(logits_t) - onehot(y_t)), out of place or into `logits`; the
  // target entry coef_t * expm1(logprob_t) comes from the forward's log-prob, not from lse.
  m.def(
      "weighted_ce_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor logprob, Tensor coef, "
      "int ignore_index) -> Tensor");
  m.def(
      "weighted_ce_bwd_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor logprob, "
      "Tensor coef, int ignore_index) -> ()");

  // The fused logits-level ReMiT forward (exactly one of scorer_logits / scorer_logprob).
  // Per-token loss -w_t a_t; the backward (registered in Python) gives the policy-logits gradient.
  m.def(
      "remit_loss(Tensor logits, Tensor targets, Tensor? scorer_logits, Tensor? scorer_logprob, "
      "Tensor cu_seqlens, int ignore_index, float eps, bool detach_weights, "
      "bool inplace_backward) -> (Tensor loss, Tensor weights, Tensor logprob, Tensor lse, "
      "Tensor delta_hat, Tensor diagnostics)");

  // Section 4, the RMT/GRPO policy-gradient term over sampled tokens (`actions`): per token
  // loss_t = scale_t * (pg_t + kl_beta * kl_t) with a_t = log p(action_t); pg_t = -A_t a_t, or the
  // PPO-clipped -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A), rho = exp(a - old), when
  // old_logprob is given; kl_t = exp(d) - d - 1, d = ref - a, when ref_logprob is given.
  // dlogprob = d loss_t / d a_t, so the logits gradient is weighted_ce_bwd with coef -dlogprob.
  // advantages / scale / old_logprob / ref_logprob are per token in the accumulation dtype.
  m.def(
      "pg_loss_fwd(Tensor logits, Tensor actions, Tensor advantages, Tensor? scale, "
      "Tensor? old_logprob, Tensor? ref_logprob, int ignore_index, float clip_low, "
      "float clip_high, float kl_beta, bool inplace_backward) -> (Tensor loss, Tensor lse, "
      "Tensor logprob, Tensor dlogprob)");

  // Section 3, KD: per-token LSE(z/T) - sum softmax(z^T/T) z/T and its gradient.
  m.def(
      "kd_loss_fwd(Tensor logits, Tensor teacher_logits, Tensor targets, int ignore_index, "
      "float temperature) -> (Tensor loss, Tensor lse, Tensor teacher_lse)");
  m.def(
      "kd_loss_bwd(Tensor logits, Tensor teacher_logits, Tensor targets, Tensor lse, "
      "Tensor teacher_lse, Tensor coef, int ignore_index, float temperature) -> Tensor");
}
