"""The CUDA kernels (csrc/cuda/*.cuh) executed on the CPU by the emulation layer
(tools/cuda_emu): every kernel against remit_ext.reference on the CPU kernel tests' case grid,
the race check (TSan) and the bounds check (ASan + UBSan) of every kernel and group size, and
each check shown to reject the fault it exists for.

The kernels run through the project's own launchers, so the group size (32 / 256 / 512 threads
a row), the head/tail peel of misaligned rows and the unrolled 16-byte body are the GPU's. The
Python helpers below play the part of the torch glue (csrc/cuda/*.cpp): output dtypes, buffers,
the order of launches. Numerics differ from a GPU in the last bits (libm instead of libdevice,
exact exp2 for ex2.approx, no FMA contraction), hence tolerances from remit_ext.testing, never
bitwise. Select with ``python -m pytest -m cuda_emu``.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from remit_ext.reference import pg_from_logprob_ref, remit_weights_ref, token_stats_ref
from remit_ext.testing import assert_close_to_truth
from cases import off_target_error

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "cuda_emu"))
import emu  # noqa: E402

pytestmark = pytest.mark.cuda_emu

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# V = 1; 1025 (one warp a row); 4099 (256 threads; bf16/fp16: 513 vectors); 32001; 128256 (512
# threads, Llama-3's vocabulary): every group size for every dtype, odd lengths for the tail.
VOCABS = [1, 1025, 4099, 32001, 128256]
ARTIFACTS = [("lib", None), ("selftest", None), ("tsan", None), ("asan", None),
             ("lib", "shuffle_offset"), ("tsan", "missing_barrier"), ("asan", "off_by_one")]


@pytest.fixture(scope="session")
def builds():
    """Every artefact the module needs, built concurrently (about a minute on 2 cores, then
    cached under build/cuda_emu)."""
    try:
        emu.compiler(), emu.cuda_include()
    except emu.EmuUnavailable as err:
        if os.environ.get("CI"):
            raise  # CI has g++ and the CUDA headers: never skip there
        pytest.skip(f"CUDA emulation unavailable: {err}")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {a: pool.submit(emu.build, *a) for a in ARTIFACTS}
        return {a: f.result() for a, f in futures.items()}


@pytest.fixture(scope="session")
def k(builds):
    return emu.Kernels(builds[("lib", None)])


# ------------------------------------------------------------------- the glue, in Python

def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t):
    return None if t is None else t.data_ptr()


def _code(dtype):
    return emu.DTYPE_CODES[str(dtype).removeprefix("torch.")]


def stats(k, x, y, *, scorer=None, temperature=1.0, entropy=True):
    """token_stats as csrc/cuda/token_stats.cpp launches it: (lse, logprob, entropy, s_lse,
    s_logprob), the absent ones None."""
    N, V = x.shape
    acc = _acc(x.dtype)
    out = [torch.full((N,), 1234.5, dtype=acc) for _ in range(5)]  # a kernel must write them
    ent = out[2] if entropy else None
    s_lse, s_lp = (out[3], out[4]) if scorer is not None else (None, None)
    k.call("emu_token_stats", _code(x.dtype), x.data_ptr(), x.stride(0), _ptr(scorer),
           0 if scorer is None else scorer.stride(0), y.data_ptr(), int(y.dtype == torch.int32),
           out[0].data_ptr(), out[1].data_ptr(), _ptr(ent), _ptr(s_lse), _ptr(s_lp), N, V,
           IGNORE, temperature)
    return out[0], out[1], ent, s_lse, s_lp


def ce_grad(k, x, y, lse, logprob, coef, *, inplace=False):
    """weighted_ce_bwd (into a fresh contiguous gradient) or weighted_ce_bwd_ (into x)."""
    N, V = x.shape
    g = x if inplace else torch.full((N, V), 77.0, dtype=x.dtype)
    k.call("emu_ce_grad", _code(x.dtype), x.data_ptr(), x.stride(0), g.data_ptr(), g.stride(0),
           y.data_ptr(), int(y.dtype == torch.int32), lse.data_ptr(), logprob.data_ptr(),
           coef.data_ptr(), N, V, IGNORE)
    return g


def weights(k, a, b, y, cu, *, eps=0.2):
    """remit_weights_into with the per-token loss: (w, delta_hat, loss, diag)."""
    N, S = a.shape[0], cu.numel() - 1
    w, dhat, loss = (torch.zeros(N, dtype=a.dtype) for _ in range(3))
    diag = torch.full((6,), 1234.5, dtype=a.dtype)
    partial = torch.empty(S * 7, dtype=torch.float64)
    k.call("emu_remit_weights", _code(a.dtype), a.data_ptr(), b.data_ptr(), y.data_ptr(),
           int(y.dtype == torch.int32), cu.data_ptr(), S, N, IGNORE, eps, w.data_ptr(),
           dhat.data_ptr(), loss.data_ptr(), partial.data_ptr(), diag.data_ptr())
    return w, dhat, loss, diag


def pg_terms(k, a, y, adv, *, scale=None, old=None, ref=None, clip_low=0.2, clip_high=0.28,
             kl_beta=0.0):
    N = a.shape[0]
    loss, dlp = torch.full((N,), 1234.5, dtype=a.dtype), torch.full((N,), 1234.5, dtype=a.dtype)
    k.call("emu_pg_terms", _code(a.dtype), a.data_ptr(), y.data_ptr(),
           int(y.dtype == torch.int32), adv.data_ptr(), _ptr(scale), _ptr(old), _ptr(ref),
           clip_low, clip_high, kl_beta, loss.data_ptr(), dlp.data_ptr(), N, IGNORE)
    return loss, dlp


# ------------------------------------------------------------------------------ inputs

def rows(N, V, dtype, *, seed, misaligned=False, special=True, scale=3.0):
    """Logits [N, V] and targets [N]. With ``special`` (N >= 7): row 1 ignored, row 2 confident,
    row 3 holds +inf, row 4 is all -inf, row 5 holds a NaN. ``misaligned``: rows start one
    element past a 16-byte boundary and are strided (a view into a wider buffer)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, V, (N,), generator=g)
    if special and N >= 7:
        y[1] = IGNORE
        z[2, y[2]] = z[2].max() + 25.0
        z[3, (y[3] + 1) % V] = float("inf")
        z[4] = float("-inf")
        z[5, V // 2] = float("nan")
    if misaligned:
        buf = torch.zeros(N, V + 3, dtype=dtype)
        x = buf[:, 1:V + 1]
        x.copy_(z.to(dtype))
        assert x.stride(0) == V + 3 and x.data_ptr() % 16 != 0
    else:
        x = z.to(dtype)
    return x, y


def _stats_ref(x, y, temperature, entropy=True):
    """(truth in fp64, baseline at the kernel's working precision)."""
    truth = token_stats_ref(x.double(), y, ignore_index=IGNORE, temperature=temperature,
                            entropy=entropy)
    base = token_stats_ref(x, y, ignore_index=IGNORE, temperature=temperature, entropy=entropy)
    return truth, base


def check_token_stats(k, dtype, V, N, *, misaligned=False, scorer=False, temperature=1.0,
                      entropy=True, i32=False, seed=0):
    x, y = rows(N, V, dtype, seed=seed, misaligned=misaligned)
    if i32:
        y = y.to(torch.int32)
    s = None
    if scorer:
        s, _ = rows(N, V, dtype, seed=seed + 1, misaligned=misaligned, special=False)
    got = stats(k, x, y, scorer=s, temperature=temperature, entropy=entropy)
    truth, base = _stats_ref(x, y, temperature, entropy)
    names = ("lse", "logprob", "entropy") if entropy else ("lse", "logprob")
    for name, g, t, b in zip(names, got, truth, base):
        assert g.dtype == _acc(dtype)
        assert_close_to_truth(g, t, b, name=f"{name} {dtype} V={V}")
    if scorer:
        s_truth, s_base = _stats_ref(s, y, temperature, entropy=False)
        for name, g, t, b in zip(("scorer_lse", "scorer_logprob"), got[3:], s_truth, s_base):
            assert_close_to_truth(g, t, b, name=f"{name} {dtype} V={V}")


# ------------------------------------------------------------------------------- tests

def test_grid_covers_every_group_size(k):
    for dtype in DTYPES:
        size = torch.tensor([], dtype=dtype).element_size()
        assert {k.group_size(V, size) for V in VOCABS} == {32, 256, 512}, dtype


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("N", [1, 7])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_stats(k, dtype, V, N, misaligned):
    check_token_stats(k, dtype, V, N, misaligned=misaligned, seed=V + N)


@pytest.mark.parametrize("V", [1025, 4099, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_stats_scorer_temperature(k, dtype, V):
    check_token_stats(k, dtype, V, 7, scorer=True, temperature=0.7, misaligned=V == 4099,
                      i32=V == 1025, seed=3 * V)


@pytest.mark.parametrize("V", [1025, 32001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_without_entropy(k, dtype, V):
    check_token_stats(k, dtype, V, 7, entropy=False, scorer=True, seed=5)


def _confident_logprob(x, y):
    """log p(y) = -log1p(sum_{v != y} e^{x_v - x_y}) in fp64: exact to fp64 where log_softmax's
    x_y - lse (lse ~ 40, the result ~ 1e-12) keeps only a few digits."""
    xd = x.double()
    d = (xd - xd.gather(1, y[:, None])).scatter(1, y[:, None], float("-inf"))
    return -torch.log1p(d.exp().sum(1))


@pytest.mark.parametrize("V", [1025, 4099, 32001])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_stats_confident_rows(k, dtype, V):
    """p(target) -> 1: the log-prob (~ -1e-12) keeps its digits (log1p of the mass below the
    max, which is counted apart from the max itself)."""
    x, y = rows(9, V, torch.float64, seed=11, special=False)
    x[torch.arange(9), y] = x.max(dim=1).values + 30.0
    x = x.to(dtype)
    _, lp, *_ = stats(k, x, y)
    truth = _confident_logprob(x, y)
    assert bool((truth < 0).all()) and float(truth.abs().max()) < 1e-10
    rel = float(((lp.double() - truth) / truth).abs().max())
    assert rel < (1e-12 if dtype == torch.float64 else 1e-5), f"relative error {rel:.2e}"


def _grad_ref(x, y, coef):
    """coef * (softmax(x) - onehot(y)) in x's working precision; 0 at ignored rows."""
    z = x.to(_acc(x.dtype)) if x.dtype != torch.float64 else x
    p = torch.softmax(z, dim=-1)
    valid = y != IGNORE
    onehot = torch.zeros_like(p).scatter(1, torch.where(valid, y, 0).long()[:, None], 1.0)
    g = coef.to(p.dtype)[:, None] * (p - onehot)
    return torch.where(valid[:, None], g, torch.zeros((), dtype=p.dtype))


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ce_grad(k, dtype, V, misaligned, inplace):
    x, y = rows(7, V, dtype, seed=V + 17, misaligned=misaligned)
    coef = torch.randn(7, generator=torch.Generator().manual_seed(V), dtype=_acc(dtype))
    truth = _grad_ref(x.double(), y, coef.double())
    base = _grad_ref(x, y, coef).to(dtype)
    lse, lp, *_ = stats(k, x, y, entropy=False)  # the forward's statistics, as on the GPU
    src = x.clone()
    g = ce_grad(k, x, y, lse, lp, coef, inplace=inplace)
    assert g.dtype == dtype and (g.data_ptr() == x.data_ptr()) == inplace
    if not inplace:  # the logits are only read
        torch.testing.assert_close(x, src, rtol=0, atol=0, equal_nan=True)
    assert_close_to_truth(g, truth, base, name=f"grad {dtype} V={V}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_grad_confident_target(k, dtype):
    """The target entry is coef * expm1(logprob): accurate where p_y - 1 is tiny (fp32 out)."""
    x, y = rows(9, 1025, torch.float64, seed=12, special=False)
    x[torch.arange(9), y] = x.max(dim=1).values + 14.0
    x = x.to(dtype)
    coef = torch.full((9,), 0.75)
    lse, lp, *_ = stats(k, x, y, entropy=False)
    g = ce_grad(k, x, y, lse, lp, coef)
    truth = _grad_ref(x.double(), y, coef.double())
    got_t = g.double().gather(1, y[:, None]).squeeze(1)
    want_t = truth.gather(1, y[:, None]).squeeze(1)
    assert bool((want_t < 0).all())
    rel = float(((got_t - want_t) / want_t).abs().max())
    assert rel < (1e-4 if dtype == torch.float32 else 1e-2), f"target gradient error {rel:.2e}"


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("V", [1025, 4099])  # one warp a row; a 256-thread block a row
def test_ce_grad_large_logits(k, V, inplace):
    """fp32 logits ~ 5e3 + randn: the forward's lse is rounded by up to 2^-12 ~ 2.4e-4, a
    relative error of every e^{x - lse}; the kernel recovers the rounding from the log-prob (an
    O(1) number), so each row is off by ~eps (|a| + log V) of its largest entry off the target
    column (eps = 2^-23; python_tests/test_token_stats.py has the derivation). In place, every thread reads x_y
    before any overwrites it (the race check runs the in-place launch too)."""
    x, y = rows(32, V, torch.float64, seed=V + 23, special=False, scale=1.0)
    x = (x + 5e3).to(torch.float32)
    coef = torch.randn(32, generator=torch.Generator().manual_seed(V), dtype=torch.float32)
    truth = _grad_ref(x.double(), y, coef.double())
    lse, lp, *_ = stats(k, x, y, entropy=False)
    g = ce_grad(k, x.clone(), y, lse, lp, coef, inplace=inplace)
    err = off_target_error(g, truth, y, token_stats_ref(x.double(), y, entropy=False)[1])
    assert err <= 8, f"error {err:.1f} eps (|a| + log V) x the row's largest off the target"


SEGMENTS = {
    "one": [0, 600],
    "packed": [0, 0, 1, 333, 333, 600],  # empty segments, a one-token one, a 332-token one
    "short": [0, 5, 9, 37],
}


@pytest.mark.parametrize("segments", list(SEGMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_remit_weights(k, dtype, segments):
    cu = torch.tensor(SEGMENTS[segments], dtype=torch.int64)
    N = int(cu[-1])
    g = torch.Generator().manual_seed(N + len(cu))
    a = -torch.rand(N, generator=g, dtype=torch.float64) * 6
    b = a + torch.randn(N, generator=g, dtype=torch.float64) * 0.8
    y = torch.randint(0, 50, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.25] = IGNORE
    a, b = torch.where(y != IGNORE, a, 0.0), torch.where(y != IGNORE, b, 0.0)
    a, b = a.to(dtype), b.to(dtype)
    w, dhat, loss, diag = weights(k, a, b, y, cu)
    valid = y != IGNORE
    tw, tdh, tdiag = remit_weights_ref(a.double(), b.double(), valid, cu_seqlens=cu)
    bw, bdh, bdiag = remit_weights_ref(a, b, valid, cu_seqlens=cu)
    assert_close_to_truth(w, tw, bw, name="w")
    assert_close_to_truth(dhat, tdh, bdh, name="delta_hat")
    assert_close_to_truth(loss, -tw * a.double(), -bw * a, name="loss")
    assert bool((w[~valid] == 0).all()) and bool((loss[~valid] == 0).all())
    for i, (name, t, b_) in enumerate(zip(tdiag._fields, tdiag, bdiag)):
        assert_close_to_truth(diag[i:i + 1], t.reshape(1), b_.reshape(1).to(dtype), name=name)


@pytest.mark.parametrize("terms", ["plain", "ppo", "ppo_kl_scale"])
@pytest.mark.parametrize("N", [1, 300, 517])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pg_terms(k, dtype, N, terms):
    g = torch.Generator().manual_seed(N)
    y = torch.randint(0, 10, (N,), generator=g)
    if N > 1:
        y[::5] = IGNORE
    valid = y != IGNORE
    a = torch.where(valid, -torch.rand(N, generator=g, dtype=torch.float64) * 4, 0.0)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    extra = {}
    if terms != "plain":
        extra["old"] = a + torch.randn(N, generator=g, dtype=torch.float64) * 0.3
    if terms == "ppo_kl_scale":
        extra["ref"] = a + torch.randn(N, generator=g, dtype=torch.float64) * 0.3
        extra["scale"] = torch.rand(N, generator=g, dtype=torch.float64)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_beta=0.05 if "ref" in extra else 0.0)
    cast = {n: v.to(dtype) for n, v in extra.items()}
    loss, dlp = pg_terms(k, a.to(dtype), y, adv.to(dtype), **cast, **kw)

    def ref(a_, dt):
        names = {"old": "old_logprobs", "ref": "ref_logprobs", "scale": "scale"}
        return pg_from_logprob_ref(a_, valid, adv.to(dt), **{names[n]: v.to(dt)
                                                             for n, v in extra.items()}, **kw)

    a64 = a.clone().requires_grad_(True)
    t_loss = ref(a64, torch.float64)
    (t_d,) = torch.autograd.grad(t_loss.sum(), a64)
    ab = a.to(dtype).requires_grad_(True)
    b_loss = ref(ab, dtype)
    (b_d,) = torch.autograd.grad(b_loss.sum(), ab)
    assert_close_to_truth(loss, t_loss.detach(), b_loss.detach(), name="pg loss")
    assert_close_to_truth(dlp, t_d, b_d, name="pg dlogprob")
    assert bool((loss[~valid] == 0).all()) and bool((dlp[~valid] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_remit_loss_chain(k, dtype):
    """csrc/cuda/remit_loss.cpp's launches in order (policy + scorer statistics in one launch,
    weights with the per-token loss, then the gradient with coef = w / N_valid) against the
    reference ReMiT loss and its autograd gradient, on packed sequences."""
    x, y = rows(40, 1025, dtype, seed=31, special=False)
    s, _ = rows(40, 1025, dtype, seed=32, special=False)
    y[::7] = IGNORE
    cu = torch.tensor([0, 13, 13, 40])
    lse, a, _, _, b = stats(k, x, y, scorer=s, entropy=False)
    w, _, loss, _ = weights(k, a, b, y, cu)
    valid = y != IGNORE
    coef = w / valid.sum()
    g = ce_grad(k, x, y, lse, a, coef)

    def ref(xx, ss):
        z = xx.clone().requires_grad_(True)
        _, aa, _ = token_stats_ref(z, y, entropy=False)
        _, bb, _ = token_stats_ref(ss, y, entropy=False)
        ww, _, _ = remit_weights_ref(aa, bb, valid, cu_seqlens=cu)
        total = -(ww * aa).sum() / valid.sum()
        (grad,) = torch.autograd.grad(total, z)
        return -(ww * aa).detach(), grad

    t_loss, t_grad = ref(x.double(), s.double())
    b_loss, b_grad = ref(x, s)
    assert_close_to_truth(loss, t_loss, b_loss, name="per-token loss")
    assert_close_to_truth(g, t_grad, b_grad.to(dtype), name="grad")


# -------------------------------------------------------------- race and bounds checks

def _run_driver(path):
    return subprocess.run([str(path)], env=emu.sanitizer_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("kind", ["tsan", "asan"])
def test_sanitizers_clean(builds, kind):
    """One launch of every kernel per dtype and group size (driver.cpp) under TSan (races
    between the threads of a block) or ASan + UBSan (any access outside a row or a buffer,
    undefined behaviour): no report, every launch ok."""
    proc = _run_driver(builds[(kind, None)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all launches ok" in proc.stdout
    for group in (32, 256, 512):
        assert f"group {group:3d}: ok" in proc.stdout
    assert "Sanitizer" not in out.replace("ASan doesn't fully support makecontext", "")


def test_race_check_rejects_a_missing_barrier(builds):
    proc = _run_driver(builds[("tsan", "missing_barrier")])
    assert proc.returncode != 0
    assert "ThreadSanitizer: data race" in proc.stderr and "group_merge" in proc.stderr


def test_bounds_check_rejects_an_off_by_one_read(builds):
    proc = _run_driver(builds[("asan", "off_by_one")])
    assert proc.returncode != 0
    assert "AddressSanitizer" in proc.stderr and "row_stats" in proc.stderr


def test_numerics_reject_a_wrong_shuffle_offset(builds, k):
    """The reference comparison fails on a warp reduction that skips its first step (and the
    same cases pass on the real kernels)."""
    broken = emu.Kernels(builds[("lib", "shuffle_offset")])
    for V in (1025, 32001):  # one warp a row; a block a row
        check_token_stats(k, torch.float32, V, 3, seed=V)
        with pytest.raises(AssertionError, match="max error"):
            check_token_stats(broken, torch.float32, V, 3, seed=V)


def test_faults_must_match_the_sources():
    """A planted fault is an exact replacement; a kernel edit that removes its text fails the
    build loudly instead of testing an unbroken kernel."""
    saved = emu.FAULTS["off_by_one"]
    emu.FAULTS["off_by_one"] = (saved[0], "no such text", "x")
    try:
        with pytest.raises(AssertionError, match="occurs 0 times"):
            emu.build("lib", "off_by_one")
    finally:
        emu.FAULTS["off_by_one"] = saved


# ----------------------------------------------------------- the emulator's own semantics

@pytest.fixture(scope="session")
def selftest(builds):
    lib = ctypes.CDLL(str(builds[("selftest", None)]))
    lib.selftest_error_message.restype = ctypes.c_char_p
    return lib


@pytest.mark.parametrize("n,threads", [(1000, 256), (80, 80), (33, 64), (1, 32)])
def test_emulator_block_barriers_and_shared_memory(selftest, n, threads):
    """Per-block shared memory and __syncthreads, with the threads past n returning first."""
    x = torch.arange(1, n + 1, dtype=torch.int32)
    blocks = (n + threads - 1) // threads
    out = torch.full((blocks,), -1, dtype=torch.int32)
    assert selftest.selftest_block_sum(ctypes.c_void_p(x.data_ptr()), n, threads,
                                       ctypes.c_void_p(out.data_ptr())) == 0
    want = torch.stack([x[b * threads:(b + 1) * threads].sum() for b in range(blocks)])
    assert torch.equal(out, want.to(torch.int32))


def test_emulator_warp_ops(selftest):
    threads = 96
    x = torch.randn(threads)
    out, any_, orv = torch.empty(threads), torch.empty(threads, dtype=torch.int32), \
        torch.empty(threads, dtype=torch.int32)
    assert selftest.selftest_warp(*(ctypes.c_void_p(t.data_ptr()) for t in (x,)), threads,
                                  *(ctypes.c_void_p(t.data_ptr()) for t in (out, any_, orv))) == 0
    want = x.reshape(3, 32).double().sum(1).repeat_interleave(32)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    assert any_.tolist() == [0] * 32 + [1] * 32 + [0] * 32
    assert orv.tolist() == [1] * threads


@pytest.mark.parametrize("which,code,message", [
    (0, 719, "divergent __syncthreads"),
    (1, 719, "deadlock in block 0"),
    (2, 719, "warp of 16 live lanes"),
    (3, 719, "returned while its warp waits"),
    (4, 9, "invalid launch configuration"),
    (5, 9, "invalid launch configuration"),
])
def test_emulator_reports_what_the_gpu_leaves_undefined(selftest, which, code, message):
    """cudaErrorLaunchFailure (719) or cudaErrorInvalidConfiguration (9), with the reason;
    cudaGetLastError() clears it, so the next launch is unaffected."""
    buf = torch.zeros(2048)
    assert selftest.selftest_bad(which, ctypes.c_void_p(buf.data_ptr())) == code
    assert message in selftest.selftest_error_message().decode()
    x = torch.ones(64, dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    assert selftest.selftest_block_sum(ctypes.c_void_p(x.data_ptr()), 64, 64,
                                       ctypes.c_void_p(out.data_ptr())) == 0
    assert int(out) == 64
