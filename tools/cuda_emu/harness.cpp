// The CUDA kernels of csrc/cuda built as host code (with emu.h forced in), behind a C interface
// for ctypes (python_tests/test_cuda_emu.py) and the sanitizer driver (driver.cpp).
//
// kernels.cu is included whole, so every kernel is instantiated for fp32/bf16/fp16/fp64 exactly
// as nvcc instantiates it, and each entry point calls the project's own launcher (launch.h):
// the group-size choice, GroupShape and the grid are the ones the GPU gets. The parameter
// blocks are filled as the torch glue (csrc/cuda/*.cpp) fills them; the Python side plays the
// glue's part around them (output dtypes, zero-initialised buffers, dtype casts).
#include "cuda/kernels.cu"

namespace {

using namespace remit::cuda;

enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

template <typename F>
int by_row_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: return f(float{});
    case kBF16: return f(__nv_bfloat16{});
    case kF16: return f(__half{});
    case kF64: return f(double{});
    default: return -1;
  }
}

template <typename F>
int by_acc_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: return f(float{});
    case kF64: return f(double{});
    default: return -1;
  }
}

}  // namespace

// Only these entry points are exported (the build uses -fvisibility=hidden): two builds loaded
// into one process (a clean one and one with a planted fault) then never share a kernel
// instantiation or a function-local static.
#define EMU_API __attribute__((visibility("default")))

extern "C" {

// The message of the last failed launch ("" after a good one).
EMU_API const char* emu_last_error_message() { return emu::error_state().message.c_str(); }

// The threads per row launch_rows picks for a row of V elements of elem_size bytes.
EMU_API int emu_group_size(long long V, int elem_size) { return group_size(V, elem_size); }

EMU_API int emu_token_stats(int dtype, const void* x, int64_t x_stride, const void* s, int64_t s_stride,
                    const void* targets, int targets_i32, void* lse, void* logprob,
                    void* entropy, void* s_lse, void* s_logprob, int64_t N, int V,
                    int64_t ignore_index, double temperature) {
  return by_row_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    using A = acc_t<T>;
    StatsParams<T> p{};
    p.x = static_cast<const T*>(x);
    p.x_stride = x_stride;
    p.s = static_cast<const T*>(s);
    p.s_stride = s_stride;
    p.targets = targets;
    p.targets_i32 = targets_i32 != 0;
    p.lse = static_cast<A*>(lse);
    p.logprob = static_cast<A*>(logprob);
    p.entropy = static_cast<A*>(entropy);
    p.s_lse = static_cast<A*>(s_lse);
    p.s_logprob = static_cast<A*>(s_logprob);
    p.N = N;
    p.V = V;
    p.ignore_index = ignore_index;
    p.scale = A(1) / static_cast<A>(temperature);  // as the glue rounds it
    return static_cast<int>(launch_token_stats(p, nullptr));
  });
}

EMU_API int emu_ce_grad(int dtype, const void* x, int64_t x_stride, void* g, int64_t g_stride,
                const void* targets, int targets_i32, const void* lse, const void* logprob,
                const void* coef, int64_t N, int V, int64_t ignore_index) {
  return by_row_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    using A = acc_t<T>;
    GradParams<T> p{};
    p.x = static_cast<const T*>(x);
    p.x_stride = x_stride;
    p.g = static_cast<T*>(g);
    p.g_stride = g_stride;
    p.targets = targets;
    p.targets_i32 = targets_i32 != 0;
    p.lse = static_cast<const A*>(lse);
    p.logprob = static_cast<const A*>(logprob);
    p.coef = static_cast<const A*>(coef);
    p.N = N;
    p.V = V;
    p.ignore_index = ignore_index;
    return static_cast<int>(launch_ce_grad(p, nullptr));
  });
}

EMU_API int emu_remit_weights(int dtype, const void* a, const void* b, const void* targets,
                      int targets_i32, const int64_t* cu_seqlens, int64_t S, int64_t N,
                      int64_t ignore_index, double eps, void* w, void* dhat, void* loss,
                      double* partial, void* diag) {
  return by_acc_dtype(dtype, [&](auto zero) {
    using A = decltype(zero);
    WeightsParams<A> p{};
    p.a = static_cast<const A*>(a);
    p.b = static_cast<const A*>(b);
    p.targets = targets;
    p.targets_i32 = targets_i32 != 0;
    p.cu_seqlens = cu_seqlens;
    p.S = S;
    p.N = N;
    p.ignore_index = ignore_index;
    p.lo = static_cast<A>(1.0 - eps);
    p.hi = static_cast<A>(1.0 + eps);
    p.w = static_cast<A*>(w);
    p.dhat = static_cast<A*>(dhat);
    p.loss = static_cast<A*>(loss);
    p.partial = partial;
    p.diag = static_cast<A*>(diag);
    return static_cast<int>(launch_remit_weights(p, nullptr));
  });
}

EMU_API int emu_pg_terms(int dtype, const void* logprob, const void* targets, int targets_i32,
                 const void* adv, const void* scale, const void* old, const void* ref,
                 double clip_low, double clip_high, double kl_beta, void* loss, void* dlogprob,
                 int64_t N, int64_t ignore_index) {
  return by_acc_dtype(dtype, [&](auto zero) {
    using A = decltype(zero);
    PgParams<A> p{};
    p.logprob = static_cast<const A*>(logprob);
    p.targets = targets;
    p.targets_i32 = targets_i32 != 0;
    p.adv = static_cast<const A*>(adv);
    p.scale = static_cast<const A*>(scale);
    p.old = static_cast<const A*>(old);
    p.ref = static_cast<const A*>(ref);
    p.lo = static_cast<A>(1.0 - clip_low);
    p.hi = static_cast<A>(1.0 + clip_high);
    p.kl_beta = static_cast<A>(kl_beta);
    p.loss = static_cast<A*>(loss);
    p.dlogprob = static_cast<A*>(dlogprob);
    p.N = N;
    p.ignore_index = ignore_index;
    return static_cast<int>(launch_pg_terms(p, nullptr));
  });
}

}  // extern "C"
