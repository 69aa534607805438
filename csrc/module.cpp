// The importable extension module. Ops are reached through torch.ops.remit_ext.*; this module
// reports what was built and which copy of the CPU row kernels runs (cpu/rows.h).
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/rows.h"

#ifndef REMIT_TORCH_VERSION
#define REMIT_TORCH_VERSION "unknown"
#endif
#ifndef REMIT_CUDA_ARCHS
#define REMIT_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "remit_ext compiled kernels (ops are registered under torch.ops.remit_ext)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = REMIT_TORCH_VERSION;
    info["cuda"] = static_cast<bool>(REMIT_WITH_CUDA);
    info["cuda_archs"] = REMIT_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST the kernels were built for
    // The copy of the CPU row kernels in use, and every copy built (worst to best).
    try {
      info["cpu_capability"] = remit::cpu::cpu_capability();
    } catch (const c10::Error& e) {  // REMIT_CPU_CAPABILITY names no compiled copy
      throw pybind11::value_error(e.what_without_backtrace());
    }
    info["cpu_capabilities"] = remit::cpu::cpu_capabilities_compiled();
    return info;
  });
  m.def("cpu_capabilities_supported", &remit::cpu::cpu_capabilities_supported,
        "The compiled copies of the CPU row kernels this CPU can run, worst to best.");
  m.def(
      "set_cpu_capability",
      [](const std::string& name) {
        try {
          return remit::cpu::set_cpu_capability(name);
        } catch (const c10::Error& e) {
          throw pybind11::value_error(e.what_without_backtrace());
        }
      },
      "Run the CPU row kernels compiled for `name` (one of cpu_capabilities_supported()); "
      "returns the previous one.");
}
