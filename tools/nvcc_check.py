"""Compile check of the CUDA backend, for machines without a GPU (CI).

Compiles, with warnings as errors (compile only, no link):

- ``csrc/cuda/kernels.cu`` with nvcc for sm_80 and sm_90a: every kernel body of
  ``csrc/cuda/*.cuh`` instantiated for fp32, bf16, fp16 and fp64, with nothing but the CUDA
  toolkit (no torch include path, so a torch header sneaking into a kernel body fails here).
  ptxas register spills count as warnings too (``-Xptxas -warn-spills``): a spill in these
  streaming kernels is a performance bug. Every ``.cu`` under csrc/cuda is compiled this way.
- the torch glue ``csrc/cuda/*.cpp`` (argument checks, launches, TORCH_LIBRARY_IMPL(CUDA)) with
  the host C++ compiler, as CMake builds it, against the installed torch's headers and the CUDA
  toolkit's; through cuda/glue.h this also compiles the device-agnostic checks it shares with the
  CPU ops (``csrc/op_checks.h``). The glue holds no device code, which is why it is C++ and not
  .cu: nvcc would parse torch's headers once per architecture for nothing (4x the time of this
  check). A CPU wheel ships ATen and c10/cuda headers but not c10's generated
  ``cuda_cmake_macros.h``, hence ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` (that file only sets
  export macros for Windows DLLs); the glue avoids ATen/cuda/CUDAContext.h, which needs cuBLAS
  headers.

Exit status 0 when everything compiles; 1 on a compile failure; 2 when nvcc, a C++ compiler or
torch is missing.

    python tools/nvcc_check.py                 # the whole check (about 1 min on 2 idle cores)
    python tools/nvcc_check.py --files a.cu    # only these files (kernel-only, no torch)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHS = ("80", "90a")


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def base_flags(archs) -> list[str]:
    flags = ["-std=c++17", "-O3", "-c", f"-I{REPO / 'csrc'}",
             "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
             "-Xptxas", "-warn-spills"]
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def glue_command(cxx: str, nvcc: str) -> list[str]:
    import torch

    inc = Path(torch.__file__).parent / "include"
    cuda_inc = Path(nvcc).resolve().parent.parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -isystem: torch's and CUDA's headers are not ours to keep warning-free; CMake treats the
    # imported torch target the same way.
    return [cxx, "-std=c++17", "-O2", "-c", f"-I{REPO / 'csrc'}", "-Wall", "-Wextra", "-Werror",
            "-isystem", str(inc), "-isystem", str(inc / "torch" / "csrc" / "api" / "include"),
            "-isystem", str(cuda_inc), "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def compile_one(cmd: list[str], src: Path, outdir: Path) -> tuple[Path, int, str, float]:
    t0 = time.perf_counter()
    out = outdir / (src.name + ".o")
    proc = subprocess.run([*cmd, str(src), "-o", str(out)], capture_output=True, text=True)
    return src, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", type=Path,
                    help="compile only these .cu files, without torch headers")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), help="default: 80 90a")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc_check: nvcc not found (looked in $CUDA_HOME, /usr/local/cuda, PATH); "
              "install the CUDA toolkit (nvcc 13.0 here) to run the CUDA compile check",
              file=sys.stderr)
        return 2
    kernel_cmd = [nvcc, *base_flags(args.arch)]
    if args.files:
        units = [(kernel_cmd, f.resolve()) for f in args.files]
    else:
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            print("nvcc_check: no host C++ compiler (c++/g++) for the glue", file=sys.stderr)
            return 2
        try:
            glue_cmd = glue_command(cxx, nvcc)
        except ImportError as err:
            print(f"nvcc_check: torch is needed for the glue files ({err})", file=sys.stderr)
            return 2
        cuda_dir = REPO / "csrc" / "cuda"
        # The kernels first: the longest job starts first on few cores.
        units = [(kernel_cmd, f) for f in sorted(cuda_dir.glob("*.cu"))]
        units += [(glue_cmd, f) for f in sorted(cuda_dir.glob("*.cpp"))]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    print(f"nvcc_check: {nvcc} ({version.strip().splitlines()[-1]}), sm_{', sm_'.join(args.arch)}"
          f", {len(units)} files, {args.jobs} jobs", flush=True)
    t0 = time.perf_counter()
    failed = []
    with tempfile.TemporaryDirectory(prefix="nvcc_check_") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(compile_one, cmd, src, Path(tmp)) for cmd, src in units]
        for fut in futures:
            src, rc, log, secs = fut.result()
            name = src.relative_to(REPO) if src.is_relative_to(REPO) else src
            print(f"  {'ok  ' if rc == 0 else 'FAIL'} {name} ({secs:.1f} s)", flush=True)
            if rc != 0:
                failed.append(name)
                print(log, file=sys.stderr)
    print(f"nvcc_check: {len(units) - len(failed)}/{len(units)} compiled in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
