"""The ``eager`` provider: the PyTorch a user writes for each op, and what ``compile`` compiles.

Every speed-up in the suite is against these functions, so they are written as someone
training with ReMiT, Rho-1 or RMT would write them today, and nothing more careful:

- ``F.cross_entropy(reduction="none")`` for ``-log p(y)`` and ``log_softmax`` + ``gather`` where
  the log-probabilities are needed anyway (entropy), on the logits in their own dtype: PyTorch
  upcasts to fp32 inside its kernels where it does so itself (the softmax reductions), and the
  outputs come back in the input dtype, as they do for a user (one exception, as in RL code:
  the PPO ratio's log-probs come from fp32 logits, see ``pg_loss``);
- the scorer's pass under ``no_grad``; weights, centring and reductions as vectorised tensor ops
  in fp32 (the log-probs upcast where they meet the weights, by type promotion);
- no fp64, no diagnostics nobody asked for, no ``.item()``.

``remit_ext.reference`` (provider ``reference``) is the fp32, one-formula-per-line ground truth
the correctness gate compares every provider to, these functions included; it is not a
denominator.

Shapes: logits ``[S, T, V]`` with targets ``[S, T]`` (a sequence per row, what ReMiT centres
over) or ``[N, V]`` with ``[N]``; ``IGNORE`` marks positions without a target.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token ``-log p(y)`` shaped like ``targets`` (0 where ignored), in the logits' dtype."""
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(targets.shape)


def masked_mean(per_token: Tensor, valid: Tensor) -> Tensor:
    return per_token.sum() / valid.sum().clamp(min=1)


# ------------------------------------------------------------------------------ statistics


def token_stats(logits: Tensor, targets: Tensor, scorer_logits: Tensor) -> Tensor:
    """Policy and scorer log-probs of the targets, ``[2, N]`` fp32 (no gradient needed)."""
    with torch.no_grad():
        return torch.stack([-nll(logits, targets), -nll(scorer_logits, targets)]).float()


def token_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-prob of the target and the full entropy ``-sum p log p``, ``[2, N]`` fp32, 0 where
    ignored (RMT's key-token selection)."""
    with torch.no_grad():
        logp = torch.log_softmax(logits, dim=-1)
        valid = targets != IGNORE
        lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        return torch.stack([lp * valid, ent * valid]).float()


def remit_weights(logprob: Tensor, scorer_logprob: Tensor, targets: Tensor,
                  cu_seqlens: Optional[Tensor] = None, eps: float = 0.2) -> Tensor:
    """ReMiT weights ``clip(2 sigmoid(delta - mean_seq delta), 1 - eps, 1 + eps)`` with
    ``delta = b - a``, the mean over each sequence's valid tokens: the rows of ``targets``, or
    the documents of ``cu_seqlens`` (flat inputs). 0 where ignored."""
    valid = targets != IGNORE
    delta = torch.where(valid, scorer_logprob.float() - logprob.float(), 0.0)
    if cu_seqlens is None:
        mu = delta.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    else:
        seg = torch.searchsorted(cu_seqlens[1:], torch.arange(delta.numel(),
                                                              device=delta.device), right=True)
        n_seg = cu_seqlens.numel() - 1
        sums = delta.new_zeros(n_seg).index_add_(0, seg, delta)
        counts = delta.new_zeros(n_seg).index_add_(0, seg, valid.float())
        mu = (sums / counts.clamp(min=1))[seg]
    w = (2 * torch.sigmoid(delta - mu)).clamp(1 - eps, 1 + eps)
    return torch.where(valid, w, 0.0)


# ---------------------------------------------------------------------------------- losses


def ce_grad(logits: Tensor, targets: Tensor, coef: Tensor) -> Tensor:
    """The weighted cross-entropy gradient alone, ``coef (softmax - onehot)`` (0 where
    ignored), as one writes it by hand: softmax, a scatter at the targets, a row mask."""
    valid = targets != IGNORE
    g = torch.softmax(logits, dim=-1) * coef.unsqueeze(-1)
    g = g.scatter_add(-1, targets.clamp(min=0).unsqueeze(-1), -coef.unsqueeze(-1))
    return (g * valid.unsqueeze(-1)).to(logits.dtype)


def weighted_ce(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """``sum_t w_t (-log p(y_t)) / n_valid``."""
    return masked_mean(nll(logits, targets) * weights, targets != IGNORE)


def remit_loss(logits: Tensor, targets: Tensor, scorer_logits: Optional[Tensor] = None,
               scorer_logprobs: Optional[Tensor] = None, eps: float = 0.2) -> Tensor:
    """ReMiT: the scorer's log-probs (from its logits under no_grad, or given), detached
    weights from ``remit_weights``, then ``sum w (-log p) / n_valid``."""
    loss_t = nll(logits, targets)
    with torch.no_grad():
        b = -nll(scorer_logits, targets) if scorer_logprobs is None else scorer_logprobs
        w = remit_weights(-loss_t, b, targets, eps=eps)
    return masked_mean(w * loss_t, targets != IGNORE)


def pg_loss(logits: Tensor, actions: Tensor, advantages: Tensor, old_logprobs: Tensor,
            clip: float = 0.2) -> Tensor:
    """PPO-clipped policy-gradient loss over the sampled tokens (RMT/GRPO), masked mean. The
    log-probs come from fp32 logits, as RL code computes them (verl, OpenRLHF): the ratio
    ``exp(a - old)`` is ill-conditioned at the clip edges, and bf16 log-probs (off by ~0.03 at
    |a| ~ 10) move tokens across them, i.e. give them no gradient or a full one."""
    logp = -nll(logits.float(), actions)
    ratio = torch.exp(logp - old_logprobs)
    per_token = -torch.minimum(ratio * advantages,
                               ratio.clamp(1 - clip, 1 + clip) * advantages)
    valid = actions != IGNORE
    return masked_mean(per_token * valid, valid)


def linear_token_stats_loss(hidden: Tensor, weight: Tensor, targets: Tensor, adv: Tensor,
                            bonus: float = 0.01) -> Tensor:
    """The GRPO/PPO shape on hidden states: per-token log-prob and entropy of ``hidden @ W.T``
    (log_softmax of the logits, in their dtype), then ``-(A lp + bonus H)`` over the valid
    tokens: the backward any per-token loss on top of them has."""
    logp = torch.log_softmax((hidden @ weight.T).view(*targets.shape, -1), dim=-1)
    valid = targets != IGNORE
    lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    ent = -(logp.exp() * logp).sum(-1).float()
    return masked_mean(-(adv * lp + bonus * ent) * valid, valid)
