"""The static GPU performance ledger: what the compiled kernels say about their H100 speed,
without a GPU. Every number it writes is PREDICTED, NOT MEASURED.

For every CUDA kernel (``csrc/cuda/kernels.cu``, nvcc for sm_90a) and every Triton kernel
(``remit_ext/triton/kernels.py``, Triton's compiler for sm_90 with the divisibility a real launch
at V = 128256 gets) at the hot shapes (16384 x 128256 bf16 logits; the fused-linear engine's
chunk of rows at that vocabulary; N = 16384 for the per-token kernels):

- registers, local memory (spills), static shared memory: ``cuobjdump --dump-resource-usage``
  on the cubin (the cuobjdump Triton ships);
- blocks and warps per SM on an H100 and what limits them: the CUDA toolkit's header-only
  occupancy calculator (``cuda_occupancy.h``), with H100 SXM properties filled in by hand;
- the main loop from the SASS: the loop over the row with the most 128-bit loads, along the
  path that evaluates the most exponentials (the common case: rarely taken branches without an
  exp are skipped, a rescale with one is counted, so this is an upper estimate), as SASS
  instructions, exps and bytes per element;
- a predicted time: the largest of bytes moved / bandwidth, issued warp instructions / issue
  rate and exps / MUFU rate, times the tail of the last wave, plus a launch overhead; every
  assumption is listed in the ledger.

The first GPU run (tools/gpu_check.sh) measures the bandwidth and the kernels' times; the
ledger then gets one measured bandwidth in place of the assumed one and measured times beside
the predicted ones.

    python tools/gpu_static.py                        # writes bench/results/gpu_static.{md,csv}
    python tools/gpu_static.py --out-dir /tmp/x       # elsewhere (CI: a check that it builds)
    python tools/gpu_static.py --bandwidth-tbs 3.1 --bandwidth-source "measured on ..."
                                  # after a GPU run: tools/gpu_bandwidth.py's read number
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "results"
N_HOT, V_HOT = 16384, 128256
ELEM = 2  # bf16

# H100 SXM5 (80 GB), as assumed. Replace BANDWIDTH with the first measured number.
H100 = {
    "sms": 132,
    "clock_ghz": 1.755,          # sustained boost under load (spec max 1.98 GHz)
    "schedulers_per_sm": 4,      # one warp instruction issued per scheduler per clock
    "mufu_per_sm_clk": 16,       # MUFU.EX2 results per SM per clock
    "bandwidth_tbs": 3.0,        # ~90% of the 3.35 TB/s HBM3 peak: a planning number
    "launch_us": 4.0,            # launch + tail latency of one kernel
    "regs_per_sm": 65536,
    "smem_per_sm": 233472,       # 228 KiB
    "smem_per_block_optin": 232448,
    "max_threads_per_sm": 2048,
}

OCC_SOURCE = r"""
#include <cuda_occupancy.h>
#include <cstdio>
// stdin: threads regs smem_bytes max_threads_per_block; stdout: blocks/SM and limiting factors.
int main() {
  cudaOccDeviceProp p;
  p.computeMajor = 9; p.computeMinor = 0;
  p.maxThreadsPerBlock = 1024; p.maxThreadsPerMultiprocessor = %(max_threads_per_sm)d;
  p.regsPerBlock = 65536; p.regsPerMultiprocessor = %(regs_per_sm)d; p.warpSize = 32;
  p.sharedMemPerBlock = 49152; p.sharedMemPerMultiprocessor = %(smem_per_sm)d;
  p.numSms = %(sms)d; p.sharedMemPerBlockOptin = %(smem_per_block_optin)d;
  p.reservedSharedMemPerBlock = 1024;
  int threads, regs, limit; long smem;
  while (std::scanf("%%d %%d %%ld %%d", &threads, &regs, &smem, &limit) == 4) {
    cudaOccFuncAttributes a;
    a.maxThreadsPerBlock = limit; a.numRegs = regs; a.sharedSizeBytes = smem;
    a.partitionedGCConfig = PARTITIONED_GC_OFF; a.shmemLimitConfig = FUNC_SHMEM_LIMIT_DEFAULT;
    a.maxDynamicSharedSizeBytes = 0; a.numBlockBarriers = 1;
    cudaOccDeviceState s;
    cudaOccResult r;
    if (cudaOccMaxActiveBlocksPerMultiprocessor(&r, &p, &a, &s, threads, 0) != CUDA_OCC_SUCCESS) {
      std::printf("-1 0\n");
    } else {
      std::printf("%%d %%u\n", r.activeBlocksPerMultiprocessor, r.limitingFactors);
    }
  }
}
"""
LIMITERS = {0x01: "warps", 0x02: "registers", 0x04: "shared memory", 0x08: "blocks",
            0x10: "barriers"}


def _triton_check():
    """tools/triton_check.py, imported for real compilation (it sets TRITON_INTERPRET=0 before
    triton is imported: call this only in a process of its own, never under the test suite's
    interpreter)."""
    sys.path.insert(0, str(TOOLS))
    import triton_check

    return triton_check


def tool(name: str) -> str:
    """A CUDA binary utility: Triton's bundled copy first (a dependency already), then PATH."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"gpu_static: {name} not found (Triton's bundled copy or PATH)")
    return found


# ------------------------------------------------------------------------------- SASS

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclass
class Instr:
    addr: int
    pred: bool
    op: str
    args: str


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """cuobjdump -sass output -> {mangled function name: instructions}."""
    funcs: dict[str, list[Instr]] = {}
    cur = None
    for line in text.splitlines():
        if "Function :" in line:
            cur = funcs.setdefault(line.split("Function :")[1].strip(), [])
            continue
        m = INSTR.search(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4)))
    return funcs


def mem_bytes(ins: Instr) -> tuple[int, int]:
    """(bytes loaded, bytes stored) by one thread executing a global load or store."""
    if not (ins.op.startswith("LDG") or ins.op.startswith("STG")):
        return 0, 0
    width = 4
    for suffix, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1),
                      (".S8", 1)):
        if suffix in ins.op:
            width = w
    return (width, 0) if ins.op.startswith("LDG") else (0, width)


@dataclass
class Loop:
    instr: int          # SASS instructions along the chosen path, one iteration
    exps: int           # MUFU.EX2 along it
    load_bytes: int     # per thread per iteration
    store_bytes: int
    vec_loads: int      # 128-bit loads


def main_loops(code: list[Instr]) -> list[Loop]:
    """The loops over the row, in address order: predicated backward branches whose body holds
    the most 128-bit loads, each along the path through its body with the most exps (then the
    fewest instructions). A kernel sweeping two rows (policy, scorer) has two."""
    index = {ins.addr: i for i, ins in enumerate(code)}
    loops = []
    for j, ins in enumerate(code):
        # A loop's back edge is its condition: predicated. (Unconditional backward branches
        # are the returns of out-of-line code, e.g. the divergent-shuffle fallbacks.)
        if not ins.op.startswith("BRA") or not ins.pred:
            continue
        m = BRANCH_TARGET.search(ins.args)
        if not m or int(m.group(1), 16) >= ins.addr or int(m.group(1), 16) not in index:
            continue
        head = index[int(m.group(1), 16)]
        vec = sum(1 for x in code[head:j + 1] if ".128" in x.op and x.op.startswith("LDG"))
        if vec:
            loops.append((head, j, vec))
    if not loops:
        return []
    most = max(v for _, _, v in loops)
    # Innermost first: a loop nested in another with the same loads is the one that runs.
    chosen = []
    for head, tail, vec in sorted(loops, key=lambda t: t[1] - t[0]):
        if vec == most and not any(head <= h and t <= tail for h, t in chosen):
            chosen.append((head, tail))
    return [_best_path(code, head, tail, index) for head, tail in sorted(chosen)]


def _best_path(code, head, tail, index) -> Loop:
    """Longest path by (128-bit loads, exps, -instructions) from code[head] to the back edge
    code[tail] over the forward edges inside the body (a DAG in address order): the iteration
    that reads its vectors and evaluates their exps, the rarely taken branches without them
    skipped."""
    best: dict[int, tuple] = {head: (0, 0, 0, 0, 0)}  # i -> (vec, exps, -instr, ld, st)
    for i in range(head, tail + 1):
        if i not in best:
            continue
        vec, e, ni, ld, st = best[i]
        ins = code[i]
        lb, sb = mem_bytes(ins)
        cur = (vec + (ins.op.startswith("LDG") and ".128" in ins.op),
               e + ins.op.startswith("MUFU.EX2"), ni - 1, ld + lb, st + sb)
        if i == tail:
            best[i] = cur
            break
        succ = []
        if ins.op.startswith("BRA") or ins.op.startswith("JMP"):
            m = BRANCH_TARGET.search(ins.args)
            target = index.get(int(m.group(1), 16)) if m else None
            if target is not None and head < target <= tail:
                succ.append(target)
            if ins.pred or ".DIV" in ins.op:
                succ.append(i + 1)
        elif ins.op.startswith("EXIT") or ins.op.startswith("RET"):
            if ins.pred:
                succ.append(i + 1)
        else:
            succ.append(i + 1)
        for s in succ:
            if s <= tail and (s not in best or best[s][:3] < cur[:3]):
                best[s] = cur
    if tail not in best:
        raise SystemExit(f"gpu_static: no path through the loop at {code[head].addr:#x}")
    vec, e, ni, ld, st = best[tail]
    return Loop(-ni, e, ld, st, vec)


def resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump --dump-resource-usage -> {function: {REG, STACK, SHARED, LOCAL, ...}}."""
    out, cur = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Function "):
            cur = line[len("Function "):].rstrip(":")
        elif cur and line.startswith("REG:"):
            out[cur] = {k: int(v) for k, v in re.findall(r"([A-Z]+)(?:\[\d+\])?:(\d+)", line)}
    return out


# ----------------------------------------------------------------------------- kernels

@dataclass
class Row:
    backend: str
    kernel: str
    variant: str
    shape: str
    threads: int
    blocks: int
    regs: int = 0
    local: int = 0
    smem: int = 0
    launch_bound: int = 1024
    row_elems: float = 0.0        # elements swept per main loop (N x V), 0 for O(N) kernels
    passes: int = 1               # main loops that run (the scorer rows: a second one)
    sweeps: int = 1               # rows one main loop reads side by side (KD: student, teacher)
    other_bytes: float = 0.0      # per-token vectors read and written
    loops: list = field(default_factory=list)
    blocks_per_sm: int = 0
    limiter: str = ""


def cuda_rows(tmp: Path) -> tuple[list[Row], dict, dict]:
    nvcc = triton_check_nvcc()
    cubin = tmp / "kernels_sm90a.cubin"
    subprocess.run([nvcc, "-cubin", "-std=c++17", "-O3", "-gencode",
                    "arch=compute_90a,code=sm_90a", f"-I{REPO / 'csrc'}",
                    str(REPO / "csrc" / "cuda" / "kernels.cu"), "-o", str(cubin)], check=True)
    return _rows_from_cubin(cubin, cuda_kernels())


def triton_check_nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        raise SystemExit("gpu_static: nvcc not found")
    return found


def chunk_rows() -> dict[str, int]:
    """Rows per fused-linear chunk at V = 128256, bf16, the CUDA default budget
    (remit_ext._linear_plan: 2 GiB of chunk buffers), as the engine plans them."""
    budget = 2 << 30
    return {"remit": budget // (V_HOT * 2 * ELEM), "ntp": budget // (V_HOT * ELEM)}


def _mangled(kernel: str, dtype: str, group: int, *, entropy=None) -> str:
    t = {"bf16": "13__nv_bfloat16", "fp32": "f"}[dtype]
    if kernel == "token_stats":
        return (f"_ZN5remit4cuda18token_stats_kernelI{t}Li{group}ELb{int(entropy)}EEEv"
                f"NS0_11StatsParamsIT_EE")
    return f"_ZN5remit4cuda14ce_grad_kernelI{t}Li{group}EEEvNS0_10GradParamsIT_EE"


def cuda_kernels() -> list[tuple[Row, str]]:
    N, V, chunk = N_HOT, V_HOT, chunk_rows()
    acc = 4  # fp32 per-token vectors
    rows = []
    for n, where in ((N, f"{N} x {V}"), (chunk["remit"], f"chunk {chunk['remit']} x {V}")):
        rows.append((Row("cuda", "token_stats", "lse, logprob, entropy", where, 512, n,
                         row_elems=n * V, other_bytes=n * (8 + 3 * acc)),
                     _mangled("token_stats", "bf16", 512, entropy=True)))
        rows.append((Row("cuda", "token_stats", "policy + scorer rows (remit_loss fwd)", where,
                         512, n, row_elems=n * V, passes=2, other_bytes=n * (8 + 4 * acc)),
                     _mangled("token_stats", "bf16", 512, entropy=False)))
        rows.append((Row("cuda", "ce_grad", "in place (weighted_ce_bwd_)", where, 512, n,
                         row_elems=n * V, other_bytes=n * (8 + 3 * acc)),
                     _mangled("ce_grad", "bf16", 512)))
    rows.append((Row("cuda", "remit_weights", "4 sequences of 4096, fp32", f"N {N}", 256, 4,
                     launch_bound=256, other_bytes=N * (8 + 2 * acc + 3 * acc)),
                 "_ZN5remit4cuda20remit_weights_kernelIfEEvNS0_13WeightsParamsIT_EE"))
    rows.append((Row("cuda", "remit_diag", "one block, fp32", "S 4", 256, 1, launch_bound=256,
                     other_bytes=4 * 7 * 8),
                 "_ZN5remit4cuda17remit_diag_kernelIfEEvNS0_13WeightsParamsIT_EE"))
    rows.append((Row("cuda", "pg_terms", "PPO + KL + scale, fp32", f"N {N}", 256, N // 256,
                     launch_bound=256, other_bytes=N * (8 + 5 * acc + 2 * acc)),
                 "_ZN5remit4cuda15pg_terms_kernelIfEEvNS0_8PgParamsIT_EE"))
    return rows


def _rows_from_cubin(cubin: Path, kernels) -> tuple[list[Row], dict, dict]:
    usage = resource_usage(_run([tool("cuobjdump"), "--dump-resource-usage", str(cubin)]))
    sass = parse_sass(_run([tool("cuobjdump"), "-sass", str(cubin)]))
    rows = []
    for row, name in kernels:
        if name not in usage or name not in sass:
            raise SystemExit(f"gpu_static: {name} not in {cubin.name} (kernels renamed?)")
        u = usage[name]
        row.regs, row.local, row.smem = u["REG"], u.get("LOCAL", 0) + u.get("STACK", 0), u["SHARED"]
        if row.row_elems:
            row.loops = main_loops(sass[name])[:row.passes]
            if len(row.loops) != row.passes:
                raise SystemExit(f"gpu_static: no main loop with 128-bit loads in {name}")
        rows.append(row)
    return rows, usage, sass


def triton_rows(tmp: Path) -> list[Row]:
    triton_check = _triton_check()
    K = triton_check.load_kernels()
    configs = {label: cfg for label, *cfg in triton_check.configurations(K)}
    N, V, chunk = N_HOT, V_HOT, chunk_rows()
    # (configuration, kernel, variant, per-token bytes, main loops, rows each loop sweeps)
    wanted = [
        ("token_stats bf16 block 4096 stride i32 scorer False entropy True topk 0",
         "token_stats", "lse, logprob, entropy", 8 + 3 * 4, 1, 1),
        ("token_stats bf16 block 4096 stride i32 scorer True entropy False topk 0",
         "token_stats", "policy + scorer rows (remit_loss fwd)", 8 + 4 * 4, 2, 1),
        ("ce_bwd bf16 block 4096 stride i32", "ce_bwd", "in place", 8 + 3 * 4, 1, 1),
        ("kd_fwd bf16 block 4096 stride i32", "kd", "student + teacher rows, one sweep",
         8 + 3 * 4, 1, 2),
        ("kd_bwd bf16 block 4096 stride i32", "kd_bwd", "student + teacher rows -> gradient",
         8 + 3 * 4, 1, 2),
    ]
    rows = []
    for n, where in ((N, f"{N} x {V}"), (chunk["remit"], f"chunk {chunk['remit']} x {V}")):
        for label, kernel, variant, per_token, passes, sweeps in wanted:
            fn, sig, consts, warps = configs[label]
            rows.append((Row("triton", kernel, variant, where, warps * 32, n,
                             launch_bound=warps * 32, row_elems=n * V, passes=passes,
                             sweeps=sweeps, other_bytes=n * per_token),
                         (fn, sig, consts, warps)))
    for label, kernel, variant, blocks, per_token in (
            ("remit_weights fp32 loss True cu i64", "remit_weights", "4 sequences, fp32", 4,
             8 + 5 * 4),
            ("pg_terms fp32 scale True old True ref True block 1024", "pg_terms",
             "PPO + KL + scale, fp32", N // 1024, 8 + 7 * 4)):
        fn, sig, consts, warps = configs[label]
        rows.append((Row("triton", kernel, variant, f"N {N}", warps * 32, blocks,
                         launch_bound=warps * 32, other_bytes=N * per_token),
                     (fn, sig, consts, warps)))
    out = []
    for i, (row, (fn, sig, consts, warps)) in enumerate(rows):
        k = triton_check.compile_kernel(fn, sig, consts, 90, warps, K.LAUNCH_OPTIONS,
                                        aligned=True)
        cubin = tmp / f"triton_{i}.cubin"
        cubin.write_bytes(k.asm["cubin"])
        usage = resource_usage(_run([tool("cuobjdump"), "--dump-resource-usage", str(cubin)]))
        sass = parse_sass(_run([tool("cuobjdump"), "-sass", str(cubin)]))
        (name, u), = usage.items()
        row.regs, row.local = u["REG"], u.get("LOCAL", 0) + u.get("STACK", 0)
        row.smem = max(u["SHARED"], int(k.metadata.shared))
        if row.row_elems:
            row.loops = main_loops(sass[name])[:row.passes]
            if len(row.loops) != row.passes:
                raise SystemExit(f"gpu_static: no main loop with 128-bit loads in {row.kernel}")
        out.append(row)
    return out


def _run(cmd) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def occupancy(rows: list[Row], tmp: Path) -> None:
    exe = tmp / "occ"
    src = tmp / "occ.cpp"
    src.write_text(OCC_SOURCE % H100)
    inc = Path(triton_check_nvcc()).resolve().parent.parent / "include"
    cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
    subprocess.run([cxx, "-O1", "-std=c++17", "-isystem", str(inc), str(src), "-o", str(exe)],
                   check=True)
    query = "".join(f"{r.threads} {r.regs} {r.smem} {r.launch_bound}\n" for r in rows)
    answers = _run_input([str(exe)], query).split("\n")
    for r, line in zip(rows, answers):
        blocks, factors = (int(v) for v in line.split())
        r.blocks_per_sm = blocks
        r.limiter = ", ".join(n for bit, n in LIMITERS.items() if factors & bit) or "-"


def _run_input(cmd, stdin: str) -> str:
    return subprocess.run(cmd, input=stdin, check=True, capture_output=True, text=True).stdout


# -------------------------------------------------------------------------- prediction

def predict(r: Row) -> dict:
    h = H100
    clock = h["clock_ghz"] * 1e9
    bw = h["bandwidth_tbs"] * 1e12
    out = {"instr_per_elem": "", "exps_per_elem": "", "bytes_per_elem": ""}
    resident = h["sms"] * max(r.blocks_per_sm, 1)
    waves = r.blocks / resident
    # The last wave of a row kernel runs part-full; a per-token kernel's few blocks are
    # accounted for by the bandwidth they can pull instead.
    tail = math.ceil(waves) / waves if r.loops and waves > 0 else 1.0
    if r.loops:
        t_mem = t_issue = t_mufu = 0.0
        instr = exps = bytes_ = 0.0
        for lp in r.loops:
            # Elements of the row one iteration reads, per thread (of each row it sweeps).
            elems = lp.load_bytes / ELEM / r.sweeps
            instr += lp.instr / elems
            exps += lp.exps / elems
            bytes_ += (lp.load_bytes + lp.store_bytes) / elems
        total_bytes = r.row_elems * bytes_ + r.other_bytes
        t_mem = total_bytes / bw
        t_issue = r.row_elems * instr / 32 / (h["sms"] * h["schedulers_per_sm"] * clock)
        t_mufu = r.row_elems * exps / (h["sms"] * h["mufu_per_sm_clk"] * clock)
        out.update(instr_per_elem=f"{instr:.1f}", exps_per_elem=f"{exps:.2f}",
                   bytes_per_elem=f"{bytes_:.1f}")
    else:
        # Per-token kernels: bytes over the SMs that have a block (few blocks: few SMs pull).
        total_bytes = r.other_bytes
        t_mem = total_bytes / (bw * min(1.0, r.blocks / h["sms"]))
        t_issue = t_mufu = 0.0
    bounds = {"memory": t_mem, "issue": t_issue, "MUFU": t_mufu}
    bound = max(bounds, key=bounds.get)
    pred = bounds[bound] * tail + h["launch_us"] * 1e-6
    out.update(bytes=total_bytes, t_mem_us=t_mem * 1e6, t_issue_us=t_issue * 1e6,
               t_mufu_us=t_mufu * 1e6, waves=waves, bound=bound, predicted_us=pred * 1e6)
    return out


COLUMNS = ["backend", "kernel", "variant", "shape", "threads", "blocks", "regs", "local_bytes",
           "smem_bytes", "blocks_per_sm", "warps_per_sm", "occupancy", "limiter",
           "loop_instr", "instr_per_elem", "exps_per_elem", "bytes_per_elem", "gbytes",
           "t_mem_us", "t_issue_us", "t_mufu_us", "waves", "bound", "predicted_us"]


def table(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        p = predict(r)
        warps = r.blocks_per_sm * r.threads // 32
        out.append({
            "backend": r.backend, "kernel": r.kernel, "variant": r.variant, "shape": r.shape,
            "threads": r.threads, "blocks": r.blocks, "regs": r.regs, "local_bytes": r.local,
            "smem_bytes": r.smem, "blocks_per_sm": r.blocks_per_sm, "warps_per_sm": warps,
            "occupancy": f"{warps / 64:.0%}", "limiter": r.limiter,
            "loop_instr": "+".join(str(lp.instr) for lp in r.loops),
            "instr_per_elem": p["instr_per_elem"], "exps_per_elem": p["exps_per_elem"],
            "bytes_per_elem": p["bytes_per_elem"], "gbytes": f"{p['bytes'] / 1e9:.3f}",
            "t_mem_us": f"{p['t_mem_us']:.1f}", "t_issue_us": f"{p['t_issue_us']:.1f}",
            "t_mufu_us": f"{p['t_mufu_us']:.1f}", "waves": f"{p['waves']:.2f}",
            "bound": p["bound"], "predicted_us": f"{p['predicted_us']:.0f}",
        })
    return out


def write(records: list[dict], out_dir: Path, provenance: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gpu_static.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(records)
    h = H100
    md = [
        "# Static GPU ledger: H100, **predicted, not measured**",
        "",
        "Generated by `python tools/gpu_static.py` from the compiled kernels alone: no GPU ran",
        "anything. Every time below is a **prediction** from the SASS, the resource usage and",
        "the assumptions listed; none is a measurement. The first GPU run",
        "(`tools/gpu_check.sh`) replaces the assumed bandwidth with a measured one and puts the",
        "measured kernel times beside these.",
        "",
        provenance,
        "",
        "## Assumptions (H100 SXM5)",
        "",
        f"- {h['sms']} SMs at {h['clock_ghz']} GHz (assumed sustained clock; spec max 1.98 GHz);",
        f"  {h['schedulers_per_sm']} warp schedulers per SM issuing one warp instruction per "
        "clock;",
        f"  {h['mufu_per_sm_clk']} MUFU.EX2 results per SM per clock.",
        f"- Bandwidth **{h['bandwidth_tbs']} TB/s** "
        f"{h.get('bandwidth_note', 'assumed (~90% of the 3.35 TB/s HBM3 peak)')},",
        "  for every byte: a kernel streaming a [N, V] tensor never fits it in the 50 MB L2.",
        f"- Launch overhead {h['launch_us']} us per kernel; the bound is multiplied by the tail",
        "  of the last wave (ceil(waves) / waves, waves = blocks / (SMs x blocks per SM)).",
        "- Row kernels: the main loop is the backward branch of the SASS with the most 128-bit",
        "  loads, along the path with the most loads and exps (the common case; a rescale",
        "  branch holding an exp is counted: an upper estimate of the instructions). Issue time =",
        "  elements x instructions per element / 32 lanes / (SMs x schedulers x clock); MUFU",
        "  time = elements x exps per element / (SMs x MUFU rate x clock); memory time = (row",
        "  bytes + per-token vectors) / bandwidth. Prediction = max of the three x tail +",
        "  launch. Per-token kernels (remit_weights, pg_terms): their bytes over the SMs holding",
        "  a block (few blocks pull little bandwidth), + launch; their latency (a block walking",
        "  a 4096-token sequence twice) is not modelled, so theirs are lower bounds.",
        "- Occupancy: `cuda_occupancy.h` (the toolkit's calculator) with these properties;",
        "  64 warps per SM is 100%. `local_bytes` is local memory (register spills, stack).",
        "- Hot shapes: 16384 x 128256 bf16 logits (Llama-3's vocabulary); the fused-linear",
        "  engine's chunk (`_linear_plan`: 2 GiB of chunk buffers on CUDA, so",
        f"  {chunk_rows()['remit']} rows of policy + scorer logits for ReMiT); fp32 per-token",
        "  vectors. Triton kernels compiled with the divisibility of such a launch",
        "  (`tools/triton_check.py`, aligned).",
        "",
        "## Kernels",
        "",
    ]
    cols = ["backend", "kernel", "variant", "shape", "regs", "local_bytes", "smem_bytes",
            "blocks_per_sm", "occupancy", "limiter", "loop_instr", "instr_per_elem",
            "exps_per_elem", "bytes_per_elem", "gbytes", "t_mem_us", "t_issue_us", "t_mufu_us",
            "bound", "predicted_us"]
    md.append("| " + " | ".join(cols) + " |")
    md.append("|" + "---|" * len(cols))
    for r in records:
        md.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    md += [
        "",
        "Columns: `loop_instr` SASS instructions of one main-loop iteration per thread (one per",
        "row pass: the scorer variant sweeps two rows, one after the other; KD's one loop reads",
        "the student and teacher rows side by side); `instr_per_elem`, `exps_per_elem`,",
        "`bytes_per_elem` per logit position of the [N, V] shape over all its passes and rows;",
        "`gbytes` moved in all; the `t_*` bounds and `predicted_us` in microseconds",
        "(**predicted, not measured**).",
        "",
    ]
    (out_dir / "gpu_static.md").write_text("\n".join(md))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--bandwidth-tbs", type=float,
                    help="a measured bandwidth (tools/gpu_bandwidth.py's read_tbs) in place of "
                         f"the assumed {H100['bandwidth_tbs']} TB/s")
    ap.add_argument("--bandwidth-source", default="",
                    help="where --bandwidth-tbs was measured (device, date, commit)")
    args = ap.parse_args(argv)
    if args.bandwidth_tbs is not None:
        if not args.bandwidth_source:
            ap.error("--bandwidth-source: say where the bandwidth was measured")
        H100["bandwidth_tbs"] = args.bandwidth_tbs
        H100["bandwidth_note"] = f"**measured**: {args.bandwidth_source}"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_static_") as tmp:
        tmp = Path(tmp)
        rows, _, _ = cuda_rows(tmp)
        rows += triton_rows(tmp)
        occupancy(rows, tmp)
    records = table(rows)
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    nvcc_v = _run([triton_check_nvcc(), "--version"]).strip().splitlines()[-1]
    import triton

    prov = (f"Built at git {sha} with {nvcc_v} (sm_90a) and Triton {triton.__version__} "
            f"(sm_90); cuobjdump from Triton's bundle.")
    write(records, args.out_dir, prov)
    print(f"gpu_static: {len(records)} kernels -> {args.out_dir / 'gpu_static.md'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
