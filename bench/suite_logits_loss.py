"""Logits-level losses, forward + backward to the ``[N, V]`` logits (bf16/fp32 in, gradient in
the logits' dtype). The floor counts the passes over ``N x V`` each op cannot avoid:

- ``ce_bwd``: the gradient pass alone (``weighted_ce_bwd``: read logits, write gradient), 2;
- ``weighted_ce``: per-token weighted cross-entropy (read, read, write), 3;
- ``remit_loss``: ReMiT with the scorer's logits (read policy, read scorer, read policy, write
  gradient), 4;
- ``remit_loss_lp``: ReMiT with precomputed scorer log-probs, 3;
- ``pg_loss``: PPO-clipped policy-gradient loss (RMT/GRPO) with old log-probs, 3.

Checked against the eager reference: the loss and the logits gradient. ``<backend>_inplace`` rows
write the gradient into the logits buffer (``inplace_backward=True``), and Liger's forward does
so too; for those the logits are restored between calls, outside the timed region. Liger: ``liger_cross_entropy(reduction="none")`` for
``-log p`` (the scorer's under no_grad), weights from ``remit_ext.remit_weights``, then
``sum(w * nll) / n_valid``.

    python bench/suite_logits_loss.py --quick      # or: python -m bench --ops logits_loss
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import remit_ext  # noqa: E402
from remit_ext._backends import BACKENDS  # noqa: E402
from bench import providers as P  # noqa: E402
from bench.runner import Case, Context, Family, fwd_bwd  # noqa: E402

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

    def reference(op):
        if op == "weighted_ce":
            return lambda z, t, ww: remit_ext.weighted_cross_entropy(z, t, ww, backend="torch")
        if op == "remit_loss":
            return lambda z, t, s: remit_ext.remit_loss(z, t, scorer_logits=s, backend="torch")
        if op == "remit_loss_lp":
            return lambda z, t, b: remit_ext.remit_loss(z, t, scorer_logprobs=b,
                                                         backend="torch")
        return lambda z, t, a, o: remit_ext.policy_gradient_loss(z, t, a, old_logprobs=o,
                                                                 backend="torch")

    extra = {"weighted_ce": (w,), "remit_loss": (s3,), "remit_loss_lp": (scorer_lp,),
             "pg_loss": (adv, old)}

    def liger(op):
        def weighted(nll, weights):
            return (nll * weights.view(-1)).sum() / valid.sum()

        def fn():
            nll = P.liger_token_nll(z3.view(n, v), yf, IGNORE)
            if op == "weighted_ce":
                return weighted(nll, w)
            if op == "remit_loss":
                with torch.no_grad():
                    b = -P.liger_token_nll(scorer, yf, IGNORE).float().view(y.shape)
            else:
                b = scorer_lp
            ww = remit_ext.remit_weights(-nll.detach().float().view(y.shape), b, y).weights
            return weighted(nll, ww)
        return fn

    cases = []
    if ctx.wants("ce_bwd"):
        what = "2 passes over N x V"

        def grad_ref(z, t, c, ok):  # coef (softmax - onehot), nothing at ignored rows
            gz = torch.softmax(z.float(), -1) * c[:, None]
            gz = gz.scatter_add(-1, torch.where(ok, t, 0)[:, None],
                                torch.where(ok, -c, 0)[:, None])
            return (gz * ok[:, None]).to(z.dtype)

        # (None, gradient): no value, the gradient checked against its largest entry.
        cases.append(Case("ce_bwd", "eager", lambda: (None, grad_ref(logits, yf, coef, valid)),
                          2 * nvb, "GB/s", what))
        if "triton" in ctx.kernels:
            importlib.import_module("remit_ext.triton")  # registers torch.ops.remit_ext_triton
        for b in ctx.kernels:
            ops = BACKENDS[b].ops
            cases.append(Case("ce_bwd", b, lambda ops=ops: (None, ops.weighted_ce_bwd(
                logits, yf, lse, lp, coef, IGNORE)), 2 * nvb, "GB/s", what))
        if ctx.has("compile"):
            cases.append(Case("ce_bwd", "compile",
                              lambda f=P.compiled(grad_ref): (None, f(logits, yf, coef, valid)),
                              2 * nvb, "GB/s", what))
    for op, passes in (("weighted_ce", 3), ("remit_loss", 4), ("remit_loss_lp", 3),
                       ("pg_loss", 3)):
        if not ctx.wants(op):
            continue
        what = f"{passes} passes over N x V"
        for b in ["torch"] + ctx.kernels:
            cases.append(Case(op, "eager" if b == "torch" else b,
                              fwd_bwd(loss_fn(op, b), [z3]), passes * nvb, "GB/s", what))
        if ctx.has("compile"):
            f = P.compiled(reference(op))
            args = extra[op]
            cases.append(Case(op, "compile", fwd_bwd(lambda f=f, a=args: f(z3, y, *a), [z3]),
                              passes * nvb, "GB/s", what))
        for b in ctx.kernels:
            cases.append(Case(op, f"{b}_inplace", fwd_bwd(loss_fn(op, b, inplace=True), [z3]),
                              passes * nvb, "GB/s", what, setup=restore))
        if ctx.has("liger") and op != "pg_loss":
            # Liger's forward writes the gradient into its input when that requires grad.
            cases.append(Case(op, "liger", fwd_bwd(liger(op), [z3]), passes * nvb, "GB/s",
                              what, setup=restore))
    if any(c.setup is restore for c in cases):
        saved["z"] = z3.detach().clone()
    return cases


FAMILY = Family("logits_loss", OPS, 2, "copy", build)

if __name__ == "__main__":
    from bench.runner import main

    sys.exit(main(["--ops", FAMILY.name, *sys.argv[1:]],
                  prog=f"python bench/{Path(__file__).name}"))
