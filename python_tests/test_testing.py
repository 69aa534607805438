"""Test the tester: deliberately wrong ReMiT implementations that the comparison helper must
reject, and the right one that it must accept (STYLE.md habit 14)."""

import pytest
import torch

from remit_ext.reference import remit_loss_ref, remit_weights_ref, token_stats_ref
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE, make_pair


def _data(dtype=torch.bfloat16):
    logits, scorer, targets = make_pair((4, 33, 257), dtype, seed=41)
    z, s, y = logits.reshape(-1, 257), scorer.reshape(-1, 257), targets.reshape(-1)
    cu = torch.arange(5, device=z.device) * 33
    return z, s, y, cu


def _loss_and_grad(impl, z, s, y, cu):
    x = z.detach().clone().requires_grad_(True)
    loss = impl(x, s, y, cu)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g


def _right(z, s, y, cu):
    return remit_loss_ref(z, y, scorer_logits=s, cu_seqlens=cu)[0]


def _normalised_by_weight_sum(z, s, y, cu):
    valid = y != IGNORE
    _, a, _ = token_stats_ref(z, y)
    _, b, _ = token_stats_ref(s, y)
    w, _, _ = remit_weights_ref(a, b, valid, cu_seqlens=cu)
    return -(w * a).sum() / w.sum()


def _not_centred(z, s, y, cu):
    valid = y != IGNORE
    _, a, _ = token_stats_ref(z, y)
    _, b, _ = token_stats_ref(s, y)
    w = (2 * torch.sigmoid((b - a).detach())).clamp(0.8, 1.2) * valid
    return -(w * a).sum() / valid.sum()


def _centred_over_batch(z, s, y, cu):
    return remit_loss_ref(z, y, scorer_logits=s, cu_seqlens=None)[0]


def _weights_not_detached(z, s, y, cu):
    return remit_loss_ref(z, y, scorer_logits=s, cu_seqlens=cu, detach_weights=False)[0]


def _ignored_counted(z, s, y, cu):
    loss = remit_loss_ref(z, y, scorer_logits=s, cu_seqlens=cu, reduction="sum")[0]
    return loss / y.numel()


def _low_precision_math(z, s, y, cu):
    # The same formula evaluated in bf16 throughout: what a kernel that forgets to upcast gives.
    logp = torch.log_softmax(z.to(torch.bfloat16), -1)
    a = logp.gather(-1, y.clamp(min=0)[:, None]).squeeze(-1).float() * (y != IGNORE)
    _, b, _ = token_stats_ref(s, y)
    w, _, _ = remit_weights_ref(a, b, y != IGNORE, cu_seqlens=cu)
    return -(w * a).sum() / (y != IGNORE).sum()


WRONG = [_normalised_by_weight_sum, _not_centred, _centred_over_batch, _weights_not_detached,
         _ignored_counted, _low_precision_math]


def test_right_implementation_passes():
    z, s, y, cu = _data()
    truth = _loss_and_grad(_right, z.double(), s.double(), y, cu)
    base = _loss_and_grad(_right, z, s, y, cu)
    got = _loss_and_grad(_right, z, s, y, cu)
    for i in range(2):
        assert_close_to_truth(got[i], truth[i], base[i])


@pytest.mark.parametrize("wrong", WRONG, ids=lambda f: f.__name__.strip("_"))
def test_wrong_implementation_is_rejected(wrong):
    z, s, y, cu = _data()
    truth = _loss_and_grad(_right, z.double(), s.double(), y, cu)
    base = _loss_and_grad(_right, z, s, y, cu)
    got = _loss_and_grad(wrong, z, s, y, cu)
    with pytest.raises(AssertionError, match="exceeds"):
        for i in range(2):
            assert_close_to_truth(got[i], truth[i], base[i], name=("loss", "grad")[i])


def test_invented_nan_is_rejected():
    truth = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    got = torch.tensor([1.0, float("nan"), 3.0])
    with pytest.raises(AssertionError, match="NaN at 1 positions, truth has 0"):
        assert_close_to_truth(got, truth, truth.float())


def test_zeros_are_rejected():
    truth = torch.linspace(-1, 1, 50, dtype=torch.float64)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_truth(torch.zeros(50), truth, truth.float())


def test_shape_mismatch_is_rejected():
    truth = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_truth(torch.zeros(2, 2), truth, truth.float())
