"""The baselines that share the machinery (METHODS.md section 3), every backend against the
references: Rho-1 selective LM (rho1_loss_ref) and distillation (kd_loss_ref) — loss, logits
gradient, reductions, the token selection, fp64 gradcheck and the KD identities."""

import math

import pytest
import torch

import remit_ext
from remit_ext.reference import kd_loss_ref, rho1_loss_ref, token_stats_ref
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE, SHAPES, make_pair
from conftest import BACKENDS, KD_BACKENDS, DEVICE, LOW_DTYPES


def _cotangent(targets, reduction, seed=4):
    if reduction != "none":
        return torch.ones((), dtype=torch.float64, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(targets.shape, generator=g, dtype=torch.float64).to(DEVICE)


def _loss_and_grad(fn, logits, targets, reduction):
    z = logits.detach().clone().requires_grad_(True)
    loss = fn(z)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    (grad,) = torch.autograd.grad((loss * _cotangent(targets, reduction).to(loss.dtype)).sum(), z)
    return loss, grad


def _compare(got, truth, base, backend, logits):
    for name, g, t, b in zip(("loss", "grad"), got, truth, base):
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(t.shape)}"
        assert_close_to_truth(g, t, b, name=f"{backend}/{name}")
    assert got[1].dtype == logits.dtype, "gradient must come back in the logits' dtype"


# ------------------------------------------------------------------------------------ Rho-1


def _policy_logprob(logits, targets):
    """log p_theta(y) in fp64 of the (rounded) logits, 0 at ignored positions."""
    v = logits.shape[-1]
    return token_stats_ref(logits.double().reshape(-1, v), targets.reshape(-1))[1].reshape(
        targets.shape)


def make_rho1_case(shape, dtype, *, seed, variant):
    """Policy logits, targets and a reference (logits or log-probs) whose excess loss b - a is a
    random permutation of -1, -2, ..., -N: the selection is far from any tie, so every precision
    keeps the same tokens. Returns (logits, targets, ref kwargs, excess)."""
    logits, _, targets = make_pair(shape, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    n = targets.numel()
    excess = -(torch.randperm(n, generator=g).double() + 1).reshape(targets.shape).to(DEVICE)
    b = _policy_logprob(logits, targets) + excess
    if variant == "ref_logprobs":
        return logits, targets, {"ref_logprobs": b.float()}, excess
    # A row of zeros with the target logit c has log p(y) = c - log(e^c + V - 1) = b, i.e.
    # c = b + log(V - 1) - log(-expm1(b)); b < 0 keeps it defined.
    v = shape[-1]
    c = b + math.log(v - 1) - torch.log(-torch.expm1(b))
    ref = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    y = torch.where(targets != IGNORE, targets, 0).unsqueeze(-1)
    ref = ref.scatter(-1, y, c.unsqueeze(-1))
    return logits, targets, {"ref_logits": ref.to(torch.float32)}, excess


def _expected_keep(excess, targets, keep_ratio):
    valid = (targets != IGNORE).reshape(-1)
    score = torch.where(valid, excess.reshape(-1), -math.inf)
    # ceil(k N_valid) of the exact product (0.7 * 10 is 7, not the 7.000000000000001 of floats).
    n_keep = math.ceil(round(keep_ratio * int(valid.sum()), 9))
    keep = torch.zeros_like(valid)
    keep[score.argsort(descending=True)[:n_keep]] = True
    return (keep & valid).reshape(targets.shape)


def _rho1_ref(logits, targets, ref, keep_ratio, reduction):
    v = logits.shape[-1]
    flat = {k: x.reshape(-1, v) if k == "ref_logits" else x.reshape(-1) for k, x in ref.items()}

    def fn(z):
        return rho1_loss_ref(z.reshape(-1, v), targets.reshape(-1), keep_ratio=keep_ratio,
                             reduction=reduction, **flat)

    return _loss_and_grad(fn, logits, targets, reduction)


def _rho1_api(logits, targets, ref, keep_ratio, reduction, backend):
    def fn(z):
        return remit_ext.rho1_loss(z, targets, keep_ratio=keep_ratio, reduction=reduction,
                                   backend=backend, **ref)

    return _loss_and_grad(fn, logits, targets, reduction)


def _check_rho1(logits, targets, ref, excess, *, backend, keep_ratio, reduction="mean"):
    ref64 = {k: x.double() for k, x in ref.items()}
    truth = _rho1_ref(logits.double(), targets, ref64, keep_ratio, reduction)
    base = _rho1_ref(logits, targets, ref, keep_ratio, reduction)
    got = _rho1_api(logits, targets, ref, keep_ratio, reduction, backend)
    _compare(got, truth, base, backend, logits)
    # The kept tokens, read off the per-token losses (NLL > 0 on random rows).
    per_token = _rho1_api(logits, targets, ref, keep_ratio, "none", backend)[0]
    assert torch.equal(per_token != 0, _expected_keep(excess, targets, keep_ratio))
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("variant", ["ref_logits", "ref_logprobs"])
@pytest.mark.parametrize("keep_ratio", [0.3, 0.6, 1.0])
def test_rho1_matches_reference(backend, dtype, variant, keep_ratio):
    logits, targets, ref, excess = make_rho1_case((3, 13, 257), dtype, seed=70, variant=variant)
    _check_rho1(logits, targets, ref, excess, backend=backend, keep_ratio=keep_ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rho1_shapes(backend, dtype, shape):
    logits, targets, ref, excess = make_rho1_case(shape, dtype, seed=hash(shape) % 1000 + 300,
                                                  variant="ref_logprobs")
    _check_rho1(logits, targets, ref, excess, backend=backend, keep_ratio=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("variant", ["ref_logits", "ref_logprobs"])
def test_rho1_reductions(backend, reduction, variant):
    logits, targets, ref, excess = make_rho1_case((4, 17, 129), torch.float32, seed=71,
                                                  variant=variant)
    loss = _check_rho1(logits, targets, ref, excess, backend=backend, keep_ratio=0.6,
                       reduction=reduction)[0]
    if reduction == "none":
        assert loss.shape == targets.shape
        assert bool((loss[targets == IGNORE] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho1_hand_checked_selection_with_ties(backend):
    # Six positions, one ignored, five valid; identical rows give identical a, so the excess
    # b - a ties exactly where b does. keep_ratio 0.6 keeps ceil(0.6 * 5) = 3 tokens: position 1
    # (largest excess), then of the tie at positions 0, 2, 3 the two earliest. The ignored
    # position 4 has the largest b of all and must never be kept.
    row = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4], device=DEVICE)
    logits = row.expand(6, 5).contiguous()
    targets = torch.tensor([1, 1, 1, 1, IGNORE, 1], device=DEVICE)
    ref_logprobs = torch.tensor([-1.0, 1.0, -1.0, -1.0, 50.0, -3.0], device=DEVICE)
    per_token = remit_ext.rho1_loss(logits, targets, ref_logprobs=ref_logprobs, keep_ratio=0.6,
                                    reduction="none", backend=backend)
    assert math.ceil(0.6 * 5) == 3
    kept = (per_token != 0).tolist()
    assert kept == [True, True, True, False, False, False], kept
    nll = -float(torch.log_softmax(row.double(), -1)[1])
    mean = remit_ext.rho1_loss(logits, targets, ref_logprobs=ref_logprobs, keep_ratio=0.6,
                               backend=backend)
    assert abs(float(mean) - nll) < 1e-6  # the mean over the 3 kept tokens, not over 5 or 6
    total = remit_ext.rho1_loss(logits, targets, ref_logprobs=ref_logprobs, keep_ratio=0.6,
                                reduction="sum", backend=backend)
    assert abs(float(total) - 3 * nll) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_valid, keep_ratio, n_kept", [
    (10, 0.7, 7),  # 0.7 * 10 = 7.000000000000001 in floating point: still 7
    (5, 0.6, 3), (7, 0.3, 3), (3, 1.0, 3), (10, 0.01, 1), (1, 0.3, 1),
])
def test_rho1_keep_count(backend, n_valid, keep_ratio, n_kept):
    logits, targets, ref, excess = make_rho1_case((n_valid + 2, 33), torch.float32, seed=77,
                                                  variant="ref_logprobs")
    targets = targets.clone()
    targets[:n_valid] = torch.where(targets[:n_valid] == IGNORE, 0, targets[:n_valid])
    targets[n_valid:] = IGNORE
    per_token = remit_ext.rho1_loss(logits, targets, keep_ratio=keep_ratio, reduction="none",
                                    backend=backend, **ref)
    assert int((per_token != 0).sum()) == n_kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_rho1_keep_all_is_plain_cross_entropy(backend, dtype):
    logits, scorer, targets = make_pair((3, 19, 257), dtype, seed=72)
    got = _loss_and_grad(lambda z: remit_ext.rho1_loss(z, targets, ref_logits=scorer,
                                                       keep_ratio=1.0, backend=backend),
                         logits, targets, "mean")
    plain = _loss_and_grad(lambda z: remit_ext.weighted_cross_entropy(z, targets,
                                                                      backend=backend),
                           logits, targets, "mean")
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho1_ref_logits_equals_its_logprobs(backend):
    logits, scorer, targets = make_pair((2, 23, 129), torch.float32, seed=73)
    b = remit_ext.token_stats(scorer, targets, backend=backend).logprob
    from_logits = remit_ext.rho1_loss(logits, targets, ref_logits=scorer, backend=backend)
    from_logprobs = remit_ext.rho1_loss(logits, targets, ref_logprobs=b, backend=backend)
    assert torch.equal(from_logits, from_logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho1_reference_gets_no_gradient(backend):
    logits, scorer, targets = make_pair((2, 11, 65), torch.float32, seed=74)
    z, s = logits.clone().requires_grad_(True), scorer.clone().requires_grad_(True)
    b = remit_ext.token_stats(scorer, targets).logprob.requires_grad_(True)
    for ref in ({"ref_logits": s}, {"ref_logprobs": b}):
        loss = remit_ext.rho1_loss(z, targets, backend=backend, **ref)
        grads = torch.autograd.grad(loss, [z, *ref.values()], allow_unused=True,
                                    materialize_grads=True)
        assert bool((grads[1] == 0).all()), f"{list(ref)[0]} got a gradient"
        assert bool((grads[0] != 0).any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rho1_all_ignored(backend, reduction):
    logits, scorer, targets = make_pair((2, 9, 33), torch.float32, seed=75)
    targets = torch.full_like(targets, IGNORE)
    loss, grad = _loss_and_grad(
        lambda z: remit_ext.rho1_loss(z, targets, ref_logits=scorer, reduction=reduction,
                                      backend=backend), logits, targets, reduction)
    assert not bool(torch.isnan(loss).any()) and bool((loss == 0).all())
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho1_gradcheck_fp64(backend):
    # The selection is piecewise constant; with excess values 1 apart it does not move under
    # the finite-difference step, so the kept tokens' NLL gradient is the true derivative.
    logits, targets, ref, _ = make_rho1_case((2, 4, 5), torch.float64, seed=76,
                                             variant="ref_logprobs")
    z = logits.clone().requires_grad_(True)

    def f(x):
        return remit_ext.rho1_loss(x, targets, keep_ratio=0.6, backend=backend, **ref)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------- KD


def _kd_ref(logits, teacher, targets, temperature, reduction):
    v = logits.shape[-1]

    def fn(z):
        return kd_loss_ref(z.reshape(-1, v), teacher.reshape(-1, v), targets.reshape(-1),
                           temperature=temperature, reduction=reduction)

    return _loss_and_grad(fn, logits, targets, reduction)


def _kd_api(logits, teacher, targets, temperature, reduction, backend):
    def fn(z):
        return remit_ext.kd_loss(z, teacher, targets, temperature=temperature,
                                 reduction=reduction, backend=backend)

    return _loss_and_grad(fn, logits, targets, reduction)


def _check_kd(logits, teacher, targets, *, backend, temperature=1.0, reduction="mean"):
    truth = _kd_ref(logits.double(), teacher.double(), targets, temperature, reduction)
    base = _kd_ref(logits, teacher, targets, temperature, reduction)
    got = _kd_api(logits, teacher, targets, temperature, reduction, backend)
    _compare(got, truth, base, backend, logits)
    return got


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kd_matches_reference(backend, dtype, shape):
    logits, teacher, targets = make_pair(shape, dtype, seed=hash(shape) % 1000 + 400)
    _check_kd(logits, teacher, targets, backend=backend)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_temperature_and_reductions(backend, dtype, temperature, reduction):
    logits, teacher, targets = make_pair((3, 17, 513), dtype, seed=80)
    loss = _check_kd(logits, teacher, targets, backend=backend, temperature=temperature,
                     reduction=reduction)[0]
    if reduction == "none":
        assert loss.shape == targets.shape
        assert bool((loss[targets == IGNORE] == 0).all())


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_teacher_gets_no_gradient(backend):
    logits, teacher, targets = make_pair((2, 11, 65), torch.float32, seed=81)
    z, t = logits.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss = remit_ext.kd_loss(z, t, targets, temperature=2.0, backend=backend)
    g_z, g_t = torch.autograd.grad(loss, [z, t], allow_unused=True, materialize_grads=True)
    assert bool((g_t == 0).all()) and bool((g_z != 0).any())


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_kd_gradcheck_fp64(backend, temperature):
    logits, teacher, targets = make_pair((2, 3, 6), torch.float64, seed=82, ignore_frac=0.25)
    z = logits.clone().requires_grad_(True)

    def f(x):
        return remit_ext.kd_loss(x, teacher, targets, temperature=temperature, reduction="none",
                                 backend=backend)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_self_distillation(backend, dtype, temperature):
    # Teacher == student: the gradient (p - q) / (T N_valid) vanishes up to rounding, and the loss
    # is the teacher's entropy H(q) (KL(q || p) = 0).
    logits, _, targets = make_pair((3, 15, 257), dtype, seed=83)
    loss, grad = _kd_api(logits, logits.clone(), targets, temperature, "none", backend)
    assert float(grad.float().abs().max()) <= 1e-6
    entropy = remit_ext.token_stats(logits, targets, entropy=True, temperature=temperature,
                                    backend=backend).entropy
    torch.testing.assert_close(loss, entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_bounds_teacher_entropy(backend, temperature):
    # LSE(z) - sum_v q_v z_v = H(q) + KL(q || p) >= H(q), position by position.
    logits, teacher, targets = make_pair((4, 25, 129), torch.float32, seed=84)
    loss = remit_ext.kd_loss(logits, teacher, targets, temperature=temperature,
                             reduction="none", backend=backend)
    h = token_stats_ref(teacher.double().reshape(-1, 129), targets.reshape(-1),
                        temperature=temperature)[2].reshape(targets.shape)
    slack = loss.double() - h
    assert float(slack.min()) >= -1e-5 * (1 + float(h.abs().max()))
    valid = targets != IGNORE
    assert float(slack[valid].min()) > 1e-3, "random teachers sit strictly above H(q)"


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_all_ignored(backend, reduction):
    logits, teacher, targets = make_pair((2, 9, 33), torch.float32, seed=85)
    targets = torch.full_like(targets, IGNORE)
    loss, grad = _kd_api(logits, teacher, targets, 1.0, reduction, backend)
    assert not bool(torch.isnan(loss).any()) and bool((loss == 0).all())
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_teacher_zeros_where_student_is_neg_inf(backend):
    # q_v = 0 at a class the student rules out (-inf): q_v z_v counts 0, not NaN.
    logits, _, targets = make_pair((1, 4, 9), torch.float32, seed=86, ignore_frac=0.0)
    teacher = logits.clone()
    logits[0, 1, 0] = float("-inf")
    teacher[0, 1, 0] = float("-inf")
    _check_kd(logits, teacher, targets, backend=backend)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("bad", ["student nan", "teacher nan", "student +inf", "teacher +inf",
                                 "student all -inf", "teacher all -inf"])
def test_kd_nan_and_inf_rows(backend, bad):
    # An undefined softmax on either side (METHODS.md section 5): that position's loss is NaN, as
    # in the reference, and its gradient row holds NaN (the kernels make the whole row NaN, as
    # csrc/cpu/kd_loss.cpp does); every other position is untouched.
    logits, teacher, targets = make_pair((1, 6, 17), torch.float32, seed=87, ignore_frac=0.0)
    side, what = bad.split(" ", 1)
    row = (logits if side == "student" else teacher)[0, 2]
    if what == "all -inf":
        row.fill_(float("-inf"))
    else:
        row[3] = float(what.lstrip("+"))
    loss, grad = _kd_api(logits, teacher, targets, 1.5, "none", backend)
    truth = _kd_ref(logits.double(), teacher.double(), targets, 1.5, "none")
    base = _kd_ref(logits, teacher, targets, 1.5, "none")
    assert_close_to_truth(loss, truth[0], base[0], name=f"{backend}/loss")
    assert bool(torch.isnan(loss[0, 2])), "an undefined softmax gives a NaN loss"
    rest = torch.arange(6, device=DEVICE) != 2
    assert_close_to_truth(grad[0, rest], truth[1][0, rest], base[1][0, rest],
                          name=f"{backend}/grad")
    nan = torch.isnan(grad[0, 2])
    assert bool(nan.all()) if backend != "torch" else bool(nan.any())


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_student_rules_out_a_teacher_class(backend, temperature):
    # A -inf student logit where the teacher puts mass: the loss is +inf (q_v z_v = -inf), as in
    # the reference, and the gradient stays finite, (p - q) / T with p_v = 0 there. V = 1500
    # spans two vocabulary blocks of the interpreted Triton kernel: row 0 is ruled out in the
    # second block, row 1 in the whole first block (the student's running max starts at -inf),
    # and row 2 has its first block -inf on both sides (q = 0 there: a finite loss).
    logits, teacher, targets = make_pair((4, 1500), torch.float32, seed=88, ignore_frac=0.0)
    logits[0, 1200] = float("-inf")
    logits[1, :1024] = float("-inf")
    logits[2, :1024] = float("-inf")
    teacher[2, :1024] = float("-inf")
    loss, grad = _check_kd(logits, teacher, targets, backend=backend, temperature=temperature,
                           reduction="none")
    assert loss[:2].tolist() == [math.inf, math.inf] and bool(torch.isfinite(loss[2:]).all())
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_int32_targets_and_strided_rows(backend, dtype):
    # Student rows addressed through their stride (a slice of wider storage, the gradient flowing
    # back into it), a teacher whose vocabulary dimension is not dense, and int32 targets: the
    # values of dense inputs with int64 targets, which match the reference.
    logits, teacher, targets = make_pair((2, 7, 97), dtype, seed=89)
    y32 = targets.int()
    dense = _check_kd(logits, teacher, y32, backend=backend, temperature=2.0, reduction="none")
    storage = torch.zeros(2, 7, 140, dtype=dtype, device=DEVICE)
    storage[..., 20:117] = logits
    storage.requires_grad_(True)
    strided = storage[..., 20:117]
    t_cols = teacher.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert strided.stride(-2) == 140 and t_cols.stride(-1) != 1
    loss = remit_ext.kd_loss(strided, t_cols, y32, temperature=2.0, reduction="none",
                             backend=backend)
    cot = _cotangent(targets, "none").to(loss.dtype)
    (grad,) = torch.autograd.grad((loss * cot).sum(), storage)
    torch.testing.assert_close(loss, dense[0])
    torch.testing.assert_close(grad[..., 20:117], dense[1])
    assert bool((grad[..., :20] == 0).all()) and bool((grad[..., 117:] == 0).all())
