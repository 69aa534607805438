"""The fused-linear functions on plain tensors: argument checks, the dispatcher's choice
(also under ``torch.compile``), chunk sizes, then the registered ops (``_linear_ops``);
the output types. ``remit_ext.linear`` routes plain calls here, ``remit_ext.distributed.fsdp``
its gathered heads; a vocab-parallel call passes its ``TPHead``, which runs the sharded
engine on the checked inputs."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks as chk
from . import reference as ref
from ._backends import BACKENDS, select_backend
from ._linear_ops import _linear_loss_op, _linear_token_stats_op
from ._linear_plan import linear_chunk_size, stats_chunk_size
from ._methods import get_method, loss_options, method_names
from .reference import ReMiTDiagnostics

METHODS = method_names()


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



@torch.compiler.assume_constant_result
def _traced_backend(op: str, backend: str, device: str) -> str:
    """The dispatcher's choice while torch.compile traces: run eagerly once and baked into the
    graph as a constant (the dispatcher reads files and environment variables dynamo cannot
    trace). It looks only at the device, which is all the choice depends on here."""
    return select_backend(op, backend, (torch.empty(0, device=device),)).name


def _check_head(hidden, weight, weight_name: str, targets=None) -> int:
    """hidden [..., D] and an LM head [V, D] of its dtype and device; returns V. Devices: the
    odd one out is named (hidden, when the head and ``targets`` agree)."""
    chk.check_logits(hidden, "hidden")
    chk._tensor(weight, weight_name)
    if (weight.device != hidden.device and isinstance(targets, Tensor)
            and targets.device == weight.device):
        chk.check_same_device(weight, hidden, "hidden", like=f"{weight_name} and targets")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{weight_name}: expected shape [V, {hidden.shape[-1]}] (V >= 1, D of "
                         f"hidden), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name}: expected the dtype of hidden {hidden.dtype}, "
                        f"got {weight.dtype}")
    chk.check_same_device(hidden, weight, weight_name, like="hidden")
    return weight.shape[0]


def _in_chunk_dtype(chunk_dtype, hidden, weight, bias):
    """``(hidden, weight, bias)`` in ``chunk_dtype``, the dtype the head's GEMMs and the chunk
    logits are formed in: None keeps the inputs' own (bf16 inputs give bf16 logits, as the
    model's own ``lm_head`` does); ``torch.float32`` (or float64) from bf16 / fp16 inputs forms
    them in fp32 from an fp32 copy of the head (its cost: that copy, fp32 chunk buffers and
    fp32 GEMMs; docs/fused-linear.md measures it). The casts are differentiable: the
    gradients come back in the inputs' dtypes."""
    if chunk_dtype is None or chunk_dtype == hidden.dtype:
        return hidden, weight, bias
    if (not isinstance(chunk_dtype, torch.dtype) or chunk_dtype not in (torch.float32,
                                                                        torch.float64)
            or chunk_dtype.itemsize < hidden.dtype.itemsize):
        raise ValueError(f"chunk_dtype: expected None, torch.float32 or torch.float64 (no "
                         f"narrower than hidden's {hidden.dtype}), got {chunk_dtype!r}")
    return (hidden.to(chunk_dtype), weight.to(chunk_dtype),
            None if bias is None else bias.to(chunk_dtype))


def _check_chunking(chunk_size, memory_budget) -> None:
    for name, val in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {val!r}")


def _check_inputs(hidden, weight, targets, bias, scorer_hidden, scorer_weight, scorer_bias,
                  scorer_logprobs, method):
    vocab = _check_head(hidden, weight, "lm_head_weight", targets)
    chk._tensor(targets, "targets")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden without "
                         f"the hidden dim), got {tuple(targets.shape)}")
    # Before the per-token tensors are checked against targets (which would blame them).
    chk.check_same_device(hidden, targets, "targets", like="hidden")
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
    check_scorer_inputs(get_method(method), scorer_hidden is not None,
                        scorer_logprobs is not None)
    return vocab


def check_scorer_inputs(m, has_model: bool, has_logprobs: bool) -> None:
    """The frozen inputs a method reads (``Method.scorer``): exactly one of a model (hidden +
    head) or precomputed log-probs for "logprob", a model for "distribution", none for "none"."""
    if m.scorer == "logprob":
        chk.check_exactly_one(True if has_model else None, True if has_logprobs else None,
                              "scorer_hidden (+ scorer_weight)", "scorer_logprobs",
                              f"remit_linear_loss(method={m.name!r})")
    elif m.scorer == "distribution" and (not has_model or has_logprobs):
        raise ValueError(f"scorer_hidden: method={m.name!r} needs the teacher's full "
                         "distribution: expected scorer_hidden and scorer_weight (and no "
                         f"scorer_logprobs), got {'scorer_logprobs' if has_logprobs else 'neither'}")
    elif m.scorer == "none" and (has_model or has_logprobs):
        raise ValueError(f"scorer_hidden: method={m.name!r} uses no scorer: expected no "
                         "scorer_hidden, scorer_weight or scorer_logprobs, got one")



def _loss_output(loss, weights, diag, targets, method, reduction, return_details):
    """The public return value of ``remit_linear_loss``: the loss (per token in ``targets``'
    shape for ``reduction="none"``), or with ``return_details`` a ``LinearLossOutput``."""
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    if not return_details:
        return loss
    return LinearLossOutput(loss, weights.reshape(targets.shape),
                            ReMiTDiagnostics.from_tensor(diag)
                            if get_method(method).diagnostics else None)


def _remit_linear_loss(hidden, lm_head_weight, targets, *, bias=None, scorer_hidden=None,
                       scorer_weight=None, scorer_bias=None, scorer_logprobs=None,
                       method="remit", cu_seqlens=None, ignore_index=-100, eps=0.2,
                       keep_ratio=0.6, temperature=1.0, reduction="mean",
                       num_items_in_batch=None, chunk_size=None, memory_budget=None,
                       grad_weight_fp32=True, return_details=False, backend="auto",
                       chunk_dtype=None, tp_group=None, tp=None):
    """remit_linear_loss on plain tensors (the public defaults); ``tp``: None, or the
    ``distributed.vocab_parallel_linear.TPHead`` of a call on this rank's shards of the heads,
    whose ``linear_loss`` then runs the checked, flattened inputs (this module imports no
    distributed code)."""
    vocab = _check_inputs(hidden, lm_head_weight, targets, bias, scorer_hidden, scorer_weight,
                          scorer_bias, scorer_logprobs, method)
    opts = loss_options(method, ignore_index=ignore_index, eps=eps, keep_ratio=keep_ratio,
                        temperature=temperature)
    m = opts.method
    chk.check_reduction(reduction)
    _check_chunking(chunk_size, memory_budget)
    num_items = chk.check_num_items(num_items_in_batch, reduction, hidden.device)
    hidden, lm_head_weight, bias = _in_chunk_dtype(chunk_dtype, hidden, lm_head_weight, bias)
    if (scorer_hidden is not None and chunk_dtype is not None
            and scorer_hidden.dtype.itemsize < chunk_dtype.itemsize):
        # The frozen head's logits in the same dtype (its log-probs steer the weights).
        scorer_hidden, scorer_weight, scorer_bias = _in_chunk_dtype(
            chunk_dtype, scorer_hidden, scorer_weight, scorer_bias)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    n = y.numel()
    if tp is None:
        # Values of targets are checked against V through a zero-stride stand-in for the logits.
        chk.check_targets(y, h.new_empty(()).expand(n, vocab), ignore_index)
    else:  # global ids: their range is checked against the shards together
        chk.check_positions(targets, hidden, "targets")
    cu_seqlens = chk.check_cu_seqlens(cu_seqlens, n, h.device)
    if torch.compiler.is_compiling():
        impl = BACKENDS[_traced_backend(m.op, backend, str(h.device))]
    else:
        impl = select_backend(m.op, backend, (hidden, targets, scorer_hidden, scorer_logprobs))
    sh = None if scorer_hidden is None else scorer_hidden.reshape(n, -1).detach()
    sw = None if scorer_weight is None else scorer_weight.detach()
    s_bias = None if scorer_bias is None else scorer_bias.detach()
    sb = None if scorer_logprobs is None else scorer_logprobs.reshape(-1).detach()
    if tp is not None:
        return tp.linear_loss(h, lm_head_weight, y, bias, sh, sw, s_bias, sb, targets,
                              cu_seqlens, opts, reduction, num_items, chunk_size, memory_budget,
                              grad_weight_fp32, return_details, impl)
    if sh is not None and m.scorer == "logprob":
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
        h, lm_head_weight, y, bias, sh, sw, s_bias, sb, cu_seqlens, max(row_len, 1),
        *opts.schema_args(), reduction, chunk_size,
        grad_on and hidden.requires_grad, grad_on and lm_head_weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, grad_weight_fp32, impl.name,
        num_items)
    return _loss_output(loss, weights, diag, targets, method, reduction, return_details)



def _linear_token_stats(hidden, weight, targets, *, bias=None, ignore_index=-100,
                        temperature=1.0, entropy=False, chunk_size=None, memory_budget=None,
                        backend="auto", chunk_dtype=None, tp_group=None,
                        tp=None) -> LinearTokenStats:
    """linear_token_stats on plain tensors; ``tp`` as in ``_remit_linear_loss``."""
    vocab = _check_head(hidden, weight, "weight", targets)
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
    hidden, weight, bias = _in_chunk_dtype(chunk_dtype, hidden, weight, bias)
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
        logprob, ent, lse = tp.linear_stats(h, weight, y, bias, ignore_index, temperature,
                                            entropy, chunk_size, impl.name)
    else:
        logprob, ent, lse = _linear_token_stats_op(h, weight, y, bias, ignore_index,
                                                   temperature, entropy, chunk_size, impl.name)
    return LinearTokenStats(logprob.reshape(targets.shape),
                            ent.reshape(targets.shape) if entropy else None,
                            lse.reshape(targets.shape))
