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
from ._backends import select_backend
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


def _unshard(x: Optional[Tensor], tp_group, name: str):
    """A plain local shard and its group: a DTensor sharded on its last dim gives its local
    tensor (``to_local`` carries the gradient back as a DTensor of the same placement) and its
    mesh's group."""
    if x is None:
        return None, tp_group
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover (torch without distributed)
        return x, tp_group
    if not isinstance(x, DTensor):
        return x, tp_group
    mesh, placements = x.device_mesh, x.placements
    if mesh.ndim != 1 or not (isinstance(placements[0], Shard)
                              and placements[0].dim in (-1, x.dim() - 1)):
        raise ValueError(f"{name}: expected a DTensor sharded on its vocab (last) dim over a "
                         f"1-D mesh (Shard(-1), TorchTitan's loss_parallel layout), got "
                         f"placements {tuple(placements)} on a {mesh.ndim}-D mesh")
    group = mesh.get_group()
    if tp_group is not None and _group(tp_group, "tp_group")[0] is not group:
        raise ValueError(f"{name}: a DTensor on a mesh whose group is not tp_group (pass "
                         f"tp_group=None to use the mesh's)")
    return x.to_local(), group


class _VocabLayout:
    """This rank's place in the vocab: its offset (a device tensor) and the global size."""

    def __init__(self, logits: Tensor, targets: Tensor, group, ignore_index: int,
                 target_name: str = "targets", extra: Optional[list] = None):
        self.group, self.rank, self.world = _group(group, "tp_group")
        n, v_local = targets.numel(), logits.shape[-1]
        table = _handshake([v_local, n] + [t.shape[-1] for t in (extra or [])], logits.device,
                           self.group, self.world)
        sizes = table[:, 0]
        self.lo = sizes[:self.rank].sum()
        self.vocab = sizes.sum()
        valid = targets != ignore_index
        bad = (valid & ((targets < 0) | (targets >= self.vocab))).flatten()
        if _host_checks(logits.device):
            _check_agree(table, 1, "number of positions", "logits", "tp_group")
            for i, _ in enumerate(extra or []):
                if not torch.equal(table[:, 2 + i], sizes):
                    raise ValueError(f"scorer logits: expected the vocab shards of logits on "
                                     f"every rank of tp_group, got sizes {table[:, 2 + i].tolist()}"
                                     f" against {sizes.tolist()}")
            if bool(bad.any()):
                idx = int(bad.to(torch.uint8).argmax())
                raise ValueError(f"{target_name}: expected global vocab ids in "
                                 f"[0, {int(self.vocab)}) (the shards of tp_group together) or "
                                 f"ignore_index={ignore_index}, got "
                                 f"{int(targets.flatten()[idx])} at flat position {idx}")
        elif chk._value_check(logits.device) == "device":
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


class _VocabParallelStats(torch.autograd.Function):
    """(lse, logprob, entropy) of sharded logits; forward through the backend's op plus one
    gather, backward local (module docstring)."""

    @staticmethod
    def forward(ctx, z, layout, impl, ignore_index, temperature, with_entropy, scorer_z):
        with torch.no_grad():
            lse_l, a_l, ent_l, _, s_lse_l, s_a_l = impl.token_stats(
                z, layout.y_fwd, scorer_z, _LOCAL_IGNORE, temperature, with_entropy, 0, False)
            zero = torch.zeros((), dtype=lse_l.dtype, device=lse_l.device)
            parts = [lse_l, torch.where(layout.owned, a_l + lse_l, zero)]
            if with_entropy:
                parts.append(lse_l - ent_l)
            if scorer_z is not None:
                parts += [s_lse_l.to(lse_l.dtype),
                          torch.where(layout.owned, (s_a_l + s_lse_l).to(lse_l.dtype), zero)]
            g = _gather(torch.stack(parts), layout.group, layout.world)
            lse, logprob, ent = _combine(g[:, 0], g[:, 1], g[:, 2] if with_entropy else None,
                                         layout.valid)
            s_lse = s_logprob = None
            if scorer_z is not None:
                k = 3 if with_entropy else 2
                s_lse, s_logprob, _ = _combine(g[:, k], g[:, k + 1], None, layout.valid)
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
    _check_positions(targets, logits, target_name)
    if scorer_logits is not None:
        chk.check_like_logits(scorer_logits, logits, "scorer_logits")
    temperature = chk.check_positive(temperature, "temperature")
    layout = _VocabLayout(logits, targets, tp_group, ignore_index, target_name)
    impl = select_backend("token_stats", backend, (logits, targets, scorer_logits))
    z = logits.reshape(-1, logits.shape[-1])
    sz = None if scorer_logits is None else scorer_logits.detach().reshape(z.shape)
    lse, logprob, ent, s_lse, s_logprob = _VocabParallelStats.apply(
        z, layout, impl, ignore_index, temperature, entropy, sz)
    if scorer_logits is None:
        s_lse = s_logprob = None
    return lse, logprob, ent if entropy else None, s_lse, s_logprob


def _check_positions(targets, logits: Tensor, name: str) -> None:
    """check_targets without the range check (the range is the global vocab, checked in the
    layout handshake)."""
    chk._tensor(targets, name)
    if targets.dtype not in chk.INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype int64 or int32, got {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"{name}: expected shape {tuple(logits.shape[:-1])} (logits without "
                         f"the vocab dim), got {tuple(targets.shape)}")
    chk.check_same_device(logits, targets, name)


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
    local = torch.stack([vf.sum(), w.sum(), (w * w).sum(), ((raw <= 1 - eps) & valid).sum(),
                         ((raw >= 1 + eps) & valid).sum(), delta_hat.abs().sum(),
                         delta.sum()]).to(d64)
    for g, name in ((cp_group, "cp_group"), (dp_group, "dp_group")):
        if g is not None:
            group, _, world = _group(g, name)
            local = _gather(local, group, world).sum(0)
    return w, delta_hat, _diag_from_sums(local, dt)


def _diag_from_sums(s: Tensor, dt: torch.dtype) -> ReMiTDiagnostics:
    """Diagnostics from [n, sum w, sum w^2, n_low, n_high, sum |delta_hat|, sum delta] (fp64:
    the variance as E[w^2] - E[w]^2 is then exact to fp32 precision)."""
    inv = 1 / s[0].clamp(min=1)
    mean = s[1] * inv
    var = (s[2] * inv - mean * mean).clamp(min=0)
    return ReMiTDiagnostics(*(x.to(dt) for x in (mean, var.sqrt(), s[3] * inv, s[4] * inv,
                                                  s[5] * inv, s[6] * inv)))


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


def weighted_cross_entropy(logits, targets, weights, tp_group, ignore_index, reduction,
                           num_items, backend):
    _, a, _, _, _ = vocab_parallel_token_stats(logits, targets, tp_group,
                                               ignore_index=ignore_index, backend=backend)
    per_token = -a if weights is None else -a * weights.reshape(-1).to(a.dtype)
    valid = targets.reshape(-1) != ignore_index
    loss = reduce_tokens(per_token, valid.sum(), reduction, num_items)
    return loss.reshape(targets.shape) if reduction == "none" else loss


def remit_loss(logits, targets, scorer_logits, scorer_logprobs, offsets, eps, ignore_index,
               reduction, num_items, tp_group, cp_group, dp_group, backend):
    """(per-token or reduced loss, w [N], diagnostics)."""
    if tp_group is not None or _is_dtensor(logits):
        _, a, _, _, b = vocab_parallel_token_stats(logits, targets, tp_group,
                                                   scorer_logits=scorer_logits,
                                                   ignore_index=ignore_index, backend=backend)
    else:
        from .functional import token_stats

        st = token_stats(logits, targets, scorer_logits=scorer_logits,
                         ignore_index=ignore_index, backend=backend)
        a, b = st.logprob.reshape(-1), st.scorer_logprob
        b = None if b is None else b.reshape(-1)
    if scorer_logprobs is not None:
        b = scorer_logprobs.reshape(-1).detach()
    valid = targets.reshape(-1) != ignore_index
    w, _, diag = _remit_weights(a, b, valid, offsets, eps, cp_group, dp_group)
    loss = reduce_tokens(-w * a, valid.sum(), reduction, num_items)
    return (loss.reshape(targets.shape) if reduction == "none" else loss), w, diag


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


def kd_loss(logits, teacher_logits, targets, temperature, ignore_index, reduction, num_items,
            tp_group):
    logits, tp_group = _unshard(logits, tp_group, "logits")
    teacher_logits, _ = _unshard(teacher_logits, tp_group, "teacher_logits")
    if tp_group is None:
        raise ValueError("tp_group: expected a process group for vocab-sharded logits, got None")
    chk.check_logits(logits)
    chk.check_like_logits(teacher_logits, logits, "teacher_logits")
    _check_positions(targets, logits, "targets")
    layout = _VocabLayout(logits, targets, tp_group, ignore_index)
    z = logits.reshape(-1, logits.shape[-1])
    tz = teacher_logits.detach().reshape(z.shape)
    per_token = _VocabParallelKD.apply(z, tz, layout, temperature)
    loss = reduce_tokens(per_token, layout.valid.sum(), reduction, num_items)
    return loss.reshape(targets.shape) if reduction == "none" else loss


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, DTensor)
