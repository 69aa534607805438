"""No host synchronisation inside a loss call, forward or backward (issue 14, item 4).

One list of calls, checked two ways:

- on a GPU, under CUDA's sync debug mode "error", which turns every synchronising call (an
  ``.item()``, a blocking host-to-device copy, a ``nonzero``) into an error;
- on CPU (every machine, CI included), under a dispatch mode that records the ops which would
  synchronise on an accelerator: ``_local_scalar_dense`` (``.item()``, ``bool()``, ``int()`` of
  a tensor), ``lift_fresh`` (``torch.tensor(<python data>)``, a blocking host-to-device copy
  when the target device is a GPU) and ``nonzero``. The kernels themselves are opaque to the
  mode (what runs inside a registered op is not recorded), so this checks the Python glue:
  the public API, autograd, the Triton launch code. ``.tolist()`` is not dispatched and so not
  seen here; the GPU variant catches it.

Value checks run on the host for CPU tensors; on an accelerator under the default validation
mode they are device-side asserts. The CPU variant therefore checks with validation routed as
for an accelerator (``_value_check`` answering "device"), so that path is covered too.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import remit_ext
from remit_ext import _checks
from cases import make_pair
from conftest import DEVICE, KERNEL_BACKENDS

SYNCING_OPS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default",
               "aten.nonzero.default", "aten.item.default"}


def _calls(backend):
    """(name, call) pairs: each call runs a loss (or statistics) forward and backward."""
    logits, scorer, targets = make_pair((4, 64, 1000), torch.bfloat16, seed=41)
    n = targets.numel()
    cu = torch.tensor([0, 100, 256], device=DEVICE)
    adv = torch.randn(targets.shape, device=DEVICE)
    old = torch.randn(targets.shape, device=DEVICE) - 7
    b = remit_ext.token_stats(scorer, targets, backend=backend).logprob
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, 32, generator=g).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(1000, 32, generator=g) * 0.3).to(DEVICE, torch.bfloat16)
    s_hidden = torch.randn(n, 24, generator=g).to(DEVICE, torch.bfloat16)
    s_weight = (torch.randn(1000, 24, generator=g) * 0.3).to(DEVICE, torch.bfloat16)
    count_dev = torch.tensor(3 * n, device=DEVICE)  # num_items_in_batch: a global count
    count_cpu = torch.tensor(3 * n)

    def grad_of(fn, x):
        x = x.detach().clone().requires_grad_(True)
        fn(x).backward()
        return x.grad

    calls = []
    for inplace in (False, True):
        calls += [
            (f"remit_loss rows inplace={inplace}", lambda z, i=inplace: grad_of(
                lambda x: remit_ext.remit_loss(x, targets, scorer_logits=scorer,
                                               inplace_backward=i, backend=backend), z)),
            (f"weighted_cross_entropy inplace={inplace}", lambda z, i=inplace: grad_of(
                lambda x: remit_ext.weighted_cross_entropy(x, targets, adv.abs(),
                                                           inplace_backward=i,
                                                           backend=backend), z)),
            (f"policy_gradient_loss inplace={inplace}", lambda z, i=inplace: grad_of(
                lambda x: remit_ext.policy_gradient_loss(x, targets, adv, old_logprobs=old,
                                                         inplace_backward=i,
                                                         backend=backend), z)),
        ]
    calls += [
        ("remit_loss 1-D targets", lambda z: grad_of(
            lambda x: remit_ext.remit_loss(x.view(n, -1), targets.view(n),
                                           scorer_logits=scorer.view(n, -1), backend=backend),
            z)),
        ("remit_loss cu_seqlens", lambda z: grad_of(
            lambda x: remit_ext.remit_loss(x.view(1, n, -1), targets.view(1, n),
                                           scorer_logits=scorer.view(1, n, -1), cu_seqlens=cu,
                                           backend=backend), z)),
        ("remit_loss scorer_logprobs 1-D", lambda z: grad_of(
            lambda x: remit_ext.remit_loss(x.view(n, -1), targets.view(n),
                                           scorer_logprobs=b.view(n), backend=backend), z)),
        ("rho1_loss", lambda z: grad_of(
            lambda x: remit_ext.rho1_loss(x, targets, ref_logprobs=b, backend=backend), z)),
        ("policy_gradient_loss 1-D", lambda z: grad_of(
            lambda x: remit_ext.policy_gradient_loss(x.view(n, -1), targets.view(n),
                                                     adv.view(n), backend=backend), z)),
        ("token_stats", lambda z: grad_of(
            lambda x: remit_ext.token_stats(x, targets, scorer_logits=scorer, entropy=True,
                                            backend=backend).logprob.sum(), z)),
        ("remit_weights 1-D", lambda z: remit_ext.remit_weights(
            b.view(n) - 0.1, b.view(n), targets.view(n), backend=backend).weights),
        # The fused-linear path with row sequences (with cu_seqlens it reads the offsets once on
        # the host by design: linear.py's module docstring).
        ("remit_linear_loss ntp", lambda z: grad_of(
            lambda h: remit_ext.remit_linear_loss(h, weight, targets.view(n), method="ntp",
                                                  backend=backend), hidden)),
        ("remit_loss num_items_in_batch tensor", lambda z: grad_of(
            lambda x: remit_ext.remit_loss(x, targets, scorer_logits=scorer,
                                           num_items_in_batch=count_dev, backend=backend), z)),
        ("policy_gradient_loss num_items_in_batch CPU tensor", lambda z: grad_of(
            lambda x: remit_ext.policy_gradient_loss(x, targets, adv,
                                                     num_items_in_batch=count_cpu,
                                                     backend=backend), z)),
        ("linear_token_stats logprob + entropy", lambda z: grad_of(
            lambda h: (lambda st: (st.logprob * adv.view(n)).sum() + st.entropy.sum())(
                remit_ext.linear_token_stats(h, weight, targets.view(n), entropy=True,
                                             backend=backend)), hidden)),
        ("remit_linear_loss live scorer, num_items_in_batch CPU tensor", lambda z: grad_of(
            lambda h: remit_ext.remit_linear_loss(h.view(4, 64, -1), weight, targets,
                                                  scorer_hidden=s_hidden.view(4, 64, -1),
                                                  scorer_weight=s_weight,
                                                  num_items_in_batch=count_cpu,
                                                  backend=backend), hidden)),
        ("remit_linear_loss remit, scorer log-probs", lambda z: grad_of(
            lambda h: remit_ext.remit_linear_loss(h.view(4, 64, -1), weight, targets,
                                                  scorer_logprobs=b, backend=backend),
            hidden)),
    ]
    return logits, calls


class _SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING_OPS:
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


def test_recorder_sees_the_syncs_it_looks_for():
    """The CPU variant can fail: each kind of synchronising call is recorded."""
    x = torch.randn(4)
    for call in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: torch.tensor([0, 4]),
                 lambda: x.nonzero(), lambda: int(x.argmax())):
        with _SyncRecorder() as rec:
            call()
        assert rec.hits, call
    with _SyncRecorder() as rec:
        (torch.arange(2) * 4, torch.full((1,), 2.0), x.exp())
    assert rec.hits == []


CPU_PROXY_BACKENDS = [b for b in KERNEL_BACKENDS if DEVICE.type == "cpu"]


@pytest.mark.skipif(not CPU_PROXY_BACKENDS, reason="the GPU variant runs on GPU machines")
@pytest.mark.parametrize("backend", CPU_PROXY_BACKENDS or ["none"])
def test_loss_calls_have_no_syncing_op(backend, monkeypatch):
    logits, calls = _calls(backend)
    # Value checks as on an accelerator (device-side asserts), not the CPU's host checks.
    monkeypatch.setattr(_checks, "_value_check",
                        lambda device: None if torch.compiler.is_compiling() else "device")
    found = {}
    for name, call in calls:
        with _SyncRecorder() as rec:
            call(logits)
        if rec.hits:
            found[name] = sorted(set(rec.hits))
    assert not found, f"ops that synchronise on an accelerator: {found}"


GPU_BACKENDS = [b for b in KERNEL_BACKENDS if b in ("triton", "cuda") and DEVICE.type == "cuda"]


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device (triton or cuda backend)")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_loss_calls_never_synchronise_with_the_host(backend):
    """CUDA's sync debug mode "error" raises on any synchronising call inside the calls."""
    logits, calls = _calls(backend)
    for name, call in calls:  # a first run outside the check: Triton compiles, caches fill
        call(logits)
    torch.cuda.synchronize()
    failed = {}
    for name, call in calls:
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(logits)
        except RuntimeError as err:
            failed[name] = str(err).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not failed, f"calls that synchronised with the host: {failed}"
