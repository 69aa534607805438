// Host emulation of the CUDA features remit_ext's kernels use, for running csrc/cuda/*.cuh on a
// machine without a GPU (tests: python_tests/test_cuda_emu.py; build: tools/cuda_emu/build.py).
//
// Forced in with `g++ -include tools/cuda_emu/emu.h` ahead of the unchanged kernel sources. The
// toolkit's own cuda_runtime.h / cuda_fp16.h / cuda_bf16.h compile as host C++, so the bf16 and
// fp16 types and their conversions are NVIDIA's code, bit for bit. What host mode lacks is
// supplied here:
//
//   - a launch, REMIT_LAUNCH(kernel, grid, block, stream)(args...): the grid's blocks run one
//     after another; the threads of a block run as fibers (ucontext) on the calling OS thread,
//     each until it blocks at a barrier or returns. Blocks never run concurrently, so a
//     function-local `static` is exactly that block's shared memory: `__shared__` is `static`.
//   - threadIdx / blockIdx / blockDim / gridDim (x only is meaningful: 1-D launches);
//   - __syncthreads / __syncthreads_or over the block's live threads (a thread that returned
//     drops out, as exited warps do on the GPU), __shfl_xor_sync / __any_sync over the warp;
//   - __ldcs / __stcs (plain accesses), __fmul_rn / __dmul_rn (products that are never
//     contracted: build with -ffp-contract=off), ex2_approx_ftz (exp2 with subnormals flushed),
//     an empty __launch_bounds__, cudaGetLastError.
//
// Stricter than the hardware where the hardware's behaviour is undefined, so that a kernel bug
// is a launch error here rather than luck there: a warp-synchronous op (full mask) needs all 32
// lanes of the warp alive and at the same call; the threads meeting at one __syncthreads
// generation must have reached it from the same source line; a block in which some threads
// wait at a barrier that the others can no longer reach is reported as a deadlock. Such a
// launch stops and cudaGetLastError() returns cudaErrorLaunchFailure; emu_last_error_message()
// says why.
//
// Sanitizers: built with -fsanitize=thread every fiber is its own TSan thread, switched to
// without synchronisation, and the barriers are annotated release (arrive) / acquire (leave),
// so TSan reports shared-memory accesses that no barrier orders (racecheck's job on the GPU).
// With -fsanitize=address the fiber switches are annotated for ASan (memcheck's job).
//
// Not modelled: concurrency between blocks, weak memory ordering, timing, atomics, dynamic
// shared memory, cooperative groups, Hopper's TMA / wgmma / clusters (the kernels use none).
#pragma once

#define REMIT_CUDA_EMU 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <source_location>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define REMIT_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}
#endif
#if defined(__SANITIZE_ADDRESS__)
#define REMIT_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ------------------------------------------------------------------ qualifiers (host mode)

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStackBytes = 256 * 1024;  // per fiber; sanitizer builds use far more stack

// The error of the last launch, as cudaGetLastError reports it (and clears).
struct ErrorState {
  cudaError_t code = cudaSuccess;
  std::string message;
};
inline ErrorState& error_state() {
  static ErrorState e;
  return e;
}

// One barrier: the block's, or one warp's. `alive` counts the threads that have not returned.
struct Barrier {
  int alive = 0, arrived = 0;
  unsigned generation = 0;
  bool any = false, result = false;  // the OR of this generation's predicates, and the last one's
  bool warp_sync = false;            // a warp op (full mask): no lane may exit while it is open
  std::source_location site;         // where this generation's first thread arrived
  std::vector<int> waiting;          // fibers parked here
#if defined(REMIT_EMU_TSAN)
  char sync[2];  // TSan sync objects, one per generation parity
#endif
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  unsigned tid = 0;
  bool ready = true, done = false;
  const Barrier* parked = nullptr;
#if defined(REMIT_EMU_TSAN)
  void* tsan = nullptr;
  int ignores = 0;  // open Runtime sections of this fiber
#endif
};

struct Block {
  dim3 thread_dim{}, block_idx{}, grid_dim{};
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  Barrier block_bar;
  std::vector<Barrier> warp_bars;
  // Shuffle slots, double-buffered by the warp barrier's generation parity: a lane writes its
  // value, meets its warp, reads its partner's. The buffer written at generation g is next
  // written at g + 2, after every lane has left generation g + 1, i.e. finished reading.
  std::vector<uint64_t> slots;  // [2][warps][32]
  ucontext_t scheduler;
  int current = -1;
  std::string error;
#if defined(REMIT_EMU_TSAN)
  void* tsan_scheduler = nullptr;
  char tsan_start = 0, tsan_end = 0;
  int ignores = 0;  // the scheduler's open Runtime sections
#endif
#if defined(REMIT_EMU_ASAN)
  const void* asan_bottom = nullptr;
  size_t asan_size = 0;
#endif
};

inline Block*& current_block() {
  static Block* b = nullptr;
  return b;
}
inline Block& block() { return *current_block(); }
inline Fiber& fiber() { return block().fibers[block().current]; }

// The emulator's own bookkeeping is shared by every fiber of a block and ordered by the
// switches between them; under TSan those accesses are hidden (each fiber is a TSan thread
// switched to without synchronisation), so that only the kernel's own accesses are checked.
// TSan's ignores are per fiber; each fiber counts its open sections so that its last switch
// can close them (a TSan thread may not end inside one).
struct Runtime {
#if defined(REMIT_EMU_TSAN)
  Runtime() {
    __tsan_ignore_thread_begin();
    ++depth();
  }
  ~Runtime() {
    --depth();
    __tsan_ignore_thread_end();
  }
  static int& depth() {
    Block& b = block();
    return b.current < 0 ? b.ignores : b.fibers[b.current].ignores;
  }
#else
  Runtime() {}
#endif
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;
};

// ----------------------------------------------------------------------- switching

// Park the current fiber and resume the scheduler; a fiber that is done is never resumed.
inline void switch_to_scheduler() {
  ucontext_t *from, *to;
  [[maybe_unused]] bool last;
#if defined(REMIT_EMU_TSAN)
  void* scheduler_fiber;
  int open;
#endif
#if defined(REMIT_EMU_ASAN)
  const void* bottom;
  size_t size;
#endif
  {
    const Runtime rt;
    Block& b = block();
    Fiber& f = fiber();
    from = &f.ctx;
    to = &b.scheduler;
    last = f.done;
#if defined(REMIT_EMU_TSAN)
    scheduler_fiber = b.tsan_scheduler;
    open = f.ignores - 1;  // the caller's sections, this one aside
#endif
#if defined(REMIT_EMU_ASAN)
    bottom = b.asan_bottom;
    size = b.asan_size;
#endif
  }
#if defined(REMIT_EMU_TSAN)
  if (last) {
    for (; open > 0; --open) __tsan_ignore_thread_end();
  }
  __tsan_switch_to_fiber(scheduler_fiber, 1 /* no sync */);
#endif
#if defined(REMIT_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(last ? nullptr : &fake, bottom, size);
#endif
  swapcontext(from, to);
#if defined(REMIT_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// A launch error: the launch stops, and the fibers still parked are abandoned (kernel locals
// are plain values: nothing on their stacks needs destroying).
[[noreturn]] inline void fail(std::string what) {
  const Runtime rt;
  Block& b = block();
  if (b.error.empty()) b.error = std::move(what);
  fiber().done = true;
  switch_to_scheduler();  // never resumed: the launch is abandoned
  __builtin_unreachable();
}

inline std::string where(const std::source_location& s) {
  return std::string(s.file_name()) + ":" + std::to_string(s.line());
}

inline void complete(Barrier& bar) {
  bar.result = bar.any;
  bar.any = false;
  bar.arrived = 0;
  bar.warp_sync = false;
  ++bar.generation;
  for (int i : bar.waiting) {
    block().fibers[i].ready = true;
    block().fibers[i].parked = nullptr;
  }
  bar.waiting.clear();
}

// Arrive at `bar` with `pred`; returns the OR of the generation's predicates once every live
// thread of the barrier has arrived.
inline bool arrive(Barrier& bar, bool pred, bool warp_sync, const std::source_location& site,
                   const char* what) {
  const Runtime rt;
  if (bar.arrived == 0) {
    bar.site = site;
  } else if (bar.site.line() != site.line() ||
             std::strcmp(bar.site.file_name(), site.file_name()) != 0) {
    fail(std::string("divergent ") + what + ": thread " + std::to_string(fiber().tid) +
         " of block " + std::to_string(block().block_idx.x) + " at " + where(site) +
         " while others wait at " + where(bar.site));
  }
  bar.warp_sync = bar.warp_sync || warp_sync;
  bar.any = bar.any || pred;
  [[maybe_unused]] const unsigned gen = bar.generation;
#if defined(REMIT_EMU_TSAN)
  __tsan_release(&bar.sync[gen & 1]);
#endif
  if (++bar.arrived == bar.alive) {
    complete(bar);
  } else {
    Fiber& f = fiber();
    f.ready = false;
    f.parked = &bar;
    bar.waiting.push_back(block().current);
    switch_to_scheduler();
  }
#if defined(REMIT_EMU_TSAN)
  __tsan_acquire(&bar.sync[gen & 1]);
#endif
  return bar.result;
}

inline Barrier& warp_barrier(unsigned mask, const std::source_location& site, const char* what) {
  const Runtime rt;
  Block& b = block();
  const unsigned tid = fiber().tid;
  Barrier& bar = b.warp_bars[tid / kWarp];
  if (mask != kFullMask) {
    fail(std::string(what) + " with mask " + std::to_string(mask) + " at " + where(site) +
         ": the emulator models the full mask only");
  }
  if (bar.alive != kWarp) {
    fail(std::string(what) + " at " + where(site) + " with full mask in a warp of " +
         std::to_string(bar.alive) + " live lanes (thread " + std::to_string(tid) +
         "): undefined on the GPU");
  }
  return bar;
}

// A thread returned: it leaves its warp's and its block's barriers.
inline void drop_out() {
  const Runtime rt;
  Block& b = block();
  Fiber& f = fiber();
  Barrier& warp = b.warp_bars[f.tid / kWarp];
  if (warp.arrived > 0 && warp.warp_sync) {
    fail("thread " + std::to_string(f.tid) + " returned while its warp waits in a full-mask "
         "warp op at " + where(warp.site) + ": undefined on the GPU");
  }
  for (Barrier* bar : {&warp, &b.block_bar}) {
    --bar->alive;
    if (bar->arrived > 0 && bar->arrived == bar->alive) complete(*bar);
  }
}

template <typename F>
struct Entry {
  static void run() {
    [[maybe_unused]] Block& b = block();
    F* body = static_cast<F*>(entry_body());
#if defined(REMIT_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &b.asan_bottom, &b.asan_size);
#endif
#if defined(REMIT_EMU_TSAN)
    __tsan_acquire(&b.tsan_start);
#endif
    (*body)();
#if defined(REMIT_EMU_TSAN)
    __tsan_release(&b.tsan_end);
#endif
    drop_out();
    const Runtime rt;
    fiber().done = true;
    switch_to_scheduler();
    __builtin_unreachable();
  }
  static void*& entry_body() {
    static void* p = nullptr;
    return p;
  }
};

// getcontext returns twice in principle (never here: makecontext replaces what it saved); kept
// out of run_block so that no local of the scheduler is at risk of being clobbered.
[[gnu::noinline]] inline void make_fiber(Fiber& f, void (*entry)()) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, entry, 0);
}

// Runs one block of `threads` fibers, each calling `body()`; returns false with b.error set on
// a launch error.
template <typename F>
bool run_block(Block& b, unsigned threads, F& body) {
  const Runtime rt;
  const unsigned warps = (threads + kWarp - 1) / kWarp;
  b.fibers.assign(threads, Fiber{});
  b.block_bar = Barrier{};
  b.block_bar.alive = static_cast<int>(threads);
  b.warp_bars.assign(warps, Barrier{});
  for (unsigned w = 0; w < warps; ++w) {
    const unsigned lanes = threads - w * kWarp;
    b.warp_bars[w].alive = static_cast<int>(lanes < kWarp ? lanes : kWarp);
  }
  b.slots.assign(2 * warps * kWarp, 0);
  b.error.clear();
  while (b.stacks.size() < threads) b.stacks.emplace_back(new char[kStackBytes]);
  Entry<F>::entry_body() = &body;
#if defined(REMIT_EMU_TSAN)
  b.tsan_scheduler = __tsan_get_current_fiber();
  __tsan_release(&b.tsan_start);
#endif
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = t;
    f.stack = b.stacks[t].get();
#if defined(REMIT_EMU_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // redzones left by an abandoned fiber
#endif
    make_fiber(f, &Entry<F>::run);
#if defined(REMIT_EMU_TSAN)
    f.tsan = __tsan_create_fiber(0);
#endif
  }
  // Round robin over the runnable fibers; each runs until it parks at a barrier or returns.
  for (;;) {
    bool ran = false, live = false;
    for (unsigned t = 0; t < threads && b.error.empty(); ++t) {
      Fiber& f = b.fibers[t];
      if (f.done) continue;
      live = true;
      if (!f.ready) continue;
      ran = true;
      b.current = static_cast<int>(t);
#if defined(REMIT_EMU_TSAN)
      __tsan_switch_to_fiber(f.tsan, 1 /* no sync */);
#endif
#if defined(REMIT_EMU_ASAN)
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
      swapcontext(&b.scheduler, &f.ctx);
#if defined(REMIT_EMU_ASAN)
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    }
    if (!b.error.empty()) break;
    if (!live) break;
    if (!ran) {
      // Live threads, none runnable: they wait at barriers the others will never reach.
      std::string msg = "deadlock in block " + std::to_string(b.block_idx.x) + ":";
      int shown = 0;
      for (const Fiber& f : b.fibers) {
        if (f.done || f.parked == nullptr || shown++ == 4) continue;
        msg += " thread " + std::to_string(f.tid) + " waits at " + where(f.parked->site) + ";";
      }
      b.error = msg + " the other threads returned or wait elsewhere";
      break;
    }
  }
  b.current = -1;
#if defined(REMIT_EMU_TSAN)
  __tsan_acquire(&b.tsan_end);
  for (Fiber& f : b.fibers) __tsan_destroy_fiber(f.tsan);
#endif
  return b.error.empty();
}

// A launch: REMIT_LAUNCH(k, grid, block, stream)(args...) = launch(k, grid, block)(args...).
template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, threads;

  template <typename... Args>
  void operator()(const Args&... args) const {
    ErrorState& err = error_state();
    if (err.code != cudaSuccess) return;  // a pending error: cudaGetLastError not yet called
    if (grid.x == 0 || grid.y != 1 || grid.z != 1 || threads.x == 0 || threads.x > 1024 ||
        threads.y != 1 || threads.z != 1) {
      err.code = cudaErrorInvalidConfiguration;
      err.message = "invalid launch configuration: grid (" + std::to_string(grid.x) + ", " +
                    std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                    std::to_string(threads.x) + ", " + std::to_string(threads.y) + ", " +
                    std::to_string(threads.z) + ")";
      return;
    }
    const std::tuple<Args...> params(args...);  // copied at launch, as the GPU copies them
    auto body = [&] { std::apply(kernel, params); };
    Block b;
    b.grid_dim = grid;
    b.thread_dim = threads;
    Block* outer = current_block();
    current_block() = &b;
    for (unsigned x = 0; x < grid.x; ++x) {
      b.block_idx = dim3(x, 0, 0);
      if (!run_block(b, threads.x, body)) {
        err.code = cudaErrorLaunchFailure;
        err.message = b.error;
        break;
      }
    }
    current_block() = outer;
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 threads, cudaStream_t /* one stream */) {
  return Launch<Kernel>{kernel, grid, threads};
}

inline cudaError_t get_last_error() {
  ErrorState& e = error_state();
  const cudaError_t code = e.code;
  e.code = cudaSuccess;
  return code;
}

inline uint3 thread_idx() {
  const Runtime rt;
  return make_uint3(fiber().tid, 0, 0);
}
inline uint3 block_idx() {
  const Runtime rt;
  return block().block_idx;
}
inline dim3 block_dim() {
  const Runtime rt;
  return block().thread_dim;
}
inline dim3 grid_dim() {
  const Runtime rt;
  return block().grid_dim;
}

}  // namespace emu

// ------------------------------------------------------------------- the CUDA names

#define REMIT_LAUNCH(kernel, grid, block, stream) ::emu::launch(kernel, grid, block, stream)
#define cudaGetLastError ::emu::get_last_error
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  emu::arrive(emu::block().block_bar, false, false, site, "__syncthreads");
}
inline int __syncthreads_or(int pred, std::source_location site = std::source_location::current()) {
  return emu::arrive(emu::block().block_bar, pred != 0, false, site, "__syncthreads_or") ? 1 : 0;
}
inline int __any_sync(unsigned mask, int pred,
                      std::source_location site = std::source_location::current()) {
  emu::Barrier& bar = emu::warp_barrier(mask, site, "__any_sync");
  return emu::arrive(bar, pred != 0, true, site, "__any_sync") ? 1 : 0;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = emu::kWarp,
                  std::source_location site = std::source_location::current()) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  emu::Barrier& bar = emu::warp_barrier(mask, site, "__shfl_xor_sync");
  const emu::Runtime rt;
  emu::Block& b = emu::block();
  const unsigned tid = emu::fiber().tid, warp = tid / emu::kWarp, lane = tid % emu::kWarp;
  if (width != emu::kWarp) emu::fail("__shfl_xor_sync: width != 32 is not modelled");
  const size_t warps = b.warp_bars.size();
  uint64_t* buf = b.slots.data() + (bar.generation & 1) * warps * emu::kWarp + warp * emu::kWarp;
  std::memcpy(&buf[lane], &value, sizeof(T));
  emu::arrive(bar, false, true, site, "__shfl_xor_sync");
  const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  T out = value;  // a source lane outside the warp returns the caller's own value
  if (src < static_cast<unsigned>(emu::kWarp)) std::memcpy(&out, &buf[src], sizeof(T));
  return out;
}

// Streaming accesses: plain loads and stores on the host.
inline uint4 __ldcs(const uint4* p) { return *p; }
inline void __stcs(uint4* p, uint4 v) { *p = v; }

// Products never contracted into an FMA (the build passes -ffp-contract=off; volatile makes
// it hold even if a later flag turned contraction back on).
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline double __dmul_rn(double a, double b) {
  volatile double r = a * b;
  return r;
}

// ex2.approx.ftz.f32: subnormal inputs and results flushed to (signed) zero. The hardware's
// ~2 ulp approximation is replaced by libm's exp2f: compare with tolerances, never bitwise.
inline float ex2_approx_ftz(float x) {
  auto ftz = [](float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v; };
  return ftz(std::exp2(ftz(x)));
}

// Device math the kernels call by its CUDA name (host libm has the same names for the rest).
using std::isfinite;


