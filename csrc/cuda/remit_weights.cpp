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
  TORCH_CHECK_VALUE(eps > 0 && eps < 1, "eps: expected a value in (0, 1), got ", eps);
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2,
                    "cu_seqlens: expected a 1-D tensor of at least 2 offsets, got shape ",
                    cu_seqlens.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kLong || cu_seqlens.scalar_type() == at::kInt,
                    "cu_seqlens: expected int32 or int64, got ", cu_seqlens.scalar_type());
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
  TORCH_CHECK_VALUE(logprob.dim() == 1, "logprob: expected a 1-D tensor, got shape ",
                    logprob.sizes());
  TORCH_CHECK_VALUE(logprob.scalar_type() == at::kFloat || logprob.scalar_type() == at::kDouble,
                    "logprob: expected float32 or float64, got ", logprob.scalar_type());
  TORCH_CHECK_VALUE(scorer_logprob.sizes() == logprob.sizes(),
                    "scorer_logprob: expected the same shape as logprob ", logprob.sizes(),
                    ", got ", scorer_logprob.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logprob.size(0),
                    "targets: expected a 1-D tensor of ", logprob.size(0), " elements, got shape ",
                    targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                    "targets: expected int64 or int32, got ", targets.scalar_type());
  // The dispatcher picks this kernel when any argument is a CUDA tensor: the kernel dereferences
  // logprob, scorer_logprob and targets on the device, so a CPU (or other-GPU) one among them
  // would be an illegal address, not an error. cu_seqlens alone is moved over (see above).
  TORCH_CHECK_VALUE(logprob.is_cuda(), "logprob: expected a CUDA tensor, got ", logprob.device());
  TORCH_CHECK_VALUE(scorer_logprob.device() == logprob.device(),
                    "scorer_logprob: expected a tensor on ", logprob.device(), ", got ",
                    scorer_logprob.device());
  TORCH_CHECK_VALUE(targets.device() == logprob.device(), "targets: expected a tensor on ",
                    logprob.device(), ", got ", targets.device());
  const c10::cuda::CUDAGuard guard(logprob.device());
  at::Tensor w = at::empty_like(logprob), dhat = at::empty_like(logprob);
  at::Tensor diag = at::empty({6}, logprob.options());
  at::Tensor no_loss;
  remit_weights_into(logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps, w, dhat,
                     diag, no_loss);
  return {w, dhat, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CUDA, m) { m.impl("remit_weights", &remit_weights_cuda); }

}  // namespace remit::cuda
