"""Who is measured: the providers, whether each can run here, and the adapters for the
libraries people use today.

- ``reference``: ``remit_ext.reference`` through ``backend="torch"``, fp32 math, one formula a
  line: the ground truth the correctness gate compares every other provider to. It always runs
  once per op for the gate; it is timed only when asked for (``--providers reference ...``) and
  is never a denominator.
- ``eager``: plain PyTorch as a user writes it (``eager.py``: ``F.cross_entropy`` /
  ``log_softmax`` + ``gather`` in the input dtype, vectorised weights, no fp64). Every
  ``speedup_vs_eager`` is against it.
- ``compile``: ``torch.compile`` of exactly that code (default inductor backend).
- ``cpu``, ``triton``, ``cuda``: remit_ext with that backend (``<backend>_inplace`` rows add
  ``inplace_backward=True``: the logits gradient overwrites the logits buffer).
- ``liger``: Liger-Kernel. Logits level: ``liger_cross_entropy(reduction="none")`` gives
  ``-log p`` per token, so a ReMiT step is two such calls (the scorer's under no_grad), the
  weights, and ``sum(w * loss) / n_valid``. Fused linear: ``LigerFusedLinearCrossEntropyLoss``
  the same way, and ``LigerFusedLinearScaledCrossEntropyFunction`` (FLSCE: per-token NLL and
  entropy) for the token statistics. Per-token weights enter through the backward of
  ``reduction="none"``.
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(reduction="none")``, weighted outside,
  the scorer's pass under no_grad (bf16/fp16 only: its backward refuses fp32).
- ``quack``: QuACK (``quack-kernels``, CuTe DSL). Logits level: ``cross_entropy(reduction=
  "none")`` the way Liger's is used; fused linear: ``chunked_linear_cross_entropy`` for plain
  CE (mean only: it has no per-token output), and for ReMiT ``linear_cross_entropy_func(
  reduction="none")`` (the logits materialised, then its CE kernel), the scorer's pass apart,
  weights outside: what a QuACK user combines today.

Liger, CCE and QuACK are CUDA libraries: off a GPU, or when not installed, their rows are
skipped with the reason printed (QuACK's CuTe-DSL runtime wheel is ~92 MB, too large for some
offline GPU machines; the ledger's ``vs_best`` column carries its published numbers instead:
``targets.py``).
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Optional

import torch

PROVIDERS = ("reference", "eager", "compile", "cpu", "triton", "cuda", "liger", "cce", "quack")
# What a run times unless --providers says otherwise: the reference runs for the gate only.
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS if p != "reference")
KERNEL_BACKENDS = ("cpu", "triton", "cuda")
# Providers that are not remit_ext: an exception from one of them loses that case's row (and is
# reported); an exception from remit_ext or the reference fails the run.
THIRD_PARTY = ("compile", "liger", "cce", "quack")
_EXTERNAL = {"liger": ("liger_kernel", "liger-kernel"),
             "cce": ("cut_cross_entropy", "cut-cross-entropy"),
             "quack": ("quack", "quack-kernels")}
# The modules each external provider's adapters import (all must import for it to run).
_MODULES = {"liger": ("liger_kernel.transformers",),
            "cce": ("cut_cross_entropy",),
            "quack": ("quack.cross_entropy", "quack.linear_cross_entropy")}


def version(provider: str) -> Optional[str]:
    """The installed version of an external provider's distribution (None if absent)."""
    try:
        return metadata.version(_EXTERNAL[provider][1])
    except (KeyError, metadata.PackageNotFoundError):
        return None


def triton_interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run here although TRITON_INTERPRET=1 is set (None when
    it can). triton.language's own helpers (tl.zeros, ...) become interpreter functions only if
    the variable was set before triton was first imported, and torch imports triton whenever
    torch._dynamo loads (``import remit_ext`` does): set later, every kernel launch fails with
    "Cannot call @triton.jit'd outside of the scope of a kernel"."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception as err:  # no triton, or a broken one
        return f"triton is not importable ({type(err).__name__}: {err})"
    if not isinstance(getattr(tl, "zeros", None), InterpretedFunction):
        return ("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter "
                "cannot run; export TRITON_INTERPRET=1 before starting Python")
    return None


def unavailable(provider: str, device: str) -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` here, or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    if provider in ("reference", "eager", "compile"):
        return None
    if provider in KERNEL_BACKENDS:
        import remit_ext

        if provider not in remit_ext.available_backends():
            return f"remit_ext has no {provider!r} backend in this build/environment"
        if provider == "cpu" and device != "cpu":
            return "the C++ CPU kernels take CPU tensors"
        if provider == "cuda" and device != "cuda":
            return "the CUDA kernels take CUDA tensors"
        if provider == "triton" and device == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "Triton runs on CPU only in its interpreter (TRITON_INTERPRET=1)"
            return triton_interpreter_problem()
        return None
    module, dist = _EXTERNAL[provider]
    if device != "cuda":
        return f"{dist} runs its kernels on CUDA devices only"
    for name in _MODULES[provider]:
        try:
            __import__(name)
        except Exception as err:  # an installed but broken package is a reason too
            return f"{name} is not importable ({type(err).__name__}: {err})"
    return None


def split_available(providers, device: str) -> tuple[list[str], dict[str, str]]:
    """(the providers that run here, {provider: why not} for the others)."""
    ok, why = [], {}
    for p in providers:
        reason = unavailable(p, device)
        if reason is None:
            ok.append(p)
        else:
            why[p] = reason
    return ok, why


# ---------------------------------------------------------------------------------- adapters


def liger_token_nll(logits2d, targets1d, ignore_index: int = -100):
    """Per-token ``-log p(target)`` from Liger's logits-level cross-entropy (0 where ignored)."""
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy(logits2d, targets1d, ignore_index=ignore_index, reduction="none")


def liger_linear(hidden2d, weight, targets1d, reduction: str, ignore_index: int = -100):
    """Liger's fused linear CE of ``hidden @ weight.T``: per-token ``-log p`` with 'none', the
    mean over the valid tokens with 'mean'."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)
    return flce(weight, hidden2d, targets1d)


def liger_linear_stats(hidden2d, weight, targets1d, ignore_index: int = -100):
    """Liger's FLSCE: per-token fp32 NLL and the entropy of ``hidden @ weight.T`` (never
    reduced; the backward takes per-token cotangents for both)."""
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import (
        LigerFusedLinearScaledCrossEntropyFunction)

    return LigerFusedLinearScaledCrossEntropyFunction.apply(hidden2d, weight, targets1d, 1.0,
                                                            ignore_index, 1, True)


def cce_linear(hidden2d, weight, targets1d, reduction: str, ignore_index: int = -100):
    """Cut Cross-Entropy's ``linear_cross_entropy`` (per-token ``-log p`` with 'none'), with its
    defaults: gradient blocks below ``filter_eps`` are skipped (approximate by design), and its
    backward takes bf16/fp16 only."""
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden2d, weight, targets1d, ignore_index=ignore_index,
                                reduction=reduction)


def quack_token_nll(logits2d, targets1d, ignore_index: int = -100):
    """Per-token ``-log p(target)`` from QuACK's logits-level cross-entropy (fp32, 0 where
    ignored)."""
    from quack.cross_entropy import cross_entropy

    return cross_entropy(logits2d, targets1d, ignore_index=ignore_index, reduction="none")


def quack_linear(hidden2d, weight, targets1d, reduction: str, ignore_index: int = -100):
    """QuACK on ``hidden @ weight.T``: 'mean' is its fused ``chunked_linear_cross_entropy``;
    'none' (per-token, for weights) is ``linear_cross_entropy_func``, the logits materialised
    and then its CE kernel, the only per-token path it has."""
    if reduction == "mean":
        from quack.linear_cross_entropy import chunked_linear_cross_entropy

        return chunked_linear_cross_entropy(hidden2d, weight, targets1d,
                                            ignore_index=ignore_index, reduction="mean")
    from quack.linear_cross_entropy import linear_cross_entropy_func

    return linear_cross_entropy_func(hidden2d, weight, None, targets1d,
                                     ignore_index=ignore_index, reduction="none")


def compiled(fn):
    """``torch.compile`` of ``fn`` (dynamic=False: one graph per shape, as a training run)."""
    return torch.compile(fn, dynamic=False)
