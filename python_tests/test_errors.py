"""Bad input gets a clear exception naming the argument, what was expected and what was given;
the dispatcher names every backend's reason; the build refuses a mismatched torch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import remit_ext
from remit_ext import _build
from cases import IGNORE, make_pair
from conftest import DEVICE, KERNEL_BACKENDS

ROOT = Path(__file__).resolve().parents[1]
ALL = ["auto", "torch"] + KERNEL_BACKENDS


def _batch(shape=(2, 5, 11)):
    return make_pair(shape, torch.float32, seed=31)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("targets_shape", ValueError, r"targets: expected shape \(2, 5\).*got \(2, 4\)"),
        ("targets_dtype", TypeError, r"targets: expected dtype int64 or int32, got torch.float32"),
        ("target_too_big", ValueError, r"targets: expected values in \[0, 11\) or "
                                       r"ignore_index=-100, got 11 at flat position 3"),
        ("target_negative", ValueError, r"targets: expected values in \[0, 11\).*got -1"),
        ("logits_dtype", TypeError, r"logits: expected dtype float16, bfloat16, float32 or "
                                    r"float64, got torch.int64"),
        ("logits_1d", ValueError, r"logits: expected shape \[\.\.\., N, V\].*got \(11,\)"),
        ("empty", ValueError, r"logits: expected a non-empty tensor, got shape \(0, 11\)"),
        ("scorer_shape", ValueError, r"scorer_logits: expected the shape of logits \(2, 5, 11\), "
                                     r"got \(2, 5, 12\)"),
        ("both_scorers", ValueError, r"remit_loss: expected exactly one of scorer_logits and "
                                     r"scorer_logprobs, got both"),
        ("no_scorer", ValueError, r"exactly one of scorer_logits and scorer_logprobs, got neither"),
        ("scorer_logprobs_shape", ValueError, r"scorer_logprobs: expected shape \(2, 5\)"),
        ("eps_zero", ValueError, r"eps: expected a number in \(0, 1\), got 0"),
        ("eps_one", ValueError, r"eps: expected a number in \(0, 1\), got 1.0"),
        ("reduction", ValueError, r"reduction: expected one of \('mean', 'sum', 'none'\), "
                                  r"got 'avg'"),
        ("cu_not_starting_at_0", ValueError, r"cu_seqlens: expected non-decreasing offsets from 0 "
                                             r"to the number of tokens 10, got \[1, 10\]"),
        ("cu_wrong_end", ValueError, r"cu_seqlens: .* tokens 10, got \[0, 4, 9\]"),
        ("cu_decreasing", ValueError, r"cu_seqlens: .*got \[0, 6, 4, 10\]"),
        ("cu_dtype", TypeError, r"cu_seqlens: expected dtype int32 or int64, got torch.float32"),
        ("cu_2d", ValueError, r"cu_seqlens: expected a 1-D tensor of at least 2 offsets"),
        ("not_a_tensor", TypeError, r"targets: expected a torch.Tensor, got list"),
    ],
)
def test_remit_loss_bad_input(backend, case, exc, pattern):
    logits, scorer, targets = _batch()
    kw = dict(scorer_logits=scorer)
    if case == "targets_shape":
        targets = targets[:, :4]
    elif case == "targets_dtype":
        targets = targets.float()
    elif case == "target_too_big":
        targets = targets.clone().fill_(0)
        targets[0, 3] = 11
    elif case == "target_negative":
        targets = targets.clone().fill_(0)
        targets[1, 1] = -1
    elif case == "logits_dtype":
        logits = targets.clone().unsqueeze(-1).expand(2, 5, 11).clone()
    elif case == "logits_1d":
        logits, targets = logits[0, 0], targets[0, 0]
    elif case == "empty":
        logits, targets, kw = logits[0, :0], targets[0, :0], dict(scorer_logits=scorer[0, :0])
    elif case == "scorer_shape":
        kw = dict(scorer_logits=torch.randn(2, 5, 12, device=DEVICE))
    elif case == "both_scorers":
        kw = dict(scorer_logits=scorer, scorer_logprobs=torch.zeros(2, 5, device=DEVICE))
    elif case == "no_scorer":
        kw = {}
    elif case == "scorer_logprobs_shape":
        kw = dict(scorer_logprobs=torch.zeros(2, 4, device=DEVICE))
    elif case == "eps_zero":
        kw["eps"] = 0
    elif case == "eps_one":
        kw["eps"] = 1.0
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case.startswith("cu_"):
        logits, scorer, targets = logits.reshape(10, 11), scorer.reshape(10, 11), targets.reshape(10)
        kw = dict(scorer_logits=scorer, cu_seqlens={
            "cu_not_starting_at_0": torch.tensor([1, 10]),
            "cu_wrong_end": torch.tensor([0, 4, 9]),
            "cu_decreasing": torch.tensor([0, 6, 4, 10]),
            "cu_dtype": torch.tensor([0.0, 10.0]),
            "cu_2d": torch.tensor([[0, 10]]),
        }[case].to(DEVICE))
    elif case == "not_a_tensor":
        targets = targets.tolist()
    # "sync": value errors (target range, offsets) raise on every device; under the default
    # "async" a CUDA tensor's bad value is a device-side assert (test_validation.py).
    with remit_ext.validation("sync"), pytest.raises(exc, match=pattern):
        remit_ext.remit_loss(logits, targets, backend=backend, **kw)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs a second device")
def test_mixed_devices():
    logits, scorer, targets = _batch()
    with pytest.raises(ValueError, match=r"scorer_logits: expected a tensor on cpu like logits, "
                                         r"got one on meta"):
        remit_ext.remit_loss(logits, targets, scorer_logits=scorer.to("meta"))


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda l, s, y: remit_ext.token_stats(l, y, temperature=0.0), ValueError,
         r"temperature: expected a number > 0, got 0.0"),
        (lambda l, s, y: remit_ext.token_stats(l, y, topk=0), ValueError,
         r"topk: expected a positive int or None, got 0"),
        (lambda l, s, y: remit_ext.kd_loss(l, s, y, temperature=-1.0), ValueError,
         r"temperature: expected a number > 0, got -1.0"),
        (lambda l, s, y: remit_ext.kd_loss(l, s[..., :3], y), ValueError,
         r"teacher_logits: expected the shape of logits"),
        (lambda l, s, y: remit_ext.rho1_loss(l, y, ref_logits=s, keep_ratio=0.0), ValueError,
         r"keep_ratio: expected a number in \(0, 1\], got 0.0"),
        (lambda l, s, y: remit_ext.rho1_loss(l, y), ValueError,
         r"rho1_loss: expected exactly one of ref_logits and ref_logprobs, got neither"),
        (lambda l, s, y: remit_ext.weighted_cross_entropy(l, y, torch.ones(3, device=DEVICE)),
         ValueError,
         r"weights: expected shape \(2, 5\) \(one value per position\), got \(3,\)"),
        (lambda l, s, y: remit_ext.remit_weights(torch.zeros(2, 5, device=DEVICE),
                                                 torch.zeros(2, 5, device=DEVICE), y, eps=2),
         ValueError, r"eps: expected a number in \(0, 1\), got 2"),
        (lambda l, s, y: remit_ext.remit_weights(torch.zeros(2, 5, device=DEVICE),
                                                 torch.zeros(2, 4, device=DEVICE), y),
         ValueError, r"scorer_logprobs: expected shape \(2, 5\)"),
        (lambda l, s, y: remit_ext.remit_loss(l, y, scorer_logits=s, backend="cuda-fast"),
         ValueError, r"backend: expected 'auto' or one of \[.*'torch'\], got 'cuda-fast'"),
    ],
)
def test_other_bad_input(call, exc, pattern):
    logits, scorer, targets = _batch()
    with pytest.raises(exc, match=pattern):
        call(logits, scorer, targets)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="cpu kernels not built")
def test_dispatcher_names_the_reason():
    logits, scorer, targets = _batch()
    with pytest.raises(remit_ext.BackendUnavailableError,
                       match=r"no backend can run kd_loss \(backend='cuda'\): cuda: no "
                             r"CUDA kernel for KD yet"):
        remit_ext.kd_loss(logits, scorer, targets, backend="cuda")
    meta = logits.to("meta")
    with pytest.raises(remit_ext.BackendUnavailableError,
                       match=r"cpu: needs CPU tensors, got tensors on \['meta'\]"):
        remit_ext.remit_loss(meta, targets.to("meta"), scorer_logits=scorer.to("meta"),
                             backend="cpu")


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="cpu kernels not built")
@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda z, y: torch.ops.remit_ext.token_stats(z, y, None, IGNORE, 1.0, False, 0, False),
         r"targets: expected values in \[0, 11\) or ignore_index=-100, got 99 at position 0"),
        (lambda z, y: torch.ops.remit_ext.token_stats(z[0], y, None, IGNORE, 1.0, False, 0, False),
         r"logits: expected a 2-D \[N, V\] tensor"),
        (lambda z, y: torch.ops.remit_ext.remit_weights(
            torch.zeros(10), torch.zeros(10), y.clamp(0), torch.tensor([0, 3]), IGNORE, 0.2),
         r"cu_seqlens: expected to start at 0 and end at the number of tokens 10, got 0 \.\.\. 3"),
        (lambda z, y: torch.ops.remit_ext.remit_weights(
            torch.zeros(10), torch.zeros(9), y.clamp(0), torch.tensor([0, 10]), IGNORE, 0.2),
         r"scorer_logprob: expected the same shape as logprob \[10\], got \[9\]"),
        (lambda z, y: torch.ops.remit_ext.weighted_ce_bwd_(
            z.t().contiguous().t(), y.clamp(0), torch.zeros(10), torch.zeros(10),
            torch.zeros(10), IGNORE),
         r"logits: the in-place backward needs rows with unit stride"),
    ],
)
def test_direct_op_calls_check_too(call, pattern):
    # The kernels validate what they index with, so a direct torch.ops call cannot read out of
    # bounds either.
    logits, _, targets = _batch()
    z, y = logits.reshape(10, 11), targets.reshape(10).clone()
    y[0] = 99
    with pytest.raises(ValueError, match=pattern):
        call(z, y)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inplace_backward_refuses_rows_that_share_memory(backend):
    """An expanded [N, V] view (row stride 0) would have every row's gradient written over the
    same memory while other rows still read it: the in-place op refuses it, naming the strides."""
    from remit_ext._backends import BACKENDS

    if backend == "triton":
        import remit_ext.triton  # noqa: F401  (registers torch.ops.remit_ext_triton)
    z = torch.randn(1, 11, device=DEVICE).expand(10, 11)
    y = torch.arange(10, device=DEVICE)
    zeros = torch.zeros(10, device=DEVICE)
    with pytest.raises(ValueError, match=r"logits: the in-place backward needs rows that do not "
                                         r"overlap in memory \(row stride >= V\), got sizes "
                                         r"\[10, 11\] and strides \[0, 1\]"):
        BACKENDS[backend].ops.weighted_ce_bwd_(z, y, zeros, zeros, zeros, IGNORE)


def test_build_info():
    info = remit_ext.build_info()
    assert set(info) == {"torch_version", "cuda", "cuda_archs", "cpu_capability",
                         "cpu_capabilities"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_capabilities"][0] == "DEFAULT"
    assert info["cpu_capability"] in info["cpu_capabilities"]


def test_torch_version_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    with pytest.raises(ImportError, match=r"remit_ext was built against torch .* but torch "
                                          r"2.99.0\+cpu is imported; rebuild it"):
        _build.load_extension()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_build_without_torch_says_so(tmp_path):
    # An interpreter that cannot import torch (python -S drops site-packages) must stop the
    # configure step with the instructions, not with a CMake stack of missing targets.
    wrapper = tmp_path / "python-without-torch"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    wrapper.chmod(0o755)
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"),
         f"-DPython_EXECUTABLE={wrapper}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CMAKE_PREFIX_PATH": ""})
    assert proc.returncode != 0
    assert "remit_ext needs PyTorch at build time" in proc.stderr
    assert "--no-build-isolation" in proc.stderr


@pytest.mark.skipif(shutil.which("cmake") is None or torch.version.cuda is not None,
                    reason="needs cmake and a torch without CUDA")
def test_cuda_on_without_cuda_torch_says_so(tmp_path):
    import pybind11

    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DREMIT_CUDA=ON",
         f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "REMIT_CUDA=ON, but torch" in proc.stderr and "has no CUDA" in proc.stderr


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="triton backend not testable here")
def test_triton_topk_limit_names_the_reason():
    logits = torch.randn(3, 200, device=DEVICE)
    targets = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(remit_ext.BackendUnavailableError,
                       match=r"triton: the Triton kernel's top-k entropy takes topk <= 64 "
                             r"\(or >= V\), got 100"):
        remit_ext.token_stats(logits, targets, topk=100, backend="triton")
    # The default picks a backend that can: the result equals the reference.
    auto = remit_ext.token_stats(logits, targets, topk=100).topk_entropy
    torch.testing.assert_close(auto, remit_ext.token_stats(logits, targets, topk=100,
                                                           backend="torch").topk_entropy)
