"""Registration checks: torch.library.opcheck on every op (schema, fakes, autograd registration,
AOT dispatch) and torch.compile(fullgraph=True) through the public API."""

import pytest
import torch
from torch.library import opcheck

import remit_ext
from cases import IGNORE, make_pair
from conftest import DEVICE, KD_BACKENDS, KERNEL_BACKENDS

# The op namespaces under test: the C++ library (its CPU kernels, or its CUDA kernels on a GPU)
# and the Triton mirror of its schemas.
NAMESPACES = [ns for ns, b in (("remit_ext", "cpu"), ("remit_ext", "cuda"),
                               ("remit_ext_triton", "triton")) if b in KERNEL_BACKENDS]
# The CUDA kernels refuse 0 < topk < V (no running top-k there).
_TOPK_OK = {"remit_ext": "cuda" not in KERNEL_BACKENDS, "remit_ext_triton": True}
if "triton" in KERNEL_BACKENDS:
    import remit_ext.triton  # noqa: F401  (registers torch.ops.remit_ext_triton)

pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend on this machine")


def _inputs(dtype=torch.float32, shape=(2, 7, 33)):
    logits, scorer, targets = make_pair(shape, dtype, seed=21)
    z = logits.reshape(-1, shape[-1]).requires_grad_(True)
    return z, scorer.reshape(z.shape), targets.reshape(-1)


def _cu(n, t):
    return torch.arange(n // t + 1, device=DEVICE) * t


def _stats(z, y):
    st = remit_ext.token_stats(z.detach(), y, backend="torch")
    return st.lse, st.logprob


@pytest.fixture(params=NAMESPACES)
def ops(request):
    return getattr(torch.ops, request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_token_stats(ops, dtype):
    z, s, y = _inputs(dtype)
    topk = _TOPK_OK[ops.name]
    opcheck(ops.token_stats, (z, y, s, IGNORE, 1.5, True, 4 if topk else 0, False))
    opcheck(ops.token_stats, (z, y, None, IGNORE, 1.0, False, 0, False))
    opcheck(ops.token_stats, (z, y, None, IGNORE, 1.0, True, 3 if topk else 0, topk))


def test_opcheck_remit_weights(ops):
    z, s, y = _inputs()
    _, a = _stats(z, y)
    _, b = _stats(s, y)
    a = a.clone().requires_grad_(True)
    opcheck(ops.remit_weights, (a, b, y, _cu(y.numel(), 7), IGNORE, 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weights", [False, True])
def test_opcheck_weighted_ce(ops, dtype, with_weights):
    z, _, y = _inputs(dtype)
    w = torch.rand(y.shape, device=DEVICE).requires_grad_(True) if with_weights else None
    opcheck(ops.weighted_ce_fwd, (z, y, w, IGNORE, False))
    lse, logprob = _stats(z, y)
    coef = torch.rand(y.shape, device=DEVICE)
    opcheck(ops.weighted_ce_bwd, (z.detach(), y, lse, logprob, coef, IGNORE))
    opcheck(ops.weighted_ce_bwd_, (z.detach().clone(), y, lse, logprob, coef, IGNORE))


@pytest.mark.parametrize("scorer_kind", ["logits", "logprob"])
@pytest.mark.parametrize("detach", [True, False])
def test_opcheck_remit_loss(ops, scorer_kind, detach):
    z, s, y = _inputs()
    b = _stats(s, y)[1]
    args = (z, y, s if scorer_kind == "logits" else None, b if scorer_kind == "logprob" else None,
            _cu(y.numel(), 7), IGNORE, 0.2, detach, False)
    opcheck(ops.remit_loss, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_kd_loss(ops, dtype):
    if ops.name == "remit_ext" and DEVICE.type == "cuda":
        pytest.skip("no CUDA KD kernel (the C++ library's KD runs on the CPU)")
    z, s, y = _inputs(dtype)
    opcheck(ops.kd_loss_fwd, (z, s, y, IGNORE, 2.0))
    loss, lse, lse_t = ops.kd_loss_fwd(z.detach(), s, y, IGNORE, 2.0)
    opcheck(ops.kd_loss_bwd, (z.detach(), s, y, lse, lse_t, torch.rand_like(loss), IGNORE, 2.0))


def _grads(fn, z, *args):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, *args)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


# "auto" (every op's default) included: its choice reads the measured table from a file and,
# on CUDA, the device name from the driver, which must not break fullgraph tracing.
COMPILE_CASES = [
    (backend, name)
    for backend in KERNEL_BACKENDS + ["auto"]
    for name in ("remit_loss", "remit_loss_logprobs", "weighted_ce", "rho1", "kd")
    if name != "kd" or backend in KD_BACKENDS + ["auto"]
]


@pytest.mark.parametrize("backend, name", COMPILE_CASES)
def test_compile_fullgraph(backend, name):
    torch._dynamo.reset()  # each case is a fresh function: do not count them as recompiles
    logits, scorer, targets = make_pair((2, 9, 65), torch.float32, seed=22)
    scorer_lp = remit_ext.token_stats(scorer, targets).logprob

    def f(z, s, s_lp, y):
        if name == "remit_loss":
            return remit_ext.remit_loss(z, y, scorer_logits=s, backend=backend)
        if name == "remit_loss_logprobs":
            return remit_ext.remit_loss(z, y, scorer_logprobs=s_lp, backend=backend)
        if name == "weighted_ce":
            return remit_ext.weighted_cross_entropy(z, y, s_lp.exp(), backend=backend)
        if name == "rho1":
            return remit_ext.rho1_loss(z, y, ref_logits=s, backend=backend)
        return remit_ext.kd_loss(z, s, y, temperature=2.0, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grad = _grads(f, logits, scorer, scorer_lp, targets)
    comp_loss, comp_grad = _grads(compiled, logits, scorer, scorer_lp, targets)
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(comp_grad, eager_grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_inductor_remit_loss_with_details(backend):
    logits, scorer, targets = make_pair((2, 9, 65), torch.float32, seed=23)

    def f(z, s, y):
        out = remit_ext.remit_loss(z, y, scorer_logits=s, return_details=True, backend=backend)
        return out.loss, out.weights, out.diagnostics.w_mean

    compiled = torch.compile(f, fullgraph=True)
    expected = f(logits, scorer, targets)
    got = compiled(logits, scorer, targets)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_compile_inductor_reference_single_sequence():
    """torch.compile (inductor) of the eager reference with one sequence: the segment sums once
    went through an index_add into a single slot, on which inductor's CPU codegen asserts."""
    logits, scorer, targets = make_pair((1, 24, 33), torch.float32, seed=24)

    def f(z, s, y):
        return remit_ext.remit_loss(z, y, scorer_logits=s, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_loss, eager_grad = _grads(lambda z, s, s_lp, y: f(z, s, y), logits, scorer, None,
                                    targets)
    comp_loss, comp_grad = _grads(lambda z, s, s_lp, y: compiled(z, s, y), logits, scorer,
                                  None, targets)
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(comp_grad, eager_grad)
