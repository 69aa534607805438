"""Fused-linear losses with an FSDP2 / ZeRO-3-style sharded LM head (issue 17).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) an LM head whose module forward is not run
holds its parameters as DTensors sharded ``Shard(0)`` (rows of the vocabulary) over the
data-parallel mesh, while the activations (``hidden``) are plain tensors, each rank's own
tokens. Two ways through the fused losses:

- **Functional**: ``remit_linear_loss(hidden, model.lm_head.weight, ...)`` with the sharded
  DTensor weight (``remit_ext.remit_linear_loss`` dispatches here by itself when a head is a
  DTensor and ``hidden`` is not). The head is all-gathered for the forward and freed, gathered
  again in the backward, which recomputes the loss with gradients (no full-size weight, nor
  full-size gradient, is held between forward and backward), and the weight / bias gradient is
  reduce-scattered back to each rank's shard and divided by the data-parallel size: the
  gradient FSDP2 itself gives every other parameter (reduce-scatter with averaging;
  ``set_gradient_divide_factor`` -> ``gradient_divide_factor=`` here). The result is a
  ``Shard(0)`` DTensor gradient on the parameter, which the optimizer steps like any FSDP2
  parameter.
- **Module**: ``ReMiTLinearHead`` (``remit_ext.modules``) owns the head's parameters (and
  optionally a frozen scorer head), so that ``fully_shard(head)`` gathers and reshards them
  around its forward and backward with FSDP2's own hooks and reduces the gradient with FSDP2's
  own reduce-scatter.

Why not ``weight.full_tensor()``: its backward takes the incoming gradient to be *replicated*
(the same on every rank) and just slices each rank's rows, so the other ranks' contributions
(their tokens) are dropped. Under data parallelism the gradient of a gathered head is a partial
sum over ranks; it has to be reduce-scattered.

The frozen scorer of ReMiT / Rho-1 is gathered once, in the forward: its log-probs (N floats)
are kept for the backward instead of its head. A KD teacher's head is gathered again in the
backward (its full distribution enters the gradient). A head that does not require grad gets
no gradient and no reduce-scatter.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks as chk
from .. import _linear_local as _local
from .._linear_local import LinearLossOutput, LinearTokenStats
from .._methods import METHODS, loss_options
from ..reference import ReMiTDiagnostics
from ._groups import _handshake

__all__ = ["linear_token_stats", "remit_linear_loss", "sharded_linear_loss"]

# torch 2.13 renamed the tensor collectives (the old names warn); older releases have only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ------------------------------------------------------------------------- sharded heads


class _Layout(NamedTuple):
    """Where a DTensor head lives: its mesh, placements and global shape; the mesh dim it is
    sharded along (rows, Shard(0)) and the mesh dims it is replicated along (HSDP); its dtype
    and the dtype it is gathered and computed in (its activations')."""

    mesh: object
    placements: tuple
    shape: torch.Size
    stride: tuple
    shard_dim: Optional[int]
    replicate_dims: tuple
    dtype: torch.dtype
    compute: torch.dtype


def _layout(t: Optional[Tensor], name: str, like: Optional[Tensor]) -> Optional[_Layout]:
    """The layout of a DTensor head, None for a plain tensor (used as it is). Refuses any
    placement other than Shard(0) (FSDP2) and Replicate (HSDP's replicate dim). A floating
    head is computed in the dtype of its activations ``like`` (FSDP2's mixed precision: fp32
    shards, bf16 compute)."""
    if t is None or not chk.is_dtensor(t):
        return None
    from torch.distributed.tensor import Replicate, Shard

    shard, rep = [], []
    for i, p in enumerate(t.placements):
        # type() is: _StridedShard (FSDP2 over tensor parallel) subclasses Shard.
        if type(p) is Shard and p.dim == 0:
            shard.append(i)
        elif isinstance(p, Replicate):
            rep.append(i)
        else:
            raise ValueError(
                f"{name}: expected a DTensor sharded Shard(0) over a data-parallel mesh "
                f"(FSDP2; Replicate dims allowed for HSDP), got placements {t.placements}; a "
                "vocab-parallel head goes through tp_group=")
    if len(shard) > 1:
        raise ValueError(f"{name}: expected at most one Shard(0) mesh dim, got placements "
                         f"{t.placements}")
    compute = t.dtype
    if like is not None and t.dtype.is_floating_point and like.dtype.is_floating_point:
        compute = like.dtype
    return _Layout(t.device_mesh, tuple(t.placements), t.shape, t.stride(),
                   shard[0] if shard else None, tuple(rep), t.dtype, compute)


def _stand_in(t: Optional[Tensor], lay: Optional[_Layout]) -> Optional[Tensor]:
    """What the argument checks see of a head: a zero-stride plain tensor of its global shape
    and compute dtype for a DTensor (the checks read only metadata), the tensor otherwise."""
    if lay is None:
        return t
    return torch.empty((), dtype=lay.compute, device=t.device).expand(lay.shape)


def _rows(v: int, world: int) -> int:
    """Rows of the largest shard: FSDP2 and DTensor split dim 0 like torch.chunk."""
    return -(-v // world)


@torch.no_grad()
def _gather(t: Optional[Tensor], lay: Optional[_Layout]) -> Optional[Tensor]:
    """The full head as a plain tensor: one all-gather over the shard dim (uneven
    shards padded to equal rows, the padding cut off after)."""
    if t is None or lay is None:
        return t
    # Cast before the gather, as FSDP2 does: the bytes moved are the compute dtype's.
    local = t.to_local().to(lay.compute)
    if lay.shard_dim is None:
        return local
    group = lay.mesh.get_group(lay.shard_dim)
    world = dist.get_world_size(group)
    v, c = lay.shape[0], _rows(lay.shape[0], world)
    if local.shape[0] != c:
        local = torch.cat([local, local.new_zeros((c - local.shape[0],) + local.shape[1:])])
    out = local.new_empty((c * world,) + local.shape[1:])
    _all_gather(out, local.contiguous(), group=group)
    return out[:v]


@torch.no_grad()
def _reduce(grad: Tensor, lay: _Layout, factor: Optional[float]) -> Tensor:
    """Each rank's full-size gradient -> the sum over ranks of this rank's rows, divided by
    ``factor`` (default: the data-parallel size, FSDP2's average), as a DTensor of the head's
    layout. Sum then divide: gloo and NCCL alike, and FSDP2's own order for fp16 / fp64."""
    from torch.distributed.tensor import DTensor

    # Reduced in the parameter's dtype (FSDP2 with reduce_dtype = the parameter's, e.g. fp32).
    out = grad = grad.to(lay.dtype)
    if lay.shard_dim is not None:
        group = lay.mesh.get_group(lay.shard_dim)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        v, c = lay.shape[0], _rows(lay.shape[0], world)
        if c * world != v:
            grad = torch.cat([grad, grad.new_zeros((c * world - v,) + grad.shape[1:])])
        out = grad.new_empty((c,) + grad.shape[1:])
        _reduce_scatter(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=group)
        out = out[:max(0, min(c, v - rank * c))]
    for d in lay.replicate_dims:  # HSDP: then all-reduce over the replicas
        dist.all_reduce(out, group=lay.mesh.get_group(d))
    factor = float(lay.mesh.size()) if factor is None else float(factor)
    if factor != 1.0:
        out = out.div_(factor)
    return DTensor.from_local(out, lay.mesh, lay.placements, run_check=False, shape=lay.shape,
                              stride=lay.stride)


def _grad_for(grad: Optional[Tensor], lay: Optional[_Layout], factor) -> Optional[Tensor]:
    if grad is None or lay is None:
        return grad  # a plain head: its local gradient, like any plain tensor
    return _reduce(grad, lay, factor)


def _check_hidden(hidden, name: str = "hidden") -> None:
    if chk.is_dtensor(hidden):
        raise ValueError(f"{name}: expected a plain tensor (this rank's own tokens, the FSDP2 "
                         "layout), got a DTensor; a vocab-parallel head goes through tp_group=")


def _meshes(lays) -> list:
    """The distinct meshes of the DTensor heads (usually one)."""
    out = []
    for lay in lays:
        if lay is not None and all(m is not lay.mesh for m in out):
            out.append(lay.mesh)
    return out


def _mesh_handshake(lays, facts: list[int], refused: bool, device) -> None:
    """The distributed paths' handshake (``_groups._handshake``) over every dim of the heads'
    meshes before the first gather (host-checked validation modes only: it reads the result on
    the host): a rank that refused its inputs (``refused``)
    joins with status 0, so that its peers raise a ValueError too rather than wait in a gather
    it never reaches; ranks whose calls differ in ``facts`` (which heads are DTensors, V, D,
    method, a live scorer) would issue different gathers, so they all raise instead of pairing
    one rank's policy head with another's scorer head."""
    if chk._value_check(device) != "host":
        return
    meshes = _meshes(lays)
    if not meshes:
        return
    dev = torch.device(meshes[0].device_type, torch.cuda.current_device()) if (
        meshes[0].device_type == "cuda") else torch.device(meshes[0].device_type)
    # The tp handshake's table, gathered over each mesh dim in turn and folded to its column
    # minima: [min facts, -max facts] and the minimum status then reach every rank of the mesh
    # (a rank of another row hears of a refusal through its column).
    row, ok = facts + [-f for f in facts], not refused
    for mesh in meshes:
        for d in range(mesh.ndim):
            group = mesh.get_group(d)
            table = _handshake(row, dev, group, dist.get_world_size(group), refused=not ok)
            ok = bool(table[:, -1].all())
            row = table[:, :-1].min(0).values.tolist()
    if refused:
        return  # this rank raises its own error
    k = len(facts)
    if not ok:
        raise ValueError("remit_ext.fsdp: a peer rank of the heads' mesh refused its inputs (its "
                         "own error names the argument); this rank's passed its local checks")
    lo, hi = row[:k], [-v for v in row[k:]]
    if lo != hi:
        raise ValueError(
            "remit_ext.fsdp: expected the same call on every rank of the heads' mesh (which "
            "heads are DTensors, their global shape, method, a live scorer), got calls that "
            f"differ (facts min {lo}, max {hi}); the ranks' gathers would not pair up")


def _facts(lays, method: str, live: bool) -> list[int]:
    bits = sum(1 << i for i, lay in enumerate(lays) if lay is not None)
    shape = next(lay.shape for lay in lays if lay is not None) if bits else (0,)
    d = int(shape[1]) if len(shape) > 1 else -1
    methods = list(METHODS)
    return [bits, int(shape[0]), d, methods.index(method) if method in methods else -1,
            int(live)]


def _reads_logprobs(method) -> bool:
    """A live scorer head whose b_t the forward computes once (``Method.scorer``); False for
    an unknown method, which the checks then refuse inside the handshake."""
    return method in METHODS and METHODS[method].scorer == "logprob"


# ------------------------------------------------------------------------ the loss path


class _ShardedLinearLoss(torch.autograd.Function):
    """remit_linear_loss over gathered heads: forward without gradients, backward recomputes
    with them (a second gather) and reduce-scatters dW / db. Any head may be plain (used as is:
    the module path, where FSDP2 has already unsharded it)."""

    @staticmethod
    def forward(ctx, cfg, hidden, weight, bias, sh, sw, sb, slp, targets, cu_seqlens,
                num_items):
        kw, lays = cfg["kw"], cfg["lays"]
        live = sh is not None and _reads_logprobs(kw["method"])
        if live:
            # The frozen scorer's b_t, once: the backward reuses them instead of the head.
            slp = _local._linear_token_stats(
                sh, _gather(sw, lays[2]), targets, bias=_gather(sb, lays[3]),
                ignore_index=kw["ignore_index"], chunk_size=kw["chunk_size"],
                memory_budget=kw["memory_budget"], backend=kw["backend"]).logprob
            sh = sw = sb = None
        ni = cfg["num_items"] if num_items is None else num_items
        out = _local._remit_linear_loss(
            hidden, _gather(weight, lays[0]), targets, bias=_gather(bias, lays[1]),
            scorer_hidden=sh, scorer_weight=_gather(sw, lays[2]),
            scorer_bias=_gather(sb, lays[3]), scorer_logprobs=slp, cu_seqlens=cu_seqlens,
            num_items_in_batch=ni, return_details=True, **kw)
        diag = (torch.stack(tuple(out.diagnostics)) if out.diagnostics is not None
                else out.loss.new_zeros(0))
        ctx.cfg = cfg
        ctx.save_for_backward(hidden, weight, bias, sh, sw, sb, slp, targets, cu_seqlens,
                              num_items)
        ctx.mark_non_differentiable(out.weights, diag)
        return out.loss, out.weights, diag

    @staticmethod
    def backward(ctx, g_loss, _g_weights, _g_diag):
        hidden, weight, bias, sh, sw, sb, slp, targets, cu_seqlens, num_items = ctx.saved_tensors
        cfg = ctx.cfg
        kw, lays = cfg["kw"], cfg["lays"]
        need = (ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                bias is not None and ctx.needs_input_grad[3])
        if not any(need):
            return (None,) * 11
        # Second gather: the full head lives only inside this recompute.
        w_full, b_full = _gather(weight, lays[0]), _gather(bias, lays[1])
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_(n)
                      for x, n in zip((hidden, w_full, b_full), need)]
            ni = cfg["num_items"] if num_items is None else num_items
            loss = _local._remit_linear_loss(
                leaves[0], leaves[1], targets, bias=leaves[2], scorer_hidden=sh,
                scorer_weight=_gather(sw, lays[2]), scorer_bias=_gather(sb, lays[3]),
                scorer_logprobs=slp, cu_seqlens=cu_seqlens, num_items_in_batch=ni, **kw)
            wrt = [x for x, n in zip(leaves, need) if n]
            got = iter(torch.autograd.grad(loss, wrt, g_loss))
        del loss, w_full, b_full
        gh, gw, gb = (next(got) if n else None for n in need)
        factor = cfg["factor"]
        return (None, gh, _grad_for(gw, lays[0], factor), _grad_for(gb, lays[1], factor),
                None, None, None, None, None, None, None)


def loss_kwargs(method, ignore_index, eps, keep_ratio, temperature, reduction, chunk_size,
                 memory_budget, grad_weight_fp32, backend, chunk_dtype=None) -> dict:
    return dict(method=method, ignore_index=ignore_index, eps=eps, keep_ratio=keep_ratio,
                temperature=temperature, reduction=reduction, chunk_size=chunk_size,
                memory_budget=memory_budget, grad_weight_fp32=grad_weight_fp32, backend=backend,
                chunk_dtype=chunk_dtype)


# Collectives inside an autograd.Function are not traceable: a compiled model breaks its graph
# here and runs this part eagerly (the plain-tensor path stays one opaque registered op).
@torch.compiler.disable
def sharded_linear_loss(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                 scorer_logprobs, cu_seqlens, num_items_in_batch, return_details,
                 gradient_divide_factor, kw):
    _check_hidden(hidden)
    _check_hidden(scorer_hidden, "scorer_hidden")
    lays = (_layout(weight, "lm_head_weight", hidden), _layout(bias, "bias", hidden),
            _layout(scorer_weight, "scorer_weight", scorer_hidden),
            _layout(scorer_bias, "scorer_bias", scorer_hidden))
    # Every check that can fail on one rank alone runs before the first collective, then the
    # handshake: a rank that refused joins it with status 0, so its peers raise too instead of
    # waiting in the gather. DTensors carry their global shape, dtype and device, which is all
    # these checks read.
    live = scorer_hidden is not None and _reads_logprobs(kw["method"])
    facts = _facts(lays, kw["method"], live)
    try:
        loss_options(kw["method"], ignore_index=kw["ignore_index"], eps=kw["eps"],
                     keep_ratio=kw["keep_ratio"], temperature=kw["temperature"])
        vocab = _local._check_inputs(hidden, *(_stand_in(t, lay) for t, lay in zip(
            (weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias),
            (lays[0], None, lays[1], None, lays[2], lays[3]))), scorer_logprobs, kw["method"])
        chk.check_num_items(num_items_in_batch, kw["reduction"], hidden.device)
        y = targets.reshape(-1)
        chk.check_targets(y, hidden.new_empty(()).expand(y.numel(), vocab), kw["ignore_index"])
        cu_seqlens = chk.check_cu_seqlens(cu_seqlens, y.numel(), hidden.device)
        if gradient_divide_factor is not None and not gradient_divide_factor > 0:
            raise ValueError(f"gradient_divide_factor: expected a number > 0 or None, got "
                             f"{gradient_divide_factor!r}")
    except (ValueError, TypeError):
        _mesh_handshake(lays, facts, True, hidden.device)
        raise
    _mesh_handshake(lays, facts, False, hidden.device)
    ni_tensor = num_items_in_batch if isinstance(num_items_in_batch, Tensor) else None
    cfg = {"kw": kw, "lays": lays, "factor": gradient_divide_factor,
           "num_items": None if ni_tensor is not None else num_items_in_batch}
    loss, weights, diag = _ShardedLinearLoss.apply(
        cfg, hidden, weight, bias, scorer_hidden, scorer_weight, scorer_bias, scorer_logprobs,
        targets, cu_seqlens, ni_tensor)
    if not return_details:
        return loss
    return LinearLossOutput(loss, weights,
                            ReMiTDiagnostics.from_tensor(diag) if diag.numel() else None)


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
    gradient_divide_factor: Optional[float] = None,
):
    """``remit_ext.remit_linear_loss`` with FSDP2-sharded heads: any of ``lm_head_weight``,
    ``bias``, ``scorer_weight``, ``scorer_bias`` may be a DTensor sharded ``Shard(0)`` over a
    data-parallel mesh (``[Replicate, Shard(0)]`` for HSDP), ``hidden`` is this rank's plain
    activations. Loss, weights and diagnostics: those of the unsharded call on this rank's
    tokens.

    Gradients: ``hidden`` gets its local gradient; a DTensor head that requires grad gets a
    DTensor gradient of its own layout, the sum over the mesh of each rank's gradient divided by
    ``gradient_divide_factor`` (default the mesh size: FSDP2's averaging; pass the factor you
    gave FSDP2's ``set_gradient_divide_factor``). So with FSDP2 the step is that of the mean
    over ranks of each rank's loss; pass ``num_items_in_batch=parallel.global_num_items(targets,
    per_rank=True)`` for the mean over all ranks' tokens. A plain head is used as it is.

    The heads are all-gathered for the forward and freed; the backward gathers the trainable
    head again and recomputes the loss with gradients (~8NDV FLOPs instead of 6NDV), so no
    full-size weight or gradient is held between forward and backward. Every rank must call it
    (collectives), and then call backward. In the host-checked validation modes (CPU, or
    ``set_validation("sync")``) a handshake (a small all_gather per mesh dim) precedes the first gather:
    a rank refusing its inputs makes its peers raise too, and ranks whose calls would gather
    different heads all raise, instead of waiting or pairing the wrong gathers.
    """
    kw = loss_kwargs(method, ignore_index, eps, keep_ratio, temperature, reduction, chunk_size,
                     memory_budget, grad_weight_fp32, backend, chunk_dtype)
    return sharded_linear_loss(hidden, lm_head_weight, targets, bias, scorer_hidden, scorer_weight,
                        scorer_bias, scorer_logprobs, cu_seqlens, num_items_in_batch,
                        return_details, gradient_divide_factor, kw)


# ------------------------------------------------------------ the token-statistics path


class _ShardedTokenStats(torch.autograd.Function):
    """linear_token_stats over a gathered head; the backward re-gathers and recomputes."""

    @staticmethod
    def forward(ctx, cfg, hidden, weight, bias, targets):
        kw, lays = cfg["kw"], cfg["lays"]
        st = _local._linear_token_stats(hidden, _gather(weight, lays[0]), targets,
                                     bias=_gather(bias, lays[1]), **kw)
        ctx.cfg = cfg
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.set_materialize_grads(False)
        ent = st.entropy if st.entropy is not None else st.lse.new_zeros(0)
        if st.entropy is None:
            ctx.mark_non_differentiable(ent)
        return st.logprob, ent, st.lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_lse):
        hidden, weight, bias, targets = ctx.saved_tensors
        cfg = ctx.cfg
        kw, lays = cfg["kw"], cfg["lays"]
        need = (ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                bias is not None and ctx.needs_input_grad[3])
        if not kw["entropy"]:
            g_ent = None
        pairs = [(i, g) for i, g in enumerate((g_lp, g_ent, g_lse)) if g is not None]
        if not any(need) or not pairs:
            return (None,) * 5
        w_full, b_full = _gather(weight, lays[0]), _gather(bias, lays[1])
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_(n)
                      for x, n in zip((hidden, w_full, b_full), need)]
            st = _local._linear_token_stats(leaves[0], leaves[1], targets, bias=leaves[2], **kw)
            outs = (st.logprob, st.entropy, st.lse)
            wrt = [x for x, n in zip(leaves, need) if n]
            got = iter(torch.autograd.grad([outs[i] for i, _ in pairs], wrt,
                                           [g for _, g in pairs]))
        del st, outs, w_full, b_full
        gh, gw, gb = (next(got) if n else None for n in need)
        factor = cfg["factor"]
        return None, gh, _grad_for(gw, lays[0], factor), _grad_for(gb, lays[1], factor), None


@torch.compiler.disable  # see _linear_loss
def _apply_stats(cfg, hidden, weight, bias, targets):
    return _ShardedTokenStats.apply(cfg, hidden, weight, bias, targets)


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
    gradient_divide_factor: Optional[float] = None,
) -> LinearTokenStats:
    """``remit_ext.linear_token_stats`` with an FSDP2-sharded head (``weight`` and / or
    ``bias`` a ``Shard(0)`` DTensor, ``hidden`` this rank's plain activations): the statistics
    of this rank's tokens, and for any per-token cotangents the head's gradient reduce-scattered
    and divided by ``gradient_divide_factor`` (default the mesh size, FSDP2's average), as in
    ``remit_linear_loss`` above (gathered in the forward, gathered again in the backward)."""
    _check_hidden(hidden)
    lays = (_layout(weight, "weight", hidden), _layout(bias, "bias", hidden))
    # The rank-local checks before the first collective, then the handshake (see
    # sharded_linear_loss).
    facts = _facts(lays, "ntp", False)
    try:
        vocab = _local._check_head(hidden, _stand_in(weight, lays[0]), "weight")
        chk._tensor(targets, "targets")
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden "
                             f"without the hidden dim), got {tuple(targets.shape)}")
        w_dtype = weight.dtype if lays[0] is None else lays[0].compute
        b_dtype = None if bias is None else bias.dtype if lays[1] is None else lays[1].compute
        if bias is not None and (bias.shape != (vocab,) or b_dtype != w_dtype):
            raise ValueError(f"bias: expected shape ({vocab},) and dtype {w_dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        if not isinstance(entropy, bool):
            raise TypeError(f"entropy: expected a bool, got {type(entropy).__name__}")
        y = targets.reshape(-1)
        chk.check_targets(y, hidden.new_empty(()).expand(y.numel(), vocab), ignore_index)
    except (ValueError, TypeError):
        _mesh_handshake(lays, facts, True, hidden.device)
        raise
    _mesh_handshake(lays, facts, False, hidden.device)
    kw = dict(ignore_index=ignore_index, temperature=temperature, entropy=entropy,
              chunk_size=chunk_size, memory_budget=memory_budget, backend=backend,
              chunk_dtype=chunk_dtype)
    cfg = {"kw": kw, "lays": lays, "factor": gradient_divide_factor}
    logprob, ent, lse = _apply_stats(cfg, hidden, weight, bias, targets)
    return LinearTokenStats(logprob, ent if entropy else None, lse)
