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


def test_compile_check_catches_a_kernel_the_interpreter_accepts(tmp_path):
    path = tmp_path / "kernels.py"
    path.write_text(KERNELS)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "tools"), str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["constexpr_global"] is None
    assert out["plain_global"] is not None and "PLAIN" in out["plain_global"]
