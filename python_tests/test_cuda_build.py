"""The CUDA backend: its compile check rejects a broken kernel (runs wherever nvcc is, GPU or
not), the backend="auto" table logic (CPU), and CUDA-only checks the shared tests do not cover:
rows that defeat 128-bit alignment, the in-place gradient, non-finite rows, opcheck and 64-bit
offsets (skipped without a GPU and a CUDA build)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import remit_ext
from remit_ext import _backends as B
from remit_ext.reference import token_stats_ref

from cases import IGNORE, make_pair
from conftest import DEVICE, KERNEL_BACKENDS

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "tools" / "nvcc_check.py"
sys.path.insert(0, str(REPO / "tools"))
import nvcc_check  # noqa: E402

needs_nvcc = pytest.mark.skipif(nvcc_check.find_nvcc() is None, reason="nvcc not installed")
needs_cuda = pytest.mark.skipif("cuda" not in KERNEL_BACKENDS,
                                reason="no GPU, or remit_ext built without its CUDA kernels")

GOOD = """
__global__ void scale(float* x, float a, long long n) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i < n) x[i] *= a;
}
"""


def _check(tmp_path, name, source, arch="80"):
    src = tmp_path / name
    src.write_text(source)
    return subprocess.run([sys.executable, str(CHECK), "--arch", arch, "--files", str(src)],
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ the compile check


@needs_nvcc
def test_nvcc_check_passes_a_good_kernel(tmp_path):
    proc = _check(tmp_path, "good.cu", GOOD)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_nvcc
@pytest.mark.parametrize("name,source", [
    ("syntax.cu", GOOD.replace("x[i] *= a;", "x[i] *= a")),
    # A warning (an unused variable) is an error in this check.
    ("warning.cu", GOOD.replace("if (i < n)", "int unused = 3;\n  if (i < n)")),
    # So is a kernel body that reaches for torch: the check compiles kernels without it.
    ("torch.cu", "#include <ATen/ATen.h>\n" + GOOD),
])
def test_nvcc_check_rejects_a_broken_kernel(tmp_path, name, source):
    proc = _check(tmp_path, name, source)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout


def test_every_cuda_source_is_built_and_checked():
    """CMakeLists.txt lists csrc/cuda sources by hand; the check globs them: the two must agree,
    or a file could be checked but not built (or built but not checked)."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    sources = sorted(p.relative_to(REPO).as_posix()
                     for p in (REPO / "csrc" / "cuda").iterdir() if p.suffix in (".cu", ".cpp"))
    assert sources, "no CUDA sources"
    for src in sources:
        assert src in cmake, f"{src} is not in CMakeLists.txt's _cuda_sources"


# ------------------------------------------------------------ backend="auto" table (CPU)

TABLE = {"NVIDIA H100 80GB HBM3": {"token_stats": ("cuda", "triton"), "remit_loss": ("triton",)}}


def test_auto_order_defaults_to_triton_first_without_a_measurement():
    assert B.auto_order("token_stats", "cuda", "Some GPU", table={}) == ("triton", "cuda", "torch")
    assert B.auto_order("token_stats", "cuda", None, table=TABLE) == ("triton", "cuda", "torch")
    assert B.auto_order("token_stats", "cpu", None, table=TABLE) == ("cpu", "torch")


def test_auto_order_follows_the_measured_row():
    name = "NVIDIA H100 80GB HBM3"
    assert B.auto_order("token_stats", "cuda", name, table=TABLE) == ("cuda", "triton", "torch")
    # A partial row keeps the default's other backends behind it as fallbacks.
    assert B.auto_order("remit_loss", "cuda", name, table=TABLE) == ("triton", "cuda", "torch")
    # An op the benchmark did not measure, or another GPU: the default.
    assert B.auto_order("kd_loss", "cuda", name, table=TABLE) == ("triton", "cuda", "torch")
    assert B.auto_order("token_stats", "cuda", "NVIDIA H200", table=TABLE) == (
        "triton", "cuda", "torch")


def test_auto_table_file_round_trip(tmp_path):
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"devices": {"GPU X": {"token_stats": ["cuda", "triton"],
                                                      "bad": "not a list"}}}))
    table = B.load_auto_table(str(path))
    assert table == {"GPU X": {"token_stats": ("cuda", "triton")}}
    assert B.auto_order("token_stats", "cuda", "GPU X", table=table)[0] == "cuda"
    (tmp_path / "broken.json").write_text("{not json")
    assert B.load_auto_table(str(tmp_path / "broken.json")) == {}
    assert B.load_auto_table(str(tmp_path / "missing.json")) == {}


def test_auto_table_is_read_from_the_users_table_then_the_shipped_one(tmp_path, monkeypatch):
    """backend="auto" reads the table the benchmark suite writes ($REMIT_AUTO_TABLE, else
    $XDG_CACHE_HOME/remit_ext/auto_table.json, else ~/.cache/...), never one inside the
    installed package, and falls back to the package's shipped table when there is none."""
    monkeypatch.delenv("REMIT_AUTO_TABLE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert B.user_auto_table() == tmp_path / "cache" / "remit_ext" / "auto_table.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert B.user_auto_table() == tmp_path / "home" / ".cache" / "remit_ext" / "auto_table.json"
    monkeypatch.setenv("REMIT_AUTO_TABLE", str(tmp_path / "mine.json"))
    assert B.user_auto_table() == tmp_path / "mine.json"

    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"devices": {"GPU S": {"token_stats": ["cuda"]}}}))
    monkeypatch.setattr(B, "AUTO_TABLE", shipped)
    B.load_auto_table.cache_clear()
    try:
        assert B.load_auto_table() == {"GPU S": {"token_stats": ("cuda",)}}  # no user table
        (tmp_path / "mine.json").write_text(
            json.dumps({"devices": {"GPU U": {"remit_loss": ["cuda", "triton"]}}}))
        B.load_auto_table.cache_clear()
        assert B.load_auto_table() == {"GPU U": {"remit_loss": ("cuda", "triton")}}
        assert B.auto_order("remit_loss", "cuda", "GPU U") == ("cuda", "triton", "torch")
    finally:
        B.load_auto_table.cache_clear()


def test_shipped_auto_table_is_valid():
    data = json.loads(B.AUTO_TABLE.read_text())
    assert isinstance(data["devices"], dict)
    for ops in data["devices"].values():
        for order in ops.values():
            assert set(order) <= {"cuda", "triton", "torch"}, order


def test_cuda_backend_says_why_it_refuses():
    cuda = B.BACKENDS["cuda"]
    z = torch.zeros(2, 8)
    assert "CUDA tensors" in cuda.why_not("token_stats", [z], {})
    assert "KD" in cuda.why_not("kd_loss", [z], {})
    assert "topk" in cuda.why_not("token_stats", [z], {"topk": 4})
    built = remit_ext.build_info()["cuda"]
    assert ("cuda" in remit_ext.available_backends()) == built
    assert "cuda_archs" in remit_ext.build_info()


# ------------------------------------------------------------------------ CUDA only


def _misaligned(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x's values in rows that start `pad` elements into a wider buffer: neither the row
    pointers nor (for odd widths) the row stride are 16-byte aligned."""
    n, v = x.shape
    buf = torch.randn(n, v + pad + 3, device=x.device).to(x.dtype)
    buf[:, pad:pad + v] = x
    return buf[:, pad:pad + v]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [7, 1025, 4097, 32001])
@pytest.mark.parametrize("pad", [0, 1, 3])
def test_cuda_misaligned_rows_match_contiguous(dtype, v, pad):
    logits, scorer, targets = make_pair((37, v), dtype, seed=v + pad)
    z = _misaligned(logits, pad)
    ops = torch.ops.remit_ext
    got = ops.token_stats(z, targets, _misaligned(scorer, pad), IGNORE, 1.0, True, 0, False)
    want = ops.token_stats(logits, targets, scorer, IGNORE, 1.0, True, 0, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    lse, logprob = want[0], want[1]
    coef = torch.rand(37, device=DEVICE)
    g_mis = ops.weighted_ce_bwd(z, targets, lse, logprob, coef, IGNORE)
    g_ref = ops.weighted_ce_bwd(logits, targets, lse, logprob, coef, IGNORE)
    torch.testing.assert_close(g_mis, g_ref, rtol=0, atol=0)
    inplace = _misaligned(logits, pad)  # the same misaligned layout, written in place
    ops.weighted_ce_bwd_(inplace, targets, lse, logprob, coef, IGNORE)
    torch.testing.assert_close(inplace, g_ref, rtol=0, atol=0)


@needs_cuda
def test_cuda_non_finite_rows_follow_the_cpu_kernels():
    v = 1025
    x = torch.randn(6, v, dtype=torch.float64)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    x[2] = float("-inf")
    x[3, 9] = float("inf")
    x[3, 10] = float("nan")
    x[4, :-1] = float("-inf")  # only the last class is possible
    y = torch.tensor([1, 2, 3, 4, v - 1, IGNORE])
    cpu = torch.ops.remit_ext.token_stats(x.float(), y, None, IGNORE, 1.0, True, 0, False)
    gpu = torch.ops.remit_ext.token_stats(x.float().cuda(), y.cuda(), None, IGNORE, 1.0, True, 0,
                                          False)
    for c, g in zip(cpu[:3], gpu[:3]):
        torch.testing.assert_close(g.cpu(), c, equal_nan=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_opcheck(dtype):
    from torch.library import opcheck

    logits, scorer, targets = make_pair((2, 7, 33), dtype, seed=3)
    z = logits.reshape(-1, 33).requires_grad_(True)
    s, y = scorer.reshape(z.shape), targets.reshape(-1)
    ops = torch.ops.remit_ext
    cu = torch.tensor([0, 5, 14], device=DEVICE)
    opcheck(ops.token_stats, (z, y, s, IGNORE, 1.5, True, 0, False))
    opcheck(ops.remit_loss, (z, y, s, None, cu, IGNORE, 0.2, True, False))
    lse, logprob = token_stats_ref(z.detach(), y, ignore_index=IGNORE)[:2]
    a = logprob.float().clone().requires_grad_(True)
    opcheck(ops.remit_weights, (a, a.detach() + 0.3, y, cu, IGNORE, 0.2))
    opcheck(ops.weighted_ce_fwd, (z, y, None, IGNORE, False))


@needs_cuda
@pytest.mark.slow
def test_cuda_64bit_offsets():
    """N * V above 2^31 elements: the last rows must match the same rows computed alone."""
    n, v = 16400, 131072  # 2.15e9 elements, 4.3 GB in bf16
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * v * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    z = torch.empty(n, v, device=DEVICE, dtype=torch.bfloat16).normal_()
    y = torch.randint(0, v, (n,), device=DEVICE)
    ops = torch.ops.remit_ext
    lse, logprob, *_ = ops.token_stats(z, y, None, IGNORE, 1.0, False, 0, False)
    tail = slice(n - 8, n)
    lse_t, logprob_t, *_ = ops.token_stats(z[tail], y[tail], None, IGNORE, 1.0, False, 0, False)
    torch.testing.assert_close(lse[tail], lse_t, rtol=0, atol=0)
    torch.testing.assert_close(logprob[tail], logprob_t, rtol=0, atol=0)
    coef = torch.ones(n, device=DEVICE)
    ops.weighted_ce_bwd_(z, y, lse, logprob, coef, IGNORE)
    row_sums = z[tail].float().sum(-1)  # softmax - onehot sums to 0
    torch.testing.assert_close(row_sums, torch.zeros_like(row_sums), rtol=0, atol=2e-2)


