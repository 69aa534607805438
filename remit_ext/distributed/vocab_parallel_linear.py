"""Vocab-parallel fused-linear heads: ``remit_linear_loss`` / ``linear_token_stats`` with
``tp_group``, or a DTensor head ``Shard(0)`` with a DTensor hidden. Called by
``remit_ext.linear`` (``vocab_parallel_linear``); ``_linear_local`` runs the checks and
hands the flat local inputs back through ``TPHead``.

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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks as chk
from .._backends import OpsBackend
from .._grads import kd_grad
from .._linear_engine import _Engine, _Grads, _inv_norm, _token_stats_bwd, _token_stats_fwd
from .._linear_local import _loss_output
from .._linear_plan import _free_chunks, _offsets, linear_chunk_size, stats_chunk_size
from ..reference import acc_dtype
from ._groups import _gather, _group, _handshake
from .vocab_parallel import _LOCAL_IGNORE, _VocabLayout, _gather_stats, _unshard


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
            _handshake([0] * (self.FACTS - 1), device, self.group,
                       dist.get_world_size(self.group), refused=True)

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
                        rows_name="hidden", vocab_name=weight_name, agree=agree, vocab=tp.vocab)


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
    return kd_grad(z, tz, lse, tlse, coef, y != _LOCAL_IGNORE, temperature)


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
                z, tz = eng.kd_logits(s, e)
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
            z, tz = eng.kd_logits(s, e)
            grads.add(_kd_chunk_grad(eng.k, z, tz, y[s:e], lse[s:e], tlse[s:e],
                                     coef[s:e].contiguous(), temperature).to(h.dtype), s, e)
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


def vocab_parallel_linear_loss(h, w, y, b, sh, sw, sb, scorer_logprobs, offsets, opts,
                               reduction, num_items, chunk, s_chunk, w_fp32, impl, tp: TPHead):
    """(loss, weights [N], diagnostics [6]) of ``remit_linear_loss`` with ``tp_group``
    (inputs flat and local, checked by the caller; the loss differentiable w.r.t. h, w, b).
    Statistics first, replicated; then the method's weights (``opts.method``, ``_methods``)
    over the whole batch, the same on every rank."""
    m = opts.method
    layout = _linear_layout(h, w, y, tp, opts.ignore_index, "lm_head_weight", sh)
    valid = layout.valid
    acc = acc_dtype(h.dtype)
    diag = torch.zeros(6, dtype=acc, device=h.device)
    if m.term == "kd":
        per_token = _VocabParallelLinearKD.apply(h, w, b, layout,
                                                 (opts.temperature, chunk, impl.name, w_fp32),
                                                 (sh, sw, sb))
        wts = m.weights(impl, per_token.detach(), None, y, valid, offsets, opts)
        per_token = wts.w * per_token
    else:
        scorer = None if sw is None else (sh, sw, sb, s_chunk)
        a, _, _, s_a = _VocabParallelLinearStats.apply(
            h, w, b, layout, (1.0, False, chunk, impl.name, w_fp32), scorer)
        b_t = None
        if m.scorer == "logprob":
            b_t = (scorer_logprobs if scorer_logprobs is not None else s_a).detach().to(acc)
        wts = m.weights(impl, a.detach(), b_t, y, valid, offsets, opts)
        per_token = -wts.w * a
    if wts.diagnostics is not None:
        diag = wts.diagnostics
    if reduction == "none":
        return per_token, wts.w, diag
    loss = per_token.sum() * _inv_norm(wts.count, reduction, num_items, acc, h.device)
    return loss, wts.w, diag


def _tp_linear_loss(h, w, y, bias, sh, sw, s_bias, sb, targets, cu_seqlens, opts, reduction,
                    num_items, chunk_size, memory_budget, w_fp32, return_details, impl, tp):
    """``remit_linear_loss`` over a vocab-sharded head: inputs flat, local and checked. The
    chunk sizes are planned for this rank's vocab rows."""
    m = opts.method
    n, v_local = y.numel(), w.shape[0]
    kw = dict(backend=impl.name, device_type=h.device.type, memory_budget=memory_budget)
    if m.term == "kd":
        chunk = chunk_size or linear_chunk_size(n, v_local, h.dtype, scorer_dtype=sh.dtype,
                                                method=m.name, **kw)
        s_chunk = chunk
    else:
        # The statistics pass and the backward's recompute: the primitive's chunk buffers.
        chunk = chunk_size or stats_chunk_size(n, v_local, h.dtype, **kw)
        s_chunk = None if sh is None else (chunk_size or stats_chunk_size(n, v_local, sh.dtype,
                                                                          **kw))
    row_len = max(targets.shape[-1] if targets.dim() >= 2 else n, 1)
    offsets = _offsets(row_len, n, cu_seqlens, h.device) if m.scope == "sequence" else None
    if num_items is not None:
        num_items = (torch.full((), num_items, dtype=acc_dtype(h.dtype), device=h.device)
                     if isinstance(num_items, int) else num_items.detach())
    loss, weights, diag = vocab_parallel_linear_loss(
        h, w, y, bias, sh, sw, s_bias, sb, offsets, opts, reduction, num_items, chunk, s_chunk,
        w_fp32, impl, tp)
    return _loss_output(loss, weights, diag, targets, m.name, reduction, return_details)


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
