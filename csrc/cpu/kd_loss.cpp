// Knowledge distillation against a frozen teacher (METHODS.md section 3):
// loss_t = LSE(z/T) - sum_v softmax(z^T/T)_v z_v/T,  grad_t = coef_t (p - p^T) / T
// (the row loops: rows.cpp).
#include <torch/library.h>

#include "cpu/kernels.h"
#include "op_checks.h"

namespace remit::cpu {

namespace {

void check_kd_args(const at::Tensor& logits, const at::Tensor& teacher_logits,
                   const at::Tensor& targets, double temperature) {
  check_logits(logits, "logits");
  check_logits(teacher_logits, "teacher_logits");
  check_same_rows(logits, teacher_logits, "teacher_logits");
  TORCH_CHECK_VALUE(logits.scalar_type() == teacher_logits.scalar_type(),
                    "teacher_logits: expected the logits' dtype ", logits.scalar_type(), ", got ",
                    teacher_logits.scalar_type());
  check_targets(targets, logits.size(0));
  check_temperature(temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
    int64_t ignore_index, double temperature) {
  check_kd_args(logits, teacher_logits, targets, temperature);
  const at::Tensor z = row_major(logits), zt = row_major(teacher_logits);
  const at::Tensor y = targets_as_long(targets);
  const int64_t N = z.size(0);
  const auto opts = z.options().dtype(at::toOpMathType(z.scalar_type()));
  at::Tensor loss = at::empty({N}, opts), lse = at::empty({N}, opts), lse_t = at::empty({N}, opts);
  const KdFwdJob job{z.const_data_ptr(), zt.const_data_ptr(), N, z.size(1), z.stride(0),
                     zt.stride(0), y.const_data_ptr<int64_t>(), ignore_index, temperature,
                     loss.data_ptr(), lse.data_ptr(), lse_t.data_ptr()};
  row_kernels().kd_fwd(z.scalar_type(), job);
  return {loss, lse, lse_t};
}

at::Tensor kd_loss_bwd_cpu(const at::Tensor& logits, const at::Tensor& teacher_logits,
                           const at::Tensor& targets, const at::Tensor& lse,
                           const at::Tensor& teacher_lse, const at::Tensor& coef,
                           int64_t ignore_index, double temperature) {
  check_kd_args(logits, teacher_logits, targets, temperature);
  // Read by row: a short one would be read past its end.
  check_per_token_float(lse, logits.size(0), "lse");
  check_per_token_float(teacher_lse, logits.size(0), "teacher_lse");
  check_per_token_float(coef, logits.size(0), "coef");
  const at::Tensor z = row_major(logits), zt = row_major(teacher_logits);
  const at::Tensor y = targets_as_long(targets);
  const auto acc = at::toOpMathType(z.scalar_type());
  const at::Tensor l = per_token_acc(lse, acc), lt = per_token_acc(teacher_lse, acc);
  const at::Tensor c = per_token_acc(coef, acc);
  at::Tensor grad = empty_grad_like(z);
  const KdBwdJob job{z.const_data_ptr(), zt.const_data_ptr(), z.size(0), z.size(1), z.stride(0),
                     zt.stride(0), y.const_data_ptr<int64_t>(), ignore_index, temperature,
                     l.const_data_ptr(), lt.const_data_ptr(), c.const_data_ptr(),
                     grad.data_ptr(), grad.stride(0)};
  row_kernels().kd_bwd(z.scalar_type(), job);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_bwd", &kd_loss_bwd_cpu);
}

}  // namespace remit::cpu
