"""``num_items_in_batch`` on every loss: gradient accumulation over micro-batches with the global
token count equals one big batch (the Hugging Face convention), as an int and as a 0-d tensor;
the divisor matches the fp64 reference's sum divided by the count; validation; no host sync
(a tensor count traces under ``torch.compile(fullgraph=True)``, where ``.item()`` would break
the graph).

The micro-batches are cut at row boundaries (ReMiT centres weights per row) and hold different
numbers of valid tokens, so the per-micro-batch means do not add up to the big batch's: each
test also checks that, so that it cannot pass without the argument doing its work.
"""

import pytest
import torch

import remit_ext
from remit_ext.reference import (kd_loss_ref, pg_loss_ref, remit_loss_ref, rho1_loss_ref,
                                 weighted_ce_ref)
from cases import IGNORE
from conftest import BACKENDS, DEVICE, KD_BACKENDS

FAST = [b for b in BACKENDS if b != "triton"]
B, T, V, D = 4, 23, 131, 16
# Rows 0-1 form micro-batch 1, rows 2-3 micro-batch 2; row 3 is mostly ignored so the two
# micro-batches hold different numbers of valid tokens.
SPLITS = ((0, 2), (2, 4))


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.2] = IGNORE
    y[3, 4:] = IGNORE
    data = {
        "logits": torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3,
        "scorer": torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3,
        "weights": torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
        "adv": torch.randn(B, T, generator=g, dtype=torch.float64),
        "hidden": torch.randn(B, T, D, generator=g, dtype=torch.float64),
        "head": torch.randn(V, D, generator=g, dtype=torch.float64) * 3 / D ** 0.5,
        "s_hidden": torch.randn(B, T, D, generator=g, dtype=torch.float64),
        "s_head": torch.randn(V, D, generator=g, dtype=torch.float64) * 3 / D ** 0.5,
    }
    data = {k: v.to(DEVICE, dtype) for k, v in data.items()}
    data["old"] = (torch.log_softmax(data["logits"].double(), -1).gather(
        -1, y.clamp(min=0).to(DEVICE)[..., None])[..., 0]
        + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)).float()
    data["targets"] = y.to(DEVICE)
    return data


def _logits_losses(backend):
    """name -> (loss(data, rows, **kw), leaf names, reference per-token-sum(data_fp64),
    reference count(data)) for the logits-level losses."""
    def ce(d, r, **kw):
        return remit_ext.weighted_cross_entropy(d["logits"][r], d["targets"][r],
                                                d["weights"][r], backend=backend, **kw)

    def remit(d, r, **kw):
        return remit_ext.remit_loss(d["logits"][r], d["targets"][r],
                                    scorer_logits=d["scorer"][r], backend=backend, **kw)

    def rho1(d, r, **kw):  # keep_ratio 1: the selection does not depend on the cut
        return remit_ext.rho1_loss(d["logits"][r], d["targets"][r], ref_logits=d["scorer"][r],
                                   keep_ratio=1.0, backend=backend, **kw)

    def kd(d, r, **kw):
        return remit_ext.kd_loss(d["logits"][r], d["scorer"][r], d["targets"][r],
                                 temperature=1.5, backend=backend, **kw)

    def pg(d, r, **kw):
        return remit_ext.policy_gradient_loss(d["logits"][r], d["targets"][r], d["adv"][r],
                                              old_logprobs=d["old"][r], backend=backend, **kw)

    def module(d, r, **kw):
        return remit_ext.ReMiTLoss(backend=backend)(d["logits"][r], d["targets"][r],
                                                    scorer_logits=d["scorer"][r], **kw)

    out = {"weighted_cross_entropy": ce, "remit_loss": remit, "rho1_loss": rho1,
           "policy_gradient_loss": pg, "ReMiTLoss": module}
    if backend in KD_BACKENDS:
        out["kd_loss"] = kd
    return out


def _ref_sum(name, d):
    """The fp64 reference's summed loss over the whole batch (the numerator)."""
    z, y = d["logits"].double().reshape(-1, V), d["targets"].reshape(-1)
    sz = d["scorer"].double().reshape(-1, V)
    rows = torch.arange(0, B * T + 1, T, device=DEVICE)
    if name == "weighted_cross_entropy":
        return weighted_ce_ref(z, y, d["weights"].double().reshape(-1), reduction="sum")
    if name in ("remit_loss", "ReMiTLoss"):
        return remit_loss_ref(z, y, scorer_logits=sz, cu_seqlens=rows, reduction="sum")[0]
    if name == "rho1_loss":
        return rho1_loss_ref(z, y, ref_logits=sz, keep_ratio=1.0, reduction="sum")
    if name == "kd_loss":
        return kd_loss_ref(z, sz, y, temperature=1.5, reduction="sum")
    return pg_loss_ref(z, y, d["adv"].double().reshape(-1), old_logprobs=d["old"].reshape(-1),
                       reduction="sum")


def _accumulated(fn, data, leaves, num_items):
    """Grads of the leaves summed over the micro-batches, each loss divided by num_items."""
    leaves = {k: data[k].detach().requires_grad_() for k in leaves}
    d = {**data, **leaves}
    losses = [fn(d, slice(a, b), **({} if num_items is None else
                                    {"num_items_in_batch": num_items})) for a, b in SPLITS]
    total = sum(losses)
    total.backward()
    return total.detach(), {k: v.grad for k, v in leaves.items()}


def _whole(fn, data, leaves):
    leaves = {k: data[k].detach().requires_grad_() for k in leaves}
    loss = fn({**data, **leaves}, slice(0, B))
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def _check_accumulation(fn, data, leaves, count):
    want, want_g = _whole(fn, data, leaves)
    for num_items in (int(count), count, count.cpu().to(torch.float32)):
        got, got_g = _accumulated(fn, data, leaves, num_items)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for k in leaves:
            torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-5, atol=1e-7)
    # Without it, the micro-batch means do not add up to the batch's (the test has teeth).
    local, local_g = _accumulated(fn, data, leaves, None)
    assert not torch.allclose(local, want, rtol=1e-3)
    return want


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", ["weighted_cross_entropy", "remit_loss", "rho1_loss",
                                  "kd_loss", "policy_gradient_loss", "ReMiTLoss"])
def test_logits_losses_accumulate_like_one_batch(name, backend):
    losses = _logits_losses(backend)
    if name not in losses:
        pytest.skip(f"{backend} has no {name} kernel")
    data = _data(1)
    count = (data["targets"] != IGNORE).sum()
    want = _check_accumulation(losses[name], data, ["logits"], count)
    # The divisor is num_items exactly: the fp64 reference's sum over the batch / count.
    torch.testing.assert_close(want.double(), _ref_sum(name, data) / count.double(), rtol=2e-5,
                               atol=1e-6)


def _linear(method, module=False, backend="auto", chunk=16):
    def fn(d, r, **kw):
        scorer = {} if method == "ntp" else {"scorer_hidden": d["s_hidden"][r],
                                              "scorer_weight": d["s_head"]}
        extra = {"keep_ratio": 1.0} if method == "rho1" else {}
        if module:
            return remit_ext.LinearReMiTLoss(method=method, chunk_size=chunk, backend=backend,
                                             **extra)(d["hidden"][r], d["head"],
                                                      d["targets"][r], **scorer, **kw)
        return remit_ext.remit_linear_loss(d["hidden"][r], d["head"], d["targets"][r],
                                           method=method, chunk_size=chunk, backend=backend,
                                           **scorer, **extra, **kw)
    return fn


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("chunk", [16, 2 * T], ids=["two_pass", "one_pass"])
@pytest.mark.parametrize("method", ["ntp", "remit", "rho1", "kd"])
def test_remit_linear_loss_accumulates_like_one_batch(method, chunk, backend):
    # Chunks of 16 rows split the 23-token sequences (ReMiT's two-pass schedule); 2 T hold two
    # whole rows (its one-pass schedule, the gradient formed in the forward).
    if method == "kd" and backend not in KD_BACKENDS:
        pytest.skip(f"{backend} has no KD kernel")
    data = _data(2)
    count = (data["targets"] != IGNORE).sum()
    _check_accumulation(_linear(method, backend=backend, chunk=chunk), data, ["hidden", "head"],
                        count)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_backend_accumulates(backend):
    data = _data(3)
    count = (data["targets"] != IGNORE).sum()
    _check_accumulation(_linear("remit", backend=backend), data, ["hidden", "head"], count)
    _check_accumulation(_logits_losses(backend)["remit_loss"], data, ["logits"], count)


def test_linear_module_accumulates_like_one_batch():
    data = _data(4)
    count = (data["targets"] != IGNORE).sum()
    _check_accumulation(_linear("remit", module=True), data, ["hidden", "head"], count)


def test_rho1_divides_the_kept_tokens_by_num_items():
    # keep_ratio < 1: the selection stays per call; the divisor is num_items.
    data = _data(5)
    z, y, sz = data["logits"], data["targets"], data["scorer"]
    kept_sum = rho1_loss_ref(z.double().reshape(-1, V), y.reshape(-1),
                             ref_logits=sz.double().reshape(-1, V), keep_ratio=0.5,
                             reduction="sum")
    got = remit_ext.rho1_loss(z, y, ref_logits=sz, keep_ratio=0.5, num_items_in_batch=123)
    torch.testing.assert_close(got.double(), kept_sum / 123, rtol=1e-5, atol=1e-7)
    lin = remit_ext.remit_linear_loss(data["hidden"], data["head"], y, method="rho1",
                                      keep_ratio=0.5, scorer_hidden=data["s_hidden"],
                                      scorer_weight=data["s_head"], num_items_in_batch=123)
    lz = data["hidden"].double().reshape(-1, D) @ data["head"].double().T
    lsz = data["s_hidden"].double().reshape(-1, D) @ data["s_head"].double().T
    want = rho1_loss_ref(lz, y.reshape(-1), ref_logits=lsz, keep_ratio=0.5, reduction="sum")
    torch.testing.assert_close(lin.double(), want / 123, rtol=1e-5, atol=1e-7)


def test_zero_tensor_count_gives_zero():
    data = _data(6)
    y = torch.full_like(data["targets"], IGNORE)
    zero = torch.zeros((), dtype=torch.long, device=DEVICE)
    z = data["logits"].detach().requires_grad_()
    loss = remit_ext.weighted_cross_entropy(z, y, num_items_in_batch=zero)
    loss.backward()
    assert float(loss.detach()) == 0 and bool((z.grad == 0).all())
    h = data["hidden"].detach().requires_grad_()
    lin = remit_ext.remit_linear_loss(h, data["head"], y, method="ntp", num_items_in_batch=zero)
    lin.backward()
    assert float(lin.detach()) == 0 and bool((h.grad == 0).all())


def _all_losses(data, backend):
    """Every loss of the batch with its differentiable leaf: (name, fn(num_items), leaf)."""
    losses = _logits_losses(backend)
    out = [(name, (lambda n, f=f: f(data, slice(None), num_items_in_batch=n)), "logits")
           for name, f in losses.items()]
    out.append(("remit_linear_loss", lambda n: _linear("remit", backend=backend)(
        data, slice(None), num_items_in_batch=n), "hidden"))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["int", "tensor"])
def test_zero_count_gives_zero_loss_and_grad(backend, form):
    # A count of 0 (a global batch of padding only) is defined as a loss of 0 with a zero
    # gradient, for the int and the tensor form alike, even where this call's own tokens are
    # valid (the local sum is not 0): it was the local sum for a tensor and refused for an int.
    data = _data(10)
    assert int((data["targets"] != IGNORE).sum()) > 0
    zero = 0 if form == "int" else torch.zeros((), dtype=torch.long, device=DEVICE)
    for name, fn, leaf in _all_losses(data, backend):
        data[leaf] = data[leaf].detach().requires_grad_()
        loss = fn(zero)
        loss.backward()
        assert float(loss.detach()) == 0, name
        assert bool((data[leaf].grad == 0).all()), name
        data[leaf] = data[leaf].detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_tensor_count(backend):
    # A negative count has no meaning: a ValueError where the value can be read without a
    # device sync (a CPU tensor, or validation "sync"), and a NaN loss otherwise ("off" here;
    # "async" on an accelerator), never the sign-flipped loss it gave before.
    data = _data(11)
    neg = torch.tensor(-5, device=DEVICE)
    for name, fn, _leaf in _all_losses(data, backend):
        if DEVICE.type == "cpu":
            with pytest.raises(ValueError, match=r"num_items_in_batch: expected a count >= 0 "
                                                 r".*got -5"):
                fn(neg)
        with remit_ext.validation("sync"):
            with pytest.raises(ValueError, match=r"num_items_in_batch: expected a count >= 0"):
                fn(neg)
        with remit_ext.validation("off"):
            assert bool(torch.isnan(fn(neg)).item()), name
        with remit_ext.validation("off"):
            assert bool(torch.isnan(fn(neg.cpu())).item()), name


@pytest.mark.parametrize("value, exc, match", [
    (True, TypeError, r"num_items_in_batch: expected an int or a 0-d tensor, got bool"),
    (2.0, TypeError, r"num_items_in_batch: expected an int or a 0-d tensor, got float"),
    (-3, ValueError, r"num_items_in_batch: expected an int in \[0, 2\*\*63\) .*got -3"),
    (2 ** 70, ValueError, r"num_items_in_batch: expected an int in \[0, 2\*\*63\) .*got "
                          r"1180591620717411303424"),
    (torch.tensor([4]), ValueError, r"num_items_in_batch: expected a 0-d tensor, got shape"),
    (torch.tensor(True), TypeError, r"num_items_in_batch: expected an integer or floating"),
])
def test_bad_num_items(value, exc, match):
    data = _data(7)
    z, y = data["logits"], data["targets"]
    calls = [
        lambda: remit_ext.weighted_cross_entropy(z, y, num_items_in_batch=value),
        lambda: remit_ext.remit_loss(z, y, scorer_logits=data["scorer"],
                                     num_items_in_batch=value),
        lambda: remit_ext.rho1_loss(z, y, ref_logits=data["scorer"], num_items_in_batch=value),
        lambda: remit_ext.kd_loss(z, data["scorer"], y, num_items_in_batch=value),
        lambda: remit_ext.policy_gradient_loss(z, y, data["adv"], num_items_in_batch=value),
        lambda: remit_ext.remit_linear_loss(data["hidden"], data["head"], y, method="ntp",
                                            num_items_in_batch=value),
        lambda: remit_ext.ReMiTLoss()(z, y, scorer_logits=data["scorer"],
                                      num_items_in_batch=value),
        lambda: remit_ext.LinearReMiTLoss(method="ntp")(data["hidden"], data["head"], y,
                                                        num_items_in_batch=value),
    ]
    for call in calls:
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_num_items_refuses_other_reductions(reduction):
    data = _data(8)
    z, y = data["logits"], data["targets"]
    match = rf"num_items_in_batch: only reduction='mean' .* got reduction='{reduction}'"
    with pytest.raises(ValueError, match=match):
        remit_ext.weighted_cross_entropy(z, y, reduction=reduction, num_items_in_batch=5)
    with pytest.raises(ValueError, match=match):
        remit_ext.remit_linear_loss(data["hidden"], data["head"], y, method="ntp",
                                    reduction=reduction, num_items_in_batch=5)


def test_tensor_count_compiles_fullgraph():
    # A host read of the count (.item(), bool()) would break the graph.
    data = _data(9)
    torch._dynamo.reset()

    def step(z, h, w, y, sh, sw, n):
        a = remit_ext.weighted_cross_entropy(z, y, num_items_in_batch=n)
        b = remit_ext.remit_loss(z, y, scorer_logits=sh @ sw.T, num_items_in_batch=n)
        c = remit_ext.remit_linear_loss(h, w, y, scorer_hidden=sh, scorer_weight=sw,
                                        chunk_size=16, num_items_in_batch=n)
        return a + b + c

    n = (data["targets"] != IGNORE).sum() * 3
    args = [data[k] for k in ("logits", "hidden", "head")]
    rest = (data["targets"], data["s_hidden"], data["s_head"], n)
    params = [a.detach().requires_grad_() for a in args]
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*params, *rest)
    got_g = torch.autograd.grad(got, params)
    ref = [a.detach().requires_grad_() for a in args]
    want = step(*ref, *rest)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, torch.autograd.grad(want, ref)):
        torch.testing.assert_close(g, w)
