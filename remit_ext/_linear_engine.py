"""The fused-linear chunk engine (``remit_ext.linear``'s docstring, "How a step runs"): one
call's inputs and per-chunk steps (``_Engine``), the gradient accumulators (``_Grads``),
the loss schedules (fused, two-pass, ``reduction="none"``) and the token-statistics
primitive's chunked forward and backward. The per-chunk statistics and gradients come
from the dispatcher's backend (``_backends``: ``chunk_*`` methods). The registered ops
around it are in ``_linear_ops``; vocab-parallel heads drive the same steps from
``remit_ext.distributed.vocab_parallel_linear``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backends import BACKENDS, OpsBackend
from ._linear_plan import _aligned_chunks, _free_chunks, _host_bounds, _offsets
from ._methods import LossOptions, get_method
from .reference import acc_dtype, count_scale


def _head_logits(h: Tensor, w: Tensor, b: Optional[Tensor], s: int, e: int) -> Tensor:
    """The logits of rows [s, e): ``h[s:e] @ w.T (+ b)``, one [C, V] buffer."""
    if b is None:
        return h[s:e] @ w.T
    return torch.addmm(b, h[s:e], w.T)


def _chunk_stats(k, h, w, b, y, s, e, ii, temperature, with_entropy):
    """(lse, logprob, entropy) of rows [s, e) of ``h @ w.T (+ b)``: the chunk step of the
    token-statistics primitive, shared by ``linear_token_stats`` and the frozen scorer of
    ``remit_linear_loss``. The chunk's logits are freed on return."""
    return k.chunk_stats(_head_logits(h, w, b, s, e), y[s:e], ii, temperature, with_entropy)



# --------------------------------------------------------------------------------- engine


class _Engine:
    """One call's inputs (flattened) and the per-chunk steps shared by all schedules."""

    def __init__(self, hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                 method, ignore_index, temperature, chunk_size, backend):
        self.h, self.w, self.y, self.b = hidden, weight, targets, bias
        self.sh, self.sw, self.sb = scorer_hidden, scorer_weight, scorer_bias
        self.method, self.ii, self.temperature = get_method(method), ignore_index, temperature
        self.chunk, self.k = chunk_size, BACKENDS[backend]
        self.n, self.vocab = hidden.shape[0], weight.shape[0]
        self.acc = acc_dtype(hidden.dtype)

    def logits(self, s, e):
        return _head_logits(self.h, self.w, self.b, s, e)

    def scorer_logits(self, s, e):
        return _head_logits(self.sh, self.sw, self.sb, s, e)

    def frozen_logprob(self, s, e):
        """b_t of the scorer / reference for rows [s, e): the token-statistics primitive's chunk
        step (``linear_token_stats``), its logits dropped at once."""
        _, b, _ = _chunk_stats(self.k, self.sh, self.sw, self.sb, self.y, s, e, self.ii, 1.0,
                               False)
        return b.to(self.acc)

    def stats(self, s, e, z=None):
        """(lse, a) of the policy rows [s, e), computing their logits unless given."""
        z = self.logits(s, e) if z is None else z
        return z, *self.k.chunk_logprob(z, self.y[s:e], self.ii)

    def ce_grad_(self, z, s, e, lse, a, coef):
        """coef_t * (softmax(z_t) - onehot(y_t)) for rows [s, e), written into z's buffer."""
        return self.k.chunk_ce_grad_(z, self.y[s:e], lse, a, coef, self.ii)

    def kd_logits(self, s, e):
        """Policy and teacher logits of rows [s, e) in one dtype, the wider of the two heads'
        (a bf16 student with an fp32 teacher reads the teacher in fp32, not rounded to bf16)."""
        z, tz = self.logits(s, e), self.scorer_logits(s, e)
        dt = torch.promote_types(z.dtype, tz.dtype)
        return z.to(dt), tz.to(dt)

    def kd_forward(self, s, e):
        """Policy and teacher logits of rows [s, e) and the per-token KD loss, lse, teacher lse."""
        z, tz = self.kd_logits(s, e)
        loss, lse, tlse = self.k.chunk_kd(z, tz, self.y[s:e], self.ii, self.temperature)
        return z, tz, loss, lse, tlse

    def kd_grad(self, z, tz, s, e, lse, tlse, coef):
        """The KD gradient of rows [s, e) w.r.t. their logits, in the policy head's dtype."""
        g = self.k.chunk_kd_grad(z, tz, self.y[s:e], lse, tlse, coef, self.ii, self.temperature)
        return g.to(self.h.dtype)


class _Grads:
    """Accumulators for grad_hidden (input dtype), grad_W and grad_bias (fp32 by default)."""

    def __init__(self, eng: _Engine, need_h: bool, need_w: bool, need_b: bool, w_fp32: bool):
        h, w = eng.h, eng.w
        wdt = torch.float32 if (w_fp32 and w.dtype != torch.float64) else w.dtype
        self.gh = torch.empty_like(h) if need_h else h.new_empty(0)
        self.gw = torch.zeros(w.shape, dtype=wdt, device=w.device) if need_w else w.new_empty(0)
        self.gb = (torch.zeros(w.shape[0], dtype=wdt, device=w.device) if need_b
                   else w.new_empty(0))
        self.need_h, self.need_w, self.need_b = need_h, need_w, need_b
        self.h, self.w, self.y, self.ii = h, w, eng.y, eng.ii

    def add(self, g, s, e):
        if self.need_h:
            torch.mm(g, self.w, out=self.gh[s:e])
        if self.need_w:
            # g's ignored rows are 0, but 0 * NaN is NaN in the GEMM: a padded position's
            # hidden state (garbage after a padded attention, say) is selected away first.
            # A [C, D] select beside the [C, V] x D products.
            h = torch.where((self.y[s:e] != self.ii).unsqueeze(-1), self.h[s:e], 0)
            if self.gw.dtype == g.dtype:
                self.gw.addmm_(g.T, h)
            else:
                # The product comes out of the matmul in the input dtype (fp32 accumulation
                # inside it); summing chunks in fp32 keeps the rounding from compounding.
                self.gw.add_(g.T @ h)
        if self.need_b:
            self.gb.add_(g.sum(0, dtype=self.gb.dtype))

    def empty(self):
        return self.gh, self.gw, self.gb



def _linear_loss_impl(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                      scorer_logprobs, cu_seqlens, row_len, method, ignore_index, eps,
                      keep_ratio, temperature, reduction, chunk_size, need_h, need_w, need_b,
                      w_fp32, backend, num_items=None):
    """The loss schedules, chosen by the method's fields (``_methods.Method``), never its name:
    one pass (the gradient formed beside the loss) over free chunks for a token-scope method and
    over whole-sequence chunks for a sequence-scope one when they fit; otherwise a statistics
    pass, the weights over the whole batch, and a gradient pass that recomputes the logits."""
    opts = LossOptions.from_schema(method, ignore_index, eps, keep_ratio, temperature)
    m = opts.method
    eng = _Engine(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                  m, ignore_index, temperature, chunk_size, backend)
    n, acc, y = eng.n, eng.acc, targets
    impl = BACKENDS[backend]
    valid = y != ignore_index
    grads = _Grads(eng, need_h and reduction != "none", need_w and reduction != "none",
                   need_b and reduction != "none", w_fp32)
    with_grad = grads.need_h or grads.need_w or grads.need_b
    per_token = torch.zeros(n, dtype=acc, device=hidden.device)
    diag = torch.zeros(6, dtype=acc, device=hidden.device)
    offsets = _offsets(row_len, n, cu_seqlens, hidden.device) if m.scope == "sequence" else None

    def inv_norm(count):
        return _inv_norm(count, reduction, num_items, acc, y.device)

    def frozen(s, e):
        """b_t of rows [s, e) for a method that reads the frozen model's log-probs."""
        if m.scorer != "logprob":
            return None
        if scorer_logprobs is not None:
            return scorer_logprobs[s:e].to(acc)
        return eng.frozen_logprob(s, e)

    chunks = None  # (s, e, first offset, last offset) of a one-pass schedule
    if reduction != "none" and m.scope == "token":
        chunks = [(s, e, None, None) for s, e in _free_chunks(n, chunk_size)]
    elif reduction != "none" and m.scope == "sequence":
        chunks = _aligned_chunks(_host_bounds(n, row_len, cu_seqlens), chunk_size)

    if chunks is not None:
        # One pass: a token- or sequence-scope method divides by the valid count, known first.
        scale = inv_norm(valid.sum())
        weights = torch.zeros(n, dtype=acc, device=y.device)
        a_all = b_all = None
        if m.diagnostics:
            a_all = torch.zeros(n, dtype=acc, device=y.device)
            b_all = torch.zeros(n, dtype=acc, device=y.device)
        for s, e, q0, q1 in chunks:
            if e == s:
                continue
            local = None if q0 is None else offsets[q0:q1 + 1] - s
            if m.term == "kd":
                z, tz, term, lse, tlse = eng.kd_forward(s, e)
                w = m.weights(impl, term, None, y[s:e], valid[s:e], local, opts).w
                per_token[s:e] = w * term
                if with_grad:
                    grads.add(eng.kd_grad(z, tz, s, e, lse, tlse, w * scale), s, e)
                # Drop this chunk's buffers before the next chunk's matmul allocates its own
                # (otherwise the peak holds two chunks).
                del z, tz
            else:
                z, lse, a = eng.stats(s, e)
                b = frozen(s, e)
                w = m.weights(impl, a, b, y[s:e], valid[s:e], local, opts).w
                per_token[s:e] = -w * a
                if a_all is not None:
                    a_all[s:e], b_all[s:e] = a, b
                if with_grad:
                    grads.add(eng.ce_grad_(z, s, e, lse, a, w * scale), s, e)
                del z
            weights[s:e] = w
        count = valid.sum()
        if m.diagnostics:
            # The weights are final; this O(N) call only gives batch-wide diagnostics.
            diag = m.weights(impl, a_all, b_all, y, valid, offsets, opts).diagnostics
    else:
        # Statistics pass: a_t (and b_t), or the KD term, for every token; logits dropped.
        a_all = torch.zeros(n, dtype=acc, device=y.device)
        b_all = None
        if m.scorer == "logprob":
            b_all = (scorer_logprobs.to(acc) if scorer_logprobs is not None
                     else torch.zeros(n, dtype=acc, device=y.device))
        for s, e in _free_chunks(n, chunk_size):
            if m.term == "kd":
                per_token[s:e] = eng.kd_forward(s, e)[2]
                continue
            a_all[s:e] = eng.stats(s, e)[2]
            if b_all is not None and scorer_logprobs is None:
                b_all[s:e] = eng.frozen_logprob(s, e)
        wts = m.weights(impl, per_token if m.term == "kd" else a_all, b_all, y, valid, offsets,
                        opts)
        weights, count = wts.w, wts.count
        if wts.diagnostics is not None:
            diag = wts.diagnostics
        per_token = weights * per_token if m.term == "kd" else -weights * a_all
        if with_grad:  # recompute pass
            _grad_pass(eng, grads, weights * inv_norm(count))

    loss = per_token if reduction == "none" else per_token.sum() * inv_norm(count)
    return (loss, weights, diag) + grads.empty()


def _inv_norm(count: Tensor, reduction: str, num_items: Optional[Tensor], acc: torch.dtype,
              device) -> Tensor:
    """1 / the normaliser of the loss and of the gradient coefficients: the local count
    (valid tokens; Rho-1: kept tokens), or num_items_in_batch when given."""
    if reduction != "mean":
        return torch.ones((), dtype=acc, device=device)
    if num_items is not None:
        if num_items.device != device:
            # A CPU count with GPU tokens: read from host memory (no device sync) and
            # filled on the device; .to(device) would be a blocking host-to-device copy.
            count = torch.full((), float(num_items), dtype=acc, device=device)
            return _inverse_count(count)
        return _inverse_count(num_items.to(dtype=acc))
    return 1 / count.clamp(min=1).to(acc)


def _inverse_count(count: Tensor) -> Tensor:
    """1 / count for count > 0; 0 for count = 0 (a batch with no counted token has loss 0 and
    gradient 0, not NaN); NaN for a negative count (reference.count_scale)."""
    divisor, factor = count_scale(count)
    return factor / divisor


def _grad_pass(eng: _Engine, grads: _Grads, coef: Tensor) -> None:
    """Recompute each chunk's logits and fold coef_t * d(loss_t)/d(logits_t) into the grads."""
    for s, e in _free_chunks(eng.n, eng.chunk):
        if eng.method.term == "kd":
            z, tz, _, lse, tlse = eng.kd_forward(s, e)
            g = eng.kd_grad(z, tz, s, e, lse, tlse, coef[s:e])
        else:
            z, lse, a = eng.stats(s, e)
            g = eng.ce_grad_(z, s, e, lse, a, coef[s:e])
        grads.add(g, s, e)
        del z, g



# ------------------------------------------------------------- the token-statistics primitive
#
# linear_token_stats: hidden states + LM head -> per-token (logprob, entropy, lse), never
# holding [N, V]. Forward: one chunk of logits at a time through the backend's token_stats op.
# Backward: recompute each chunk's logits, form d(sum_t g_t . stats_t)/d logits for the
# incoming per-token cotangents in that chunk's buffer, and fold it into grad_hidden,
# grad_W (fp32) and grad_bias, exactly like the loss engine's gradient pass.


def _token_stats_fwd(hidden, weight, targets, bias, ignore_index, temperature, with_entropy,
                     chunk_size, backend):
    k = BACKENDS[backend]
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    logprob = hidden.new_empty(n, dtype=acc)
    lse = hidden.new_empty(n, dtype=acc)
    entropy = hidden.new_empty(n if with_entropy else 0, dtype=acc)
    for s, e in _free_chunks(n, chunk_size):
        c_lse, c_a, c_ent = _chunk_stats(k, hidden, weight, bias, targets, s, e, ignore_index,
                                         temperature, with_entropy)
        lse[s:e], logprob[s:e] = c_lse, c_a
        if with_entropy:
            entropy[s:e] = c_ent
    return logprob, entropy, lse


def _token_stats_bwd(hidden, weight, targets, bias, logprob, lse, entropy, g_lp, g_ent, g_lse,
                     ignore_index, temperature, chunk_size, need_h, need_w, need_b, backend,
                     not_owned: Optional[Tensor] = None, w_fp32: bool = True):
    """The chunked gradient pass of the primitive. ``not_owned`` (vocab parallel): rows whose
    valid target lies on another shard (their ``targets`` entry is any local id, their
    ``logprob`` and ``lse`` the global ones): they get ``p`` and no one-hot."""
    eng = _Engine(hidden, weight, targets, bias, None, None, None, "ntp", ignore_index,
                  temperature, chunk_size, backend)
    # A head that needs no gradient (a frozen scorer) gets no dW buffer at all.
    grads = _Grads(eng, need_h, need_w, need_b, w_fp32)
    # Log-prob cotangents alone at T = 1 are the weighted-CE gradient, coef = -g: the
    # backend's in-place op writes it into the chunk buffer (no fp32 temporaries).
    fast = (isinstance(eng.k, OpsBackend) and temperature == 1.0 and g_ent is None
            and g_lse is None and g_lp is not None)
    coef = None if g_lp is None else (-g_lp.to(eng.acc) if fast else g_lp)
    y_slow = targets
    if not_owned is not None and not fast:
        y_slow = torch.where(not_owned, -1, targets)  # outside [0, V): no one-hot
    for s, e in _free_chunks(eng.n, chunk_size):
        z = eng.logits(s, e)
        if fast:
            z0 = None
            if not_owned is not None:
                # The kernels' one-hot sits at the target id, which must be in [0, V): the
                # rows of another shard's target put it at column 0 and get that column back
                # as coef * p_0 (from a copy taken before the in-place op).
                z0 = z[:, 0].to(eng.acc, copy=True)
            c = coef[s:e].contiguous()
            g = eng.ce_grad_(z, s, e, lse[s:e], logprob[s:e], c)
            if z0 is not None:
                fix = (c * torch.exp(z0 - lse[s:e])).to(g.dtype)
                g[:, 0] = torch.where(not_owned[s:e], fix, g[:, 0])
        else:
            # The chunk buffer is ours: the gradient may be formed in it.
            g = eng.k.chunk_stats_grad_(z, y_slow[s:e], lse[s:e], logprob[s:e],
                                        None if g_ent is None else entropy[s:e],
                                        None if g_lp is None else g_lp[s:e],
                                        None if g_ent is None else g_ent[s:e],
                                        None if g_lse is None else g_lse[s:e], temperature,
                                        ignore_index)
        grads.add(g, s, e)
        del z, g
    return grads.empty()

