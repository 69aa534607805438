"""Compile every Triton kernel of remit_ext for real GPUs, on a machine without one.

The tests run the Triton kernels in Triton's CPU interpreter, which accepts code the GPU
compiler refuses (a plain Python global read inside ``@triton.jit``, for one). This check
compiles each kernel ahead of time, through Triton's own front end, optimiser and the ptxas it
ships, for sm_80 and sm_90, in the configurations ``remit_ext/triton/ops.py`` launches: every
input dtype, the vocabulary block sizes and warp counts ``_block_v``/``_num_warps`` pick, with
and without scorer, entropy and top-k, 32- and 64-bit strides and targets, every epilogue
variant, large and small blocks, each with the compiler options the launches pass
(``kernels.LAUNCH_OPTIONS``). Nothing runs; a kernel that fails to compile fails the check, and
so does fp32 FMA contraction in the PTX of a configuration that accumulates in fp32 (see
``fma_finding``): the interpreter never contracts, so the tests cannot see it.

Each configuration is compiled as written (no specialisation: scalar 16-bit loads for bf16
rows) and, for sm_90 with bf16 logits at the largest vocabulary block and the fp32 per-token
kernels (the hot target and shapes; the rest would double the check's time for the same
finding), with the specialisation Triton's JIT gives a real launch on the hot shapes
(``aligned``: every pointer, V and the row strides divisible by 16, as at V = 128256 with
16-byte aligned allocations), which is the code a GPU actually runs. In the aligned build of a
row kernel at the largest block, the loads of the logits must be 128-bit (``vector_finding``).

    python tools/triton_check.py            # all configurations (about a minute on 2 cores)
    python tools/triton_check.py --arch 90  # one architecture
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import itertools
import os
import sys
import time
from pathlib import Path

# Real compilation: under TRITON_INTERPRET=1 (as the CPU tests and CI set it) @triton.jit
# gives interpreter functions, which cannot be compiled. Set before triton is imported.
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KERNELS = REPO / "remit_ext" / "triton" / "kernels.py"
DATA = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}
# Vocabulary blocks a GPU launch uses (ops._block_v: next power of two of V, capped at 4096)
# and their warp counts (ops._num_warps).
BLOCKS = {256: 4, 1024: 4, 2048: 8, 4096: 8}


def load_kernels(path=None):
    """The kernels module by path: importing remit_ext.triton would register ops, not needed."""
    spec = importlib.util.spec_from_file_location("remit_ext_triton_kernels", path or KERNELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# An fp32 fused multiply-add in the PTX. With enable_fp_fusion=False LLVM contracts nothing (and
# ptxas gets --fmad=false), so in a kernel that accumulates in fp32 this instruction can only
# come from contraction, or from an explicit fma (tl.fma, or a libdevice routine: tl.exp and
# tl.log lower to ex2/lg2.approx in fp32 instead), neither of which the kernels use. The fp64
# configurations are not inspected: there libdevice's exp and log are written with explicit
# fma.rn.f64 on purpose, whatever the option says.
FMA_F32 = "fma.rn.f32"


def fma_finding(ptx: str):
    """The finding for fp32 FMA contraction in ``ptx``, or None: x * inv_temp - m contracted to
    fma(x, inv_temp, -m) is the rounding error of x * inv_temp at the row max, not 0, so the
    log-prob of a confident target came out positive at temperature != 1."""
    n = ptx.count(FMA_F32)
    if n == 0:
        return None
    line = next(ln.strip() for ln in ptx.splitlines() if FMA_F32 in ln)
    return (f"FMA contraction: {n} {FMA_F32} in the PTX (first: {line}); launch with "
            f"kernels.LAUNCH_OPTIONS (enable_fp_fusion=False)")


# Integer arguments a real launch on the hot shapes passes as multiples of 16 (V = 128256 and
# the row strides of contiguous [N, V] logits): Triton's JIT specialises them, and pointers to
# 16-byte aligned storage, as ``tt.divisibility = 16``.
ALIGNED_INTS = ("V", "stride_logits", "stride_scorer", "stride_teacher", "stride_grad")


def alignment_attrs(fn, signature: dict) -> dict:
    """The ``attrs`` of ASTSource a launch with every pointer and ALIGNED_INTS divisible by 16
    gets (what the JIT derives from the actual arguments)."""
    names = fn.arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n, ty in signature.items()
            if ty != "constexpr" and (ty.startswith("*") or n in ALIGNED_INTS)}


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   options: dict | None = None, aligned: bool = False):
    """``fn`` compiled for sm_<arch> (Triton's CompiledKernel: asm["ptx"], asm["cubin"],
    metadata); raises the compiler's error."""
    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    attrs = alignment_attrs(fn, signature) if aligned else None
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={
        "num_warps": num_warps, "num_stages": 3, **(options or {})})


def vector_finding(ptx: str):
    """The finding for an aligned row kernel whose loads are not 128-bit, or None."""
    if "ld.global.v4.b32" in ptx or "ld.global.v2.b64" in ptx or "ld.global.v4.f32" in ptx:
        return None
    return "no 128-bit global load in the aligned build: the divisibility hints were lost"


def compile_one(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                options: dict | None = None, forbid_fma: bool = False, aligned: bool = False,
                need_vectors: bool = False):
    """Compile ``fn`` for sm_<arch> with the compiler ``options`` (Triton's defaults if None);
    returns the error text, or None when it compiled (and, with ``forbid_fma``, its PTX holds no
    fp32 FMA; with ``need_vectors``, it loads 128 bits at a time)."""
    try:
        kernel = compile_kernel(fn, signature, constexprs, arch, num_warps, options, aligned)
    except Exception as err:  # any compiler error is the finding
        return f"{type(err).__name__}: {err}"
    ptx = kernel.asm["ptx"]
    return ((fma_finding(ptx) if forbid_fma else None)
            or (vector_finding(ptx) if need_vectors else None))


def configurations(K):
    """(label, kernel, signature, constexprs, num_warps) for every launch shape ops.py makes.
    fp32 accumulation (``constexprs["ACC"]``) marks the configurations whose PTX is inspected."""
    for dt, ptr in DATA.items():
        acc = tl.float64 if dt == "fp64" else tl.float32
        ap = "*fp64" if dt == "fp64" else "*fp32"
        for block, warps in BLOCKS.items():
            for stride in (("i32", "i64") if block == 4096 else ("i32",)):
                for scorer, entropy, topk in ((False, False, 0), (True, False, 0),
                                              (False, True, 0), (True, True, 16),
                                              (False, True, 64)):
                    if (block != 4096 or stride == "i64") and (topk or scorer != entropy):
                        continue  # every variant at the largest block, a few at the others
                    sig = {"logits_ptr": ptr, "scorer_ptr": ptr,
                           "targets_ptr": "*i32" if dt == "fp16" else "*i64",
                           "lse_ptr": ap, "logprob_ptr": ap, "entropy_ptr": ap, "topk_ptr": ap,
                           "s_lse_ptr": ap, "s_logprob_ptr": ap, "V": "i32",
                           "stride_logits": stride, "stride_scorer": stride,
                           "ignore_index": "i32", "inv_temp_ptr": ap}
                    consts = {"HAS_SCORER": scorer, "WITH_ENTROPY": entropy, "BLOCK_V": block,
                              "ACC": acc, "TOPK": topk,
                              "TOPK_PAD": triton.next_power_of_2(max(topk, 1)),
                              "TOPK_RENORM": topk > 0}
                    yield (f"token_stats {dt} block {block} stride {stride} scorer {scorer} "
                           f"entropy {entropy} topk {topk}", K._token_stats_fwd_kernel, sig,
                           consts, warps)
                sig = {"logits_ptr": ptr, "grad_ptr": ptr,
                       "targets_ptr": "*i32" if dt == "fp16" else "*i64",
                       "lse_ptr": ap, "logprob_ptr": ap, "coef_ptr": ap, "V": "i32",
                       "stride_logits": stride, "stride_grad": stride, "ignore_index": "i32"}
                yield (f"ce_bwd {dt} block {block} stride {stride}", K._ce_bwd_kernel, sig,
                       {"BLOCK_V": block, "ACC": acc}, warps)
                # KD: a student and a teacher row side by side, forward and backward; every
                # dtype at the largest block, fp32 at the others (CI time).
                if block != max(BLOCKS) and dt != "fp32":
                    continue
                tp = "*i32" if dt == "fp16" else "*i64"
                sig = {"logits_ptr": ptr, "teacher_ptr": ptr, "targets_ptr": tp,
                       "loss_ptr": ap, "lse_ptr": ap, "teacher_lse_ptr": ap, "V": "i32",
                       "stride_logits": stride, "stride_teacher": stride,
                       "ignore_index": "i32", "inv_temp_ptr": ap}
                yield (f"kd_fwd {dt} block {block} stride {stride}", K._kd_fwd_kernel, sig,
                       {"BLOCK_V": block, "ACC": acc}, warps)
                sig = {"logits_ptr": ptr, "teacher_ptr": ptr, "grad_ptr": ptr,
                       "targets_ptr": tp, "lse_ptr": ap, "teacher_lse_ptr": ap, "coef_ptr": ap,
                       "V": "i32", "stride_logits": stride, "stride_teacher": stride,
                       "stride_grad": stride, "ignore_index": "i32", "inv_temp_ptr": ap}
                yield (f"kd_bwd {dt} block {block} stride {stride}", K._kd_bwd_kernel, sig,
                       {"BLOCK_V": block, "ACC": acc}, warps)
    for acc, ap in ((tl.float32, "*fp32"), (tl.float64, "*fp64")):
        for write_loss, cu in itertools.product((False, True), ("*i32", "*i64")):
            sig = {"a_ptr": ap, "b_ptr": ap, "targets_ptr": "*i64", "cu_ptr": cu, "w_ptr": ap,
                   "dhat_ptr": ap, "loss_ptr": ap, "partial_ptr": ap, "N": "i32",
                   "ignore_index": "i32", "band_ptr": ap}
            yield (f"remit_weights {ap[1:]} loss {write_loss} cu {cu[1:]}",
                   K._remit_weights_kernel, sig,
                   {"WRITE_LOSS": write_loss, "BLOCK": 1024, "ACC": acc}, 4)
        for scale, old, ref in itertools.product((False, True), repeat=3):
            sig = {"logprob_ptr": ap, "targets_ptr": "*i64", "adv_ptr": ap, "scale_ptr": ap,
                   "old_ptr": ap, "ref_ptr": ap, "coefs_ptr": ap, "loss_ptr": ap,
                   "dlogprob_ptr": ap, "N": "i32", "ignore_index": "i32"}
            for block in (1024, 16) if scale and old and ref else (1024,):  # 16: small N
                yield (f"pg_terms {ap[1:]} scale {scale} old {old} ref {ref} block {block}",
                       K._pg_terms_kernel, sig, {"HAS_SCALE": scale, "HAS_OLD": old,
                                                 "HAS_REF": ref, "BLOCK": block, "ACC": acc}, 4)


def hot(arch: int, consts: dict, sig: dict) -> bool:
    """The configurations a launch on the hot shapes runs, compiled aligned too: sm_90; for the
    row kernels bf16 logits at the largest block (V = 128256 is divisible by 16); the
    per-token kernels in fp32."""
    if arch < 90:
        return False
    if "BLOCK_V" in consts:
        return consts["BLOCK_V"] == max(BLOCKS) and sig.get("logits_ptr") == DATA["bf16"]
    return consts.get("ACC") == tl.float32


def check_config(K, fn, sig, consts, arch, warps, options=None, aligned=False):
    """compile_one for one of ``configurations(K)``, with ``K.LAUNCH_OPTIONS`` unless told
    otherwise; the PTX of every fp32-accumulating configuration is inspected for FMA, and that
    of an aligned row kernel at the largest block for 128-bit loads."""
    row_kernel = "V" in sig and consts.get("BLOCK_V") == max(BLOCKS)
    return compile_one(fn, dict(sig), consts, arch, warps,
                       K.LAUNCH_OPTIONS if options is None else options,
                       forbid_fma=consts["ACC"] == tl.float32, aligned=aligned,
                       need_vectors=aligned and row_kernel)


def _compile_job(job):
    kernels, label, name, sig, consts, warps, arch, aligned = job
    K = load_kernels(kernels)
    err = check_config(K, getattr(K, name), sig, consts, arch, warps, aligned=aligned)
    return label + (" aligned" if aligned else ""), arch, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                    help="compute capabilities to compile for (default 80 90)")
    ap.add_argument("--kernels", type=Path, default=KERNELS,
                    help="the kernels module to check (default remit_ext/triton/kernels.py)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = ap.parse_args(argv)
    jobs = [(str(args.kernels), label, fn.__name__, sig, consts, warps, arch, aligned)
            for label, fn, sig, consts, warps in configurations(load_kernels(args.kernels))
            for arch in args.arch for aligned in ((False, True) if hot(arch, consts, sig)
                                                  else (False,))]
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(_compile_job, jobs))
    failures = [(label, arch, err) for label, arch, err in results if err]
    for label, arch, err in failures:
        print(f"FAIL sm_{arch} {label}\n  {err[:2000]}", file=sys.stderr)
    print(f"triton_check: {len(jobs) - len(failures)}/{len(jobs)} kernel configurations "
          f"compiled for sm_{', sm_'.join(map(str, args.arch))} (unspecialised; sm_90 also "
          f"aligned), no fp32 FMA contraction, 128-bit loads where aligned "
          f"(triton {triton.__version__}, {time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
