"""Validation modes for tensor values (issue 14, item 1): ``"async"`` (default; device-side
asserts on accelerators), ``"sync"`` (host checks and a ValueError on every device), ``"off"``.

A device-side assert poisons the CUDA context of the process it fires in, so the GPU test of
``"async"`` runs in a subprocess; everything else runs here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import remit_ext
from remit_ext import _checks
from cases import IGNORE, make_pair
from conftest import DEVICE, KERNEL_BACKENDS

CPU = torch.device("cpu")
TARGET_MSG = r"targets: expected values in \[0, 11\) or ignore_index=-100, got 99 at flat position 3"
CU_MSG = (r"cu_seqlens: expected non-decreasing offsets from 0 to the number of tokens 10, "
          r"got \[0, 6, 4, 10\]")


def _bad_batch(device):
    logits, scorer, targets = make_pair((10, 11), torch.float32, seed=5)
    logits, scorer, targets = logits.to(device), scorer.to(device), targets.to(device)
    bad = targets.clone()
    bad[3] = 99
    return logits, scorer, targets, bad, torch.tensor([0, 6, 4, 10], device=device)


def test_mode_api():
    assert remit_ext.get_validation() == "async"  # the default (no REMIT_EXT_VALIDATION here)
    with remit_ext.validation("sync"):
        assert remit_ext.get_validation() == "sync"
        with pytest.raises(KeyError):
            with remit_ext.validation("off"):
                assert remit_ext.get_validation() == "off"
                raise KeyError("restored on the way out")
        assert remit_ext.get_validation() == "sync"
    assert remit_ext.get_validation() == "async"
    assert remit_ext.set_validation("off") == "async"
    assert remit_ext.set_validation("async") == "off"
    with pytest.raises(ValueError, match=r"mode: expected one of \('async', 'sync', 'off'\), "
                                         r"got 'strict'"):
        remit_ext.set_validation("strict")
    assert remit_ext.get_validation() == "async"


@pytest.mark.parametrize("value, expect", [("sync", "sync"), ("off", "off"), ("bogus", None)])
def test_environment_variable(value, expect):
    env = {**os.environ, "REMIT_EXT_VALIDATION": value}
    proc = subprocess.run([sys.executable, "-c", "import remit_ext; "
                           "print(remit_ext.get_validation())"],
                          capture_output=True, text=True, env=env, timeout=300)
    if expect is None:
        assert proc.returncode != 0
        assert ("REMIT_EXT_VALIDATION: expected one of ('async', 'sync', 'off'), got 'bogus'"
                in proc.stderr)
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expect


@pytest.mark.parametrize("mode, cpu, cuda", [("async", "host", "device"),
                                             ("sync", "host", "host"),
                                             ("off", None, None)])
def test_routing_per_device(mode, cpu, cuda):
    with remit_ext.validation(mode):
        assert _checks._value_check(CPU) == cpu
        assert _checks._value_check(torch.device("cuda", 0)) == cuda
        assert _checks._value_check(torch.device("meta")) is None


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_cpu_values_raise_in_both_checking_modes(mode):
    logits, scorer, targets, bad, cu = _bad_batch(CPU)
    with remit_ext.validation(mode):
        with pytest.raises(ValueError, match=TARGET_MSG):
            remit_ext.token_stats(logits, bad, backend="torch")
        with pytest.raises(ValueError, match=CU_MSG):
            remit_ext.remit_loss(logits, targets, scorer_logits=scorer, cu_seqlens=cu,
                                 backend="torch")


@pytest.mark.skipif("cpu" not in remit_ext.available_backends(), reason="cpu kernels not built")
def test_off_leaves_values_to_the_kernels():
    """Off: the Python check is skipped; the C++ CPU kernel still refuses the bad target where
    it reads it (its own message: 'at position', not the API's 'at flat position')."""
    logits, scorer, targets, bad, cu = _bad_batch(CPU)
    with remit_ext.validation("off"):
        with pytest.raises(ValueError, match=r"got 99 at position 3$"):
            remit_ext.token_stats(logits, bad, backend="cpu")
    with pytest.raises(ValueError, match=TARGET_MSG):
        remit_ext.token_stats(logits, bad, backend="cpu")


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS or DEVICE.type != "cpu",
                    reason="the Triton interpreter on CPU")
def test_off_gives_nan_from_a_gpu_kernel():
    """Off, with a kernel that cannot raise (Triton, as on a GPU): NaN at the bad target only."""
    logits, scorer, targets, bad, cu = _bad_batch(CPU)
    with remit_ext.validation("off"):
        lp = remit_ext.token_stats(logits, bad, backend="triton").logprob
    assert bool(lp[3].isnan())
    keep = torch.arange(10) != 3
    ref = remit_ext.token_stats(logits, targets, backend="torch").logprob
    torch.testing.assert_close(lp[keep], ref[keep])


OFF_BACKWARD = [b for b in KERNEL_BACKENDS if b != "cpu"]  # the C++ CPU kernel refuses first


@pytest.mark.parametrize("backend", OFF_BACKWARD or ["none"])
@pytest.mark.skipif(not OFF_BACKWARD, reason="no GPU-style kernel backend here")
def test_off_backward_with_a_bad_target_forms_no_bad_index(backend):
    """Off (or under torch.compile): a target outside [0, V) gives a NaN log-prob and, in the
    backward, no one-hot and no out-of-bounds index (the formula paths scattered at it). With
    that token's log-prob left out of the loss, every gradient equals the one computed with a
    valid target there."""
    logits, scorer, targets, bad, cu = _bad_batch(DEVICE)
    keep = (torch.arange(10, device=DEVICE) != 3).double()

    def grads(y, mode):
        z = logits.double().clone().requires_grad_(True)
        with remit_ext.validation(mode):
            st = remit_ext.token_stats(z, y, entropy=True, temperature=1.5, backend=backend)
        (st.logprob.double() * keep).sum().add(st.entropy.double().sum()).backward()
        return st.logprob, z.grad

    lp, g = grads(bad, "off")
    lp_ref, g_ref = grads(targets, "async")
    assert bool(lp[3].isnan())
    torch.testing.assert_close(g, g_ref)

    g_ = torch.Generator().manual_seed(4)
    h = torch.randn(10, 6, generator=g_, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    w = torch.randn(11, 6, generator=g_, dtype=torch.float64).to(DEVICE)
    out = []
    for y, mode in ((bad, "off"), (targets, "async")):
        hh = h.detach().clone().requires_grad_(True)
        with remit_ext.validation(mode):
            st = remit_ext.linear_token_stats(hh, w, y, entropy=True, temperature=1.5,
                                              backend=backend)
        (st.logprob * keep).sum().add(st.entropy.sum()).backward()
        out.append(hh.grad)
    torch.testing.assert_close(out[0], out[1])


needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")


@needs_gpu
@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS] or ["none"])
def test_sync_raises_on_gpu_and_the_context_survives(backend):
    logits, scorer, targets, bad, cu = _bad_batch(DEVICE)
    with remit_ext.validation("sync"):
        with pytest.raises(ValueError, match=TARGET_MSG):
            remit_ext.token_stats(logits, bad, backend=backend)
        with pytest.raises(ValueError, match=CU_MSG):
            remit_ext.remit_loss(logits, targets, scorer_logits=scorer, cu_seqlens=cu,
                                 backend=backend)
    torch.cuda.synchronize()  # nothing asserted on the device
    lp = remit_ext.token_stats(logits, targets, backend=backend).logprob
    torch.testing.assert_close(lp, remit_ext.token_stats(logits, targets,
                                                         backend="torch").logprob)


CHILD = textwrap.dedent("""
    import sys, torch, remit_ext
    z = torch.randn(10, 11, device="cuda")
    y = torch.zeros(10, dtype=torch.long, device="cuda")
    y[3] = 99
    out = remit_ext.token_stats(z, y, backend=sys.argv[1])  # no host sync: the assert is async
    torch.cuda.synchronize()
    print("no assert", flush=True)
""")


@needs_gpu
@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS] or ["none"])
def test_async_is_a_device_assert_in_a_subprocess(backend):
    """The default on a GPU: no host sync in the check; the device-side assert surfaces at a
    later launch or synchronisation and kills that process's CUDA context (a child here)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, backend], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "REMIT_EXT_VALIDATION": "async"})
    # The assert is sticky: it may already surface inside the call (its next launch or
    # allocation), or at the synchronize; never is the process left running normally.
    assert "no assert" not in proc.stdout, proc.stdout
    assert proc.returncode != 0
    assert "device-side assert" in proc.stderr or "expected values in" in proc.stderr, \
        proc.stderr[-2000:]
