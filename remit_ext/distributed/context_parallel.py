"""Context parallelism (``cp_group=``): ReMiT's per-sequence centring over the slices the
ranks hold, and ``remit_loss`` with a tp and / or cp group.

Context parallel. Every rank of ``cp_group`` holds a different slice of the same sequences
(the same rows of ``[B, T_r]`` targets, or the same count of ``cu_seqlens`` documents, document
i on every rank being a piece of one document). ReMiT's per-sequence sums of Delta and counts
are gathered over the group, so the weights equal the unsharded ones; the diagnostics are
reduced over the group too.
"""

from __future__ import annotations

from torch import Tensor

from .. import _checks as chk
from .._backends import select_backend
from ..reference import (reduce_tokens, remit_delta_sums, remit_diag_from_sums,
                         remit_diag_sums, remit_weights_from_sums)
from ._groups import _check_agree, _eager, _gather, _group, _handshake, _host_checks
from .vocab_parallel import vocab_parallel_token_stats


@_eager
def remit_weights(a: Tensor, b: Tensor, valid: Tensor, offsets: Tensor, eps: float,
                   cp_group=None, dp_group=None):
    """(w, delta_hat, diagnostics) as ``remit_weights_ref`` (detached), with the per-sequence
    sums of delta and counts gathered over ``cp_group`` and the diagnostics over ``cp_group``
    and ``dp_group``."""
    delta, valid, seg, sums = remit_delta_sums(a, b, valid, offsets)
    if cp_group is not None:
        group, _, world = _group(cp_group, "cp_group")
        table = _handshake([sums.shape[1]], a.device, group, world)
        if _host_checks(a.device):
            _check_agree(table, 0, "number of sequences (rows of targets, or cu_seqlens "
                         "documents)", "targets", "cp_group")
        sums = _gather(sums, group, world).sum(0)
    w, delta_hat, raw = remit_weights_from_sums(delta, valid, seg, sums, eps)
    local = remit_diag_sums(w, raw, delta_hat, delta, valid, eps)
    for g, name in ((cp_group, "cp_group"), (dp_group, "dp_group")):
        if g is not None:
            group, _, world = _group(g, name)
            local = _gather(local, group, world).sum(0)
    return w, delta_hat, remit_diag_from_sums(local, delta.dtype)


def _local_logprobs(logits, targets, scorer_logits, ignore_index, backend):
    """(log-prob, scorer log-prob or None), flat, of plain logits: ``token_stats``'s
    single-process path (its checks, then the backend's op), for context parallelism alone."""
    chk.check_logits(logits)
    chk.check_targets(targets, logits, ignore_index)
    if scorer_logits is not None:
        chk.check_like_logits(scorer_logits, logits, "scorer_logits")
    impl = select_backend("token_stats", backend, (logits, targets, scorer_logits), topk=None)
    z = logits.reshape(-1, logits.shape[-1])
    sz = None if scorer_logits is None else scorer_logits.reshape(z.shape)
    _, a, _, _, _, b = impl.token_stats(z, targets.reshape(-1), sz, ignore_index, 1.0, False,
                                        0, False)
    return a, b


@_eager
def remit_loss(logits, targets, scorer_logits, scorer_logprobs, offsets, eps, ignore_index,
               reduction, num_items, tp_group, cp_group, dp_group, backend):
    """(per-token or reduced loss, w [N], diagnostics)."""
    if tp_group is not None or chk.is_dtensor(logits):
        _, a, _, _, b = vocab_parallel_token_stats(logits, targets, tp_group,
                                                   scorer_logits=scorer_logits,
                                                   ignore_index=ignore_index, backend=backend)
    else:
        a, b = _local_logprobs(logits, targets, scorer_logits, ignore_index, backend)
    if scorer_logprobs is not None:
        b = scorer_logprobs.reshape(-1).detach()
    valid = targets.reshape(-1) != ignore_index
    w, _, diag = remit_weights(a, b, valid, offsets, eps, cp_group, dp_group)
    loss = reduce_tokens(-w * a, valid.sum(), reduction, num_items)
    return (loss.reshape(targets.shape) if reduction == "none" else loss), w, diag
