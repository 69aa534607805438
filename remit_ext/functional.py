"""The public functional API.

Each function validates its arguments, flattens batch dims (logits ``[..., T, V]`` -> ``[N, V]``),
picks a backend through the one dispatcher, and reduces. Sequences for ReMiT's per-sequence
centering are, by default, the rows of the batch (the last dim of ``targets``, when it has two
or more dims) or, for 2-D logits ``[N, V]``, the whole input; packed documents are given by
``cu_seqlens`` offsets over the flattened positions.

Every loss takes ``num_items_in_batch``: an int in [0, 2**63), or a 0-d tensor (on the logits'
device or the CPU), that replaces the local count as the divisor of ``reduction="mean"``. Pass the count of the whole global batch (every micro-batch of
a gradient-accumulation step, every data-parallel rank) and the gradients summed over the
micro-batches equal those of one big batch: the Hugging Face ``num_items_in_batch`` convention.
DDP and FSDP average gradients over the W ranks, so with a count over all ranks multiply each
rank's loss by W (as the Hugging Face Trainer does) or pass the count divided by W.
A count of 0 (a global batch of padding only) gives a loss of 0 and a zero gradient, int or
tensor alike, whatever this call's own tokens. A negative count raises a ValueError (an int
always; a tensor where its value can be read without a device sync: a CPU tensor, or validation
"sync"); a negative accelerator tensor under "async" (or any under "off") is never read on the
host and makes the loss NaN. ``"sum"`` and ``"none"`` divide by nothing and refuse it.
``remit_ext.parallel.global_num_items(targets, group, per_rank=True)`` forms that count.

Distributed (``remit_ext.parallel``): ``tp_group=`` takes vocab-sharded logits (each rank a
contiguous shard in rank order, targets as global ids; or a DTensor sharded on the vocab dim)
and gives every rank the unsharded result; ``cp_group=`` (ReMiT) centres each sequence over the
slices the ranks of a context-parallel group hold; ``dp_group=`` (ReMiT) reduces the
diagnostics over data-parallel ranks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks as chk
from .distributed import context_parallel as _cp
from .distributed import data_parallel as _dp
from .distributed import vocab_parallel as _vp
from ._backends import select_backend
from .reference import ReMiTDiagnostics, pg_from_logprob_ref, reduce_tokens, rho1_keep_mask

__all__ = [
    "TokenStats",
    "ReMiTWeights",
    "ReMiTOutput",
    "token_stats",
    "remit_weights",
    "weighted_cross_entropy",
    "remit_loss",
    "rho1_loss",
    "kd_loss",
    "PolicyGradientOutput",
    "policy_gradient_loss",
]


class TokenStats(NamedTuple):
    """Per-position statistics, shaped like ``targets``; fields not requested are None."""

    lse: Tensor
    logprob: Tensor
    entropy: Optional[Tensor]
    topk_entropy: Optional[Tensor]
    scorer_lse: Optional[Tensor]
    scorer_logprob: Optional[Tensor]


class ReMiTWeights(NamedTuple):
    weights: Tensor
    delta_hat: Tensor
    diagnostics: ReMiTDiagnostics


class ReMiTOutput(NamedTuple):
    loss: Tensor
    weights: Tensor  # detached, shaped like targets, 0 at ignored positions
    diagnostics: ReMiTDiagnostics


class PolicyGradientOutput(NamedTuple):
    loss: Tensor
    logprobs: Tensor  # log pi(action_t), detached, shaped like actions, 0 at ignored positions
    clip_frac: Tensor  # fraction of valid tokens whose PPO clip is active (0 without old)


def _flat(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def _offsets(targets: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    """Sequence offsets over the flattened positions: the given cu_seqlens, the rows of a
    [..., T] target tensor, or one sequence of all positions."""
    n = targets.numel()
    if cu_seqlens is not None:
        return cu_seqlens
    if targets.dim() >= 2:
        t = targets.shape[-1]
        return torch.arange(n // t + 1, device=targets.device, dtype=torch.long) * t
    # [0, n] formed on the device: torch.tensor([0, n], device=cuda) would be a blocking
    # host-to-device copy, a host sync on every call with 1-D targets.
    return torch.arange(2, device=targets.device, dtype=torch.long) * n


def _shaped(per_token: Tensor, targets: Tensor, reduction: str) -> Tensor:
    return per_token.reshape(targets.shape) if reduction == "none" else per_token


def token_stats(
    logits: Tensor,
    targets: Tensor,
    *,
    scorer_logits: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    entropy: bool = False,
    topk: Optional[int] = None,
    topk_renormalize: bool = False,
    tp_group=None,
    backend: str = "auto",
) -> TokenStats:
    """Per-token statistics of ``logits / temperature`` (METHODS.md section 1).

    Returns lse, target log-prob, and on request the entropy and the top-``topk`` entropy (of the
    k largest probabilities, renormalised with ``topk_renormalize``), plus the scorer's lse and
    log-prob when ``scorer_logits`` is given (both models read in one call). Positions whose
    target is ``ignore_index`` get 0. lse, log-prob and entropy are differentiable w.r.t. the
    logits; the top-k entropy is returned detached (a token-difficulty score). The backward of
    the kernel backends reads the returned lse and log-prob (the target column is formed from
    the log-prob, METHODS.md section 5): modify them in place only after backward, or clone
    first (autograd raises if they were modified).

    ``tp_group``: ``logits`` (and ``scorer_logits``) are this rank's vocab shard (module
    docstring); every rank gets the statistics of the whole vocab. No top-k entropy then.
    """
    if tp_group is not None or chk.is_dtensor(logits):
        if topk is not None:
            raise ValueError(f"topk: the top-k entropy is not computed from vocab-sharded "
                             f"logits (tp_group), got topk={topk!r}")
        lse, logprob, ent, s_lse, s_logprob = _vp.vocab_parallel_token_stats(
            logits, targets, tp_group, scorer_logits=scorer_logits, ignore_index=ignore_index,
            temperature=temperature, entropy=entropy, backend=backend)

        def shape_tp(x):
            return None if x is None else x.reshape(targets.shape)

        return TokenStats(shape_tp(lse), shape_tp(logprob), shape_tp(ent), None,
                          shape_tp(s_lse), shape_tp(s_logprob))
    chk.check_logits(logits)
    chk.check_targets(targets, logits, ignore_index)
    if scorer_logits is not None:
        chk.check_like_logits(scorer_logits, logits, "scorer_logits")
    temperature = chk.check_positive(temperature, "temperature")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk: expected a positive int or None, got {topk!r}")
    impl = select_backend("token_stats", backend, (logits, targets, scorer_logits), topk=topk)
    z, y = _flat(logits, targets)
    sz = None if scorer_logits is None else scorer_logits.reshape(z.shape)
    lse, logprob, ent, topk_ent, s_lse, s_logprob = impl.token_stats(
        z, y, sz, ignore_index, temperature, entropy, topk or 0, topk_renormalize)

    def shape(x):
        return None if x is None else x.reshape(targets.shape)

    return TokenStats(shape(lse), shape(logprob), shape(ent), shape(topk_ent), shape(s_lse),
                      shape(s_logprob))


def remit_weights(
    logprobs: Tensor,
    scorer_logprobs: Tensor,
    targets: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    eps: float = 0.2,
    ignore_index: int = -100,
    detach: bool = True,
    cp_group=None,
    dp_group=None,
    backend: str = "auto",
) -> ReMiTWeights:
    """ReMiT token weights from policy and scorer log-probs (METHODS.md section 2, steps 3-5).

    ``w = clip(2 sigmoid(delta - mu_seq), 1 - eps, 1 + eps)`` with ``delta = scorer - policy``
    centred over each sequence's valid positions. ``detach=False`` keeps the gradient through
    the weights (a study option; ReMiT detaches).

    ``cp_group``: this rank holds a slice of every sequence (the same rows, or the same count
    of ``cu_seqlens`` documents, on every rank of the group); the centring uses the whole
    sequences and the diagnostics cover all slices. ``dp_group``: the diagnostics cover the
    batches of all its ranks (the weights stay per rank).
    """
    chk._tensor(targets, "targets")
    if isinstance(logprobs, Tensor) and isinstance(scorer_logprobs, Tensor):
        # Both log-prob tensors agree: the targets are the odd one out, name them.
        if logprobs.device == scorer_logprobs.device != targets.device:
            chk.check_same_device(logprobs, targets, "targets", like="logprobs")
        if logprobs.shape == scorer_logprobs.shape != targets.shape:
            raise ValueError(f"targets: expected shape {tuple(logprobs.shape)} (like logprobs "
                             f"and scorer_logprobs), got {tuple(targets.shape)}")
    ignore_index = chk.check_ignore_index(ignore_index)
    chk.check_per_token(logprobs, targets, "logprobs")
    chk.check_per_token(scorer_logprobs, targets, "scorer_logprobs")
    if targets.dtype not in chk.INDEX_DTYPES:
        raise TypeError(f"targets: expected dtype int64 or int32, got {targets.dtype}")
    if targets.numel() == 0:
        raise ValueError(f"targets: expected a non-empty tensor, got shape {tuple(targets.shape)}")
    eps = chk.check_eps(eps)
    cu_seqlens = chk.check_cu_seqlens(cu_seqlens, targets.numel(), targets.device)
    if cp_group is not None:
        if not detach:
            raise ValueError("detach: cp_group computes detached weights only, got "
                             "detach=False")
        w, delta_hat, diag = _cp.remit_weights(
            logprobs.reshape(-1), scorer_logprobs.reshape(-1), targets.reshape(-1) != ignore_index,
            _offsets(targets, cu_seqlens), eps, cp_group, dp_group)
        return ReMiTWeights(w.reshape(targets.shape), delta_hat.reshape(targets.shape), diag)
    impl = select_backend("remit_weights", backend, (logprobs, scorer_logprobs, targets))
    a = logprobs.reshape(-1)
    if detach:
        a = a.detach()
    # The scorer is frozen: it never receives a gradient (METHODS.md section 2).
    b = scorer_logprobs.reshape(-1).detach()
    w, delta_hat, diag = impl.remit_weights(a, b, targets.reshape(-1),
                                            _offsets(targets, cu_seqlens), ignore_index, eps)
    diag = ReMiTDiagnostics.from_tensor(diag)
    if dp_group is not None:
        diag = _dp.reduce_diagnostics(diag, targets, dp_group, ignore_index=ignore_index,
                                      name="dp_group")
    return ReMiTWeights(w.reshape(targets.shape), delta_hat.reshape(targets.shape), diag)


def weighted_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weights: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[int | Tensor] = None,
    inplace_backward: bool = False,
    tp_group=None,
    backend: str = "auto",
) -> Tensor:
    """``-(1/N_valid) sum_valid w_t log p(y_t)``; 'mean' divides by the valid-token count.

    ``inplace_backward=True`` makes the kernel backends write the logits gradient into the
    logits buffer (saves one [N, V] allocation; the torch backend ignores it). The write bumps
    the logits' version counter, so anything that reads them afterwards through autograd (an
    upstream tanh/exp/sigmoid that saved its output, another loss on the same logits built
    before this one, a second backward through a retained graph) raises autograd's "modified by
    an inplace operation" error rather than computing with the gradient; use it where the
    logits are a leaf or come from a linear head, read by nothing else. Gradients flow to ``logits`` and, if it requires grad, to
    ``weights``. ``num_items_in_batch`` replaces the valid-token count (module docstring).
    ``tp_group``: vocab-sharded logits (module docstring).
    """
    if tp_group is not None or chk.is_dtensor(logits):
        if weights is not None:
            chk.check_per_token(weights, targets, "weights")
        chk.check_reduction(reduction)
        num_items = chk.check_num_items(num_items_in_batch, reduction, targets.device)
        return _vp.weighted_cross_entropy(logits, targets, weights, tp_group, ignore_index,
                                                reduction, num_items, backend)
    chk.check_logits(logits)
    chk.check_targets(targets, logits, ignore_index)
    if weights is not None:
        chk.check_per_token(weights, targets, "weights")
    chk.check_reduction(reduction)
    num_items = chk.check_num_items(num_items_in_batch, reduction, logits.device)
    impl = select_backend("weighted_cross_entropy", backend, (logits, targets, weights))
    z, y = _flat(logits, targets)
    w = None if weights is None else weights.reshape(-1)
    per_token, _ = impl.weighted_ce(z, y, w, ignore_index, inplace_backward)
    loss = reduce_tokens(per_token, (y != ignore_index).sum(), reduction, num_items)
    return _shaped(loss, targets, reduction)


def remit_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    scorer_logits: Optional[Tensor] = None,
    scorer_logprobs: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    eps: float = 0.2,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[int | Tensor] = None,
    detach_weights: bool = True,
    inplace_backward: bool = False,
    return_details: bool = False,
    tp_group=None,
    cp_group=None,
    dp_group=None,
    backend: str = "auto",
):
    """The ReMiT loss from policy logits and the frozen scorer (METHODS.md section 2).

    Give exactly one of ``scorer_logits`` (same shape as ``logits``; no gradient) and
    ``scorer_logprobs`` (precomputed ``log p_RL(y_t)``, shaped like ``targets``). Returns the
    loss, or with ``return_details=True`` a ``ReMiTOutput(loss, weights, diagnostics)``.
    Only ``logits`` gets a gradient; weights are detached unless ``detach_weights=False``.
    ``inplace_backward=True`` makes the kernel backends write the gradient into the logits
    buffer (the torch backend ignores it; later readers of the logits then raise, see
    ``weighted_cross_entropy``). ``num_items_in_batch`` replaces the valid-token
    count (module docstring); the weights are centred per sequence, so cut micro-batches at
    sequence boundaries.

    ``tp_group``: vocab-sharded logits and scorer logits; ``cp_group``: each rank holds a slice
    of every sequence, centred over the whole sequence; ``dp_group``: diagnostics over all its
    ranks' batches (module docstring; ``remit_ext.parallel``). With a tp or cp group the
    weights are detached and the backend serves the token statistics only.
    """
    if tp_group is not None or cp_group is not None or chk.is_dtensor(logits):
        chk.check_exactly_one(scorer_logits, scorer_logprobs, "scorer_logits", "scorer_logprobs",
                              "remit_loss")
        if scorer_logprobs is not None:
            chk.check_per_token(scorer_logprobs, targets, "scorer_logprobs")
        eps = chk.check_eps(eps)
        chk.check_reduction(reduction)
        num_items = chk.check_num_items(num_items_in_batch, reduction, targets.device)
        if not detach_weights:
            raise ValueError("detach_weights: tp_group / cp_group compute detached weights "
                             "only, got detach_weights=False")
        chk._tensor(targets, "targets")
        cu_seqlens = chk.check_cu_seqlens(cu_seqlens, targets.numel(), targets.device)
        loss, w, diag = _cp.remit_loss(
            logits, targets, scorer_logits, scorer_logprobs, _offsets(targets, cu_seqlens), eps,
            ignore_index, reduction, num_items, tp_group, cp_group, dp_group, backend)
        if not return_details:
            return loss
        return ReMiTOutput(loss, w.reshape(targets.shape), diag)
    chk.check_logits(logits)
    chk.check_targets(targets, logits, ignore_index)
    chk.check_exactly_one(scorer_logits, scorer_logprobs, "scorer_logits", "scorer_logprobs",
                          "remit_loss")
    if scorer_logits is not None:
        chk.check_like_logits(scorer_logits, logits, "scorer_logits")
    if scorer_logprobs is not None:
        chk.check_per_token(scorer_logprobs, targets, "scorer_logprobs")
    eps = chk.check_eps(eps)
    chk.check_reduction(reduction)
    num_items = chk.check_num_items(num_items_in_batch, reduction, logits.device)
    z, y = _flat(logits, targets)
    cu_seqlens = chk.check_cu_seqlens(cu_seqlens, y.numel(), y.device)
    impl = select_backend("remit_loss", backend,
                          (logits, targets, scorer_logits, scorer_logprobs, cu_seqlens))
    sz = None if scorer_logits is None else scorer_logits.reshape(z.shape)
    sb = None if scorer_logprobs is None else scorer_logprobs.reshape(-1)
    per_token, w, diag = impl.remit_loss(z, y, sz, sb, _offsets(targets, cu_seqlens),
                                         ignore_index, eps, detach_weights, inplace_backward)
    loss = _shaped(reduce_tokens(per_token, (y != ignore_index).sum(), reduction, num_items),
                   targets, reduction)
    if not return_details:
        return loss
    diag = ReMiTDiagnostics.from_tensor(diag)
    if dp_group is not None:
        diag = _dp.reduce_diagnostics(diag, targets, dp_group, ignore_index=ignore_index,
                                      name="dp_group")
    return ReMiTOutput(loss, w.detach().reshape(targets.shape), diag)


def rho1_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    ref_logits: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    keep_ratio: float = 0.6,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[int | Tensor] = None,
    tp_group=None,
    backend: str = "auto",
) -> Tensor:
    """Rho-1 selective LM (METHODS.md section 3): NLL over the ceil(keep_ratio * N_valid) valid
    tokens of the batch with the largest excess loss NLL_theta - NLL_ref (ties by position);
    'mean' divides by the number kept.

    ``num_items_in_batch`` replaces the number kept as the divisor (module docstring: pass the
    number kept over the global batch); the selection itself stays per call. ``tp_group``:
    vocab-sharded logits and reference logits (module docstring)."""
    if tp_group is not None or chk.is_dtensor(logits):
        chk.check_exactly_one(ref_logits, ref_logprobs, "ref_logits", "ref_logprobs",
                              "rho1_loss")
        if ref_logprobs is not None:
            chk.check_per_token(ref_logprobs, targets, "ref_logprobs")
        if not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep_ratio!r}")
        chk.check_reduction(reduction)
        num_items = chk.check_num_items(num_items_in_batch, reduction, targets.device)
        return _vp.rho1_loss(logits, targets, ref_logits, ref_logprobs, keep_ratio,
                                   ignore_index, reduction, num_items, tp_group, backend)
    chk.check_logits(logits)
    chk.check_targets(targets, logits, ignore_index)
    chk.check_exactly_one(ref_logits, ref_logprobs, "ref_logits", "ref_logprobs", "rho1_loss")
    if ref_logits is not None:
        chk.check_like_logits(ref_logits, logits, "ref_logits")
    if ref_logprobs is not None:
        chk.check_per_token(ref_logprobs, targets, "ref_logprobs")
    if not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep_ratio!r}")
    chk.check_reduction(reduction)
    num_items = chk.check_num_items(num_items_in_batch, reduction, logits.device)
    impl = select_backend("rho1_loss", backend, (logits, targets, ref_logits, ref_logprobs))
    z, y = _flat(logits, targets)
    if ref_logits is not None:
        with torch.no_grad():
            b = impl.token_stats(ref_logits.reshape(z.shape), y, None, ignore_index, 1.0,
                                 False)[1]
    else:
        b = ref_logprobs.reshape(-1).detach()
    per_token, a = impl.weighted_ce(z, y, None, ignore_index, False)
    valid = y != ignore_index
    keep = rho1_keep_mask(b.to(a.dtype) - a.detach(), valid, float(keep_ratio))
    loss = reduce_tokens(per_token * keep, keep.sum(), reduction, num_items)
    return _shaped(loss, targets, reduction)


def kd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[int | Tensor] = None,
    tp_group=None,
    backend: str = "auto",
) -> Tensor:
    """Distillation against a frozen teacher (METHODS.md section 3):
    ``(1/N_valid) sum_valid [LSE(z/T) - sum_v softmax(z^T/T)_v z_v/T]``; ``targets`` only marks
    valid positions. No T^2 factor is applied. ``num_items_in_batch`` replaces the valid-token
    count (module docstring). ``tp_group``: vocab-sharded logits and teacher logits (module
    docstring; computed in torch ops, whatever ``backend``)."""
    if tp_group is not None or chk.is_dtensor(logits):
        temperature = chk.check_positive(temperature, "temperature")
        chk.check_reduction(reduction)
        num_items = chk.check_num_items(num_items_in_batch, reduction, targets.device)
        return _vp.kd_loss(logits, teacher_logits, targets, temperature, ignore_index,
                                 reduction, num_items, tp_group)
    chk.check_logits(logits)
    chk.check_like_logits(teacher_logits, logits, "teacher_logits")
    chk.check_targets(targets, logits, ignore_index)
    temperature = chk.check_positive(temperature, "temperature")
    chk.check_reduction(reduction)
    num_items = chk.check_num_items(num_items_in_batch, reduction, logits.device)
    impl = select_backend("kd_loss", backend, (logits, teacher_logits, targets))
    z, y = _flat(logits, targets)
    tz = teacher_logits.reshape(z.shape)
    if tz.dtype != z.dtype:
        # The kernels take one dtype: the wider of the two (a bf16 student with an fp32 teacher
        # computes in fp32; rounding the teacher to bf16 cost 1e-3 of the loss). The student's
        # gradient comes back in its own dtype through the cast.
        dt = torch.promote_types(z.dtype, tz.dtype)
        z, tz = z.to(dt), tz.to(dt)
    per_token = impl.kd(z, tz, y, ignore_index, temperature)
    loss = reduce_tokens(per_token, (y != ignore_index).sum(), reduction, num_items)
    return _shaped(loss, targets, reduction)


def policy_gradient_loss(
    logits: Tensor,
    actions: Tensor,
    advantages: Tensor,
    *,
    scale: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    kl_beta: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[int | Tensor] = None,
    inplace_backward: bool = False,
    return_details: bool = False,
    tp_group=None,
    backend: str = "auto",
):
    """The policy-gradient term over sampled tokens (RMT / GRPO; METHODS.md section 4).

    Per token ``scale_t * (pg_t + kl_beta * kl_t)`` with ``a_t = log pi(action_t)`` read from
    ``logits`` (the model's logits at the positions that sampled ``actions``):

    - ``pg_t = -A_t a_t`` (logits gradient ``scale A (p - onehot)``), or with ``old_logprobs``
      the PPO-clipped ``-min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) A)``,
      ``rho = exp(a - old)``;
    - ``kl_t = exp(d) - d - 1``, ``d = ref - a`` (k3), when ``ref_logprobs`` is given.

    ``advantages`` (a rollout's advantage broadcast to its tokens), ``scale`` (a non-negative
    normaliser, e.g. ``1 / (G * K)``) and the old/reference log-probs are per token, shaped like
    ``actions``, and receive no gradient. Positions whose action is ``ignore_index`` (the prompt,
    padding, forced tokens) count nothing. 'mean' divides by the valid-token count, 'sum' leaves
    the normalisation to ``scale``. With ``return_details=True`` returns a
    ``PolicyGradientOutput(loss, logprobs, clip_frac)`` (``clip_frac`` over this call's tokens).
    ``num_items_in_batch`` replaces the valid-token count of 'mean' (module docstring).
    ``tp_group``: vocab-sharded logits (module docstring).
    """
    sharded = tp_group is not None or chk.is_dtensor(logits)
    if not sharded:
        chk.check_logits(logits)
        chk.check_targets(actions, logits, ignore_index, "actions")
    chk.check_per_token(advantages, actions, "advantages")
    for name, x in (("scale", scale), ("old_logprobs", old_logprobs),
                    ("ref_logprobs", ref_logprobs)):
        if x is not None:
            chk.check_per_token(x, actions, name)
    clip_low = chk.check_positive(clip_eps, "clip_eps")
    clip_high = clip_low if clip_eps_high is None else chk.check_positive(clip_eps_high,
                                                                          "clip_eps_high")
    if clip_low >= 1:
        raise ValueError(f"clip_eps: expected a number in (0, 1), got {clip_eps!r}")
    if (isinstance(kl_beta, bool) or not isinstance(kl_beta, (int, float))
            or not 0 <= kl_beta < math.inf):  # NaN fails this too
        raise ValueError(f"kl_beta: expected a finite number >= 0, got {kl_beta!r}")
    if kl_beta and ref_logprobs is None:
        raise ValueError(f"kl_beta: {kl_beta} > 0 needs ref_logprobs (the reference model's "
                         f"log-probs of the actions), got None")
    chk.check_reduction(reduction)
    num_items = chk.check_num_items(num_items_in_batch, reduction, actions.device)

    def flat(x):
        return None if x is None else x.reshape(-1)

    y = actions.reshape(-1)
    if sharded:
        _, a, _, _, _ = _vp.vocab_parallel_token_stats(
            logits, actions, tp_group, ignore_index=ignore_index, backend=backend,
            target_name="actions")
        per_token = pg_from_logprob_ref(a, y != ignore_index, flat(advantages), scale=flat(scale),
                                        old_logprobs=flat(old_logprobs),
                                        ref_logprobs=flat(ref_logprobs), clip_low=clip_low,
                                        clip_high=clip_high, kl_beta=float(kl_beta))
        logprob = a.detach()
    else:
        impl = select_backend("pg_loss", backend,
                              (logits, actions, advantages, scale, old_logprobs, ref_logprobs))
        z, y = _flat(logits, actions)
        per_token, logprob = impl.pg_loss(z, y, flat(advantages), flat(scale),
                                          flat(old_logprobs), flat(ref_logprobs), ignore_index,
                                          clip_low, clip_high, float(kl_beta), inplace_backward)
    valid = y != ignore_index
    loss = _shaped(reduce_tokens(per_token, valid.sum(), reduction, num_items), actions,
                   reduction)
    if not return_details:
        return loss
    if old_logprobs is None:
        clip_frac = torch.zeros((), dtype=logprob.dtype, device=logprob.device)
    else:
        ratio = torch.exp(logprob - flat(old_logprobs).detach().to(logprob.dtype))
        adv = flat(advantages).detach()
        # Active: the clipped branch is the minimum with zero slope. A = 0 has no gradient
        # either way and is not clipped (TRL, Liger and first principles agree).
        active = (((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low)))
        clip_frac = (active & valid).sum() / valid.sum().clamp(min=1)
    return PolicyGradientOutput(loss, logprob.detach().reshape(actions.shape), clip_frac)

