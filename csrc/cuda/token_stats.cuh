// token_stats kernel body: lse, target log-prob and (optionally) entropy of every valid row of
// logits / temperature, for the policy rows and, in the same launch, the scorer rows
// (METHODS.md section 1). One read of each row, 128-bit loads, online softmax in registers.
#pragma once

#include "cuda/row_ops.cuh"

namespace remit::cuda {


__device__ __forceinline__ int64_t load_target(const void* targets, bool i32, int64_t row) {
  return i32 ? static_cast<int64_t>(static_cast<const int32_t*>(targets)[row])
             : static_cast<const int64_t*>(targets)[row];
}

template <typename A>
struct RowStats {
  A lse, logprob, entropy;
};

// The statistics of one row, returned in every thread of the group.
template <typename T, int kGroup, bool kT>
__device__ __forceinline__ RowStats<acc_t<T>> row_stats(const T* row, int V, int64_t y,
                                                       acc_t<T> scale, int rank,
                                                       Softmax<acc_t<T>>* scratch) {
  using A = acc_t<T>;
  constexpr int kVec = Vec<T>::kSize;
  const RowSplit sp = split_row(row, V);
  Softmax<A> st = softmax_empty<A>();
  // Scalar head and tail (fewer than 8 elements each), then the 16-byte body, kUnroll<T> vectors
  // in flight per thread before any arithmetic.
  for (int i = rank; i < sp.head; i += kGroup) {
    const A x[1] = {scaled(row[i], scale)};
    absorb<T, kT>(st, x);
  }
  for (int i = sp.tail + rank; i < V; i += kGroup) {
    const A x[1] = {scaled(row[i], scale)};
    absorb<T, kT>(st, x);
  }
  const T* body = row + sp.head;
  int j = rank;
  for (; j + (kUnroll<T> - 1) * kGroup < sp.nvec; j += kUnroll<T> * kGroup) {
    Vec<T> v[kUnroll<T>];
#pragma unroll
    for (int u = 0; u < kUnroll<T>; ++u) v[u] = load_vec(body + static_cast<int64_t>(j + u * kGroup) * kVec);
    A x[kUnroll<T> * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll<T>; ++u) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) x[u * kVec + k] = scaled(v[u].v[k], scale);
    }
    absorb<T, kT>(st, x);
  }
  for (; j < sp.nvec; j += kGroup) {
    const Vec<T> v = load_vec(body + static_cast<int64_t>(j) * kVec);
    A x[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = scaled(v.v[k], scale);
    absorb<T, kT>(st, x);
  }
  st = group_merge<T, kT, kGroup>(st, scratch);

  const A nan = quiet_nan<A>();
  if (!is_finite(st.m)) {
    // A +inf logit or an all -inf row: softmax is undefined. lse follows torch.logsumexp
    // (NaN if any logit is NaN, else the infinite max); log-prob and entropy are NaN. Only with
    // m = +inf can a NaN hide (inf - inf poisons `below` anyway), so the row is scanned again
    // for one (in x * scale, as absorbed: 0 * an infinite 1/temperature is NaN too); this path
    // never runs on ordinary rows.
    bool has_nan = st.poison;
    if (st.m > A(0)) {
      for (int i = rank; i < V && !has_nan; i += kGroup) {
        const A x = scaled(row[i], scale);
        has_nan = x != x;
      }
      has_nan = group_any<kGroup>(has_nan);
    }
    return {has_nan ? nan : st.m, nan, nan};
  }
  const A s_m1 = (st.top - A(1)) + st.below;
  if (st.poison || s_m1 != s_m1) return {nan, nan, nan};  // a NaN logit
  const A log_s = log1p_acc(s_m1);
  // Only the writer reads x_y; an out-of-range target (refused by the Python layer) reads
  // nothing and gives NaN.
  A logprob = nan;
  if (rank == 0 && y >= 0 && y < V) logprob = (scaled(row[y], scale) - st.m) - log_s;
  const A entropy = kT ? log_s - st.t / (A(1) + s_m1) : A(0);  // H = LSE - sum p x
  return {st.m + log_s, logprob, entropy};
}

template <typename T, int kGroup, bool kEntropy>
__global__ void __launch_bounds__(GroupShape<kGroup>::kThreads, GroupShape<kGroup, T>::kMinBlocks)
    token_stats_kernel(const StatsParams<T> p) {
  using A = acc_t<T>;
  using Shape = GroupShape<kGroup>;
  __shared__ Softmax<A> scratch[kGroup / 32 + 1];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Shape::kRowsPerBlock +
                      threadIdx.x / kGroup;
  const int rank = threadIdx.x % kGroup;
  if (row >= p.N) return;  // uniform over a row's group (a warp, or the whole block)
  const int64_t y = load_target(p.targets, p.targets_i32, row);
  if (y == p.ignore_index) {
    if (rank == 0) {
      p.lse[row] = p.logprob[row] = A(0);
      if (kEntropy) p.entropy[row] = A(0);
      if (p.s != nullptr) p.s_lse[row] = p.s_logprob[row] = A(0);
    }
    return;
  }
  const RowStats<A> r =
      row_stats<T, kGroup, kEntropy>(p.x + row * p.x_stride, p.V, y, p.scale, rank, scratch);
  if (rank == 0) {
    p.lse[row] = r.lse;
    p.logprob[row] = r.logprob;
    if (kEntropy) p.entropy[row] = r.entropy;
  }
  if (p.s != nullptr) {
    const RowStats<A> q =
        row_stats<T, kGroup, false>(p.s + row * p.s_stride, p.V, y, p.scale, rank, scratch);
    if (rank == 0) {
      p.s_lse[row] = q.lse;
      p.s_logprob[row] = q.logprob;
    }
  }
}

template <typename T, bool kEntropy>
cudaError_t launch_token_stats_impl(const StatsParams<T>& p, cudaStream_t stream) {
  return launch_rows<T>(p, stream, [](auto group) {
    return token_stats_kernel<T, decltype(group)::value, kEntropy>;
  });
}

template <typename T>
cudaError_t launch_token_stats(const StatsParams<T>& p, cudaStream_t stream) {
  return p.entropy != nullptr ? launch_token_stats_impl<T, true>(p, stream)
                              : launch_token_stats_impl<T, false>(p, stream);
}

}  // namespace remit::cuda
