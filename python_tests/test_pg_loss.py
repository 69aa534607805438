"""The RMT/GRPO policy-gradient term (METHODS.md section 4), every backend against pg_loss_ref in
fp64: the plain form -A a, the PPO-clipped form (old log-probs chosen so that both sides of the
clip are active), the k3 KL term, the per-token scale, ignored positions and every reduction;
the logits gradient, the in-place backward, fp64 gradcheck, the details (log-probs, clip
fraction), opcheck, torch.compile, a case worked out by hand and the argument checks."""

import math

import pytest
import torch
from torch.library import opcheck

import remit_ext
from remit_ext.reference import pg_loss_ref, target_logprob_ref
from remit_ext.testing import FLOOR_RTOL, assert_close_to_truth
from cases import IGNORE, SHAPES, make_logits, make_targets
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS, LOW_DTYPES

if "triton" in KERNEL_BACKENDS:
    import remit_ext.triton  # noqa: F401  (registers torch.ops.remit_ext_triton)

CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # asymmetric, so a swapped band would show
KL_BETA = 0.05
FORMS = {
    "plain": dict(clipped=False, kl=False),
    "clipped": dict(clipped=True, kl=False),
    "kl": dict(clipped=False, kl=True),
    "clipped_kl": dict(clipped=True, kl=True),
}
# The op namespaces with a pg_loss_fwd kernel: the C++ library (CPU, or CUDA on a GPU) and Triton.
NAMESPACES = sorted({"remit_ext" if b in ("cpu", "cuda") else "remit_ext_triton"
                     for b in KERNEL_BACKENDS})


def _log_ratios(n, generator):
    """log(pi / pi_old) per token, drawn from three bands around the clip edges log(1 - 0.2) =
    -0.22 and log(1 + 0.28) = 0.25, never within 0.1 of them: below the band, inside it, above
    it. The kernels' log-probs differ from the fp64 truth by far less than that margin, so no
    token's clip decision (where the slope jumps from -rho A to 0) can differ from the truth's."""
    band = torch.randint(0, 3, (n,), generator=generator)
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    lo = torch.tensor([-0.6, -0.1, 0.35], dtype=torch.float64)[band]
    return lo + u * 0.25


def make_inputs(shape, dtype, *, seed, form="clipped_kl", scaled=True, ignore_frac=0.2,
                per_token_dtype=torch.float32):
    """(logits, actions, kwargs for policy_gradient_loss / pg_loss_ref). Old and reference
    log-probs are set relative to the fp64 log-probs of the logits as given (after rounding to
    `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(shape, dtype, generator=g)
    actions = make_targets(shape[:-1], shape[-1], ignore_frac=ignore_frac, generator=g)
    tokens = actions.shape
    a = target_logprob_ref(logits.double().reshape(-1, shape[-1]), actions.reshape(-1),
                           ignore_index=IGNORE).reshape(tokens).cpu()
    n = actions.numel()

    def put(x):
        return x.reshape(tokens).to(DEVICE, per_token_dtype)

    kwargs = dict(advantages=put(torch.randn(n, dtype=torch.float64, generator=g)))
    if scaled:
        kwargs["scale"] = put(0.5 + torch.rand(n, dtype=torch.float64, generator=g))
    if FORMS[form]["clipped"]:
        kwargs["old_logprobs"] = put(a.reshape(-1) - _log_ratios(n, g))
    if FORMS[form]["kl"]:
        kwargs["ref_logprobs"] = put(a.reshape(-1) + 0.3 * torch.randn(n, dtype=torch.float64,
                                                                       generator=g))
        kwargs["kl_beta"] = KL_BETA
    return logits, actions, kwargs


def _clip_counts(logits, actions, kwargs):
    """(# tokens clipped above the band, # clipped below it, # valid), by hand from the fp64
    log-probs. A token's clip is active when the clipped branch is the minimum with zero slope:
    A > 0 and rho > 1 + clip_high, or A < 0 and rho < 1 - clip_low. A = 0 makes both branches
    0 with zero slope: nothing is clipped (TRL and Liger count it so too)."""
    v = logits.shape[-1]
    a = target_logprob_ref(logits.double().reshape(-1, v), actions.reshape(-1),
                           ignore_index=IGNORE).tolist()
    adv = kwargs["advantages"].reshape(-1).tolist()
    old = kwargs["old_logprobs"].reshape(-1).tolist()
    above = below = valid = 0
    for t, y in enumerate(actions.reshape(-1).tolist()):
        if y == IGNORE:
            continue
        valid += 1
        rho = math.exp(a[t] - old[t])
        above += adv[t] > 0 and rho > 1 + CLIP_HIGH
        below += adv[t] < 0 and rho < 1 - CLIP_LOW
    return above, below, valid


def _cotangent(actions, reduction, seed=3):
    if reduction != "none":
        return torch.ones((), dtype=torch.float64, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(actions.shape, generator=g, dtype=torch.float64).to(DEVICE)


def _loss_and_grad(fn, logits, actions, reduction):
    z = logits.detach().clone().requires_grad_(True)
    loss = fn(z)
    cot = _cotangent(actions, reduction).to(loss.dtype)
    (grad,) = torch.autograd.grad((loss * cot).sum(), z)
    return loss.detach(), grad


def _ref(logits, actions, kwargs, reduction="mean"):
    v = logits.shape[-1]
    kw = {k: (x.reshape(-1) if isinstance(x, torch.Tensor) else x) for k, x in kwargs.items()}
    adv = kw.pop("advantages")

    def fn(z):
        loss = pg_loss_ref(z.reshape(-1, v), actions.reshape(-1), adv, clip_low=CLIP_LOW,
                           clip_high=CLIP_HIGH, ignore_index=IGNORE, reduction=reduction, **kw)
        return loss.reshape(actions.shape) if reduction == "none" else loss

    return _loss_and_grad(fn, logits, actions, reduction)


def _api(logits, actions, kwargs, reduction="mean", backend="auto", inplace=False):
    kw = dict(kwargs)
    adv = kw.pop("advantages")

    def fn(z):
        return remit_ext.policy_gradient_loss(
            z, actions, adv, clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH, reduction=reduction,
            inplace_backward=inplace, backend=backend, **kw)

    return _loss_and_grad(fn, logits, actions, reduction)


def _check_against_ref(logits, actions, kwargs, *, backend, reduction="mean"):
    # The truth: the reference in fp64 on the same (rounded) logits and per-token inputs; the
    # baseline: the reference at the kernels' working precision.
    truth = _ref(logits.double(), actions,
                 {k: (x.double() if isinstance(x, torch.Tensor) else x)
                  for k, x in kwargs.items()}, reduction)
    base = _ref(logits, actions, kwargs, reduction)
    got = _api(logits, actions, kwargs, reduction, backend)
    # A reduced loss sums signed terms that can cancel to far below their size: its floor is
    # relative to the reduction of |loss_t| (what the rounding of each term scales with), not
    # to the result. Per-token outputs and gradients keep the default floor.
    floors = [None, None]
    if reduction != "none":
        mass = float(_ref(logits.double(), actions, {k: (x.double() if isinstance(
            x, torch.Tensor) else x) for k, x in kwargs.items()}, "none")[0].abs().sum())
        if reduction == "mean":
            mass /= max(int((actions != IGNORE).sum()), 1)
        floors[0] = FLOOR_RTOL[got[0].dtype] * mass / max(float(truth[0].abs()), 1e-300)
    for name, g, t, b, floor in zip(("loss", "grad"), got, truth, base, floors):
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(t.shape)}"
        assert_close_to_truth(g, t, b, floor_rtol=floor, name=f"{backend}/{name}")
    assert got[0].dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert got[1].dtype == logits.dtype, "gradient must come back in the logits' dtype"
    return got


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
def test_matches_reference(backend, dtype, form, scaled):
    # Per token (reduction 'none', a random upstream gradient): each term at its own scale.
    logits, actions, kwargs = make_inputs((2, 19, 257), dtype, seed=300, form=form,
                                          scaled=scaled)
    if FORMS[form]["clipped"]:
        above, below, _ = _clip_counts(logits, actions, kwargs)
        assert above > 0 and below > 0, "inputs must hit both sides of the clip"
    _check_against_ref(logits, actions, kwargs, backend=backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ragged_shapes(backend, shape):
    logits, actions, kwargs = make_inputs(shape, torch.float32, seed=hash(shape) % 1000 + 301)
    _check_against_ref(logits, actions, kwargs, backend=backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction):
    logits, actions, kwargs = make_inputs((3, 17, 129), torch.float32, seed=302)
    loss, _ = _check_against_ref(logits, actions, kwargs, backend=backend, reduction=reduction)
    if reduction == "none":
        assert loss.shape == actions.shape
        assert bool((loss[actions == IGNORE] == 0).all())
    else:
        assert loss.dim() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_divides_by_valid_count(backend):
    logits, actions, kwargs = make_inputs((2, 21, 65), torch.float64, seed=303)
    kw = dict(kwargs)
    adv = kw.pop("advantages")
    mean = remit_ext.policy_gradient_loss(logits, actions, adv, clip_eps=CLIP_LOW,
                                          clip_eps_high=CLIP_HIGH, backend=backend, **kw)
    total = remit_ext.policy_gradient_loss(logits, actions, adv, clip_eps=CLIP_LOW,
                                           clip_eps_high=CLIP_HIGH, reduction="sum",
                                           backend=backend, **kw)
    n_valid = int((actions != IGNORE).sum())
    torch.testing.assert_close(mean, total / n_valid, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grad(backend, reduction):
    logits, actions, kwargs = make_inputs((2, 9, 33), torch.float32, seed=304)
    actions = torch.full_like(actions, IGNORE)
    loss, grad = _api(logits, actions, kwargs, reduction, backend)
    assert not bool(torch.isnan(loss).any()) and bool((loss == 0).all())
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_actions(backend):
    logits, actions, kwargs = make_inputs((2, 11, 65), torch.float32, seed=305)
    expected = _api(logits, actions, kwargs, "none", backend)
    got = _api(logits, actions.to(torch.int32), kwargs, "none", backend)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    logits, actions, kwargs = make_inputs((1, 6, 17), torch.float32, seed=306, ignore_frac=0.0)
    logits[0, 2, 3] = float("inf")
    loss, grad = _api(logits, actions, kwargs, "none", backend)
    t_loss, t_grad = _ref(logits.double(), actions,
                          {k: (x.double() if isinstance(x, torch.Tensor) else x)
                           for k, x in kwargs.items()}, "none")
    assert torch.equal(torch.isnan(loss), torch.isnan(t_loss)) and bool(torch.isnan(loss).any())
    assert torch.equal(torch.isnan(grad), torch.isnan(t_grad))


# ------------------------------------------------------------------ a case worked by hand


def _log_softmax(row):
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["plain", "clipped_kl"])
def test_hand_computed_tiny_case(backend, form):
    # V = 3, two tokens. Token 0: A = 1.5 and rho = 1.5 > 1 + clip_high (clipped, zero slope);
    # token 1: A = -0.5 and rho = 0.9 inside the band (slope -rho A). KL with d = ref - a =
    # 0.3 and -0.2, beta = 0.1; scale 0.5 and 2.
    z = [[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]]
    y = [1, 0]
    adv, scale, beta = [1.5, -0.5], [0.5, 2.0], 0.1
    logp = [_log_softmax(row) for row in z]
    a = [logp[t][y[t]] for t in range(2)]
    kw = {}
    if form == "plain":
        loss_t = [-adv[t] * a[t] for t in range(2)]
        slope = [-adv[t] for t in range(2)]
    else:
        rho, d = [1.5, 0.9], [0.3, -0.2]
        kw = dict(old_logprobs=[a[t] - math.log(rho[t]) for t in range(2)],
                  ref_logprobs=[a[t] + d[t] for t in range(2)], scale=scale, kl_beta=beta)
        # -min(rho A, clip(rho, 1 - 0.2, 1 + 0.28) A): token 0 takes the clipped 1.28 * 1.5,
        # token 1 the plain 0.9 * -0.5 (0.9 is inside the band).
        pg = [-min(rho[t] * adv[t], min(max(rho[t], 0.8), 1.28) * adv[t]) for t in range(2)]
        kl = [math.exp(d[t]) - d[t] - 1 for t in range(2)]
        loss_t = [scale[t] * (pg[t] + beta * kl[t]) for t in range(2)]
        pg_slope = [0.0, -0.9 * -0.5]
        slope = [scale[t] * (pg_slope[t] + beta * (1 - math.exp(d[t]))) for t in range(2)]
        assert pg[0] == -1.28 * 1.5 and pg[1] == 0.45
    # d loss_t / d z_tv = slope_t * (1[v == y_t] - p_tv)
    grad = [[slope[t] * ((v == y[t]) - math.exp(logp[t][v])) for v in range(3)]
            for t in range(2)]

    f64 = dict(dtype=torch.float64, device=DEVICE)
    logits = torch.tensor(z, **f64, requires_grad=True)
    kw = {k: torch.tensor(x, **f64) if isinstance(x, list) else x for k, x in kw.items()}
    out = remit_ext.policy_gradient_loss(
        logits, torch.tensor(y, device=DEVICE), torch.tensor(adv, **f64), clip_eps=CLIP_LOW,
        clip_eps_high=CLIP_HIGH, reduction="none", backend=backend, **kw)
    torch.testing.assert_close(out, torch.tensor(loss_t, **f64), rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(out.sum(), logits)
    torch.testing.assert_close(g, torch.tensor(grad, **f64), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ backward, details


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_inplace_backward(backend, dtype):
    logits, actions, kwargs = make_inputs((2, 15, 1025), dtype, seed=310)
    expected = _api(logits, actions, kwargs, backend=backend)
    kw = dict(kwargs)
    adv = kw.pop("advantages")
    z = logits.clone().requires_grad_(True)
    buf = z.detach()
    loss = remit_ext.policy_gradient_loss(z, actions, adv, clip_eps=CLIP_LOW,
                                          clip_eps_high=CLIP_HIGH, inplace_backward=True,
                                          backend=backend, **kw)
    assert torch.equal(loss.detach(), expected[0])
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.data_ptr() == buf.data_ptr(), "the gradient must live in the logits buffer"
    assert torch.equal(grad, expected[1])


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="cpu kernels not built")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fp64(form, reduction):
    logits, actions, kwargs = make_inputs((2, 4, 5), torch.float64, seed=311, form=form,
                                          ignore_frac=0.25, per_token_dtype=torch.float64)
    kw = dict(kwargs)
    adv = kw.pop("advantages")

    def f(x):
        return remit_ext.policy_gradient_loss(x, actions, adv, clip_eps=CLIP_LOW,
                                              clip_eps_high=CLIP_HIGH, reduction=reduction,
                                              backend="cpu", **kw)

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-6,
                                    atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["plain", "clipped_kl"])
def test_return_details(backend, form):
    logits, actions, kwargs = make_inputs((3, 13, 65), torch.float32, seed=312, form=form)
    kw = dict(kwargs)
    adv = kw.pop("advantages")
    out = remit_ext.policy_gradient_loss(logits, actions, adv, clip_eps=CLIP_LOW,
                                         clip_eps_high=CLIP_HIGH, return_details=True,
                                         backend=backend, **kw)
    assert isinstance(out, remit_ext.PolicyGradientOutput)
    plain = remit_ext.policy_gradient_loss(logits, actions, adv, clip_eps=CLIP_LOW,
                                           clip_eps_high=CLIP_HIGH, backend=backend, **kw)
    assert torch.equal(out.loss, plain)
    truth = target_logprob_ref(logits.double().reshape(-1, 65), actions.reshape(-1),
                               ignore_index=IGNORE).reshape(actions.shape)
    assert out.logprobs.shape == actions.shape and not out.logprobs.requires_grad
    torch.testing.assert_close(out.logprobs.double(), truth, rtol=1e-5, atol=1e-5)
    assert bool((out.logprobs[actions == IGNORE] == 0).all())
    if form == "plain":
        assert float(out.clip_frac) == 0.0
    else:
        above, below, valid = _clip_counts(logits, actions, kwargs)
        assert above > 0 and below > 0
        assert float(out.clip_frac) == pytest.approx((above + below) / valid, abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_frac_zero_advantage_is_not_clipped(backend):
    # GRPO groups whose rewards all tie give advantage exactly 0 to every token of the group:
    # such a token has no gradient whichever branch is the minimum, so it is not clipped. Half
    # of the tokens here have A = 0, with ratios on both sides of the band.
    logits, actions, kwargs = make_inputs((3, 13, 65), torch.float32, seed=313, form="clipped")
    adv = kwargs["advantages"].clone()
    adv.reshape(-1)[::2] = 0
    kwargs["advantages"] = adv
    kw = dict(kwargs)
    out = remit_ext.policy_gradient_loss(logits, actions, kw.pop("advantages"),
                                         clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH,
                                         return_details=True, backend=backend, **kw)
    above, below, valid = _clip_counts(logits, actions, kwargs)
    assert above > 0 and below > 0
    # Some A = 0 tokens lie above the band: the ones a ">= 0" test would count as clipped.
    a = target_logprob_ref(logits.double().reshape(-1, 65), actions.reshape(-1),
                           ignore_index=IGNORE)
    rho = torch.exp(a - kwargs["old_logprobs"].reshape(-1).double())
    zero_above = (adv.reshape(-1) == 0) & (actions.reshape(-1) != IGNORE) & (rho > 1 + CLIP_HIGH)
    assert int(zero_above.sum()) > 0
    assert float(out.clip_frac) == pytest.approx((above + below) / valid, abs=1e-7)


# ------------------------------------------------------------------ registration


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("form", ["plain", "clipped_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(namespace, form, dtype):
    logits, actions, kwargs = make_inputs((2, 7, 33), dtype, seed=320, form=form)
    z = logits.reshape(-1, 33).requires_grad_(True)

    def flat(name):
        x = kwargs.get(name)
        return None if x is None else x.reshape(-1)

    args = (z, actions.reshape(-1), flat("advantages"), flat("scale"), flat("old_logprobs"),
            flat("ref_logprobs"), IGNORE, CLIP_LOW, CLIP_HIGH, kwargs.get("kl_beta", 0.0), False)
    opcheck(getattr(torch.ops, namespace).pg_loss_fwd, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    logits, actions, kwargs = make_inputs((2, 9, 65), torch.float32, seed=321)
    kw = dict(kwargs)
    adv = kw.pop("advantages")

    def f(z):
        out = remit_ext.policy_gradient_loss(z, actions, adv, clip_eps=CLIP_LOW,
                                             clip_eps_high=CLIP_HIGH, return_details=True,
                                             backend=backend, **kw)
        return out.loss, out.clip_frac

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        z = logits.detach().clone().requires_grad_(True)
        loss, clip_frac = fn(z)
        (grad,) = torch.autograd.grad(loss, z)
        results.append((loss.detach(), clip_frac, grad))
    for e, g in zip(*results):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_logprobs_minus_inf(backend):
    # pi_old(action) = 0: rho = exp(a - old) = +inf. With A > 0 the clipped branch (1 + eps) A
    # is the minimum, slope 0; with A = 0 both branches are 0, slope 0: a finite loss and a zero
    # gradient for those tokens on every backend (the torch backend gave NaN gradients: the
    # clamp's zero slope times exp's infinite one). With A < 0 the unclipped branch rho A =
    # -inf is the minimum: PPO's pessimistic bound is unbounded, the loss +inf on every backend.
    logits, actions, kwargs = make_inputs((1, 12, 17), torch.float32, seed=314, form="clipped",
                                          scaled=False, ignore_frac=0.0)
    adv = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.3] * 2, device=DEVICE).reshape(1, 12)
    old = kwargs["old_logprobs"].clone()
    old[0, :6] = -math.inf
    z = logits.detach().clone().requires_grad_(True)
    out = remit_ext.policy_gradient_loss(z, actions, adv, old_logprobs=old, clip_eps=CLIP_LOW,
                                         clip_eps_high=CLIP_HIGH, reduction="none",
                                         backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all())
    # Those tokens: loss -(1 + clip_high) A, gradient 0; the rest as the fp64 reference gives.
    want = -(1 + CLIP_HIGH) * adv[0, :6].double()
    torch.testing.assert_close(out[0, :6].double(), want, rtol=1e-6, atol=1e-7)
    assert bool((grad[0, :6] == 0).all())
    tail = dict(kwargs, advantages=adv[:, 6:], old_logprobs=old[:, 6:])
    tail = {k: v.double() for k, v in tail.items()}
    loss_t = _ref(logits[:, 6:].double(), actions[:, 6:], tail, "none")[0]
    grad_t = _ref(logits[:, 6:].double(), actions[:, 6:], tail, "sum")[1]
    torch.testing.assert_close(out[:, 6:].detach().double(), loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[:, 6:].double(), grad_t, rtol=1e-5, atol=1e-6)
    neg = remit_ext.policy_gradient_loss(
        logits, actions, -adv.abs() - 0.1, old_logprobs=old, clip_eps=CLIP_LOW,
        clip_eps_high=CLIP_HIGH, reduction="none", backend=backend)
    assert bool((neg[0, :6] == math.inf).all()) and bool(torch.isfinite(neg[0, 6:]).all())


# ------------------------------------------------------------------ argument checks


@pytest.mark.parametrize("change, exc, pattern", [
    (lambda a: dict(advantages=a["advantages"][:, :4]), ValueError,
     r"advantages: expected shape \(2, 5\)"),
    (lambda a: dict(advantages=a["advantages"].long()), TypeError,
     r"advantages: expected a floating dtype, got torch.int64"),
    (lambda a: dict(actions=torch.where(a["actions"] == IGNORE, 0, a["actions"] + 11)),
     ValueError, r"actions: expected values in \[0, 11\) or ignore_index=-100"),
    (lambda a: dict(ref_logprobs=None), ValueError, r"kl_beta: 0.05 > 0 needs ref_logprobs"),
    (lambda a: dict(clip_eps=1.0), ValueError, r"clip_eps: expected a number in \(0, 1\)"),
    (lambda a: dict(kl_beta=-0.1), ValueError, r"kl_beta: expected a finite number >= 0"),
    (lambda a: dict(kl_beta=math.nan), ValueError,
     r"kl_beta: expected a finite number >= 0, got nan"),
    (lambda a: dict(kl_beta=math.inf), ValueError,
     r"kl_beta: expected a finite number >= 0, got inf"),
    (lambda a: dict(scale=a["scale"].reshape(-1)), ValueError, r"scale: expected shape"),
    (lambda a: dict(old_logprobs=a["old_logprobs"].to(torch.int32)), TypeError,
     r"old_logprobs: expected a floating dtype"),
])
def test_bad_input(change, exc, pattern):
    logits, actions, kwargs = make_inputs((2, 5, 11), torch.float32, seed=330)
    args = dict(kwargs, actions=actions)
    args.update(change(args))
    args.setdefault("clip_eps", CLIP_LOW)
    adv = args.pop("advantages")
    # "sync": the action-range error raises on a GPU too (test_validation.py).
    with remit_ext.validation("sync"), pytest.raises(exc, match=pattern):
        remit_ext.policy_gradient_loss(logits, args.pop("actions"), adv, **args)


DIRECT_CASES = [
    ("short_advantages", r"advantages: expected shape \[10\], got \[9\]"),
    ("int_advantages", r"advantages: expected a floating dtype"),
    ("short_scale", r"scale: expected shape \[10\], got \[9\]"),
    ("kl_without_ref", r"kl_beta: 0.1 > 0 needs ref_logprob"),
    ("clip_low", r"clip_low: expected a value in \[0, 1\), got 1"),
    ("kl_beta", r"kl_beta: expected a value >= 0, got -1"),
    ("bad_action", r"actions: expected values in \[0, 11\) or ignore_index=-100, got 99"),
]


@pytest.mark.parametrize("namespace, case, pattern", [
    (ns, case, pattern) for ns in NAMESPACES for case, pattern in DIRECT_CASES])
def test_direct_op_calls_check_too(namespace, case, pattern):
    # A direct torch.ops call gets the checks too: the kernels index the per-token tensors.
    ops = getattr(torch.ops, namespace)
    z = make_logits((10, 11), torch.float32)
    y = torch.arange(10, device=DEVICE)
    adv, scale, ref, clip_low, beta = torch.ones(10, device=DEVICE), None, None, 0.2, 0.0
    if case == "short_advantages":
        adv = adv[:9]
    elif case == "int_advantages":
        adv = adv.long()
    elif case == "short_scale":
        scale = adv[:9]
    elif case == "kl_without_ref":
        beta = 0.1
    elif case == "clip_low":
        clip_low = 1.0
    elif case == "kl_beta":
        beta, ref = -1.0, adv
    elif case == "bad_action":
        y[3] = 99
        if namespace == "remit_ext_triton" or DEVICE.type == "cuda":
            # Target values: the C++ CPU kernel refuses a bad one where it reads it; the GPU
            # kernels (CUDA, and Triton on any device) cannot raise without a host sync, so
            # they give NaN at that token, and only there (the public API checks values first).
            loss, _, logprob, _ = ops.pg_loss_fwd(z, y, adv, scale, None, ref, IGNORE, clip_low,
                                                  0.2, beta, False)
            bad = torch.arange(10, device=DEVICE) == 3
            assert bool(logprob[bad].isnan().all()) and bool(loss[bad].isnan().all())
            assert bool(logprob[~bad].isfinite().all()) and bool(loss[~bad].isfinite().all())
            return
    with pytest.raises(ValueError, match=pattern):
        ops.pg_loss_fwd(z, y, adv, scale, None, ref, IGNORE, clip_low, 0.2, beta, False)
