// The sanitizer driver: one launch of every CUDA kernel per dtype and group size, through the
// harness's entry points, on buffers laid out so that the sanitizers see every stray access.
//
// Built with -fsanitize=thread it is the race check (racecheck/synccheck's job on a GPU): every
// emulated thread is a TSan fiber and only barriers order them (emu.h). Built with
// -fsanitize=address,undefined it is the bounds check (memcheck's job): each buffer is its own
// heap block of exactly the size the kernel may touch, and the gap between strided rows (and
// before the first, misaligned, row) is poisoned, so a read or write one element outside a row
// is reported even when it lands inside the allocation.
//
// Exit status 0 when every launch succeeds and no sanitizer reports; the sanitizers' options
// (emu.py's sanitizer_env) make any report stop the run with a non-zero status.
#include "harness.cpp"

#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#endif

namespace {

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
double uniform() {  // in [0, 1)
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<double>(rng_state >> 11) * 0x1.0p-53;
}

template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// An exactly sized heap block (freed at exit).
template <typename T>
T* block_of(size_t n) {
  return static_cast<T*>(std::malloc(n * sizeof(T) + (n == 0)));
}

// N rows of V elements, `stride` elements apart, the first starting `offset` bytes into its own
// allocation (8-byte granules: offset and stride * sizeof(T) are multiples of 8, so the poisoned
// gaps are exact). The allocation ends where the last row ends.
template <typename T>
struct Rows {
  char* base;
  T* first;
  int64_t stride;

  Rows(int64_t N, int V, int64_t stride_, size_t offset) : stride(stride_) {
    const size_t bytes = offset + ((N - 1) * stride + V) * sizeof(T);
    base = static_cast<char*>(std::malloc(bytes));
    first = reinterpret_cast<T*>(base + offset);
    for (int64_t r = 0; r < N; ++r) {
      for (int v = 0; v < V; ++v) first[r * stride + v] = from_double<T>(8.0 * uniform() - 4.0);
      if (r + 1 < N) POISON(first + r * stride + V, (stride - V) * sizeof(T));
    }
    POISON(base, offset);
  }
};

template <typename A>
A* per_token(int64_t N, double lo, double hi) {
  A* p = block_of<A>(N);
  for (int64_t i = 0; i < N; ++i) p[i] = static_cast<A>(lo + (hi - lo) * uniform());
  return p;
}

template <typename I>
I* targets_for(int64_t N, int V) {
  I* y = block_of<I>(N);
  for (int64_t i = 0; i < N; ++i) {
    y[i] = i % 3 == 2 ? I(-100) : static_cast<I>(uniform() * V) % V;
  }
  return y;
}

int failures = 0;

void check(int code, const char* what, int dtype, int V) {
  std::printf("%-14s dtype %d V %6d group %3d: %s%s\n", what, dtype, V,
              emu_group_size(V, dtype == kF32 ? 4 : dtype == kF64 ? 8 : 2),
              code == 0 ? "ok" : "launch error: ", code == 0 ? "" : emu_last_error_message());
  std::fflush(stdout);
  failures += code != 0;
}

// token_stats (policy + scorer rows, entropy, temperature) and ce_grad out of place and in
// place, on N rows of V elements of T.
template <typename T>
void rows_kernels(int dtype, int64_t N, int V, bool i32) {
  using A = acc_t<T>;
  const int64_t stride = V + 16 / static_cast<int64_t>(sizeof(T)) + 4;  // a gap after each row
  const size_t offset = 8;  // 8 bytes past a 16-byte boundary: the head peel runs
  Rows<T> x(N, V, stride, offset), s(N, V, stride, offset), g(N, V, stride, offset);
  void* y = i32 ? static_cast<void*>(targets_for<int32_t>(N, V))
                : static_cast<void*>(targets_for<int64_t>(N, V));
  A *lse = block_of<A>(N), *lp = block_of<A>(N), *ent = block_of<A>(N);
  A *s_lse = block_of<A>(N), *s_lp = block_of<A>(N);
  check(emu_token_stats(dtype, x.first, stride, s.first, stride, y, i32, lse, lp, ent, s_lse,
                        s_lp, N, V, -100, 0.7),
        "token_stats", dtype, V);
  A* coef = per_token<A>(N, -1.0, 1.0);
  check(emu_ce_grad(dtype, x.first, stride, g.first, stride, y, i32, lse, lp, coef, N, V, -100),
        "ce_grad", dtype, V);
  check(emu_ce_grad(dtype, x.first, stride, x.first, stride, y, i32, lse, lp, coef, N, V, -100),
        "ce_grad_", dtype, V);
}

// remit_weights (segments of 0, 1 and several hundred tokens: the 256-thread loop wraps) and
// pg_terms (PPO ratio, KL and scale; N not a multiple of the block).
template <typename A>
void token_kernels(int dtype) {
  const int64_t N = 600;
  A *a = per_token<A>(N, -6.0, 0.0), *b = per_token<A>(N, -6.0, 0.0);
  int64_t* y = targets_for<int64_t>(N, 1000);
  const int64_t offsets[] = {0, 0, 1, 333, 600};
  int64_t* cu = block_of<int64_t>(5);
  for (int i = 0; i < 5; ++i) cu[i] = offsets[i];
  const int64_t S = 4;
  A *w = block_of<A>(N), *dhat = block_of<A>(N), *loss = block_of<A>(N), *diag = block_of<A>(6);
  double* partial = block_of<double>(S * kPartials);
  check(emu_remit_weights(dtype, a, b, y, 0, cu, S, N, -100, 0.2, w, dhat, loss, partial, diag),
        "remit_weights", dtype, 0);
  A *adv = per_token<A>(N, -1.0, 1.0), *old = per_token<A>(N, -6.0, 0.0);
  A *ref = per_token<A>(N, -6.0, 0.0), *scale = per_token<A>(N, 0.0, 1.0);
  A *pl = block_of<A>(N), *dl = block_of<A>(N);
  check(emu_pg_terms(dtype, a, y, 0, adv, scale, old, ref, 0.2, 0.28, 0.05, pl, dl, N - 7, -100),
        "pg_terms", dtype, 0);
}

}  // namespace

int main() {
  // V for each group size (launch_rows picks it from the row's 16-byte vectors): 32 up to 512
  // vectors, 256 up to 4096, 512 beyond. Three rows: a group-32 block holds four, so one of
  // its warps exits at once.
  for (bool i32 : {false, true}) {
    rows_kernels<float>(kF32, 3, 1001, i32);
    rows_kernels<float>(kF32, 2, 9001, i32);
    rows_kernels<float>(kF32, 2, 20001, i32);
  }
  rows_kernels<__nv_bfloat16>(kBF16, 3, 2001, false);
  rows_kernels<__nv_bfloat16>(kBF16, 2, 40003, false);
  rows_kernels<__half>(kF16, 2, 20005, true);
  rows_kernels<double>(kF64, 2, 10001, false);
  token_kernels<float>(kF32);
  token_kernels<double>(kF64);
  std::printf("%s\n", failures == 0 ? "all launches ok" : "LAUNCH ERRORS");
  return failures == 0 ? 0 : 1;
}
