"""Readable PyTorch references for every remit_ext op (the contract: ``shared/spec/METHODS.md``).

These are what the tests, the benchmarks and the ``backend="torch"`` path call. They compute in
float32 (float64 for float64 inputs), use plain PyTorch primitives (``logsumexp``,
``log_softmax``, ``softmax``) rather than the kernels' online formulas, and are differentiable by
autograd. Every function takes flattened inputs: logits ``[N, V]``, targets ``[N]``; sequences
are given by ``cu_seqlens`` offsets ``[S + 1]`` (``None`` = one sequence of all N positions).

Equation numbers refer to METHODS.md sections (1: token statistics, 2: ReMiT, 3: baselines,
4: RMT).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "ReMiTDiagnostics",
    "acc_dtype",
    "segment_ids",
    "target_logprob_ref",
    "token_stats_ref",
    "linear_token_stats_ref",
    "topk_entropy_ref",
    "remit_weights_ref",
    "remit_delta_sums",
    "remit_weights_from_sums",
    "remit_diag_sums",
    "remit_diag_from_sums",
    "weighted_ce_ref",
    "remit_loss_ref",
    "rho1_loss_ref",
    "kd_loss_ref",
    "pg_loss_ref",
    "pg_from_logprob_ref",
    "reduce_tokens",
]


class ReMiTDiagnostics(NamedTuple):
    """Weight diagnostics over the valid tokens (0-d tensors; zeros when none is valid)."""

    w_mean: Tensor
    w_std: Tensor  # population std (divides by N_valid)
    frac_clip_low: Tensor  # fraction of valid tokens with w at 1 - eps
    frac_clip_high: Tensor  # fraction at 1 + eps
    abs_delta_hat_mean: Tensor  # mean |delta_hat|
    delta_mean: Tensor  # mean delta = b - a (before centering)

    @classmethod
    def from_tensor(cls, diag: Tensor) -> "ReMiTDiagnostics":
        return cls(*diag.unbind(0))

    def as_dict(self) -> dict[str, float]:
        """Plain floats (this synchronises with the device; call it outside the hot loop)."""
        return {k: float(v) for k, v in self._asdict().items()}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_ids(cu_seqlens: Optional[Tensor], n: int, device: torch.device) -> tuple[Tensor, int]:
    """Sequence index of each of n positions, and the number of sequences S.

    ``searchsorted`` keeps this free of host synchronisation (no ``repeat_interleave`` on a
    device tensor of lengths).
    """
    if cu_seqlens is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    pos = torch.arange(n, device=device)
    ids = torch.searchsorted(cu_seqlens[1:].to(torch.long), pos, right=True)
    return ids, cu_seqlens.numel() - 1


def segment_membership(cu_seqlens: Optional[Tensor], valid: Tensor):
    """``(valid, segment ids, number of segments)`` of ``valid``'s positions, ``valid`` narrowed
    to the positions some segment covers. Malformed offsets (validation "off", or under
    torch.compile): a position before the first offset or after the last counts in no sequence
    and forms no out-of-range index, as in the kernels."""
    n = valid.shape[0]
    seg, num_seg = segment_ids(cu_seqlens, n, valid.device)
    if cu_seqlens is not None:
        pos = torch.arange(n, device=valid.device)
        valid = valid & (seg < num_seg) & (pos >= cu_seqlens[0])
        seg = seg.clamp(max=max(num_seg - 1, 0))
    return valid, seg, num_seg


def reduce_tokens(per_token: Tensor, n_valid: Tensor, reduction: str,
                  num_items: "int | Tensor | None" = None) -> Tensor:
    """'mean' divides by the valid-token count (0 when there is none), never by sum of weights.

    ``num_items`` (``num_items_in_batch`` of the losses: an int, or a 0-d tensor read without a
    host sync) replaces that count as the divisor, e.g. the valid tokens of the whole global
    batch under gradient accumulation or data parallelism. A count of 0 (a global batch of
    padding only) gives a loss of 0 with a zero gradient, whatever the local sum; a negative
    tensor count gives NaN (``count_scale``)."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items is None:
        return total / n_valid.clamp(min=1).to(total.dtype)
    if isinstance(num_items, int):
        return total / num_items if num_items > 0 else total * 0
    divisor, factor = count_scale(num_items.detach().to(total.dtype))
    return total / divisor * factor


def count_scale(count: Tensor) -> tuple[Tensor, Tensor]:
    """(divisor, factor) for ``x / divisor * factor`` = x / count for count > 0, 0 * x for
    count = 0 and NaN for a negative (or NaN) count, formed on count's device without reading
    it: the divisor is count with non-positive values replaced by 1, the factor is 1, 0 or NaN
    (x * 1 keeps x / count bit for bit)."""
    positive = count > 0
    divisor = torch.where(positive, count, torch.ones_like(count))
    factor = torch.where(positive, torch.ones_like(count),
                         torch.where(count == 0, torch.zeros_like(count),
                                     torch.full_like(count, math.nan)))
    return divisor, factor


def _valid_rows(z: Tensor, valid: Tensor) -> Tensor:
    """z with the rows of ignored positions replaced by 0: whatever they hold (NaN, inf) then
    reaches neither a valid output nor, through softmax's backward, a gradient (selecting the
    outputs alone leaves 0 * NaN in the backward)."""
    return torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))


def _gather_target(logp: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """logp[t, y_t]: 0 at invalid positions; NaN for a valid target outside [0, V) (reachable
    with validation "off" or under torch.compile, which skip the value checks), as the kernels
    give, without forming an out-of-bounds index."""
    in_range = (targets >= 0) & (targets < logp.shape[-1])
    idx = torch.where(valid & in_range, targets, 0).long().unsqueeze(-1)
    a = logp.gather(-1, idx).squeeze(-1)
    a = torch.where(in_range, a, torch.full((), math.nan, dtype=a.dtype, device=a.device))
    return torch.where(valid, a, torch.zeros((), dtype=a.dtype, device=a.device))


def _top_target_logprob(z: Tensor, targets: Tensor, valid: Tensor, logprob: Tensor) -> Tensor:
    """``logprob`` with each row whose target holds the row's finite maximum recomputed as
    a = -log1p(sum_{j != y} exp(z_j - z_y)): there p_y -> 1 and z_y - LSE(z) cancels (in fp32
    every digit of a ~ -1e-7 is lost), the log1p form keeps them, and so does its autograd
    (d a / d z_y = off / (1 + off) = 1 - p_y, not 1 - a rounded p_y). The kernels keep these
    digits too (METHODS.md section 5)."""
    if z.shape[-1] == 1:
        # One class: a = 0 whatever z, and log_softmax's backward keeps a NaN cotangent NaN
        # (the log1p form has no other class to carry it), as the kernels do.
        return logprob
    in_range = valid & (targets >= 0) & (targets < z.shape[-1])
    idx = torch.where(in_range, targets, 0).long().unsqueeze(-1)
    zy = z.gather(-1, idx)
    top = in_range & (zy.squeeze(-1) == z.amax(-1)) & torch.isfinite(zy.squeeze(-1))
    # Other rows: exp(-inf) = 0, so no inf or NaN is formed for autograd to multiply by 0.
    shifted = torch.where(top.unsqueeze(-1), z - zy, -math.inf)
    off = shifted.exp().scatter(-1, idx, 0.0).sum(-1)
    return torch.where(top, -torch.log1p(off), logprob)


def target_logprob_ref(logits: Tensor, targets: Tensor, *, ignore_index: int = -100) -> Tensor:
    """a_t = log softmax(z_t)[y_t] (section 1), 0 at invalid positions: the one statistic the
    losses need, computed as eager PyTorch code would (log_softmax, then gather), except on rows
    whose target is the row maximum: there the log1p form keeps a_t's digits and its gradient's
    (section 5; ``_top_target_logprob``), as every other backend does."""
    valid = targets != ignore_index
    z = _valid_rows(logits.to(acc_dtype(logits.dtype)), valid)
    logp = torch.log_softmax(z, dim=-1)
    return _top_target_logprob(z, targets, valid, _gather_target(logp, targets, valid))


def token_stats_ref(
    logits: Tensor, targets: Tensor, *, ignore_index: int = -100, temperature: float = 1.0,
    entropy: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token statistics (section 1) of ``logits / temperature``: ``(lse, logprob, entropy)``.

    lse = LSE(z);  logprob a = z_y - LSE(z);  entropy H = -sum_v p_v log p_v.
    Invalid positions (target == ignore_index) get 0 for all three. A row whose softmax is
    undefined (a +inf or NaN logit, or all -inf) has lse as ``torch.logsumexp`` gives and NaN
    log-prob and entropy, as ``log_softmax`` gives. ``entropy=False`` skips the entropy's
    passes over the logits and returns zeros in its place.
    """
    valid = targets != ignore_index
    z = _valid_rows(logits.to(acc_dtype(logits.dtype)), valid)
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    logprob = _top_target_logprob(z, targets, valid, _gather_target(logp, targets, valid))
    if entropy:
        # -sum p log p with p log p := 0 where p = 0; masking log p (not the product) keeps
        # the backward free of 0 * -inf as well.
        p = logp.exp()
        ent = -(p * torch.where(p > 0, logp, 0)).sum(-1)
    else:
        ent = torch.zeros_like(lse)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return (
        torch.where(valid, lse, zero),
        torch.where(valid, logprob, zero),
        torch.where(valid, ent, zero),
    )


def linear_token_stats_ref(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
    ignore_index: int = -100, temperature: float = 1.0, entropy: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``token_stats_ref`` of the full logits ``hidden @ weight.T (+ bias)``: ``(lse, logprob,
    entropy)`` (section 1), what ``linear_token_stats`` computes without holding them. Inputs
    are flattened: ``hidden [N, D]``, ``weight [V, D]``, ``targets [N]``."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    return token_stats_ref(z, targets, ignore_index=ignore_index, temperature=temperature,
                           entropy=entropy)


def topk_entropy_ref(
    logits: Tensor, k: int = 16, *, renormalize: bool = False, temperature: float = 1.0
) -> Tensor:
    """Top-k entropy (section 1, RMT/RPT): over the k largest logits with p_j = exp(z_j - LSE(z)),
    ``-sum_j p_j log p_j``; with ``renormalize`` the p_j are first divided by their sum."""
    z = logits.to(acc_dtype(logits.dtype)) / temperature
    k = min(k, z.shape[-1])
    logp = torch.log_softmax(z, dim=-1).topk(k, dim=-1).values
    if renormalize:
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)


def remit_weights_ref(
    logprob: Tensor,
    scorer_logprob: Tensor,
    valid: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    eps: float = 0.2,
    detach: bool = True,
) -> tuple[Tensor, Tensor, ReMiTDiagnostics]:
    """ReMiT token weights (section 2, steps 3-5): ``(w, delta_hat, diagnostics)``.

    delta_t = b_t - a_t;  mu_s = mean of delta over the valid positions of sequence s;
    delta_hat_t = delta_t - mu_s;  w_t = clip(2 sigmoid(delta_hat_t), 1 - eps, 1 + eps).
    Invalid positions get w = 0 and delta_hat = 0. With ``detach=False`` the weights carry the
    gradient of that expression with respect to ``logprob`` (the non-detached study option).

    The three steps below are the one copy of the formula: context parallelism
    (``distributed/context_parallel``) runs them with its all-gathers between them.
    """
    delta, valid, seg, sums = remit_delta_sums(logprob, scorer_logprob, valid, cu_seqlens,
                                               detach=detach)
    w, delta_hat, raw = remit_weights_from_sums(delta, valid, seg, sums, eps)
    with torch.no_grad():
        diag = remit_diag_from_sums(remit_diag_sums(w, raw, delta_hat, delta, valid, eps),
                                    delta.dtype)
    return w, delta_hat, diag


def remit_delta_sums(logprob: Tensor, scorer_logprob: Tensor, valid: Tensor,
                     cu_seqlens: Optional[Tensor], *, detach: bool = True):
    """Step 3: ``(delta, valid, segment ids, sums)`` with delta = b - a at valid positions (0
    elsewhere) and ``sums [2, S]`` each sequence's sum of delta and count of valid positions,
    in the accumulation dtype. ``valid`` comes back narrowed by malformed offsets."""
    dt = acc_dtype(logprob.dtype)
    a = logprob.to(dt) if not detach else logprob.detach().to(dt)
    b = scorer_logprob.detach().to(dt)
    valid, seg, num_seg = segment_membership(cu_seqlens, valid)
    vf = valid.to(dt)
    # Selected, not multiplied by the mask: a NaN/inf log-prob at an ignored position must
    # not reach its sequence's mean (0 * NaN = NaN).
    delta = torch.where(valid, b - a, torch.zeros((), dtype=dt, device=a.device))
    if num_seg == 1:
        # The same sums without index_add: inductor (torch 2.13, CPU) fails an assertion
        # generating code for an index_add into one slot, so torch.compile of this reference
        # crashed on single-sequence inputs.
        sums = torch.stack([delta.sum(), vf.sum()]).reshape(2, 1)
    else:
        sums = torch.zeros(2, num_seg, dtype=dt, device=a.device).index_add(
            1, seg, torch.stack([delta, vf]))
    return delta, valid, seg, sums


def remit_weights_from_sums(delta: Tensor, valid: Tensor, seg: Tensor, sums: Tensor,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 4-5 from the sequences' sums (``remit_delta_sums``, possibly summed over ranks):
    ``(w, delta_hat, raw)`` with raw = 2 sigmoid(delta_hat) before the clip."""
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    mu = sums[0] / sums[1].clamp(min=1)
    delta_hat = torch.where(valid, delta - mu[seg], zero)
    raw = 2 * torch.sigmoid(delta_hat)
    w = torch.where(valid, raw.clamp(1 - eps, 1 + eps), zero)
    return w, delta_hat, raw


def remit_diag_sums(w: Tensor, raw: Tensor, delta_hat: Tensor, delta: Tensor, valid: Tensor,
                    eps: float) -> Tensor:
    """The diagnostics' sums, fp64 ``[7]``: [n, sum w, sum w^2, n clipped low, n clipped high,
    sum |delta_hat|, sum delta] over the valid positions (ranks add theirs before
    ``remit_diag_from_sums``). Summed in fp64 from fp64 terms: near w = 1, E[w^2] - E[w]^2 from
    fp32 sums is cancellation noise (a std of 0 or 2.6e-4 where the true one is 9e-6)."""
    d64 = torch.float64
    w64 = w.detach().to(d64)
    return torch.stack([valid.to(d64).sum(), w64.sum(), (w64 * w64).sum(),
                        ((raw <= 1 - eps) & valid).sum().to(d64),
                        ((raw >= 1 + eps) & valid).sum().to(d64),
                        delta_hat.detach().to(d64).abs().sum(), delta.detach().to(d64).sum()])


def remit_diag_from_sums(s: Tensor, dtype: torch.dtype) -> ReMiTDiagnostics:
    """Diagnostics from ``remit_diag_sums`` (of one rank, or added over ranks), in ``dtype``:
    means over the valid count (0 when it is 0), population std as sqrt(E[w^2] - E[w]^2)."""
    inv = 1 / s[0].clamp(min=1)
    mean = s[1] * inv
    var = (s[2] * inv - mean * mean).clamp(min=0)
    return ReMiTDiagnostics(*(x.to(dtype) for x in (mean, var.sqrt(), s[3] * inv, s[4] * inv,
                                                     s[5] * inv, s[6] * inv)))


def weighted_ce_ref(
    logits: Tensor,
    targets: Tensor,
    weights: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Weighted cross-entropy (section 2, step 6): L = -(1/N_valid) sum_valid w_t log p(y_t).

    'mean' divides by the number of valid tokens, not by sum(w); 'none' gives -w_t a_t per token.
    """
    valid = targets != ignore_index
    logprob = target_logprob_ref(logits, targets, ignore_index=ignore_index)
    per_token = -logprob if weights is None else -logprob * weights.to(logprob.dtype)
    # Selected: a NaN/inf weight at an ignored position counts nothing (0 * NaN = NaN).
    per_token = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype,
                                                           device=per_token.device))
    return reduce_tokens(per_token, valid.sum(), reduction)


def _frozen_logprob(other_logits: Optional[Tensor], other_logprobs: Optional[Tensor],
                    targets: Tensor, ignore_index: int, op: str) -> Tensor:
    """b_t of the frozen model (scorer / reference): from its logits, or as given. No gradient."""
    if (other_logits is None) == (other_logprobs is None):
        raise ValueError(f"{op}: give exactly one of the frozen model's logits and log-probs")
    if other_logprobs is not None:
        return other_logprobs.detach()
    with torch.no_grad():
        return target_logprob_ref(other_logits, targets, ignore_index=ignore_index)


def remit_loss_ref(
    logits: Tensor,
    targets: Tensor,
    *,
    scorer_logits: Optional[Tensor] = None,
    scorer_logprobs: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    eps: float = 0.2,
    ignore_index: int = -100,
    reduction: str = "mean",
    detach_weights: bool = True,
) -> tuple[Tensor, Tensor, ReMiTDiagnostics]:
    """ReMiT loss (section 2): ``(loss, w, diagnostics)`` with L = -(1/N_valid) sum w_t a_t.

    a_t = log p_theta(y_t) from ``logits``; b_t = log p_RL(y_t) from ``scorer_logits`` (no
    gradient) or precomputed ``scorer_logprobs``. Weights are detached unless
    ``detach_weights=False``.
    """
    valid = targets != ignore_index
    a = target_logprob_ref(logits, targets, ignore_index=ignore_index)
    b = _frozen_logprob(scorer_logits, scorer_logprobs, targets, ignore_index, "remit_loss_ref")
    w, _, diag = remit_weights_ref(
        a, b, valid, cu_seqlens=cu_seqlens, eps=eps, detach=detach_weights
    )
    loss = reduce_tokens(-w * a, valid.sum(), reduction)
    return loss, w.detach(), diag


def rho1_keep_mask(excess: Tensor, valid: Tensor, keep_ratio: float) -> Tensor:
    """Rho-1 selection (section 3): keep the ceil(keep_ratio * N_valid) valid tokens with the
    largest excess loss, ties broken by position (earlier first). No host synchronisation."""
    n = excess.shape[0]
    score = torch.where(valid, excess, torch.full_like(excess, -math.inf))
    # A stable descending sort puts equal scores in position order.
    order = torch.sort(score, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=excess.device))
    # The 1e-6 slack keeps a product like 0.7 * 10 = 7.000000000000001 from keeping 8.
    n_keep = torch.ceil(keep_ratio * valid.sum().to(torch.float64) - 1e-6).to(torch.long)
    return (rank < n_keep) & valid


def rho1_loss_ref(
    logits: Tensor,
    targets: Tensor,
    *,
    ref_logits: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    keep_ratio: float = 0.6,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Rho-1 selective LM (section 3): mean NLL over the kept tokens.

    excess_t = NLL_theta - NLL_ref = b_t - a_t (detached); 'mean' divides by the number kept.
    """
    valid = targets != ignore_index
    a = target_logprob_ref(logits, targets, ignore_index=ignore_index)
    b = _frozen_logprob(ref_logits, ref_logprobs, targets, ignore_index, "rho1_loss_ref")
    keep = rho1_keep_mask((b.to(a.dtype) - a).detach(), valid, keep_ratio)
    return reduce_tokens(-a * keep, keep.sum(), reduction)


def kd_loss_ref(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """KD (section 3): L = (1/N_valid) sum_valid [LSE(z) - sum_v softmax(z^T)_v z_v] of z/T.

    Gradient (p - p^T) / (T N_valid); the teacher gets none. No T^2 factor is applied.
    """
    dt = acc_dtype(logits.dtype)
    valid = targets != ignore_index
    z = _valid_rows(logits.to(dt), valid) / temperature
    q = torch.softmax(_valid_rows(teacher_logits.detach().to(dt), valid) / temperature, dim=-1)
    # q_v z_v with q_v = 0 counts 0 even for z_v = -inf.
    cross = torch.where(q == 0, torch.zeros_like(z), q * z).sum(-1)
    per_token = torch.where(valid, torch.logsumexp(z, dim=-1) - cross, torch.zeros_like(cross))
    return reduce_tokens(per_token, valid.sum(), reduction)


def pg_loss_ref(
    logits: Tensor,
    actions: Tensor,
    advantages: Tensor,
    *,
    scale: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_beta: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Policy-gradient loss over sampled tokens (section 4; papers.md G4), per token
    ``scale_t * (pg_t + kl_beta * kl_t)`` with a_t = log pi(action_t):

    - no ``old_logprobs``: ``pg_t = -A_t a_t`` (gradient ``scale A (p - onehot)``);
    - with them (PPO): ``rho = exp(a - old)``, ``pg_t = -min(rho A, clip(rho, 1 - clip_low,
      1 + clip_high) A)``;
    - ``kl_t = exp(d) - d - 1`` with ``d = ref - a`` (the k3 estimator), when ``ref_logprobs``
      is given.

    Advantages, scale and the old/reference log-probs get no gradient. 'mean' divides by the
    valid-token count.
    """
    valid = actions != ignore_index
    a = target_logprob_ref(logits, actions, ignore_index=ignore_index)
    pg = pg_from_logprob_ref(a, valid, advantages, scale=scale, old_logprobs=old_logprobs,
                             ref_logprobs=ref_logprobs, clip_low=clip_low, clip_high=clip_high,
                             kl_beta=kl_beta)
    return reduce_tokens(pg, valid.sum(), reduction)


def pg_from_logprob_ref(
    a: Tensor,
    valid: Tensor,
    advantages: Tensor,
    *,
    scale: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_beta: float = 0.0,
) -> Tensor:
    """The per-token policy-gradient term of ``pg_loss_ref`` from the log-probs ``a`` of the
    actions (0 where ``valid`` is False): shared with the vocab-parallel path, which forms
    ``a`` from sharded logits."""
    zero = torch.zeros((), dtype=a.dtype, device=a.device)

    def per_token(x):  # no gradient, and a non-finite value at an ignored position counts 0
        return torch.where(valid, x.detach().to(a.dtype), zero)

    adv = per_token(advantages)
    if old_logprobs is None:
        pg = -adv * a
    else:
        # -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A), written as the select it is:
        # the clipped branch (a constant, slope 0) where rho left the band on the side A's sign
        # rewards, rho A elsewhere; A = 0 takes the clipped side (0 either way). Selecting
        # keeps pi_old = 0 (old = -inf, rho = inf) finite: min() would meet inf * 0 = NaN, and
        # its backward the clamp's 0 times exp's inf; the exponent is selected away as well.
        log_ratio = a - per_token(old_logprobs)
        with torch.no_grad():
            rho = torch.exp(log_ratio)
            hi, lo = 1 + clip_high, 1 - clip_low
            active = ((adv >= 0) & (rho > hi)) | ((adv < 0) & (rho < lo))
            # Filled in a.dtype (a Python float through where would round to fp32).
            clipped = torch.where(rho > hi, torch.full_like(rho, hi), torch.full_like(rho, lo))
        ratio = torch.exp(torch.where(active, zero, log_ratio))
        pg = torch.where(active, -clipped * adv, -ratio * adv)
    if ref_logprobs is not None:
        d = per_token(ref_logprobs) - a
        pg = pg + kl_beta * (torch.exp(d) - d - 1)
    if scale is not None:
        pg = pg * per_token(scale)
    return torch.where(valid, pg, zero)

