"""Token statistics: the scorer and policy log-probs (and entropy) from ``[N, V]`` logits.

- ``token_stats``: policy and scorer rows in one call (``remit_ext.token_stats(logits, targets,
  scorer_logits=...)``), checked on both log-probs. Floor: one read of each, 2 N V b bytes.
  eager: ``-F.cross_entropy(reduction="none")`` of each under no_grad. Liger / QuACK: two
  ``cross_entropy(reduction="none")`` calls under no_grad.
- ``token_entropy``: the policy's log-prob and full entropy (RMT's key-token selection),
  checked on both. Floor: one read, N V b bytes. eager: ``log_softmax``, ``gather``,
  ``-(p log p).sum(-1)``.

    remit-ext bench --quick --ops token_stats      # or python -m remit_ext.bench
"""

from __future__ import annotations

import torch

import remit_ext
from . import eager as E
from . import providers as P
from .runner import Case, Context, Family


def build(ctx: Context) -> list:
    n, v = ctx.shape
    g = ctx.generator()
    logits, scorer = ctx.normal(n, v, scale=2.0, g=g), ctx.normal(n, v, scale=2.0, g=g)
    y = ctx.targets(n, v, g).view(-1)
    nvb = n * v * logits.element_size()
    cases = []

    def stats(backend, entropy=False):
        def fn():
            st = remit_ext.token_stats(logits, y, scorer_logits=None if entropy else scorer,
                                       entropy=entropy, backend=backend)
            return torch.stack([st.logprob, st.entropy if entropy else st.scorer_logprob])
        return fn

    def two_nll(token_nll):  # a library's per-token CE, policy and scorer, under no_grad
        def fn():
            with torch.no_grad():
                return torch.stack([-token_nll(logits, y), -token_nll(scorer, y)]).float()
        return fn

    for op, entropy, reads in (("token_stats", False, 2), ("token_entropy", True, 1)):
        if not ctx.wants(op):
            continue
        what = ("2 reads of N x V (policy, scorer)" if reads == 2 else "1 read of N x V")

        def add(provider, fn):
            cases.append(Case(op, provider, fn, reads * nvb, "GB/s", what, reads=reads))

        add("reference", stats("torch", entropy))
        plain = E.token_entropy if entropy else E.token_stats
        args = (logits, y) if entropy else (logits, y, scorer)
        if ctx.has("eager"):
            add("eager", lambda f=plain, a=args: f(*a))
        for b in ctx.kernels:
            add(b, stats(b, entropy))
        if ctx.has("compile"):
            add("compile", lambda f=P.compiled(plain), a=args: f(*a))
        if not entropy:  # neither library returns an entropy from logits
            if ctx.has("liger"):
                add("liger", two_nll(P.liger_token_nll))
            if ctx.has("quack"):
                add("quack", two_nll(P.quack_token_nll))
    return cases


FAMILY = Family("token_stats", ("token_stats", "token_entropy"), 2, "copy", build)
