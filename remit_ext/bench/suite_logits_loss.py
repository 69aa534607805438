"""Logits-level losses, forward + backward to the ``[N, V]`` logits (bf16/fp32 in, gradient in
the logits' dtype). The floor counts the passes over ``N x V`` each op cannot avoid:

- ``ce_bwd``: the gradient pass alone (``weighted_ce_bwd``: read logits, write gradient), 2;
- ``weighted_ce``: per-token weighted cross-entropy (read, read, write), 3;
- ``remit_loss``: ReMiT with the scorer's logits (read policy, read scorer, read policy, write
  gradient), 4;
- ``remit_loss_lp``: ReMiT with precomputed scorer log-probs, 3;
- ``pg_loss``: PPO-clipped policy-gradient loss (RMT/GRPO) with old log-probs, 3.

Checked against the reference: the loss and the logits gradient. ``eager`` is plain PyTorch
(``eager.py``: ``F.cross_entropy(reduction="none")``, the weights as tensor ops; ce_bwd
written by hand: softmax, scatter, mask); ``compile`` compiles exactly that. ``<backend>_inplace``
rows write the gradient into the logits buffer (``inplace_backward=True``), and Liger's forward
does so too; for those the logits are restored between calls, outside the timed region. Liger
and QuACK: their ``cross_entropy(reduction="none")`` for ``-log p`` (the scorer's under
no_grad), weights from ``remit_ext.remit_weights``, then ``sum(w * nll) / n_valid``.

    remit-ext bench --quick --ops logits_loss      # or python -m remit_ext.bench
"""

from __future__ import annotations

import importlib


import torch

import remit_ext
from remit_ext._backends import BACKENDS
from . import eager as E
from . import providers as P
from .runner import Case, Context, Family, fwd_bwd

IGNORE = -100
OPS = ("ce_bwd", "weighted_ce", "remit_loss", "remit_loss_lp", "pg_loss")


def build(ctx: Context) -> list:
    n, v = ctx.shape
    g = ctx.generator()
    logits, scorer = ctx.normal(n, v, scale=2.0, g=g), ctx.normal(n, v, scale=2.0, g=g)
    y = ctx.targets(n, v, g)  # [sequences, tokens]
    z3 = logits.view(*y.shape, v).requires_grad_(True)
    s3 = scorer.view(*y.shape, v)
    yf = y.view(-1)
    valid = yf != IGNORE
    nvb = n * v * logits.element_size()
    with torch.no_grad():
        st = remit_ext.token_stats(logits, yf, scorer_logits=scorer, backend="torch")
    lse, lp, scorer_lp = st.lse, st.logprob, st.scorer_logprob.view(y.shape)
    w = torch.empty(y.shape, device=ctx.device).uniform_(0.8, 1.2, generator=g)
    coef = w.view(-1).clone()
    adv = torch.empty(y.shape, device=ctx.device).normal_(generator=g)
    old = (lp.view(y.shape) + torch.empty(y.shape, device=ctx.device).normal_(0, 0.1, generator=g))
    saved = {}

    def restore():
        with torch.no_grad():
            z3.copy_(saved["z"])

    def loss_fn(op, backend, inplace=False):
        kw = {"backend": backend, **({"inplace_backward": True} if inplace else {})}
        if op == "weighted_ce":
            return lambda: remit_ext.weighted_cross_entropy(z3, y, w, **kw)
        if op == "remit_loss":
            return lambda: remit_ext.remit_loss(z3, y, scorer_logits=s3, **kw)
        if op == "remit_loss_lp":
            return lambda: remit_ext.remit_loss(z3, y, scorer_logprobs=scorer_lp, **kw)
        return lambda: remit_ext.policy_gradient_loss(z3, y, adv, old_logprobs=old, **kw)

    def plain(op):  # (function, its tensor arguments after the logits)
        if op == "weighted_ce":
            return E.weighted_ce, (y, w)
        if op == "remit_loss":
            return (lambda z, t, s: E.remit_loss(z, t, scorer_logits=s)), (y, s3)
        if op == "remit_loss_lp":
            return (lambda z, t, b: E.remit_loss(z, t, scorer_logprobs=b)), (y, scorer_lp)
        return E.pg_loss, (y, adv, old)

    def library(token_nll, op):  # Liger / QuACK: per-token CE, weights applied outside
        def weighted(nll, weights):
            return (nll * weights.view(-1)).sum() / valid.sum()

        def fn():
            nll = token_nll(z3.view(n, v), yf, IGNORE)
            if op == "weighted_ce":
                return weighted(nll, w)
            if op == "remit_loss":
                with torch.no_grad():
                    b = -token_nll(scorer, yf, IGNORE).float().view(y.shape)
            else:
                b = scorer_lp
            ww = remit_ext.remit_weights(-nll.detach().float().view(y.shape), b, y).weights
            return weighted(nll, ww)
        return fn

    cases = []
    if ctx.wants("ce_bwd"):
        what = "2 passes over N x V"

        def grad_ref(z, t, c, ok):  # coef (softmax - onehot), nothing at ignored rows, in fp32
            gz = torch.softmax(z.float(), -1) * c[:, None]
            gz = gz.scatter_add(-1, torch.where(ok, t, 0)[:, None],
                                torch.where(ok, -c, 0)[:, None])
            return (gz * ok[:, None]).to(z.dtype)

        def add(provider, fn):
            # (None, gradient): no value, the gradient checked against its largest entry.
            cases.append(Case("ce_bwd", provider, lambda: (None, fn()), 2 * nvb, "GB/s", what,
                              reads=1))

        add("reference", lambda: grad_ref(logits, yf, coef, valid))
        if ctx.has("eager"):
            add("eager", lambda: E.ce_grad(logits, yf, coef))
        if "triton" in ctx.kernels:
            importlib.import_module("remit_ext.triton")  # registers torch.ops.remit_ext_triton
        for b in ctx.kernels:
            ops = BACKENDS[b].ops
            add(b, lambda ops=ops: ops.weighted_ce_bwd(logits, yf, lse, lp, coef, IGNORE))
        if ctx.has("compile"):
            add("compile", lambda f=P.compiled(E.ce_grad): f(logits, yf, coef))
    for op, passes, reads in (("weighted_ce", 3, 1), ("remit_loss", 4, 2),
                              ("remit_loss_lp", 3, 1), ("pg_loss", 3, 1)):
        if not ctx.wants(op):
            continue
        what = f"{passes} passes over N x V"

        def add(provider, loss, setup=None):
            cases.append(Case(op, provider, fwd_bwd(loss, [z3]), passes * nvb, "GB/s", what,
                              setup=setup, reads=reads))

        add("reference", loss_fn(op, "torch"))
        f, rest = plain(op)
        if ctx.has("eager"):
            add("eager", lambda f=f, rest=rest: f(z3, *rest))
        for b in ctx.kernels:
            add(b, loss_fn(op, b))
        if ctx.has("compile"):
            add("compile", lambda f=P.compiled(f), rest=rest: f(z3, *rest))
        for b in ctx.kernels:
            add(f"{b}_inplace", loss_fn(op, b, inplace=True), setup=restore)
        if op != "pg_loss":  # neither library has a policy-gradient loss
            if ctx.has("liger"):
                # Liger's forward writes the gradient into its input when that requires grad.
                add("liger", library(P.liger_token_nll, op), setup=restore)
            if ctx.has("quack"):
                add("quack", library(P.quack_token_nll, op))
    if any(c.setup is restore for c in cases):
        saved["z"] = z3.detach().clone()
    return cases


FAMILY = Family("logits_loss", OPS, 2, "copy", build)
