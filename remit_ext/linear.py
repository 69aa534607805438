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
(schema, fake and autograd below), opaque to the compiler, so a compiled model traces through
the loss without a graph break. The backward of ``reduction="none"`` is a second op,
``linear_loss_grad``; the primitive's backward is ``linear_token_stats_grad``.

Vocab parallel (``tp_group=``, or a DTensor head ``Shard(0)`` with DTensor hidden): the same
chunk steps on this rank's rows of the head, driven from ``remit_ext.parallel`` (its
docstring): a statistics pass, one gather of the per-row statistics, the loss; the backward
recomputes the chunks and all-reduces grad hidden. It is an autograd.Function issuing
collectives, so ``torch.compile`` graph-breaks there. A DTensor head with plain hidden (FSDP2)
goes to ``remit_ext.fsdp``.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks as chk
from . import reference as ref
from ._backends import OpsBackend, select_backend, BACKENDS
from ._meta import _token_stats_input_grad
from . import parallel as _parallel
from .reference import ReMiTDiagnostics, acc_dtype, rho1_keep_mask

__all__ = ["LinearLossOutput", "LinearTokenStats", "METHODS", "remit_linear_loss",
           "linear_chunk_size", "linear_token_stats", "stats_chunk_size"]

METHODS = ("remit", "ntp", "rho1", "kd")
NAMESPACE = "remit_ext_linear"
# Default bytes for the chunk buffers (policy logits, scorer logits, backend temporaries). On a
# GPU 2 GiB holds 4096 rows of bf16 policy + scorer logits at V = 128k: whole 4k-token
# sequences per chunk (the one-pass schedule) and matmuls large enough to run at full rate.
DEFAULT_MEMORY_BUDGET = {"cuda": 2 << 30, "cpu": 256 << 20}


class LinearTokenStats(NamedTuple):
    """Per-token statistics of ``hidden @ weight.T (+ bias)``, fp32 (fp64 for fp64 inputs),
    shaped like ``targets``, 0 at ignored positions."""

    logprob: Tensor  # log p(y_t), differentiable
    entropy: Optional[Tensor]  # H_t (None unless entropy=True), differentiable
    lse: Tensor  # LSE(z_t / T), differentiable


class LinearLossOutput(NamedTuple):
    loss: Tensor
    # Detached, shaped like targets: ReMiT w_t; Rho-1 the keep mask; NTP / KD the valid mask.
    weights: Tensor
    diagnostics: Optional[ReMiTDiagnostics]  # ReMiT only


# ------------------------------------------------------------------------- chunk kernels
#
# The per-chunk primitives, from the backend the dispatcher picked. Op backends (C++, Triton)
# give statistics and gradients straight from their registered ops, the gradient in place; the
# torch backend computes the same with the eager reference formulas.


class _OpsKernels:
    def __init__(self, backend: OpsBackend):
        self.ops = backend.ops

    def logprob(self, z, y, ii):
        lse, a = self.ops.token_stats(z, y, None, ii, 1.0, False, 0, False)[:2]
        return lse, a

    def stats(self, z, y, ii, temperature, with_entropy):
        lse, a, ent = self.ops.token_stats(z, y, None, ii, temperature, with_entropy, 0,
                                           False)[:3]
        return lse, a, ent

    def ce_grad_(self, z, y, lse, a, coef, ii):
        self.ops.weighted_ce_bwd_(z, y, lse, a, coef, ii)
        return z

    def kd(self, z, tz, y, ii, temperature):
        return self.ops.kd_loss_fwd(z, tz, y, ii, temperature)

    def kd_grad(self, z, tz, y, lse, tlse, coef, ii, temperature):
        return self.ops.kd_loss_bwd(z, tz, y, lse, tlse, coef, ii, temperature)


class _TorchKernels:
    def logprob(self, z, y, ii):
        lse, a, _ = ref.token_stats_ref(z, y, ignore_index=ii, entropy=False)
        return lse, a

    def stats(self, z, y, ii, temperature, with_entropy):
        return ref.token_stats_ref(z, y, ignore_index=ii, temperature=temperature,
                                   entropy=with_entropy)

    def ce_grad_(self, z, y, lse, a, coef, ii):
        # d(-coef * a)/dz = coef * (softmax(z) - onehot(y)), masked at invalid rows.
        return z.copy_(_token_stats_input_grad(z, y, lse, None, None, -coef, None, 1.0, ii))

    def kd(self, z, tz, y, ii, temperature):
        loss = ref.kd_loss_ref(z, tz, y, temperature=temperature, ignore_index=ii,
                               reduction="none")
        return loss, None, None

    def kd_grad(self, z, tz, y, lse, tlse, coef, ii, temperature):
        dt = acc_dtype(z.dtype)
        p = torch.softmax(z.to(dt) / temperature, dim=-1)
        q = torch.softmax(tz.to(dt) / temperature, dim=-1)
        scale = torch.where(y != ii, coef / temperature, 0).unsqueeze(-1)
        return ((p - q) * scale).to(z.dtype)


def _kernels(backend_name: str):
    backend = BACKENDS[backend_name]
    return _OpsKernels(backend) if isinstance(backend, OpsBackend) else _TorchKernels()


# ------------------------------------------------------------------------------- planning


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
    if method == "kd":
        per_elem += dtype.itemsize
    if backend == "torch":
        per_elem += 3 * acc_dtype(dtype).itemsize
    rows = memory_budget // max(vocab * per_elem, 1)
    return int(max(1, min(rows, n_tokens)))


def _head_logits(h: Tensor, w: Tensor, b: Optional[Tensor], s: int, e: int) -> Tensor:
    """The logits of rows [s, e): ``h[s:e] @ w.T (+ b)``, one [C, V] buffer."""
    if b is None:
        return h[s:e] @ w.T
    return torch.addmm(b, h[s:e], w.T)


def _chunk_stats(k, h, w, b, y, s, e, ii, temperature, with_entropy):
    """(lse, logprob, entropy) of rows [s, e) of ``h @ w.T (+ b)``: the chunk step of the
    token-statistics primitive, shared by ``linear_token_stats`` and the frozen scorer of
    ``remit_linear_loss``. The chunk's logits are freed on return."""
    return k.stats(_head_logits(h, w, b, s, e), y[s:e], ii, temperature, with_entropy)


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


# --------------------------------------------------------------------------------- engine


class _Engine:
    """One call's inputs (flattened) and the per-chunk steps shared by all schedules."""

    def __init__(self, hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                 method, ignore_index, temperature, chunk_size, backend):
        self.h, self.w, self.y, self.b = hidden, weight, targets, bias
        self.sh, self.sw, self.sb = scorer_hidden, scorer_weight, scorer_bias
        self.method, self.ii, self.temperature = method, ignore_index, temperature
        self.chunk, self.k = chunk_size, _kernels(backend)
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
        return z, *self.k.logprob(z, self.y[s:e], self.ii)

    def ce_grad_(self, z, s, e, lse, a, coef):
        """coef_t * (softmax(z_t) - onehot(y_t)) for rows [s, e), written into z's buffer."""
        return self.k.ce_grad_(z, self.y[s:e], lse, a, coef, self.ii)

    def kd_forward(self, s, e):
        """Policy and teacher logits of rows [s, e) and the per-token KD loss, lse, teacher lse."""
        z = self.logits(s, e)
        tz = self.scorer_logits(s, e).to(z.dtype)
        loss, lse, tlse = self.k.kd(z, tz, self.y[s:e], self.ii, self.temperature)
        return z, tz, loss, lse, tlse

    def kd_grad(self, z, tz, s, e, lse, tlse, coef):
        return self.k.kd_grad(z, tz, self.y[s:e], lse, tlse, coef, self.ii, self.temperature)


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
        self.h, self.w = h, w

    def add(self, g, s, e):
        if self.need_h:
            torch.mm(g, self.w, out=self.gh[s:e])
        if self.need_w:
            if self.gw.dtype == g.dtype:
                self.gw.addmm_(g.T, self.h[s:e])
            else:
                # The product comes out of the matmul in the input dtype (fp32 accumulation
                # inside it); summing chunks in fp32 keeps the rounding from compounding.
                self.gw.add_(g.T @ self.h[s:e])
        if self.need_b:
            self.gb.add_(g.sum(0, dtype=self.gb.dtype))

    def empty(self):
        return self.gh, self.gw, self.gb


def _offsets(row_len: int, n: int, cu_seqlens: Optional[Tensor], device) -> Tensor:
    if cu_seqlens is not None:
        return cu_seqlens.to(torch.long)
    return torch.arange(0, n + 1, row_len, device=device, dtype=torch.long)


def _host_bounds(n: int, row_len: int, cu_seqlens: Optional[Tensor]) -> list[int]:
    if cu_seqlens is not None:
        return [int(x) for x in cu_seqlens.tolist()]  # the one host sync (module docstring)
    return list(range(0, n + 1, row_len))


def _linear_loss_impl(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                      scorer_logprobs, cu_seqlens, row_len, method, ignore_index, eps,
                      keep_ratio, temperature, reduction, chunk_size, need_h, need_w, need_b,
                      w_fp32, backend, num_items=None):
    eng = _Engine(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                  method, ignore_index, temperature, chunk_size, backend)
    n, acc, ii, y = eng.n, eng.acc, ignore_index, targets
    impl = BACKENDS[backend]
    valid = y != ii
    n_valid = valid.sum()
    grads = _Grads(eng, need_h and reduction != "none", need_w and reduction != "none",
                   need_b and reduction != "none", w_fp32)
    with_grad = grads.need_h or grads.need_w or grads.need_b
    per_token = torch.zeros(n, dtype=acc, device=hidden.device)
    weights = valid.to(acc)
    diag = torch.zeros(6, dtype=acc, device=hidden.device)
    offsets = None
    if method == "remit":
        offsets = _offsets(row_len, n, cu_seqlens, hidden.device)

    def inv_norm(count):
        return _inv_norm(count, reduction, num_items, acc, y.device)

    aligned = None
    if method == "remit" and reduction != "none":
        aligned = _aligned_chunks(_host_bounds(n, row_len, cu_seqlens), chunk_size)
    fused = reduction != "none" and (method in ("ntp", "kd") or aligned is not None)

    count = n_valid
    scale = inv_norm(count)
    if fused and method == "kd":
        for s, e in _free_chunks(n, chunk_size):
            z, tz, loss, lse, tlse = eng.kd_forward(s, e)
            per_token[s:e] = loss
            if with_grad:
                coef = scale.expand(e - s).contiguous()
                grads.add(eng.kd_grad(z, tz, s, e, lse, tlse, coef), s, e)
            # Drop this chunk's buffers before the next chunk's matmul allocates its own
            # (otherwise the peak holds two chunks).
            del z, tz
    elif fused and method == "ntp":
        for s, e in _free_chunks(n, chunk_size):
            z, lse, a = eng.stats(s, e)
            per_token[s:e] = -a
            if with_grad:
                grads.add(eng.ce_grad_(z, s, e, lse, a, scale.expand(e - s).contiguous()), s, e)
            del z
    elif fused:  # remit, whole sequences per chunk
        a_all = torch.zeros(n, dtype=acc, device=y.device)
        b_all = torch.zeros(n, dtype=acc, device=y.device)
        for s, e, q0, q1 in aligned:
            if e == s:
                continue
            z, lse, a = eng.stats(s, e)
            b = (scorer_logprobs[s:e].to(acc) if scorer_logprobs is not None
                 else eng.frozen_logprob(s, e))
            local = offsets[q0:q1 + 1] - s
            w, _, _ = impl.remit_weights(a, b, y[s:e], local, ii, eps)
            a_all[s:e], b_all[s:e], weights[s:e] = a, b, w
            per_token[s:e] = -w * a
            if with_grad:
                grads.add(eng.ce_grad_(z, s, e, lse, a, w * scale), s, e)
            del z
        # The weights are already final; this O(N) call only gives batch-wide diagnostics.
        diag = impl.remit_weights(a_all, b_all, y, offsets, ii, eps)[2]
    else:
        # Statistics pass: a_t (and b_t, or the KD loss) for every token; logits dropped.
        a_all = torch.zeros(n, dtype=acc, device=y.device)
        b_all = None
        if method in ("remit", "rho1"):
            b_all = (scorer_logprobs.to(acc) if scorer_logprobs is not None
                     else torch.zeros(n, dtype=acc, device=y.device))
        for s, e in _free_chunks(n, chunk_size):
            if method == "kd":
                per_token[s:e] = eng.kd_forward(s, e)[2]
                continue
            a_all[s:e] = eng.stats(s, e)[2]
            if b_all is not None and scorer_logprobs is None:
                b_all[s:e] = eng.frozen_logprob(s, e)
        if method == "remit":
            weights, _, diag = impl.remit_weights(a_all, b_all, y, offsets, ii, eps)
        elif method == "rho1":
            weights = rho1_keep_mask(b_all - a_all, valid, float(keep_ratio)).to(acc)
            count = weights.sum()  # Rho-1 averages over the kept tokens
        if method != "kd":
            per_token = -weights * a_all
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
            return 1 / _nonzero(count)
        return 1 / _nonzero(num_items.to(dtype=acc))
    return 1 / count.clamp(min=1).to(acc)


def _nonzero(count: Tensor) -> Tensor:
    """count, with 0 replaced by 1: a batch with no counted token has loss 0, not NaN."""
    return torch.where(count == 0, torch.ones_like(count), count)


def _grad_pass(eng: _Engine, grads: _Grads, coef: Tensor) -> None:
    """Recompute each chunk's logits and fold coef_t * d(loss_t)/d(logits_t) into the grads."""
    for s, e in _free_chunks(eng.n, eng.chunk):
        if eng.method == "kd":
            z, tz, _, lse, tlse = eng.kd_forward(s, e)
            g = eng.kd_grad(z, tz, s, e, lse, tlse, coef[s:e])
        else:
            z, lse, a = eng.stats(s, e)
            g = eng.ce_grad_(z, s, e, lse, a, coef[s:e])
        grads.add(g, s, e)
        del z, g


# ----------------------------------------------------------------------- registered ops

_LOSS_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor? scorer_hidden, "
    "Tensor? scorer_weight, Tensor? scorer_bias, Tensor? scorer_logprobs, Tensor? cu_seqlens, "
    "int row_len, str method, int ignore_index, float eps, float keep_ratio, float temperature, "
    "str reduction, int chunk_size, bool need_grad_hidden, bool need_grad_weight, "
    "bool need_grad_bias, bool grad_weight_fp32, str backend, Tensor? num_items=None) -> "
    "(Tensor loss, Tensor weights, Tensor diagnostics, Tensor grad_hidden, Tensor grad_weight, "
    "Tensor grad_bias)")
_GRAD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor? scorer_hidden, "
    "Tensor? scorer_weight, Tensor? scorer_bias, Tensor coef, str method, int ignore_index, "
    "float temperature, int chunk_size, bool need_grad_hidden, bool need_grad_weight, "
    "bool need_grad_bias, bool grad_weight_fp32, str backend) -> "
    "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)")


@torch.library.custom_op(f"{NAMESPACE}::linear_loss", mutates_args=(), schema=_LOSS_SCHEMA)
def _linear_loss_op(*args):
    return _linear_loss_impl(*args)


@torch.library.custom_op(f"{NAMESPACE}::linear_loss_grad", mutates_args=(), schema=_GRAD_SCHEMA)
def _linear_loss_grad_op(hidden, weight, targets, bias, scorer_hidden, scorer_weight,
                         scorer_bias, coef, method, ignore_index, temperature, chunk_size,
                         need_h, need_w, need_b, w_fp32, backend):
    eng = _Engine(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                  method, ignore_index, temperature, chunk_size, backend)
    grads = _Grads(eng, need_h, need_w, need_b, w_fp32)
    _grad_pass(eng, grads, coef.to(eng.acc))
    return grads.empty()


def _grads_fake(hidden, weight, need_h, need_w, need_b, w_fp32):
    wdt = torch.float32 if (w_fp32 and weight.dtype != torch.float64) else weight.dtype
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=wdt) if need_w else weight.new_empty(0),
            weight.new_empty(weight.shape[0], dtype=wdt) if need_b else weight.new_empty(0))


@_linear_loss_op.register_fake
def _(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias, scorer_logprobs,
      cu_seqlens, row_len, method, ignore_index, eps, keep_ratio, temperature, reduction,
      chunk_size, need_h, need_w, need_b, w_fp32, backend, num_items=None):
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    none = reduction == "none"
    loss = hidden.new_empty((n,) if none else (), dtype=acc)
    grads = _grads_fake(hidden, weight, need_h and not none, need_w and not none,
                        need_b and not none, w_fp32)
    return (loss, hidden.new_empty(n, dtype=acc), hidden.new_empty(6, dtype=acc)) + grads


@_linear_loss_grad_op.register_fake
def _(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias, coef, method,
      ignore_index, temperature, chunk_size, need_h, need_w, need_b, w_fp32, backend):
    return _grads_fake(hidden, weight, need_h, need_w, need_b, w_fp32)


_LOSS_ARGS = ("hidden", "weight", "targets", "bias", "scorer_hidden", "scorer_weight",
              "scorer_bias", "scorer_logprobs", "cu_seqlens", "row_len", "method",
              "ignore_index", "eps", "keep_ratio", "temperature", "reduction", "chunk_size",
              "need_h", "need_w", "need_b", "w_fp32", "backend", "num_items")


def _setup(ctx, inputs, output):
    args = dict(zip(_LOSS_ARGS, inputs))
    _, weights, diag, gh, gw, gb = output
    ctx.mark_non_differentiable(weights, diag, gh, gw, gb)
    ctx.args = {k: v for k, v in args.items() if not isinstance(v, Tensor) or v is None}
    ctx.dtypes = (args["hidden"].dtype, args["weight"].dtype,
                  None if args["bias"] is None else args["bias"].dtype)
    if args["reduction"] == "none":
        ctx.save_for_backward(args["hidden"], args["weight"], args["targets"], args["bias"],
                              args["scorer_hidden"], args["scorer_weight"], args["scorer_bias"],
                              weights)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _backward(ctx, g_loss, *_unused):
    a = ctx.args
    h_dt, w_dt, b_dt = ctx.dtypes
    if a["reduction"] == "none":
        h, w, y, b, sh, sw, sb, weights = ctx.saved_tensors
        gh, gw, gb = _linear_loss_grad_op(
            h, w, y, b, sh, sw, sb, g_loss.to(weights.dtype) * weights, a["method"],
            a["ignore_index"], a["temperature"], a["chunk_size"], ctx.needs_input_grad[0],
            ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[3], a["w_fp32"],
            a["backend"])
        g = None
    else:
        gh, gw, gb = ctx.saved_tensors
        g = g_loss
    out = [None] * len(_LOSS_ARGS)
    for i, grad, dt in ((0, gh, h_dt), (1, gw, w_dt), (3, gb, b_dt)):
        if dt is not None and ctx.needs_input_grad[i] and grad.numel():
            out[i] = _scaled(grad, g, dt)
    return tuple(out)


def _scaled(grad: Tensor, g: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """g * grad rounded once to dtype; the out= form skips an fp32 temporary of grad's size
    (2 GiB for a 128k x 4096 head)."""
    if g is None:
        return grad.to(dtype)
    return torch.mul(grad, g.to(grad.dtype), out=torch.empty_like(grad, dtype=dtype))


_linear_loss_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------- the token-statistics primitive
#
# linear_token_stats: hidden states + LM head -> per-token (logprob, entropy, lse), never
# holding [N, V]. Forward: one chunk of logits at a time through the backend's token_stats op.
# Backward: recompute each chunk's logits, form d(sum_t g_t . stats_t)/d logits for the
# incoming per-token cotangents in that chunk's buffer, and fold it into grad_hidden,
# grad_W (fp32) and grad_bias, exactly like the loss engine's gradient pass.

_STATS_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
    "float temperature, bool with_entropy, int chunk_size, str backend) -> "
    "(Tensor logprob, Tensor entropy, Tensor lse)")
_STATS_GRAD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor logprob, Tensor lse, "
    "Tensor entropy, Tensor? grad_logprob, Tensor? grad_entropy, Tensor? grad_lse, "
    "int ignore_index, float temperature, int chunk_size, bool need_grad_hidden, "
    "bool need_grad_weight, bool need_grad_bias, str backend) -> "
    "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)")


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


def _token_stats_fwd(hidden, weight, targets, bias, ignore_index, temperature, with_entropy,
                     chunk_size, backend):
    k = _kernels(backend)
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


def _stats_logits_grad(z: Tensor, y: Tensor, logprob: Tensor, lse: Tensor,
                       entropy: Optional[Tensor], g_lp: Optional[Tensor],
                       g_ent: Optional[Tensor], g_lse: Optional[Tensor], temperature: float,
                       ignore_index: int) -> Tensor:
    """d(sum_t g_lp a_t + g_ent H_t + g_lse lse_t) / dz for one chunk, in z's dtype.

    With x = z / T, p = softmax(x), a = log p_y, H = -sum p log p:
    d lse/dx = p, d a/dx = onehot(y) - p, d H/dx = -p (log p + H), so
    dx = p * (alpha - g_ent log p) + g_lp onehot(y),  alpha = g_lse - g_lp - g_ent H,  dz = dx / T.
    The target column is formed from a (``expm1``) rather than from a rounded p (METHODS.md
    section 5). Works in two fp32 [C, V] buffers; the first (log p) receives the gradient.
    """
    dt = lse.dtype
    valid = y != ignore_index
    zero = torch.zeros_like(lse)
    g_lp = zero if g_lp is None else g_lp.to(dt)
    base = zero if g_lse is None else g_lse.to(dt)  # alpha + g_lp
    if g_ent is not None:
        g_ent = g_ent.to(dt)
        base = base - g_ent * entropy
    alpha = base - g_lp
    logp = z.to(dt)  # z itself when it is already fp32: the chunk buffer is ours to overwrite
    if temperature != 1.0:
        logp.div_(temperature)
    logp.sub_(lse.unsqueeze(-1))
    p = logp.exp()
    if g_ent is not None:
        grad = logp.mul_(-g_ent.unsqueeze(-1)).add_(alpha.unsqueeze(-1)).mul_(p)
        # p = 0 (a -inf logit or an underflow): 0, not 0 * inf. NaN (NaN input) stays NaN.
        grad.masked_fill_(p == 0, 0)
    else:
        grad = torch.mul(p, alpha.unsqueeze(-1), out=logp)
    del p
    # Target column: p_y (alpha - g_ent a) + g_lp = p_y base - g_lp expm1(a) - g_ent p_y a.
    a = torch.where(valid, logprob.to(dt), zero)
    p_y = a.exp()
    col = p_y * base - g_lp * torch.expm1(a)
    if g_ent is not None:
        col = col - g_ent * torch.where(p_y == 0, zero, p_y * a)
    # A target outside [0, V) (value checks off, or skipped under torch.compile): no one-hot,
    # as in the kernels' backward, and no out-of-bounds index (its forward log-prob is NaN).
    hit = valid & (y >= 0) & (y < grad.shape[-1])
    idx = torch.where(hit, y, 0).long().unsqueeze(-1)
    col = torch.where(hit, col, grad.gather(-1, idx).squeeze(-1))
    grad.scatter_(-1, idx, col.unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    grad.masked_fill_(~valid.unsqueeze(-1), 0)
    return grad.to(z.dtype)


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
    fast = (isinstance(eng.k, _OpsKernels) and temperature == 1.0 and g_ent is None
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
            g = _stats_logits_grad(z, y_slow[s:e], logprob[s:e], lse[s:e],
                                   None if g_ent is None else entropy[s:e],
                                   None if g_lp is None else g_lp[s:e],
                                   None if g_ent is None else g_ent[s:e],
                                   None if g_lse is None else g_lse[s:e], temperature,
                                   ignore_index)
        grads.add(g, s, e)
        del z, g
    return grads.empty()


@torch.library.custom_op(f"{NAMESPACE}::linear_token_stats", mutates_args=(),
                         schema=_STATS_SCHEMA)
def _linear_token_stats_op(hidden, weight, targets, bias, ignore_index, temperature,
                           with_entropy, chunk_size, backend):
    return _token_stats_fwd(hidden, weight, targets, bias, ignore_index, temperature,
                            with_entropy, chunk_size, backend)


@torch.library.custom_op(f"{NAMESPACE}::linear_token_stats_grad", mutates_args=(),
                         schema=_STATS_GRAD_SCHEMA)
def _linear_token_stats_grad_op(hidden, weight, targets, bias, logprob, lse, entropy, g_lp,
                                g_ent, g_lse, ignore_index, temperature, chunk_size, need_h,
                                need_w, need_b, backend):
    return _token_stats_bwd(hidden, weight, targets, bias, logprob, lse, entropy, g_lp, g_ent,
                            g_lse, ignore_index, temperature, chunk_size, need_h, need_w,
                            need_b, backend)


@_linear_token_stats_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, temperature, with_entropy, chunk_size,
      backend):
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n if with_entropy else 0, dtype=acc),
            hidden.new_empty(n, dtype=acc))


@_linear_token_stats_grad_op.register_fake
def _(hidden, weight, targets, bias, logprob, lse, entropy, g_lp, g_ent, g_lse, ignore_index,
      temperature, chunk_size, need_h, need_w, need_b, backend):
    return _grads_fake(hidden, weight, need_h, need_w, need_b, True)


def _stats_setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, temperature, _, chunk_size, backend = inputs
    logprob, entropy, lse = output
    # Outputs the caller does not differentiate come back as None, not as zeros, so the
    # backward skips their terms (the fast path needs log-prob cotangents alone).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, targets, bias, logprob, lse, entropy)
    ctx.cfg = (ignore_index, temperature, chunk_size, backend)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)


def _stats_backward(ctx, g_lp, g_ent, g_lse):
    hidden, weight, targets, bias, logprob, lse, entropy = ctx.saved_tensors
    ignore_index, temperature, chunk_size, backend = ctx.cfg
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3])
    if entropy.numel() == 0:
        g_ent = None
    out = [None] * 9
    if not any(need) or (g_lp is None and g_ent is None and g_lse is None):
        return tuple(out)
    grads = _linear_token_stats_grad_op(hidden, weight, targets, bias, logprob, lse, entropy,
                                        g_lp, g_ent, g_lse, ignore_index, temperature,
                                        chunk_size, *need, backend)
    for i, grad, dt, needed in zip((0, 1, 3), grads, ctx.dtypes, need):
        if needed:
            out[i] = grad.to(dt)
    return tuple(out)


_linear_token_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup)


# ----------------------------------------------------------------------------- public API


@torch.compiler.assume_constant_result
def _traced_backend(op: str, backend: str, device: str) -> str:
    """The dispatcher's choice while torch.compile traces: run eagerly once and baked into the
    graph as a constant (the dispatcher reads files and environment variables dynamo cannot
    trace). It looks only at the device, which is all the choice depends on here."""
    return select_backend(op, backend, (torch.empty(0, device=device),)).name


def _check_head(hidden, weight, weight_name: str) -> int:
    """hidden [..., D] and an LM head [V, D] of its dtype and device; returns V."""
    chk.check_logits(hidden, "hidden")
    chk._tensor(weight, weight_name)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{weight_name}: expected shape [V, {hidden.shape[-1]}] (V >= 1, D of "
                         f"hidden), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name}: expected the dtype of hidden {hidden.dtype}, "
                        f"got {weight.dtype}")
    chk.check_same_device(hidden, weight, weight_name)
    return weight.shape[0]


def _check_chunking(chunk_size, memory_budget) -> None:
    for name, val in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {val!r}")


def _check_inputs(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                  scorer_logprobs, method):
    vocab = _check_head(hidden, weight, "lm_head_weight")
    chk._tensor(targets, "targets")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden without "
                         f"the hidden dim), got {tuple(targets.shape)}")
    for t, name, like in ((bias, "bias", weight), (scorer_bias, "scorer_bias", scorer_weight)):
        if t is None:
            continue
        chk._tensor(t, name)
        if like is None:
            raise ValueError(f"{name}: expected None without scorer_weight, got a tensor")
        if t.shape != (vocab,) or t.dtype != like.dtype:
            raise ValueError(f"{name}: expected shape ({vocab},) and dtype {like.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}")
        chk.check_same_device(hidden, t, name)
    if (scorer_hidden is None) != (scorer_weight is None):
        raise ValueError("scorer_hidden, scorer_weight: expected both or neither, got "
                         f"{'scorer_hidden' if scorer_weight is None else 'scorer_weight'} only")
    if scorer_hidden is not None:
        chk.check_logits(scorer_hidden, "scorer_hidden")
        if scorer_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"scorer_hidden: expected shape {tuple(hidden.shape[:-1])} + "
                             f"[D_scorer], got {tuple(scorer_hidden.shape)}")
        chk._tensor(scorer_weight, "scorer_weight")
        ds = scorer_hidden.shape[-1]
        if scorer_weight.shape != (vocab, ds) or scorer_weight.dtype != scorer_hidden.dtype:
            raise ValueError(f"scorer_weight: expected shape ({vocab}, {ds}) and dtype "
                             f"{scorer_hidden.dtype} (like scorer_hidden, V of lm_head_weight), "
                             f"got {tuple(scorer_weight.shape)} {scorer_weight.dtype}")
        chk.check_same_device(hidden, scorer_hidden, "scorer_hidden")
        chk.check_same_device(hidden, scorer_weight, "scorer_weight")
    if scorer_logprobs is not None:
        chk.check_per_token(scorer_logprobs, targets, "scorer_logprobs")
    has_model = scorer_hidden is not None
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method in ("remit", "rho1"):
        chk.check_exactly_one(scorer_hidden, scorer_logprobs, "scorer_hidden (+ scorer_weight)",
                              "scorer_logprobs", f"remit_linear_loss(method={method!r})")
    elif method == "kd" and (not has_model or scorer_logprobs is not None):
        raise ValueError("scorer_hidden: method='kd' needs the teacher's full distribution: "
                         "expected scorer_hidden and scorer_weight (and no scorer_logprobs), got "
                         f"{'scorer_logprobs' if scorer_logprobs is not None else 'neither'}")
    elif method == "ntp" and (has_model or scorer_logprobs is not None):
        raise ValueError("scorer_hidden: method='ntp' uses no scorer: expected no scorer_hidden, "
                         "scorer_weight or scorer_logprobs, got one")
    return vocab


def _tp_linear_loss(h, w, y, bias, sh, sw, s_bias, sb, targets, cu_seqlens, method,
                    ignore_index, eps, keep_ratio, temperature, reduction, num_items, chunk_size,
                    memory_budget, w_fp32, return_details, impl, tp):
    """``remit_linear_loss`` over a vocab-sharded head (``remit_ext.parallel``): inputs flat,
    local and checked. The chunk sizes are planned for this rank's vocab rows."""
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
    loss, weights, diag = _parallel.vocab_parallel_linear_loss(
        h, w, y, bias, sh, sw, s_bias, sb, offsets, method, ignore_index, eps,
        float(keep_ratio), temperature, reduction, num_items, chunk, s_chunk, w_fp32, impl, tp)
    return _loss_output(loss, weights, diag, targets, method, reduction, return_details)


@torch.compiler.disable
def _vocab_parallel(fn, weight_name: str, args: dict):
    """``fn`` (``_remit_linear_loss`` or ``_linear_token_stats``) on this rank's local shards
    of the heads. Eager: ``torch.compile`` graph-breaks here (process groups, DTensors and
    collectives inside an autograd.Function)."""
    keys = ("hidden", weight_name, "bias", "scorer_hidden", "scorer_weight", "scorer_bias")
    inputs, tp = _parallel.unshard_linear(*(args.get(k) for k in keys), args["tp_group"],
                                          weight_name)
    local = dict(args, **{k: v for k, v in zip(keys, inputs) if k in args})
    try:
        return fn(**local, tp=tp)
    except (ValueError, TypeError):
        # Refused before the handshake (a local check): the peers must not wait for us.
        tp.refuse(inputs[0].device)
        raise


def _fsdp_module(weight_name: str):
    """``remit_ext.fsdp``: the FSDP2 / ZeRO-3 sharded-head path (DTensor parameters, plain
    activations). Imported on first use; a missing module is a NotImplementedError, not an
    ImportError from deep inside a training step."""
    try:
        fsdp = importlib.import_module(f"{__package__}.fsdp")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.fsdp":
            raise
        raise NotImplementedError(
            f"{weight_name}: a DTensor weight with a plain-tensor hidden (the FSDP2 / ZeRO-3 "
            "layout) needs remit_ext.fsdp, which this build does not have; pass "
            "weight.full_tensor() or a tensor-parallel tp_group=") from None
    return fsdp



def _loss_output(loss, weights, diag, targets, method, reduction, return_details):
    """The public return value of ``remit_linear_loss``: the loss (per token in ``targets``'
    shape for ``reduction="none"``), or with ``return_details`` a ``LinearLossOutput``."""
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    if not return_details:
        return loss
    return LinearLossOutput(loss, weights.reshape(targets.shape),
                            ReMiTDiagnostics.from_tensor(diag) if method == "remit" else None)

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
    on CUDA, 256 MiB on CPU). Returns the loss, or with ``return_details=True`` a
    ``LinearLossOutput(loss, weights, diagnostics)``.

    For ReMiT and Rho-1 a live scorer's log-probs come from ``linear_token_stats`` under
    ``no_grad`` (the same primitive, its own chunks), then enter like ``scorer_logprobs``.
    ``num_items_in_batch`` (an int > 0 or a 0-d tensor, no host sync; ``reduction="mean"``
    only) replaces the local count (valid tokens; Rho-1: kept tokens) as the divisor, so that
    gradient accumulation matches one big batch (data parallel: see ``remit_ext.functional``,
    DDP averages over ranks).

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
        return _fsdp_module("lm_head_weight").remit_linear_loss(
            hidden=hidden, lm_head_weight=lm_head_weight, targets=targets, bias=bias,
            scorer_hidden=scorer_hidden, scorer_weight=scorer_weight, scorer_bias=scorer_bias,
            scorer_logprobs=scorer_logprobs, method=method, cu_seqlens=cu_seqlens,
            ignore_index=ignore_index, eps=eps, keep_ratio=keep_ratio, temperature=temperature,
            reduction=reduction, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
            memory_budget=memory_budget, grad_weight_fp32=grad_weight_fp32,
            return_details=return_details, backend=backend)
    if tp_group is not None or chk.is_dtensor(lm_head_weight) or chk.is_dtensor(hidden):
        return _vocab_parallel(_remit_linear_loss, "lm_head_weight", args)
    if chk.is_dtensor(scorer_hidden):
        # Else DTensor's "mixed torch.Tensor and DTensor" error from inside the op.
        raise ValueError("scorer_hidden: a DTensor with plain hidden and plain heads (no "
                         "tp_group): expected a plain tensor like hidden (scorer_hidden."
                         "full_tensor() or .to_local()), or DTensor heads / tp_group=")
    return _remit_linear_loss(**args, tp=None)


def _remit_linear_loss(hidden, lm_head_weight, targets, *, bias, scorer_hidden, scorer_weight,
                       scorer_bias, scorer_logprobs, method, cu_seqlens, ignore_index, eps,
                       keep_ratio, temperature, reduction, num_items_in_batch, chunk_size,
                       memory_budget, grad_weight_fp32, return_details, backend, tp_group, tp):
    """remit_linear_loss on plain tensors; ``tp``: None, or the ``parallel.TPHead`` of a call
    on this rank's shards of the heads."""
    vocab = _check_inputs(hidden, lm_head_weight, targets, bias, scorer_hidden, scorer_weight,
                          scorer_bias, scorer_logprobs, method)
    eps = chk.check_eps(eps)
    chk.check_reduction(reduction)
    temperature = chk.check_positive(temperature, "temperature")
    if method != "kd" and temperature != 1.0:
        raise ValueError(f"temperature: only method='kd' takes a temperature, got {temperature} "
                         f"with method={method!r}")
    if not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep_ratio!r}")
    _check_chunking(chunk_size, memory_budget)
    num_items = chk.check_num_items(num_items_in_batch, reduction, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    n = y.numel()
    if tp is None:
        # Values of targets are checked against V through a zero-stride stand-in for the logits.
        chk.check_targets(y, h.new_empty(()).expand(n, vocab), ignore_index)
    else:  # global ids: their range is checked against the shards together
        chk.check_positions(targets, hidden, "targets")
    chk.check_cu_seqlens(cu_seqlens, n, h.device)
    op = "kd_loss" if method == "kd" else "remit_loss"
    if torch.compiler.is_compiling():
        impl = BACKENDS[_traced_backend(op, backend, str(h.device))]
    else:
        impl = select_backend(op, backend, (hidden, targets, scorer_hidden, scorer_logprobs))
    sh = None if scorer_hidden is None else scorer_hidden.reshape(n, -1).detach()
    sw = None if scorer_weight is None else scorer_weight.detach()
    s_bias = None if scorer_bias is None else scorer_bias.detach()
    sb = None if scorer_logprobs is None else scorer_logprobs.reshape(-1).detach()
    if tp is not None:
        return _tp_linear_loss(h, lm_head_weight, y, bias, sh, sw, s_bias, sb, targets,
                               cu_seqlens, method, ignore_index, eps, keep_ratio, temperature,
                               reduction, num_items, chunk_size, memory_budget,
                               grad_weight_fp32, return_details, impl, tp)
    if sh is not None and method in ("remit", "rho1"):
        # The frozen scorer through the token-statistics primitive, forward only; the policy's
        # chunks then hold no scorer logits.
        s_chunk = chunk_size or stats_chunk_size(n, vocab, sh.dtype, backend=impl.name,
                                                 device_type=h.device.type,
                                                 memory_budget=memory_budget)
        with torch.no_grad():
            sb = _linear_token_stats_op(sh, sw, y, s_bias, ignore_index, 1.0, False, s_chunk,
                                        impl.name)[0]
        sh = sw = s_bias = None
    if num_items is not None:
        # A tensor on the loss's device for the op; torch.full from an int is a fill, not a
        # host-to-device copy.
        num_items = (torch.full((), num_items, dtype=ref.acc_dtype(h.dtype), device=h.device)
                     if isinstance(num_items, int) else num_items.detach())
    if chunk_size is None:
        chunk_size = linear_chunk_size(
            n, vocab, h.dtype, scorer_dtype=None if sh is None else sh.dtype, method=method,
            backend=impl.name, device_type=h.device.type, memory_budget=memory_budget)
    row_len = targets.shape[-1] if targets.dim() >= 2 else n
    grad_on = torch.is_grad_enabled()
    loss, weights, diag, *_ = _linear_loss_op(
        h, lm_head_weight, y, bias, sh, sw, s_bias, sb, cu_seqlens, max(row_len, 1), method,
        ignore_index, eps, float(keep_ratio), temperature, reduction, chunk_size,
        grad_on and hidden.requires_grad, grad_on and lm_head_weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, grad_weight_fp32, impl.name,
        num_items)
    return _loss_output(loss, weights, diag, targets, method, reduction, return_details)


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
    tp_group=None,
) -> LinearTokenStats:
    """Per-token log-prob (and entropy, and lse) of ``logits = hidden @ weight.T (+ bias)``,
    divided by ``temperature``, without holding the ``[N, V]`` logits: the composable primitive
    that a trainer writes its own loss on top of (GRPO/PPO, ReMiT, entropy bonuses; README).

    ``hidden`` is ``[..., D]``, ``weight`` ``[V, D]`` (its dtype), ``targets`` ``hidden``'s
    shape without ``D``. Returns ``LinearTokenStats(logprob, entropy, lse)`` shaped like
    ``targets``, 0 at positions whose target is ``ignore_index``; ``entropy`` is None unless
    ``entropy=True``.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` for any per-token cotangents on
    the three outputs: the backward recomputes each chunk's logits, forms their gradient in that
    chunk's buffer and folds it into grad_hidden, grad_weight (accumulated in fp32) and
    grad_bias. A head that does not require grad (a frozen scorer) costs no dW and no dW
    buffer. Chunks of ``chunk_size`` rows, or derived from ``memory_budget`` bytes (default
    2 GiB on CUDA, 256 MiB on CPU). One registered op,
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
        return _fsdp_module("weight").linear_token_stats(
            hidden=hidden, weight=weight, targets=targets, bias=bias, ignore_index=ignore_index,
            temperature=temperature, entropy=entropy, chunk_size=chunk_size,
            memory_budget=memory_budget, backend=backend)
    if tp_group is not None or chk.is_dtensor(weight) or chk.is_dtensor(hidden):
        return _vocab_parallel(_linear_token_stats, "weight", args)
    return _linear_token_stats(**args, tp=None)


def _linear_token_stats(hidden, weight, targets, *, bias, ignore_index, temperature, entropy,
                        chunk_size, memory_budget, backend, tp_group, tp) -> LinearTokenStats:
    """linear_token_stats on plain tensors; ``tp`` as in ``_remit_linear_loss``."""
    vocab = _check_head(hidden, weight, "weight")
    chk._tensor(targets, "targets")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden without "
                         f"the hidden dim), got {tuple(targets.shape)}")
    if bias is not None:
        chk._tensor(bias, "bias")
        if bias.shape != (vocab,) or bias.dtype != weight.dtype:
            raise ValueError(f"bias: expected shape ({vocab},) and dtype {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        chk.check_same_device(hidden, bias, "bias")
    temperature = chk.check_positive(temperature, "temperature")
    if not isinstance(entropy, bool):
        raise TypeError(f"entropy: expected a bool, got {type(entropy).__name__}")
    _check_chunking(chunk_size, memory_budget)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    n = y.numel()
    if tp is None:
        chk.check_targets(y, h.new_empty(()).expand(n, vocab), ignore_index)
    else:
        chk.check_positions(targets, hidden, "targets")
    if torch.compiler.is_compiling():
        impl = BACKENDS[_traced_backend("token_stats", backend, str(h.device))]
    else:
        impl = select_backend("token_stats", backend, (hidden, targets))
    if chunk_size is None:
        chunk_size = stats_chunk_size(n, vocab, h.dtype, backend=impl.name,
                                      device_type=h.device.type, memory_budget=memory_budget)
    if tp is not None:
        logprob, ent, lse = _parallel.vocab_parallel_linear_stats(
            h, weight, y, bias, tp, ignore_index, temperature, entropy, chunk_size, impl.name)
    else:
        logprob, ent, lse = _linear_token_stats_op(h, weight, y, bias, ignore_index,
                                                   temperature, entropy, chunk_size, impl.name)
    return LinearTokenStats(logprob.reshape(targets.shape),
                            ent.reshape(targets.shape) if entropy else None,
                            lse.reshape(targets.shape))
