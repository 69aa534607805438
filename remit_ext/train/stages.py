"""The flywheel's stages: pretrain, rl, score, midtrain, eval.

Every loss below is one of remit_ext's own (``weighted_cross_entropy``, ``remit_loss``,
``rho1_loss``, ``kd_loss``): the training loop is a user of the library, not a second
implementation of it. The RL policy gradient is a weighted cross-entropy over the sampled
tokens with weight ``A_i / (B G max_new)`` (the group-whitened advantage clipped at 0 over a
constant; ours, issue 24: ``rl_advantage`` / ``rl_normalize`` give GRPO's ``A_i / (G L_i)``
with +/- advantages back).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

import remit_ext
from remit_ext.parallel import global_num_items, reduce_diagnostics
from remit_ext.rmt import group_advantages

from . import data as D
from .loop import (Common, apply_threads, batch_rows, clip_and_step, clock, dataset, evaluate,
                   finish_stage, frozen_logprobs, load_model, log_step, make_optimizer,
                   median, midtrain_batch, new_model, set_lr)
from .parallel_setup import ParallelDist, parallel_dist
from .rmt_stage import midtrain_rmt
from .runtime import StageRun, get_dist, atomic_save, load, step_generator, unwrap

__all__ = ["METHODS", "Common", "evaluate", "load_model", "new_model", "pretrain", "rl",
           "score", "frozen_logprobs", "load_scorer_cache", "midtrain"]

METHODS = ("ntp", "remit", "rho1", "kd", "rmt")


# ----------------------------------------------------------------------------- pretrain


def pretrain(c: Common) -> Path:
    """Next-token prediction on the noisy pre-training split; warmup then a constant rate."""
    p, d = c.preset, get_dist(c.device)
    apply_threads(p)
    run = StageRun(c.out, "pretrain", {"stage": "pretrain", **p.to_dict()}, d,
                   p.pretrain_steps, p.ckpt_every, c.progress)
    if run.done:
        return c.out
    inputs, targets = dataset(p, "pretrain")
    model = new_model(p, d.device)
    opt = make_optimizer(model, p.lr)
    start = run.resume(model, opt)
    ddp = d.wrap(model)
    with run.steps(start, model, opt) as steps:
        for step in steps:
            set_lr(opt, p.lr * min(1.0, (step + 1) / max(1, p.warmup)))
            rows = d.shard(batch_rows(p, "pretrain", step, len(inputs), p.batch))
            x, y = inputs[rows].to(d.device), targets[rows].to(d.device)
            loss = remit_ext.weighted_cross_entropy(ddp(x), y, backend=c.backend)
            loss.backward()
            norm = clip_and_step(ddp, opt)
            log_step(run, d, step, 0, {"loss": loss.detach(), "grad_norm": norm},
                      model, p, c)
    finish_stage(run, d, model, p, c)
    return c.out


# ----------------------------------------------------------------------------- RL


RL_ADVANTAGES = ("positive", "whiten")
RL_NORMALIZE = ("constant", "length")


def rl_lr(p, step: int) -> float:
    """The RL rate at ``step``: a linear warm-up over ``rl_warmup`` steps, then constant
    (``rl_decay=0``) or a linear decay to 0 at the last step (ours, issue 24)."""
    warm = min(1.0, (step + 1) / p.rl_warmup) if p.rl_warmup > 0 else 1.0
    if not p.rl_decay or step < p.rl_warmup:
        return p.rl_lr * warm
    span = max(1, p.rl_steps - p.rl_warmup)
    return p.rl_lr * max(0.0, 1 - (step - p.rl_warmup) / span)


def rl_token_weights(reward: Tensor, lengths: Tensor, g_size: int, max_new: int,
                     advantage: str = "positive", normalize: str = "constant") -> Tensor:
    """Per-rollout token weight of the policy gradient ``[B * G]``: the group-whitened
    advantage (``positive``: clipped at 0) over ``B G max_new`` (``constant``) or ``B G L_i``
    (``length``, GRPO's per-rollout mean)."""
    if advantage not in RL_ADVANTAGES:
        raise ValueError(f"rl_advantage: expected one of {RL_ADVANTAGES}, got {advantage!r}")
    if normalize not in RL_NORMALIZE:
        raise ValueError(f"rl_normalize: expected one of {RL_NORMALIZE}, got {normalize!r}")
    adv = group_advantages(reward.view(-1, g_size)).view(-1)
    if advantage == "positive":
        adv = adv.clamp(min=0)
    n = reward.numel()
    denom = (lengths.clamp(min=1).to(adv.dtype) if normalize == "length"
             else torch.full_like(adv, float(max_new)))
    return adv / (n * denom)


def rl(c: Common, init: Path, stream: str = "rl") -> Path:
    """Group-relative policy gradient on exact-answer reward (the scorer for mid-training).

    Each step draws one difficulty, ``rl_prompts`` questions of it (split over ranks) and
    ``rl_group`` sampled completions per question; the loss is ``-sum_i w_i sum_t
    log pi(token_t)`` over the completion tokens with ``rl_token_weights``, at ``rl_lr``'s
    schedule. ``stream`` names the random stream of prompts and samples: the post-RL runs
    take their own, so that NTP's "after RL" is not the reference's first steps.
    """
    p, d = c.preset, get_dist(c.device)
    apply_threads(p)
    rl_token_weights(torch.zeros(1), torch.ones(1), 1, 1, p.rl_advantage, p.rl_normalize)
    config = {"stage": "rl", "init": str(init), **p.to_dict()}
    if stream != "rl":
        config["stream"] = stream
    run = StageRun(c.out, "rl", config, d, p.rl_steps, p.ckpt_every, c.progress)
    if run.done:
        return c.out
    problems = D.generate_problems("rl", p.n_rl, p.seed, p.max_k)
    by_k = {k: [q for q in problems if q.difficulty == k] for k in range(1, p.max_k + 1)}
    model = load_model(init, d.device)
    opt = make_optimizer(model, p.rl_lr)
    start = run.resume(model, opt)
    ddp = d.wrap(model)
    g_size = p.rl_group
    with run.steps(start, model, opt) as steps:
        for step in steps:
            set_lr(opt, rl_lr(p, step))
            gen = step_generator(p.seed, stream, step)
            k = int(torch.randint(1, p.max_k + 1, (1,), generator=gen))
            pool = by_k[k]
            picks = torch.randint(0, len(pool), (p.rl_prompts,), generator=gen)
            picks = d.shard(picks)
            group = [pool[int(i)] for i in picks]
            prompt = torch.tensor([[D.NEWLINE_ID] + D.encode(q.prompt()) for q in group])
            prompt = prompt.repeat_interleave(g_size, dim=0).to(d.device)
            max_new = len(group[0].text()) - len(group[0].prompt())
            sample_gen = step_generator(p.seed, f"{stream}-sample", step, d.rank, d.device)
            completion = unwrap(ddp).generate(prompt, max_new, temperature=p.rl_temperature,
                                              generator=sample_gen)
            reward, lengths = _rewards(completion.cpu(), group, g_size)
            seq = torch.cat([prompt, completion.to(d.device)], dim=1)
            x, y = seq[:, :-1], seq[:, 1:].clone()
            pos = torch.arange(y.shape[1])
            p_len = prompt.shape[1]
            keep = (pos >= p_len - 1) & (pos < p_len - 1 + lengths[:, None])
            y[~keep.to(d.device)] = D.IGNORE_INDEX
            w = rl_token_weights(reward, lengths, g_size, max_new, p.rl_advantage,
                                 p.rl_normalize)[:, None].expand_as(y)
            loss = remit_ext.weighted_cross_entropy(ddp(x), y, w.to(d.device).contiguous(),
                                                    reduction="sum", backend=c.backend)
            loss.backward()
            norm = clip_and_step(ddp, opt)
            log_step(run, d, step, 0,
                      {"reward": float(reward.mean()), "difficulty": k,
                       "length": float(lengths.float().mean()), "grad_norm": norm},
                      model, p, c)
    finish_stage(run, d, model, p, c)
    return c.out


def _rewards(completion: Tensor, group: list, g_size: int) -> tuple[Tensor, Tensor]:
    """Exact-answer reward per rollout and its length up to the newline after the answer."""
    rewards, lengths = [], []
    for i, row in enumerate(completion):
        text = D.decode(row)
        q = group[i // g_size]
        rewards.append(float(D.parse_answer(text) == q.answer))
        at = text.find("A:")
        end = text.find("\n", at) if at >= 0 else -1
        lengths.append(end + 1 if end >= 0 else len(text))
    return torch.tensor(rewards), torch.tensor(lengths)


# ----------------------------------------------------------------------------- score


@torch.no_grad()
def score(c: Common, scorer: Path) -> Path:
    """Precompute the scorer's log-prob of every mid-training target into ``c.out`` (a file),
    which ``midtrain --scorer-cache`` reads instead of running the scorer."""
    p, d = c.preset, get_dist(c.device)
    apply_threads(p)
    if not d.is_main:  # one process scores; the others wait for its file
        d.barrier()
        return c.out
    device = d.device
    model = load_model(scorer, device).eval()
    inputs, targets = dataset(p, "midtrain")
    logprob = torch.empty(targets.shape, dtype=torch.float32)
    t0 = time.perf_counter()
    for i in range(0, len(inputs), 256):
        x, y = inputs[i:i + 256].to(device), targets[i:i + 256].to(device)
        logprob[i:i + 256] = frozen_logprobs(model, x, y, c.backend).cpu()
    seconds = time.perf_counter() - t0
    atomic_save({"logprob": logprob, "targets": targets, "scorer": str(scorer),
                 "seconds": seconds, "preset": p.to_dict()}, c.out)
    d.barrier()
    return c.out


def load_scorer_cache(path: Path, targets: Tensor) -> Tensor:
    cache = load(path)
    if not torch.equal(cache["targets"], targets):
        raise ValueError(f"--scorer-cache: {path} was computed for another mid-training dataset "
                         f"(targets differ: other preset, seed or sizes); re-run `remit-ext score`")
    return cache["logprob"]


# ----------------------------------------------------------------------------- midtrain


def midtrain(c: Common, init: Path, method: str, scorer: Optional[Path] = None,
             scorer_cache: Optional[Path] = None) -> Path:
    """Mid-training of the base model on the high-quality split with a rapid (linear to zero)
    learning-rate decay, under one of METHODS: vanilla NTP, ReMiT, Rho-1 or KD, the last three
    steered by the RL model (live, or through its cached log-probs for ReMiT and Rho-1), or RMT
    (``remit_ext.train.rmt_stage``: RL on entropy-sampled positions plus NTP, no scorer)."""
    if method not in METHODS:
        raise ValueError(f"--method: expected one of {METHODS}, got {method!r}")
    if method == "rmt":
        if c.fsdp or c.tp != 1 or c.cp != 1:
            raise ValueError("--method rmt: takes no --fsdp / --tp / --cp")
        if scorer is not None or scorer_cache is not None:
            raise ValueError("--method rmt: takes no --scorer or --scorer-cache (its reward is "
                             "the text's own next token)")
        return midtrain_rmt(c, init)
    if method != "ntp" and scorer is None and scorer_cache is None:
        raise ValueError(f"--method {method}: expected --scorer (the RL model) or --scorer-cache")
    if method == "kd" and scorer is None:
        raise ValueError("--method kd: expected --scorer (distillation needs the teacher's full "
                         "distribution, which a log-prob cache does not hold)")
    p = c.preset
    # --fsdp / --tp / --cp: the (dp, cp, tp) mesh (parallel_setup); else the plain Dist (DDP).
    d = parallel_dist(get_dist(c.device), c.fsdp, c.tp, c.cp)
    par = d if isinstance(d, ParallelDist) else None
    if par is not None:
        par.check_method(method, c.fused_linear)
    apply_threads(p)
    cfg = {"stage": "midtrain", "method": method, "init": str(init),
           "fused_linear": c.fused_linear,
           **({"fsdp": c.fsdp, "tp": c.tp, "cp": c.cp} if par is not None else {}),
           "scorer": None if scorer is None else str(scorer),
           "scorer_cache": None if scorer_cache is None else str(scorer_cache), **p.to_dict()}
    run = StageRun(c.out, f"midtrain-{method}", cfg, d, p.midtrain_steps, p.ckpt_every,
                   c.progress)
    if run.done:
        return c.out
    inputs, targets = dataset(p, "midtrain")
    roles = D.token_roles(inputs)
    cached = None
    teacher = None
    if method != "ntp":
        if scorer_cache is not None and method != "kd":
            cached = load_scorer_cache(scorer_cache, targets)
        else:
            teacher = load_model(scorer, d.device).eval()
    model = load_model(init, d.device)
    opt = make_optimizer(model, p.lr)
    # Weight statistics over the whole run (ReMiT): a histogram and the mean per token role,
    # kept in the checkpoints so that a resumed run reports the same totals.
    bins = torch.linspace(1 - p.eps, 1 + p.eps, 41)
    hist = torch.zeros(40, dtype=torch.float64, device=d.device)
    role_sum = torch.zeros(len(D.ROLES), dtype=torch.float64, device=d.device)
    role_n = torch.zeros(len(D.ROLES), dtype=torch.float64, device=d.device)
    run.extra_state.update(hist=hist, role_sum=role_sum, role_n=role_n)
    start = run.resume(model, opt)
    ddp = d.wrap(model) if par is None else par.wrap(model, opt)
    step_seconds = []
    with run.steps(start, model, opt) as steps:
        for step in steps:
            t0 = clock(d.device)
            rows, x, y = midtrain_batch(p, d, opt, inputs, targets, step)
            b = None if cached is None else cached[rows].to(d.device)
            metrics = {}
            loss_fn = _fused_linear_loss if c.fused_linear else _logits_loss
            # Under DDP: the global valid-token count over the world size, so that the averaged
            # gradients are those of the global batch's mean whatever each shard's count (Rho-1
            # divides by the number kept, per call: left local).
            cols = slice(None)
            if par is not None:
                # This rank's positions (cp), vocab shard (tp); reduced diagnostics.
                loss, out, y, cols = par.midtrain_loss(ddp, model, teacher, x, y, b, method, p,
                                                       c.backend, c.fused_linear)
            else:
                num_items = (global_num_items(y, ignore_index=D.IGNORE_INDEX, per_rank=True)
                             if d.world > 1 and method != "rho1" else None)
                loss, out = loss_fn(ddp, model, teacher, x, y, b, method, p, c.backend,
                                    num_items)
            if method == "remit":
                diag = out.diagnostics
                if d.world > 1 and par is None:
                    # Over every rank's tokens, not a mean of per-rank means (issue 17).
                    diag = reduce_diagnostics(diag, y, dist.group.WORLD,
                                              ignore_index=D.IGNORE_INDEX)
                metrics.update(diag._asdict())
                # Accumulated where the weights live: no copy to the host per step; under DDP
                # the step's counts of all ranks (one all_reduce), so every rank, and rank 0's
                # checkpoint and report, hold the totals of the whole global batch.
                valid = y != D.IGNORE_INDEX
                w = out.weights.detach().double()
                r = torch.where(valid, roles[rows][:, cols].to(d.device), 0).flatten()
                inc = torch.cat([
                    torch.histc(w[valid], 40, 1 - p.eps, 1 + p.eps),
                    torch.zeros_like(role_sum).index_add_(0, r, (w * valid).flatten()),
                    torch.zeros_like(role_n).index_add_(0, r, valid.flatten().double())])
                if par is not None:
                    par.reduce_counts(inc)  # over dp x cp (tp ranks hold the same tokens)
                elif d.world > 1:
                    dist.all_reduce(inc)
                hist += inc[:40]
                role_sum += inc[40:40 + len(role_sum)]
                role_n += inc[40 + len(role_sum):]
                # This step's mean weight on step results and answers (the learning curve of
                # the reference's steer: early up-weighting fading as the learner catches up).
                step_sum, step_n = inc[40:40 + len(role_sum)], inc[40 + len(role_sum):]
                metrics["w_result"] = step_sum[1] / step_n[1].clamp(min=1)
                metrics["w_answer"] = step_sum[2] / step_n[2].clamp(min=1)
            loss.backward()
            norm = clip_and_step(ddp, opt) if par is None else par.clip_and_step(ddp, opt)
            step_seconds.append(clock(d.device) - t0)
            log_step(run, d, step, p.eval_every,
                      {"loss": loss.detach(), "grad_norm": norm, **metrics}, model, p, c)
    extra = {"method": method, "step_seconds": median(step_seconds)}
    if method == "remit":
        extra["weights"] = {"bins": bins.tolist(), "hist": hist.tolist(),
                            "role_mean": {name: float(role_sum[i] / role_n[i]) if role_n[i] else
                                          math.nan for i, name in enumerate(D.ROLES)}}
    finish_stage(run, d, model, p, c, extra)
    return c.out


def _logits_loss(ddp, model, teacher, x, y, b, method, p, backend, num_items=None):
    """A mid-training method's loss from the [B, T, V] logits; returns (loss, ReMiT details or
    None). A live scorer gives ReMiT and Rho-1 its log-probs (``frozen_logprobs``), KD its
    logits."""
    logits = ddp(x).float()
    t_logits = None
    if teacher is not None and method in ("remit", "rho1"):
        b = frozen_logprobs(teacher, x, y, backend)
    elif teacher is not None:
        with torch.no_grad():
            t_logits = teacher(x).float()
    if method == "ntp":
        return remit_ext.weighted_cross_entropy(logits, y, num_items_in_batch=num_items,
                                                backend=backend), None
    if method == "remit":
        out = remit_ext.remit_loss(logits, y, scorer_logits=t_logits, scorer_logprobs=b,
                                   eps=p.eps, num_items_in_batch=num_items,
                                   return_details=True, backend=backend)
        return out.loss, out
    if method == "rho1":
        return remit_ext.rho1_loss(logits, y, ref_logits=t_logits, ref_logprobs=b,
                                   keep_ratio=p.keep_ratio, backend=backend), None
    return remit_ext.kd_loss(logits, t_logits, y, temperature=p.kd_temperature,
                             num_items_in_batch=num_items, backend=backend), None


def _fused_linear_loss(ddp, model, teacher, x, y, b, method, p, backend, num_items=None):
    """The same objective through ``remit_linear_loss``: the model's hidden states and LM head
    (and the scorer's) go in, the [B, T, V] logits are never held."""
    h = ddp(x, hidden_only=True)
    s_h = s_w = None
    if teacher is not None:
        with torch.no_grad():
            s_h, s_w = teacher(x, hidden_only=True), teacher.head.weight
    kw = {"eps": p.eps} if method == "remit" else (
        {"keep_ratio": p.keep_ratio} if method == "rho1" else
        {"temperature": p.kd_temperature} if method == "kd" else {})
    res = remit_ext.remit_linear_loss(
        h, model.head.weight, y, scorer_hidden=s_h, scorer_weight=s_w,
        scorer_logprobs=b if method in ("remit", "rho1") else None, method=method,
        num_items_in_batch=num_items, return_details=method == "remit", backend=backend, **kw)
    return (res.loss, res) if method == "remit" else (res, None)


