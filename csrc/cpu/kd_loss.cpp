// Knowledge distillation against a frozen teacher (METHODS.md section 3):
// loss_t = LSE(z/T) - sum_v softmax(z^T/T)_v z_v/T,  grad_t = coef_t (p - p^T) / T.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/row_ops.h"
#include "op_checks.h"

namespace remit::cpu {

namespace {

// sum_v e^{xT_v - mT} (x_v - m): the teacher-weighted student logit, relative to both maxima.
// A teacher probability of exactly 0 contributes 0 even where the student logit is -inf.
template <typename acc_t>
acc_t teacher_dot(const acc_t* x, const acc_t* xt, int64_t V, acc_t m, acc_t mt) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vm(m), vmt(mt), zero(acc_t(0));
  Vec acc(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= V; i += Vec::size()) {
    const Vec et = vexp(Vec::loadu(xt + i) - vmt);
    acc = acc + Vec::blendv(et * (Vec::loadu(x + i) - vm), zero, et == zero);
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](const Vec& p, const Vec& q) { return p + q; }, acc);
  for (; i < V; ++i) {
    const acc_t et = std::exp(xt[i] - mt);
    sum += et == acc_t(0) ? acc_t(0) : et * (x[i] - m);
  }
  return sum;
}

template <typename scalar_t>
void kd_fwd_rows(const at::Tensor& z, const at::Tensor& zt, const int64_t* y, int64_t ignore_index,
                 double temperature, acc_type<scalar_t>* loss, acc_type<scalar_t>* lse,
                 acc_type<scalar_t>* lse_t) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = z.size(0), V = z.size(1);
  const acc_t scale = acc_t(1) / static_cast<acc_t>(temperature);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(V), buf_t(V);
    for (int64_t r = begin; r < end; ++r) {
      if (y[r] == ignore_index) {
        loss[r] = lse[r] = lse_t[r] = acc_t(0);
        continue;
      }
      check_target_value(y[r], V, r, ignore_index);
      const acc_t* x = load_row(z.const_data_ptr<scalar_t>() + r * z.stride(0), V, scale,
                                buf.data());
      const acc_t* xt = load_row(zt.const_data_ptr<scalar_t>() + r * zt.stride(0), V, scale,
                                 buf_t.data());
      const acc_t m = row_max(x, V), mt = row_max(xt, V);
      if (!std::isfinite(m) || !std::isfinite(mt)) {  // undefined softmax on either side
        lse[r] = m;
        lse_t[r] = mt;
        loss[r] = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      const RowMoments<acc_t> mo = row_moments<acc_t, false>(x, V, m);
      const RowMoments<acc_t> mo_t = row_moments<acc_t, false>(xt, V, mt);
      lse[r] = m + mo.log_s;
      lse_t[r] = mt + mo_t.log_s;
      // LSE(x) - sum q x = log s - sum q (x - m)
      loss[r] = mo.log_s - teacher_dot(x, xt, V, m, mt) / mo_t.s;
    }
  });
}

template <typename scalar_t>
void kd_bwd_rows(const at::Tensor& z, const at::Tensor& zt, const int64_t* y, int64_t ignore_index,
                 double temperature, const acc_type<scalar_t>* lse,
                 const acc_type<scalar_t>* lse_t, const acc_type<scalar_t>* coef,
                 at::Tensor& grad) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t N = z.size(0), V = z.size(1);
  const acc_t scale = acc_t(1) / static_cast<acc_t>(temperature);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(V), buf_t(V), g(V);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = grad.data_ptr<scalar_t>() + r * grad.stride(0);
      if (y[r] == ignore_index) {
        zero_row(out, V);
        continue;
      }
      const acc_t* x = load_row(z.const_data_ptr<scalar_t>() + r * z.stride(0), V, scale,
                                buf.data());
      const acc_t* xt = load_row(zt.const_data_ptr<scalar_t>() + r * zt.stride(0), V, scale,
                                 buf_t.data());
      if (!std::isfinite(lse[r]) || !std::isfinite(lse_t[r])) {
        std::fill(out, out + V, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
        continue;
      }
      const acc_t c = coef[r] * scale;  // d(z/T)/dz = 1/T
      const Vec vl(lse[r]), vlt(lse_t[r]), vc(c);
      int64_t i = 0;
      for (; i + Vec::size() <= V; i += Vec::size()) {
        const Vec p = vexp(Vec::loadu(x + i) - vl), q = vexp(Vec::loadu(xt + i) - vlt);
        ((p - q) * vc).store(g.data() + i);
      }
      for (; i < V; ++i) g[i] = c * (std::exp(x[i] - lse[r]) - std::exp(xt[i] - lse_t[r]));
      for (int64_t j = 0; j < V; ++j) out[j] = static_cast<scalar_t>(g[j]);
    }
  });
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "kd_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    kd_fwd_rows<scalar_t>(z, zt, y.const_data_ptr<int64_t>(), ignore_index, temperature,
                          loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), lse_t.data_ptr<acc_t>());
  });
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
  const at::Tensor l = lse.to(acc).contiguous(), lt = teacher_lse.to(acc).contiguous();
  const at::Tensor c = coef.to(acc).contiguous();
  at::Tensor grad = empty_grad_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "kd_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    kd_bwd_rows<scalar_t>(z, zt, y.const_data_ptr<int64_t>(), ignore_index, temperature,
                          l.const_data_ptr<acc_t>(), lt.const_data_ptr<acc_t>(),
                          c.const_data_ptr<acc_t>(), grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_bwd", &kd_loss_bwd_cpu);
}

}  // namespace remit::cpu
