"""The fused-linear registered ops, ``torch.ops.remit_ext_linear``: ``linear_loss`` (+
``linear_loss_grad``, the backward of ``reduction="none"``) and ``linear_token_stats`` (+
``linear_token_stats_grad``): schema, forward (the engine, ``_linear_engine``), fake and
autograd. Opaque to ``torch.compile``, so a compiled model traces through them without a
graph break."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._linear_engine import (_Engine, _Grads, _grad_pass, _linear_loss_impl, _token_stats_bwd,
                             _token_stats_fwd)
from .reference import acc_dtype

NAMESPACE = "remit_ext_linear"


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

