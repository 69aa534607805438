"""Every bad input gets the documented answer or an error naming the argument at fault (issue 26,
"Errors that do not name the argument"): validation "off" on the torch backend does what the
mode's docs promise (NaN log-prob for an out-of-range target, malformed offsets cover nothing
past their end) instead of an IndexError from a gather; a bogus dp_group is named dp_group;
targets on the wrong device are named targets, not the per-token tensor checked against them;
apply_remit names its numeric arguments."""

import pytest
import torch

import remit_ext
from remit_ext.reference import remit_weights_ref, target_logprob_ref
from cases import IGNORE, make_pair
from conftest import BACKENDS

OFF_BACKENDS = [b for b in BACKENDS if b != "cpu"]  # the C++ CPU kernels refuse bad values


def _batch():
    logits, scorer, targets = make_pair((10, 11), torch.float32, seed=7, ignore_frac=0.0)
    return logits.cpu(), scorer.cpu(), targets.cpu()


@pytest.mark.parametrize("backend", OFF_BACKENDS)
def test_off_out_of_range_target_gives_nan_there_only(backend):
    logits, _, targets = _batch()
    bad = targets.clone()
    bad[3] = 99
    with remit_ext.validation("off"):
        st = remit_ext.token_stats(logits, bad, backend=backend)
        loss = remit_ext.weighted_cross_entropy(logits, bad, backend=backend,
                                                reduction="none")
    keep = torch.arange(10) != 3
    truth = target_logprob_ref(logits.double(), targets)
    assert bool(st.logprob[3].isnan()) and bool(loss[3].isnan())
    torch.testing.assert_close(st.logprob[keep].double(), truth[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss[keep].double(), -truth[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", OFF_BACKENDS)
def test_off_short_cu_seqlens_covers_nothing_past_its_end(backend):
    # cu_seqlens [0, 3, 6] over 10 tokens: positions 6..9 are in no sequence and get weight 0;
    # the two sequences it does give are centred on their own.
    logits, scorer, targets = _batch()
    cu = torch.tensor([0, 3, 6])
    a = target_logprob_ref(logits.double(), targets)
    b = target_logprob_ref(scorer.double(), targets)
    with remit_ext.validation("off"):
        out = remit_ext.remit_loss(logits, targets, scorer_logits=scorer, cu_seqlens=cu,
                                   return_details=True, backend=backend)
        w = remit_ext.remit_weights(a.float(), b.float(), targets, cu_seqlens=cu,
                                    backend=backend).weights
    want = remit_weights_ref(a[:6], b[:6], targets[:6] != IGNORE, cu_seqlens=cu)[0]
    for got in (out.weights, w):
        assert bool((got[6:] == 0).all())
        torch.testing.assert_close(got[:6].double(), want, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(out.loss))


def test_bogus_dp_group_is_named():
    logits, scorer, targets = _batch()
    with pytest.raises(ValueError, match=r"^dp_group: .*got dp_group='bogus'"):
        remit_ext.remit_loss(logits, targets, scorer_logits=scorer, dp_group="bogus",
                             return_details=True)
    a = torch.zeros(10)
    with pytest.raises(ValueError, match=r"^dp_group: "):
        remit_ext.remit_weights(a, a, targets, dp_group="bogus")


def test_targets_on_another_device_are_named():
    _, _, targets = _batch()
    meta = targets.to("meta")
    a = torch.zeros(10)
    with pytest.raises(ValueError, match=r"^targets: expected a tensor on cpu like logprobs, "
                                         r"got one on meta"):
        remit_ext.remit_weights(a, a, meta)
    # The odd one out is still named when it is a log-prob tensor.
    with pytest.raises(ValueError, match=r"^logprobs: expected a tensor on meta"):
        remit_ext.remit_weights(a, a.to("meta"), meta)
    h, w = torch.randn(10, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match=r"^targets: expected a tensor on cpu like hidden, "
                                         r"got one on meta"):
        remit_ext.remit_linear_loss(h, w, meta, scorer_logprobs=a)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps="abc"), r"^eps: expected a number in \(0, 1\), got 'abc'"),
    (dict(eps=1.5), r"^eps: expected a number in \(0, 1\), got 1.5"),
    (dict(keep_ratio="x"), r"^keep_ratio: expected a number in \(0, 1\], got 'x'"),
    (dict(temperature=float("nan")), r"^temperature: expected a number > 0, got nan"),
])
def test_apply_remit_names_its_numbers(kwargs, match):
    hf = pytest.importorskip("remit_ext.hf")
    with pytest.raises(ValueError, match=match):
        hf.apply_remit(object(), **kwargs)
