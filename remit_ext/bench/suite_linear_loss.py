"""Fused-linear losses, forward + backward to the hidden states ``[N, D]`` and the LM head
``[V, D]``: the loss of ``logits = hidden @ W.T`` where remit_ext never holds ``[N, V]``.

- ``linear_ce``: plain next-token cross-entropy (mean over valid tokens);
- ``linear_remit``: ReMiT with the frozen scorer's hidden states and LM head (its logits are
  computed too, without gradient);
- ``linear_remit_lp``: ReMiT with the scorer's log-probs precomputed (offline scoring);
- ``linear_token_stats``: per-token log-prob and entropy of the policy (``linear_token_stats``),
  then the backward of ``-(A lp + 0.01 H)`` over the valid tokens with random per-token
  advantages A: the GRPO/PPO/RMT shape on hidden states.

The floor is the matrix products each must do, at the rate of a plain ``[N, D] x [D, V]``
product in the dtype measured in the same run: policy logits, grad hidden and grad W (6 N D V
flops), plus the scorer's logits for ``linear_remit`` and the logits' recompute for
``linear_token_stats`` (8 N D V). ``vs_best`` holds each op to the best published fused linear
CE rate on the GPU (``targets.py``). The checked values are the loss and both gradients.

Providers: ``eager`` (``hidden @ W.T`` materialised, then ``eager.py``'s plain PyTorch),
``compile`` (of that), remit_ext's ``remit_linear_loss`` / ``linear_token_stats`` with each
kernel backend, Liger's ``LigerFusedLinearCrossEntropyLoss`` (``reduction="none"`` per token, the
scorer's pass under no_grad, weights from ``remit_ext.remit_weights``) and FLSCE (per-token NLL +
entropy) for the statistics, Cut Cross-Entropy's ``linear_cross_entropy`` (the same way as
Liger's FLCE), and QuACK (``chunked_linear_cross_entropy`` for plain CE; per-token
``linear_cross_entropy_func`` for ReMiT).

    remit-ext bench --quick --ops linear_loss      # or python -m remit_ext.bench
"""

from __future__ import annotations

import torch

import remit_ext
from . import eager as E
from . import providers as P
from .runner import Case, Context, Family, fwd_bwd

IGNORE = -100
OPS = ("linear_ce", "linear_remit", "linear_remit_lp", "linear_token_stats")
MATMULS = {"linear_ce": 3, "linear_remit": 4, "linear_remit_lp": 3, "linear_token_stats": 4}
BONUS = 0.01  # the entropy bonus of linear_token_stats' loss


def build(ctx: Context) -> list:
    n, d, v = ctx.shape
    g = ctx.generator()
    hid = ctx.normal(n, d, g=g).requires_grad_(True)
    w = ctx.normal(v, d, scale=3 * d ** -0.5, g=g).requires_grad_(True)
    s_hid, s_w = ctx.normal(n, d, g=g), ctx.normal(v, d, scale=3.5 * d ** -0.5, g=g)
    y = ctx.targets(n, v, g)
    yf, valid = y.view(-1), y.view(-1) != IGNORE
    h3, sh3 = hid.view(*y.shape, d), s_hid.view(*y.shape, d)
    with torch.no_grad():  # offline scoring, a block of rows at a time (never [N, V] at once)
        scorer_lp = torch.cat([
            remit_ext.token_stats(s_hid[i:i + 2048] @ s_w.T, yf[i:i + 2048]).logprob
            for i in range(0, n, 2048)]).view(y.shape)

    adv = torch.empty(y.shape, device=ctx.device).normal_(generator=g)

    def reference(op):
        def fn():
            z = (hid @ w.T).view(*y.shape, -1)
            if op == "linear_ce":
                return remit_ext.weighted_cross_entropy(z, y, backend="torch")
            if op == "linear_remit_lp":
                return remit_ext.remit_loss(z, y, scorer_logprobs=scorer_lp, backend="torch")
            if op == "linear_token_stats":
                st = remit_ext.token_stats(z, y, entropy=True, backend="torch")
                return E.masked_mean(-(adv * st.logprob + BONUS * st.entropy), y != IGNORE)
            with torch.no_grad():
                sz = (s_hid @ s_w.T).view(*y.shape, -1)
            return remit_ext.remit_loss(z, y, scorer_logits=sz, backend="torch")
        return fn

    def plain(op):  # plain PyTorch on the materialised logits (what compile compiles)
        def fn(hidden, weight, targets, s_hidden, s_weight, s_lp, a):
            if op == "linear_token_stats":
                return E.linear_token_stats_loss(hidden, weight, targets, a, BONUS)
            z = (hidden @ weight.T).view(*targets.shape, -1)
            if op == "linear_ce":
                return E.masked_mean(E.nll(z, targets), targets != IGNORE)
            if op == "linear_remit_lp":
                return E.remit_loss(z, targets, scorer_logprobs=s_lp)
            with torch.no_grad():
                sz = (s_hidden @ s_weight.T).view(*targets.shape, -1)
            return E.remit_loss(z, targets, scorer_logits=sz)
        return fn

    def ours(op, backend):
        if op == "linear_token_stats":
            def stats():
                st = remit_ext.linear_token_stats(h3, w, y, entropy=True, backend=backend)
                return E.masked_mean(-(adv * st.logprob + BONUS * st.entropy), y != IGNORE)
            return stats
        kw = {"linear_ce": {"method": "ntp"},
              "linear_remit": {"scorer_hidden": sh3, "scorer_weight": s_w},
              "linear_remit_lp": {"scorer_logprobs": scorer_lp}}[op]
        return lambda: remit_ext.remit_linear_loss(h3, w, y, backend=backend, **kw)

    def external(op, linear):  # linear(hidden, weight, targets, reduction, ignore_index)
        def fn():
            if op == "linear_ce":
                return linear(hid, w, yf, "mean", IGNORE)
            nll = linear(hid, w, yf, "none", IGNORE)
            if op == "linear_remit":
                with torch.no_grad():
                    b = -linear(s_hid, s_w, yf, "none", IGNORE).float().view(y.shape)
            else:
                b = scorer_lp
            ww = remit_ext.remit_weights(-nll.detach().float().view(y.shape), b, y).weights
            return (nll * ww.view(-1)).sum() / valid.sum()
        return fn

    def liger_stats():  # FLSCE: per-token NLL and entropy, the loss on top
        nll, ent = P.liger_linear_stats(hid, w, yf, IGNORE)
        return E.masked_mean(-(adv.view(-1) * -nll + BONUS * ent.float()), valid)

    args = (hid, w, y, s_hid, s_w, scorer_lp, adv)
    cases = []
    if ctx.has("cce") and ctx.dtype == torch.float32:
        print("skipping cce at float32: its backward takes bf16/fp16 only", flush=True)
    for op in OPS:
        if not ctx.wants(op):
            continue
        flops, what = 2.0 * n * d * v * MATMULS[op], f"{2 * MATMULS[op]} N D V flops"

        def add(provider, body):
            cases.append(Case(op, provider, fwd_bwd(body, [hid, w]), flops, "TFLOP/s", what))

        add("reference", reference(op))
        if ctx.has("eager"):
            add("eager", lambda f=plain(op): f(*args))
        for b in ctx.kernels:
            add(b, ours(op, b))
        if ctx.has("compile"):
            add("compile", lambda f=P.compiled(plain(op)): f(*args))
        if op == "linear_token_stats":
            if ctx.has("liger"):
                add("liger", liger_stats)
            continue  # CCE and QuACK return no entropy
        if ctx.has("liger"):
            add("liger", external(op, P.liger_linear))
        if ctx.has("cce") and ctx.dtype != torch.float32:  # CCE's backward refuses fp32
            add("cce", external(op, P.cce_linear))
        if ctx.has("quack"):
            add("quack", external(op, P.quack_linear))
    return cases


FAMILY = Family("linear_loss", OPS, 3, "matmul", build)
