"""ReMiT weights from the policy's and the scorer's log-probs, centred per sequence.

- ``remit_weights``: sequences are the rows of ``targets`` ([N / T, T], T = --seq-len);
- ``remit_weights_varlen``: packed documents given by ``cu_seqlens``, lengths drawn uniformly
  in [1, 2 L] with mean L = min(512, T / 8), fixed per shape (e.g. about 32 documents in 16384
  tokens).

Inputs are fp32 log-probs (what ``token_stats`` returns), so the family runs at float32 only;
the shape column is N. The op moves 24 N bytes (reads both log-probs and the int64 targets,
writes the weights and the centred gaps); its floor is a device copy moving as many bytes. At
these sizes the ops are bound by launch latency, which the floor's copy pays too. eager:
``eager.py``'s vectorised weights (a mean per row, or ``index_add`` per document).

    remit-ext bench --quick --ops weights      # or python -m remit_ext.bench
"""

from __future__ import annotations

import torch

import remit_ext
from . import eager as E
from . import providers as P
from .runner import Case, Context, Family

BYTES_PER_TOKEN = 24
DOC_MEAN = 512  # mean packed-document length of the varlen case (at most --seq-len / 8)


def build(ctx: Context) -> list:
    n = ctx.shape[0]
    g = ctx.generator()
    y = ctx.targets(n, 1000, g)
    a = torch.empty(y.shape, device=ctx.device).uniform_(-12, 0, generator=g)
    b = (a + torch.empty(y.shape, device=ctx.device).normal_(0, 1, generator=g)).clamp_(max=0)
    mean_len = min(DOC_MEAN, max(1, ctx.seq_len // 8))
    lengths = torch.randint(1, 2 * mean_len + 1, (n,), generator=g, device=ctx.device)
    ends = torch.cumsum(lengths, 0)
    ends = torch.cat([ends[ends < n], ends.new_tensor([n])])
    cu = torch.cat([ends.new_zeros(1), ends])
    work, what = BYTES_PER_TOKEN * n, f"{BYTES_PER_TOKEN} N bytes"
    cases = []

    def weights(backend, varlen):
        flat = (a.view(-1), b.view(-1), y.view(-1))

        def fn():
            if varlen:
                return remit_ext.remit_weights(*flat, cu_seqlens=cu, backend=backend).weights
            return remit_ext.remit_weights(a, b, y, backend=backend).weights
        return fn

    def plain(varlen):
        if varlen:
            return lambda la, lb, t, c: E.remit_weights(la, lb, t, cu_seqlens=c)
        return lambda la, lb, t: E.remit_weights(la, lb, t)

    for op, varlen in (("remit_weights", False), ("remit_weights_varlen", True)):
        if not ctx.wants(op):
            continue
        args = (a.view(-1), b.view(-1), y.view(-1), cu) if varlen else (a, b, y)

        def add(provider, fn):
            cases.append(Case(op, provider, fn, work, "GB/s", what))

        add("reference", weights("torch", varlen))
        if ctx.has("eager"):
            add("eager", lambda f=plain(varlen), args=args: f(*args))
        for backend in ctx.kernels:
            add(backend, weights(backend, varlen))
        if ctx.has("compile"):
            add("compile", lambda f=P.compiled(plain(varlen)), args=args: f(*args))
    return cases


FAMILY = Family("weights", ("remit_weights", "remit_weights_varlen"), 2, "copy", build,
                shape_label=lambda s: str(s[0]),
                floor_of=lambda s, dt: ((s[0], BYTES_PER_TOKEN // 2 // 4), torch.float32),
                dtypes=("float32",))
