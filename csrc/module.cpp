// The importable extension module. Ops are reached through torch.ops.remit_ext.*; this module
// only reports what was built, so it needs pybind11 and no torch headers.
#include <pybind11/pybind11.h>

#ifndef REMIT_TORCH_VERSION
#define REMIT_TORCH_VERSION "unknown"
#endif
#ifndef REMIT_CUDA_ARCHS
#define REMIT_CUDA_ARCHS ""
#endif
#ifndef REMIT_CPU_CAPABILITY_NAME
#define REMIT_CPU_CAPABILITY_NAME "DEFAULT"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "remit_ext compiled kernels (ops are registered under torch.ops.remit_ext)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = REMIT_TORCH_VERSION;
    info["cuda"] = static_cast<bool>(REMIT_WITH_CUDA);
    info["cuda_archs"] = REMIT_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST the kernels were built for
    info["cpu_capability"] = REMIT_CPU_CAPABILITY_NAME;
    return info;
  });
}
