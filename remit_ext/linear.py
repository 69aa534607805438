"""Fused-linear losses and the token-statistics primitive: hidden states and LM heads in, no
``[N, V]`` logits held (METHODS.md sections 1-3, issue 5).

Two public entry points share one chunk engine:

- ``linear_token_stats``: per-token log-prob / entropy / lse, differentiable for any per-token
  cotangents (the composable primitive RL and mid-training trainers write their own losses on;
  the backward recomputes each chunk's logits). Op ``remit_ext_linear::linear_token_stats``.
- ``remit_linear_loss``: one monolithic loss per method with the gradient formed in the forward
  pass (one pass over the logits where the schedule allows). Its frozen scorer's log-probs come
  from the primitive, forward only.

One loss engine serves four methods, picked by ``method=``: ``"remit"`` (ReMiT weights from a
frozen scorer), ``"ntp"`` (weights 1), ``"rho1"`` (Rho-1 top-k selection against a reference
model) and ``"kd"`` (distillation against a teacher's full distribution). The scorer / reference /
teacher is the same set of arguments (``scorer_hidden`` + ``scorer_weight``, or precomputed
``scorer_logprobs``) and never receives a gradient.

How a step runs. Tokens are cut into chunks of at most ``chunk_size`` rows. For each chunk the
policy logits ``hidden_c @ W.T (+ bias)`` live in one ``[C, V]`` buffer; the per-token
statistics come from the backend's ``token_stats`` op, and the backend's weighted-CE gradient op
overwrites that same buffer with ``d loss / d logits`` (KD: the KD gradient op), which is then
folded into ``grad_hidden_c = G @ W``, ``grad_W += G.T @ hidden_c`` (fp32 accumulator by default)
and ``grad_bias += G.sum(0)``. So gradients are formed in the forward pass and the backward only
scales them by the incoming scalar. Three schedules:

- *fused* (one pass): NTP and KD always; ReMiT when every sequence fits in a chunk. Chunks then
  hold whole sequences, so the per-sequence centering of ReMiT is local to a chunk.
- *two-pass*: ReMiT with a sequence longer than a chunk, and Rho-1 (whose top-k is batch-wide):
  a statistics pass over all chunks gives ``a_t`` and ``b_t``, the weights (or the keep mask)
  are formed over the whole batch, then a recompute pass forms the gradients.
- ``reduction="none"``: the forward is the statistics pass only; the backward, which receives a
  per-token cotangent, is the recompute pass with coefficients ``g_t * w_t`` (a gradient formed
  in the forward could only be scaled by a scalar).

Host synchronisation: none in the chunk loop. Planning chunks needs sequence lengths on the host:
for the default segmentation (rows of ``targets``) they come from the shape, for ``cu_seqlens``
from one ``cu_seqlens.tolist()`` per call (a device sync on GPU; pass a CPU copy of your offsets
to the model's data loader and keep this one per step).

torch.compile: the engine is one registered op, ``torch.ops.remit_ext_linear.linear_loss``
(schema, fake and autograd in ``_linear_ops``), opaque to the compiler, so a compiled model
traces through the loss without a graph break. The backward of ``reduction="none"`` is a second
op, ``linear_loss_grad``; the primitive's backward is ``linear_token_stats_grad``.

Vocab parallel (``tp_group=``, or a DTensor head ``Shard(0)`` with DTensor hidden): the same
chunk steps on this rank's rows of the head, driven from
``remit_ext.distributed.vocab_parallel_linear`` (its docstring): a statistics pass, one gather
of the per-row statistics, the loss; the backward recomputes the chunks and all-reduces grad
hidden. It is an autograd.Function issuing collectives, so ``torch.compile`` graph-breaks there.
A DTensor head with plain hidden (FSDP2) goes to ``remit_ext.distributed.fsdp``
(``remit_ext.fsdp``).

Where the pieces live. This module holds this record and the two public routers (plain, vocab
parallel: ``distributed.vocab_parallel_linear``, FSDP2: ``distributed.fsdp``). Below it:
``_linear_local`` (argument checks, the dispatcher's choice, the plain-tensor entry points and
output types), ``_linear_ops`` (the registered ops: schema, fake, autograd), ``_linear_engine``
(``_Engine``, ``_Grads``, the schedules, the primitive's chunked forward and backward),
``_linear_plan`` (chunk sizes, chunks, offsets); the per-chunk kernels are the backends'
``chunk_*`` methods (``_backends``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks as chk
from .distributed import fsdp as _fsdp
from .distributed import vocab_parallel_linear as _vpl
from ._linear_engine import _linear_loss_impl  # noqa: F401  (tests reach the engine here)
from ._linear_local import (METHODS, LinearLossOutput, LinearTokenStats, _linear_token_stats,
                            _remit_linear_loss)
from ._linear_ops import NAMESPACE  # noqa: F401
from ._linear_plan import (DEFAULT_MEMORY_BUDGET, _aligned_chunks,  # noqa: F401
                           linear_chunk_size, stats_chunk_size)

__all__ = ["LinearLossOutput", "LinearTokenStats", "METHODS", "remit_linear_loss",
           "linear_chunk_size", "linear_token_stats", "stats_chunk_size"]


def remit_linear_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    scorer_hidden: Optional[Tensor] = None,
    scorer_weight: Optional[Tensor] = None,
    scorer_bias: Optional[Tensor] = None,
    scorer_logprobs: Optional[Tensor] = None,
    method: str = "remit",
    cu_seqlens: Optional[Tensor] = None,
    ignore_index: int = -100,
    eps: float = 0.2,
    keep_ratio: float = 0.6,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch: Optional[int | Tensor] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    grad_weight_fp32: bool = True,
    return_details: bool = False,
    backend: str = "auto",
    chunk_dtype: Optional[torch.dtype] = None,
    tp_group=None,
):
    """The loss of ``logits = hidden @ lm_head_weight.T (+ bias)`` without holding the logits.

    ``hidden`` is ``[..., N, D]`` (batch dims flattened like ``targets``), ``lm_head_weight``
    ``[V, D]``. ``method``: ``"remit"`` (default; ReMiT weights, ``eps``), ``"ntp"`` (plain
    cross-entropy), ``"rho1"`` (``keep_ratio``, scorer = reference model) or ``"kd"`` (scorer =
    teacher, ``temperature``). The frozen model is ``scorer_hidden [..., D_s]`` +
    ``scorer_weight [V, D_s]`` (+ ``scorer_bias``), or for ReMiT / Rho-1 precomputed
    ``scorer_logprobs``; it gets no gradient. Sequences for ReMiT's centering: rows of
    ``targets``, or ``cu_seqlens`` documents over the flattened positions.

    Gradients flow to ``hidden``, ``lm_head_weight`` (accumulated over chunks in fp32 unless
    ``grad_weight_fp32=False``, then rounded once to its dtype) and ``bias``. ``chunk_size``
    rows per chunk, or derived from ``memory_budget`` bytes for the chunk buffers (default 2 GiB
    on CUDA, 256 MiB on CPU). ``chunk_dtype``: the dtype the chunk logits (policy and frozen
    head) are formed in; None (default) keeps the inputs' (bf16 inputs: bf16 logits, the
    model's own ``lm_head``'s numbers), ``torch.float32`` forms them in fp32 from bf16 / fp16
    inputs (closer to the fp64 truth at large logit scales; costs fp32 copies of the heads and
    hidden states and fp32 GEMMs: measured in docs/fused-linear.md). Returns the loss, or with ``return_details=True`` a
    ``LinearLossOutput(loss, weights, diagnostics)``.

    For ReMiT and Rho-1 a live scorer's log-probs come from ``linear_token_stats`` under
    ``no_grad`` (the same primitive, its own chunks), then enter like ``scorer_logprobs``.
    ``num_items_in_batch`` (an int >= 0 or a 0-d tensor, no host sync; ``reduction="mean"``
    only) replaces the local count (valid tokens; Rho-1: kept tokens) as the divisor, so that
    gradient accumulation matches one big batch (data parallel: see ``remit_ext.functional``,
    DDP averages over ranks; a count of 0 gives 0, a negative one an error or NaN).

    Vocab parallel (``remit_ext.parallel``): with ``tp_group`` every rank passes its contiguous
    rows of the head (rank order, uneven allowed) as ``lm_head_weight`` [V_r, D] (and ``bias``;
    a live scorer's ``scorer_weight`` / ``scorer_bias`` split the same way), the same
    ``hidden`` and global target ids; the result is the unsharded one on every rank, the
    gradients are this rank's rows of dW / d bias and the full d hidden. Or, with no group,
    TorchTitan's ColwiseParallel layout: ``lm_head_weight`` a DTensor ``Shard(0)`` on a 1-D tp
    mesh and ``hidden`` a DTensor on it (Replicate; another placement is redistributed); the
    loss is then a plain replicated tensor, the gradients DTensors of the inputs' placements.
    A DTensor head with plain ``hidden`` is FSDP2's layout: ``remit_ext.fsdp``.
    """
    args = dict(locals())  # the arguments, for the paths below
    # Any head argument a DTensor (bias / scorer_bias alone too) with plain activations: the
    # FSDP2 layout. remit_ext.fsdp gathers each DTensor head and uses plain ones as they are.
    if tp_group is None and not chk.is_dtensor(hidden) and any(
            chk.is_dtensor(t) for t in (lm_head_weight, bias, scorer_weight, scorer_bias)):
        return _fsdp.remit_linear_loss(
            hidden=hidden, lm_head_weight=lm_head_weight, targets=targets, bias=bias,
            scorer_hidden=scorer_hidden, scorer_weight=scorer_weight, scorer_bias=scorer_bias,
            scorer_logprobs=scorer_logprobs, method=method, cu_seqlens=cu_seqlens,
            ignore_index=ignore_index, eps=eps, keep_ratio=keep_ratio, temperature=temperature,
            reduction=reduction, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
            memory_budget=memory_budget, grad_weight_fp32=grad_weight_fp32,
            return_details=return_details, backend=backend, chunk_dtype=chunk_dtype)
    if tp_group is not None or chk.is_dtensor(lm_head_weight) or chk.is_dtensor(hidden):
        return _vpl.vocab_parallel_linear(_remit_linear_loss, "lm_head_weight", args)
    if chk.is_dtensor(scorer_hidden):
        # Else DTensor's "mixed torch.Tensor and DTensor" error from inside the op.
        raise ValueError("scorer_hidden: a DTensor with plain hidden and plain heads (no "
                         "tp_group): expected a plain tensor like hidden (scorer_hidden."
                         "full_tensor() or .to_local()), or DTensor heads / tp_group=")
    return _remit_linear_loss(**args, tp=None)



def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    chunk_dtype: Optional[torch.dtype] = None,
    tp_group=None,
) -> LinearTokenStats:
    """Per-token log-prob (and entropy, and lse) of ``logits = hidden @ weight.T (+ bias)``,
    divided by ``temperature``, without holding the ``[N, V]`` logits: the composable primitive
    that a trainer writes its own loss on top of (GRPO/PPO, ReMiT, entropy bonuses;
    docs/fused-linear.md).

    ``hidden`` is ``[..., D]``, ``weight`` ``[V, D]`` (its dtype), ``targets`` ``hidden``'s
    shape without ``D``. Returns ``LinearTokenStats(logprob, entropy, lse)`` shaped like
    ``targets``, 0 at positions whose target is ``ignore_index``; ``entropy`` is None unless
    ``entropy=True``.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` for any per-token cotangents on
    the three outputs: the backward recomputes each chunk's logits, forms their gradient in that
    chunk's buffer and folds it into grad_hidden, grad_weight (accumulated in fp32) and
    grad_bias. A head that does not require grad (a frozen scorer) costs no dW and no dW
    buffer. Chunks of ``chunk_size`` rows, or derived from ``memory_budget`` bytes (default
    2 GiB on CUDA, 256 MiB on CPU); ``chunk_dtype`` as in ``remit_linear_loss``. One registered op,
    ``torch.ops.remit_ext_linear.linear_token_stats`` (fake + autograd: ``torch.compile``
    traces it without a graph break).

    ``tp_group``: ``weight`` (and ``bias``) are this rank's contiguous vocab rows, or a DTensor
    ``Shard(0)`` with a DTensor ``hidden`` (``remit_linear_loss``; ``remit_ext.parallel``);
    the outputs are the unsharded ones, replicated. That path is an autograd.Function with
    collectives: ``torch.compile`` graph-breaks on it.
    """
    args = dict(locals())  # the arguments, for the paths below
    if tp_group is None and not chk.is_dtensor(hidden) and (chk.is_dtensor(weight)
                                                         or chk.is_dtensor(bias)):
        return _fsdp.linear_token_stats(
            hidden=hidden, weight=weight, targets=targets, bias=bias, ignore_index=ignore_index,
            temperature=temperature, entropy=entropy, chunk_size=chunk_size,
            memory_budget=memory_budget, backend=backend, chunk_dtype=chunk_dtype)
    if tp_group is not None or chk.is_dtensor(weight) or chk.is_dtensor(hidden):
        return _vpl.vocab_parallel_linear(_linear_token_stats, "weight", args)
    return _linear_token_stats(**args, tp=None)

