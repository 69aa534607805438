"""The token-statistics primitive (``linear_token_stats``) against the fp64 eager reference:
full logits ``hidden @ W.T (+ bias)``, then ``log_softmax`` / entropy, and autograd for the
gradients of hidden, the head and the bias under random per-token cotangents on log-prob,
entropy and lse. The same eager math on the low-dtype inputs is the baseline
(``assert_close_to_truth``). Ragged N (a short last chunk), V = 517 (a multiple of no block
size), ignored positions, temperature, bf16 / fp32, frozen heads (no dW buffer), every backend,
opcheck, torch.compile, the bound on intermediates, the losses of docs/fused-linear.md written on
top of it, and ``remit_linear_loss``'s scorer going through it.
"""

import re
from pathlib import Path

import pytest
import torch

import remit_ext
from remit_ext import linear
from remit_ext.reference import (linear_token_stats_ref, pg_loss_ref, remit_loss_ref,
                                 target_logprob_ref, token_stats_ref)
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "fused-linear.md"
OPS = torch.ops.remit_ext_linear


def make_inputs(lead, d, vocab, dtype, *, seed=0, bias=True, ignore_frac=0.2, scale=3.0):
    """hidden [*lead, d], a head [vocab, d] giving logits of O(scale) spread, a bias, targets."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, dtype=torch.float64, generator=g) * s).to(DEVICE, dtype)

    y = torch.randint(0, vocab, lead, generator=g)
    drop = torch.rand(lead, generator=g) < ignore_frac
    return {
        "hidden": rnd(*lead, d),
        "weight": rnd(vocab, d, s=scale / d ** 0.5),
        "bias": rnd(vocab, s=0.5) if bias else None,
        "targets": torch.where(drop, torch.full_like(y, IGNORE), y).to(DEVICE),
    }


def cotangents(shape, seed, which):
    """Random per-token cotangents (fp64) for the outputs named in ``which``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, dtype=torch.float64, generator=g).to(DEVICE) for k in which}


def _objective(stats, cot):
    """sum_t g_t . stats_t: the pull-back of arbitrary per-token cotangents."""
    total = 0
    for name, g in cot.items():
        total = total + (getattr(stats, name).double() * g).sum()
    return total


def _params(inp, dtype=None, frozen=()):
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    return {k: (None if inp[k] is None else
                cast(inp[k]).detach().requires_grad_(k not in frozen))
            for k in ("hidden", "weight", "bias")}


def eager(inp, cot, *, dtype=None, temperature=1.0, entropy=False, frozen=()):
    """The eager reference: full logits, token_stats_ref, autograd. ``dtype`` casts the inputs
    first (float64 for the truth)."""
    p = _params(inp, dtype, frozen)
    d = p["hidden"].shape[-1]
    y = inp["targets"].reshape(-1)
    lse, lp, ent = linear_token_stats_ref(p["hidden"].reshape(-1, d), p["weight"], y,
                                          bias=p["bias"], temperature=temperature,
                                          entropy=entropy)
    shape = inp["targets"].shape
    stats = linear.LinearTokenStats(lp.reshape(shape), ent.reshape(shape) if entropy else None,
                                    lse.reshape(shape))
    wrt = [t for t in p.values() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(_objective(stats, cot), wrt)
    return stats, dict(zip([k for k, t in p.items() if t is not None and t.requires_grad],
                           grads))


def fused(inp, cot, *, frozen=(), **kw):
    p = _params(inp, None, frozen)
    stats = remit_ext.linear_token_stats(p["hidden"], p["weight"], inp["targets"],
                                         bias=p["bias"], **kw)
    names = [k for k, t in p.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(_objective(stats, cot), [p[k] for k in names])
    return stats, dict(zip(names, grads)), p


def check(inp, which=("logprob",), *, seed=3, frozen=(), temperature=1.0, entropy=False,
          **kw):
    cot = cotangents(inp["targets"].shape, seed, which)
    truth = eager(inp, cot, dtype=torch.float64, temperature=temperature, entropy=entropy,
                  frozen=frozen)
    base = eager(inp, cot, temperature=temperature, entropy=entropy, frozen=frozen)
    stats, grads, params = fused(inp, cot, frozen=frozen, temperature=temperature,
                                 entropy=entropy, **kw)
    valid = inp["targets"] != IGNORE
    for name in ("logprob", "entropy", "lse"):
        got = getattr(stats, name)
        if name == "entropy" and not entropy:
            assert got is None
            continue
        assert got.shape == inp["targets"].shape and got.dtype == torch.float32
        assert bool((got[~valid] == 0).all()), f"{name} must be 0 at ignored positions"
        assert_close_to_truth(got, getattr(truth[0], name), getattr(base[0], name), name=name)
    assert set(grads) == set(truth[1])
    for name, got in grads.items():
        assert got.dtype == inp[name].dtype, f"grad {name} must come back in the input dtype"
        assert_close_to_truth(got, truth[1][name], base[1][name], name=f"grad_{name}")
    return stats, grads, params


# ----------------------------------------------------------------------- against fp64 eager


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["logprob", "entropy", "temperature"])
def test_matches_fp64_eager(mode, dtype, backend):
    # Ragged N: 199 rows in chunks of 16 (a last chunk of 7); Triton's interpreter is slow, so
    # it gets 45 rows in chunks of 16 (a last chunk of 13).
    n = 45 if backend == "triton" else 199
    inp = make_inputs((n,), 70, 517, dtype, seed=1)
    kw = {"entropy": mode != "logprob",
          "temperature": 1.7 if mode == "temperature" else 1.0}
    which = ("logprob", "entropy") if kw["entropy"] else ("logprob",)
    check(inp, which, chunk_size=16, backend=backend, **kw)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_batch_dims_one_chunk_and_lse_cotangent(backend):
    # [B, T] targets, the default chunk plan (one chunk), cotangents on all three outputs.
    inp = make_inputs((3, 37), 24, 1025, torch.float32, seed=2, bias=False)
    check(inp, ("logprob", "entropy", "lse"), entropy=True, backend=backend)
    check(inp, ("lse",), backend=backend, chunk_size=5)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_n_and_v(n):
    inp = make_inputs((n,), 8, 2, torch.float32, seed=3, ignore_frac=0.0)
    check(inp, ("logprob", "entropy"), entropy=True, chunk_size=1)
    inp = make_inputs((n,), 8, 1, torch.float32, seed=3, ignore_frac=0.0)  # V = 1
    stats = check(inp, ("logprob", "entropy"), entropy=True)[0]
    assert bool((stats.logprob == 0).all()) and bool((stats.entropy == 0).all())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_entropy_only_cotangent(backend):
    # Only the entropy is differentiated (an entropy regulariser): logprob's cotangent is None.
    inp = make_inputs((60,), 16, 129, torch.float32, seed=4)
    check(inp, ("entropy",), entropy=True, chunk_size=13, temperature=0.7, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("path", ["fast", "formula"])
def test_confident_rows_target_gradient(backend, path):
    # W = I, so the logits are the hidden states and grad hidden is the logits gradient. The
    # target sits 20 above the rest: g (1 - p_y) ~ 1e-7 must come from expm1(a) (the in-place
    # weighted-CE op on the fast path, the formula otherwise), not from 1 - a rounded p_y. The
    # kernels' a is accurate there; fp32 PyTorch's (the torch backend) is exactly 0.
    vocab = 33
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, vocab, (24,), generator=g)
    h = torch.randn(24, vocab, dtype=torch.float64, generator=g)
    h = h.scatter(-1, y[:, None], h.amax(-1, keepdim=True) + 20.0)
    inp = {"hidden": h.float().to(DEVICE), "weight": torch.eye(vocab, device=DEVICE),
           "bias": None, "targets": y.to(DEVICE)}
    cot = cotangents((24,), 6, ("logprob",))
    if path == "formula":  # a zero entropy cotangent forces the general formula
        cot["entropy"] = torch.zeros(24, dtype=torch.float64, device=DEVICE)
    _, grads, _ = fused(inp, cot, frozen=("weight",), entropy=path == "formula",
                        backend=backend)
    truth = eager(inp, cot, dtype=torch.float64, entropy=path == "formula",
                  frozen=("weight",))[1]["hidden"]
    idx = inp["targets"][:, None]
    got, want = grads["hidden"].gather(-1, idx).double(), truth.gather(-1, idx)
    assert float(want.abs().max()) < 1e-6 and bool((want != 0).all()), "rows are not confident"
    rel = float(((got - want) / want).abs().max())
    assert rel < 1e-4, f"target-class gradient relative error {rel:.2e}"


def test_ignored_positions():
    inp = make_inputs((50,), 12, 40, torch.float32, seed=7, ignore_frac=0.5)
    stats, grads, _ = check(inp, ("logprob", "entropy", "lse"), entropy=True, chunk_size=7)
    inp["targets"] = torch.full_like(inp["targets"], IGNORE)
    stats, grads, _ = fused(inp, cotangents((50,), 8, ("logprob", "entropy", "lse")),
                            entropy=True, chunk_size=7)
    assert all(bool((getattr(stats, k) == 0).all()) for k in ("logprob", "entropy", "lse"))
    assert all(bool((g == 0).all()) for g in grads.values())


def test_nan_is_propagated_not_invented():
    inp = make_inputs((12,), 6, 20, torch.float32, seed=9, ignore_frac=0.0)
    inp["hidden"][3, 0] = float("nan")
    stats, grads, _ = fused(inp, cotangents((12,), 1, ("logprob", "entropy")), entropy=True,
                            frozen=("weight", "bias"))
    assert bool(stats.logprob[3].isnan()) and bool(stats.entropy[3].isnan())
    assert bool(grads["hidden"][3].isnan().all())
    others = torch.arange(12, device=DEVICE) != 3
    assert bool(grads["hidden"][others].isfinite().all())


# ------------------------------------------------------------------------------ frozen heads


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op run, and the shape and storage bytes of every tensor it returns (a
    zero-stride expand is large in shape but not in memory)."""

    def __init__(self):
        super().__init__()
        self.shapes, self.bytes, self.ops = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.bytes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_head_has_no_dw(dtype, backend):
    inp = make_inputs((64,), 24, 130, dtype, seed=10)
    cot = cotangents((64,), 11, ("logprob", "entropy"))
    _, grads, params = check(inp, ("logprob", "entropy"), entropy=True, chunk_size=16,
                             frozen=("weight", "bias"), backend=backend)
    assert set(grads) == {"hidden"}
    # Through .backward(): the frozen head gets no .grad, and no [V, D] or [V] buffer is made.
    p = _params(inp, None, frozen=("weight", "bias"))
    stats = remit_ext.linear_token_stats(p["hidden"], p["weight"], inp["targets"],
                                         bias=p["bias"], entropy=True, chunk_size=16,
                                         backend=backend)
    with _Allocations() as rec:
        _objective(stats, cot).backward()
    assert p["weight"].grad is None and p["bias"].grad is None
    assert p["hidden"].grad is not None
    assert (130, 24) not in rec.shapes and (130,) not in rec.shapes, rec.shapes
    # The grad op returns empty dW / dbias when they are not needed.
    lp, ent, lse = OPS.linear_token_stats(inp["hidden"], inp["weight"],
                                          inp["targets"], inp["bias"], IGNORE, 1.0, True, 16,
                                          backend)
    gh, gw, gb = OPS.linear_token_stats_grad(
        inp["hidden"], inp["weight"], inp["targets"], inp["bias"], lp, lse, ent,
        torch.ones_like(lp), None, None, IGNORE, 1.0, 16, True, False, False, backend)
    assert gh.shape == inp["hidden"].shape and gw.numel() == 0 and gb.numel() == 0


def test_frozen_hidden_trains_the_head_only():
    inp = make_inputs((40,), 10, 50, torch.float32, seed=12)
    _, grads, _ = check(inp, ("logprob", "entropy"), entropy=True, chunk_size=9,
                        frozen=("hidden",))
    assert set(grads) == {"weight", "bias"}
    assert grads["weight"].dtype == torch.float32


def test_no_grad_and_detached_inputs():
    inp = make_inputs((30,), 8, 33, torch.float32, seed=13)
    p = _params(inp)
    with torch.no_grad():
        stats = remit_ext.linear_token_stats(p["hidden"], p["weight"], inp["targets"],
                                             bias=p["bias"], entropy=True)
    assert not any(getattr(stats, k).requires_grad for k in ("logprob", "entropy", "lse"))
    plain = remit_ext.linear_token_stats(inp["hidden"], inp["weight"], inp["targets"],
                                         bias=inp["bias"], entropy=True)
    assert not plain.logprob.requires_grad
    torch.testing.assert_close(plain.logprob, stats.logprob, rtol=0, atol=0)


# ------------------------------------------------------------------- memory: chunk buffers


@pytest.mark.parametrize("entropy", [False, True])
def test_chunk_buffers_bound_every_intermediate(entropy):
    # Forward and backward: every tensor is at most a chunk of logits, the head-sized dW, or
    # the hidden-sized dh; none is [N, V].
    n, d, vocab, chunk = 199, 8, 517, 16
    inp = make_inputs((n,), d, vocab, torch.float32, seed=14)
    p = _params(inp)
    cot = cotangents((n,), 15, ("logprob", "entropy") if entropy else ("logprob",))
    with _Allocations() as rec:
        stats = remit_ext.linear_token_stats(p["hidden"], p["weight"], inp["targets"],
                                             bias=p["bias"], entropy=entropy,
                                             chunk_size=chunk,
                                             backend="cpu" if DEVICE.type == "cpu" else "auto")
        _objective(stats, cot).backward()
    largest = max(rec.bytes) // 4  # fp32 elements
    assert largest <= max(chunk * vocab, vocab * d, n * d), largest
    assert p["weight"].grad is not None


def test_memory_budget_sets_chunk():
    # Per element: fp32 logits + two fp32 backward buffers = 12 bytes; V = 64 -> 768 B a row.
    assert linear.stats_chunk_size(1000, 64, torch.float32, memory_budget=768 * 10) == 10
    # bf16 logits: 2 + 8 bytes; the torch backend adds one more fp32 buffer.
    assert linear.stats_chunk_size(1000, 64, torch.bfloat16, memory_budget=640 * 10) == 10
    assert linear.stats_chunk_size(1000, 64, torch.float32, backend="torch",
                                   memory_budget=1024 * 10) == 10
    assert linear.stats_chunk_size(7, 64, torch.float32, memory_budget=1 << 30) == 7
    assert linear.stats_chunk_size(1000, 1 << 20, torch.float32, memory_budget=1) == 1


# -------------------------------------------------------------------- registered op, compile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_opcheck(with_entropy, backend):
    inp = make_inputs((21,), 6, 40, torch.float32, seed=16)
    h, w, y, b = (inp[k] for k in ("hidden", "weight", "targets", "bias"))
    args = (h.detach().requires_grad_(), w.detach().requires_grad_(), y,
            b.detach().requires_grad_(), IGNORE, 1.3, with_entropy, 8, backend)
    torch.library.opcheck(OPS.linear_token_stats.default, args)
    lp, ent, lse = OPS.linear_token_stats(h, w, y, b, IGNORE, 1.3, with_entropy, 8, backend)
    g = torch.randn(21, device=DEVICE)
    torch.library.opcheck(OPS.linear_token_stats_grad.default,
                          (h, w, y, b, lp, lse, ent, g, g if with_entropy else None, None,
                           IGNORE, 1.3, 8, True, True, True, backend))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_compile_fullgraph(backend):
    inp = make_inputs((2, 20), 12, 64, torch.float32, seed=17)
    torch._dynamo.reset()

    def step(h, w, b, y, adv):
        st = remit_ext.linear_token_stats(h, w, y, bias=b, entropy=True, chunk_size=8,
                                          backend=backend)
        return -(adv * st.logprob + 0.01 * st.entropy).sum() / (y != IGNORE).sum()

    adv = torch.randn(2, 20, device=DEVICE)
    args = [inp[k] for k in ("hidden", "weight", "bias")]
    params = [a.detach().requires_grad_() for a in args]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*params, inp["targets"], adv)
    got_grads = torch.autograd.grad(got, params)
    ref_params = [a.detach().requires_grad_() for a in args]
    want = step(*ref_params, inp["targets"], adv)
    want_grads = torch.autograd.grad(want, ref_params)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: {**a, "weight": a["weight"][:, :5]}, ValueError, r"weight: expected shape"),
    (lambda a: {**a, "weight": a["weight"].double()}, TypeError, r"weight: expected the dtype"),
    (lambda a: {**a, "targets": a["targets"][:5]}, ValueError, r"targets: expected shape"),
    (lambda a: {**a, "targets": a["targets"].float()}, TypeError, r"targets: expected dtype"),
    (lambda a: {**a, "targets": torch.full_like(a["targets"], 20)}, ValueError,
     r"targets: expected values in \[0, 20\)"),
    (lambda a: {**a, "bias": torch.zeros(19, device=DEVICE)}, ValueError,
     r"bias: expected shape \(20,\)"),
    (lambda a: {**a, "temperature": 0.0}, ValueError, r"temperature: expected a number > 0"),
    (lambda a: {**a, "entropy": 1}, TypeError, r"entropy: expected a bool"),
    (lambda a: {**a, "chunk_size": 0}, ValueError, r"chunk_size: expected a positive int"),
    (lambda a: {**a, "memory_budget": 2.0}, ValueError, r"memory_budget: expected a positive"),
    (lambda a: {**a, "backend": "tpu"}, ValueError, r"backend: expected"),
])
def test_bad_inputs(change, exc, match):
    inp = make_inputs((12,), 6, 20, torch.float32, seed=18)
    args = change({"hidden": inp["hidden"], "weight": inp["weight"],
                   "targets": inp["targets"]})
    # "sync": the target-range error raises on a GPU too (test_validation.py).
    with remit_ext.validation("sync"), pytest.raises(exc, match=match):
        remit_ext.linear_token_stats(args.pop("hidden"), args.pop("weight"),
                                     args.pop("targets"), **args)


# ------------------------------------ the losses of docs/fused-linear.md on top of the primitive


def readme_examples() -> dict:
    """The first python block of the token-statistics section of docs/fused-linear.md, executed."""
    text = DOCS.read_text()
    section = text[text.index("## Token statistics from hidden states"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/fused-linear.md", "exec"), namespace)
    return namespace


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


def _truth_logits(inp):
    h = inp["hidden"].double().detach().requires_grad_()
    w = inp["weight"].double().detach().requires_grad_()
    return h, w, h.reshape(-1, h.shape[-1]) @ w.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_readme_grpo_loss(dtype):
    ex = readme_examples()
    inp = make_inputs((4, 25), 16, 257, dtype, seed=19, bias=False)
    y = inp["targets"]
    g = torch.Generator().manual_seed(20)
    adv = torch.randn(y.shape, generator=g).to(DEVICE)
    # Old log-probs of a perturbed policy: ratios both inside and outside the clip band.
    old = (target_logprob_ref(_truth_logits(inp)[2], y.reshape(-1)).reshape(y.shape)
           + 0.3 * torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE)).float()
    old = torch.where(y != IGNORE, old, 0)
    h, w = (inp[k].detach().requires_grad_() for k in ("hidden", "weight"))
    loss = ex["grpo_token_loss"](h, w, y, adv, old)
    th, tw, z = _truth_logits(inp)
    truth = pg_loss_ref(z, y.reshape(-1), adv.reshape(-1), old_logprobs=old.reshape(-1))
    bh, bw = (inp[k].detach().requires_grad_() for k in ("hidden", "weight"))
    base = pg_loss_ref(bh.reshape(-1, 16) @ bw.T, y.reshape(-1), adv.reshape(-1),
                       old_logprobs=old.reshape(-1))
    assert_close_to_truth(loss, truth, base, name="grpo loss")
    for got, t, b in zip(_grads(loss, [h, w]), _grads(truth, [th, tw]), _grads(base, [bh, bw])):
        assert_close_to_truth(got, t, b, name="grpo grad")
    # With the global count, two halves of the batch sum to the whole.
    n = (y != IGNORE).sum()
    halves = sum(ex["grpo_token_loss"](h[i:i + 2], w, y[i:i + 2], adv[i:i + 2], old[i:i + 2],
                                       num_items_in_batch=n) for i in (0, 2))
    torch.testing.assert_close(halves, loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_readme_remit_loss(dtype):
    ex = readme_examples()
    inp = make_inputs((3, 30), 16, 257, dtype, seed=21, bias=False)
    y = inp["targets"]
    scorer = make_inputs((3, 30), 20, 257, torch.float64, seed=22, bias=False)
    b = target_logprob_ref(scorer["hidden"].reshape(-1, 20) @ scorer["weight"].T,
                           y.reshape(-1)).reshape(y.shape).float()
    h, w = (inp[k].detach().requires_grad_() for k in ("hidden", "weight"))
    loss = ex["remit_from_stats"](h, w, y, b)
    rows = torch.arange(0, 91, 30, device=DEVICE)
    th, tw, z = _truth_logits(inp)
    truth = remit_loss_ref(z, y.reshape(-1), scorer_logprobs=b.reshape(-1).double(),
                           cu_seqlens=rows)[0]
    bh, bw = (inp[k].detach().requires_grad_() for k in ("hidden", "weight"))
    base = remit_loss_ref(bh.reshape(-1, 16) @ bw.T, y.reshape(-1),
                          scorer_logprobs=b.reshape(-1), cu_seqlens=rows)[0]
    assert_close_to_truth(loss, truth, base, name="remit loss")
    for got, t, bl in zip(_grads(loss, [h, w]), _grads(truth, [th, tw]),
                          _grads(base, [bh, bw])):
        assert_close_to_truth(got, t, bl, name="remit grad")
    # And it is the fused-linear loss's ReMiT.
    fused_loss = remit_ext.remit_linear_loss(inp["hidden"], inp["weight"], y,
                                             scorer_logprobs=b)
    assert_close_to_truth(fused_loss, truth, base, name="remit_linear_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_readme_entropy_bonus(dtype):
    ex = readme_examples()
    inp = make_inputs((3, 30), 16, 257, dtype, seed=23, bias=False)
    y = inp["targets"]
    h, w = (inp[k].detach().requires_grad_() for k in ("hidden", "weight"))
    loss = ex["nll_with_entropy_bonus"](h, w, y, beta=0.1)

    def formula(hh, ww):
        z = torch.log_softmax((hh.reshape(-1, 16) @ ww.T).to(torch.promote_types(
            hh.dtype, torch.float32)), -1)
        valid = y.reshape(-1) != IGNORE
        nll = -z.gather(-1, y.reshape(-1, 1).clamp(min=0))[:, 0]
        ent = -(z.exp() * z).sum(-1)
        return ((nll - 0.1 * ent) * valid).sum() / valid.sum()

    th, tw, _ = _truth_logits(inp)
    truth = formula(th, tw)
    bh, bw = (inp[k].detach().requires_grad_() for k in ("hidden", "weight"))
    base = formula(bh, bw)
    assert_close_to_truth(loss, truth, base, name="entropy-bonus loss")
    for got, t, bl in zip(_grads(loss, [h, w]), _grads(truth, [th, tw]),
                          _grads(base, [bh, bw])):
        assert_close_to_truth(got, t, bl, name="entropy-bonus grad")


# ------------------------------------------------------ remit_linear_loss's scorer side


@pytest.mark.parametrize("method", ["remit", "rho1"])
def test_remit_linear_loss_scorer_goes_through_the_primitive(method):
    inp = make_inputs((2, 40), 12, 130, torch.float32, seed=24, bias=False)
    scorer = make_inputs((2, 40), 14, 130, torch.float32, seed=25)
    y = inp["targets"]
    h = inp["hidden"].detach().requires_grad_()
    with _Allocations() as rec:
        live = remit_ext.remit_linear_loss(h, inp["weight"], y, method=method,
                                           scorer_hidden=scorer["hidden"],
                                           scorer_weight=scorer["weight"],
                                           scorer_bias=scorer["bias"], chunk_size=16)
    assert "remit_ext_linear.linear_token_stats.default" in rec.ops
    with torch.no_grad():
        b = remit_ext.linear_token_stats(scorer["hidden"], scorer["weight"], y,
                                         bias=scorer["bias"], chunk_size=16).logprob
    h2 = inp["hidden"].detach().requires_grad_()
    cached = remit_ext.remit_linear_loss(h2, inp["weight"], y, method=method,
                                         scorer_logprobs=b, chunk_size=16)
    torch.testing.assert_close(live, cached, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(live, h)[0],
                               torch.autograd.grad(cached, h2)[0], rtol=0, atol=0)
    # Against the fp64 eager truth: the scorer's b_t from its full logits.
    z = inp["hidden"].double().reshape(-1, 12) @ inp["weight"].double().T
    sz = (scorer["hidden"].double().reshape(-1, 14) @ scorer["weight"].double().T
          + scorer["bias"].double())
    truth = token_stats_ref(sz, y.reshape(-1), entropy=False)[1]
    torch.testing.assert_close(b.reshape(-1).double(), truth, rtol=0, atol=1e-5)
    assert z.shape == sz.shape
