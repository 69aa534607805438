"""Fused-linear losses: hidden states and LM heads in, loss and gradients out, no ``[N, V]``
logits held (METHODS.md sections 2-3, issue 5).

One engine serves four methods, picked by ``method=``: ``"remit"`` (ReMiT weights from a frozen
scorer), ``"ntp"`` (weights 1), ``"rho1"`` (Rho-1 top-k selection against a reference model)
and ``"kd"`` (distillation against a teacher's full distribution). The scorer / reference /
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
``linear_loss_grad``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks as chk
from . import reference as ref
from ._backends import OpsBackend, select_backend, BACKENDS
from ._meta import _token_stats_input_grad
from .reference import ReMiTDiagnostics, acc_dtype, rho1_keep_mask

__all__ = ["LinearLossOutput", "METHODS", "remit_linear_loss", "linear_chunk_size"]

METHODS = ("remit", "ntp", "rho1", "kd")
NAMESPACE = "remit_ext_linear"
# Default bytes for the chunk buffers (policy logits, scorer logits, backend temporaries). On a
# GPU 2 GiB holds 4096 rows of bf16 policy + scorer logits at V = 128k: whole 4k-token
# sequences per chunk (the one-pass schedule) and matmuls large enough to run at full rate.
DEFAULT_MEMORY_BUDGET = {"cuda": 2 << 30, "cpu": 256 << 20}


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
        if self.b is None:
            return self.h[s:e] @ self.w.T
        return torch.addmm(self.b, self.h[s:e], self.w.T)

    def scorer_logits(self, s, e):
        if self.sb is None:
            return self.sh[s:e] @ self.sw.T
        return torch.addmm(self.sb, self.sh[s:e], self.sw.T)

    def frozen_logprob(self, s, e):
        """b_t of the scorer / reference for rows [s, e); its logits are dropped at once."""
        _, b = self.k.logprob(self.scorer_logits(s, e), self.y[s:e], self.ii)
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
                      w_fp32, backend):
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
        """1 / the normaliser of the loss and of the gradient coefficients."""
        if reduction != "mean":
            return torch.ones((), dtype=acc, device=y.device)
        return 1 / count.clamp(min=1).to(acc)

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
    "bool need_grad_bias, bool grad_weight_fp32, str backend) -> "
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
      chunk_size, need_h, need_w, need_b, w_fp32, backend):
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
              "need_h", "need_w", "need_b", "w_fp32", "backend")


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


# ----------------------------------------------------------------------------- public API


@torch.compiler.assume_constant_result
def _traced_backend(op: str, backend: str, device: str) -> str:
    """The dispatcher's choice while torch.compile traces: run eagerly once and baked into the
    graph as a constant (the dispatcher reads files and environment variables dynamo cannot
    trace). It looks only at the device, which is all the choice depends on here."""
    return select_backend(op, backend, (torch.empty(0, device=device),)).name


def _check_inputs(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                  scorer_logprobs, method):
    chk.check_logits(hidden, "hidden")
    chk._tensor(weight, "lm_head_weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"lm_head_weight: expected shape [V, {hidden.shape[-1]}] (V >= 1, D of "
                         f"hidden), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight: expected the dtype of hidden {hidden.dtype}, "
                        f"got {weight.dtype}")
    chk.check_same_device(hidden, weight, "lm_head_weight")
    vocab = weight.shape[0]
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
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    grad_weight_fp32: bool = True,
    return_details: bool = False,
    backend: str = "auto",
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
    """
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
    for name, val in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {val!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    n = y.numel()
    # Values of targets are checked against V through a zero-stride stand-in for the logits.
    chk.check_targets(y, h.new_empty(()).expand(n, vocab), ignore_index)
    chk.check_cu_seqlens(cu_seqlens, n, h.device)
    op = "kd_loss" if method == "kd" else "remit_loss"
    if torch.compiler.is_compiling():
        impl = BACKENDS[_traced_backend(op, backend, str(h.device))]
    else:
        impl = select_backend(op, backend, (hidden, targets, scorer_hidden, scorer_logprobs))
    sh = None if scorer_hidden is None else scorer_hidden.reshape(n, -1)
    sb = None if scorer_logprobs is None else scorer_logprobs.reshape(-1).detach()
    if chunk_size is None:
        chunk_size = linear_chunk_size(
            n, vocab, h.dtype, scorer_dtype=None if sh is None else sh.dtype, method=method,
            backend=impl.name, device_type=h.device.type, memory_budget=memory_budget)
    row_len = targets.shape[-1] if targets.dim() >= 2 else n
    grad_on = torch.is_grad_enabled()
    loss, weights, diag, *_ = _linear_loss_op(
        h, lm_head_weight, y, bias,
        None if sh is None else sh.detach(),
        None if scorer_weight is None else scorer_weight.detach(),
        None if scorer_bias is None else scorer_bias.detach(),
        sb, cu_seqlens, max(row_len, 1), method, ignore_index, eps, float(keep_ratio),
        temperature, reduction, chunk_size, grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, grad_weight_fp32, impl.name)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    if not return_details:
        return loss
    return LinearLossOutput(loss, weights.reshape(targets.shape),
                            ReMiTDiagnostics.from_tensor(diag) if method == "remit" else None)
