"""Chunk planning for the fused-linear engine (``remit_ext.linear``'s docstring: "How a step
runs", "Host synchronisation"): rows per chunk from a memory budget, free chunks and chunks of
whole sequences, and the sequence offsets (the one host sync of a ``cu_seqlens`` call)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._methods import get_method
from .reference import acc_dtype

# Default bytes for the chunk buffers (policy logits, scorer logits, backend temporaries). On a
# GPU 2 GiB holds 4096 rows of bf16 policy + scorer logits at V = 128k: whole 4k-token
# sequences per chunk (the one-pass schedule) and matmuls large enough to run at full rate.
DEFAULT_MEMORY_BUDGET = {"cuda": 2 << 30, "cpu": 256 << 20}


def linear_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, *,
                      scorer_dtype: Optional[torch.dtype] = None, method: str = "remit",
                      backend: str = "cpu", device_type: str = "cpu",
                      memory_budget: Optional[int] = None) -> int:
    """Rows per chunk so that the chunk buffers fit in ``memory_budget`` bytes.

    Per row: the policy logits (the CE gradient is written into them), the scorer's logits when
    given, KD's gradient (its op writes a new buffer), and for the torch backend ~3 fp32
    temporaries of the eager formulas.
    """
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET.get(device_type, DEFAULT_MEMORY_BUDGET["cpu"])
    per_elem = dtype.itemsize + (scorer_dtype.itemsize if scorer_dtype is not None else 0)
    if get_method(method).term == "kd":  # its gradient op writes a new buffer
        per_elem += dtype.itemsize
    if backend == "torch":
        per_elem += 3 * acc_dtype(dtype).itemsize
    rows = memory_budget // max(vocab * per_elem, 1)
    return int(max(1, min(rows, n_tokens)))



def stats_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, *, backend: str = "cpu",
                     device_type: str = "cpu", memory_budget: Optional[int] = None) -> int:
    """Rows per chunk of ``linear_token_stats`` so that its chunk buffers fit in
    ``memory_budget`` bytes: per row the logits (input dtype) and the backward's two fp32
    buffers (log-softmax and softmax; the gradient is written into the first), plus one more
    for the torch backend's eager formulas."""
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET.get(device_type, DEFAULT_MEMORY_BUDGET["cpu"])
    acc = acc_dtype(dtype).itemsize
    per_elem = dtype.itemsize + 2 * acc + (acc if backend == "torch" else 0)
    rows = memory_budget // max(vocab * per_elem, 1)
    return int(max(1, min(rows, n_tokens)))



def _free_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _aligned_chunks(bounds: list[int], chunk: int) -> Optional[list[tuple[int, int, int, int]]]:
    """Greedy runs of whole sequences of at most ``chunk`` rows: (row_lo, row_hi, seq_lo,
    seq_hi) with bounds[seq_lo] = row_lo, bounds[seq_hi] = row_hi. None if one sequence alone
    is longer than a chunk (the caller falls back to two passes)."""
    out, seq_lo = [], 0
    for s in range(len(bounds) - 1):
        if bounds[s + 1] - bounds[s] > chunk:
            return None
        if bounds[s + 1] - bounds[seq_lo] > chunk:
            out.append((bounds[seq_lo], bounds[s], seq_lo, s))
            seq_lo = s
    out.append((bounds[seq_lo], bounds[-1], seq_lo, len(bounds) - 1))
    return out



def _offsets(row_len: int, n: int, cu_seqlens: Optional[Tensor], device) -> Tensor:
    if cu_seqlens is not None:
        return cu_seqlens.to(torch.long)
    return torch.arange(0, n + 1, row_len, device=device, dtype=torch.long)


def _host_bounds(n: int, row_len: int, cu_seqlens: Optional[Tensor]) -> list[int]:
    if cu_seqlens is not None:
        return [int(x) for x in cu_seqlens.tolist()]  # the one host sync (module docstring)
    return list(range(0, n + 1, row_len))

