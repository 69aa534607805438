"""Context parallelism (``cp_group=``): ReMiT's per-sequence centring over the slices the
ranks hold, and ``remit_loss`` with a tp and / or cp group.

Context parallel. Every rank of ``cp_group`` holds a different slice of the same sequences
(the same rows of ``[B, T_r]`` targets, or the same count of ``cu_seqlens`` documents, document
i on every rank being a piece of one document). ReMiT's per-sequence sums of Delta and counts
are gathered over the group, so the weights equal the unsharded ones; the diagnostics are
reduced over the group too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks as chk
from .._backends import select_backend
from ..reference import acc_dtype, reduce_tokens, segment_ids
from ._groups import _check_agree, _eager, _gather, _group, _handshake, _host_checks
from .data_parallel import _diag_from_sums
from .vocab_parallel import vocab_parallel_token_stats


@_eager
def remit_weights(a: Tensor, b: Tensor, valid: Tensor, offsets: Tensor, eps: float,
                   cp_group=None, dp_group=None):
    """(w, delta_hat, diagnostics) as ``remit_weights_ref`` (detached), with the per-sequence
    sums of delta and counts gathered over ``cp_group`` and the diagnostics over ``cp_group``
    and ``dp_group``."""
    dt = acc_dtype(a.dtype)
    a, b = a.detach().to(dt), b.detach().to(dt)
    n = a.shape[0]
    seg, num_seg = segment_ids(offsets, n, a.device)
    vf = valid.to(dt)
    delta = (b - a) * vf
    sums = torch.zeros(2, num_seg, dtype=dt, device=a.device).index_add(
        1, seg, torch.stack([delta, vf]))
    if cp_group is not None:
        group, _, world = _group(cp_group, "cp_group")
        table = _handshake([num_seg], a.device, group, world)
        if _host_checks(a.device):
            _check_agree(table, 0, "number of sequences (rows of targets, or cu_seqlens "
                         "documents)", "targets", "cp_group")
        sums = _gather(sums, group, world).sum(0)
    mu = sums[0] / sums[1].clamp(min=1)
    delta_hat = (delta - mu[seg]) * vf
    raw = 2 * torch.sigmoid(delta_hat)
    w = raw.clamp(1 - eps, 1 + eps) * vf
    d64 = torch.float64
    # Summed in fp64 from the start: near w = 1, E[w^2] - E[w]^2 from fp32 sums is cancellation
    # noise (a std of 0 or 2.6e-4 where the true one is 9e-6).
    w64 = w.to(d64)
    local = torch.stack([vf.to(d64).sum(), w64.sum(), (w64 * w64).sum(),
                         ((raw <= 1 - eps) & valid).sum().to(d64),
                         ((raw >= 1 + eps) & valid).sum().to(d64),
                         delta_hat.to(d64).abs().sum(), delta.to(d64).sum()])
    for g, name in ((cp_group, "cp_group"), (dp_group, "dp_group")):
        if g is not None:
            group, _, world = _group(g, name)
            local = _gather(local, group, world).sum(0)
    return w, delta_hat, _diag_from_sums(local, dt)


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
