"""Token statistics: the scorer and policy log-probs (and entropy) from ``[N, V]`` logits.

- ``token_stats``: policy and scorer rows in one call (``remit_ext.token_stats(logits, targets,
  scorer_logits=...)``), checked on both log-probs. Floor: one read of each, 2 N V b bytes.
  Liger: two ``liger_cross_entropy(reduction="none")`` calls (per-token ``-log p``) under
  no_grad.
- ``token_entropy``: the policy's log-prob and full entropy (RMT's key-token selection),
  checked on both. Floor: one read, N V b bytes.

    python bench/suite_token_stats.py --quick      # or: python -m bench --ops token_stats
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import remit_ext  # noqa: E402
from bench import providers as P  # noqa: E402
from bench.runner import Case, Context, Family  # noqa: E402


def build(ctx: Context) -> list:
    n, v = ctx.shape
    g = ctx.generator()
    logits, scorer = ctx.normal(n, v, scale=2.0, g=g), ctx.normal(n, v, scale=2.0, g=g)
    y = ctx.targets(n, v, g).view(-1)
    nvb = n * v * logits.element_size()
    backends = ["torch"] + ctx.kernels
    name = {"torch": "eager"}
    cases = []

    def stats(backend, entropy=False):
        def fn():
            st = remit_ext.token_stats(logits, y, scorer_logits=None if entropy else scorer,
                                       entropy=entropy, backend=backend)
            return torch.stack([st.logprob, st.entropy if entropy else st.scorer_logprob])
        return fn

    def stats_ref(z, t, s):
        st = remit_ext.token_stats(z, t, scorer_logits=s, backend="torch")
        return torch.stack([st.logprob, st.scorer_logprob])

    def entropy_ref(z, t):
        st = remit_ext.token_stats(z, t, entropy=True, backend="torch")
        return torch.stack([st.logprob, st.entropy])

    if ctx.wants("token_stats"):
        what = "2 reads of N x V (policy, scorer)"
        for b in backends:
            cases.append(Case("token_stats", name.get(b, b), stats(b), 2 * nvb, "GB/s", what))
        if ctx.has("compile"):
            f = P.compiled(stats_ref)
            cases.append(Case("token_stats", "compile", lambda: f(logits, y, scorer), 2 * nvb,
                              "GB/s", what))
        if ctx.has("liger"):
            def liger():
                with torch.no_grad():
                    return torch.stack([-P.liger_token_nll(logits, y),
                                        -P.liger_token_nll(scorer, y)]).float()
            cases.append(Case("token_stats", "liger", liger, 2 * nvb, "GB/s", what))
    if ctx.wants("token_entropy"):
        what = "1 read of N x V"
        for b in backends:
            cases.append(Case("token_entropy", name.get(b, b), stats(b, entropy=True), nvb,
                              "GB/s", what))
        if ctx.has("compile"):
            f2 = P.compiled(entropy_ref)
            cases.append(Case("token_entropy", "compile", lambda: f2(logits, y), nvb, "GB/s",
                              what))
    return cases


FAMILY = Family("token_stats", ("token_stats", "token_entropy"), 2, "copy", build)

if __name__ == "__main__":
    from bench.runner import main

    sys.exit(main(["--ops", FAMILY.name, *sys.argv[1:]],
                  prog=f"python bench/{Path(__file__).name}"))
