"""Closed-form logits gradients, one copy each, for every Python path that forms one: the
registered ops' autograd (``_fakes_autograd``, every ops backend), the torch backend's ops and
fused-linear chunk primitives (``_backends``), the fused-linear engine's general pass
(``_linear_engine``) and the vocab-parallel autograd (``distributed/vocab_parallel``). The C++,
CUDA and Triton kernels implement the same expressions (METHODS.md section 5).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def token_stats_grad(z: Tensor, y: Tensor, logprob: Tensor, lse: Tensor,
                     entropy: Optional[Tensor], g_lp: Optional[Tensor], g_ent: Optional[Tensor],
                     g_lse: Optional[Tensor], temperature: float, ignore_index: int, *,
                     overwrite: bool = False) -> Tensor:
    """d(sum_t g_lp a_t + g_ent H_t + g_lse lse_t) / dz, in z's dtype, for rows ``z [N, V]``.

    With x = z / T, p = softmax(x), a = log p_y, H = -sum p log p:
    d lse/dx = p, d a/dx = onehot(y) - p, d H/dx = -p (log p + H), so
    dx = p * (alpha - g_ent log p) + g_lp onehot(y),  alpha = g_lse - g_lp - g_ent H,  dz = dx / T.

    The target column is formed from the log-prob a (``expm1``), not from a rounded p: on a
    confident row (p_y -> 1) g_lp (p_y - 1) keeps its digits where 1 - exp(a) rounds to 0
    (METHODS.md section 5). A ``None`` cotangent counts as 0. Rows whose target is
    ``ignore_index`` get 0; a target outside [0, V) (value checks off, a vocab shard that does
    not own it) gets ``p`` terms and no one-hot, and forms no out-of-bounds index. p = 0 (a -inf
    logit, an underflow) contributes 0, not 0 * inf; NaN stays NaN.

    p and log p are e^{-delta} e^{x - lse} and (x - lse) - delta, with delta the part of LSE that
    ``lse`` lost to rounding (``lse_rounding``), folded into the per-row factors: at |lse| ~ 5e3
    an fp32 lse is off by up to 2.4e-4, a relative error of every p otherwise.

    Works in the accumulation dtype of ``lse`` with one [N, V] buffer beside p. ``overwrite``:
    ``z`` may be used as that buffer when it already has that dtype (a chunk the caller owns).
    """
    dt = lse.dtype
    valid = y != ignore_index
    zero = torch.zeros_like(lse)
    if g_ent is not None and (entropy is None or entropy.numel() == 0):
        g_ent = None  # no entropy was computed: nothing can depend on it
    g_lp = zero if g_lp is None else g_lp.to(dt)
    base = zero if g_lse is None else g_lse.to(dt)  # alpha + g_lp
    if g_ent is not None:
        g_ent = g_ent.to(dt)
        base = base - g_ent * entropy.to(dt)
    alpha = base - g_lp
    a = torch.where(valid, logprob.to(dt), zero)
    hit = valid & (y >= 0) & (y < z.shape[-1])
    idx = torch.where(hit, y, 0).long().unsqueeze(-1)
    logp = z.to(dt, copy=not overwrite)
    if temperature != 1.0:
        logp.div_(temperature)
    delta = torch.where(hit, lse_rounding(lse, a, logp.gather(-1, idx).squeeze(-1)), zero)
    logp.sub_(lse.unsqueeze(-1))
    p = logp.exp()
    # With c = e^{-delta}: p_true = c p and log p_true = logp - delta, so
    # p_true (alpha - g_ent log p_true) = p ((alpha + g_ent delta) c - g_ent c logp).
    c = torch.exp(-delta)
    if g_ent is not None:
        grad = logp.mul_(-(g_ent * c).unsqueeze(-1)).add_(
            ((alpha + g_ent * delta) * c).unsqueeze(-1)).mul_(p)
        grad.masked_fill_(p == 0, 0)
    else:
        grad = torch.mul(p, (alpha * c).unsqueeze(-1), out=logp)
    del p
    # Target column: p_y (alpha - g_ent a) + g_lp = p_y base - g_lp expm1(a) - g_ent p_y a.
    p_y = a.exp()
    col = p_y * base - g_lp * torch.expm1(a)
    if g_ent is not None:
        col = col - g_ent * torch.where(p_y == 0, zero, p_y * a)
    col = torch.where(hit, col, grad.gather(-1, idx).squeeze(-1))
    grad.scatter_(-1, idx, col.unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    grad.masked_fill_(~valid.unsqueeze(-1), 0)
    return grad.to(z.dtype)


def lse_rounding(lse: Tensor, logprob: Tensor, x_y: Tensor) -> Tensor:
    """The part of LSE that ``lse`` (m + log s, rounded) lost: LSE = lse + delta, per row, from
    the same forward's log-prob a = (x_y - m) - log s, an O(1) number that kept those digits:
    delta = (x_y - lse) - a (csrc/cpu/row_ops.h, lse_rounding, is the same expression), off by
    ~an ulp of a. Taken only where that is finer than lse's ulp (|a| <= |lse| / 2) and where it
    is a rounding (|delta| <= |lse| eps); a pair that did not come from one forward, or a
    non-finite x_y or a, gives 0."""
    delta = (x_y - lse) - logprob
    ulp = lse.abs() * torch.finfo(lse.dtype).eps
    ok = (logprob.abs() <= lse.abs() * 0.5) & (delta.abs() <= ulp)
    return torch.where(ok, delta, torch.zeros_like(delta))


def kd_grad(z: Tensor, tz: Tensor, lse: Tensor, teacher_lse: Tensor, coef: Tensor,
            valid: Tensor, temperature: float) -> Tensor:
    """d(sum_t coef_t KD_t) / dz = coef (p - q) / T on valid rows, 0 elsewhere, in z's dtype:
    KD_t = LSE(z/T) - sum_v q_v z_v / T with p = softmax(z/T) = exp(z/T - lse) and
    q = softmax(tz/T) = exp(tz/T - teacher_lse) (METHODS.md, KD)."""
    dt = lse.dtype
    p = torch.exp(z.to(dt) / temperature - lse.unsqueeze(-1))
    q = torch.exp(tz.to(dt) / temperature - teacher_lse.to(dt).unsqueeze(-1))
    scale = torch.where(valid, coef.to(dt) / temperature, 0).unsqueeze(-1)
    return torch.where(valid.unsqueeze(-1), (p - q) * scale, 0).to(z.dtype)
