"""The Triton ops on inputs the Python layer refuses but a direct torch.ops call (or a
torch.compile trace, or validation turned off) can still hand them: malformed cu_seqlens stay in
bounds, an out-of-range target gives a NaN log-prob (as on CUDA), every raw op checks shapes,
dtypes and devices with the C++ ops' messages; an absurd logit spread keeps a finite entropy; and
every launch passes the compiler options tools/triton_check.py checks (no FMA contraction, which
the interpreter cannot show: python_tests/test_triton_build.py shows the check catching it)."""

import importlib

import pytest
import torch

from remit_ext.reference import remit_weights_ref, token_stats_ref
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE, make_logits, make_pair
from conftest import DEVICE, KERNEL_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS,
                                reason="triton backend not testable here")

N, V = 10, 11


@pytest.fixture(scope="module")
def T():
    """(the Triton ops namespace, the module defining them: remit_ext.triton's `ops` attribute
    is the namespace)."""
    triton_ops = importlib.import_module("remit_ext.triton.ops")
    return torch.ops.remit_ext_triton, triton_ops


def _stats(T, z, y, scorer=None, temperature=1.0, entropy=True):
    lse, logprob, ent, _, s_lse, s_logprob = T[0].token_stats(z, y, scorer, IGNORE, temperature,
                                                              entropy, 0, False)
    return lse, logprob, ent, s_logprob


# ------------------------------------------------------------------------- launch options


def test_every_launch_passes_the_launch_options(T, monkeypatch):
    """The options triton_check compiles with are the ones the launches pass (one dict, read by
    both); the interpreter ignores them, so everything else here runs with them too."""
    from remit_ext.triton import kernels as K

    assert K.LAUNCH_OPTIONS["enable_fp_fusion"] is False
    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self.kernel.__name__, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    names = ("_token_stats_fwd_kernel", "_remit_weights_kernel", "_ce_bwd_kernel",
             "_pg_terms_kernel", "_kd_fwd_kernel", "_kd_bwd_kernel")
    for name in names:
        monkeypatch.setattr(K, name, Recorder(getattr(K, name)))
    z, s, y = make_pair((N, V), torch.float32, seed=3)
    ops = T[0]
    lse, logprob, _, _ = _stats(T, z, y, s)
    ops.remit_loss(z, y, s, None, torch.tensor([0, 4, N], device=DEVICE), IGNORE, 0.2, True,
                   False)
    ops.weighted_ce_bwd(z, y, lse, logprob, torch.ones(N, device=DEVICE), IGNORE)
    ops.pg_loss_fwd(z, y, torch.ones(N, device=DEVICE), None, None, None, IGNORE, 0.2, 0.2, 0.0,
                    False)
    _, kd_lse, kd_teacher_lse = ops.kd_loss_fwd(z, s, y, IGNORE, 2.0)
    ops.kd_loss_bwd(z, s, y, kd_lse, kd_teacher_lse, torch.ones(N, device=DEVICE), IGNORE, 2.0)
    assert {name for name, _ in launched} == set(names)
    for name, kwargs in launched:
        assert kwargs.items() >= K.LAUNCH_OPTIONS.items(), (name, kwargs)


# ------------------------------------------------------------------------- cu_seqlens


def _guarded(values, fill, pad=1024):
    """`values` as a view into a buffer with `pad` entries of `fill` on each side: a kernel that
    reads outside the tokens picks up the fill (NaN log-probs, valid targets)."""
    buf = torch.full((pad + values.numel() + pad,), fill, dtype=values.dtype, device=DEVICE)
    buf[pad:pad + values.numel()] = values
    return buf[pad:pad + values.numel()]


def _clamped(cu, n):
    """The segments the kernels use (csrc/cuda/remit_weights.cuh): offsets clamped into [0, n],
    each end at least its begin."""
    segs = []
    for b, e in zip(cu[:-1], cu[1:]):
        b = min(max(b, 0), n)
        segs.append((b, max(min(max(e, 0), n), b)))
    return segs


@pytest.mark.parametrize("cu", [
    pytest.param([-7, 2, 5, 1], id="negative_then_decreasing"),  # [0, 2), [2, 5), [5, 5)
    pytest.param([0, 4, 1000], id="end_past_n"),                 # [0, 4), [4, 10)
    pytest.param([3, 1000, 2000], id="tokens_before_uncovered"),  # [3, 10), [10, 10)
    pytest.param([12, 20], id="nothing_covered"),
])
@pytest.mark.parametrize("cu_dtype", [torch.int64, torch.int32], ids=str)
def test_malformed_cu_seqlens_stay_in_bounds(T, cu, cu_dtype):
    ops = T[0]
    g = torch.Generator().manual_seed(5)
    a = -torch.rand(N, generator=g, dtype=torch.float64).float() * 4
    b = -torch.rand(N, generator=g, dtype=torch.float64).float() * 4
    y = torch.randint(0, V, (N,), generator=g)
    y[7] = IGNORE
    a, b = _guarded(a.to(DEVICE), float("nan")), _guarded(b.to(DEVICE), float("nan"))
    y = _guarded(y.to(DEVICE), 0)
    cu_t = torch.tensor(cu, dtype=cu_dtype, device=DEVICE)
    w, dhat, diag = ops.remit_weights(a, b, y, cu_t, IGNORE, 0.2)

    segs = [(lo, hi) for lo, hi in _clamped(cu, N) if hi > lo]
    covered = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    for lo, hi in segs:
        covered[lo:hi] = True
    assert bool((w[~covered] == 0).all()) and bool((dhat[~covered] == 0).all()), \
        "tokens no segment covers must be 0"
    assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(diag).all()), \
        "read outside the tokens (the guard's NaN got in)"
    if segs:  # the covered tokens are one range, split by the clamped segments
        first, last = segs[0][0], segs[-1][1]
        offsets = torch.tensor([first] + [hi for _, hi in segs], device=DEVICE) - first
        rw, rdhat, rdiag = remit_weights_ref(a[first:last], b[first:last],
                                             y[first:last] != IGNORE, cu_seqlens=offsets)
        torch.testing.assert_close(w[first:last], rw)
        torch.testing.assert_close(dhat[first:last], rdhat)
        want = torch.stack([rdiag.w_mean, rdiag.w_std, rdiag.frac_clip_low, rdiag.frac_clip_high,
                            rdiag.abs_delta_hat_mean, rdiag.delta_mean])
        torch.testing.assert_close(diag, want.to(diag.dtype))
    else:
        assert bool((diag == 0).all())

    # The fused remit_loss: its per-token loss is 0 where no segment reaches, -w a elsewhere.
    z, s, _ = make_pair((N, V), torch.float32, seed=6)
    y_dense = y.clone()
    loss, w2, logprob, _, _, _ = ops.remit_loss(z, y_dense, s, None, cu_t, IGNORE, 0.2, True,
                                                False)
    assert bool((loss[~covered] == 0).all()) and bool((w2[~covered] == 0).all())
    torch.testing.assert_close(loss[covered], -(w2 * logprob)[covered])


# ------------------------------------------------------------------------- out-of-range targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_out_of_range_target_gives_nan_logprob(T, dtype, target_dtype):
    """As the CUDA kernel: NaN log-prob (policy and scorer) at that position only, lse and
    entropy as computed; the gradient row is coef * softmax, no one-hot entry. Target V sits in
    the lanes past the row's end, where the old clamp read column V - 1."""
    ops = T[0]
    z, s, y = make_pair((N, V), dtype, seed=7)
    y = y.clone()
    y[8] = IGNORE
    bad = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    for pos, value in ((3, V), (5, 99), (6, -5)):
        y[pos], bad[pos] = value, True
    y = y.to(target_dtype)
    lse, logprob, ent, s_logprob = _stats(T, z, y, s)
    assert bool(logprob[bad].isnan().all()) and bool(s_logprob[bad].isnan().all())
    assert bool(torch.isfinite(logprob[~bad]).all()) and bool(torch.isfinite(s_logprob[~bad]).all())

    # lse and entropy do not depend on the target: the reference with any in-range target.
    y_ok = torch.where(bad, torch.zeros_like(y), y)
    r_lse, r_logprob, r_ent = token_stats_ref(z, y_ok)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, r_lse, **tol)
    torch.testing.assert_close(ent, r_ent, **tol)
    torch.testing.assert_close(logprob[~bad], r_logprob[~bad], **tol)

    loss, lse2, logprob2 = ops.weighted_ce_fwd(z, y, None, IGNORE, False)
    assert bool(loss[bad].isnan().all()) and bool(torch.isfinite(loss[~bad]).all())

    coef = torch.linspace(0.5, 1.5, N, device=DEVICE)
    grad = ops.weighted_ce_bwd(z, y, lse2, logprob2, coef, IGNORE).float()
    p = torch.softmax(z.float(), -1)
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(grad[bad], (coef[:, None] * p)[bad], **tol)
    valid = ~bad & (y != IGNORE)
    onehot = torch.nn.functional.one_hot(torch.where(valid, y, 0).long(), V).float()
    torch.testing.assert_close(grad[valid], (coef[:, None] * (p - onehot))[valid], **tol)
    assert bool((grad[8] == 0).all())

    # pg_loss shares the statistics pass: its loss is NaN at that token too.
    pg, _, pg_logprob, _ = ops.pg_loss_fwd(z, y, torch.ones(N, device=DEVICE), None, None, None,
                                           IGNORE, 0.2, 0.2, 0.0, False)
    assert bool(pg[bad].isnan().all()) and bool(pg_logprob[bad].isnan().all())
    assert bool(torch.isfinite(pg[~bad]).all())


# ------------------------------------------------------------------------- raw-op checks


def _inputs():
    z, s, y = make_pair((N, V), torch.float32, seed=8)
    ones = torch.ones(N, device=DEVICE)
    cu = torch.tensor([0, N], device=DEVICE)
    return z, s, y.clamp(min=0), ones, cu


# (case, call(ops, z, s, y, ones, cu), the C++ ops' message). Each is checked on the Triton op
# and, where the CPU kernels are built, against the C++ op's message word for word.
RAW_CASES = [
    ("logits_1d", lambda o, z, s, y, v, cu: o.token_stats(z[0], y, None, IGNORE, 1.0, False, 0,
                                                          False),
     r"logits: expected a 2-D \[N, V\] tensor, got shape \[11\]"),
    ("logits_int", lambda o, z, s, y, v, cu: o.weighted_ce_fwd(z.long(), y, None, IGNORE, False),
     r"logits: expected a floating dtype, got Long"),
    ("logits_v0", lambda o, z, s, y, v, cu: o.weighted_ce_fwd(z[:, :0], y, None, IGNORE, False),
     r"logits: expected V >= 1, got shape \[10, 0\]"),
    ("targets_short", lambda o, z, s, y, v, cu: o.token_stats(z, y[:9], None, IGNORE, 1.0, False,
                                                              0, False),
     r"targets: expected a 1-D tensor of 10 elements, got shape \[9\]"),
    ("targets_2d", lambda o, z, s, y, v, cu: o.weighted_ce_fwd(z, y[None], None, IGNORE, False),
     r"targets: expected a 1-D tensor of 10 elements, got shape \[1, 10\]"),
    ("targets_float", lambda o, z, s, y, v, cu: o.weighted_ce_bwd(z, y.float(), v, v, v, IGNORE),
     r"targets: expected int64 or int32, got Float"),
    ("actions_short", lambda o, z, s, y, v, cu: o.pg_loss_fwd(z, y[:9], v, None, None, None,
                                                              IGNORE, 0.2, 0.2, 0.0, False),
     r"actions: expected a 1-D tensor of 10 elements, got shape \[9\]"),
    ("scorer_shape", lambda o, z, s, y, v, cu: o.token_stats(z, y, s[:, :5], IGNORE, 1.0, False,
                                                             0, False),
     r"scorer_logits: expected the same shape as logits \[10, 11\], got \[10, 5\]"),
    ("scorer_int", lambda o, z, s, y, v, cu: o.remit_loss(z, y, s.long(), None, cu, IGNORE, 0.2,
                                                          True, False),
     r"scorer_logits: expected a floating dtype, got Long"),
    ("scorer_logprob_short", lambda o, z, s, y, v, cu: o.remit_loss(z, y, None, v[:9], cu, IGNORE,
                                                                    0.2, True, False),
     r"scorer_logprob: expected shape \[10\], got \[9\]"),
    ("both_scorers", lambda o, z, s, y, v, cu: o.remit_loss(z, y, s, v, cu, IGNORE, 0.2, True,
                                                            False),
     r"remit_loss: expected exactly one of scorer_logits and scorer_logprob"),
    ("no_scorer", lambda o, z, s, y, v, cu: o.remit_loss(z, y, None, None, cu, IGNORE, 0.2, True,
                                                         False),
     r"remit_loss: expected exactly one of scorer_logits and scorer_logprob"),
    ("weights_short", lambda o, z, s, y, v, cu: o.weighted_ce_fwd(z, y, v[:9], IGNORE, False),
     r"weights: expected shape \[10\], got \[9\]"),
    ("lse_short", lambda o, z, s, y, v, cu: o.weighted_ce_bwd(z, y, v[:9], v, v, IGNORE),
     r"lse: expected shape \[10\], got \[9\]"),
    ("logprob_2d", lambda o, z, s, y, v, cu: o.weighted_ce_bwd(z, y, v, v[None], v, IGNORE),
     r"logprob: expected shape \[10\], got \[1, 10\]"),
    ("coef_short", lambda o, z, s, y, v, cu: o.weighted_ce_bwd_(z.clone(), y, v, v, v[:3],
                                                                IGNORE),
     r"coef: expected shape \[10\], got \[3\]"),
    ("inplace_stride", lambda o, z, s, y, v, cu: o.weighted_ce_bwd_(z.t().contiguous().t(), y, v,
                                                                    v, v, IGNORE),
     r"logits: the in-place backward needs rows with unit stride, got strides \[1, 10\]"),
    ("temperature_zero", lambda o, z, s, y, v, cu: o.token_stats(z, y, None, IGNORE, 0.0, False,
                                                                 0, False),
     r"temperature: expected > 0, got 0$"),
    ("temperature_nan", lambda o, z, s, y, v, cu: o.token_stats(z, y, None, IGNORE,
                                                                float("nan"), False, 0, False),
     r"temperature: expected > 0, got nan"),
    ("topk_negative", lambda o, z, s, y, v, cu: o.token_stats(z, y, None, IGNORE, 1.0, False, -1,
                                                              False),
     r"topk: expected >= 0 \(0: not computed\), got -1"),
    ("eps_zero", lambda o, z, s, y, v, cu: o.remit_weights(v, v, y, cu, IGNORE, 0.0),
     r"eps: expected a value in \(0, 1\), got 0$"),
    ("eps_one", lambda o, z, s, y, v, cu: o.remit_loss(z, y, s, None, cu, IGNORE, 1.0, True,
                                                       False),
     r"eps: expected a value in \(0, 1\), got 1$"),
    ("cu_2d", lambda o, z, s, y, v, cu: o.remit_weights(v, v, y, cu[None], IGNORE, 0.2),
     r"cu_seqlens: expected a 1-D tensor of at least 2 offsets, got shape \[1, 2\]"),
    ("cu_short", lambda o, z, s, y, v, cu: o.remit_loss(z, y, s, None, cu[:1], IGNORE, 0.2, True,
                                                        False),
     r"cu_seqlens: expected a 1-D tensor of at least 2 offsets, got shape \[1\]"),
    ("cu_float", lambda o, z, s, y, v, cu: o.remit_weights(v, v, y, cu.float(), IGNORE, 0.2),
     r"cu_seqlens: expected int32 or int64, got Float"),
    ("logprob_1d", lambda o, z, s, y, v, cu: o.remit_weights(v[None], v, y, cu, IGNORE, 0.2),
     r"logprob: expected a 1-D tensor, got shape \[1, 10\]"),
    ("logprob_half", lambda o, z, s, y, v, cu: o.remit_weights(v.half(), v, y, cu, IGNORE, 0.2),
     r"logprob: expected float32 or float64, got Half"),
    ("scorer_logprob_rows", lambda o, z, s, y, v, cu: o.remit_weights(v, v[:9], y, cu, IGNORE,
                                                                      0.2),
     r"scorer_logprob: expected the same shape as logprob \[10\], got \[9\]"),
    ("weights_targets", lambda o, z, s, y, v, cu: o.remit_weights(v, v, y[:9], cu, IGNORE, 0.2),
     r"targets: expected a 1-D tensor of 10 elements, got shape \[9\]"),
    ("advantages_int", lambda o, z, s, y, v, cu: o.pg_loss_fwd(z, y, v.long(), None, None, None,
                                                               IGNORE, 0.2, 0.2, 0.0, False),
     r"advantages: expected a floating dtype, got Long"),
    ("old_logprob_short", lambda o, z, s, y, v, cu: o.pg_loss_fwd(z, y, v, None, v[:9], None,
                                                                  IGNORE, 0.2, 0.2, 0.0, False),
     r"old_logprob: expected shape \[10\], got \[9\]"),
    ("clip_low", lambda o, z, s, y, v, cu: o.pg_loss_fwd(z, y, v, None, None, None, IGNORE, 1.0,
                                                         0.2, 0.0, False),
     r"clip_low: expected a value in \[0, 1\), got 1$"),
    ("clip_high", lambda o, z, s, y, v, cu: o.pg_loss_fwd(z, y, v, None, None, None, IGNORE, 0.2,
                                                          -0.5, 0.0, False),
     r"clip_high: expected a value >= 0, got -0.5"),
    ("kl_without_ref", lambda o, z, s, y, v, cu: o.pg_loss_fwd(z, y, v, None, None, None, IGNORE,
                                                               0.2, 0.2, 0.1, False),
     r"kl_beta: 0.1 > 0 needs ref_logprob, got None"),
    ("kd_logits_1d", lambda o, z, s, y, v, cu: o.kd_loss_fwd(z[0], s, y, IGNORE, 1.0),
     r"logits: expected a 2-D \[N, V\] tensor, got shape \[11\]"),
    ("kd_teacher_int", lambda o, z, s, y, v, cu: o.kd_loss_fwd(z, s.long(), y, IGNORE, 1.0),
     r"teacher_logits: expected a floating dtype, got Long"),
    ("kd_teacher_shape", lambda o, z, s, y, v, cu: o.kd_loss_bwd(z, s[:, :5], y, v, v, v, IGNORE,
                                                                 1.0),
     r"teacher_logits: expected the same shape as logits \[10, 11\], got \[10, 5\]"),
    ("kd_teacher_dtype", lambda o, z, s, y, v, cu: o.kd_loss_fwd(z, s.double(), y, IGNORE, 1.0),
     r"teacher_logits: expected the logits' dtype Float, got Double"),
    ("kd_targets_short", lambda o, z, s, y, v, cu: o.kd_loss_fwd(z, s, y[:9], IGNORE, 1.0),
     r"targets: expected a 1-D tensor of 10 elements, got shape \[9\]"),
    ("kd_targets_float", lambda o, z, s, y, v, cu: o.kd_loss_bwd(z, s, y.float(), v, v, v, IGNORE,
                                                                 1.0),
     r"targets: expected int64 or int32, got Float"),
    ("kd_temperature", lambda o, z, s, y, v, cu: o.kd_loss_fwd(z, s, y, IGNORE, -1.0),
     r"temperature: expected > 0, got -1$"),
]


@pytest.mark.parametrize("case, call, pattern", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_op_checks(T, case, call, pattern):
    with pytest.raises(ValueError, match=pattern) as triton_err:
        call(T[0], *_inputs())
    if "cpu" in KERNEL_BACKENDS:  # the very message of the C++ op
        with pytest.raises(ValueError) as cpp_err:
            call(torch.ops.remit_ext, *_inputs())
        assert str(triton_err.value) == str(cpp_err.value).split("\n")[0]


# Device checks: a CPU machine has no second device the dispatcher would send to these kernels
# (with a meta tensor among the arguments it picks the fake), so the op bodies are called. The
# messages are csrc/cuda/glue.h's.
DEVICE_CASES = [
    ("targets", lambda f, z, s, y, v, cu, m: f["token_stats"](z, m(y), None, IGNORE, 1.0, False,
                                                               0, False),
     r"targets: expected a tensor on cpu, got meta"),
    ("scorer_logits", lambda f, z, s, y, v, cu, m: f["token_stats"](z, y, m(s), IGNORE, 1.0,
                                                                     False, 0, False),
     r"scorer_logits: expected a tensor on cpu$"),
    ("weights", lambda f, z, s, y, v, cu, m: f["weighted_ce_fwd"](z, y, m(v), IGNORE, False),
     r"weights: expected a tensor on cpu, got meta"),
    ("coef", lambda f, z, s, y, v, cu, m: f["weighted_ce_bwd"](z, y, v, v, m(v), IGNORE),
     r"coef: expected a tensor on cpu, got meta"),
    ("scorer_logprob", lambda f, z, s, y, v, cu, m: f["remit_loss"](z, y, None, m(v), cu, IGNORE,
                                                                     0.2, True, False),
     r"scorer_logprob: expected a tensor on cpu, got meta"),
    ("weights_scorer", lambda f, z, s, y, v, cu, m: f["remit_weights"](v, m(v), y, cu, IGNORE,
                                                                        0.2),
     r"scorer_logprob: expected a tensor on cpu, got meta"),
    ("weights_targets", lambda f, z, s, y, v, cu, m: f["remit_weights"](v, v, m(y), cu, IGNORE,
                                                                         0.2),
     r"targets: expected a tensor on cpu, got meta"),
    ("ref_logprob", lambda f, z, s, y, v, cu, m: f["pg_loss_fwd"](z, y, v, None, None, m(v),
                                                                   IGNORE, 0.2, 0.2, 0.1, False),
     r"ref_logprob: expected a tensor on cpu, got meta"),
    ("teacher_logits", lambda f, z, s, y, v, cu, m: f["kd_loss_fwd"](z, m(s), y, IGNORE, 1.0),
     r"teacher_logits: expected a tensor on cpu, got meta"),
    ("kd_targets", lambda f, z, s, y, v, cu, m: f["kd_loss_fwd"](z, s, m(y), IGNORE, 1.0),
     r"targets: expected a tensor on cpu, got meta"),
    ("kd_coef", lambda f, z, s, y, v, cu, m: f["kd_loss_bwd"](z, s, y, v, v, m(v), IGNORE, 1.0),
     r"coef: expected a tensor on cpu, got meta"),
]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the messages name the CPU device")
@pytest.mark.parametrize("case, call, pattern", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_raw_op_device_checks(T, case, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(T[1]._IMPLS, *_inputs(), lambda t: t.to("meta"))


# ------------------------------------------------------------------------- entropy guard


# The interpreter's numpy reports the overflow to -inf that the guard then discards.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absurd_logit_spread_keeps_a_finite_entropy(T, dtype):
    """A first block of huge negative logits, then ordinary ones: when the max rises, the
    rescale's shift * (below + top) overflows to -inf (-3e38 times a block of maxima; -1e38 times
    a block less one of maxima plus mass below them) where e^shift is 0, and 0 * -inf gave a NaN entropy. Those
    classes have probability 0: entropy, lse and log-prob are the ordinary half's."""
    vocab = 2 * T[1]._block_v(1 << 20)  # two blocks: 2 x 1024 interpreted, 2 x 4096 on a GPU
    z = make_logits((3, vocab), torch.float32, generator=torch.Generator().manual_seed(9))
    z[0, :vocab // 2] = -3e38
    z[1, :vocab // 2] = -1e38
    z[1, 5] = -2e38
    z = z.to(dtype)
    y = torch.tensor([vocab - 1, vocab // 2 + 7, 3], device=DEVICE)
    lse, logprob, ent, _ = _stats(T, z, y)
    assert bool(torch.isfinite(ent).all()), f"entropy {ent.tolist()}"
    truth = token_stats_ref(z.double(), y)
    base = token_stats_ref(z, y)
    for name, got, t, b in zip(("lse", "logprob", "entropy"), (lse, logprob, ent), truth, base):
        assert_close_to_truth(got, t, b, name=name)
    if "cpu" in KERNEL_BACKENDS:
        cpu = torch.ops.remit_ext.token_stats(z, y, None, IGNORE, 1.0, True, 0, False)
        torch.testing.assert_close(ent, cpu[2])


# ------------------------------------------------------------------------- KD


@pytest.mark.parametrize("case, name", [(0, "lse"), (1, "teacher_lse"), (2, "coef")])
def test_kd_bwd_checks_its_per_token_inputs(T, case, name):
    """The kernels read lse, teacher lse and coef by row: a short one is refused, by the Triton
    op and by the C++ one (which read it past its end before)."""
    z, s, y, ones, _ = _inputs()
    args = [ones, ones, ones]
    args[case] = ones[:9]
    with pytest.raises(ValueError, match=rf"{name}: expected shape \[10\], got \[9\]"):
        T[0].kd_loss_bwd(z, s, y, *args, IGNORE, 1.0)
    with pytest.raises(ValueError, match=rf"{name}: expected shape \[10\], got \[9\]"):
        torch.ops.remit_ext.kd_loss_bwd(z.cpu(), s.cpu(), y.cpu(), *(a.cpu() for a in args),
                                        IGNORE, 1.0)


# The interpreter's numpy reports the inf - inf and 0 * inf that the guards then discard.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="cpu kernels not built")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_kd_matches_the_cpu_op_on_extreme_rows(T, temperature, target_dtype):
    """Row by row what csrc/cpu/kd_loss.cpp gives, lse and teacher lse included (the backward
    reads them): NaN loss where either softmax is undefined, with each side's max as its "lse"
    there; +inf where the student rules out a class the teacher backs, also when that is a
    whole first block (the student's running max starts at -inf); q = 0 at a -inf student logit
    counts 0; an absurd spread of maxima on either side (the dot's rebase); the gradient NaN
    exactly on the undefined rows. Three vocabulary blocks per row."""
    vocab = 2 * T[1]._block_v(1 << 20) + 52
    g = torch.Generator().manual_seed(10)
    z = make_logits((13, vocab), torch.float32, generator=g)
    zt = make_logits((13, vocab), torch.float32, generator=g)
    nan, inf = float("nan"), float("inf")
    z[0, 5] = nan
    zt[1, vocab - 3] = nan
    z[2, 7] = inf
    zt[3, vocab - 9] = inf
    z[4] = -inf
    zt[5] = -inf
    first = vocab // 2 - 52  # the first block, interpreted or on a GPU
    z[6, :first] = -inf
    z[7, 3], zt[7, 3] = -inf, -inf
    z[8, :first], zt[8, :first] = -inf, -inf
    z[9, vocab - 1] = -inf
    zt[10, :first] = -1e38
    # (The student's dot sums spread x teacher mass: at -1e38 that overflows fp32 on both
    # kernels, only not at the same threshold.)
    z[11, :first] = -1e36
    y = torch.arange(13, device=DEVICE).to(target_dtype)
    y[12] = IGNORE
    z[12] = nan  # ignored: never read
    got = T[0].kd_loss_fwd(z, zt, y, IGNORE, temperature)
    want = torch.ops.remit_ext.kd_loss_fwd(z, zt, y, IGNORE, temperature)
    for name, a, b in zip(("loss", "lse", "teacher_lse"), got, want):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.isnan(got[0][:6]).all() and got[0][[6, 9]].tolist() == [inf, inf]
    assert torch.isfinite(got[0][7:9]).all() and float(got[0][12]) == 0.0
    coef = torch.linspace(0.5, 1.5, 13, device=DEVICE)
    grad = T[0].kd_loss_bwd(z, zt, y, got[1], got[2], coef, IGNORE, temperature)
    cpu = torch.ops.remit_ext.kd_loss_bwd(z, zt, y, want[1], want[2], coef, IGNORE, temperature)
    torch.testing.assert_close(grad, cpu, equal_nan=True, rtol=1e-5, atol=1e-7)
    assert bool(torch.isnan(grad[:6]).all()) and bool(torch.isfinite(grad[6:]).all())
    assert bool((grad[12] == 0).all())
