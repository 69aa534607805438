"""Weighted cross-entropy (METHODS.md section 2, step 6), every backend against weighted_ce_ref:
loss in every reduction, the gradients w.r.t. the logits and the weights, the in-place backward,
fp64 gradcheck; 'mean' divides by the valid-token count, never by the sum of the weights."""

import math

import pytest
import torch

import remit_ext
from remit_ext.reference import weighted_ce_ref
from remit_ext.testing import assert_close_to_truth
from cases import (IGNORE, SHAPES, assert_target_gradient_accurate, confident_rows, make_logits,
                   make_targets, off_target_error)
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS, LOW_DTYPES


def make_inputs(shape, dtype, *, seed, ignore_frac=0.2, weight_dtype=torch.float32):
    """Logits, targets and per-token weights in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(shape, dtype, generator=g)
    targets = make_targets(shape[:-1], shape[-1], ignore_frac=ignore_frac, generator=g)
    weights = (0.5 + torch.rand(shape[:-1], dtype=torch.float64, generator=g))
    return logits, targets, weights.to(DEVICE, weight_dtype)


def _cotangent(targets, reduction, seed=3):
    if reduction != "none":
        return torch.ones((), dtype=torch.float64, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(targets.shape, generator=g, dtype=torch.float64).to(DEVICE)


def _loss_and_grads(fn, logits, weights, targets, reduction, grad_weights):
    z = logits.detach().clone().requires_grad_(True)
    w = None if weights is None else weights.detach().clone().requires_grad_(grad_weights)
    loss = fn(z, w)
    cot = _cotangent(targets, reduction).to(loss.dtype)
    inputs = [z] + ([w] if grad_weights else [])
    grads = torch.autograd.grad((loss * cot).sum(), inputs)
    return [loss] + list(grads)


def _ref(logits, targets, weights, reduction="mean", grad_weights=False):
    v = logits.shape[-1]

    def fn(z, w):
        loss = weighted_ce_ref(z.reshape(-1, v), targets.reshape(-1),
                               None if w is None else w.reshape(-1), reduction=reduction)
        return loss.reshape(targets.shape) if reduction == "none" else loss

    return _loss_and_grads(fn, logits, weights, targets, reduction, grad_weights)


def _api(logits, targets, weights, reduction="mean", grad_weights=False, backend="auto",
         inplace=False):
    def fn(z, w):
        return remit_ext.weighted_cross_entropy(z, targets, w, reduction=reduction,
                                                inplace_backward=inplace, backend=backend)

    return _loss_and_grads(fn, logits, weights, targets, reduction, grad_weights)


def _check_against_ref(logits, targets, weights, *, backend, reduction="mean",
                       grad_weights=False):
    truth = _ref(logits.double(), targets, None if weights is None else weights.double(),
                 reduction, grad_weights)
    base = _ref(logits, targets, weights, reduction, grad_weights)
    got = _api(logits, targets, weights, reduction, grad_weights, backend)
    for name, g, t, b in zip(("loss", "grad", "grad_weights"), got, truth, base):
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(t.shape)}"
        assert_close_to_truth(g, t, b, name=f"{backend}/{name}")
    assert got[0].dtype == torch.float32 or logits.dtype == torch.float64
    assert got[1].dtype == logits.dtype, "gradient must come back in the logits' dtype"
    if grad_weights:
        assert got[2].dtype == weights.dtype, "weights gradient in the weights' dtype"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_reference(backend, dtype, shape, weighted):
    logits, targets, weights = make_inputs(shape, dtype, seed=hash(shape) % 1000 + 200)
    _check_against_ref(logits, targets, weights if weighted else None, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_reductions(backend, reduction, weighted):
    logits, targets, weights = make_inputs((4, 37, 129), torch.float32, seed=50)
    got = _check_against_ref(logits, targets, weights if weighted else None, backend=backend,
                             reduction=reduction)
    if reduction == "none":
        assert got[0].shape == targets.shape
        assert bool((got[0][targets == IGNORE] == 0).all())
    else:
        assert got[0].dim() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_gradient(backend, dtype, reduction):
    logits, targets, weights = make_inputs((3, 23, 257), dtype, seed=51)
    got = _check_against_ref(logits, targets, weights, backend=backend, reduction=reduction,
                             grad_weights=True)
    assert bool((got[2][targets == IGNORE] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_in_low_precision(backend):
    logits, targets, weights = make_inputs((2, 31, 513), torch.bfloat16, seed=52,
                                           weight_dtype=torch.bfloat16)
    _check_against_ref(logits, targets, weights, backend=backend, grad_weights=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_inplace_backward(backend, dtype, weighted):
    logits, targets, weights = make_inputs((2, 30, 1025), dtype, seed=53)
    weights = weights if weighted else None
    expected = _api(logits, targets, weights, backend=backend)
    z = logits.clone().requires_grad_(True)
    buf = z.detach()
    loss = remit_ext.weighted_cross_entropy(z, targets, weights, inplace_backward=True,
                                            backend=backend)
    assert torch.equal(loss, expected[0])
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.data_ptr() == buf.data_ptr(), "the gradient must live in the logits buffer"
    assert torch.equal(grad, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fp64(backend, reduction):
    logits, targets, weights = make_inputs((2, 4, 5), torch.float64, seed=54, ignore_frac=0.25,
                                           weight_dtype=torch.float64)
    z = logits.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)

    def f(x, wt):
        return remit_ext.weighted_cross_entropy(x, targets, wt, reduction=reduction,
                                                backend=backend)

    assert torch.autograd.gradcheck(f, (z, w), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grad(backend, reduction):
    logits, targets, weights = make_inputs((2, 9, 33), torch.float32, seed=55)
    targets = torch.full_like(targets, IGNORE)
    loss, grad, grad_w = _api(logits, targets, weights, reduction, grad_weights=True,
                              backend=backend)
    assert not bool(torch.isnan(loss).any()) and bool((loss == 0).all())
    assert bool((grad == 0).all()) and bool((grad_w == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_divides_by_valid_count_not_weight_sum(backend, dtype):
    logits, targets, _ = make_inputs((3, 40, 129), dtype, seed=56)
    twos = torch.full(targets.shape, 2.0, device=DEVICE)
    plain = remit_ext.weighted_cross_entropy(logits, targets, backend=backend)
    doubled = remit_ext.weighted_cross_entropy(logits, targets, twos, backend=backend)
    # Scaling by 2 is exact in binary floating point: the loss is exactly twice the unweighted.
    assert torch.equal(doubled, 2 * plain), (float(doubled), float(plain))
    n_valid = int((targets != IGNORE).sum())
    total = remit_ext.weighted_cross_entropy(logits, targets, twos, reduction="sum",
                                             backend=backend)
    torch.testing.assert_close(doubled, total / n_valid, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unweighted_matches_torch_cross_entropy(backend):
    logits, targets, _ = make_inputs((3, 21, 257), torch.float64, seed=57)
    got = remit_ext.weighted_cross_entropy(logits, targets, backend=backend)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), targets.reshape(-1),
                                                 ignore_index=IGNORE)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_confident_rows_target_gradient(backend):
    # p(target) -> 1: the target-class gradient w (p_y - 1) ~ -1e-8 must come from expm1(a).
    logits, targets, weights = make_inputs((1, 64, 1025), torch.float32, seed=58)
    logits = confident_rows(logits, targets)
    got = _api(logits, targets, weights, backend=backend)[1]
    truth = _ref(logits.double(), targets, weights.double())[1]
    assert_target_gradient_accurate(got, truth, targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "+inf"])
def test_nan_and_inf_propagate(backend, bad):
    logits, targets, weights = make_inputs((1, 6, 17), torch.float32, seed=59, ignore_frac=0.0)
    logits[0, 2, 3] = float(bad.lstrip("+"))
    loss, grad = _api(logits, targets, weights, "none", backend=backend)
    t_loss, t_grad = _ref(logits.double(), targets, weights.double(), "none")
    assert torch.equal(torch.isnan(loss), torch.isnan(t_loss)) and bool(torch.isnan(loss).any())
    assert torch.equal(torch.isnan(grad), torch.isnan(t_grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_of_one(backend):
    logits, targets, weights = make_inputs((5, 1), torch.float32, seed=60, ignore_frac=0.0)
    targets = torch.zeros_like(targets)
    loss, grad = _api(logits, targets, weights, backend=backend)
    assert float(loss.detach()) == 0.0 and bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_targets_are_read_by_position(backend):
    """Targets that are a strided view (a column of a [N, 3] tensor, which reshape(-1) keeps as
    a view): every backend reads target i at position i, in the statistics and the gradient
    pass alike (the Triton kernels once read them as if packed)."""
    g = torch.Generator().manual_seed(11)
    logits = make_logits((12, 37), torch.float32, generator=g)
    table = make_targets((12, 3), 37, ignore_frac=0.2, generator=g)
    targets = table[:, 1]
    assert not targets.is_contiguous()
    weights = (0.5 + torch.rand(12, dtype=torch.float64, generator=g)).to(DEVICE)

    def run(fn, y):
        z = logits.detach().clone().requires_grad_(True)
        loss = fn(z, y)
        return [loss] + list(torch.autograd.grad(loss, z))

    got = run(lambda z, y: remit_ext.weighted_cross_entropy(z, y, weights, backend=backend),
              targets)
    want = run(lambda z, y: weighted_ce_ref(z.double(), y, weights), targets.contiguous())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    stats = remit_ext.token_stats(logits, targets, scorer_logits=logits.flip(-1),
                                  backend=backend)
    want_stats = remit_ext.token_stats(logits.double(), targets.contiguous(),
                                       scorer_logits=logits.flip(-1).double(), backend="torch")
    torch.testing.assert_close(stats.logprob.double(), want_stats.logprob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.scorer_logprob.double(), want_stats.scorer_logprob,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [5e3, -5e3])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_large_logits_gradient_keeps_fp32_accuracy(backend, offset, inplace):
    # fp32 logits ~ +-5e3 (spacing 2^-11): the saved lse = m + log s is rounded by up to
    # 2^-12 ~ 2.4e-4, and e^{x - lse} would carry that as a relative error of every p_v. The
    # kernels recover the rounding from the saved log-prob (an O(1) number, ~eps |a| off), so
    # the exponent is off by ~eps (|a| + log V), eps = 2^-23, as in the torch backend's
    # log_softmax: checked per row against the row's largest entry off the target column
    # (test_token_stats, test_large_logits_keep_fp32_accuracy, has the derivation). Per-token coefficients differ
    # (weights x a random cotangent), so the correction must be the row's own.
    logits, targets, weights = make_inputs((2, 30, 1025), torch.float32, seed=57)
    logits = logits + offset
    V = logits.shape[-1]
    cot = _cotangent(targets, "none")
    z64 = logits.double().requires_grad_(True)
    loss64 = weighted_ce_ref(z64.reshape(-1, V), targets.reshape(-1), weights.double().reshape(-1),
                             reduction="none").reshape(targets.shape)
    (want,) = torch.autograd.grad((loss64 * cot).sum(), z64)
    z = logits.clone().requires_grad_(True)
    loss = remit_ext.weighted_cross_entropy(z, targets, weights, reduction="none",
                                            inplace_backward=inplace and backend != "torch",
                                            backend=backend)
    (grad,) = torch.autograd.grad((loss * cot.float()).sum(), z)
    valid = targets != IGNORE
    eps = torch.finfo(torch.float32).eps
    a = loss64.detach() / weights.double()  # -log p(y)
    scale = (a.abs() + math.log(V)) * eps
    err = float(((loss.double() - loss64.detach()).abs() / (weights.double() * scale))[valid].max())
    assert err <= 4, f"{backend}/loss: error {err:.1f} eps (|a| + log V)"
    err = off_target_error(grad, want, targets, a)
    assert err <= 8, f"{backend}/grad: error {err:.1f} eps (|a| + log V) x the row's largest"
    assert bool((grad[~valid] == 0).all())
