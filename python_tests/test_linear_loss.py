"""The fused-linear loss (``remit_linear_loss``) against the eager reference: ``hidden @ W.T
(+ bias)`` then the ``remit_ext.reference`` loss, autograd for the gradients of hidden, the LM
head weight and the bias. fp64 truth, and the same eager math on the low-dtype inputs as the
baseline (``assert_close_to_truth``). Every method (remit / ntp / rho1 / kd), each chunk
schedule (one chunk, sequence-aligned chunks, the two-pass fallback), ragged shapes, packed
sequences, ignored positions, precomputed scorer log-probs, all reductions, bad inputs, opcheck
and torch.compile.

The Triton backend runs in its CPU interpreter (slow): only a few tiny cases.
"""

import pytest
import torch

import remit_ext
from remit_ext import linear
from remit_ext.reference import (kd_loss_ref, remit_loss_ref, rho1_loss_ref, target_logprob_ref,
                                 weighted_ce_ref)
from remit_ext.testing import assert_close_to_truth
from cases import IGNORE
from conftest import BACKENDS, DEVICE

FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]
# Packed documents over N = 199 positions: an empty one, the longest 59 tokens.
CU_199 = [0, 40, 40, 95, 140, 199]
# None: one chunk; 64: sequence-aligned chunks (every document fits); 13: documents longer than
# a chunk, so ReMiT takes the two-pass path.
CHUNKS = [None, 64, 13]


def make_inputs(n, d, vocab, dtype, *, seed=0, d_scorer=None, bias=False, scorer=True,
                ignore_frac=0.2, batch=None):
    """Hidden states and LM heads scaled so that logits have O(3) spread, like real models."""
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if batch is None else (batch, n // batch)
    d_s = d_scorer or d + 3

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, dtype=torch.float64, generator=g) * scale).to(DEVICE, dtype)

    inp = {
        "hidden": rnd(*lead, d),
        "lm_head_weight": rnd(vocab, d, scale=3.0 / d ** 0.5),
        "bias": rnd(vocab, scale=0.5) if bias else None,
    }
    if scorer:
        inp["scorer_hidden"] = rnd(*lead, d_s)
        inp["scorer_weight"] = rnd(vocab, d_s, scale=3.5 / d_s ** 0.5)
    y = torch.randint(0, vocab, lead, generator=g)
    drop = torch.rand(lead, generator=g) < ignore_frac
    inp["targets"] = torch.where(drop, torch.full_like(y, IGNORE), y).to(DEVICE)
    return inp


def _logits(h, w, b):
    z = h.reshape(-1, h.shape[-1]) @ w.T
    return z if b is None else z + b


def _cotangent(loss, seed=7):
    if loss.dim() == 0:
        return torch.ones((), dtype=loss.dtype, device=loss.device)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, dtype=torch.float64, generator=g).to(loss.device, loss.dtype)


def eager(inp, method, *, cu=None, reduction="mean", use_logprobs=False, keep_ratio=0.6,
          temperature=1.0, eps=0.2, dtype=None):
    """The eager reference: full logits, then the reference loss; (loss, grads, weights).

    ``dtype`` casts every input first (float64 for the truth)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    h = cast(inp["hidden"]).detach().requires_grad_()
    w = cast(inp["lm_head_weight"]).detach().requires_grad_()
    b = None if inp.get("bias") is None else cast(inp["bias"]).detach().requires_grad_()
    y = inp["targets"].reshape(-1)
    z = _logits(h, w, b)
    sz = None
    if "scorer_hidden" in inp:
        sz = _logits(cast(inp["scorer_hidden"]), cast(inp["scorer_weight"]), None)
    if cu is None and inp["targets"].dim() == 2:
        t = inp["targets"].shape[-1]
        cu = torch.arange(0, y.numel() + 1, t, device=DEVICE)
    s_lp = None
    if use_logprobs:
        s_lp, sz = scorer_logprobs(inp).to(z.dtype if z.dtype == torch.float64 else
                                           torch.float32), None
    weights = None
    if method == "remit":
        loss, weights, _ = remit_loss_ref(z, y, scorer_logits=sz, scorer_logprobs=s_lp,
                                          cu_seqlens=cu, eps=eps, reduction=reduction)
    elif method == "ntp":
        loss = weighted_ce_ref(z, y, reduction=reduction)
    elif method == "rho1":
        loss = rho1_loss_ref(z, y, ref_logits=sz, ref_logprobs=s_lp, keep_ratio=keep_ratio,
                             reduction=reduction)
    else:
        loss = kd_loss_ref(z, sz, y, temperature=temperature, reduction=reduction)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((loss * _cotangent(loss)).sum(), params)
    return loss.detach(), grads, weights


def scorer_logprobs(inp):
    """b_t computed offline by the scorer (float64 math, as a data pipeline might store it)."""
    sz = _logits(inp["scorer_hidden"].double(), inp["scorer_weight"].double(), None)
    return target_logprob_ref(sz, inp["targets"].reshape(-1)).reshape(inp["targets"].shape)


def fused(inp, method, *, cu=None, reduction="mean", use_logprobs=False, backend="cpu", **kw):
    h = inp["hidden"].detach().requires_grad_()
    w = inp["lm_head_weight"].detach().requires_grad_()
    b = None if inp.get("bias") is None else inp["bias"].detach().requires_grad_()
    scorer = {}
    if use_logprobs:
        scorer["scorer_logprobs"] = scorer_logprobs(inp).float()
    elif "scorer_hidden" in inp:
        scorer = {k: inp[k] for k in ("scorer_hidden", "scorer_weight")}
    out = remit_ext.remit_linear_loss(h, w, inp["targets"], bias=b, method=method,
                                      cu_seqlens=cu, reduction=reduction, return_details=True,
                                      backend=backend, **scorer, **kw)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((out.loss * _cotangent(out.loss)).sum(), params)
    return out, grads


def check(inp, method, *, backend="cpu", cu=None, reduction="mean", use_logprobs=False,
          **kw):
    ref_kw = {k: v for k, v in kw.items() if k in ("keep_ratio", "temperature", "eps")}
    truth = eager(inp, method, cu=cu, reduction=reduction, use_logprobs=use_logprobs,
                  dtype=torch.float64, **ref_kw)
    base = eager(inp, method, cu=cu, reduction=reduction, use_logprobs=use_logprobs, **ref_kw)
    out, grads = fused(inp, method, cu=cu, reduction=reduction, use_logprobs=use_logprobs,
                       backend=backend, **kw)
    assert out.loss.shape == inp["targets"].shape if reduction == "none" else out.loss.dim() == 0
    assert_close_to_truth(out.loss, truth[0].reshape(out.loss.shape),
                          base[0].reshape(out.loss.shape), name=f"{method}/loss")
    for name, got, t, bl in zip(("hidden", "weight", "bias"), grads, truth[1], base[1]):
        assert got.dtype == inp["hidden"].dtype, f"grad {name} must come back in the input dtype"
        assert_close_to_truth(got, t, bl, name=f"{method}/grad_{name}")
    if method == "remit":
        assert_close_to_truth(out.weights, truth[2].reshape(out.weights.shape),
                              base[2].reshape(out.weights.shape), name="remit/weights")
    return out, grads


# ----------------------------------------------------------------------------- the methods


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", linear.METHODS)
def test_matches_eager_packed(method, dtype, chunk, backend):
    inp = make_inputs(199, 70, 517, dtype, seed=1, bias=True, scorer=method != "ntp")
    cu = torch.tensor(CU_199, device=DEVICE)
    check(inp, method, backend=backend, cu=cu, chunk_size=chunk,
          **({"temperature": 2.0} if method == "kd" else {}))


@pytest.mark.parametrize("method", linear.METHODS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(method, reduction):
    # 'none' takes the recompute backward (per-token cotangents); chunk 13 < the rows of 20.
    inp = make_inputs(60, 33, 129, torch.float32, seed=2, batch=3, scorer=method != "ntp")
    for chunk in (None, 13):
        out, _ = check(inp, method, reduction=reduction, chunk_size=chunk)
        if reduction == "none":
            assert bool((out.loss[inp["targets"] == IGNORE] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["remit", "rho1"])
def test_precomputed_scorer_logprobs(method, dtype):
    inp = make_inputs(199, 70, 517, dtype, seed=3)
    cu = torch.tensor(CU_199, device=DEVICE)
    for chunk in (64, 13):
        check(inp, method, cu=cu, use_logprobs=True, chunk_size=chunk)


@pytest.mark.parametrize("n", [1, 2, 199])
def test_ragged_and_tiny(n):
    # N = 1 and an all-but-one ignored batch; no bias; scorer narrower than the policy.
    inp = make_inputs(n, 70, 517, torch.float32, seed=4, d_scorer=24)
    check(inp, "remit", chunk_size=1)
    check(inp, "remit")


def test_large_vocab_cpu():
    inp = make_inputs(24, 70, 32001, torch.bfloat16, seed=5, bias=True, batch=2)
    for method in ("remit", "kd"):
        check(inp, method, chunk_size=5)


def test_rows_are_sequences():
    # Without cu_seqlens the rows of [B, T] targets are the sequences, so the chunk plan and the
    # centering follow them; one-sequence centering gives different weights.
    inp = make_inputs(80, 16, 65, torch.float32, seed=6, batch=4)
    for chunk in (None, 40, 20, 7):
        rows = check(inp, "remit", chunk_size=chunk)[0].weights
    flat = {k: (v.reshape(-1, v.shape[-1]) if v is not None and v.dim() == 3 else v)
            for k, v in inp.items()}
    flat["targets"] = inp["targets"].reshape(-1)
    single = fused(flat, "remit")[0].weights
    assert not torch.allclose(rows.reshape(-1), single)


@pytest.mark.parametrize("chunk", [64, 13])
def test_diagnostics_batch_wide(chunk):
    inp = make_inputs(199, 70, 517, torch.float32, seed=7)
    cu = torch.tensor(CU_199, device=DEVICE)
    out = fused(inp, "remit", cu=cu, chunk_size=chunk)[0]
    z = _logits(inp["hidden"].double(), inp["lm_head_weight"].double(), None)
    sz = _logits(inp["scorer_hidden"].double(), inp["scorer_weight"].double(), None)
    _, _, diag = remit_loss_ref(z, inp["targets"], scorer_logits=sz, cu_seqlens=cu)
    for name, got, want in zip(diag._fields, out.diagnostics, diag):
        assert abs(float(got) - float(want)) < 1e-5, f"{name}: {float(got)} vs {float(want)}"


def test_ignored_everywhere():
    inp = make_inputs(30, 8, 33, torch.float32, seed=8)
    inp["targets"] = torch.full_like(inp["targets"], IGNORE)
    for method in linear.METHODS:
        sub = {k: v for k, v in inp.items() if method != "ntp" or "scorer" not in k}
        out, grads = fused(sub, method, chunk_size=7)
        assert float(out.loss.detach()) == 0, method
        assert all(bool((g == 0).all()) for g in grads), method


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_backend(backend):
    inp = make_inputs(48, 20, 517, torch.float32, seed=9, bias=True)
    cu = torch.tensor([0, 10, 30, 48], device=DEVICE)
    check(inp, "remit", backend=backend, cu=cu, chunk_size=24)  # aligned, one pass
    check(inp, "remit", backend=backend, cu=cu, chunk_size=16)  # two passes
    check(inp, "kd", backend=backend, chunk_size=16, temperature=2.0)  # fused chunk steps
    check(inp, "kd", backend=backend, chunk_size=16, reduction="none")  # recompute backward
    low = make_inputs(48, 20, 517, torch.bfloat16, seed=9, bias=True)
    check(low, "kd", backend=backend, chunk_size=24, temperature=2.0)


# ------------------------------------------------------------------ gradients and options


def test_grad_weight_accumulator_options():
    inp = make_inputs(199, 70, 517, torch.bfloat16, seed=10)
    fp32 = check(inp, "remit", chunk_size=16)[1][1]
    low = check(inp, "remit", chunk_size=16, grad_weight_fp32=False)[1][1]
    assert fp32.dtype == low.dtype == torch.bfloat16
    assert not torch.equal(fp32, low), "bf16 accumulation over 13 chunks should round differently"


def test_frozen_head_and_no_grad():
    inp = make_inputs(50, 12, 40, torch.float32, seed=11)
    h = inp["hidden"].detach().requires_grad_()
    kw = {"scorer_hidden": inp["scorer_hidden"], "scorer_weight": inp["scorer_weight"]}
    loss = remit_ext.remit_linear_loss(h, inp["lm_head_weight"], inp["targets"], chunk_size=9,
                                       **kw)
    (g,) = torch.autograd.grad(loss, h)
    want = eager(inp, "remit", dtype=torch.float64)[1][0]
    assert_close_to_truth(g, want, eager(inp, "remit")[1][0], name="grad_hidden (frozen head)")
    with torch.no_grad():
        again = remit_ext.remit_linear_loss(h, inp["lm_head_weight"], inp["targets"], **kw)
    assert not again.requires_grad and torch.allclose(again, loss.detach())


def test_module_matches_function():
    inp = make_inputs(40, 10, 50, torch.float32, seed=12)
    kw = {"scorer_hidden": inp["scorer_hidden"], "scorer_weight": inp["scorer_weight"]}
    mod = remit_ext.LinearReMiTLoss(method="rho1", keep_ratio=0.5, chunk_size=8)
    assert "rho1" in repr(mod)
    got = mod(inp["hidden"], inp["lm_head_weight"], inp["targets"], **kw)
    want = remit_ext.remit_linear_loss(inp["hidden"], inp["lm_head_weight"], inp["targets"],
                                       method="rho1", keep_ratio=0.5, **kw)
    assert torch.allclose(got, want)


def test_memory_budget_sets_chunk():
    # 8 KiB of fp32 logits rows at V = 64 -> 32 rows; the scorer's rows halve it.
    assert linear.linear_chunk_size(1000, 64, torch.float32, memory_budget=8192) == 32
    assert linear.linear_chunk_size(1000, 64, torch.float32, scorer_dtype=torch.float32,
                                    memory_budget=8192) == 16
    assert linear.linear_chunk_size(10, 64, torch.float32, memory_budget=1 << 30) == 10
    assert linear.linear_chunk_size(1000, 1 << 20, torch.float32, memory_budget=1) == 1


def test_aligned_chunk_plan():
    # Greedy: the empty document [5, 5) joins the first chunk.
    assert linear._aligned_chunks([0, 3, 5, 5, 9, 10], 5) == [(0, 5, 0, 3), (5, 10, 3, 5)]
    assert linear._aligned_chunks([0, 3, 9], 5) is None  # a 6-token sequence does not fit
    assert linear._aligned_chunks([0, 4], 4) == [(0, 4, 0, 1)]


def test_chunk_buffers_bound_every_intermediate():
    # Every tensor the engine creates is at most a chunk of logits, a weight-sized gradient or
    # the hidden-sized gradient: none is [N, V].
    from torch.utils._python_dispatch import TorchDispatchMode

    n, d, vocab, chunk = 199, 8, 517, 16
    inp = make_inputs(n, d, vocab, torch.float32, seed=13, d_scorer=8)
    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    for method, cu in (("remit", None), ("remit", torch.tensor(CU_199)), ("rho1", None),
                       ("kd", None)):
        largest.clear()
        with Sizes():
            linear._linear_loss_impl(
                inp["hidden"], inp["lm_head_weight"], inp["targets"], None,
                inp["scorer_hidden"], inp["scorer_weight"], None, None, cu, n, method, IGNORE,
                0.2, 0.6, 1.0, "mean", chunk, True, True, False, True, "cpu")
        assert max(largest) <= max(chunk * vocab, vocab * d, n * d), (method, max(largest))


# --------------------------------------------------------------------------------- errors


def _err_inputs():
    inp = make_inputs(12, 6, 20, torch.float32, seed=14)
    return inp["hidden"], inp["lm_head_weight"], inp["targets"], {
        "scorer_hidden": inp["scorer_hidden"], "scorer_weight": inp["scorer_weight"]}


@pytest.mark.parametrize("change, exc, match", [
    (lambda h, w, y, s: (h, w[:, :5], y, s), ValueError, r"lm_head_weight: expected shape"),
    (lambda h, w, y, s: (h, w.double(), y, s), TypeError, r"lm_head_weight: expected the dtype"),
    (lambda h, w, y, s: (h, w, y[:5], s), ValueError, r"targets: expected shape \(12,\)"),
    (lambda h, w, y, s: (h, w, y.float(), s), TypeError, r"targets: expected dtype"),
    (lambda h, w, y, s: (h, w, torch.full_like(y, 20), s), ValueError,
     r"targets: expected values in \[0, 20\)"),
    (lambda h, w, y, s: (h.int(), w, y, s), TypeError, r"hidden: expected dtype"),
    (lambda h, w, y, s: (h, w, y, {}), ValueError, r"expected exactly one of scorer_hidden"),
    (lambda h, w, y, s: (h, w, y, {"scorer_hidden": s["scorer_hidden"]}), ValueError,
     r"scorer_hidden, scorer_weight: expected both or neither"),
    (lambda h, w, y, s: (h, w, y, {**s, "scorer_weight": s["scorer_weight"][:7]}), ValueError,
     r"scorer_weight: expected shape \(20, 9\)"),
    (lambda h, w, y, s: (h, w, y, {**s, "scorer_hidden": s["scorer_hidden"][:3]}), ValueError,
     r"scorer_hidden: expected shape \(12,\)"),
    (lambda h, w, y, s: (h, w, y, {**s, "bias": torch.zeros(19, device=DEVICE)}), ValueError,
     r"bias: expected shape \(20,\)"),
    (lambda h, w, y, s: (h, w, y, {**s, "scorer_logprobs": torch.zeros(12, device=DEVICE)}), ValueError,
     r"expected exactly one of scorer_hidden .*got both"),
    (lambda h, w, y, s: (h, w, y, {"scorer_logprobs": torch.zeros(11, device=DEVICE)}), ValueError,
     r"scorer_logprobs: expected shape \(12,\)"),
    (lambda h, w, y, s: (h, w, y, {**s, "method": "dpo"}), ValueError,
     r"method: expected one of \('remit', 'ntp', 'rho1', 'kd'\), got 'dpo'"),
    (lambda h, w, y, s: (h, w, y, {**s, "method": "ntp"}), ValueError,
     r"method='ntp' uses no scorer"),
    (lambda h, w, y, s: (h, w, y, {"scorer_logprobs": torch.zeros(12, device=DEVICE),
                         "method": "kd"}),
     ValueError, r"method='kd' needs the teacher's full distribution"),
    (lambda h, w, y, s: (h, w, y, {**s, "temperature": 2.0}), ValueError,
     r"temperature: only method='kd'"),
    (lambda h, w, y, s: (h, w, y, {**s, "chunk_size": 0}), ValueError,
     r"chunk_size: expected a positive int or None, got 0"),
    (lambda h, w, y, s: (h, w, y, {**s, "memory_budget": 1.5}), ValueError,
     r"memory_budget: expected a positive int"),
    (lambda h, w, y, s: (h, w, y, {**s, "eps": 1.5}), ValueError, r"eps: expected"),
    (lambda h, w, y, s: (h, w, y, {**s, "reduction": "avg"}), ValueError, r"reduction: expected"),
    (lambda h, w, y, s: (h, w, y, {**s, "keep_ratio": 0}), ValueError, r"keep_ratio: expected"),
    (lambda h, w, y, s: (h, w, y, {**s, "cu_seqlens": torch.tensor([0, 5, 11], device=DEVICE)}), ValueError,
     r"cu_seqlens: expected non-decreasing offsets from 0 to the number of tokens 12"),
    (lambda h, w, y, s: (h, w, y, {**s, "backend": "cuda9"}), ValueError, r"backend: expected"),
])
def test_bad_inputs(change, exc, match):
    h, w, y, s = change(*_err_inputs())
    # "sync": the value errors (target range, offsets) raise on a GPU too (test_validation.py).
    with remit_ext.validation("sync"), pytest.raises(exc, match=match):
        remit_ext.remit_linear_loss(h, w, y, **s)


# ----------------------------------------------------------------- registered op, compile


def _op_args(inp, reduction, need=(True, True, False)):
    n = inp["targets"].numel()
    return (inp["hidden"], inp["lm_head_weight"], inp["targets"], None, inp["scorer_hidden"],
            inp["scorer_weight"], None, None, torch.tensor([0, 7, 20, n]), n, "remit", IGNORE,
            0.2, 0.6, 1.0, reduction, 8, *need, True, "cpu")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    inp = make_inputs(30, 6, 40, torch.float32, seed=15)
    inp["hidden"].requires_grad_()
    inp["lm_head_weight"].requires_grad_()
    torch.library.opcheck(torch.ops.remit_ext_linear.linear_loss.default,
                          _op_args(inp, reduction))
    coef = torch.rand(30)
    torch.library.opcheck(torch.ops.remit_ext_linear.linear_loss_grad.default,
                          (inp["hidden"].detach(), inp["lm_head_weight"].detach(),
                           inp["targets"], None, None, None, None, coef, "ntp", IGNORE, 1.0, 8,
                           True, True, False, True, "cpu"))


def test_compile_fullgraph():
    inp = make_inputs(40, 12, 64, torch.float32, seed=16, bias=True, batch=2)
    torch._dynamo.reset()

    def step(h, w, b, y, sh, sw):
        loss = remit_ext.remit_linear_loss(h, w, y, bias=b, scorer_hidden=sh, scorer_weight=sw,
                                           chunk_size=8)
        return loss * 2

    args = [inp[k] for k in ("hidden", "lm_head_weight", "bias", "targets", "scorer_hidden",
                             "scorer_weight")]
    params = [a.detach().requires_grad_() for a in args[:3]]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*params, *args[3:])
    got_grads = torch.autograd.grad(got, params)
    ref_params = [a.detach().requires_grad_() for a in args[:3]]
    want = step(*ref_params, *args[3:])
    want_grads = torch.autograd.grad(want, ref_params)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kd_teacher_head_wider_than_the_student(backend):
    # A bf16 student with an fp32 teacher head: the teacher's logits are read in fp32 (not
    # rounded to bf16), as kd_loss on the same logits does; the gradients come back in bf16.
    inp = make_inputs(24, 16, 67, torch.bfloat16, seed=5)
    sh = inp["scorer_hidden"].float()
    sw = inp["scorer_weight"].float()
    h = inp["hidden"].detach().requires_grad_(True)
    w = inp["lm_head_weight"].detach().requires_grad_(True)
    y = inp["targets"]
    got = remit_ext.remit_linear_loss(h, w, y, scorer_hidden=sh, scorer_weight=sw, method="kd",
                                      chunk_size=7, backend=backend)
    got.backward()
    z = (h.detach().reshape(-1, h.shape[-1]) @ w.detach().T).float()
    tz = sh.reshape(-1, sh.shape[-1]) @ sw.T
    want = kd_loss_ref(z.double(), tz.double(), y.reshape(-1), ignore_index=IGNORE)
    rounded = kd_loss_ref(z.double(), tz.bfloat16().double(), y.reshape(-1),
                          ignore_index=IGNORE)
    assert abs(float(got) - float(want)) < 0.1 * abs(float(rounded) - float(want))
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("method", ["ntp", "remit"])
def test_fp32_chunk_logits_from_bf16(backend, method):
    # chunk_dtype=torch.float32: the logits of bf16 inputs formed in fp32. Against the fp64
    # truth on the same (bf16-rounded) inputs, at a logit scale where bf16 logits lose ~1% of
    # the gradient, the fp32 ones keep it to the bf16 rounding of the gradient itself
    # (2**-9 relative), and the loss to fp32 rounding. The gradients come back in bf16.
    inp = make_inputs(96, 32, 501, torch.bfloat16, seed=9, scorer=method != "ntp")
    inp["lm_head_weight"] = inp["lm_head_weight"] * 4  # logits with a spread of ~12
    sc = {} if method == "ntp" else {"scorer_hidden": inp["scorer_hidden"],
                                     "scorer_weight": inp["scorer_weight"]}
    errs = {}
    for cd in (None, torch.float32):
        h = inp["hidden"].detach().requires_grad_(True)
        w = inp["lm_head_weight"].detach().requires_grad_(True)
        loss = remit_ext.remit_linear_loss(h, w, inp["targets"], method=method, chunk_size=17,
                                           backend=backend, chunk_dtype=cd, **sc)
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == torch.bfloat16
        t_loss, t_grads, _ = eager(inp, method, dtype=torch.float64)
        rel = [float((g.double() - t).norm() / t.norm())
               for g, t in ((h.grad, t_grads[0]), (w.grad, t_grads[1]))]
        errs[cd] = (abs(float(loss) - float(t_loss)) / abs(float(t_loss)), *rel)
    loss32, gh32, gw32 = errs[torch.float32]
    assert loss32 < 1e-6 and gh32 < 4e-3 and gw32 < 4e-3, errs
    assert gh32 < errs[None][1] / 2 and gw32 < errs[None][2] / 2, errs


@pytest.mark.parametrize("bad", [torch.float16, torch.int32, "float32"])
def test_chunk_dtype_is_checked(bad):
    inp = make_inputs(8, 8, 11, torch.float32, scorer=False)
    with pytest.raises(ValueError, match="chunk_dtype: expected None, torch.float32"):
        remit_ext.remit_linear_loss(inp["hidden"], inp["lm_head_weight"], inp["targets"],
                                    method="ntp", chunk_dtype=bad)
    with pytest.raises(ValueError, match="chunk_dtype"):
        remit_ext.linear_token_stats(inp["hidden"], inp["lm_head_weight"], inp["targets"],
                                     chunk_dtype=bad)

