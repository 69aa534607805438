"""Distributed forms of the losses: vocab parallel (``tp_group``), context parallel ReMiT
centring (``cp_group``) and data-parallel diagnostics and token counts (``dp_group``).

The public functions in ``functional.py`` route here when given a group; this module holds the
collectives and the sharded math (METHODS.md sections 1-4 unchanged).

Vocab parallel. Every rank of ``tp_group`` holds a contiguous vocab shard of the logits
``[..., V_r]`` (rank order within the group: rank r holds ids ``[sum_{q<r} V_q, ... + V_r)``;
the shards may differ in size, e.g. the ``torch.chunk`` split of a DTensor ``Shard(-1)``) and the
same targets, as global ids. The backend's ``token_stats`` op reads the local shard (targets the
shard does not own are mapped to a local id and their log-prob discarded) and gives per row the
local lse, the target logit where owned, and the local ``E_p[z]`` (from the local entropy). One
``all_gather`` of those three ``[N]`` vectors (plus the scorer's two) and a fixed combination in
rank order give the global lse, log-prob and entropy, bitwise the same on every rank:

    lse = logsumexp_r lse_r;   z_y = sum_r z_y,r (0 off the owning shard);
    E[z] = sum_r exp(lse_r - lse) E_r[z];   H = lse - E[z];   a = z_y - lse.

A small handshake (one ``all_gather`` of ``[V_r, N]``) precedes it: it gives this rank's vocab
offset and checks that the ranks agree. So a call costs two small collectives (KD: three), in
fp32 (fp64 for fp64 logits), and no ``[N, V]`` buffer beyond the backend's own. The per-token
results, and so any loss formed from them, are replicated: the backward is local,
``d/dz_local = coef * (p_local - onehot_local)`` with ``p_local = exp(z_local - lse)``, and
needs no collective, as long as every rank back-propagates the same loss (Megatron's
convention).

Fused-linear heads (``remit_linear_loss`` / ``linear_token_stats`` with ``tp_group``, or a
DTensor head ``Shard(0)`` with a DTensor hidden, TorchTitan's ColwiseParallel output layer):
every rank holds a contiguous vocab shard of the head's rows, ``W_r [V_r, D]`` (+ ``b_r``; a
live scorer's head split the same way) and the same hidden states. The forward runs
linear.py's chunk loop on the local rows for every token, keeping only the [N] statistics
above (KD: lse_r, the teacher's tlse_r and ``c_r = E_{q_r}[z]`` over the shard, combined as
``E_q[z] = sum_r exp(tlse_r - tlse) c_r``), then the same single gather; weights and loss are
formed from the replicated statistics. The backward recomputes each chunk's local logits and
forms their gradient with the global lse: dW_r and db_r stay local, and d hidden, a partial
sum over the shard's columns, is all-reduced once (Megatron's vocab-parallel cross-entropy).
So a call costs the handshake and one gather forward and one all_reduce backward, whatever
the number of chunks.

torch.compile: every distributed entry point here runs eagerly, a graph break (they check
process groups and meshes, read the handshake on the host and issue collectives from
autograd.Functions); the compiled model around them is unaffected.

Context parallel. Every rank of ``cp_group`` holds a different slice of the same sequences
(the same rows of ``[B, T_r]`` targets, or the same count of ``cu_seqlens`` documents, document
i on every rank being a piece of one document). ReMiT's per-sequence sums of Delta and counts
are gathered over the group, so the weights equal the unsharded ones; the diagnostics are
reduced over the group too.

Data parallel. ``global_num_items`` gives the valid-token count of the whole global batch as a
0-d tensor for ``num_items_in_batch``; ``reduce_diagnostics`` (or ``dp_group=`` on
``remit_loss`` / ``remit_weights``) turns per-rank ReMiT diagnostics into global ones.

Gradient averaging. DDP, FSDP2 and TorchTitan average parameter gradients over the ranks that
hold different data (the data- and context-parallel ranks; tensor-parallel ranks hold the same
tokens and do not average). With ``reduction="mean"`` a rank's loss divides by its own count, so
the averaged gradient equals the global mean only when every rank has as many valid tokens.
For exact global-batch semantics pass ``num_items_in_batch=global_num_items(targets, group,
per_rank=True)`` with ``group`` the ranks that average (data x context parallel): the global
count divided by their number, so that averaging W rank losses of ``sum_r / (count / W)`` gives
``sum / count``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks as chk
from ._backends import OpsBackend, select_backend
from ._linear_engine import _Engine, _Grads, _inv_norm, _token_stats_bwd, _token_stats_fwd
from ._linear_local import _loss_output
from ._linear_plan import _free_chunks, _offsets, linear_chunk_size, stats_chunk_size
from ._meta import _token_stats_input_grad
from .reference import ReMiTDiagnostics, acc_dtype, reduce_tokens, rho1_keep_mask, segment_ids

__all__ = [
    "global_num_items",
    "reduce_diagnostics",
    "vocab_parallel_token_stats",
]

# Local ids for the shard ops: an ignored position, and a valid target another shard owns.
# Both negative, so no owned id (>= 0) can collide with them whatever ignore_index is.
_LOCAL_IGNORE, _NOT_OWNED = -2, -1


# torch.compile: the distributed entry points run eagerly, one graph break each (dynamo
# cannot trace the ProcessGroup / DeviceMesh checks, the handshake's host reads or the
# autograd.Functions that issue collectives).
_eager = torch.compiler.disable


# ----------------------------------------------------------------------------- groups


def _group(group, name: str):
    """(process group, rank, world) of ``group``: a ProcessGroup or a 1-D DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialised (call "
                         f"init_process_group first), got {name}={group!r}")
    if hasattr(group, "get_group") and hasattr(group, "mesh"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"{name}: expected a ProcessGroup or a 1-D DeviceMesh, got a "
                             f"{group.ndim}-D mesh (pass mesh['<dim>'])")
        group = group.get_group()
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a non-member
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member "
                         f"of the group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member "
                         f"of the group")
    return group, rank, dist.get_world_size(group)


def _gather(t: Tensor, group, world: int) -> Tensor:
    """[world, *t.shape]: every rank's ``t`` in rank order (sums over it are then formed in the
    same order on every rank, so the results are bitwise replicated)."""
    if world == 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _host_checks(device: torch.device) -> bool:
    return chk._value_check(device) == "host"


def _handshake(values: list[int], device, group, world: int) -> Tensor:
    """[world, len(values)] int64: every rank's shape facts (no host-to-device copy)."""
    mine = torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in values])
    return _gather(mine, group, world)


def _check_agree(table: Tensor, col: int, what: str, name: str, group_name: str) -> None:
    """Every rank raises the same ValueError (they all read the same table), so none hangs."""
    vals = table[:, col].tolist()
    if len(set(vals)) != 1:
        raise ValueError(f"{name}: expected the same {what} on every rank of {group_name}, got "
                         f"{vals} (by rank)")


# ------------------------------------------------------------------------ vocab parallel


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
    sum to, where the caller knows it (a DTensor's global shape); ``status``: a last column of
    1s, 0 from a rank that refused its inputs before the handshake (``_refuse``)."""

    def __init__(self, v_local: int, device, targets: Tensor, group, ignore_index: int,
                 target_name: str = "targets", rows_name: str = "logits",
                 vocab_name: str = "logits", agree=(), vocab: Optional[int] = None,
                 status: bool = False):
        self.group, self.rank, self.world = _group(group, "tp_group")
        n = targets.numel()
        table = _handshake([v_local, n] + [v for _, _, v in agree] + [1] * status, device,
                           self.group, self.world)
        sizes = table[:, 0]
        self.lo = sizes[:self.rank].sum()
        self.vocab = sizes.sum()
        valid = targets != ignore_index
        bad = (valid & ((targets < 0) | (targets >= self.vocab))).flatten()
        if _host_checks(device):
            if status and not bool(table[:, -1].all()):
                refused = (table[:, -1] == 0).nonzero().flatten().tolist()
                raise ValueError(f"tp_group: rank(s) {refused} of tp_group refused their inputs "
                                 f"(their own errors name the argument); this rank's passed "
                                 f"its local checks")
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
        ctx.save_for_backward(z, layout.y_bwd, lse, ent_saved)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        out = [lse, logprob, ent if with_entropy else torch.zeros_like(lse)]
        s_out = [lse.new_zeros(0), lse.new_zeros(0)] if scorer_z is None else [s_lse, s_logprob]
        ctx.mark_non_differentiable(*s_out)
        return (*out, *s_out)

    @staticmethod
    def backward(ctx, g_lse, g_logprob, g_ent, _g_s_lse, _g_s_logprob):
        z, y, lse, ent = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _token_stats_input_grad(z, y, lse, ent, g_lse, g_logprob,
                                           g_ent if ctx.with_entropy else None, ctx.temperature,
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
        t = ctx.temperature
        dt = lse.dtype
        p = torch.exp(z.to(dt) / t - lse.unsqueeze(-1))
        q = torch.exp(tz.to(dt) / t - tlse.unsqueeze(-1))
        scale = torch.where(valid, g / t, 0).unsqueeze(-1)
        return ((p - q) * scale).to(z.dtype), None, None, None


# ------------------------------------------------------------- ReMiT weights, sharded


@_eager
def _remit_weights(a: Tensor, b: Tensor, valid: Tensor, offsets: Tensor, eps: float,
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


def _diag_from_sums(s: Tensor, dt: torch.dtype) -> ReMiTDiagnostics:
    """Diagnostics from [n, sum w, sum w^2, n_low, n_high, sum |delta_hat|, sum delta], each
    summed in fp64 from fp64 terms (the variance as E[w^2] - E[w]^2 is then exact to fp32
    precision)."""
    inv = 1 / s[0].clamp(min=1)
    mean = s[1] * inv
    var = (s[2] * inv - mean * mean).clamp(min=0)
    return ReMiTDiagnostics(*(x.to(dt) for x in (mean, var.sqrt(), s[3] * inv, s[4] * inv,
                                                  s[5] * inv, s[6] * inv)))


@_eager
def reduce_diagnostics(diagnostics: ReMiTDiagnostics, targets: Tensor, group, *,
                       ignore_index: int = -100) -> ReMiTDiagnostics:
    """Per-rank ReMiT diagnostics (over this rank's valid ``targets``) combined into those of
    all ranks of ``group`` (data parallel: each rank its own batch shard), weighted by the
    ranks' valid-token counts. One small all_gather, no host sync."""
    group, _, world = _group(group, "group")
    d = [x.detach().to(torch.float64) for x in diagnostics]
    n = (targets != ignore_index).sum().to(torch.float64)
    local = torch.stack([n, n * d[0], n * (d[1] * d[1] + d[0] * d[0]), n * d[2], n * d[3],
                         n * d[4], n * d[5]])
    return _diag_from_sums(_gather(local, group, world).sum(0), diagnostics.w_mean.dtype)


@_eager
def global_num_items(targets: Tensor, group=None, *, ignore_index: int = -100,
                     per_rank: bool = False) -> Tensor:
    """The valid-token count over every rank of ``group`` (default: the world), a 0-d tensor on
    the targets' device for ``num_items_in_batch`` (one all_reduce, no host sync).

    ``per_rank=True`` divides it by the group size: the divisor for engines that average the
    gradients over ``group`` (DDP, FSDP2, TorchTitan's data x context parallel mesh), so that
    the averaged gradient is that of the global mean (module docstring). Pass the group of the
    ranks that hold different tokens, not tensor-parallel ranks (they hold the same)."""
    chk._tensor(targets, "targets")
    if group is None:
        group = dist.group.WORLD
    group, _, world = _group(group, "group")
    count = (targets != ignore_index).sum().to(torch.float64 if per_rank else torch.long)
    dist.all_reduce(count, group=group)
    return count / world if per_rank else count


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
    w, _, diag = _remit_weights(a, b, valid, offsets, eps, cp_group, dp_group)
    loss = reduce_tokens(-w * a, valid.sum(), reduction, num_items)
    return (loss.reshape(targets.shape) if reduction == "none" else loss), w, diag


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


# ------------------------------------------------------ fused linear heads, vocab parallel
#
# remit_linear_loss / linear_token_stats with tp_group (module docstring). Called by linear.py
# once the inputs are local and checked; inputs flat.


def _replicated_local(x: Optional[Tensor], group, name: str) -> Optional[Tensor]:
    """Hidden states as a plain tensor: a DTensor on the tp mesh is redistributed to
    Replicate (what ColwiseParallel does to its input; a no-op when it is replicated) and its
    local copy returned, its gradient going back as a Replicate DTensor."""
    if not chk.is_dtensor(x):
        return x
    from torch.distributed.tensor import Replicate

    if x.device_mesh.ndim != 1 or x.device_mesh.get_group() is not group:
        raise ValueError(f"{name}: expected a DTensor on the 1-D tp mesh of the head weight "
                         f"(or a plain tensor), got one on a {x.device_mesh.ndim}-D mesh "
                         f"{'of another group' if x.device_mesh.ndim == 1 else ''}")
    if any(not isinstance(p, Replicate) for p in x.placements):
        x = x.redistribute(x.device_mesh, [Replicate()])
    return x.to_local()


class TPHead:
    """One vocab-parallel call's group, the global vocab where known (a DTensor head's global
    rows) and whether this rank has joined the handshake yet (``refuse``)."""

    # The handshake's row: [V_r, N, D, D_scorer or -1, status].
    FACTS = 5

    def __init__(self, group, vocab: Optional[int]):
        self.group, self.vocab, self.joined = group, vocab, False

    def refuse(self, device) -> None:
        """This rank refused its inputs before the handshake: join the peers' handshake with
        a status of 0, so that they raise too (in the host-checked modes) rather than wait
        in a collective this rank never reaches."""
        if not self.joined:
            self.joined = True
            _handshake([0] * self.FACTS, device, self.group, dist.get_world_size(self.group))

    def linear_loss(self, *args):
        """``remit_linear_loss`` on this rank's shards: what ``_linear_local._remit_linear_loss``
        calls with its checked, flat inputs (``_tp_linear_loss``)."""
        return _tp_linear_loss(*args, self)

    def linear_stats(self, h, w, y, b, ignore_index, temperature, with_entropy, chunk, backend):
        """``linear_token_stats`` on this rank's shards (``vocab_parallel_linear_stats``)."""
        return vocab_parallel_linear_stats(h, w, y, b, self, ignore_index, temperature,
                                           with_entropy, chunk, backend)


def unshard_linear(hidden, weight, bias, scorer_hidden, scorer_weight, scorer_bias, tp_group,
                   weight_name: str):
    """Plain local tensors for a vocab-parallel head: (hidden, weight, bias, scorer_hidden,
    scorer_weight, scorer_bias) and the call's ``TPHead``. Weights and biases: this rank's
    rows, or DTensors ``Shard(0)`` on a 1-D mesh; hidden: replicated, or a DTensor on that
    mesh."""
    vocab = int(weight.shape[0]) if chk.is_dtensor(weight) else None
    weight, tp_group = _unshard(weight, tp_group, weight_name, dim=0)
    bias, tp_group = _unshard(bias, tp_group, "bias", dim=0)
    scorer_weight, tp_group = _unshard(scorer_weight, tp_group, "scorer_weight", dim=0)
    scorer_bias, tp_group = _unshard(scorer_bias, tp_group, "scorer_bias", dim=0)
    if tp_group is None:
        if chk.is_dtensor(hidden):
            raise ValueError(f"{weight_name}: a DTensor hidden needs a vocab-sharded head: "
                             f"expected a DTensor {weight_name} Shard(0) or tp_group=, got "
                             f"neither")
        raise ValueError("tp_group: expected a process group for a vocab-sharded head, got None")
    group = _group(tp_group, "tp_group")[0]
    hidden = _replicated_local(hidden, group, "hidden")
    scorer_hidden = _replicated_local(scorer_hidden, group, "scorer_hidden")
    return (hidden, weight, bias, scorer_hidden, scorer_weight, scorer_bias), TPHead(group, vocab)


def _linear_layout(h: Tensor, w: Tensor, targets: Tensor, tp: TPHead, ignore_index: int,
                   weight_name: str, sh: Optional[Tensor] = None) -> _VocabLayout:
    # A scorer head's rows are checked against the policy head's on each rank (linear.py).
    agree = [("hidden", "hidden size", h.shape[-1]),
             ("scorer_hidden", "scorer hidden size (or no scorer head)",
              -1 if sh is None else sh.shape[-1])]
    tp.joined = True
    return _VocabLayout(w.shape[0], h.device, targets, tp.group, ignore_index,
                        rows_name="hidden", vocab_name=weight_name, agree=agree, vocab=tp.vocab,
                        status=True)


class _VocabParallelLinearStats(torch.autograd.Function):
    """(logprob, entropy, lse, scorer logprob) of ``h @ W_r.T (+ b_r)`` over the vocab shards:
    the chunked local statistics, one gather; backward: the chunked local recompute and one
    all_reduce of grad hidden. The scorer head (forward only) shares the gather."""

    @staticmethod
    def forward(ctx, h, w, b, layout, cfg, scorer):
        temperature, with_entropy, chunk, backend, w_fp32 = cfg
        with torch.no_grad():
            a_l, ent_l, lse_l = _token_stats_fwd(h, w, layout.y_fwd, b, _LOCAL_IGNORE,
                                                     temperature, with_entropy, chunk, backend)
            s_stats = None
            if scorer is not None:
                sh, sw, sb, s_chunk = scorer
                s_a_l, _, s_lse_l = _token_stats_fwd(sh, sw, layout.y_fwd, sb,
                                                         _LOCAL_IGNORE, 1.0, False, s_chunk,
                                                         backend)
                s_stats = (s_lse_l, s_a_l)
            lse, logprob, ent, _, s_logprob = _gather_stats(
                layout, lse_l, a_l, ent_l if with_entropy else None, s_stats)
        if ent is None:
            ent = lse.new_empty(0)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, w, b, logprob, lse, ent)
        ctx.layout, ctx.cfg = layout, cfg
        if s_logprob is None:
            s_logprob = lse.new_zeros(0)
        ctx.mark_non_differentiable(s_logprob)
        return logprob, ent, lse, s_logprob

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_lse, _g_s):
        h, w, b, logprob, lse, ent = ctx.saved_tensors
        temperature, _, chunk, backend, w_fp32 = ctx.cfg
        layout = ctx.layout
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                b is not None and ctx.needs_input_grad[2])
        if ent.numel() == 0:
            g_ent = None
        if not any(need) or (g_lp is None and g_ent is None and g_lse is None):
            return None, None, None, None, None, None
        gh, gw, gb = _token_stats_bwd(
            h, w, layout.y_fwd, b, logprob, lse, ent, g_lp, g_ent, g_lse, _LOCAL_IGNORE,
            temperature, chunk, *need, backend, not_owned=layout.valid & ~layout.owned,
            w_fp32=w_fp32)
        if need[0] and layout.world > 1:
            # This shard's share of d/dh (its vocab columns only): summed over the shards.
            dist.all_reduce(gh, group=layout.group)
        return (gh if need[0] else None, gw.to(w.dtype) if need[1] else None,
                gb.to(b.dtype) if need[2] else None, None, None, None)


def _kd_chunk_stats(k, z, tz, y, temperature):
    """(lse, teacher lse, E_q[z]) of one chunk's local logits at temperature T, all in the
    local shard's terms: q = softmax(tz/T) over the shard, E_q[z] = sum_v q_v z_v / T."""
    if isinstance(k, OpsBackend):
        loss, lse, tlse = k.chunk_kd(z, tz, y, _LOCAL_IGNORE, temperature)
        return lse, tlse, lse - loss  # the op's loss is lse - E_q[z]
    dt = acc_dtype(z.dtype)
    zt, tzt = z.to(dt) / temperature, tz.to(dt) / temperature
    lse, tlse = torch.logsumexp(zt, -1), torch.logsumexp(tzt, -1)
    q = torch.exp(tzt - tlse.unsqueeze(-1))
    # q_v z_v with q_v = 0 counts 0 even for z_v = -inf (as kd_loss_ref).
    return lse, tlse, torch.where(q == 0, 0, q * zt).sum(-1)


def _kd_chunk_grad(k, z, tz, y, lse, tlse, coef, temperature):
    """coef_t (p - q) / T on the shard's columns, with the global lse's (p, q global)."""
    if isinstance(k, OpsBackend):
        return k.chunk_kd_grad(z, tz, y, lse, tlse, coef, _LOCAL_IGNORE, temperature)
    dt = lse.dtype
    p = torch.exp(z.to(dt) / temperature - lse.unsqueeze(-1))
    q = torch.exp(tz.to(dt) / temperature - tlse.unsqueeze(-1))
    scale = torch.where(y != _LOCAL_IGNORE, coef / temperature, 0).unsqueeze(-1)
    return ((p - q) * scale).to(z.dtype)


class _VocabParallelLinearKD(torch.autograd.Function):
    """Per-token KD of policy and teacher heads over the vocab shards. Per row the shard
    gives lse_r, tlse_r and c_r = E_{q_r}[z] (q_r the teacher's softmax over the shard); one
    gather, then lse = LSE_r lse_r, tlse = LSE_r tlse_r, E_q[z] = sum_r exp(tlse_r - tlse) c_r,
    loss_t = lse - E_q[z]. Backward: the local (p - q) / T with the global lse's."""

    @staticmethod
    def forward(ctx, h, w, b, layout, cfg, scorer):
        temperature, chunk, backend, w_fp32 = cfg
        sh, sw, sb = scorer
        # The KD ops read the targets for the ignore mask only: any in-shard id will do.
        y = torch.where(layout.valid, 0, _LOCAL_IGNORE)
        eng = _Engine(h, w, y, b, sh, sw, sb, "kd", _LOCAL_IGNORE, temperature, chunk,
                          backend)
        n = h.shape[0]
        parts = torch.zeros(3, n, dtype=eng.acc, device=h.device)
        with torch.no_grad():
            for s, e in _free_chunks(n, chunk):
                z = eng.logits(s, e)
                tz = eng.scorer_logits(s, e).to(z.dtype)
                for i, x in enumerate(_kd_chunk_stats(eng.k, z, tz, y[s:e], temperature)):
                    parts[i, s:e] = x
                del z, tz
            g = _gather(parts, layout.group, layout.world)
            lse, tlse = torch.logsumexp(g[:, 0], 0), torch.logsumexp(g[:, 1], 0)
            pi = torch.exp(g[:, 1] - tlse)
            # A shard whose teacher row is all -inf has weight 0 and an undefined c_r.
            cross = torch.where(pi > 0, pi * g[:, 2], 0).sum(0)
            per_token = torch.where(layout.valid, lse - cross, 0)
        ctx.save_for_backward(h, w, b, sh, sw, sb, y, lse, tlse)
        ctx.layout, ctx.cfg = layout, cfg
        return per_token

    @staticmethod
    def backward(ctx, g):
        h, w, b, sh, sw, sb, y, lse, tlse = ctx.saved_tensors
        temperature, chunk, backend, w_fp32 = ctx.cfg
        layout = ctx.layout
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                b is not None and ctx.needs_input_grad[2])
        if not any(need) or g is None:
            return None, None, None, None, None, None
        eng = _Engine(h, w, y, b, sh, sw, sb, "kd", _LOCAL_IGNORE, temperature, chunk,
                          backend)
        grads = _Grads(eng, *need, w_fp32)
        coef = torch.where(layout.valid, g.to(eng.acc), 0)
        for s, e in _free_chunks(eng.n, chunk):
            z = eng.logits(s, e)
            tz = eng.scorer_logits(s, e).to(z.dtype)
            grads.add(_kd_chunk_grad(eng.k, z, tz, y[s:e], lse[s:e], tlse[s:e],
                                     coef[s:e].contiguous(), temperature), s, e)
            del z, tz
        gh, gw, gb = grads.empty()
        if need[0] and layout.world > 1:
            dist.all_reduce(gh, group=layout.group)
        return (gh if need[0] else None, gw.to(w.dtype) if need[1] else None,
                gb.to(b.dtype) if need[2] else None, None, None, None)


def vocab_parallel_linear_stats(h, w, y, b, tp: TPHead, ignore_index, temperature,
                                with_entropy, chunk, backend):
    """(logprob, entropy or None, lse), flat [N], replicated: ``linear_token_stats`` with
    ``tp_group`` (inputs flat and local, checked by the caller)."""
    layout = _linear_layout(h, w, y, tp, ignore_index, "weight")
    logprob, ent, lse, _ = _VocabParallelLinearStats.apply(
        h, w, b, layout, (temperature, with_entropy, chunk, backend, True), None)
    return logprob, ent if with_entropy else None, lse


def vocab_parallel_linear_loss(h, w, y, b, sh, sw, sb, scorer_logprobs, offsets, method,
                               ignore_index, eps, keep_ratio, temperature, reduction, num_items,
                               chunk, s_chunk, w_fp32, impl, tp: TPHead):
    """(loss, weights [N], diagnostics [6]) of ``remit_linear_loss`` with ``tp_group``
    (inputs flat and local, checked by the caller; the loss differentiable w.r.t. h, w, b)."""
    layout = _linear_layout(h, w, y, tp, ignore_index, "lm_head_weight", sh)
    valid = layout.valid
    acc = acc_dtype(h.dtype)
    diag = torch.zeros(6, dtype=acc, device=h.device)
    if method == "kd":
        per_token = _VocabParallelLinearKD.apply(h, w, b, layout,
                                                 (temperature, chunk, impl.name, w_fp32),
                                                 (sh, sw, sb))
        weights, count = valid.to(acc), valid.sum()
    else:
        scorer = None if sw is None else (sh, sw, sb, s_chunk)
        a, _, _, s_a = _VocabParallelLinearStats.apply(
            h, w, b, layout, (1.0, False, chunk, impl.name, w_fp32), scorer)
        count = valid.sum()
        if method == "ntp":
            weights = valid.to(acc)
        else:
            b_t = (scorer_logprobs if scorer_logprobs is not None else s_a).detach().to(acc)
            if method == "remit":
                weights, _, diag = impl.remit_weights(a.detach(), b_t, y, offsets,
                                                      ignore_index, eps)
            else:  # rho1: the batch-wide top-k, the same on every rank (a, b replicated)
                weights = rho1_keep_mask(b_t - a.detach(), valid, keep_ratio).to(acc)
                count = weights.sum()
        per_token = -weights * a
    if reduction == "none":
        return per_token, weights, diag
    loss = per_token.sum() * _inv_norm(count, reduction, num_items, acc, h.device)
    return loss, weights, diag


def _tp_linear_loss(h, w, y, bias, sh, sw, s_bias, sb, targets, cu_seqlens, method,
                    ignore_index, eps, keep_ratio, temperature, reduction, num_items, chunk_size,
                    memory_budget, w_fp32, return_details, impl, tp):
    """``remit_linear_loss`` over a vocab-sharded head: inputs flat, local and checked. The
    chunk sizes are planned for this rank's vocab rows."""
    n, v_local = y.numel(), w.shape[0]
    kw = dict(backend=impl.name, device_type=h.device.type, memory_budget=memory_budget)
    if method == "kd":
        chunk = chunk_size or linear_chunk_size(n, v_local, h.dtype, scorer_dtype=sh.dtype,
                                                method="kd", **kw)
        s_chunk = chunk
    else:
        # The statistics pass and the backward's recompute: the primitive's chunk buffers.
        chunk = chunk_size or stats_chunk_size(n, v_local, h.dtype, **kw)
        s_chunk = None if sh is None else (chunk_size or stats_chunk_size(n, v_local, sh.dtype,
                                                                          **kw))
    row_len = max(targets.shape[-1] if targets.dim() >= 2 else n, 1)
    offsets = _offsets(row_len, n, cu_seqlens, h.device) if method == "remit" else None
    if num_items is not None:
        num_items = (torch.full((), num_items, dtype=acc_dtype(h.dtype), device=h.device)
                     if isinstance(num_items, int) else num_items.detach())
    loss, weights, diag = vocab_parallel_linear_loss(
        h, w, y, bias, sh, sw, s_bias, sb, offsets, method, ignore_index, eps,
        float(keep_ratio), temperature, reduction, num_items, chunk, s_chunk, w_fp32, impl, tp)
    return _loss_output(loss, weights, diag, targets, method, reduction, return_details)


@torch.compiler.disable
def vocab_parallel_linear(fn, weight_name: str, args: dict):
    """``fn`` (``_linear_local._remit_linear_loss`` or ``_linear_token_stats``) on this rank's
    local shards of the heads. Eager: ``torch.compile`` graph-breaks here (process groups,
    DTensors and collectives inside an autograd.Function)."""
    keys = ("hidden", weight_name, "bias", "scorer_hidden", "scorer_weight", "scorer_bias")
    inputs, tp = unshard_linear(*(args.get(k) for k in keys), args["tp_group"], weight_name)
    local = dict(args, **{k: v for k, v in zip(keys, inputs) if k in args})
    try:
        return fn(**local, tp=tp)
    except (ValueError, TypeError):
        # Refused before the handshake (a local check): the peers must not wait for us.
        tp.refuse(inputs[0].device)
        raise
