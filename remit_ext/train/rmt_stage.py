"""``remit-ext midtrain --method rmt``: reinforcement mid-training on the embedded corpus.

Each step takes a batch of mid-training texts and runs the model once over it. The entropy of
every next-token distribution gives the position's tier. The curriculum sampler draws the RL set
``C`` (``rmt_positions`` positions). For each position the model writes ``rmt_group`` rollouts
from the text's prefix, with KV-cached sampling: ``<`` (forced, like a reasoning template),
then a thought of at most ``2 B_t`` tokens closed by ``>`` (forced at the cap), then one
predicted token.

The reward is ``(1 - omega) * [prediction == the text's next token] + omega * r_len(thought
length)``. Advantages follow ``rmt_advantage`` (``centre`` in the presets: ``r - mean`` per
group, no std division; ``whiten`` is METHODS.md's). The loss is the dual objective
``L_RL(C) + lambda * L_NTP(the other positions)`` (``remit_ext.rmt``; ``rmt_normalize =
"position"`` in the presets: both sums over the valid positions), with the policy gradient
computed by the fused ``policy_gradient_loss`` and, with ``rmt_rl_lr > 0``, stepped by its own
optimizer.

The held-out ``TierProbe`` measures next-token accuracy per entropy tier. The tiers are fixed
by the base model, as the paper's splits are fixed by a proxy model. Accuracy is measured both
directly (argmax of the next-token distribution) and after reasoning (greedy thought, then
prediction), together with the mean thought length.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

import torch.distributed as dist

from remit_ext.parallel import global_num_items

from .. import rmt as R
from . import data as D
from .loop import (apply_threads, clip_and_step, clock, dataset, finish_stage, load_model,
                   log_step, make_optimizer, median, midtrain_batch, set_lr)
from .presets import Preset
from .runtime import StageRun, get_dist, step_generator, unwrap


def floats(text: str, name: str) -> tuple[float, ...]:
    """A preset's comma-separated numbers ("0.5,1.0,1.5")."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--set {name}: expected comma-separated numbers, got {text!r}") from None


def sampler_for(p: Preset) -> R.CurriculumSampler:
    return R.CurriculumSampler(p.midtrain_steps, floats(p.rmt_tiers, "rmt_tiers"),
                               floats(p.rmt_mix_start, "rmt_mix_start"),
                               floats(p.rmt_mix_end, "rmt_mix_end"))


def budget_at(p: Preset, step: int) -> int:
    return R.token_budget(step, p.midtrain_steps, p.rmt_budget0, p.rmt_budget_min, p.rmt_gamma)


# ----------------------------------------------------------------------------- rollouts


class Rollouts(NamedTuple):
    prompt: Tensor  # [R, P] left-padded prefixes, each followed by '<'
    pad: Tensor  # [R] padding slots on the left
    gen: Tensor  # [R, n] generated tokens (PAD after the prediction)
    action: Tensor  # [R, n] True where the policy sampled the token (not forced, not padding)
    thought_len: Tensor  # [R] thought tokens between '<' and '>'
    pred: Tensor  # [R] the predicted token (after '>')
    forced_close: Tensor  # [R] the thought hit the cap and '>' was forced

    def training_batch(self) -> tuple[Tensor, Tensor]:
        """``(inputs, actions)`` for the policy-gradient forward: the sequences without their
        last token, and the sampled tokens at the slots that predict them
        (``IGNORE_INDEX`` elsewhere)."""
        full = torch.cat([self.prompt, self.gen], dim=1)
        actions = torch.full_like(full, D.IGNORE_INDEX)
        p = self.prompt.shape[1]
        actions[:, p:] = torch.where(self.action, self.gen, D.IGNORE_INDEX)
        return full[:, :-1], actions[:, 1:]


def left_pad(prefixes: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Prefixes (1-D token ids) as one left-padded batch ``[R, P]`` and each row's padding."""
    width = max(int(x.numel()) for x in prefixes)
    batch = torch.full((len(prefixes), width), D.PAD_ID, dtype=torch.long)
    pad = torch.empty(len(prefixes), dtype=torch.long)
    for i, x in enumerate(prefixes):
        pad[i] = width - x.numel()
        batch[i, pad[i]:] = x.cpu()
    return batch.to(device), pad.to(device)


@torch.no_grad()
def rollout(model, prefixes: list[Tensor], cap: int, temperature: float,
            generator: Optional[torch.Generator], device: torch.device,
            text_only: bool = True) -> Rollouts:
    """One rollout per prefix: '<', a thought of at most ``cap`` tokens, '>', a prediction.
    ``temperature == 0`` decodes greedily. Generation stops once every row has predicted.
    With ``text_only`` (ours) a thought never samples '<' and the prediction is never '<' or
    '>' (sampled from the policy restricted to the other tokens)."""
    model = unwrap(model)
    opened = [torch.cat([x.cpu(), torch.tensor([D.THINK_OPEN_ID])]) for x in prefixes]
    prompt, pad = left_pad(opened, device)
    n_rows, width = prompt.shape
    cache: list = []
    logits = model(prompt, cache, pad=pad)[:, -1].float()
    phase = torch.zeros(n_rows, dtype=torch.long, device=device)  # 0 think, 1 predict, 2 done
    ell = torch.zeros(n_rows, dtype=torch.long, device=device)
    pred = torch.full((n_rows,), D.PAD_ID, dtype=torch.long, device=device)
    forced = torch.zeros(n_rows, dtype=torch.bool, device=device)
    gen, act = [], []
    for i in range(cap + 2):
        if text_only:
            # No '<' inside a thought, and a prediction that is a text token: the only '>'
            # ever sampled is the one closing the thought.
            ban = torch.zeros_like(logits, dtype=torch.bool)
            ban[:, D.THINK_OPEN_ID] = True
            ban[:, D.THINK_CLOSE_ID] = phase == 1
            logits = logits.masked_fill(ban, float("-inf"))
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            tok = logits.argmax(dim=-1)
        thinking, predicting, done = phase == 0, phase == 1, phase == 2
        force = thinking & (ell >= cap)
        tok = torch.where(force, D.THINK_CLOSE_ID, tok)
        tok = torch.where(done, D.PAD_ID, tok)
        closes = thinking & (tok == D.THINK_CLOSE_ID)
        forced |= force
        ell += (thinking & ~closes).long()
        pred = torch.where(predicting, tok, pred)
        phase = torch.where(closes, 1, torch.where(predicting, 2, phase))
        gen.append(tok)
        act.append(~done & ~force)
        # A host check every few tokens (not every one) to stop once all rows are done.
        if i + 1 < cap + 2 and (i % 4 == 3) and bool((phase == 2).all()):
            break
        if i + 1 < cap + 2:
            logits = model(tok[:, None], cache, start=width + i, pad=pad)[:, -1].float()
    gen_t, act_t = torch.stack(gen, dim=1), torch.stack(act, dim=1)
    # Trailing columns where every row was already done carry no action.
    keep = int(act_t.any(dim=0).nonzero().max()) + 1 if bool(act_t.any()) else 1
    return Rollouts(prompt, pad, gen_t[:, :keep], act_t[:, :keep], ell, pred, forced)


def rollout_prefixes(inputs: Tensor, flat_positions: Tensor, group: int) -> list[Tensor]:
    """The text prefix ending at each sampled position (the input token there included), each
    repeated ``group`` times (groups consecutive)."""
    length = inputs.shape[1]
    out = []
    for pos in flat_positions.tolist():
        r, t = divmod(pos, length)
        out += [inputs[r, :t + 1]] * group
    return out


# ----------------------------------------------------------------------------- held-out probe


class TierProbe:
    """Held-out positions per entropy tier, fixed by the base model, and next-token accuracy on
    them: direct, and after a greedy thought of at most ``cap`` tokens."""

    def __init__(self, p: Preset, base_model, device: torch.device, backend: str = "auto"):
        rng = random.Random(f"remit_ext/rmt-probe/{p.seed}")
        problems = D.generate_problems("eval", p.n_eval, p.seed, p.max_k)
        # The mid-training mix of styles (a quarter answer-only), on held-out problems.
        texts = [q.text("answer" if rng.random() < 0.25 else "worked") for q in problems]
        self.inputs, self.targets = D.pack_rows(texts, p.seq_len)
        self.device, self.backend = device, backend
        self.cap = 2 * p.rmt_budget0
        entropy = self._entropy(base_model, p.rmt_topk)
        sampler = sampler_for(p)
        # The positions training's RL may draw from (rl_candidates), tiered by the base model.
        tiers = sampler.tiers(entropy, rl_candidates(p, self.inputs, self.targets)).reshape(-1)
        g = torch.Generator().manual_seed(p.seed)
        picks, tier_of = [], []
        for i in range(len(sampler.thresholds)):
            idx = (tiers == i).nonzero().flatten()
            idx = idx[torch.randperm(idx.numel(), generator=g)[:p.rmt_eval_positions]]
            picks.append(idx)
            tier_of.append(torch.full_like(idx, i))
        self.positions, self.tier = torch.cat(picks), torch.cat(tier_of)
        self.names = R.TIER_NAMES if len(sampler.thresholds) == 3 else tuple(
            f"tier{i}" for i in range(len(sampler.thresholds)))

    @torch.no_grad()
    def _entropy(self, model, topk: int) -> Tensor:
        model = unwrap(model)
        was = model.training
        model.eval()
        out = torch.empty(self.targets.shape, dtype=torch.float32)
        for i in range(0, len(self.inputs), 256):
            x = self.inputs[i:i + 256].to(self.device)
            y = self.targets[i:i + 256].to(self.device)
            out[i:i + 256] = R.token_entropy(model(x).float(), y, topk=topk or None,
                                             backend=self.backend).cpu()
        model.train(was)
        return out

    @torch.no_grad()
    def __call__(self, model) -> dict:
        model = unwrap(model)
        was = model.training
        model.eval()
        length = self.inputs.shape[1]
        rows, cols = self.positions // length, self.positions % length
        truth = self.targets[rows, cols]
        logits = model(self.inputs[rows].to(self.device)).float()
        direct = logits[torch.arange(len(rows)), cols.to(self.device)].argmax(-1).cpu() == truth
        ro = rollout(model, rollout_prefixes(self.inputs, self.positions, 1), self.cap, 0.0,
                     None, self.device)
        reasoned = ro.pred.cpu() == truth
        out = {}
        for i, name in enumerate(self.names):
            sel = self.tier == i
            n = int(sel.sum())
            out[f"tok_acc_{name}"] = float(direct[sel].float().mean()) if n else None
            out[f"tok_acc_think_{name}"] = float(reasoned[sel].float().mean()) if n else None
            out[f"n_{name}"] = n
        out["tok_acc"] = float(direct.float().mean())
        out["tok_acc_think"] = float(reasoned.float().mean())
        out["think_len"] = float(ro.thought_len.float().mean())
        out["think_capped"] = float(ro.forced_close.float().mean())
        model.train(was)
        return out


# ----------------------------------------------------------------------------- the stage


class _Optimizers:
    """The NTP term's optimizer and the RL term's own (``rmt_rl_lr``), checkpointed as one."""

    def __init__(self, ntp: torch.optim.Optimizer, rl: Optional[torch.optim.Optimizer]):
        self.ntp, self.rl = ntp, rl

    def state_dict(self) -> dict:
        return {"ntp": self.ntp.state_dict(),
                "rl": None if self.rl is None else self.rl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ntp.load_state_dict(state["ntp"])
        if self.rl is not None:
            self.rl.load_state_dict(state["rl"])


def rl_candidates(p: Preset, inputs: Tensor, targets: Tensor) -> Tensor:
    """Positions RL may sample: every valid one (``rmt_where=all``), or only those where a
    thought can help (``critical``, ours): a step's result digit and the answer digit."""
    valid = targets != D.IGNORE_INDEX
    if p.rmt_where == "all":
        return valid
    if p.rmt_where != "critical":
        raise ValueError(f"--set rmt_where: expected 'critical' or 'all', got {p.rmt_where!r}")
    return valid & (D.token_roles(inputs.cpu()).to(valid.device) > 0)


def midtrain_rmt(c, init: Path) -> Path:
    """Mid-training with RMT from the base model ``init`` (same data, steps and learning-rate
    decay as the other mid-training methods).

    Our deviations (presets.py marks each): the loss divides both terms' sums by the batch's
    valid-position count (``rmt_normalize=position``); advantages by ``rmt_advantage``; RL
    positions drawn from ``rl_candidates``; rollouts that never sample '<' inside a thought nor
    '<'/'>' as the prediction; and with ``rmt_rl_lr > 0`` the RL term steps its own AdamW at
    that rate (decayed like the mid-training rate, clipped on its own, no weight decay), the
    NTP term the mid-training AdamW. ``rmt_rl_lr = 0``: one optimizer over the summed loss.
    """
    p, d = c.preset, get_dist(c.device)
    apply_threads(p)
    cfg = {"stage": "midtrain", "method": "rmt", "init": str(init),
           "fused_linear": c.fused_linear, "scorer": None, "scorer_cache": None, **p.to_dict()}
    run = StageRun(c.out, "midtrain-rmt", cfg, d, p.midtrain_steps, p.ckpt_every, c.progress)
    if run.done:
        return c.out
    if c.fused_linear:
        raise ValueError("--fused-linear: RMT's rollouts need the logits of every sampled "
                         "token; run --method rmt without it")
    inputs, targets = dataset(p, "midtrain")
    sampler = sampler_for(p)
    model = load_model(init, d.device)
    probe = TierProbe(p, model, d.device, c.backend) if d.is_main else None
    opt = make_optimizer(model, p.lr)
    opt_rl = (torch.optim.AdamW(model.parameters(), lr=p.rmt_rl_lr, betas=(0.9, 0.95),
                                weight_decay=0.0) if p.rmt_rl_lr > 0 else None)
    opts = _Optimizers(opt, opt_rl)
    start = run.resume(model, opts)
    ddp = d.wrap(model)
    g_size = p.rmt_group
    n_local = max(1, p.rmt_positions // d.world)
    step_seconds = []
    with run.steps(start, model, opts) as steps:
        for step in steps:
            t0 = clock(d.device)
            _, x, y = midtrain_batch(p, d, opt, inputs, targets, step)
            if opt_rl is not None:
                set_lr(opt_rl, p.rmt_rl_lr * (1 - step / p.midtrain_steps))
            logits = ddp(x).float()
            entropy = R.token_entropy(logits, y, topk=p.rmt_topk or None, backend=c.backend)
            pos, tier = sampler.sample(entropy, rl_candidates(p, x, y), n_local, step,
                                       step_generator(p.seed, "rmt-positions", step, d.rank))
            budget = budget_at(p, step)
            metrics = {"budget": budget, "mix_hard": sampler.mix(step)[-1]}
            # Per-position normalisation: the global valid count over the world size (DDP
            # averages the ranks' gradients).
            num_items = (global_num_items(y, ignore_index=D.IGNORE_INDEX, per_rank=True)
                         if d.world > 1 else None)
            if pos.numel():
                ro = rollout(ddp, rollout_prefixes(x.cpu(), pos, g_size), 2 * budget,
                             p.rmt_temperature,
                             step_generator(p.seed, "rmt-sample", step, d.rank, d.device),
                             d.device, text_only=bool(p.rmt_text_only))
                truth = y.reshape(-1)[pos.to(d.device)].repeat_interleave(g_size)
                match = ro.pred == truth
                reward = R.rmt_reward(match, ro.thought_len, budget, p.rmt_omega,
                                      gate=p.rmt_advantage == "gate")
                adv = R.rmt_advantages(match.view(-1, g_size), ro.thought_len.view(-1, g_size),
                                       budget, p.rmt_omega, p.rmt_advantage).view(-1)
                r_in, r_act = ro.training_batch()
                # The rollouts' forward goes through the unwrapped model (its gradient is
                # reduced by hand, or with the NTP term's by one DDP backward of the sum).
                r_logits = unwrap(ddp)(r_in, pad=ro.pad).float()
                out = R.rmt_loss(r_logits, r_act, adv, logits, y, pos, group_size=g_size,
                                 lam=p.rmt_lambda, token_mean=bool(p.rmt_token_mean),
                                 ignore_index=D.IGNORE_INDEX, normalize=p.rmt_normalize,
                                 num_items_in_batch=num_items, backend=c.backend)
                rl_term, ntp_term = out.rl, out.ntp
                same = match.view(-1, g_size)
                metrics.update(rl_loss=out.rl.detach(), ntp_loss=out.ntp.detach(),
                               reward=reward.mean(), match=match.float().mean(),
                               uniform_groups=(same.all(1) | ~same.any(1)).float().mean(),
                               think_len=ro.thought_len.float().mean(),
                               think_capped=ro.forced_close.float().mean(),
                               **{f"frac_{n}": float((tier == i).float().mean())
                                  for i, n in enumerate(R.TIER_NAMES[:len(sampler.thresholds)])})
            else:  # no candidate position in any tier: NTP on everything
                rl_term = None
                ntp_term = R.ntp_rest_loss(logits, y, pos, p.rmt_lambda,
                                           num_items_in_batch=(num_items if p.rmt_normalize ==
                                                               "position" else None),
                                           backend=c.backend)
                metrics.update(ntp_loss=ntp_term.detach())
            loss = ntp_term if rl_term is None else rl_term + ntp_term
            if opt_rl is None or rl_term is None:
                loss.backward()
                norm = clip_and_step(ddp, opt)
            else:
                rl = _rl_grads(model, rl_term, d)
                ntp_term.backward()
                norm = clip_and_step(ddp, opt)
                _rl_step(rl, opt_rl)
                metrics["rl_grad_norm"] = rl[0]
            step_seconds.append(clock(d.device) - t0)
            log_step(run, d, step, p.eval_every,
                     {"loss": loss.detach(), "grad_norm": norm, **metrics}, model, p, c,
                     probe=probe)
    extra = {"method": "rmt", "step_seconds": median(step_seconds),
             "probe": probe(model) if probe is not None else None}
    finish_stage(run, d, model, p, c, extra)
    return c.out


def _rl_grads(model, rl_term: Tensor, d) -> tuple[Tensor, list]:
    """The RL term's gradients (``torch.autograd.grad``: nothing accumulates into ``.grad``
    and DDP's hooks do not fire), averaged over ranks and clipped to norm 1; returns
    (pre-clip norm, [(parameter, gradient)])."""
    params = [q for q in model.parameters() if q.requires_grad]
    grads = torch.autograd.grad(rl_term, params, allow_unused=True)
    pairs = [(q, g) for q, g in zip(params, grads) if g is not None]
    if d.world > 1 and pairs:
        flat = torch.cat([g.flatten() for _, g in pairs])
        dist.all_reduce(flat)
        flat /= d.world
        offset, out = 0, []
        for q, g in pairs:
            out.append((q, flat[offset:offset + g.numel()].view_as(g)))
            offset += g.numel()
        pairs = out
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, g in pairs]))
    coef = torch.clamp(1.0 / (norm + 1e-6), max=1.0)
    return norm.detach(), [(q, g * coef) for q, g in pairs]


def _rl_step(rl: tuple, opt_rl: torch.optim.Optimizer) -> None:
    """The RL term's own optimizer step on the gradients ``_rl_grads`` computed."""
    for q, g in rl[1]:
        q.grad = g
    opt_rl.step()
    opt_rl.zero_grad(set_to_none=True)
