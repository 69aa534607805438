"""The fused ReMiT loss, every backend against remit_loss_ref: loss, weights, diagnostics and the
policy-logits gradient, in fp32/bf16/fp16 (fp64 truth, fp32-math baseline) and fp64 gradcheck."""

import math

import pytest
import torch

import remit_ext
from remit_ext.reference import remit_loss_ref
from remit_ext.testing import assert_close_to_truth
from cases import (IGNORE, SHAPES, assert_target_gradient_accurate, confident_rows, make_pair,
                   off_target_error)
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS, LOW_DTYPES


def _flat_offsets(targets):
    """The reference's cu_seqlens for the API's default segmentation (rows of targets)."""
    if targets.dim() < 2:
        return None
    t = targets.shape[-1]
    return torch.arange(targets.numel() // t + 1, device=targets.device) * t


def _cotangent(targets, reduction, seed=1):
    if reduction != "none":
        return torch.ones((), device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(targets.shape, generator=g, dtype=torch.float64).to(DEVICE)


def _ref(logits, scorer, targets, cu, reduction, detach=True, scorer_logprobs=None):
    z = logits.detach().clone().requires_grad_(True)
    flat = z.reshape(-1, z.shape[-1])
    loss, w, diag = remit_loss_ref(
        flat, targets.reshape(-1),
        scorer_logits=None if scorer is None else scorer.reshape(flat.shape),
        scorer_logprobs=None if scorer_logprobs is None else scorer_logprobs.reshape(-1),
        cu_seqlens=cu, reduction=reduction, detach_weights=detach)
    cot = _cotangent(targets, reduction).reshape(loss.shape).to(loss.dtype)
    (grad,) = torch.autograd.grad((loss * cot).sum(), z)
    return loss, grad, w, torch.stack(tuple(diag))


def _api(logits, scorer, targets, cu, reduction, backend, detach=True, scorer_logprobs=None,
         inplace=False):
    z = logits.detach().clone().requires_grad_(True)
    out = remit_ext.remit_loss(
        z, targets, scorer_logits=scorer, scorer_logprobs=scorer_logprobs, cu_seqlens=cu,
        reduction=reduction, detach_weights=detach, inplace_backward=inplace,
        return_details=True, backend=backend)
    cot = _cotangent(targets, reduction).to(out.loss.dtype)
    (grad,) = torch.autograd.grad((out.loss * cot).sum(), z)
    return out.loss, grad, out.weights, torch.stack(tuple(out.diagnostics))


def _check_against_ref(logits, scorer, targets, *, backend, reduction="mean", cu=None,
                       detach=True, use_logprobs=False, inplace=False):
    ref_cu = cu if cu is not None else _flat_offsets(targets)
    s_lp = None
    if use_logprobs:
        s_lp = remit_ext.token_stats(scorer, targets, backend="torch").logprob
        scorer = None
    truth = _ref(logits.double(), None if scorer is None else scorer.double(), targets, ref_cu,
                 reduction, detach, None if s_lp is None else s_lp.double())
    base = _ref(logits, scorer, targets, ref_cu, reduction, detach, s_lp)
    got = _api(logits, scorer, targets, cu, reduction, backend, detach, s_lp, inplace)
    for i, name in enumerate(("loss", "grad", "weights", "diagnostics")):
        t = truth[i].reshape(got[i].shape)
        b = base[i].reshape(got[i].shape)
        assert_close_to_truth(got[i], t, b, name=f"{backend}/{name}")
    assert got[1].dtype == logits.dtype, "gradient must come back in the logits' dtype"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape):
    logits, scorer, targets = make_pair(shape, dtype, seed=hash(shape) % 1000)
    _check_against_ref(logits, scorer, targets, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    logits, scorer, targets = make_pair((4, 37, 129), torch.float32, seed=3)
    loss = _check_against_ref(logits, scorer, targets, backend=backend, reduction=reduction)[0]
    if reduction == "none":
        assert loss.shape == targets.shape
        assert bool((loss[targets == IGNORE] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precomputed_scorer_logprobs(backend, dtype):
    logits, scorer, targets = make_pair((3, 41, 257), dtype, seed=4)
    _check_against_ref(logits, scorer, targets, backend=backend, use_logprobs=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences(backend):
    # Packed documents over 2-D logits, with an empty document and one whose tokens are all
    # ignored: centering must stay inside each document and the empty ones contribute nothing.
    logits, scorer, targets = make_pair((90, 301), torch.float32, seed=5)
    targets[40:55] = IGNORE
    cu = torch.tensor([0, 12, 12, 40, 55, 89, 90], device=DEVICE, dtype=torch.int32)
    _check_against_ref(logits, scorer, targets, backend=backend, cu=cu)
    # The segmentation matters: one sequence gives different weights.
    packed = remit_ext.remit_loss(logits, targets, scorer_logits=scorer, cu_seqlens=cu,
                                  return_details=True, backend=backend).weights
    single = remit_ext.remit_loss(logits, targets, scorer_logits=scorer, return_details=True,
                                  backend=backend).weights
    assert not torch.allclose(packed, single)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_detached_weights(backend, dtype):
    logits, scorer, targets = make_pair((2, 50, 129), dtype, seed=6)
    got = _check_against_ref(logits, scorer, targets, backend=backend, detach=False)
    detached = _api(logits, scorer, targets, None, "mean", backend)[1]
    assert not torch.allclose(got[1].float(), detached.float()), "option must change the gradient"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inplace_backward(backend):
    logits, scorer, targets = make_pair((2, 30, 1025), torch.bfloat16, seed=7)
    expected = _api(logits, scorer, targets, None, "mean", backend)[1]
    z = logits.clone().requires_grad_(True)
    buf = z.detach()
    loss = remit_ext.remit_loss(z, targets, scorer_logits=scorer, inplace_backward=True,
                                backend=backend)
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.data_ptr() == buf.data_ptr(), "the gradient must live in the logits buffer"
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_confident_rows_target_gradient(backend):
    # p(target) -> 1: the target-class gradient p_y - 1 ~ -2e-8 must come from expm1(a) with an
    # accurate a, not from a rounded p_y: fp32 PyTorch (the torch backend) returns exactly 0 here.
    logits, scorer, targets = make_pair((1, 64, 1025), torch.float32, seed=8)
    logits = confident_rows(logits, targets)
    got = _api(logits, scorer, targets, None, "mean", backend)[1]
    truth = _ref(logits.double(), scorer.double(), targets, _flat_offsets(targets), "mean")[1]
    assert_target_gradient_accurate(got, truth, targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    logits, scorer, targets = make_pair((1, 12, 40), torch.float32, seed=9, ignore_frac=0.0)
    logits = logits * 3e3  # large magnitudes: max-subtraction must keep everything finite
    targets = targets.clone()
    z = logits.clone()
    # Row 0: everything -inf but the target -> a = 0, zero gradient, loss contribution 0.
    z[0, 0] = float("-inf")
    z[0, 0, targets[0, 0]] = 1.0
    _check_against_ref(z, scorer, targets, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "+inf"])
def test_nan_and_inf_propagate(backend, bad):
    logits, scorer, targets = make_pair((1, 6, 17), torch.float32, seed=10, ignore_frac=0.0)
    logits[0, 2, 3] = float(bad.lstrip("+"))
    loss, grad, _, _ = _api(logits, scorer, targets, None, "none", backend)
    truth = _ref(logits.double(), scorer.double(), targets, _flat_offsets(targets), "none")
    # NaN stays NaN and is never invented: the NaN pattern equals the reference's.
    assert torch.equal(torch.isnan(loss), torch.isnan(truth[0]).reshape(loss.shape))
    assert bool(torch.isnan(loss).any())
    assert torch.equal(torch.isnan(grad), torch.isnan(truth[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_loss_and_grad(backend):
    logits, scorer, targets = make_pair((2, 9, 33), torch.float32, seed=11)
    targets = torch.full_like(targets, IGNORE)
    loss, grad, w, diag = _api(logits, scorer, targets, None, "mean", backend)
    assert float(loss.detach()) == 0.0 and not bool(torch.isnan(loss))
    assert bool((grad == 0).all()) and bool((w == 0).all()) and bool((diag == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_of_one(backend):
    logits, scorer, targets = make_pair((5, 1), torch.float32, seed=12, ignore_frac=0.0)
    targets = torch.zeros_like(targets)
    loss, grad, _, _ = _api(logits, scorer, targets, None, "mean", backend)
    assert float(loss.detach()) == 0.0 and bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_eps_sets_the_clip_band(backend, eps):
    logits, scorer, targets = make_pair((2, 40, 65), torch.float32, seed=13)
    out = remit_ext.remit_loss(logits, targets, scorer_logits=scorer, eps=eps,
                               return_details=True, backend=backend)
    w = out.weights[targets != IGNORE]
    assert float(w.min()) >= 1 - eps - 1e-6 and float(w.max()) <= 1 + eps + 1e-6
    truth = remit_loss_ref(logits.double().reshape(-1, 65), targets.reshape(-1),
                           scorer_logits=scorer.double().reshape(-1, 65),
                           cu_seqlens=_flat_offsets(targets), eps=eps)
    assert_close_to_truth(out.weights.reshape(-1), truth[1],
                          remit_loss_ref(logits.reshape(-1, 65), targets.reshape(-1),
                                         scorer_logits=scorer.reshape(-1, 65),
                                         cu_seqlens=_flat_offsets(targets), eps=eps)[1],
                          name="weights")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_non_detached_fp64(backend):
    # With detach_weights=False the analytic gradient is the true derivative of the loss value,
    # so finite differences must agree (random data keeps every delta_hat off the clip corners).
    logits, scorer, targets = make_pair((2, 4, 5), torch.float64, seed=14, ignore_frac=0.25)
    z = logits.clone().requires_grad_(True)

    def f(x):
        return remit_ext.remit_loss(x, targets, scorer_logits=scorer, detach_weights=False,
                                    backend=backend)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-8)


def test_module_wraps_functional():
    logits, scorer, targets = make_pair((2, 10, 33), torch.float32, seed=15)
    module = remit_ext.ReMiTLoss(eps=0.3, return_details=True)
    out = module(logits, targets, scorer_logits=scorer)
    ref = remit_ext.remit_loss(logits, targets, scorer_logits=scorer, eps=0.3, return_details=True)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.weights, ref.weights)
    assert "eps=0.3" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [5e3, -5e3])
def test_large_logits_gradient_keeps_fp32_accuracy(backend, offset):
    # Policy and scorer logits ~ +-5e3 in fp32: the saved lse is rounded by up to 2^-12 ~ 2.4e-4,
    # a relative error of every e^{x - lse} unless the backward recovers it from the saved
    # log-prob; then the exponent is off by ~eps (|a| + log V), eps = 2^-23 (derivation:
    # test_token_stats, test_large_logits_keep_fp32_accuracy). Checked per row against the
    # row's largest entry; the loss as eps (|a| + log V) per token.
    logits, scorer, targets = make_pair((2, 30, 1025), torch.float32, seed=58)
    logits, scorer = logits + offset, scorer + offset
    V = logits.shape[-1]
    truth = _ref(logits.double(), scorer.double(), targets, _flat_offsets(targets), "none")
    got = _api(logits, scorer, targets, None, "none", backend)
    valid = targets != IGNORE
    eps = torch.finfo(torch.float32).eps
    a = remit_ext.reference.target_logprob_ref(logits.double().reshape(-1, V),
                                               targets.reshape(-1)).reshape(targets.shape)
    scale = (a.abs() + math.log(V)) * eps
    loss64 = truth[0].detach().reshape(targets.shape)
    err = float(((got[0].double() - loss64).abs() / scale)[valid].max())
    assert err <= 4, f"{backend}/loss: error {err:.1f} eps (|a| + log V)"
    err = off_target_error(got[1], truth[1], targets, a)
    assert err <= 8, f"{backend}/grad: error {err:.1f} eps (|a| + log V) x the row's largest"
