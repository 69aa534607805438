"""The Python side of the registered ops of ``csrc/registration.cpp``: a fake (meta) kernel
for each op, giving ``torch.compile`` and ``opcheck`` the output shapes, and the autograd of each
differentiable op (setup + backward), registered on the op itself so that every backend (the C++
library, and the Triton namespace that mirrors its schemas) shares one backward; each backward
runs its own namespace's gradient kernels. Registered here on the C++ library's ops
``remit_ext::*`` (csrc/registration.cpp names this module as their fakes' home, and torch
checks that their ``register_fake`` calls come from it); ``triton/ops.py`` registers them on
``remit_ext_triton::*``. Each setup unpacks the op's inputs into names, as its schema spells them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._build import load_extension
from ._grads import token_stats_grad
from .reference import acc_dtype, segment_membership


def _vec(like: Tensor, n: int) -> Tensor:
    """A per-token output of n elements in the accumulation dtype of `like`."""
    return like.new_empty((n,), dtype=acc_dtype(like.dtype))


# ---------------------------------------------------------------------------- fakes


def _token_stats_fake(logits, targets, scorer_logits, ignore_index, temperature, with_entropy,
                      topk, topk_renormalize):
    n = logits.shape[0]
    has_scorer = scorer_logits is not None
    return (
        _vec(logits, n),
        _vec(logits, n),
        _vec(logits, n if with_entropy else 0),
        _vec(logits, n if topk > 0 else 0),
        _vec(logits, n if has_scorer else 0),
        _vec(logits, n if has_scorer else 0),
    )


def _token_stats_bwd_fake(logits, targets, lse, logprob, entropy, g_logprob, g_entropy, g_lse,
                          ignore_index, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _token_stats_bwd_inplace_fake(logits, targets, lse, logprob, entropy, g_logprob, g_entropy,
                                  g_lse, ignore_index, temperature):
    return None


def _remit_weights_fake(logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps):
    return torch.empty_like(logprob), torch.empty_like(logprob), logprob.new_empty((6,))


def _weighted_ce_fwd_fake(logits, targets, weights, ignore_index, inplace_backward):
    n = logits.shape[0]
    return _vec(logits, n), _vec(logits, n), _vec(logits, n)


def _weighted_ce_bwd_fake(logits, targets, lse, logprob, coef, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _weighted_ce_bwd_inplace_fake(logits, targets, lse, logprob, coef, ignore_index):
    return None


def _remit_loss_fake(
    logits, targets, scorer_logits, scorer_logprob, cu_seqlens, ignore_index, eps,
    detach_weights, inplace_backward,
):
    n = logits.shape[0]
    return tuple(_vec(logits, n) for _ in range(5)) + (_vec(logits, 6),)


def _pg_loss_fwd_fake(logits, actions, advantages, scale, old_logprob, ref_logprob, ignore_index,
                      clip_low, clip_high, kl_beta, inplace_backward):
    n = logits.shape[0]
    return tuple(_vec(logits, n) for _ in range(4))


def _kd_loss_fwd_fake(logits, teacher_logits, targets, ignore_index, temperature):
    n = logits.shape[0]
    return _vec(logits, n), _vec(logits, n), _vec(logits, n)


def _kd_loss_bwd_fake(logits, teacher_logits, targets, lse, teacher_lse, coef, ignore_index,
                      temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------- autograd
#
# Every logits gradient below has the form coef_t * (softmax(z_t) - onehot(y_t)), so the backward
# of each loss reduces to forming the per-token coefficient (O(N)) and one weighted_ce_bwd pass.


def _bump_version(t: Tensor) -> None:
    """Count an in-place write autograd did not see: every node that saved ``t`` (an upstream
    tanh / exp / sigmoid that saved its output, another loss on the same logits, this node on a
    second backward through a retained graph) then fails with autograd's "modified by an
    inplace operation" error instead of reading the gradient as logits. The custom op's
    ``Tensor(a!)`` schema alone does not bump the counter."""
    if torch.compiler.is_compiling():
        return  # traced: functionalisation handles the mutation
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(t)
    else:  # pragma: no cover  (torch without torch.autograd.graph.increment_version)
        torch._C._autograd._increment_version(t)


def _ce_grad(ops, logits: Tensor, targets: Tensor, lse: Tensor, logprob: Tensor, coef: Tensor,
             ignore_index: int, inplace: bool) -> Tensor:
    """One gradient pass with the backend's own weighted_ce_bwd (`ops` is its op namespace).
    In place, the logits' version counter is bumped after the write (_bump_version)."""
    if inplace:
        ops.weighted_ce_bwd_(logits, targets, lse, logprob, coef, ignore_index)
        _bump_version(logits)
        return logits
    return ops.weighted_ce_bwd(logits, targets, lse, logprob, coef, ignore_index)


def _token_stats_setup(ctx, inputs, output):
    (logits, targets, scorer_logits, ignore_index, temperature, _with_entropy, _topk,
     _topk_renormalize) = inputs
    lse, logprob, entropy, topk_entropy, scorer_lse, scorer_logprob = output
    ctx.save_for_backward(logits, targets, scorer_logits, lse, logprob, entropy, scorer_lse,
                          scorer_logprob)
    ctx.ignore_index, ctx.temperature = ignore_index, temperature
    ctx.mark_non_differentiable(topk_entropy)  # a token-difficulty score, not a training signal


def _stats_grad(ops, z, targets, logprob, lse, entropy, g_lp, g_ent, g_lse, temperature,
                ignore_index):
    """The gradient of token_stats' outputs through ``z``: the C++ kernel on CPU (one pass over
    the rows, csrc/cpu/rows.cpp), the torch formula elsewhere (the same one, ``_grads``)."""
    if z.device.type == "cpu" and ops is torch.ops.remit_ext:
        has_ent = g_ent is not None and entropy is not None and entropy.numel() == lse.numel()
        return ops.token_stats_bwd(z, targets, lse, logprob, entropy if has_ent else None, g_lp,
                                   g_ent if has_ent else None, g_lse, ignore_index, temperature)
    return token_stats_grad(z, targets, logprob, lse, entropy, g_lp, g_ent, g_lse, temperature,
                            ignore_index)


def _token_stats_backward(ctx, g_lse, g_logprob, g_entropy, g_topk_entropy, g_scorer_lse,
                          g_scorer_logprob):
    (logits, targets, scorer_logits, lse, logprob, entropy, scorer_lse,
     scorer_logprob) = ctx.saved_tensors
    grad = scorer_grad = None
    if ctx.needs_input_grad[0]:
        grad = _stats_grad(ctx.ops, logits, targets, logprob, lse, entropy, g_logprob,
                           g_entropy, g_lse, ctx.temperature, ctx.ignore_index)
    if scorer_logits is not None and ctx.needs_input_grad[2]:
        scorer_grad = _stats_grad(ctx.ops, scorer_logits, targets, scorer_logprob, scorer_lse,
                                  None, g_scorer_logprob, None, g_scorer_lse, ctx.temperature,
                                  ctx.ignore_index)
    return grad, None, scorer_grad, None, None, None, None, None


def _segment_centered(values: Tensor, valid: Tensor, cu_seqlens: Tensor) -> Tensor:
    """values_t - mean of values over the valid positions of t's sequence (0 where invalid)."""
    # Malformed offsets (validation "off"): an uncovered position counts nothing, as in the
    # forward (reference.segment_membership).
    valid, seg, num_seg = segment_membership(cu_seqlens, valid)
    zero = values.new_zeros(())
    kept = torch.where(valid, values, zero)
    total = values.new_zeros(num_seg).index_add(0, seg, kept)
    count = values.new_zeros(num_seg).index_add(0, seg, valid.to(values.dtype))
    return torch.where(valid, values - (total / count.clamp(min=1))[seg], zero)


def _weight_slope(delta_hat: Tensor, eps: float) -> Tensor:
    """w' = dw/d delta_hat = w (2 - w) / 2 inside the clip band, 0 where the clip binds."""
    raw = 1 + torch.tanh(delta_hat / 2)
    inside = (raw > 1 - eps) & (raw < 1 + eps)
    return torch.where(inside, raw * (2 - raw) / 2, 0)


def _remit_weights_setup(ctx, inputs, output):
    logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps = inputs
    _, delta_hat, _ = output
    ctx.save_for_backward(targets, cu_seqlens, delta_hat)
    ctx.ignore_index, ctx.eps = ignore_index, eps
    ctx.mark_non_differentiable(output[2])


def _remit_weights_backward(ctx, g_w, g_delta_hat, g_diag):
    # delta_hat_t = (b_t - a_t) - mu_s(t):  d delta_hat / d(b - a) is the centering projection.
    targets, cu_seqlens, delta_hat = ctx.saved_tensors
    valid = targets != ctx.ignore_index
    g = torch.zeros_like(delta_hat)
    if g_w is not None:
        g = g + g_w * _weight_slope(delta_hat, ctx.eps)
    if g_delta_hat is not None:
        g = g + g_delta_hat
    g_delta = _segment_centered(g, valid, cu_seqlens)
    return -g_delta, g_delta, None, None, None, None


def _weighted_ce_setup(ctx, inputs, output):
    logits, targets, weights, ignore_index, inplace_backward = inputs
    _, lse, logprob = output
    ctx.save_for_backward(logits, targets, weights, lse, logprob)
    ctx.ignore_index, ctx.inplace = ignore_index, inplace_backward
    ctx.mark_non_differentiable(lse, logprob)


def _weighted_ce_backward(ctx, g_loss, g_lse, g_logprob):
    logits, targets, weights, lse, logprob = ctx.saved_tensors
    grad = grad_w = None
    if ctx.needs_input_grad[0]:
        coef = g_loss
        if weights is not None:
            # Selected: a NaN/inf weight at an ignored position must not reach the kernel.
            coef = torch.where(targets != ctx.ignore_index, g_loss * weights.to(g_loss.dtype), 0)
        grad = _ce_grad(ctx.ops, logits, targets, lse, logprob, coef, ctx.ignore_index,
                        ctx.inplace)
    if weights is not None and ctx.needs_input_grad[2]:
        grad_w = (-logprob * g_loss).to(weights.dtype)
    return grad, None, grad_w, None, None


def _remit_loss_setup(ctx, inputs, output):
    (logits, targets, _scorer_logits, _scorer_logprob, cu_seqlens, ignore_index, eps,
     detach_weights, inplace_backward) = inputs
    _, w, logprob, lse, delta_hat, diag = output
    ctx.save_for_backward(logits, targets, cu_seqlens, w, logprob, lse, delta_hat)
    ctx.ignore_index, ctx.eps = ignore_index, eps
    ctx.detach, ctx.inplace = detach_weights, inplace_backward
    ctx.mark_non_differentiable(w, logprob, lse, delta_hat, diag)


def _remit_loss_backward(ctx, g_loss, *_unused):
    logits, targets, cu_seqlens, w, logprob, lse, delta_hat = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    coef = g_loss * w
    if not ctx.detach:
        # METHODS.md section 2, non-detached: coef_t = g_t w_t + g_t w'_t l_t - mean_s(g w' l)
        # with l = -a; the mean runs over the valid positions of t's sequence.
        valid = targets != ctx.ignore_index
        through_w = g_loss * _weight_slope(delta_hat, ctx.eps) * -logprob
        coef = coef + _segment_centered(through_w, valid, cu_seqlens)
    grad = _ce_grad(ctx.ops, logits, targets, lse, logprob, coef, ctx.ignore_index,
                    ctx.inplace)
    return (grad,) + (None,) * 8


def _pg_loss_setup(ctx, inputs, output):
    (logits, actions, _advantages, _scale, _old_logprob, _ref_logprob, ignore_index, _clip_low,
     _clip_high, _kl_beta, inplace_backward) = inputs
    _, lse, logprob, dlogprob = output
    ctx.save_for_backward(logits, actions, lse, logprob, dlogprob)
    ctx.ignore_index, ctx.inplace = ignore_index, inplace_backward
    ctx.mark_non_differentiable(lse, logprob, dlogprob)


def _pg_loss_backward(ctx, g_loss, *_unused):
    # d loss_t / dz = dlogprob_t * (onehot - p) = -dlogprob_t * (p - onehot).
    logits, actions, lse, logprob, dlogprob = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _ce_grad(ctx.ops, logits, actions, lse, logprob, -g_loss * dlogprob,
                        ctx.ignore_index, ctx.inplace)
    return (grad,) + (None,) * 10


def _kd_setup(ctx, inputs, output):
    logits, teacher_logits, targets, ignore_index, temperature = inputs
    _, lse, teacher_lse = output
    ctx.save_for_backward(logits, teacher_logits, targets, lse, teacher_lse)
    ctx.ignore_index, ctx.temperature = ignore_index, temperature
    ctx.mark_non_differentiable(lse, teacher_lse)


def _kd_backward(ctx, g_loss, *_unused):
    logits, teacher_logits, targets, lse, teacher_lse = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = ctx.ops.kd_loss_bwd(logits, teacher_logits, targets, lse, teacher_lse, g_loss,
                                   ctx.ignore_index, ctx.temperature)
    return grad, None, None, None, None


FAKES = {
    "token_stats": _token_stats_fake,
    "token_stats_bwd": _token_stats_bwd_fake,
    "token_stats_bwd_": _token_stats_bwd_inplace_fake,
    "remit_weights": _remit_weights_fake,
    "weighted_ce_fwd": _weighted_ce_fwd_fake,
    "weighted_ce_bwd": _weighted_ce_bwd_fake,
    "weighted_ce_bwd_": _weighted_ce_bwd_inplace_fake,
    "remit_loss": _remit_loss_fake,
    "kd_loss_fwd": _kd_loss_fwd_fake,
    "kd_loss_bwd": _kd_loss_bwd_fake,
    "pg_loss_fwd": _pg_loss_fwd_fake,
}

AUTOGRAD = {
    "token_stats": (_token_stats_setup, _token_stats_backward),
    "remit_weights": (_remit_weights_setup, _remit_weights_backward),
    "weighted_ce_fwd": (_weighted_ce_setup, _weighted_ce_backward),
    "remit_loss": (_remit_loss_setup, _remit_loss_backward),
    "kd_loss_fwd": (_kd_setup, _kd_backward),
    "pg_loss_fwd": (_pg_loss_setup, _pg_loss_backward),
}


def _setup_with_ops(setup, ops):
    def setup_context(ctx, inputs, output):
        ctx.ops = ops
        setup(ctx, inputs, output)

    return setup_context


def register_autograd(namespace: str, names) -> None:
    """Register the autograd above on the differentiable ops ``namespace::name``; each backward
    runs that namespace's own gradient kernels."""
    ops = getattr(torch.ops, namespace)
    for name in names:
        if name in AUTOGRAD:
            setup, backward = AUTOGRAD[name]
            torch.library.register_autograd(f"{namespace}::{name}", backward,
                                            setup_context=_setup_with_ops(setup, ops))


def register_fakes_autograd(namespace: str, names) -> None:
    """Register the fakes and the autograd above on ops ``namespace::name`` that share the
    schemas of csrc/registration.cpp, defined in Python (the Triton backend). The C++ library's
    own ops are registered below, at import."""
    for name in names:
        torch.library.register_fake(f"{namespace}::{name}")(FAKES[name])
    register_autograd(namespace, names)


# The C++ library's ops: loaded first (a no-op once remit_ext is imported), then given their
# fakes and autograd from this module, the one its impl_abstract_pystub names.
load_extension()
for _name, _fake in FAKES.items():
    torch.library.register_fake(f"remit_ext::{_name}")(_fake)
register_autograd("remit_ext", FAKES)
