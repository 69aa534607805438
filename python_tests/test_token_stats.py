"""Per-token statistics (METHODS.md section 1), every backend against token_stats_ref and
topk_entropy_ref: lse, log-prob, entropy, the scorer's stats, temperature, top-k entropy, and the
gradients of (lse, log-prob, entropy) w.r.t. the logits; fp64 truth, same-math baseline."""

import math

import pytest
import torch

import remit_ext
from remit_ext.reference import token_stats_ref, topk_entropy_ref
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE, SHAPES, confident_rows, make_pair, off_target_error
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS, LOW_DTYPES

STATS = ("lse", "logprob", "entropy")


def _cotangents(targets, seed=1):
    """One random fp64 cotangent per statistic (lse, logprob, entropy)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(targets.shape, generator=g, dtype=torch.float64).to(DEVICE)
            for _ in STATS]


def _vjp(outputs, cots, z):
    total = sum((o * c.to(o.dtype)).sum() for o, c in zip(outputs, cots))
    (grad,) = torch.autograd.grad(total, z)
    return grad


def _ref(logits, targets, temperature=1.0, grad=True):
    """(lse, logprob, entropy[, logits gradient]) of the reference, shaped like targets."""
    z = logits.detach().clone().requires_grad_(grad)
    stats = token_stats_ref(z.reshape(-1, z.shape[-1]), targets.reshape(-1),
                            temperature=temperature)
    stats = [s.reshape(targets.shape) for s in stats]
    if not grad:
        return stats
    return stats + [_vjp(stats, _cotangents(targets), z)]


def _api(logits, targets, backend, temperature=1.0, grad=True):
    z = logits.detach().clone().requires_grad_(grad)
    out = remit_ext.token_stats(z, targets, entropy=True, temperature=temperature,
                                backend=backend)
    stats = [out.lse, out.logprob, out.entropy]
    if not grad:
        return stats
    return stats + [_vjp(stats, _cotangents(targets), z)]


def _check_against_ref(logits, targets, *, backend, temperature=1.0, grad=True):
    truth = _ref(logits.double(), targets, temperature, grad)
    base = _ref(logits, targets, temperature, grad)
    got = _api(logits, targets, backend, temperature, grad)
    names = STATS + ("grad",)
    for name, g, t, b in zip(names, got, truth, base):
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(t.shape)}"
        assert_close_to_truth(g, t, b, name=f"{backend}/{name}")
    for name, g in zip(STATS, got):
        assert g.shape == targets.shape
        assert g.dtype == torch.float32, f"{name}: statistics are written in fp32"
    if grad:
        assert got[3].dtype == logits.dtype, "gradient must come back in the logits' dtype"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape):
    logits, _, targets = make_pair(shape, dtype, seed=hash(shape) % 1000 + 100)
    _check_against_ref(logits, targets, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(backend, dtype, temperature):
    logits, _, targets = make_pair((3, 21, 257), dtype, seed=20)
    got = _check_against_ref(logits, targets, backend=backend, temperature=temperature)
    plain = _api(logits, targets, backend, grad=False)
    assert not torch.allclose(got[0], plain[0]), "temperature must change the statistics"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_positions_give_zero(backend):
    logits, scorer, targets = make_pair((4, 25, 129), torch.float32, seed=21, ignore_frac=0.4)
    out = remit_ext.token_stats(logits, targets, scorer_logits=scorer, entropy=True,
                                backend=backend)
    ignored = targets == IGNORE
    assert bool(ignored.any()) and bool((~ignored).any())
    for name in ("lse", "logprob", "entropy", "scorer_lse", "scorer_logprob"):
        value = getattr(out, name)
        assert value.shape == targets.shape, name
        assert bool((value[ignored] == 0).all()), f"{name} must be 0 at ignored positions"
    assert out.topk_entropy is None
    # No gradient reaches an ignored row, whatever the cotangent.
    z = logits.clone().requires_grad_(True)
    stats = remit_ext.token_stats(z, targets, entropy=True, backend=backend)
    grad = _vjp(stats[:3], _cotangents(targets), z)
    assert bool((grad[ignored] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_outputs(backend):
    logits, _, targets = make_pair((2, 9, 33), torch.float32, seed=22)
    out = remit_ext.token_stats(logits, targets, backend=backend)
    assert out.entropy is None and out.topk_entropy is None
    assert out.scorer_lse is None and out.scorer_logprob is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_scorer_stats(backend, dtype):
    logits, scorer, targets = make_pair((3, 17, 1025), dtype, seed=23)
    out = remit_ext.token_stats(logits, targets, scorer_logits=scorer, backend=backend)
    truth = _ref(scorer.double(), targets, grad=False)
    base = _ref(scorer, targets, grad=False)
    assert_close_to_truth(out.scorer_lse, truth[0], base[0], name=f"{backend}/scorer_lse")
    assert_close_to_truth(out.scorer_logprob, truth[1], base[1], name=f"{backend}/scorer_logprob")
    # Reading the scorer in the same call leaves the policy's stats unchanged.
    alone = remit_ext.token_stats(logits, targets, backend=backend)
    assert torch.equal(out.lse, alone.lse) and torch.equal(out.logprob, alone.logprob)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_dtype, scorer_dtype", [
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.float64),
    (torch.float64, torch.bfloat16),
], ids=str)
def test_scorer_in_another_dtype(backend, policy_dtype, scorer_dtype):
    logits, scorer, targets = make_pair((2, 19, 513), torch.float64, seed=24)
    logits, scorer = logits.to(policy_dtype), scorer.to(scorer_dtype)
    out = remit_ext.token_stats(logits, targets, scorer_logits=scorer, backend=backend)
    truth = _ref(scorer.double(), targets, grad=False)
    base = _ref(scorer, targets, grad=False)
    # The scorer's stats come back in the policy's accumulation dtype, on every backend.
    policy_acc, s_lse_dt, s_lp_dt = out.lse.dtype, out.scorer_lse.dtype, out.scorer_logprob.dtype
    assert s_lse_dt == policy_acc and s_lp_dt == policy_acc, (
        f"scorer stats in {s_lse_dt}/{s_lp_dt}, policy stats in {policy_acc}")
    assert_close_to_truth(out.scorer_lse, truth[0], base[0].to(out.lse.dtype),
                          floor_rtol=1e-5, name=f"{backend}/scorer_lse")
    assert_close_to_truth(out.scorer_logprob, truth[1], base[1].to(out.lse.dtype),
                          floor_rtol=1e-5, name=f"{backend}/scorer_logprob")


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("topk", [16, 5000])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_entropy(backend, dtype, topk, renormalize):
    # topk > V covers the whole row: the unnormalised form is then the full entropy.
    logits, _, targets = make_pair((3, 13, 1025), dtype, seed=25)
    if backend == "cuda" and topk < logits.shape[-1]:
        # The CUDA kernels have no running top-k: the backend must refuse, saying why.
        with pytest.raises(remit_ext.BackendUnavailableError, match="topk"):
            remit_ext.token_stats(logits, targets, topk=topk, backend=backend)
        return
    out = remit_ext.token_stats(logits, targets, topk=topk, topk_renormalize=renormalize,
                                temperature=1.5, backend=backend)
    valid = targets != IGNORE

    def ref(x):
        t = topk_entropy_ref(x.reshape(-1, x.shape[-1]), topk, renormalize=renormalize,
                             temperature=1.5).reshape(targets.shape)
        return torch.where(valid, t, 0)

    assert out.topk_entropy.shape == targets.shape
    assert bool((out.topk_entropy[~valid] == 0).all())
    assert_close_to_truth(out.topk_entropy, ref(logits.double()), ref(logits),
                          name=f"{backend}/topk_entropy")
    full = _ref(logits.double(), targets, temperature=1.5, grad=False)[2]
    if topk >= logits.shape[-1] and not renormalize:
        # Every class is in the top k: the unnormalised form is the full entropy.
        torch.testing.assert_close(out.topk_entropy.double(), full, rtol=1e-4, atol=1e-5)
    elif renormalize:
        # The entropy of a k-point distribution.
        assert bool((out.topk_entropy <= math.log(min(topk, logits.shape[-1])) + 1e-4).all())
    else:
        # A sub-sum of the non-negative terms -p log p of the full entropy.
        assert bool((out.topk_entropy.double() <= full + 1e-4).all())


def test_topk_entropy_of_a_hand_made_row():
    # Row z = log [0.5, 0.25, 0.125, 0.125]; top-2 = {0.5, 0.25}.
    z = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    y = torch.tensor([0])
    raw = remit_ext.token_stats(z, y, topk=2).topk_entropy
    renorm = remit_ext.token_stats(z, y, topk=2, topk_renormalize=True).topk_entropy
    expected_raw = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    expected_renorm = float(-(p * p.log()).sum())
    assert abs(float(raw) - expected_raw) < 1e-6
    assert abs(float(renorm) - expected_renorm) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_entropy_with_ties_and_neg_inf(backend):
    # Equal logits straddling the k-th place, -inf entries, k larger than the finite entries, and
    # a row whose largest values sit in its last block (the running top-k must still find them).
    z = torch.full((3, 40), float("-inf"), dtype=torch.float32)
    z[0, :6] = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    z[1, :3] = torch.tensor([0.0, -1.0, -2.0])
    z[2] = torch.linspace(-3, 3, 40)
    y = torch.tensor([0, 1, 39])
    z, y = z.to(DEVICE), y.to(DEVICE)
    for k in (1, 3, 5) if backend != "cuda" else ():  # no top-k on CUDA (refused, tested above)
        for renorm in (False, True):
            got = remit_ext.token_stats(z, y, topk=k, topk_renormalize=renorm,
                                        backend=backend).topk_entropy
            ref = topk_entropy_ref(z.double(), k, renormalize=renorm)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    # Every output (policy lse, logprob, entropy; scorer lse, logprob) against finite differences
    # w.r.t. both logits tensors, with an ignored position and a temperature.
    logits, scorer, targets = make_pair((2, 3, 5), torch.float64, seed=27, ignore_frac=0.0)
    targets[1, 1] = IGNORE
    z = logits.clone().requires_grad_(True)
    s = scorer.clone().requires_grad_(True)

    def f(x, sx):
        out = remit_ext.token_stats(x, targets, scorer_logits=sx, entropy=True, temperature=0.7,
                                    backend=backend)
        return out.lse, out.logprob, out.entropy, out.scorer_lse, out.scorer_logprob

    assert torch.autograd.gradcheck(f, (z, s), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_confident_rows_logprob_is_relatively_accurate(backend, temperature):
    # p(target) -> 1: a = -log1p(off-max mass) ~ -1e-7. fp32 z_y - LSE(z) (lse rounded to
    # ~1e-7 absolute) loses every digit; every backend must keep a to 1e-3 relative (the torch
    # one through the reference's log1p form). With a temperature
    # the scaled row must be rounded before the max is subtracted (a fused multiply-add there
    # would leave the max's own term != 1 and could make a > 0).
    logits, _, targets = make_pair((2, 32, 1025), torch.float32, seed=28)
    logits = confident_rows(logits, targets)
    got = remit_ext.token_stats(logits, targets, temperature=temperature, backend=backend).logprob
    valid = targets != IGNORE
    # The truth as -log1p(sum_{j != y} exp((z_j - z_y) / T)) in fp64 (y is each row's argmax):
    # z_y - LSE(z) would cancel ~40 against ~40 and keep no digit of a ~ -1e-12 even in fp64.
    z = logits.double() / temperature
    zy = z.gather(-1, targets.clamp(min=0)[..., None])
    off = torch.exp(z - zy).scatter(-1, targets.clamp(min=0)[..., None], 0.0).sum(-1)
    truth = torch.where(valid, -torch.log1p(off), 0.0)
    g, t = got[valid].double(), truth[valid]
    assert bool((t < 0).all()) and float(t.abs().max()) < 1e-5
    assert bool((g <= 0).all()), "a log-probability above 0"
    rel = float(((g - t) / t).abs().max())
    assert rel < 1e-3, f"log-prob relative error {rel:.2e} on confident rows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_confident_rows_logprob_backward(backend, temperature, with_entropy):
    # p(target) -> 1: d a / d z_y = (1 - p_y) / T ~ 1e-7 must come from expm1(a), not from a
    # p_y rounded to 1 (which gives exactly 0 on every row).
    logits, _, targets = make_pair((2, 32, 1025), torch.float32, seed=29)
    logits = confident_rows(logits, targets)
    z = logits.clone().requires_grad_(True)
    out = remit_ext.token_stats(z, targets, temperature=temperature, entropy=with_entropy,
                                backend=backend)
    (grad,) = torch.autograd.grad(out.logprob.sum(), z)
    # The truth in fp64 from its log1p form (y is each row's argmax): (1 - p_y) / T on the
    # target column, as -expm1(a) / T with a = -log1p(sum_{j != y} exp((z_j - z_y) / T)).
    valid = targets != IGNORE
    idx = targets.clamp(min=0)[..., None]
    x = logits.double() / temperature
    off = torch.exp(x - x.gather(-1, idx)).scatter(-1, idx, 0.0).sum(-1)
    want = -torch.expm1(-torch.log1p(off)) / temperature
    g, t = grad.gather(-1, idx).squeeze(-1)[valid].double(), want[valid]
    assert bool((t > 0).all()) and float(t.max()) < 1e-5, "rows are not confident"
    rel = float(((g - t) / t).abs().max())
    assert rel < 1e-3, f"target-logit gradient relative error {rel:.2e} on confident rows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_rows_all_neg_inf_but_target(backend, dtype):
    logits, _, targets = make_pair((2, 6, 40), dtype, seed=29, ignore_frac=0.0)
    z = logits.clone()
    # Row (0, 0): only the target is finite. Row (1, 3): target and one other class finite.
    z[0, 0] = float("-inf")
    z[0, 0, targets[0, 0]] = 1.5
    other = (int(targets[1, 3]) + 1) % 40
    z[1, 3] = float("-inf")
    z[1, 3, targets[1, 3]] = 0.25
    z[1, 3, other] = -0.5
    out = remit_ext.token_stats(z, targets, entropy=True, backend=backend)
    assert float(out.logprob[0, 0]) == 0.0 and float(out.entropy[0, 0]) == 0.0
    assert float(out.lse[0, 0]) == 1.5
    _check_against_ref(z, targets, backend=backend, grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_neg_inf_logits_give_finite_gradient(backend, with_entropy):
    # The exact gradients on a row with -inf logits: d lse = p, d a = onehot - p,
    # d H = -p (log p + H), all 0 at the -inf classes. NaN must never be invented (section 5),
    # whether or not the entropy (and its cotangent) is part of the call.
    z = torch.tensor([[float("-inf"), 0.3, float("-inf"), -0.4, 1.0],
                      [float("-inf"), float("-inf"), 2.0, float("-inf"), float("-inf")]],
                     dtype=torch.float64, device=DEVICE)
    y = torch.tensor([1, 2], device=DEVICE)
    x = z.clone().requires_grad_(True)
    out = remit_ext.token_stats(x, y, entropy=with_entropy, backend=backend)
    stats = [out.lse, out.logprob] + ([out.entropy] if with_entropy else [])
    cots = [torch.tensor(c, dtype=torch.float64, device=DEVICE)
            for c in ([0.7, -1.1], [1.3, 0.4], [-0.9, 2.0])][:len(stats)]
    grad = _vjp(stats, cots, x)
    p = torch.softmax(z, -1)
    logp = torch.where(p > 0, torch.log_softmax(z, -1), 0)
    h = -(p * logp).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    expected = cots[0][:, None] * p + cots[1][:, None] * (onehot - p)
    if with_entropy:
        expected = expected - cots[2][:, None] * p * (logp + h)
    nan = torch.isnan(grad)
    assert not bool(nan.any()), f"NaN invented in the gradient at {nan.nonzero().tolist()}"
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_where_probabilities_underflow(backend):
    # Finite fp32 logits whose smallest softmax entry underflows to 0 in fp32 (e^-110): the
    # entropy gradient is finite (~ -p (log p + H) ~ 0 there) and must not come back NaN.
    z = torch.tensor([[46.2299, -8.8029], [0.5, -0.25]], dtype=torch.float32, device=DEVICE)
    y = torch.tensor([1, 0], device=DEVICE)
    x = z.clone().requires_grad_(True)
    out = remit_ext.token_stats(x, y, entropy=True, temperature=0.5, backend=backend)
    (grad,) = torch.autograd.grad(out.entropy.sum(), x)
    x64 = z.double().requires_grad_(True)
    h = token_stats_ref(x64, y, temperature=0.5)[2]
    (truth,) = torch.autograd.grad(h.sum(), x64)
    assert bool(torch.isfinite(truth).all())
    nan = torch.isnan(grad)
    assert not bool(nan.any()), f"NaN invented in the entropy gradient at {nan.nonzero().tolist()}"
    torch.testing.assert_close(grad.double(), truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
def test_nan_and_inf_rows(backend, bad):
    logits, _, targets = make_pair((1, 6, 17), torch.float32, seed=30, ignore_frac=0.0)
    if bad == "all -inf":
        logits[0, 2] = float("-inf")
    else:
        logits[0, 2, 3] = float(bad.lstrip("+"))
    got = _api(logits, targets, backend, grad=False)
    truth = _ref(logits.double(), targets, grad=False)
    for name, g, t in zip(STATS, got, truth):
        # NaN / inf exactly where the reference has them; the other rows stay untouched.
        assert_close_to_truth(g, t, _ref(logits, targets, grad=False)[STATS.index(name)],
                              name=f"{backend}/{name}")
    assert bool(torch.isnan(got[1][0, 2])), "an undefined softmax gives a NaN log-prob"
    assert bool(torch.isfinite(got[1][0, :2]).all()) and bool(torch.isfinite(got[1][0, 3:]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_vocab_of_one(backend, dtype):
    logits, _, targets = make_pair((7, 1), dtype, seed=31, ignore_frac=0.0)
    targets = torch.zeros_like(targets)
    targets[3] = IGNORE
    got = _check_against_ref(logits, targets, backend=backend)
    valid = targets != IGNORE
    assert torch.equal(got[0][valid], logits[valid, 0].float())
    assert bool((got[1] == 0).all()) and bool((got[2] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [5e3, -5e3])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_large_logits_keep_fp32_accuracy(backend, offset, temperature):
    # Logits ~ +-5e3 with a spread of a few units (a large common offset, as a model trained
    # without a z-loss drifts to): fp32 spacing there is 2^-11 ~ 4.9e-4 (2^-10 at z / 0.5, an
    # exact scaling). The truth is taken in fp64 from the same fp32 values, so what remains is
    # the kernels' own arithmetic, with eps = 2^-23:
    # - lse = m + log s is one rounding of a ~5e3 number: |err| <= eps/2 |lse|.
    # - a = (x_y - m) - log s and H = log s - t/s: x_y - m is exact (Sterbenz), so both are
    #   O(1..30) numbers formed in fp32: |err| ~ eps (|a| + log V). Formed as x_y - lse they
    #   would be off by lse's rounding, up to 2^-12 ~ 2.4e-4 (a hundred times that bound).
    # - the gradient: p_v = e^{x_v - LSE}, so an error in the exponent is a relative error of
    #   p_v. From the rounded lse it is up to 2.4e-4 (4.9e-4 at T = 0.5); with the rounding
    #   recovered from a (its own error ~ eps |a|), exp's ulps and log s's error, the exponent
    #   is off by ~eps (|a| + log V): checked per row, relative to the row's largest entry off
    #   the target column (the target entry comes from expm1(a): the confident-row tests).
    # The torch backend, fp32 too, reaches the same bounds, except through torch.logsumexp's
    # autograd (PyTorch's e^{z - lse} from the rounded lse): there the lse cotangent is 0.
    logits, _, targets = make_pair((2, 32, 1025), torch.float32, seed=41)
    logits = logits + offset
    V = logits.shape[-1]
    cots = _cotangents(targets)
    if backend == "torch":
        cots[0] = torch.zeros_like(cots[0])
    z64 = logits.double().requires_grad_(True)
    truth = [s.reshape(targets.shape) for s in token_stats_ref(
        z64.reshape(-1, V), targets.reshape(-1), temperature=temperature)]
    z = logits.clone().requires_grad_(True)
    out = remit_ext.token_stats(z, targets, entropy=True, temperature=temperature,
                                backend=backend)
    got = [out.lse, out.logprob, out.entropy]
    eps = torch.finfo(torch.float32).eps
    valid = targets != IGNORE
    scale = {"lse": truth[0].abs(), "logprob": truth[1].abs() + math.log(V),
             "entropy": truth[2].abs() + math.log(V)}
    for name, g, t in zip(STATS, got, truth):
        assert bool((g[~valid] == 0).all())
        err = float(((g.double() - t).abs() / scale[name])[valid].max()) / eps
        assert err <= 4, f"{backend}/{name}: error {err:.1f} eps x scale"
    grad, want = _vjp(got, cots, z).double(), _vjp(truth, cots, z64)
    err = off_target_error(grad, want, targets, truth[1])
    assert err <= 8, f"{backend}/grad: error {err:.1f} eps (|a| + log V) x the row's largest"
    assert bool((grad[~valid] == 0).all())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])  # CUDA: no top-k < V
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_entropy_of_large_logits(backend, renormalize):
    # As test_large_logits_keep_fp32_accuracy: each log p_j = (x_j - m) - log s is an O(1)
    # number, so -sum_j p_j log p_j over the 16 largest keeps ~eps (|H_k| + log V); formed from
    # x_j - lse with lse rounded, every term was off by up to 2.4e-4.
    logits, _, targets = make_pair((2, 16, 1025), torch.float32, seed=42)
    logits = logits + 5e3
    V = logits.shape[-1]
    out = remit_ext.token_stats(logits, targets, topk=16, topk_renormalize=renormalize,
                                backend=backend)
    truth = topk_entropy_ref(logits.reshape(-1, V).double(), 16,
                             renormalize=renormalize).reshape(targets.shape)
    valid = targets != IGNORE
    eps = torch.finfo(torch.float32).eps
    err = float(((out.topk_entropy.double() - truth).abs() / (truth.abs() + math.log(V)))[valid]
                .max()) / eps
    assert err <= 8, f"{backend}/topk_entropy: error {err:.1f} eps (|H_k| + log V)"
