"""Build and call the CUDA kernels of ``csrc/cuda`` as host code (see emu.h for what is emulated).

``build(kind)`` compiles, with g++ and the CUDA toolkit's headers only (no torch, no GPU, no
driver), into a cache under ``build/cuda_emu/`` keyed by the sources, the flags and the planted
fault, and returns the artefact:

- ``"lib"``: a shared library of the kernels' C entry points (harness.cpp), loaded by
  ``Kernels`` and called on torch CPU tensors with ctypes, as the torch glue calls them on GPU
  tensors;
- ``"tsan"``: the sanitizer driver (driver.cpp) built with ``-fsanitize=thread``, the race check;
- ``"asan"``: the same driver with ``-fsanitize=address,undefined``, the bounds check;
- ``"selftest"``: small kernels of selftest.cpp that pin down the emulator's own semantics.

``fault=`` builds from a copy of ``csrc/`` with one of ``FAULTS`` planted (an exact text
replacement that must match once, so a changed kernel source fails loudly instead of planting
nothing): the tests show that each check rejects its fault.

    python tools/cuda_emu/emu.py lib|selftest|tsan|asan [--fault NAME]  # build, print the path
    python tools/cuda_emu/emu.py check                           # run both sanitizer drivers
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CSRC = REPO / "csrc"
CACHE = REPO / "build" / "cuda_emu"

# Host code with the GPU's rounding: no FMA contraction anywhere (__fmul_rn-style guards then
# mean what they mean on the GPU; the products nvcc would contract stay separate roundings, so
# results differ from the GPU's in the last bits: the tests compare with tolerances).
COMMON = ["-std=c++20", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
          "-Wno-unknown-pragmas", "-pthread"]
FLAGS = {
    "lib": ["-O2", "-fPIC", "-shared", "-fvisibility=hidden"],
    "selftest": ["-O2", "-fPIC", "-shared", "-fvisibility=hidden"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
    # -O0: 4x faster to compile than -O1 (14 s vs 53 s here) for a run of 2 s instead of 1.9.
    "asan": ["-O0", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all"],
}
SOURCES = {"lib": "harness.cpp", "selftest": "selftest.cpp", "tsan": "driver.cpp",
           "asan": "driver.cpp"}

# name -> (file under csrc/, text, replacement): each a bug of the kind its check exists for.
FAULTS = {
    # The warp reduction starts at offset 8: lanes 0-15 and 16-31 never merge (numerics).
    "shuffle_offset": ("cuda/row_ops.cuh",
                       "for (int off = 16; off > 0; off >>= 1) {\n    Softmax<A> o;",
                       "for (int off = 8; off > 0; off >>= 1) {\n    Softmax<A> o;"),
    # Warp 0 reads the other warps' partial states before they are written (race check).
    "missing_barrier": ("cuda/row_ops.cuh",
                        "    if (lane == 0) scratch[warp] = s;\n    __syncthreads();\n",
                        "    if (lane == 0) scratch[warp] = s;\n"),
    # The scalar tail reads one element past the end of the row (bounds check).
    "off_by_one": ("cuda/token_stats.cuh",
                   "for (int i = sp.tail + rank; i < V; i += kGroup) {",
                   "for (int i = sp.tail + rank; i <= V; i += kGroup) {"),
}


class EmuUnavailable(RuntimeError):
    """No g++ or no CUDA headers: the emulation cannot be built here."""


def cuda_include() -> Path:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cuda_runtime.h").is_file():
        return Path(nvcc).resolve().parent.parent / "include"
    raise EmuUnavailable("the CUDA toolkit's headers (cuda_runtime.h) were not found in "
                         "$CUDA_HOME, $CUDA_PATH, /usr/local/cuda or next to nvcc")


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise EmuUnavailable("no C++ compiler: set CXX or install g++")
    return cxx


def _source_files(root: Path) -> list[Path]:
    files = sorted((root / "cuda").glob("*.cuh")) + sorted((root / "cuda").glob("*.h"))
    return files + [root / "cuda" / "kernels.cu", *sorted(root.glob("*.h"))]


def _plant(fault: str, dest: Path) -> Path:
    """A copy of csrc/ under ``dest`` with ``fault`` planted; returns the copy's root."""
    rel, old, new = FAULTS[fault]
    root = dest / "csrc"
    shutil.copytree(CSRC, root)
    path = root / rel
    text = path.read_text()
    if text.count(old) != 1:
        raise AssertionError(f"fault {fault!r}: the text to replace occurs {text.count(old)} "
                             f"times in csrc/{rel} (expected once): update FAULTS")
    path.write_text(text.replace(old, new))
    return root


def build(kind: str = "lib", fault: str | None = None, *, verbose: bool = False) -> Path:
    """Compile ``kind`` (``lib``, ``tsan``, ``asan``), with ``fault`` planted if given; cached."""
    if kind not in FLAGS:
        raise ValueError(f"kind: expected one of {sorted(FLAGS)}, got {kind!r}")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault: expected one of {sorted(FAULTS)}, got {fault!r}")
    cxx, inc = compiler(), cuda_include()
    with tempfile.TemporaryDirectory(prefix="cuda_emu_") as tmp:
        root = CSRC if fault is None else _plant(fault, Path(tmp))
        src = HERE / SOURCES[kind]
        cmd = [cxx, *COMMON, *FLAGS[kind], "-include", str(HERE / "emu.h"), f"-I{root}",
               "-isystem", str(inc), str(src)]
        key = hashlib.sha256(" ".join(cmd[:-1]).replace(str(root), "<csrc>").encode())
        for f in [HERE / "emu.h", src, *_source_files(root)]:
            key.update(f.name.encode() + f.read_bytes())
        out = CACHE / f"{kind}-{fault or 'clean'}-{key.hexdigest()[:16]}"
        out = out / ("driver" if kind in ("tsan", "asan") else f"lib{kind}.so")
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + f".{os.getpid()}.tmp")
        proc = subprocess.run([*cmd, "-o", str(partial)], capture_output=True, text=True)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"cuda_emu: building {kind} failed:\n{' '.join(cmd)}\n"
                               f"{proc.stdout}{proc.stderr}")
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        os.replace(partial, out)  # atomic: a concurrent build of the same key is harmless
        return out


# --------------------------------------------------------------------------------- ctypes

DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "emu_token_stats": [ctypes.c_int, _P, _I64, _P, _I64, _P, ctypes.c_int, _P, _P, _P, _P, _P,
                        _I64, ctypes.c_int, _I64, ctypes.c_double],
    "emu_ce_grad": [ctypes.c_int, _P, _I64, _P, _I64, _P, ctypes.c_int, _P, _P, _P, _I64,
                    ctypes.c_int, _I64],
    "emu_remit_weights": [ctypes.c_int, _P, _P, _P, ctypes.c_int, _P, _I64, _I64, _I64,
                          ctypes.c_double, _P, _P, _P, _P, _P],
    "emu_pg_terms": [ctypes.c_int, _P, _P, ctypes.c_int, _P, _P, _P, _P, ctypes.c_double,
                     ctypes.c_double, ctypes.c_double, _P, _P, _I64, _I64],
}


class LaunchError(RuntimeError):
    """A launch the emulator refused or stopped (cudaGetLastError() != cudaSuccess)."""


class Kernels:
    """The emulated kernels' C entry points (harness.cpp) over a built ``lib``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        for name, args in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self._lib.emu_last_error_message.restype = ctypes.c_char_p
        self._lib.emu_group_size.argtypes = [ctypes.c_longlong, ctypes.c_int]

    def group_size(self, V: int, elem_size: int) -> int:
        return self._lib.emu_group_size(V, elem_size)

    def call(self, name: str, *args) -> None:
        code = getattr(self._lib, name)(*args)
        if code != 0:
            msg = self._lib.emu_last_error_message().decode()
            raise LaunchError(f"{name}: cudaError {code}: {msg}")


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=[*FLAGS, "check"])
    ap.add_argument("--fault", choices=sorted(FAULTS))
    args = ap.parse_args(argv)
    if args.kind != "check":
        print(build(args.kind, args.fault, verbose=True))
        return 0
    rc = 0
    for kind in ("tsan", "asan"):
        proc = subprocess.run([str(build(kind, args.fault))], env=sanitizer_env())
        print(f"cuda_emu {kind}: {'ok' if proc.returncode == 0 else 'FAILED'}")
        rc |= proc.returncode != 0
    return rc


def sanitizer_env() -> dict[str, str]:
    """Environment for the drivers: stop at the first report with a non-zero status."""
    env = dict(os.environ)
    env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66 report_signal_unsafe=0"
    env["ASAN_OPTIONS"] = "halt_on_error=1 detect_leaks=0 exitcode=67"
    env["UBSAN_OPTIONS"] = "halt_on_error=1 print_stacktrace=1 exitcode=68"
    return env


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
