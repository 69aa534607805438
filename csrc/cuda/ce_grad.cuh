// Cross-entropy gradient kernel body: grad_t = coef_t * (softmax(x_t) - onehot(y_t)), written out
// of place or into the logits themselves (in-place backward). The target entry is
// coef * expm1(logprob) from the forward's log-prob, in fp32 (METHODS.md section 5): neither a
// rounded p_y nor x_y - lse, whose rounding alone loses every digit of p_y - 1 on confident rows.
// The other entries are coef e^{-delta} e^{x - lse}, delta the rounding of the saved lse
// (lse_rounding), folded into the row's coefficient: an element costs what e^{x - lse} did.
#pragma once

#include "cuda/row_ops.cuh"
#include "cuda/token_stats.cuh"

namespace remit::cuda {


template <typename T, int kGroup>
__global__ void __launch_bounds__(GroupShape<kGroup>::kThreads, GroupShape<kGroup, T>::kMinBlocks)
    ce_grad_kernel(const GradParams<T> p) {
  using A = acc_t<T>;
  using Shape = GroupShape<kGroup>;
  constexpr int kVec = Vec<T>::kSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Shape::kRowsPerBlock +
                      threadIdx.x / kGroup;
  const int rank = threadIdx.x % kGroup;
  if (row >= p.N) return;
  const T* in = p.x + row * p.x_stride;
  T* out = p.g + row * p.g_stride;
  const int64_t y = load_target(p.targets, p.targets_i32, row);
  const bool valid = y != p.ignore_index;
  const A lse = valid ? p.lse[row] : A(0);
  // Invalid rows get 0; an undefined softmax (non-finite lse, see token_stats) a NaN row, as
  // the reference gives. Neither reads the logits.
  const bool compute = valid && is_finite(lse);
  const A fill = valid ? quiet_nan<A>() : A(0);
  const A logprob = compute ? p.logprob[row] : A(0);
  const A target_grad = compute ? p.coef[row] * expm1_acc(logprob) : A(0);
  // x_y for lse_rounding, read by every thread of the group. In place, column y is overwritten
  // below: the vote on the value read holds every thread until the whole group has it.
  const A x_y = compute && y >= 0 && y < p.V ? to_acc(in[y]) : quiet_nan<A>();
  if (in == out) (void)group_any<kGroup>(x_y != x_y);
  const A coef = compute ? p.coef[row] * exp_acc(-lse_rounding(lse, logprob, x_y)) : A(0);

  auto value = [&](int col, A x) -> A {
    return col == y ? target_grad : coef * RowExp<T>::eval(x - lse);
  };
  auto scalar = [&](int i) {
    // In place, each element is read before it is written, by the same thread.
    out[i] = from_acc<T>(compute ? value(i, to_acc(in[i])) : fill);
  };

  const RowSplit sp = split_row(in, p.V);
  // The split follows the input row; 16-byte stores need the output at the same offset modulo
  // 16 bytes (always so in place, and whenever both row strides are multiples of 16 bytes).
  const bool vec_out =
      ((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
  for (int i = rank; i < sp.head; i += kGroup) scalar(i);
  for (int i = sp.tail + rank; i < p.V; i += kGroup) scalar(i);

  auto emit = [&](int j, const Vec<T>& xv) {
    const int col0 = sp.head + j * kVec;
    // The one-hot entry's slot in this vector (out of [0, kVec) when elsewhere), compared with
    // unrolled constants: indexing gv by it would put gv in local memory.
    const int64_t k_target = y - col0;
    Vec<T> gv;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const A g = k == k_target ? target_grad : coef * RowExp<T>::eval(to_acc(xv.v[k]) - lse);
      gv.v[k] = from_acc<T>(compute ? g : fill);
    }
    T* dst = out + static_cast<int64_t>(col0);
    if (vec_out) {
      store_vec(dst, gv);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) dst[k] = gv.v[k];
    }
  };
  const T* body = in + sp.head;
  int j = rank;
  for (; j + (kUnroll<T> - 1) * kGroup < sp.nvec; j += kUnroll<T> * kGroup) {
    Vec<T> v[kUnroll<T>]{};  // left zero on the rows that only fill
    if (compute) {
#pragma unroll
      for (int u = 0; u < kUnroll<T>; ++u) {
        v[u] = load_vec(body + static_cast<int64_t>(j + u * kGroup) * kVec);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<T>; ++u) emit(j + u * kGroup, v[u]);
  }
  for (; j < sp.nvec; j += kGroup) {
    Vec<T> v{};
    if (compute) v = load_vec(body + static_cast<int64_t>(j) * kVec);
    emit(j, v);
  }
}

template <typename T>
cudaError_t launch_ce_grad(const GradParams<T>& p, cudaStream_t stream) {
  return launch_rows<T>(p, stream, [](auto group) {
    return ce_grad_kernel<T, decltype(group)::value>;
  });
}

}  // namespace remit::cuda
