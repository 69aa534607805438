"""The method table (``remit_ext._methods``): a new fused-linear method is one ``Method`` entry.
Two methods defined only here — one whose weights depend on each token alone (one-pass
schedule), one whose weights depend on the whole batch (two-pass schedule) — run through
``remit_linear_loss`` and ``LinearReMiTLoss`` with no other change, and match the eager
formula on full logits in fp64 (loss and every gradient). Also: the options object is checked
once, with errors naming their argument."""

import pytest
import torch

import remit_ext
from remit_ext import _methods
from remit_ext._methods import Method, Weights, loss_options
from remit_ext.reference import target_logprob_ref
from cases import IGNORE
from conftest import DEVICE


def confident_weights(backend, a, b, targets, valid, offsets, opts):
    """1 where the frozen model is more confident than the policy (b > a), else 0.5."""
    w = torch.where(b > a, 1.0, 0.5).to(a.dtype)
    return Weights(torch.where(valid, w, 0), valid.sum())


def top_half_weights(backend, a, b, targets, valid, offsets, opts):
    """1 on the valid tokens whose b - a is above the batch median, dividing by their number."""
    d = torch.where(valid, b - a, -torch.inf)
    med = (b - a)[valid].median() if bool(valid.any()) else d.new_zeros(())
    keep = (valid & (d > med)).to(a.dtype)
    return Weights(keep, keep.sum())


NEW = {
    "confident": Method("confident", scorer="logprob", term="ce", weights=confident_weights,
                        scope="token"),
    "top_half": Method("top_half", scorer="logprob", term="ce", weights=top_half_weights,
                       scope="batch", divisor="kept"),
}


@pytest.fixture
def new_methods(monkeypatch):
    for name, m in NEW.items():
        monkeypatch.setitem(_methods.METHODS, name, m)
    yield NEW


def _inputs(n=37, d=12, vocab=53, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 3 / d ** 0.5
    sh = torch.randn(n, d + 2, generator=g, dtype=torch.float64)
    sw = torch.randn(vocab, d + 2, generator=g, dtype=torch.float64) * 3 / d ** 0.5
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = IGNORE
    return h, w, sh, sw, y


def _eager(name, h, w, sh, sw, y):
    """The method's loss on full logits, written out: weights from fp64 log-probs (detached),
    then sum(-w a) / divisor."""
    a = target_logprob_ref(h @ w.T, y, ignore_index=IGNORE)
    b = target_logprob_ref(sh @ sw.T, y, ignore_index=IGNORE)
    valid = y != IGNORE
    wts = NEW[name].weights(None, a.detach(), b, y, valid, None, None)
    return (-wts.w * a).sum() / wts.count.clamp(min=1)


@pytest.mark.parametrize("name", list(NEW))
@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_new_method_is_one_table_entry(new_methods, name, chunk_size, backend):
    h, w, sh, sw, y = _inputs()
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = remit_ext.remit_linear_loss(hh.to(DEVICE), ww.to(DEVICE), y.to(DEVICE),
                                      scorer_hidden=sh.to(DEVICE), scorer_weight=sw.to(DEVICE),
                                      method=name, chunk_size=chunk_size, backend=backend)
    got.backward()
    he, we = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = _eager(name, he, we, sh, sw, y)
    want.backward()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hh.grad, he.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ww.grad, we.grad, rtol=1e-9, atol=1e-12)
    # The module takes it too, and the weights come back as the method formed them.
    out = remit_ext.LinearReMiTLoss(method=name, return_details=True, backend=backend)(
        h, w, y, scorer_hidden=sh, scorer_weight=sw)
    a = target_logprob_ref(h @ w.T, y, ignore_index=IGNORE)
    b = target_logprob_ref(sh @ sw.T, y, ignore_index=IGNORE)
    torch.testing.assert_close(out.weights, NEW[name].weights(None, a, b, y, y != IGNORE,
                                                              None, None).w)
    assert out.diagnostics is None


def test_new_method_reads_the_frozen_input_it_declares(new_methods):
    h, w, _, _, y = _inputs()
    with pytest.raises(ValueError, match="scorer_hidden .* scorer_logprobs"):
        remit_ext.remit_linear_loss(h, w, y, method="confident")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="nope"), ValueError, "method: expected one of"),
    (dict(eps=1.5), ValueError, "eps"),
    (dict(keep_ratio=0.0), ValueError, "keep_ratio"),
    (dict(keep_ratio=True), ValueError, "keep_ratio"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(method="remit", temperature=2.0), ValueError, "temperature: only method='kd'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_options_are_checked_once_and_name_their_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        loss_options(**kwargs)
    # The modules check them at construction, not at the first step.
    with pytest.raises(exc, match=match):
        remit_ext.LinearReMiTLoss(**kwargs)


def test_options_round_trip_through_the_op_schema():
    opts = loss_options("kd", ignore_index=-1, eps=0.1, keep_ratio=0.5, temperature=2.0)
    assert _methods.LossOptions.from_schema(*opts.schema_args()) == opts
