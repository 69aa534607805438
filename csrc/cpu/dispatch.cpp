// The run-time choice among the compiled copies of the row kernels (rows.h). Compiled for the
// baseline ISA: it must run on any CPU to decide what else can.
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>

#include "cpu/rows.h"

// One declaration per copy CMake compiled (REMIT_CPU_HAVE_<ISA>).
#define REMIT_DECLARE_COPY(ISA) \
  namespace remit::cpu::ISA {   \
  const RowKernels& kernels();  \
  }
REMIT_DECLARE_COPY(DEFAULT)
#if REMIT_CPU_HAVE_AVX2
REMIT_DECLARE_COPY(AVX2)
#endif
#if REMIT_CPU_HAVE_AVX512
REMIT_DECLARE_COPY(AVX512)
#endif
#if REMIT_CPU_HAVE_AVX512_BF16
REMIT_DECLARE_COPY(AVX512_BF16)
#endif

namespace remit::cpu {

namespace {

struct Copy {
  const RowKernels* (*get)();
  bool (*runs_here)();
};

template <const RowKernels& (*K)()>
const RowKernels* pointer() {
  return &K();
}

#if defined(__x86_64__) || defined(_M_X64)
// __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV).
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512_bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#endif
[[maybe_unused]] bool always() {
  return true;
}

// Worst to best.
const std::vector<std::pair<std::string, Copy>>& copies() {
  static const std::vector<std::pair<std::string, Copy>> all = {
      {"DEFAULT", {&pointer<DEFAULT::kernels>, &always}},
#if REMIT_CPU_HAVE_AVX2
      {"AVX2", {&pointer<AVX2::kernels>, &has_avx2}},
#endif
#if REMIT_CPU_HAVE_AVX512
      {"AVX512", {&pointer<AVX512::kernels>, &has_avx512}},
#endif
#if REMIT_CPU_HAVE_AVX512_BF16
      {"AVX512_BF16", {&pointer<AVX512_BF16::kernels>, &has_avx512_bf16}},
#endif
  };
  return all;
}

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return "[" + s + "]";
}

std::vector<std::string> names_where(bool only_runnable);

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// The best copy this CPU runs, capped by REMIT_CPU_CAPABILITY (a name from copies()).
const RowKernels* pick() {
  const char* env = std::getenv("REMIT_CPU_CAPABILITY");
  const std::string cap = env ? upper(env) : "";
  const auto compiled = names_where(false);
  TORCH_CHECK_VALUE(cap.empty() || std::find(compiled.begin(), compiled.end(), cap) != compiled.end(),
                    "REMIT_CPU_CAPABILITY: expected one of ", joined(compiled), ", got '", env,
                    "'");
  const RowKernels* best = nullptr;
  for (const auto& [name, copy] : copies()) {
    if (copy.runs_here()) best = copy.get();
    if (name == cap) break;
  }
  return best;
}

std::vector<std::string> names_where(bool only_runnable) {
  std::vector<std::string> names;
  for (const auto& [name, copy] : copies()) {
    if (!only_runnable || copy.runs_here()) names.push_back(name);
  }
  return names;
}

std::atomic<const RowKernels*>& current() {
  static std::atomic<const RowKernels*> k{pick()};
  return k;
}

}  // namespace

const RowKernels& row_kernels() {
  return *current().load(std::memory_order_relaxed);
}

std::string cpu_capability() {
  return row_kernels().capability;
}

std::vector<std::string> cpu_capabilities_compiled() {
  return names_where(false);
}

std::vector<std::string> cpu_capabilities_supported() {
  return names_where(true);
}

std::string set_cpu_capability(const std::string& name) {
  const std::string want = upper(name);
  for (const auto& [n, copy] : copies()) {
    if (n != want) continue;
    TORCH_CHECK_VALUE(copy.runs_here(), "cpu capability: ", n, " was compiled but this CPU ",
                      "cannot run it; it runs ", joined(names_where(true)));
    return current().exchange(copy.get())->capability;
  }
  TORCH_CHECK_VALUE(false, "cpu capability: expected one of ", joined(names_where(false)),
                    ", got '", name, "'");
}

}  // namespace remit::cpu
