"""``inplace_backward=True`` writes the logits gradient into the logits buffer. Anything else that
still needs those logits afterwards -- an upstream op that saved its output (tanh, exp,
sigmoid producing the logits), a second loss on the same logits built before this one (a
z-loss), a second backward through a retained graph -- must then fail with autograd's "modified
by an inplace operation" error, never read the gradient as logits and give a wrong number. And
where nothing else needs them (a leaf, a linear head), the gradient stays exact.

Every case ends in the fp64 reference's gradient or that error; the kernel backends (the torch
backend ignores the flag, so it gets the gradient every time).
"""

import pytest
import torch

import remit_ext
from remit_ext.reference import pg_loss_ref, remit_loss_ref, weighted_ce_ref
from cases import IGNORE
from conftest import BACKENDS, DEVICE

N, V, D = 13, 29, 6
MODIFIED = r"modified by an inplace operation"


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = IGNORE
    return dict(
        x=torch.randn(N, V, generator=g, dtype=torch.float64).to(DEVICE),
        scorer=torch.randn(N, V, generator=g, dtype=torch.float64).to(DEVICE),
        adv=torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE),
        h=torch.randn(N, D, generator=g, dtype=torch.float64).to(DEVICE),
        w=torch.randn(V, D, generator=g, dtype=torch.float64).to(DEVICE),
        y=y.to(DEVICE),
    )


def _loss(name, z, d, backend, inplace):
    if name == "weighted_cross_entropy":
        return remit_ext.weighted_cross_entropy(z, d["y"], backend=backend,
                                                inplace_backward=inplace)
    if name == "remit_loss":
        return remit_ext.remit_loss(z, d["y"], scorer_logits=d["scorer"].to(z.dtype),
                                    backend=backend, inplace_backward=inplace)
    return remit_ext.policy_gradient_loss(z, d["y"], d["adv"].to(z.dtype), backend=backend,
                                          inplace_backward=inplace)


def _ref_loss(name, z, d):
    if name == "weighted_cross_entropy":
        return weighted_ce_ref(z, d["y"])
    if name == "remit_loss":
        return remit_loss_ref(z, d["y"], scorer_logits=d["scorer"])[0]
    return pg_loss_ref(z, d["y"], d["adv"])


UPSTREAM = {  # ops whose backward reads their own output (the logits)
    "tanh": torch.tanh,
    "exp": lambda x: torch.exp(x / 4),
    "sigmoid": torch.sigmoid,
}
LOSSES = ["weighted_cross_entropy", "remit_loss", "policy_gradient_loss"]


def _grad_or_error(run, want):
    """run() -> gradient: assert it equals want, or that run raised the in-place error."""
    try:
        got = run()
    except RuntimeError as err:
        assert MODIFIED in str(err), err
        return "error"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    return "exact"


@pytest.mark.parametrize("upstream", UPSTREAM)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_op_that_saved_the_logits(backend, name, upstream):
    d = _data(1)
    f = UPSTREAM[upstream]
    x = d["x"].clone().requires_grad_()
    (want,) = torch.autograd.grad(_ref_loss(name, f(x), d), x)

    def run():
        x32 = d["x"].float().requires_grad_()
        _loss(name, f(x32), d, backend, inplace=True).backward()
        return x32.grad

    outcome = _grad_or_error(run, want)
    if backend == "torch":
        assert outcome == "exact"


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_loss_built_before(backend, name):
    # A z-loss on the same logits, built first: its backward runs after this loss's and reads
    # the logits (logsumexp saves its input).
    d = _data(2)
    x = d["x"].clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.logsumexp(x, -1).pow(2).mean()
                                  + _ref_loss(name, x, d), x)

    def run():
        z = d["x"].float().requires_grad_()
        zloss = torch.logsumexp(z, -1).pow(2).mean()
        (zloss + _loss(name, z, d, backend, inplace=True)).backward()
        return z.grad

    outcome = _grad_or_error(run, want)
    if backend == "torch":
        assert outcome == "exact"


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_through_retained_graph(backend, name):
    d = _data(3)
    x = d["x"].clone().requires_grad_()
    (want,) = torch.autograd.grad(_ref_loss(name, x, d), x)

    def run():
        z = d["x"].float().requires_grad_()
        loss = _loss(name, z, d, backend, inplace=True)
        (first,) = torch.autograd.grad(loss, z, retain_graph=True)
        first = first.clone()
        torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-7)
        (second,) = torch.autograd.grad(loss, z)
        return second

    outcome = _grad_or_error(run, want)
    if backend == "torch":
        assert outcome == "exact"


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_safe_uses_stay_exact(backend, name):
    # Nothing else reads the logits: a leaf, and a linear head (mm saves its inputs, not its
    # output). The in-place write is then invisible and the gradient exact.
    d = _data(4)
    x = d["x"].clone().requires_grad_()
    (want,) = torch.autograd.grad(_ref_loss(name, x, d), x)
    z = d["x"].float().requires_grad_()
    _loss(name, z, d, backend, inplace=True).backward()
    torch.testing.assert_close(z.grad.double(), want, rtol=1e-5, atol=1e-7)

    h, w = d["h"].clone().requires_grad_(), d["w"].clone().requires_grad_()
    want_h, want_w = torch.autograd.grad(_ref_loss(name, h @ w.T, d), (h, w))
    h32, w32 = d["h"].float().requires_grad_(), d["w"].float().requires_grad_()
    _loss(name, h32 @ w32.T, d, backend, inplace=True).backward()
    torch.testing.assert_close(h32.grad.double(), want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w32.grad.double(), want_w, rtol=1e-5, atol=1e-6)
