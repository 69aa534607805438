"""RMT, reinforcement mid-training (arXiv 2509.24375; METHODS.md section 4): the pieces a
training loop needs, each usable on its own.

- Token difficulty: ``token_entropy`` (full or top-k entropy from the kernels' ``token_stats``)
  and ``entropy_tiers`` (easy / medium / hard by thresholds).
- Curriculum-based adaptive sampling: ``tier_mix`` (the mix moves linearly from ``mix_start`` to
  ``mix_end`` between 30% and 70% of training), ``sample_positions`` (draw a tier, then a
  position uniformly inside it) and ``CurriculumSampler`` holding both.
- Dynamic token budget: ``token_budget`` (``B_t``), ``length_reward`` (triangular) and
  ``rmt_reward`` (exact next-token match plus the length term).
- ``group_advantages`` (group-whitened), the policy-gradient loss over rollout tokens
  (``rl_loss``, through the fused ``remit_ext.policy_gradient_loss``), the NTP term over the
  positions not sampled (``ntp_rest_loss``) and the dual objective ``rmt_loss``.

Where the paper is silent the defaults are ours and marked so in METHODS.md; every one is an
argument here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _checks as chk
from .functional import PolicyGradientOutput, policy_gradient_loss, token_stats, \
    weighted_cross_entropy

__all__ = [
    "TIER_NAMES",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_MIX_START",
    "DEFAULT_MIX_END",
    "token_entropy",
    "entropy_tiers",
    "tier_mix",
    "sample_positions",
    "CurriculumSampler",
    "token_budget",
    "length_reward",
    "rmt_reward",
    "group_advantages",
    "ADVANTAGE_MODES",
    "rmt_advantages",
    "rollout_scale",
    "rl_loss",
    "ntp_rest_loss",
    "RMTLoss",
    "NORMALIZATIONS",
    "rmt_loss",
]

TIER_NAMES = ("easy", "medium", "hard")
DEFAULT_THRESHOLDS = (0.5, 1.0, 1.5)  # [0.5, 1.0) easy, [1.0, 1.5) medium, >= 1.5 hard (ours)
DEFAULT_MIX_START = (0.6, 0.3, 0.1)  # ours
DEFAULT_MIX_END = (0.1, 0.3, 0.6)  # ours


# ----------------------------------------------------------------------------- difficulty


@torch.no_grad()
def token_entropy(logits: Tensor, targets: Tensor, *, topk: Optional[int] = None,
                  renormalize: bool = False, ignore_index: int = -100,
                  temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """Per-position entropy of the next-token distribution, shaped like ``targets`` and 0 at
    ignored positions: the full entropy, or with ``topk`` the entropy over the k largest
    probabilities (RPT's top-16; unnormalised unless ``renormalize``). Detached."""
    st = token_stats(logits.detach(), targets, ignore_index=ignore_index, temperature=temperature,
                     entropy=topk is None, topk=topk, topk_renormalize=renormalize,
                     backend=backend)
    return st.entropy if topk is None else st.topk_entropy


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    t = tuple(float(x) for x in thresholds)
    if not t or any(not math.isfinite(x) for x in t) or any(b <= a for a, b in zip(t, t[1:])):
        raise ValueError(f"thresholds: expected finite, strictly increasing numbers, "
                         f"got {tuple(thresholds)!r}")
    return t


def entropy_tiers(entropy: Tensor, valid: Optional[Tensor] = None,
                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Tensor:
    """Tier of each position (int64, shaped like ``entropy``): ``i`` for
    ``thresholds[i] <= H < thresholds[i + 1]`` (the last tier unbounded above), -1 below the
    first threshold, at invalid positions and for a NaN entropy (never a candidate)."""
    chk._tensor(entropy, "entropy")
    t = _check_thresholds(thresholds)
    bounds = torch.tensor(t, dtype=entropy.dtype, device=entropy.device)
    tiers = torch.bucketize(entropy, bounds, right=True) - 1
    keep = ~torch.isnan(entropy)
    if valid is not None:
        if valid.shape != entropy.shape:
            raise ValueError(f"valid: expected shape {tuple(entropy.shape)}, got "
                             f"{tuple(valid.shape)}")
        keep = keep & valid.to(torch.bool)
    return torch.where(keep, tiers, -1)


# ----------------------------------------------------------------------------- curriculum


def _check_mix(mix: Sequence[float], name: str, n: int) -> tuple[float, ...]:
    m = tuple(float(x) for x in mix)
    if len(m) != n or any(not math.isfinite(x) or x < 0 for x in m) or abs(sum(m) - 1) > 1e-6:
        raise ValueError(f"{name}: expected {n} non-negative numbers summing to 1 (one per "
                         f"tier), got {tuple(mix)!r}")
    return m


def tier_mix(step: int, total_steps: int, mix_start: Sequence[float] = DEFAULT_MIX_START,
             mix_end: Sequence[float] = DEFAULT_MIX_END, t1: float = 0.3,
             t2: float = 0.7) -> tuple[float, ...]:
    """The curriculum's tier distribution at ``step`` of ``total_steps``: ``mix_start`` before
    ``t1`` of training, ``mix_end`` from ``t2`` on, linear in between."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
    if not 0 <= t1 < t2 <= 1:
        raise ValueError(f"t1, t2: expected 0 <= t1 < t2 <= 1, got {t1!r}, {t2!r}")
    start = _check_mix(mix_start, "mix_start", len(mix_start))
    end = _check_mix(mix_end, "mix_end", len(start))
    f = step / total_steps
    tau = min(1.0, max(0.0, (f - t1) / (t2 - t1)))
    return tuple((1 - tau) * a + tau * b for a, b in zip(start, end))


def sample_positions(tiers: Tensor, n: int, mix: Sequence[float],
                     generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Two-step sampling of up to ``n`` distinct positions: draw a tier from ``mix``, then a
    position uniformly among that tier's positions not drawn yet; repeat.

    A tier with no candidates left drops out and the others' probabilities are renormalised
    (ours; the paper does not say); sampling stops early when no tier with a non-zero
    probability has candidates. ``tiers`` is any shape (flattened; -1 = not a candidate).
    Returns ``(positions, their tiers)``, flat int64 indices on the CPU in draw order. This is
    a host-side decision: CUDA tiers are copied to the host once.
    """
    chk._tensor(tiers, "tiers")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    flat = tiers.reshape(-1).cpu()
    k = len(mix)
    m = _check_mix(mix, "mix", k)
    if flat.numel() and int(flat.max()) >= k:
        raise ValueError(f"tiers: expected values in [-1, {k}) for a mix of {k} tiers, got "
                         f"{int(flat.max())}")
    pools = []
    for i in range(k):
        idx = (flat == i).nonzero().flatten()
        pools.append(idx[torch.randperm(idx.numel(), generator=generator)])
    taken = [0] * k
    probs = torch.tensor(m, dtype=torch.float64)
    pos, tier = [], []
    for _ in range(n):
        open_ = torch.tensor([taken[i] < pools[i].numel() for i in range(k)])
        p = probs * open_
        if float(p.sum()) <= 0:
            break
        i = int(torch.multinomial(p / p.sum(), 1, generator=generator))
        pos.append(int(pools[i][taken[i]]))
        tier.append(i)
        taken[i] += 1
    return torch.tensor(pos, dtype=torch.long), torch.tensor(tier, dtype=torch.long)


class CurriculumSampler:
    """Entropy tiers plus the tier-mix schedule: ``sample(entropy, valid, n, step)`` gives the
    RL set ``C`` of a step (flat position indices) and each position's tier."""

    def __init__(self, total_steps: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 mix_start: Sequence[float] = DEFAULT_MIX_START,
                 mix_end: Sequence[float] = DEFAULT_MIX_END, t1: float = 0.3, t2: float = 0.7):
        self.thresholds = _check_thresholds(thresholds)
        n_tiers = len(self.thresholds)
        self.mix_start = _check_mix(mix_start, "mix_start", n_tiers)
        self.mix_end = _check_mix(mix_end, "mix_end", n_tiers)
        self.total_steps, self.t1, self.t2 = total_steps, t1, t2
        tier_mix(0, total_steps, self.mix_start, self.mix_end, t1, t2)  # validates the rest

    def mix(self, step: int) -> tuple[float, ...]:
        return tier_mix(step, self.total_steps, self.mix_start, self.mix_end, self.t1, self.t2)

    def tiers(self, entropy: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        return entropy_tiers(entropy, valid, self.thresholds)

    def sample(self, entropy: Tensor, valid: Optional[Tensor], n: int, step: int,
               generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        return sample_positions(self.tiers(entropy, valid), n, self.mix(step), generator)


# ----------------------------------------------------------------------------- budget, reward


def token_budget(step: int, total_steps: int, b0: int = 800, b_min: int = 1,
                 gamma: float = 0.2) -> int:
    """``B_t = max(B_min, floor(B_0 * gamma^(t / T)))``: 800 -> 160 over training by default.
    (A 1e-9 slack keeps an exact product such as 800 * 0.2 = 160.00000000000003 from rounding
    the wrong way in either direction.)"""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
    if not isinstance(b0, int) or not isinstance(b_min, int) or not 1 <= b_min <= b0:
        raise ValueError(f"b0, b_min: expected ints with 1 <= b_min <= b0, got {b0!r}, {b_min!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma: expected a number in (0, 1], got {gamma!r}")
    return max(b_min, math.floor(b0 * gamma ** (step / total_steps) + 1e-9))


def length_reward(lengths: Tensor, budget: int, r_max: float = 1.0) -> Tensor:
    """Triangular length reward: ``r_max * l / B`` up to the budget, ``r_max * (2B - l) / B``
    up to twice it, 0 beyond (float32, shaped like ``lengths``)."""
    chk._tensor(lengths, "lengths")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: expected a positive int, got {budget!r}")
    ell = lengths.to(torch.float32)
    up = r_max * ell / budget
    down = r_max * (2 * budget - ell) / budget
    return torch.where(ell <= budget, up, torch.where(ell <= 2 * budget, down, 0.0))


def rmt_reward(match: Tensor, lengths: Tensor, budget: int, omega: float = 0.1,
               r_max: float = 1.0, gate: bool = False) -> Tensor:
    """``r = (1 - omega) * 1[prediction == next token] + omega * r_len(l)``; with ``gate``
    (ours) the length term counts only for a correct prediction:
    ``r = (1 - omega) * m + omega * m * r_len(l)``."""
    chk._tensor(match, "match")
    if match.shape != lengths.shape:
        raise ValueError(f"lengths: expected shape {tuple(match.shape)} like match, got "
                         f"{tuple(lengths.shape)}")
    if not 0 <= omega <= 1:
        raise ValueError(f"omega: expected a number in [0, 1], got {omega!r}")
    m = match.to(torch.float32)
    r_len = length_reward(lengths, budget, r_max)
    return (1 - omega) * m + omega * (m * r_len if gate else r_len)


ADVANTAGE_MODES = ("whiten", "centre", "gate")


def group_advantages(rewards: Tensor, eps: float = 1e-6, *, scale: bool = True) -> Tensor:
    """``A_i = (r_i - mean r) / (std r + eps)`` within each group (the last dim, ``[..., G]``);
    population std, so a group of equal rewards gets advantage 0. ``scale=False`` centres
    only: ``A_i = r_i - mean r``."""
    chk._tensor(rewards, "rewards")
    if rewards.dim() < 1 or rewards.shape[-1] < 1:
        raise ValueError(f"rewards: expected shape [..., G] with G >= 1, got "
                         f"{tuple(rewards.shape)}")
    r = rewards.to(torch.float32)
    centred = r - r.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    return centred / (r.std(dim=-1, keepdim=True, unbiased=False) + eps)


def rmt_advantages(match: Tensor, lengths: Tensor, budget: int, omega: float = 0.1,
                   mode: str = "whiten", r_max: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Rewards and advantages of ``[..., G]`` rollout groups under one of ``ADVANTAGE_MODES``:

    - ``whiten`` (METHODS.md): ``rmt_reward`` whitened per group. Where a group's predictions
      all match (or all miss), the length term alone sets the advantages at full scale.
    - ``centre`` (ours): ``rmt_reward`` minus the group mean, no std division: the length
      term moves an advantage by at most ``omega * r_max``.
    - ``gate`` (ours): the length term counts only for correct predictions
      (``rmt_reward(gate=True)``), whitened per group, and a group whose predictions all
      match or all miss gets advantage 0 (it carries no correctness signal, so its length
      differences set nothing).
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode: expected one of {ADVANTAGE_MODES}, got {mode!r}")
    reward = rmt_reward(match, lengths, budget, omega, r_max, gate=mode == "gate")
    if mode == "centre":
        return group_advantages(reward, eps, scale=False)
    adv = group_advantages(reward, eps)
    if mode == "gate":
        m = match.to(torch.float32)
        mixed = m.amax(dim=-1, keepdim=True) > m.amin(dim=-1, keepdim=True)
        adv = torch.where(mixed, adv, torch.zeros_like(adv))
    return adv


# ----------------------------------------------------------------------------- losses


def rollout_scale(action_mask: Tensor, group_size: int, n_positions: int,
                  token_mean: bool = False) -> Tensor:
    """The per-token normaliser of the RL term, ``1 / (|C| G)`` (the paper's sum over a
    rollout's tokens) or with ``token_mean`` ``1 / (|C| G K_i)`` with ``K_i`` the number of
    action tokens of rollout i; ``action_mask`` is ``[R, L]`` (True at action tokens)."""
    chk._tensor(action_mask, "action_mask")
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask: expected shape [rollouts, tokens], got "
                         f"{tuple(action_mask.shape)}")
    if group_size < 1 or n_positions < 1:
        raise ValueError(f"group_size, n_positions: expected positive ints, got "
                         f"{group_size!r}, {n_positions!r}")
    base = 1.0 / (group_size * n_positions)
    scale = torch.full(action_mask.shape, base, dtype=torch.float32, device=action_mask.device)
    if token_mean:
        k = action_mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        scale = scale / k
    return scale * action_mask


def rl_loss(logits: Tensor, actions: Tensor, advantages: Tensor, *, group_size: int,
            n_positions: int, token_mean: bool = False, ignore_index: int = -100,
            old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
            clip_eps: float = 0.2, kl_beta: float = 0.0,
            backend: str = "auto") -> PolicyGradientOutput:
    """``L_RL(C) = (1/|C|) sum_pos -(1/G) sum_i A_i sum_{tokens of rollout i} log pi`` (or the
    token mean): ``logits`` ``[R, L, V]`` over the rollouts (R = |C| G, grouped consecutively),
    ``actions`` ``[R, L]`` the sampled tokens (``ignore_index`` elsewhere), ``advantages``
    ``[R]``. Returns ``policy_gradient_loss``'s details (loss, log-probs, clip fraction)."""
    chk._tensor(advantages, "advantages")
    if actions.dim() != 2 or advantages.shape != actions.shape[:1]:
        raise ValueError(f"advantages: expected shape [{actions.shape[0]}] (one per rollout of "
                         f"actions [R, L]), got {tuple(advantages.shape)} for actions "
                         f"{tuple(actions.shape)}")
    mask = actions != ignore_index
    scale = rollout_scale(mask, group_size, n_positions, token_mean)
    adv = advantages.to(torch.float32)[:, None].expand(actions.shape).contiguous()
    return policy_gradient_loss(logits, actions, adv, scale=scale, old_logprobs=old_logprobs,
                                ref_logprobs=ref_logprobs, clip_eps=clip_eps, kl_beta=kl_beta,
                                ignore_index=ignore_index, reduction="sum",
                                return_details=True, backend=backend)


def ntp_rest_loss(logits: Tensor, targets: Tensor, rl_positions: Tensor, lam: float = 0.1, *,
                  ignore_index: int = -100, num_items_in_batch=None,
                  backend: str = "auto") -> Tensor:
    """``lam * L_NTP``: the mean next-token loss over the valid positions *not* in the RL set
    (``rl_positions``: flat indices into ``targets``), so no token is trained twice.
    ``num_items_in_batch`` replaces the count of those positions as the divisor."""
    chk._tensor(rl_positions, "rl_positions")
    if lam < 0:
        raise ValueError(f"lam: expected a number >= 0, got {lam!r}")
    rest = targets.reshape(-1).clone()
    rest[rl_positions.to(rest.device)] = ignore_index
    return lam * weighted_cross_entropy(logits, rest.view(targets.shape),
                                        ignore_index=ignore_index,
                                        num_items_in_batch=num_items_in_batch, backend=backend)


class RMTLoss(NamedTuple):
    loss: Tensor  # rl + ntp
    rl: Tensor
    ntp: Tensor  # already scaled by lambda
    logprobs: Tensor  # log pi of the rollout actions (detached)


NORMALIZATIONS = ("term", "position")


def rmt_loss(rollout_logits: Tensor, actions: Tensor, advantages: Tensor, logits: Tensor,
             targets: Tensor, rl_positions: Tensor, *, group_size: int, lam: float = 0.1,
             token_mean: bool = False, ignore_index: int = -100, normalize: str = "term",
             num_items_in_batch=None, backend: str = "auto") -> RMTLoss:
    """The dual objective ``L = L_RL(C) + lam * L_NTP(rest)``: the RL term over the rollouts
    of the ``|C| = len(rl_positions)`` sampled positions, the NTP term over the batch's other
    positions.

    ``normalize="term"`` (METHODS.md) takes each term's own mean: ``L_RL`` over ``|C|``,
    ``L_NTP`` over the rest. ``normalize="position"`` (ours) divides both sums by the batch's
    valid-position count ``N_valid`` (``num_items_in_batch`` overrides it, e.g. the global
    count under DDP): ``(sum_C l_RL + lam * sum_rest l_NTP) / N_valid``, so a position weighs
    the same whichever term trains it."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    n = int(rl_positions.numel())
    if normalize == "position":
        n_valid = (num_items_in_batch if num_items_in_batch is not None
                   else int((targets != ignore_index).sum()))
        n_rl, n_ntp = max(float(n_valid), 1.0), n_valid
    else:
        n_rl, n_ntp = max(n, 1), None
    rl = rl_loss(rollout_logits, actions, advantages, group_size=group_size,
                 n_positions=n_rl, token_mean=token_mean, ignore_index=ignore_index,
                 backend=backend)
    ntp = ntp_rest_loss(logits, targets, rl_positions, lam, ignore_index=ignore_index,
                        num_items_in_batch=n_ntp, backend=backend)
    return RMTLoss(rl.loss + ntp, rl.loss, ntp, rl.logprobs)
