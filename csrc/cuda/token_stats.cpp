// token_stats on CUDA: lse, target log-prob and entropy of policy (and scorer) rows, one read
// per row (kernel body: token_stats.cuh). Top-k entropy is taken only for topk >= V, where it
// equals the full entropy; 0 < topk < V is refused (the dispatcher says so and picks another
// backend under backend="auto").
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/launch.h"

namespace remit::cuda {

namespace {

void launch_stats(const at::Tensor& x, const at::Tensor& y, const at::Tensor* s,
                  int64_t ignore_index, double temperature, at::Tensor& lse, at::Tensor& logprob,
                  at::Tensor* entropy, at::Tensor* s_lse, at::Tensor* s_logprob) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_stats_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    StatsParams<T> p{};
    p.x = cuda_ptr<scalar_t>(x);
    p.x_stride = x.stride(0);
    p.s = s != nullptr ? cuda_ptr<scalar_t>(*s) : nullptr;
    p.s_stride = s != nullptr ? s->stride(0) : 0;
    p.targets = y.const_data_ptr();
    p.targets_i32 = y.scalar_type() == at::kInt;
    p.lse = lse.mutable_data_ptr<A>();
    p.logprob = logprob.mutable_data_ptr<A>();
    p.entropy = entropy != nullptr ? entropy->mutable_data_ptr<A>() : nullptr;
    p.s_lse = s != nullptr ? s_lse->mutable_data_ptr<A>() : nullptr;
    p.s_logprob = s != nullptr ? s_logprob->mutable_data_ptr<A>() : nullptr;
    p.N = x.size(0);
    p.V = static_cast<int>(x.size(1));
    p.ignore_index = ignore_index;
    p.scale = A(1) / static_cast<A>(temperature);  // rounded as the CPU kernels round it
    // The launcher returns cudaGetLastError() of its launch: C10_CUDA_KERNEL_LAUNCH_CHECK's
    // check, on the returned code.
    C10_CUDA_CHECK(launch_token_stats(p, current_stream()));
  });
}

}  // namespace

void stats_pass(const at::Tensor& logits, const at::Tensor& targets,
                const c10::optional<at::Tensor>& scorer, int64_t ignore_index,
                double temperature, at::Tensor& lse, at::Tensor& logprob, at::Tensor& entropy,
                at::Tensor& s_lse, at::Tensor& s_logprob) {
  if (logits.size(0) == 0) return;  // an empty grid is a launch error
  const at::Tensor x = row_major(logits);
  const at::Tensor y = targets.contiguous();
  at::Tensor* ent = entropy.defined() && entropy.numel() > 0 ? &entropy : nullptr;
  if (!scorer.has_value()) {
    launch_stats(x, y, nullptr, ignore_index, temperature, lse, logprob, ent, nullptr, nullptr);
    return;
  }
  const at::Tensor s = row_major(*scorer);
  if (s.scalar_type() == x.scalar_type()) {
    launch_stats(x, y, &s, ignore_index, temperature, lse, logprob, ent, &s_lse, &s_logprob);
    return;
  }
  // A scorer in another dtype: its own launch in its own accumulation type, then cast, as the
  // CPU kernels do.
  launch_stats(x, y, nullptr, ignore_index, temperature, lse, logprob, ent, nullptr, nullptr);
  const auto s_opts = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor s_lse_own = at::empty({s.size(0)}, s_opts), s_lp_own = at::empty({s.size(0)}, s_opts);
  launch_stats(s, y, nullptr, ignore_index, temperature, s_lse_own, s_lp_own, nullptr, nullptr,
               nullptr);
  s_lse.copy_(s_lse_own);
  s_logprob.copy_(s_lp_own);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
token_stats_cuda(const at::Tensor& logits, const at::Tensor& targets,
                 const c10::optional<at::Tensor>& scorer_logits, int64_t ignore_index,
                 double temperature, bool with_entropy, int64_t topk, bool topk_renormalize) {
  check_logits(logits, "logits");
  check_targets(targets, logits);
  check_temperature(temperature);
  check_topk(topk);
  const int64_t N = logits.size(0), V = logits.size(1);
  // Among the top k the whole vocabulary: both forms are the full entropy (the mass is 1), so
  // topk_renormalize changes nothing.
  const bool topk_is_full = topk >= V;
  (void)topk_renormalize;
  TORCH_CHECK_NOT_IMPLEMENTED(topk == 0 || topk_is_full,
                              "token_stats: the CUDA kernels take topk = 0 or topk >= V (", V,
                              "), got ", topk, "; use backend='triton' or 'torch'");
  if (scorer_logits.has_value()) check_scorer_logits(*scorer_logits, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  const bool has_scorer = scorer_logits.has_value();
  at::Tensor lse = at::empty({N}, opts), logprob = at::empty({N}, opts);
  at::Tensor entropy = at::empty({with_entropy || topk_is_full ? N : 0}, opts);
  at::Tensor s_lse = at::empty({has_scorer ? N : 0}, opts);
  at::Tensor s_logprob = at::empty({has_scorer ? N : 0}, opts);
  stats_pass(logits, targets, scorer_logits, ignore_index, temperature, lse, logprob, entropy,
             s_lse, s_logprob);
  at::Tensor topk_entropy = topk_is_full ? entropy.clone() : at::empty({0}, opts);
  if (!with_entropy) entropy = at::empty({0}, opts);
  return {lse, logprob, entropy, topk_entropy, s_lse, s_logprob};
}

}  // namespace

TORCH_LIBRARY_IMPL(remit_ext, CUDA, m) { m.impl("token_stats", &token_stats_cuda); }

}  // namespace remit::cuda
