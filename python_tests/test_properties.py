"""Property tests over random problems (hypothesis): N in [1, 40], V in [1, 300], every working
dtype, any fraction of ignored positions, random packing and clip width. The kernels stay within
the comparison rule of the references, and the invariants of METHODS.md sections 1-2 hold."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import remit_ext
from remit_ext.reference import remit_loss_ref, token_stats_ref
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS, LOW_DTYPES

# derandomize: the same examples on every run, so a failure reproduces and nothing is flaky.
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)

# Per-element relative rounding of a gradient written in each dtype (a few units in the last
# place), and the spacing of its subnormals, which bounds the absolute error of tiny entries.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 4e-3}
GRAD_TINY = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


@st.composite
def problems(draw):
    """Policy logits [N, V], scorer logits, targets, cu_seqlens (or None), eps."""
    n = draw(st.integers(1, 40))
    v = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(LOW_DTYPES))
    ignore_frac = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    eps = draw(st.floats(0.01, 0.9))
    cuts = draw(st.lists(st.integers(0, n), max_size=3))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, dtype=torch.float64, generator=g) * scale
    scorer = 1.3 * logits + 2.0 * torch.randn(n, v, dtype=torch.float64, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    cu = None
    if cuts:
        cu = torch.tensor([0] + sorted(cuts) + [n], device=DEVICE)
    return (logits.to(DEVICE, dtype), scorer.to(DEVICE, dtype), targets.to(DEVICE), cu, eps)


def _remit_ref(logits, scorer, targets, cu, eps):
    z = logits.detach().clone().requires_grad_(True)
    loss, w, _ = remit_loss_ref(z, targets, scorer_logits=scorer, cu_seqlens=cu, eps=eps)
    (grad,) = torch.autograd.grad(loss, z)
    return loss, grad, w


def _remit_api(logits, scorer, targets, cu, eps, backend):
    z = logits.detach().clone().requires_grad_(True)
    out = remit_ext.remit_loss(z, targets, scorer_logits=scorer, cu_seqlens=cu, eps=eps,
                               return_details=True, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, z)
    return out.loss.detach(), grad, out.weights


def _assert_rows_sum_to_zero(grad, targets):
    """softmax - onehot sums to 0 over the vocabulary; ignored rows are 0 everywhere."""
    valid = targets != IGNORE
    assert bool((grad[~valid] == 0).all())
    g = grad[valid].double()
    bound = GRAD_RTOL[grad.dtype] * g.abs().sum(-1) + grad.shape[-1] * GRAD_TINY[grad.dtype]
    excess = g.sum(-1).abs() - bound
    assert bool((excess <= 0).all()), f"row sums {g.sum(-1).abs().max():.3e} exceed the bound"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@PROPERTY
@given(problem=problems())
def test_remit_loss_matches_reference(backend, problem):
    logits, scorer, targets, cu, eps = problem
    truth = _remit_ref(logits.double(), scorer.double(), targets, cu, eps)
    base = _remit_ref(logits, scorer, targets, cu, eps)
    got = _remit_api(logits, scorer, targets, cu, eps, backend)
    for name, g, t, b in zip(("loss", "grad", "weights"), got, truth, base):
        assert_close_to_truth(g, t, b, name=f"{backend}/{name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@PROPERTY
@given(problem=problems(), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_token_stats_matches_reference(backend, problem, temperature):
    logits, _, targets, _, _ = problem
    cots = torch.randn(3, targets.shape[0], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(targets.shape[0]))

    def run(fn, x):
        z = x.detach().clone().requires_grad_(True)
        stats = fn(z)
        total = sum((s * c.to(s.dtype)).sum() for s, c in zip(stats, cots))
        return list(stats) + list(torch.autograd.grad(total, z))

    def ref(z):
        return token_stats_ref(z, targets, temperature=temperature)

    def api(z):
        out = remit_ext.token_stats(z, targets, entropy=True, temperature=temperature,
                                    backend=backend)
        return out.lse, out.logprob, out.entropy

    truth, base, got = run(ref, logits.double()), run(ref, logits), run(api, logits)
    for name, g, t, b in zip(("lse", "logprob", "entropy", "grad"), got, truth, base):
        assert_close_to_truth(g, t, b, name=f"{backend}/{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(problem=problems())
def test_token_stats_bounds(backend, problem):
    # lse >= max logit, log-prob <= 0, 0 <= entropy <= log V (valid rows); 0 on ignored rows.
    logits, _, targets, _, _ = problem
    out = remit_ext.token_stats(logits, targets, entropy=True, backend=backend)
    valid = targets != IGNORE
    z = logits.float()
    tol = 1e-5 * (1 + z.abs().amax(-1))
    assert bool((out.lse >= z.amax(-1) - tol)[valid].all())
    assert bool((out.logprob <= 0)[valid].all())
    ent = out.entropy[valid]
    assert bool((ent >= -1e-5).all())
    assert bool((ent <= math.log(logits.shape[-1]) + 1e-4).all())
    for s in (out.lse, out.logprob, out.entropy):
        assert bool((s[~valid] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(problem=problems())
def test_weights_lie_in_the_clip_band(backend, problem):
    logits, scorer, targets, cu, eps = problem
    out = remit_ext.remit_loss(logits, targets, scorer_logits=scorer, cu_seqlens=cu, eps=eps,
                               return_details=True, backend=backend)
    valid = targets != IGNORE
    w = out.weights.double()
    assert bool((w[~valid] == 0).all())
    assert bool((w[valid] >= 1 - eps - 1e-6).all()) and bool((w[valid] <= 1 + eps + 1e-6).all())
    assert not bool(torch.isnan(out.loss))


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(problem=problems())
def test_logits_gradient_rows_sum_to_zero(backend, problem):
    logits, scorer, targets, cu, eps = problem
    _assert_rows_sum_to_zero(_remit_api(logits, scorer, targets, cu, eps, backend)[1], targets)
    z = logits.clone().requires_grad_(True)
    w = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss = remit_ext.weighted_cross_entropy(z, targets, w, backend=backend)
    _assert_rows_sum_to_zero(torch.autograd.grad(loss, z)[0], targets)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(problem=problems(), c=st.floats(0.1, 4.0))
def test_losses_relative_to_plain_cross_entropy(backend, problem, c):
    # Weights in [1 - eps, 1 + eps] move the loss by at most eps * mean |a| from plain CE;
    # constant weights c scale it by c (the 'mean' divides by the valid count, not sum w).
    logits, scorer, targets, cu, eps = problem
    ce = remit_ext.weighted_cross_entropy(logits, targets, backend=backend).double()
    remit = remit_ext.remit_loss(logits, targets, scorer_logits=scorer, cu_seqlens=cu, eps=eps,
                                 backend=backend).double()
    mean_abs_a = ce  # -a >= 0, so mean |a| over the valid tokens is the plain CE
    assert abs(float(remit - ce)) <= eps * float(mean_abs_a) + 1e-5 * (1 + float(ce))
    weights = torch.full(targets.shape, c, dtype=torch.float32, device=DEVICE)
    scaled = remit_ext.weighted_cross_entropy(logits, targets, weights, backend=backend)
    assert abs(float(scaled) - c * float(ce)) <= 1e-5 * (1 + c * float(ce))
