"""Who is measured: the providers, whether each can run here, and the adapters for the
libraries people use today.

- ``eager``: the eager PyTorch reference (``remit_ext.reference``, what ``backend="torch"``
  runs): fp32 math, one op per formula.
- ``compile``: ``torch.compile`` of the same reference (default inductor backend).
- ``cpu``, ``triton``, ``cuda``: remit_ext with that backend (``<backend>_inplace`` rows add
  ``inplace_backward=True``: the logits gradient overwrites the logits buffer).
- ``liger``: Liger-Kernel. Logits level: ``liger_cross_entropy(reduction="none")`` gives
  ``-log p`` per token, so a ReMiT step is two such calls (the scorer's under no_grad), the
  weights, and ``sum(w * loss) / n_valid``. Fused linear: ``LigerFusedLinearCrossEntropyLoss``
  the same way. Per-token weights enter through the backward of ``reduction="none"``.
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(reduction="none")``, weighted outside,
  the scorer's pass under no_grad (bf16/fp16 only: its backward refuses fp32).

Liger and CCE are Triton libraries for CUDA devices: off a GPU, or when not installed, their
rows are skipped with the reason printed.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Optional

import torch

PROVIDERS = ("eager", "compile", "cpu", "triton", "cuda", "liger", "cce")
KERNEL_BACKENDS = ("cpu", "triton", "cuda")
_EXTERNAL = {"liger": ("liger_kernel", "liger-kernel"),
             "cce": ("cut_cross_entropy", "cut-cross-entropy")}


def version(provider: str) -> Optional[str]:
    """The installed version of an external provider's distribution (None if absent)."""
    try:
        return metadata.version(_EXTERNAL[provider][1])
    except (KeyError, metadata.PackageNotFoundError):
        return None


def unavailable(provider: str, device: str) -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` here, or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    if provider in ("eager", "compile"):
        return None
    if provider in KERNEL_BACKENDS:
        import remit_ext

        if provider not in remit_ext.available_backends():
            return f"remit_ext has no {provider!r} backend in this build/environment"
        if provider == "cpu" and device != "cpu":
            return "the C++ CPU kernels take CPU tensors"
        if provider == "cuda" and device != "cuda":
            return "the CUDA kernels take CUDA tensors"
        if provider == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU only in its interpreter (TRITON_INTERPRET=1)"
        return None
    module, dist = _EXTERNAL[provider]
    if device != "cuda":
        return f"{dist} runs Triton kernels on CUDA devices only"
    try:
        __import__(module)
    except Exception as err:  # an installed but broken package is a reason too
        return f"{module} is not importable ({type(err).__name__}: {err})"
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


def cce_linear(hidden2d, weight, targets1d, reduction: str, ignore_index: int = -100):
    """Cut Cross-Entropy's ``linear_cross_entropy`` (per-token ``-log p`` with 'none'), with its
    defaults: gradient blocks below ``filter_eps`` are skipped (approximate by design), and its
    backward takes bf16/fp16 only."""
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden2d, weight, targets1d, ignore_index=ignore_index,
                                reduction=reduction)


def compiled(fn):
    """``torch.compile`` of ``fn`` (dynamic=False: one graph per shape, as a training run)."""
    return torch.compile(fn, dynamic=False)
