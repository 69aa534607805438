// Weighted cross-entropy on CUDA: the forward is the statistics pass (per-token loss -w log p,
// lse and log-prob saved for the backward); the backward is one gradient pass (kernel body:
// ce_grad.cuh), out of place or into the logits (weighted_ce_bwd_).
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda/glue.h"

namespace remit::cuda {

void ce_grad_into(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& logprob, const at::Tensor& coef, int64_t ignore_index,
                  at::Tensor& grad) {
  if (logits.size(0) == 0) return;  // an empty grid is a launch error
  const auto acc = at::toOpMathType(logits.scalar_type());
  const at::Tensor lse_c = lse.to(acc).contiguous(), lp_c = logprob.to(acc).contiguous();
  const at::Tensor coef_c = coef.to(acc).contiguous(), y = targets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_grad_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    GradParams<T> p{};
    p.x = cuda_ptr<scalar_t>(logits);
    p.x_stride = logits.stride(0);
    p.g = cuda_mut_ptr<scalar_t>(grad);
    p.g_stride = grad.stride(0);
    p.targets = y.const_data_ptr();
    p.targets_i32 = y.scalar_type() == at::kInt;
    p.lse = lse_c.const_data_ptr<A>();
    p.logprob = lp_c.const_data_ptr<A>();
    p.coef = coef_c.const_data_ptr<A>();
    p.N = logits.size(0);
    p.V = static_cast<int>(logits.size(1));
    p.ignore_index = ignore_index;
    C10_CUDA_CHECK(launch_ce_grad(p, current_stream()));  // cudaGetLastError of the launch
  });
}

namespace {

void check_bwd_args(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                    const at::Tensor& logprob, const at::Tensor& coef) {
  check_logits(logits, "logits");
  check_targets(targets, logits);
  const int64_t N = logits.size(0);
  check_per_token(lse, N, logits, "lse");
  check_per_token(logprob, N, logits, "logprob");
  check_per_token(coef, N, logits, "coef");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_ce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const c10::optional<at::Tensor>& weights,
    int64_t ignore_index, bool inplace_backward) {
  check_logits(logits, "logits");
  check_targets(targets, logits);
  const int64_t N = logits.size(0);
  if (weights.has_value()) check_per_token(*weights, N, logits, "weights");
  (void)inplace_backward;  // read by the backward (remit_ext/_fakes_autograd.py)
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor lse = at::empty({N}, opts), logprob = at::empty({N}, opts), none;
  stats_pass(logits, targets, c10::nullopt, ignore_index, 1.0, lse, logprob, none, none, none);
  at::Tensor loss = -logprob;  // invalid rows have logprob 0, hence loss 0
  // Selected, not multiplied: a NaN/inf weight at an invalid row must stay out (0 * NaN = NaN).
  if (weights.has_value())
    loss = at::where(targets != ignore_index, loss * weights->to(opts.dtype()), 0.0);
  return {loss, lse, logprob};
}

at::Tensor weighted_ce_bwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                const at::Tensor& lse, const at::Tensor& logprob,
                                const at::Tensor& coef, int64_t ignore_index) {
  check_bwd_args(logits, targets, lse, logprob, coef);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = row_major(logits);
  at::Tensor grad = at::empty_like(x, at::MemoryFormat::Contiguous);
  ce_grad_into(x, targets, lse, logprob, coef, ignore_index, grad);
  return grad;
}

void weighted_ce_bwd_inplace_cuda(at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, const at::Tensor& logprob,
                                  const at::Tensor& coef, int64_t ignore_index) {
  check_bwd_args(logits, targets, lse, logprob, coef);
  check_inplace_rows(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  ce_grad_into(logits, targets, lse, logprob, coef, ignore_index, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CUDA, m) {
  m.impl("weighted_ce_fwd", &weighted_ce_fwd_cuda);
  m.impl("weighted_ce_bwd", &weighted_ce_bwd_cuda);
  m.impl("weighted_ce_bwd_", &weighted_ce_bwd_inplace_cuda);
}

}  // namespace remit::cuda
