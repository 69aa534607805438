// remit_weights on CUDA: segmented centering and clipped sigmoid, diagnostics on the device
// (kernel bodies: remit_weights.cuh). No host synchronisation: cu_seqlens is neither copied to
// the host nor validated there (the Python layer validates it; the kernel clamps).
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/launch.h"

namespace remit::cuda {

void remit_weights_into(const at::Tensor& logprob, const at::Tensor& scorer_logprob,
                        const at::Tensor& targets, const at::Tensor& cu_seqlens,
                        int64_t ignore_index, double eps, at::Tensor& weights,
                        at::Tensor& delta_hat, at::Tensor& diag, at::Tensor& loss) {
  check_eps(eps);
  check_cu_seqlens(cu_seqlens);
  const int64_t S = cu_seqlens.size(0) - 1;
  TORCH_CHECK_VALUE(S <= std::numeric_limits<int32_t>::max(),
                    "cu_seqlens: the CUDA kernel takes fewer than 2^31 segments, got ", S);
  const at::Tensor a = logprob.contiguous();
  const at::Tensor b = scorer_logprob.to(a.scalar_type()).contiguous();
  const at::Tensor y = targets.contiguous();
  // On the device already in the usual case; a CPU tensor is copied over (stream-ordered).
  const at::Tensor cu = cu_seqlens.to(a.device(), at::kLong).contiguous();
  at::Tensor partial = at::empty({S, kPartials}, a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "remit_weights_cuda", [&] {
    using A = scalar_t;
    WeightsParams<A> p{};
    p.a = a.const_data_ptr<A>();
    p.b = b.const_data_ptr<A>();
    p.targets = y.const_data_ptr();
    p.targets_i32 = y.scalar_type() == at::kInt;
    p.cu_seqlens = cu.const_data_ptr<int64_t>();
    p.S = S;
    p.N = a.size(0);
    p.ignore_index = ignore_index;
    p.lo = static_cast<A>(1.0 - eps);
    p.hi = static_cast<A>(1.0 + eps);
    p.w = weights.mutable_data_ptr<A>();
    p.dhat = delta_hat.mutable_data_ptr<A>();
    p.loss = loss.defined() ? loss.mutable_data_ptr<A>() : nullptr;
    p.partial = partial.mutable_data_ptr<double>();
    p.diag = diag.mutable_data_ptr<A>();
    C10_CUDA_CHECK(launch_remit_weights(p, current_stream()));  // cudaGetLastError of the launches
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> remit_weights_cuda(
    const at::Tensor& logprob, const at::Tensor& scorer_logprob, const at::Tensor& targets,
    const at::Tensor& cu_seqlens, int64_t ignore_index, double eps) {
  check_remit_weights_args(logprob, scorer_logprob, targets);
  // The dispatcher picks this kernel when any argument is a CUDA tensor: the kernel dereferences
  // logprob, scorer_logprob and targets on the device, so a CPU (or other-GPU) one among them
  // would be an illegal address, not an error. cu_seqlens alone is moved over (see above).
  TORCH_CHECK_VALUE(logprob.is_cuda(), "logprob: expected a CUDA tensor, got ", logprob.device());
  check_on_device(scorer_logprob, logprob, "scorer_logprob");
  check_on_device(targets, logprob, "targets");
  const c10::cuda::CUDAGuard guard(logprob.device());
  // Zeros, not empty: offsets that do not cover every token (malformed cu_seqlens, unchecked
  // under torch.compile or with validation off; the kernel clamps them) leave those tokens 0.
  at::Tensor w = at::zeros_like(logprob), dhat = at::zeros_like(logprob);
  at::Tensor diag = at::empty({6}, logprob.options());
  at::Tensor no_loss;
  remit_weights_into(logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps, w, dhat,
                     diag, no_loss);
  return {w, dhat, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CUDA, m) { m.impl("remit_weights", &remit_weights_cuda); }

}  // namespace remit::cuda
