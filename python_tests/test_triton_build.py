"""tools/triton_check.py: the Triton kernels compiled for GPUs on a machine without one.

CI runs the whole check; here: that it catches what the interpreter lets through (a plain
Python global read inside @triton.jit, which is how the statistics kernel once failed to compile
for any GPU while every interpreter test passed), and passes the same kernel written properly.
It runs in a subprocess: this process imported triton in interpreter mode."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    PLAIN = float("-inf")
    CONST = tl.constexpr(float("-inf"))


    @triton.jit
    def plain_global(x_ptr, y_ptr, BLOCK: tl.constexpr):
        x = tl.load(x_ptr + tl.arange(0, BLOCK))
        tl.store(y_ptr + tl.arange(0, BLOCK), tl.maximum(x, PLAIN))


    @triton.jit
    def constexpr_global(x_ptr, y_ptr, BLOCK: tl.constexpr):
        x = tl.load(x_ptr + tl.arange(0, BLOCK))
        tl.store(y_ptr + tl.arange(0, BLOCK), tl.maximum(x, CONST))
''')

SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton_check as tc
    mod = tc.load_kernels(sys.argv[2])
    out = {}
    for name in ("plain_global", "constexpr_global"):
        out[name] = tc.compile_one(getattr(mod, name), {"x_ptr": "*fp32", "y_ptr": "*fp32"},
                                   {"BLOCK": 64}, 90)
    print(json.dumps(out))
''')


def _compile_script(script: str, tmp_path, *args) -> dict:
    """Run ``script`` in a fresh process with real Triton compilation (this process imported
    triton in interpreter mode) and return the JSON it prints last."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script, str(REPO / "tools"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compile_check_catches_a_kernel_the_interpreter_accepts(tmp_path):
    path = tmp_path / "kernels.py"
    path.write_text(KERNELS)
    out = _compile_script(SCRIPT, tmp_path, path)
    assert out["constexpr_global"] is None
    assert out["plain_global"] is not None and "PLAIN" in out["plain_global"]


FMA_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton_check as tc
    K = tc.load_kernels()
    configs = {label.split(" block")[0]: cfg for label, *cfg in tc.configurations(K)
               if " block 256 " in label and label.startswith("token_stats")}
    fn, sig, consts, warps = configs["token_stats fp32"]
    out = {"launch_options": tc.check_config(K, fn, sig, consts, 90, warps),
           "fused": tc.check_config(K, fn, sig, consts, 90, warps, {"enable_fp_fusion": True})}
    fn, sig, consts, warps = configs["token_stats fp64"]
    out["fp64"] = tc.check_config(K, fn, sig, consts, 90, warps)
    print(json.dumps(out))
''')


def test_compile_check_catches_fma_contraction(tmp_path):
    """The statistics kernel compiled with FMA contraction (Triton's default) has fma.rn.f32 in
    its PTX: x * inv_temp - m fused, so a confident target's log-prob at temperature != 1 came
    out as the rounding error of x * inv_temp, positive half the time. The interpreter never
    fuses, so only the compiled PTX shows it. With the launches' options the check passes; the
    fp64 configurations (libdevice's exp/log hold fma.rn.f64 by design) are not inspected."""
    out = _compile_script(FMA_SCRIPT, tmp_path)
    assert out["launch_options"] is None
    assert out["fused"] is not None and "fma.rn.f32" in out["fused"], out["fused"]
    assert out["fp64"] is None


VECTOR_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton_check as tc
    K = tc.load_kernels()
    configs = {label: cfg for label, *cfg in tc.configurations(K)}
    fn, sig, consts, warps = configs["ce_bwd bf16 block 4096 stride i64"]
    out = {}
    for aligned in (False, True):
        out[str(aligned)] = tc.compile_one(fn, dict(sig), consts, 90, warps, K.LAUNCH_OPTIONS,
                                           aligned=aligned, need_vectors=True)
    out["attrs"] = sorted(n for (i,) in tc.alignment_attrs(fn, sig) for n in [fn.arg_names[i]])
    print(json.dumps(out))
''')


def test_aligned_build_gets_128_bit_loads(tmp_path):
    """With the divisibility a launch at V = 128256 gets (pointers, V and strides multiples of
    16), the bf16 gradient kernel loads 128 bits at a time; compiled without it, it loads 16-bit
    scalars, and the check's vector test says so (so a build that lost its hints fails)."""
    out = _compile_script(VECTOR_SCRIPT, tmp_path)
    assert out["True"] is None
    assert out["False"] is not None and "128-bit" in out["False"]
    assert "V" in out["attrs"] and "stride_logits" in out["attrs"]
    assert "ignore_index" not in out["attrs"]
