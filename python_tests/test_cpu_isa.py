"""The CPU row kernels under every instruction set compiled into this build that this CPU runs
(csrc/cpu/rows.h: DEFAULT, AVX2, AVX512, AVX512_BF16), on rows chosen to break a one-read
online softmax: confident rows, exact ties, spreads of 1e4, mixed +-1e4, -inf entries, rows
with no softmax (+inf, NaN, all -inf), and widths that leave every kind of tail. Each result is
checked against the fp64 references of ``remit_ext.reference`` (and autograd through them)."""

import math
import os
import subprocess
import sys

import pytest
import torch

import remit_ext
from remit_ext import _C
from remit_ext import reference as ref

IGNORE = -100
SUPPORTED = _C.cpu_capabilities_supported()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
WIDTHS = [1, 5, 37, 1000, 4099]


@pytest.fixture(params=SUPPORTED)
def isa(request):
    before = _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability(before)


def hard_rows(V: int, dtype: torch.dtype, seed: int = 0):
    """Rows of width V (fp64 values, then rounded to dtype) and targets; row kinds in order:
    random, confident (target 20 above the rest), ties (three exact maxima, one the target),
    spread 1e4 (one logit 1e4 above the rest), mixed +-1e4, a -inf half, an ignored row, and the
    rows with no softmax: a +inf, a NaN, all -inf."""
    g = torch.Generator().manual_seed(seed)
    rows, targets = [], []

    def add(z, y):
        rows.append(z)
        targets.append(y)

    y = lambda: int(torch.randint(0, V, (1,), generator=g))  # noqa: E731
    base = lambda: torch.randn(V, dtype=torch.float64, generator=g) * 3  # noqa: E731
    for _ in range(3):
        add(base(), y())
    z, t = base(), y()
    z[t] = z.max() + 20
    add(z, t)
    z, t = base().round(), y()
    z[torch.randperm(V, generator=g)[:3]] = 7.0
    z[t] = 7.0
    add(z, t)
    z, t = base() - 1e4, y()
    z[t] = 0.0
    add(z, t)
    z = torch.where(torch.rand(V, generator=g) < 0.5, 1e4, -1e4) + base()
    add(z, y())
    z, t = base(), y()
    z[torch.rand(V, generator=g) < 0.5] = -math.inf
    z[t] = 1.0
    add(z, t)
    add(base(), IGNORE)
    for bad in (math.inf, math.nan):
        z, t = base(), y()
        z[(t + 1) % V] = bad
        add(z, t)
    add(torch.full((V,), -math.inf, dtype=torch.float64), y())
    return torch.stack(rows).to(dtype), torch.tensor(targets)


def tol(dtype):
    # The references see the same rounded logits (in fp64): only accumulation error is left.
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=5e-5)


def assert_rows_close(got, want, z, temperature, dtype):
    """Per row: |got - want| <= rtol |want| + atol + 8 eps max|z / T|. The last term is the
    rounding of z / T in the accumulation dtype, which a row of +-1e4 logits carries into every
    statistic (the fp64 reference does not round there)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = tol(dtype)
    zmax = z.double().abs().nan_to_num(posinf=0.0).amax(-1) / temperature
    bound = t["rtol"] * want.abs() + t["atol"] + 8 * torch.finfo(acc).eps * zmax
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"


def test_capabilities_are_reported():
    info = remit_ext.build_info()
    assert info["cpu_capabilities"][0] == "DEFAULT"
    assert set(SUPPORTED) <= set(info["cpu_capabilities"])
    assert info["cpu_capability"] == SUPPORTED[-1] or os.environ.get("REMIT_CPU_CAPABILITY")


def test_unknown_capability_is_refused():
    with pytest.raises(ValueError, match=r"cpu capability: expected one of \[DEFAULT.*got 'SSE9'"):
        _C.set_cpu_capability("SSE9")


@pytest.mark.parametrize("value", ["avx2", "bogus"])
def test_environment_caps_the_choice(value):
    env = dict(os.environ, REMIT_CPU_CAPABILITY=value)
    code = "import remit_ext; print(remit_ext.build_info()['cpu_capability'])"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if value == "bogus":
        assert run.returncode != 0
        assert "REMIT_CPU_CAPABILITY: expected one of [DEFAULT" in run.stderr
        assert "got 'bogus'" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == ("AVX2" if "AVX2" in SUPPORTED else "DEFAULT")


@pytest.mark.parametrize("V", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_hard_rows(isa, dtype, V, temperature):
    z, y = hard_rows(V, dtype)
    lse, lp, ent, topk, _, _ = torch.ops.remit_ext.token_stats(z, y, None, IGNORE, temperature,
                                                               True, 3, False)
    r_lse, r_lp, r_ent = ref.token_stats_ref(z.double(), y, ignore_index=IGNORE,
                                             temperature=temperature)
    r_topk = torch.where(y != IGNORE, ref.topk_entropy_ref(z.double(), 3,
                                                           temperature=temperature), 0.0)
    rows_ok = torch.isfinite(r_lse) | (y == IGNORE)
    for got, want in ((lse, r_lse), (lp, r_lp), (ent, r_ent), (topk, r_topk)):
        assert_rows_close(got[rows_ok], want[rows_ok], z[rows_ok], temperature, dtype)
    # No softmax: lse as torch.logsumexp (+inf / NaN / -inf), everything else NaN.
    bad = ~rows_ok
    torch.testing.assert_close(lse.double()[bad], r_lse[bad], equal_nan=True)
    assert bool(lp[bad].isnan().all() & ent[bad].isnan().all() & topk[bad].isnan().all())
    # Where the truth is finite, so is the entropy; log-probs never exceed 0.
    assert bool(torch.isfinite(ent[rows_ok]).all())
    assert bool((lp[rows_ok] <= 0).all())


def assert_grad_close(got, truth, dtype):
    """Relative to each row's largest entry, plus the dtype's smallest subnormal (an fp16
    gradient entry of 1e-9 can only round to 0 or 6e-8)."""
    rtol = 1e-10 if dtype == torch.float64 else (2e-5 if dtype == torch.float32 else 1e-2)
    fi = torch.finfo(dtype)
    bound = rtol * truth.abs().amax(-1, keepdim=True) + fi.smallest_normal * fi.eps
    err = (got.double() - truth).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"


def _stats_truth(z, y, temperature, g_lp, g_ent, g_lse):
    x = z.double().requires_grad_(True)
    lse, lp, ent = ref.token_stats_ref(x, y, ignore_index=IGNORE, temperature=temperature)
    total = (g_lp * lp).sum() + (g_ent * ent).sum() + (g_lse * lse).sum()
    return torch.autograd.grad(total, x)[0]


@pytest.mark.parametrize("V", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_gradients_hard_rows(isa, dtype, V, inplace):
    z, y = hard_rows(V, dtype, seed=1)
    ok = torch.isfinite(ref.token_stats_ref(z.double(), y, ignore_index=IGNORE)[0])
    ok &= y != IGNORE
    z, y = z[ok], y[ok]  # rows with a softmax (the others: test_no_softmax_rows_give_nan)
    n = z.shape[0]
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent, g_lse = (torch.randn(n, dtype=torch.float64, generator=g) for _ in range(3))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse, lp, ent = (t.to(acc) for t in torch.ops.remit_ext.token_stats(
        z, y, None, IGNORE, 0.7, True, 0, False)[:3])

    args = (y, lse, lp, ent, g_lp.to(acc), g_ent.to(acc), g_lse.to(acc), IGNORE, 0.7)
    if inplace:
        got = z.clone()
        torch.ops.remit_ext.token_stats_bwd_(got, *args)
    else:
        got = torch.ops.remit_ext.token_stats_bwd(z, *args)
    truth = _stats_truth(z, y, 0.7, g_lp, g_ent, g_lse)
    assert got.dtype == dtype
    assert_grad_close(got, truth, dtype)

    coef = g_lp.to(acc)
    lse1, lp1 = (t.to(acc) for t in torch.ops.remit_ext.token_stats(
        z, y, None, IGNORE, 1.0, False, 0, False)[:2])
    ce_args = (y, lse1, lp1, coef, IGNORE)
    if inplace:
        got = z.clone()
        torch.ops.remit_ext.weighted_ce_bwd_(got, *ce_args)
    else:
        got = torch.ops.remit_ext.weighted_ce_bwd(z, *ce_args)
    truth = _stats_truth(z, y, 1.0, -g_lp, torch.zeros_like(g_lp), torch.zeros_like(g_lp))
    assert_grad_close(got, truth, dtype)


def test_no_softmax_rows_give_nan(isa):
    z, y = hard_rows(37, torch.float32)
    lse, lp, ent = torch.ops.remit_ext.token_stats(z, y, None, IGNORE, 1.0, True, 0, False)[:3]
    bad = ~torch.isfinite(lse) & (y != IGNORE)
    assert int(bad.sum()) == 3
    one = torch.ones_like(lse)
    for grad in (torch.ops.remit_ext.token_stats_bwd(z, y, lse, lp, ent, one, one, one, IGNORE,
                                                     1.0),
                 torch.ops.remit_ext.weighted_ce_bwd(z, y, lse, lp, one, IGNORE)):
        assert bool(grad[bad].isnan().all())
        assert bool((grad[y == IGNORE] == 0).all())


@pytest.mark.parametrize("V", [5, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_and_pg_hard_rows(isa, dtype, V):
    z, y = hard_rows(V, dtype, seed=3)
    ok = torch.isfinite(ref.token_stats_ref(z.double(), y, ignore_index=IGNORE)[0])
    z, y = z[ok], y[ok]
    teacher = (z.double() * 0.5 + torch.randn(z.shape, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(4)))
    teacher = teacher.to(dtype)
    loss, lse, tlse = torch.ops.remit_ext.kd_loss_fwd(z, teacher, y, IGNORE, 2.0)
    want = ref.kd_loss_ref(z.double(), teacher.double(), y, temperature=2.0,
                           ignore_index=IGNORE, reduction="none")
    assert_rows_close(loss, want, torch.cat([z, teacher], -1), 2.0, dtype)
    x = z.double().requires_grad_(True)
    coef = torch.linspace(-1, 1, z.shape[0], dtype=torch.float64)
    truth = torch.autograd.grad((coef * ref.kd_loss_ref(x, teacher.double(), y, temperature=2.0,
                                                        ignore_index=IGNORE,
                                                        reduction="none")).sum(), x)[0]
    got = torch.ops.remit_ext.kd_loss_bwd(z, teacher, y, lse, tlse, coef.to(lse.dtype), IGNORE,
                                          2.0)
    # Rows of ~1e4 logits are left out: the KD gradient takes p from the rounded lse (a known
    # limit at |z| >> 1e3, docs/backends.md), where the CE and statistics gradients do not.
    small = z.double().abs().nan_to_num(posinf=0.0).amax(-1) < 1e3
    assert_grad_close(got[small], truth[small], dtype)

    adv = torch.linspace(-2, 2, z.shape[0], dtype=torch.float64)
    acc = lse.dtype
    pl, _, plp, _ = torch.ops.remit_ext.pg_loss_fwd(z, y, adv.to(acc), None, None, None, IGNORE,
                                                   0.2, 0.2, 0.0, False)
    want = ref.pg_loss_ref(z.double(), y, adv, ignore_index=IGNORE, reduction="none")
    assert_rows_close(pl, want, z, 1.0, dtype)


def test_every_copy_gives_the_same_answer():
    # The copies differ only in vector width: same formulas, so agreement to a few ulps.
    if len(SUPPORTED) < 2:
        pytest.skip(f"this CPU runs one copy only ({SUPPORTED})")
    z, y = hard_rows(4099, torch.float32, seed=5)
    outs = {}
    before = remit_ext.build_info()["cpu_capability"]
    try:
        for cap in SUPPORTED:
            _C.set_cpu_capability(cap)
            outs[cap] = torch.ops.remit_ext.token_stats(z, y, None, IGNORE, 1.0, True, 0, False)[:3]
    finally:
        _C.set_cpu_capability(before)
    for cap, got in outs.items():
        for a, b in zip(got, outs["DEFAULT"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("bad, match", [
    ({"lse": torch.zeros(3)}, r"lse: expected shape \[4\], got \[3\]"),
    ({"logprob": torch.zeros(4, dtype=torch.int64)}, r"logprob: expected a floating dtype"),
    ({"g_entropy": torch.zeros(5)}, r"g_entropy: expected shape \[4\], got \[5\]"),
    ({"entropy": torch.zeros(4, 1)}, r"entropy: expected shape \[4\]"),
    ({"temperature": 0.0}, r"temperature"),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_token_stats_bwd_refuses_bad_arguments(bad, match, inplace):
    z = torch.randn(4, 9)
    args = dict(targets=torch.tensor([1, 2, IGNORE, 0]), lse=torch.zeros(4),
                logprob=torch.zeros(4), entropy=torch.zeros(4), g_logprob=torch.ones(4),
                g_entropy=torch.ones(4), g_lse=None, ignore_index=IGNORE, temperature=1.0)
    args.update(bad)
    op = torch.ops.remit_ext.token_stats_bwd_ if inplace else torch.ops.remit_ext.token_stats_bwd
    with pytest.raises(ValueError, match=match):
        op(z, *args.values())
