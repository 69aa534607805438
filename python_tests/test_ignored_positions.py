"""Ignored positions influence nothing (METHODS.md: an invalid position gets weight 0, loss 0,
gradient 0 and never counts), whatever they hold: a NaN or inf logit row, weight, scorer
log-prob or hidden state at a position whose target is ignore_index must leave the loss, every
gradient, the ReMiT weights and the diagnostics exactly what the same call gives with finite
values there. Every backend, against the fp64 reference of the clean inputs.

The bug this guards against is "multiply by a 0 mask" (0 * NaN = NaN, 0 * inf = NaN) where
"select with the mask" (torch.where) was meant, in a forward or in a backward.
"""

import pytest
import torch

import remit_ext
from remit_ext.reference import (kd_loss_ref, pg_loss_ref, remit_loss_ref, remit_weights_ref,
                                 rho1_loss_ref, token_stats_ref, weighted_ce_ref)
from cases import IGNORE
from conftest import BACKENDS, DEVICE, KD_BACKENDS

B, T, V, D = 2, 9, 37, 8
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 2] = y[1, 5] = y[1, 6] = IGNORE
    d = dict(
        logits=torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2,
        scorer=torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2,
        weights=torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
        adv=torch.randn(B, T, generator=g, dtype=torch.float64),
        old=-torch.rand(B, T, generator=g, dtype=torch.float64) * 4,
        slp=-torch.rand(B, T, generator=g, dtype=torch.float64) * 4,
        hidden=torch.randn(B, T, D, generator=g, dtype=torch.float64),
        s_hidden=torch.randn(B, T, D, generator=g, dtype=torch.float64),
        head=torch.randn(V, D, generator=g, dtype=torch.float64),
        s_head=torch.randn(V, D, generator=g, dtype=torch.float64),
    )
    d = {k: v.to(DEVICE) for k, v in d.items()}
    d["targets"] = y.to(DEVICE)
    return d


def _poisoned(d, names, value):
    """A copy of d with every ignored position of the tensors `names` set to `value` (a whole
    logits / hidden row, one element of it for -inf so the row's softmax stays defined...
    and the rest of the row finite: both patterns must be harmless)."""
    bad = dict(d)
    ignored = d["targets"] == IGNORE
    for name in names:
        x = d[name].clone()
        if x.dim() == 3:
            row = x[ignored]
            row[:, 0] = value  # one element
            row[1:] = value  # and whole rows
            x[ignored] = row
        else:
            x[ignored] = value
        bad[name] = x
    return bad


def _run(fn, d, leaves, dtype):
    """(outputs, grads of the leaves) of fn on d cast to dtype; the backward of their sum."""
    d = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in d.items()}
    for k in leaves:
        d[k] = d[k].detach().requires_grad_()
    out = fn(d)
    outs = out if isinstance(out, tuple) else (out,)
    diff = [o for o in outs if o.requires_grad]
    torch.autograd.backward([o.sum() for o in diff])
    return [o.detach().double() for o in outs], [d[k].grad.double() for k in leaves]


def _check(fn, ref_fn, names, leaves, backend, poison):
    d = _data(hash((tuple(names), poison)) % 1000)
    got, got_g = _run(fn(backend), _poisoned(d, names, POISONS[poison]), leaves, torch.float32)
    want, want_g = _run(ref_fn, d, leaves, torch.float64)
    for i, (g, w) in enumerate(zip(got + got_g, want + want_g)):
        assert bool(torch.isfinite(g).all()), f"{backend}: output/grad {i} not finite"
        torch.testing.assert_close(g.reshape(-1), w.reshape(-1), rtol=2e-4, atol=2e-5,
                                   msg=lambda m, i=i: f"{backend}: output/grad {i}: {m}")


def _flat(d, k):
    return d[k].reshape(-1, d[k].shape[-1]) if d[k].dim() == 3 else d[k].reshape(-1)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_at_ignored_position(backend, poison):
    def fn(b):
        return lambda d: remit_ext.weighted_cross_entropy(d["logits"], d["targets"],
                                                          d["weights"], backend=b)

    def ref(d):
        return weighted_ce_ref(_flat(d, "logits"), _flat(d, "targets"), _flat(d, "weights"))

    _check(fn, ref, ["weights"], ["logits", "weights"], backend, poison)


LOSSES = {
    "token_stats": (
        lambda b: lambda d: tuple(remit_ext.token_stats(d["logits"], d["targets"], entropy=True,
                                                        backend=b)[:3]),
        lambda d: token_stats_ref(_flat(d, "logits"), _flat(d, "targets"))),
    "weighted_cross_entropy": (
        lambda b: lambda d: remit_ext.weighted_cross_entropy(d["logits"], d["targets"],
                                                             backend=b),
        lambda d: weighted_ce_ref(_flat(d, "logits"), _flat(d, "targets"))),
    "remit_loss": (
        lambda b: lambda d: remit_ext.remit_loss(d["logits"], d["targets"],
                                                 scorer_logits=d["scorer"], backend=b),
        lambda d: remit_loss_ref(_flat(d, "logits"), _flat(d, "targets"),
                                 scorer_logits=_flat(d, "scorer"), cu_seqlens=_rows(d))[0]),
    "rho1_loss": (
        lambda b: lambda d: remit_ext.rho1_loss(d["logits"], d["targets"],
                                                ref_logits=d["scorer"], backend=b),
        lambda d: rho1_loss_ref(_flat(d, "logits"), _flat(d, "targets"),
                                ref_logits=_flat(d, "scorer"))),
    "kd_loss": (
        lambda b: lambda d: remit_ext.kd_loss(d["logits"], d["scorer"], d["targets"], backend=b),
        lambda d: kd_loss_ref(_flat(d, "logits"), _flat(d, "scorer"), _flat(d, "targets"))),
    "policy_gradient_loss": (
        lambda b: lambda d: remit_ext.policy_gradient_loss(
            d["logits"], d["targets"], d["adv"], old_logprobs=d["old"], backend=b),
        lambda d: pg_loss_ref(_flat(d, "logits"), _flat(d, "targets"), _flat(d, "adv"),
                              old_logprobs=_flat(d, "old"))),
}


def _rows(d):
    return torch.arange(0, B * T + 1, T, device=DEVICE)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_in_ignored_rows(backend, loss, poison):
    if loss == "kd_loss" and backend not in KD_BACKENDS:
        pytest.skip(f"{backend} has no KD kernel")
    fn, ref = LOSSES[loss]
    names = ["logits"] + (["scorer"] if loss in ("remit_loss", "rho1_loss", "kd_loss") else [])
    _check(fn, ref, names, ["logits"], backend, poison)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scorer_logprobs_at_ignored_positions(backend, poison):
    # remit_weights (weights, delta_hat, diagnostics) and remit_loss from precomputed scorer
    # log-probs: a NaN there must not reach the sequence mean of delta.
    def fn(b):
        def f(d):
            a = remit_ext.token_stats(d["logits"], d["targets"], backend=b).logprob.detach()
            w = remit_ext.remit_weights(a, d["slp"], d["targets"], backend=b)
            loss = remit_ext.remit_loss(d["logits"], d["targets"], scorer_logprobs=d["slp"],
                                        backend=b)
            return (w.weights, w.delta_hat, torch.stack(tuple(w.diagnostics)), loss)
        return f

    def ref(d):
        y = _flat(d, "targets")
        a = token_stats_ref(_flat(d, "logits"), y)[1].detach()
        w, dh, diag = remit_weights_ref(a, _flat(d, "slp"), y != IGNORE, cu_seqlens=_rows(d))
        loss = remit_loss_ref(_flat(d, "logits"), y, scorer_logprobs=_flat(d, "slp"),
                              cu_seqlens=_rows(d))[0]
        return (w, dh, torch.stack(tuple(diag)), loss)

    _check(fn, ref, ["slp"], ["logits"], backend, poison)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("method", ["ntp", "remit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_at_padded_positions(backend, method, poison):
    # The fused-linear engine: a padded position's hidden state (often garbage after a padded
    # attention) must not reach the head's gradient (sum over rows of grad_z^T h: 0 * NaN).
    def fn(b):
        def f(d):
            scorer = {} if method == "ntp" else dict(scorer_hidden=d["s_hidden"],
                                                       scorer_weight=d["s_head"])
            return remit_ext.remit_linear_loss(d["hidden"], d["head"], d["targets"],
                                               method=method, chunk_size=8, backend=b,
                                               **scorer)
        return f

    def ref(d):
        z = _flat(d, "hidden") @ d["head"].T
        y = _flat(d, "targets")
        if method == "ntp":
            return weighted_ce_ref(z, y)
        sz = _flat(d, "s_hidden") @ d["s_head"].T
        return remit_loss_ref(z, y, scorer_logits=sz, cu_seqlens=_rows(d))[0]

    names = ["hidden"] + (["s_hidden"] if method == "remit" else [])
    _check(fn, ref, names, ["hidden", "head"], backend, poison)
