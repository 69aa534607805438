"""Vocab-parallel logits (``tp_group=``, or a DTensor sharded on the vocab dim): the
shard statistics, their combination, and the TP forms of the logits losses.

Vocab parallel. Every rank of ``tp_group`` holds a contiguous vocab shard of the logits
``[..., V_r]`` (rank order within the group: rank r holds ids ``[sum_{q<r} V_q, ... + V_r)``;
the shards may differ in size, e.g. the ``torch.chunk`` split of a DTensor ``Shard(-1)``) and the
same targets, as global ids. The backend's ``token_stats`` op reads the local shard (targets the
shard does not own are mapped to a local id and their log-prob discarded) and gives per row the
local lse, the target logit where owned, and the local ``E_p[z]`` (from the local entropy). One
``all_gather`` of those three ``[N]`` vectors (plus the scorer's two) and a fixed combination in
rank order give the global lse, log-prob and entropy, bitwise the same on every rank:
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as chk
from .._backends import select_backend
from .._grads import kd_grad, token_stats_grad
from ..reference import acc_dtype, reduce_tokens, rho1_keep_mask
from ._groups import (_check_agree, _check_status, _eager, _gather, _group, _handshake,
                      _host_checks)

__all__ = ["vocab_parallel_token_stats"]

# Local ids for the shard ops: an ignored position, and a valid target another shard owns.
# Both negative, so no owned id (>= 0) can collide with them whatever ignore_index is.
_LOCAL_IGNORE, _NOT_OWNED = -2, -1



def _unshard(x: Optional[Tensor], tp_group, name: str, dim: int = -1):
    """A plain local shard and its group: a DTensor sharded on its vocab dim (the last dim of
    logits; dim 0 of an LM head weight or bias) gives its local tensor (``to_local`` carries
    the gradient back as a DTensor of the same placement) and its mesh's group."""
    if x is None:
        return None, tp_group
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover (torch without distributed)
        return x, tp_group
    if not isinstance(x, DTensor):
        return x, tp_group
    mesh, placements = x.device_mesh, x.placements
    want = dim % x.dim()
    if mesh.ndim != 1 or not (isinstance(placements[0], Shard)
                              and placements[0].dim % x.dim() == want):
        layout = ("Shard(-1), TorchTitan's loss_parallel layout" if dim == -1 else
                  f"Shard({dim}), TorchTitan's ColwiseParallel output layer")
        raise ValueError(f"{name}: expected a DTensor sharded on its vocab "
                         f"({'last' if dim == -1 else dim}) dim over a 1-D mesh ({layout}), got "
                         f"placements {tuple(placements)} on a {mesh.ndim}-D mesh")
    group = mesh.get_group()
    if tp_group is not None and _group(tp_group, "tp_group")[0] is not group:
        raise ValueError(f"{name}: a DTensor on a mesh whose group is not tp_group (pass "
                         f"tp_group=None to use the mesh's)")
    return x.to_local(), group


class _VocabLayout:
    """This rank's place in the vocab: its offset (a device tensor) and the global size, from
    one handshake that also checks what every rank must agree on.

    ``v_local``: this rank's vocab rows; ``agree``: (argument, what, value) facts every rank
    must share besides the number of positions; ``vocab``: the global size the shards must
    sum to, where the caller knows it (a DTensor's global shape). A rank that refused its
    inputs before the handshake joins it with status 0 (``_groups._handshake``; the fused-linear
    heads' ``TPHead.refuse``) and every other rank raises."""

    def __init__(self, v_local: int, device, targets: Tensor, group, ignore_index: int,
                 target_name: str = "targets", rows_name: str = "logits",
                 vocab_name: str = "logits", agree=(), vocab: Optional[int] = None):
        self.group, self.rank, self.world = _group(group, "tp_group")
        n = targets.numel()
        table = _handshake([v_local, n] + [v for _, _, v in agree], device, self.group,
                           self.world)
        sizes = table[:, 0]
        self.lo = sizes[:self.rank].sum()
        self.vocab = sizes.sum()
        valid = targets != ignore_index
        bad = (valid & ((targets < 0) | (targets >= self.vocab))).flatten()
        if _host_checks(device):
            _check_status(table, "tp_group")
            _check_agree(table, 1, "number of positions", rows_name, "tp_group")
            for i, (name, what, _) in enumerate(agree):
                _check_agree(table, 2 + i, what, name, "tp_group")
            if vocab is not None and int(self.vocab) != vocab:
                raise ValueError(f"{vocab_name}: expected vocab shards that sum to the global "
                                 f"size {vocab}, got {sizes.tolist()} (by rank) summing to "
                                 f"{int(self.vocab)}")
            if bool(bad.any()):
                idx = int(bad.to(torch.uint8).argmax())
                raise ValueError(f"{target_name}: expected global vocab ids in "
                                 f"[0, {int(self.vocab)}) (the shards of tp_group together) or "
                                 f"ignore_index={ignore_index}, got "
                                 f"{int(targets.flatten()[idx])} at flat position {idx}")
        elif chk._value_check(device) == "device":
            torch._assert_async(~bad.any(), f"{target_name}: expected global vocab ids or "
                                            f"ignore_index={ignore_index}")
        y = targets.reshape(-1).long()
        owned = valid.reshape(-1) & (y >= self.lo) & (y < self.lo + v_local)
        # Forward: owned targets as local ids, the others at local id 0 (their log-prob is
        # dropped); backward: the others at an id no shard has, so they get p but no one-hot.
        self.y_fwd = torch.where(valid.reshape(-1), torch.where(owned, y - self.lo, 0),
                                 _LOCAL_IGNORE)
        self.y_bwd = torch.where(owned | ~valid.reshape(-1), self.y_fwd, _NOT_OWNED)
        self.owned = owned
        self.valid = valid.reshape(-1)


def _combine(lse_r: Tensor, zy_r: Tensor, ez_r: Optional[Tensor], valid: Tensor):
    """Global (lse, logprob, entropy) from the gathered per-shard [W, N] statistics."""
    lse = torch.logsumexp(lse_r, dim=0)
    logprob = zy_r.sum(0) - lse
    ent = None
    if ez_r is not None:
        pi = torch.exp(lse_r - lse)
        # A shard whose row is all -inf has weight 0 and an undefined E_r[z]: it counts 0.
        ent = lse - torch.where(pi > 0, pi * ez_r, 0).sum(0)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)

    def mask(x):
        return None if x is None else torch.where(valid, x, zero)

    return mask(lse), mask(logprob), mask(ent)


def _gather_stats(layout: _VocabLayout, lse_l: Tensor, a_l: Tensor, ent_l: Optional[Tensor],
                  scorer: Optional[tuple[Tensor, Tensor]] = None):
    """(lse, logprob, entropy, scorer lse, scorer logprob), global and replicated, from this
    shard's per-row statistics (local lse, log-prob of the local target id, entropy; the
    scorer's lse and log-prob): one all_gather of the [k, N] stack (module docstring)."""
    zero = torch.zeros((), dtype=lse_l.dtype, device=lse_l.device)
    parts = [lse_l, torch.where(layout.owned, a_l + lse_l, zero)]
    if ent_l is not None:
        parts.append(lse_l - ent_l)
    if scorer is not None:
        s_lse_l, s_a_l = scorer
        parts += [s_lse_l.to(lse_l.dtype),
                  torch.where(layout.owned, (s_a_l + s_lse_l).to(lse_l.dtype), zero)]
    g = _gather(torch.stack(parts), layout.group, layout.world)
    lse, logprob, ent = _combine(g[:, 0], g[:, 1], g[:, 2] if ent_l is not None else None,
                                 layout.valid)
    s_lse = s_logprob = None
    if scorer is not None:
        k = 3 if ent_l is not None else 2
        s_lse, s_logprob, _ = _combine(g[:, k], g[:, k + 1], None, layout.valid)
    return lse, logprob, ent, s_lse, s_logprob


class _VocabParallelStats(torch.autograd.Function):
    """(lse, logprob, entropy) of sharded logits; forward through the backend's op plus one
    gather, backward local (module docstring)."""

    @staticmethod
    def forward(ctx, z, layout, impl, ignore_index, temperature, with_entropy, scorer_z):
        with torch.no_grad():
            lse_l, a_l, ent_l, _, s_lse_l, s_a_l = impl.token_stats(
                z, layout.y_fwd, scorer_z, _LOCAL_IGNORE, temperature, with_entropy, 0, False)
            lse, logprob, ent, s_lse, s_logprob = _gather_stats(
                layout, lse_l, a_l, ent_l if with_entropy else None,
                None if scorer_z is None else (s_lse_l, s_a_l))
        ent_saved = ent if with_entropy else lse.new_empty(0)
        ctx.save_for_backward(z, layout.y_bwd, lse, logprob, ent_saved)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        out = [lse, logprob, ent if with_entropy else torch.zeros_like(lse)]
        s_out = [lse.new_zeros(0), lse.new_zeros(0)] if scorer_z is None else [s_lse, s_logprob]
        ctx.mark_non_differentiable(*s_out)
        return (*out, *s_out)

    @staticmethod
    def backward(ctx, g_lse, g_logprob, g_ent, _g_s_lse, _g_s_logprob):
        z, y, lse, logprob, ent = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            # y_bwd: a row whose target another shard owns has a target outside [0, V_local)
            # (p terms, no one-hot); ignored rows carry _LOCAL_IGNORE.
            grad = token_stats_grad(z, y, logprob, lse, ent, g_logprob,
                                    g_ent if ctx.with_entropy else None, g_lse, ctx.temperature,
                                    _LOCAL_IGNORE)
        return grad, None, None, None, None, None, None


@_eager
def vocab_parallel_token_stats(logits: Tensor, targets: Tensor, tp_group=None, *,
                               scorer_logits: Optional[Tensor] = None, ignore_index: int = -100,
                               temperature: float = 1.0, entropy: bool = False,
                               backend: str = "auto", target_name: str = "targets"):
    """(lse, logprob, entropy or None, scorer_lse, scorer_logprob), flat [N], of vocab-sharded
    ``logits`` (a local shard with ``tp_group``, or a DTensor ``Shard(-1)``); differentiable
    w.r.t. ``logits`` (the scorer's get none). What ``token_stats(..., tp_group=)`` calls."""
    logits, tp_group = _unshard(logits, tp_group, "logits")
    scorer_logits, _ = _unshard(scorer_logits, tp_group, "scorer_logits")
    if tp_group is None:
        raise ValueError("tp_group: expected a process group for vocab-sharded logits, got None")
    chk.check_logits(logits)
    chk.check_positions(targets, logits, target_name)
    if scorer_logits is not None:
        chk.check_like_logits(scorer_logits, logits, "scorer_logits")
    temperature = chk.check_positive(temperature, "temperature")
    layout = _VocabLayout(logits.shape[-1], logits.device, targets, tp_group, ignore_index,
                          target_name)
    impl = select_backend("token_stats", backend, (logits, targets, scorer_logits))
    z = logits.reshape(-1, logits.shape[-1])
    sz = None if scorer_logits is None else scorer_logits.detach().reshape(z.shape)
    lse, logprob, ent, s_lse, s_logprob = _VocabParallelStats.apply(
        z, layout, impl, ignore_index, temperature, entropy, sz)
    if scorer_logits is None:
        s_lse = s_logprob = None
    return lse, logprob, ent if entropy else None, s_lse, s_logprob


class _VocabParallelKD(torch.autograd.Function):
    """Per-token KD ``LSE(z/T) - sum_v softmax(z^T/T)_v z_v / T`` of sharded policy and teacher
    logits: the gather of both lse's, then one of the local cross terms; backward
    ``(p - q) / T`` local."""

    @staticmethod
    def forward(ctx, z, tz, layout, temperature):
        with torch.no_grad():
            dt = acc_dtype(z.dtype)
            zt, tzt = z.to(dt) / temperature, tz.to(dt) / temperature
            g = _gather(torch.stack([torch.logsumexp(zt, -1), torch.logsumexp(tzt, -1)]),
                        layout.group, layout.world)
            lse, tlse = torch.logsumexp(g[:, 0], 0), torch.logsumexp(g[:, 1], 0)
            q = torch.exp(tzt - tlse.unsqueeze(-1))
            # q_v z_v with q_v = 0 counts 0 even for z_v = -inf (as kd_loss_ref).
            cross = _gather(torch.where(q == 0, 0, q * zt).sum(-1), layout.group,
                            layout.world).sum(0)
            per_token = torch.where(layout.valid, lse - cross, 0)
        ctx.save_for_backward(z, tz, lse, tlse, layout.valid)
        ctx.temperature = temperature
        return per_token

    @staticmethod
    def backward(ctx, g):
        z, tz, lse, tlse, valid = ctx.saved_tensors
        return kd_grad(z, tz, lse, tlse, g, valid, ctx.temperature), None, None, None


# ------------------------------------------------------------------------------ losses
#
# Called by functional.py once the group-independent arguments are checked; inputs flat.


@_eager
def weighted_cross_entropy(logits, targets, weights, tp_group, ignore_index, reduction,
                           num_items, backend):
    _, a, _, _, _ = vocab_parallel_token_stats(logits, targets, tp_group,
                                               ignore_index=ignore_index, backend=backend)
    per_token = -a if weights is None else -a * weights.reshape(-1).to(a.dtype)
    valid = targets.reshape(-1) != ignore_index
    loss = reduce_tokens(per_token, valid.sum(), reduction, num_items)
    return loss.reshape(targets.shape) if reduction == "none" else loss


@_eager
def rho1_loss(logits, targets, ref_logits, ref_logprobs, keep_ratio, ignore_index, reduction,
              num_items, tp_group, backend):
    _, a, _, _, b = vocab_parallel_token_stats(logits, targets, tp_group,
                                               scorer_logits=ref_logits,
                                               ignore_index=ignore_index, backend=backend)
    if ref_logprobs is not None:
        b = ref_logprobs.reshape(-1).detach()
    valid = targets.reshape(-1) != ignore_index
    keep = rho1_keep_mask(b.to(a.dtype) - a.detach(), valid, float(keep_ratio))
    loss = reduce_tokens(-a * keep, keep.sum(), reduction, num_items)
    return loss.reshape(targets.shape) if reduction == "none" else loss


@_eager
def kd_loss(logits, teacher_logits, targets, temperature, ignore_index, reduction, num_items,
            tp_group):
    logits, tp_group = _unshard(logits, tp_group, "logits")
    teacher_logits, _ = _unshard(teacher_logits, tp_group, "teacher_logits")
    if tp_group is None:
        raise ValueError("tp_group: expected a process group for vocab-sharded logits, got None")
    chk.check_logits(logits)
    chk.check_like_logits(teacher_logits, logits, "teacher_logits")
    chk.check_positions(targets, logits, "targets")
    layout = _VocabLayout(logits.shape[-1], logits.device, targets, tp_group, ignore_index)
    z = logits.reshape(-1, logits.shape[-1])
    tz = teacher_logits.detach().reshape(z.shape)
    per_token = _VocabParallelKD.apply(z, tz, layout, temperature)
    loss = reduce_tokens(per_token, layout.valid.sum(), reduction, num_items)
    return loss.reshape(targets.shape) if reduction == "none" else loss
