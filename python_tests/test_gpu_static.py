"""tools/gpu_static.py, the static (predicted) GPU ledger: its SASS loop finder on a listing
whose answer is known, and the committed ledger holding a row for every CUDA and Triton kernel,
each labelled predicted. (CI regenerates the ledger from the compilers: .ci/run.)"""

import csv
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import gpu_static  # noqa: E402  (stdlib only at import: no triton, no compiler)

SASS = """
        Function : kern
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.EF.128 R12, desc[UR4][R2.64+0x10] ;
        /*0040*/               @P1 BRA 0x80 ;
        /*0050*/                   FADD R1, R1, R2 ;
        /*0060*/                   FADD R1, R1, R2 ;
        /*0070*/                   FADD R1, R1, R2 ;
        /*0080*/                   MUFU.EX2 R5, R5 ;
        /*0090*/                   MUFU.EX2 R6, R6 ;
        /*00a0*/              @!P2 BRA 0xc0 ;
        /*00b0*/                   BRA 0x100 ;
        /*00c0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00d0*/              @!P0 BRA 0x20 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0 ;
        /*0100*/                   SHFL.BFLY PT, R1, R1, 0x1, 0x1f ;
        /*0110*/                   BRA 0xc0 ;
"""


def test_main_loop_path():
    """The loop 0x20-0xd0 (two 128-bit loads): the path through the skip at 0x40 (the three
    FADDs are a branch without exps or loads, so the shorter way wins), both exps, the store;
    the out-of-line code at 0x100 returns by an unconditional backward branch and is no loop,
    and the one-element scalar load before the loop is not part of it."""
    code = gpu_static.parse_sass(SASS)["kern"]
    (loop,) = gpu_static.main_loops(code)
    # 0x20, 0x30, 0x40, 0x80, 0x90, 0xa0, 0xc0, 0xd0
    assert loop.instr == 8
    assert loop.exps == 2 and loop.vec_loads == 2
    assert loop.load_bytes == 32 and loop.store_bytes == 16


def test_resource_usage_parse():
    text = ("Resource usage:\n Function _Z3fooPf:\n  REG:64 STACK:0 SHARED:1364 LOCAL:8 "
            "CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert gpu_static.resource_usage(text) == {"_Z3fooPf": {
        "REG": 64, "STACK": 0, "SHARED": 1364, "LOCAL": 8, "CONSTANT": 400, "TEXTURE": 0,
        "SURFACE": 0, "SAMPLER": 0}}


def _kernels_in_sources():
    cuda = set()
    for path in (REPO / "csrc" / "cuda").glob("*.cuh"):
        cuda |= set(re.findall(r"__global__.*?\b(\w+)_kernel\s*\(", path.read_text(),
                               flags=re.S))
    triton_src = (REPO / "remit_ext" / "triton" / "kernels.py").read_text()
    triton = set(re.findall(r"^def _(\w+?)(?:_fwd)?_kernel\(", triton_src, flags=re.M))
    return cuda, triton


def test_committed_ledger_covers_every_kernel():
    with open(REPO / "bench" / "results" / "gpu_static.csv") as f:
        rows = list(csv.DictReader(f))
    have = {(r["backend"], r["kernel"]) for r in rows}
    cuda, triton = _kernels_in_sources()
    assert cuda == {"token_stats", "ce_grad", "remit_weights", "remit_diag", "pg_terms"}
    assert triton == {"token_stats", "ce_bwd", "remit_weights", "pg_terms", "kd", "kd_bwd"}
    assert {("cuda", k) for k in cuda} | {("triton", k) for k in triton} <= have
    for r in rows:
        assert float(r["predicted_us"]) > 0 and int(r["regs"]) > 0, r
        assert r["bound"] in ("memory", "issue", "MUFU")
    md = (REPO / "bench" / "results" / "gpu_static.md").read_text()
    assert "predicted, not measured" in md
