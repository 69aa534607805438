"""ReMiT token weights (METHODS.md section 2, steps 3-5), every backend against remit_weights_ref:
weights, centred delta, diagnostics, per-row / one-sequence / packed segmentation, the clip
band, detached and non-detached gradients; fp64 truth, same-math baseline, a hand-made case."""

import math

import pytest
import torch

import remit_ext
from remit_ext.reference import remit_weights_ref
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE, make_targets
from conftest import BACKENDS, DEVICE, LOW_DTYPES

DIAG_FIELDS = remit_ext.ReMiTDiagnostics._fields

# Packed documents over 90 positions: an empty one (12:12) and, with targets[40:55] ignored,
# one whose tokens are all ignored.
PACKED_CU = [0, 12, 12, 40, 55, 89, 90]


def make_logprobs(shape, dtype, *, seed, ignore_frac=0.2):
    """Policy and scorer log-probs (<= 0, delta of order 1) and targets."""
    g = torch.Generator().manual_seed(seed)
    a = -6.0 * torch.rand(shape, dtype=torch.float64, generator=g)
    b = (a + torch.randn(shape, dtype=torch.float64, generator=g)).clamp(max=0)
    targets = make_targets(shape, 50, ignore_frac=ignore_frac, generator=g)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), targets


def _segmentation(kind, targets):
    """(targets, cu_seqlens for the API, cu_seqlens for the flat reference)."""
    if kind == "rows":
        t = targets.shape[-1]
        return targets, None, torch.arange(targets.numel() // t + 1, device=DEVICE) * t
    if kind == "one sequence":
        return targets.reshape(-1), None, None
    targets = targets.reshape(-1).clone()
    targets[40:55] = IGNORE
    cu = torch.tensor(PACKED_CU, device=DEVICE, dtype=torch.int32)
    return targets, cu, cu


def _cotangents(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)]


def _ref(a, b, targets, cu, eps, detach=True):
    """(w, delta_hat, diagnostics[, d/da]) flat; the gradient only for detach=False."""
    x = a.detach().clone().reshape(-1).requires_grad_(not detach)
    w, dh, diag = remit_weights_ref(x, b.reshape(-1), (targets != IGNORE).reshape(-1),
                                    cu_seqlens=cu, eps=eps, detach=detach)
    out = [w, dh, torch.stack(tuple(diag))]
    if not detach:
        c_w, c_dh = _cotangents(w.shape)
        (grad,) = torch.autograd.grad((w * c_w.to(w.dtype) + dh * c_dh.to(dh.dtype)).sum(), x)
        out.append(grad)
    return out


def _api(a, b, targets, cu, eps, backend, detach=True):
    x = a.detach().clone().requires_grad_(not detach)
    w, dh, diag = remit_ext.remit_weights(x, b, targets, cu_seqlens=cu, eps=eps, detach=detach,
                                          backend=backend)
    assert w.shape == targets.shape and dh.shape == targets.shape
    out = [w.reshape(-1), dh.reshape(-1), torch.stack(tuple(diag))]
    if not detach:
        c_w, c_dh = _cotangents(w.numel())
        (grad,) = torch.autograd.grad(
            (w.reshape(-1) * c_w.to(w.dtype) + dh.reshape(-1) * c_dh.to(dh.dtype)).sum(), x)
        out.append(grad.reshape(-1))
    return out


def _check_against_ref(a, b, targets, *, backend, cu=None, ref_cu=None, eps=0.2, detach=True):
    truth = _ref(a.double(), b.double(), targets, ref_cu, eps, detach)
    base = _ref(a, b, targets, ref_cu, eps, detach)
    got = _api(a, b, targets, cu, eps, backend, detach)
    assert_close_to_truth(got[0], truth[0], base[0], name=f"{backend}/weights")
    assert_close_to_truth(got[1], truth[1], base[1], name=f"{backend}/delta_hat")
    for i, field in enumerate(DIAG_FIELDS):
        assert_close_to_truth(got[2][i], truth[2][i], base[2][i], name=f"{backend}/{field}")
    if not detach:
        assert got[3].dtype == a.dtype, "gradient must come back in the log-probs' dtype"
        assert_close_to_truth(got[3], truth[3], base[3], name=f"{backend}/grad")
    valid = (targets != IGNORE).reshape(-1)
    assert bool((got[0][~valid] == 0).all()) and bool((got[1][~valid] == 0).all())
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("kind", ["rows", "one sequence", "packed"])
@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_matches_reference(backend, dtype, kind, eps):
    a, b, targets = make_logprobs((3, 30), dtype, seed=40)
    targets, cu, ref_cu = _segmentation(kind, targets)
    _check_against_ref(a.reshape(targets.shape), b.reshape(targets.shape), targets,
                       backend=backend, cu=cu, ref_cu=ref_cu, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_segments_over_rows(backend):
    # cu_seqlens runs over the flattened positions and overrides the row segmentation; the
    # empty and all-ignored documents contribute nothing (no NaN, weights 0 there).
    a, b, targets = make_logprobs((3, 30), torch.float32, seed=41)
    targets = targets.clone()
    targets.view(-1)[40:55] = IGNORE
    cu = torch.tensor(PACKED_CU, device=DEVICE, dtype=torch.int64)
    got = _check_against_ref(a, b, targets, backend=backend, cu=cu, ref_cu=cu)
    assert not bool(torch.isnan(got[0]).any()) and bool((got[0][40:55] == 0).all())
    rows = remit_ext.remit_weights(a, b, targets, backend=backend).weights
    assert not torch.allclose(rows.reshape(-1), got[0]), "segmentation must matter"


@pytest.mark.parametrize("backend", BACKENDS)
def test_centering_is_per_sequence(backend):
    # Shifting delta by a constant over one sequence changes neither its weights nor any other.
    a, b, targets = make_logprobs((4, 25), torch.float64, seed=42)
    w0, dh0, _ = remit_ext.remit_weights(a, b, targets, backend=backend)
    shifted = b.clone()
    shifted[2] -= 0.75
    w1, dh1, _ = remit_ext.remit_weights(a, shifted, targets, backend=backend)
    torch.testing.assert_close(w1, w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(dh1, dh0, rtol=0, atol=1e-12)
    valid = targets != IGNORE
    sums = torch.where(valid, dh0, 0).sum(-1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_clip_binds_exactly_beyond_log_ratio(backend, eps):
    # 2 sigmoid(x) = 1 + tanh(x / 2) reaches 1 +- eps exactly at |x| = ln((1 + eps) / (1 - eps)).
    bound = math.log((1 + eps) / (1 - eps))
    a, b, targets = make_logprobs((6, 40), torch.float64, seed=43)
    b = a + 2.5 * (b - a)  # spread delta_hat across both sides of the band
    w, dh, _ = remit_ext.remit_weights(a, b, targets, eps=eps, backend=backend)
    valid = targets != IGNORE
    w, dh = w[valid], dh[valid]
    clear = ((dh.abs() - bound).abs() > 1e-6)
    assert int(clear.sum()) > 0.9 * dh.numel()
    high, low = dh >= bound, dh <= -bound
    assert bool(high.any()) and bool(low.any()) and bool((~high & ~low).any())
    at_high = (w - (1 + eps)).abs() < 1e-12
    at_low = (w - (1 - eps)).abs() < 1e-12
    assert torch.equal(at_high[clear], high[clear])
    assert torch.equal(at_low[clear], low[clear])
    inside = ~high & ~low
    torch.testing.assert_close(w[inside], 1 + torch.tanh(dh[inside] / 2), rtol=0, atol=1e-12)
    # Right at the boundary: two tokens with delta = +-x have delta_hat = +-x.
    y = torch.tensor([3, 4], device=DEVICE)
    zero = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    for x, clipped in ((bound + 1e-4, True), (bound - 1e-4, False)):
        pair = torch.tensor([x, -x], dtype=torch.float64, device=DEVICE)
        w2 = remit_ext.remit_weights(zero, pair, y, eps=eps, backend=backend).weights
        expected = torch.tensor([1 + math.tanh(x / 2), 1 - math.tanh(x / 2)], dtype=torch.float64)
        if clipped:
            expected = torch.tensor([1 + eps, 1 - eps], dtype=torch.float64)
        torch.testing.assert_close(w2.cpu(), expected, rtol=0, atol=1e-12)


def test_hand_computed_weights():
    # One sequence, three valid tokens and an ignored one; eps = 0.2.
    a = [-1.0, -2.0, -0.5]
    b = [-1.5, -0.5, -0.5]
    delta = [bi - ai for ai, bi in zip(a, b)]  # [-0.5, 1.5, 0.0]
    mu = sum(delta) / 3
    dh = [d - mu for d in delta]  # [-5/6, 7/6, -1/3]
    raw = [1 + math.tanh(x / 2) for x in dh]  # [0.606, 1.525, 0.835]
    w = [min(max(r, 0.8), 1.2) for r in raw]
    assert w[0] == 0.8 and w[1] == 1.2 and 0.8 < w[2] < 1.2  # both clip sides and the band
    mean = sum(w) / 3
    expected_diag = {
        "w_mean": mean,
        "w_std": math.sqrt(sum((x - mean) ** 2 for x in w) / 3),
        "frac_clip_low": 1 / 3,
        "frac_clip_high": 1 / 3,
        "abs_delta_hat_mean": sum(abs(x) for x in dh) / 3,
        "delta_mean": mu,
    }
    logprobs = torch.tensor(a[:2] + [7.0] + a[2:], dtype=torch.float64, device=DEVICE)
    scorer = torch.tensor(b[:2] + [-9.0] + b[2:], dtype=torch.float64, device=DEVICE)
    targets = torch.tensor([5, 6, IGNORE, 7], device=DEVICE)
    for backend in BACKENDS:
        out = remit_ext.remit_weights(logprobs, scorer, targets, backend=backend)
        torch.testing.assert_close(out.weights.cpu(),
                                   torch.tensor(w[:2] + [0.0] + w[2:], dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(out.delta_hat.cpu(),
                                   torch.tensor(dh[:2] + [0.0] + dh[2:], dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        for field, value in out.diagnostics.as_dict().items():
            assert abs(value - expected_diag[field]) < 1e-12, (backend, field, value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rows", "packed"])
def test_all_ignored_gives_zeros(backend, kind):
    a, b, targets = make_logprobs((3, 30), torch.float32, seed=44)
    targets = torch.full_like(targets, IGNORE)
    targets, cu, _ = _segmentation(kind, targets)
    w, dh, diag = remit_ext.remit_weights(a.reshape(targets.shape), b.reshape(targets.shape),
                                          targets, cu_seqlens=cu, backend=backend)
    for name, t in (("weights", w), ("delta_hat", dh), ("diagnostics", torch.stack(diag))):
        assert not bool(torch.isnan(t).any()), f"{name}: NaN"
        assert bool((t == 0).all()), f"{name}: expected all zeros"


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_detached_by_default(backend):
    a, b, targets = make_logprobs((2, 20), torch.float32, seed=45)
    x = a.clone().requires_grad_(True)
    w, dh, diag = remit_ext.remit_weights(x, b, targets, backend=backend)
    assert not w.requires_grad and not dh.requires_grad
    assert not any(d.requires_grad for d in diag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("detach", [True, False])
def test_scorer_gets_no_gradient(backend, detach):
    # The scorer is frozen (section 2): remit_weights_ref detaches b in both modes.
    a, b, targets = make_logprobs((2, 20), torch.float64, seed=46)
    x, s = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    w, dh, _ = remit_ext.remit_weights(x, s, targets, detach=detach, backend=backend)
    c_w, c_dh = _cotangents(targets.shape)
    total = (w * c_w + dh * c_dh).sum()
    g_s = torch.zeros_like(s)
    if total.requires_grad:  # a does not reach w when detached; the scorer must not either
        (g_s,) = torch.autograd.grad(total, s, allow_unused=True, materialize_grads=True)
    assert bool((g_s == 0).all()), f"scorer_logprobs got a gradient (max {float(g_s.abs().max())})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("kind", ["rows", "one sequence", "packed"])
def test_non_detached_gradient(backend, dtype, kind):
    a, b, targets = make_logprobs((3, 30), dtype, seed=47)
    targets, cu, ref_cu = _segmentation(kind, targets)
    _check_against_ref(a.reshape(targets.shape), b.reshape(targets.shape), targets,
                       backend=backend, cu=cu, ref_cu=ref_cu, detach=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rows", "packed"])
def test_gradcheck_non_detached_fp64(backend, kind):
    # Random data keeps every delta_hat away from the clip corners, where w is not smooth.
    a, b, targets = make_logprobs((3, 30), torch.float64, seed=48)
    targets, cu, _ = _segmentation(kind, targets)
    a, b = a.reshape(targets.shape), b.reshape(targets.shape)
    eps_fd = 1e-6
    bound = math.log(1.2 / 0.8)
    dh = remit_ext.remit_weights(a, b, targets, cu_seqlens=cu).delta_hat
    assert float((dh.abs() - bound).abs().min()) > 10 * eps_fd
    x = a.clone().requires_grad_(True)

    def f(lp):
        out = remit_ext.remit_weights(lp, b, targets, cu_seqlens=cu, detach=False,
                                      backend=backend)
        return out.weights, out.delta_hat

    assert torch.autograd.gradcheck(f, (x,), eps=eps_fd, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nondetached_gradient_ignores_positions_before_the_first_offset(backend):
    # Unchecked offsets starting past 0: the positions before cu_seqlens[0] are in no sequence,
    # in the weights (0) and in the non-detached gradient through the centring (0) alike.
    a = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.2], dtype=torch.float64, device=DEVICE)
    b = torch.tensor([-1.2, -0.1, -2.0, -1.0, -0.3, -0.9], dtype=torch.float64, device=DEVICE)
    y = torch.zeros(6, dtype=torch.long, device=DEVICE)
    cu = torch.tensor([2, 4, 6], device=DEVICE)
    with remit_ext.validation("off"):
        aa = a.clone().requires_grad_(True)
        try:
            out = remit_ext.remit_weights(aa, b, y, cu_seqlens=cu, detach=False, eps=0.9,
                                          backend=backend)
        except ValueError as err:  # the C++ kernels refuse offsets they cannot read
            assert "cu_seqlens" in str(err)
            return
        out.weights.sum().backward()
    ra = a.clone().requires_grad_(True)
    valid = torch.arange(6, device=DEVICE) >= 2
    w, _, _ = remit_weights_ref(ra, b, valid, cu_seqlens=cu, eps=0.9, detach=False)
    w.sum().backward()
    assert bool((out.weights[:2] == 0).all()) and bool((aa.grad[:2] == 0).all())
    torch.testing.assert_close(out.weights, w)
    torch.testing.assert_close(aa.grad, ra.grad)

