"""Benchmark: the fused-linear ReMiT loss (``remit_linear_loss``) against the eager path that
holds the logits, forward + backward, peak memory and time at several token counts N.

Workload: hidden states ``[N, D]`` of the policy and of the frozen scorer, LM heads ``[V, D]``,
sequences of ``--seq-len`` tokens (rows of ``targets``), every 32nd target ignored, eps = 0.2,
reduction mean; gradients for hidden and the policy's LM head.

Providers:

- ``eager``: plain PyTorch as a user writes it: ``z = hidden @ W.T``, scorer logits the same way
  under no_grad, then ``remit_ext/bench/eager.py``'s ``remit_loss``
  (``F.cross_entropy(reduction="none")``, weights as tensor ops) and ``.backward()``: the baseline of ``speedup_vs_eager``;
- ``reference``: the same logits, then ``remit_loss(backend="torch")`` (``remit_ext.reference``,
  the fp32 ground truth every ReMiT loss here is checked against);
- ``eager_kernels``: the same logits, then the fused logits-level kernels (``backend="auto"``,
  ``inplace_backward=True``): the best one can do while holding ``[N, V]`` logits;
- ``linear``: ``remit_linear_loss`` with the scorer's hidden states and LM head;
- ``linear_logprobs``: ``remit_linear_loss`` with scorer log-probs precomputed (outside the
  timed region, as offline scoring would);
- ``linear_ntp``: ``remit_linear_loss(method="ntp")``, plain cross-entropy through the same
  path (ReMiT's overhead is ``linear_logprobs`` over this);
- ``liger_ce_plus_scorer`` (CUDA, if ``liger_kernel`` imports): Liger-Kernel's fused linear
  cross-entropy plus a separate chunked scorer log-prob pass (what ReMiT costs without us);
- ``matmul_floor``: the matrix products a step needs, each timed alone on full-size operands in
  the same process: policy logits, scorer logits, grad_hidden, grad_W (``matmul_floor_3`` leaves
  out the scorer's). Time only.

The token-statistics primitive has its own ledger (op ``linear_token_stats_fwd_bwd``): per-token
log-prob and entropy of the policy, then the backward of ``sum_t A_t logprob_t + 0.01 H_t``
(random per-token advantages ``A``, an entropy bonus), over the valid-token count:

- ``stats_eager``: plain PyTorch, ``z = hidden @ W.T``, ``log_softmax`` in fp32, gather and
  entropy, autograd (the baseline of that ledger's ``speedup_vs_eager``);
- ``stats_linear``: ``linear_token_stats(..., entropy=True)`` (chunked; the backward recomputes
  each chunk's logits).

Method. Each (provider, N) runs in a fresh process. Inputs are allocated first; one untimed
step warms up; then peak memory of one step beyond the inputs: on CPU the growth of the
resident-set high-water mark after a reset (``_harness.peak_extra_bytes``), on CUDA
``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated before.
``grads_MB`` is the size of the gradients every provider must return (hidden and W);
``over_grads_MB`` is the rest, the working memory: for the fused-linear providers it is the
chunk buffers and must not grow with N. Time: ``--repeats`` timed steps after ``--warmup``
untimed ones (CUDA: synchronised). The ReMiT providers' losses must agree with ``reference``
(relative 1e-4 fp32, 2e-2 bf16) or the script exits 1 and writes nothing; so must
``stats_linear``'s with ``stats_eager``.

A full run appends to ``bench/results/<device>_linear_loss.csv`` (the token-statistics rows
to ``<device>_linear_token_stats.csv``) and rewrites the ``.md`` beside each ledger it has rows
for (device ``cpu`` or ``gpu``); ``--quick`` (tiny shapes, one repeat, all in one process) only
prints: a CI smoke test whose timings are not results.

    python bench/bench_linear_loss.py                 # CPU: a few minutes on 2 cores
    python bench/bench_linear_loss.py --device cuda   # the issue's H100 workload
    python bench/bench_linear_loss.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

OP = "remit_linear_loss_fwd_bwd"
STATS_OP = "linear_token_stats_fwd_bwd"
PROVIDERS = ("eager", "reference", "eager_kernels", "linear", "linear_logprobs", "linear_ntp",
             "liger_ce_plus_scorer", "stats_eager", "stats_linear", "matmul_floor")
REMIT_GROUP = ("eager", "reference", "eager_kernels", "linear", "linear_logprobs")
STATS_GROUP = ("stats_eager", "stats_linear")
# The provider each group's losses are checked against (the reference), and the one its
# speed-ups are against (plain PyTorch).
GROUP_BASE = {"reference": REMIT_GROUP, "stats_eager": STATS_GROUP}
SPEED_BASE = {"remit_linear_loss_fwd_bwd": "eager", "linear_token_stats_fwd_bwd": "stats_eager"}
LEDGER = {OP: "linear_loss", STATS_OP: "linear_token_stats"}


def _op_of(provider: str) -> str:
    return STATS_OP if provider in STATS_GROUP else OP
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (V, D, seq_len, Ns, dtype) per device; the CUDA one is the goal workload.
WORKLOADS = {
    "cpu": {"vocab": 32000, "dim": 128, "seq_len": 1024, "ns": [1024, 4096, 16384],
            "dtype": "float32"},
    "cuda": {"vocab": 128256, "dim": 4096, "seq_len": 4096, "ns": [4096, 8192, 16384],
             "dtype": "bfloat16"},
    "quick": {"vocab": 512, "dim": 32, "seq_len": 64, "ns": [128, 512], "dtype": "float32"},
}
COLUMNS = ("op", "provider", "n_tokens", "vocab", "dim", "dtype", "ms_p50", "ms_p20", "ms_p80",
           "vs_matmul_floor", "speedup_vs_eager", "peak_extra_MB", "grads_MB", "over_grads_MB",
           "device", "cpu_model", "torch_version", "git_sha", "date", "other_cpu_cores")
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else None


def _inputs(n, vocab, dim, seq_len, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device, DTYPES[dtype])

    hid = rnd(n, dim).requires_grad_()
    w = rnd(vocab, dim, scale=dim ** -0.5 * 3).requires_grad_()
    sh, sw = rnd(n, dim), rnd(vocab, dim, scale=dim ** -0.5 * 3.5)
    y = torch.randint(0, vocab, (n // seq_len, seq_len), generator=g)
    y.view(-1)[::32] = -100
    return hid, w, sh, sw, y.to(device)


def _step(provider, hid, w, sh, sw, y, chunk_size):
    """The fwd+bwd closure of one provider (None for matmul_floor)."""
    import remit_ext

    from remit_ext.bench import eager as E

    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    if provider in ("eager", "reference", "eager_kernels"):
        extra = ({"backend": "torch"} if provider == "reference"
                 else {"inplace_backward": True})

        def step():
            z = (hid @ w.T).view(*y.shape, -1)
            with torch.no_grad():
                sz = (sh @ sw.T).view(*y.shape, -1)
            if provider == "eager":
                loss = E.remit_loss(z, y, scorer_logits=sz)
            else:
                loss = remit_ext.remit_loss(z, y, scorer_logits=sz, **extra)
            loss.backward()
            return loss.detach()
    elif provider == "linear":
        def step():
            loss = remit_ext.remit_linear_loss(hid.view(*y.shape, -1), w, y,
                                               scorer_hidden=sh.view(*y.shape, -1),
                                               scorer_weight=sw, **kw)
            loss.backward()
            return loss.detach()
    elif provider in ("linear_logprobs", "linear_ntp"):
        with torch.no_grad():
            b = _scorer_logprobs(sh, sw, y, chunk_size or 1024)
        method = {"method": "ntp"} if provider == "linear_ntp" else {"scorer_logprobs": b}

        def step():
            loss = remit_ext.remit_linear_loss(hid.view(*y.shape, -1), w, y, **method, **kw)
            loss.backward()
            return loss.detach()
    elif provider in STATS_GROUP:
        adv = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
        valid = y != -100
        n_valid = valid.sum()

        def stats(h3):
            if provider == "stats_linear":
                st = remit_ext.linear_token_stats(h3, w, y, entropy=True, **kw)
                return st.logprob, st.entropy
            logp = torch.log_softmax((h3 @ w.T).float(), dim=-1)
            lp = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * valid
            return lp, -(logp.exp() * logp).sum(-1) * valid

        def step():
            lp, ent = stats(hid.view(*y.shape, -1))
            loss = -(adv * lp + 0.01 * ent).sum() / n_valid
            loss.backward()
            return loss.detach()
    elif provider == "liger_ce_plus_scorer":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

        def step():
            with torch.no_grad():
                _scorer_logprobs(sh, sw, y, chunk_size or 4096)
            loss = flce(w, hid, y.view(-1))
            loss.backward()
            return loss.detach()
    else:
        return None
    return step


def _scorer_logprobs(sh, sw, y, chunk):
    """b_t of the scorer in chunks (never [N, V] at once): the separate scorer pass."""
    import remit_ext

    yf, out = y.reshape(-1), []
    for s in range(0, yf.numel(), chunk):
        z = sh[s:s + chunk] @ sw.T
        out.append(remit_ext.token_stats(z, yf[s:s + chunk]).logprob)
    return torch.cat(out).view(y.shape)


def _matmul_floor(hid, w, sh, sw, device, warmup, repeats):
    """p50 ms of each product a step needs, alone, on full-size operands."""
    n, vocab = hid.shape[0], w.shape[0]
    x, wt, sx, swt = hid.detach(), w.detach(), sh, sw
    g = torch.empty(n, vocab, dtype=x.dtype, device=x.device).normal_()
    parts = {
        "logits": lambda: x @ wt.T,
        "scorer_logits": lambda: sx @ swt.T,
        "grad_hidden": lambda: g @ wt,
        "grad_weight": lambda: g.T @ x,
    }
    out = {k: h.time_ms(f, warmup=warmup, repeats=repeats, sync=_sync(device)).p50
           for k, f in parts.items()}
    del g
    return out


def measure(spec: dict) -> dict:
    """One (provider, N) measurement; meant to run in a fresh process (``--child``)."""
    device, provider = spec["device"], spec["provider"]
    hid, w, sh, sw, y = _inputs(spec["n"], spec["vocab"], spec["dim"], spec["seq_len"],
                                spec["dtype"], device)
    if provider == "matmul_floor":
        parts = _matmul_floor(hid, w, sh, sw, device, spec["warmup"], spec["repeats"])
        return {"parts": parts}
    step = _step(provider, hid, w, sh, sw, y, spec.get("chunk_size"))

    def restore():
        hid.grad = None
        w.grad = None

    loss = float(step())
    restore()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    else:
        peak, method = h.peak_extra_bytes(step)
    restore()
    with h.OtherCpuLoad() as other:
        timing = h.time_ms(step, warmup=spec["warmup"], repeats=spec["repeats"], setup=restore,
                           sync=_sync(device))
    grads = hid.numel() * hid.element_size() + w.numel() * w.element_size()
    return {"loss": loss, "peak_extra_bytes": peak, "grads_bytes": grads,
            "memory_method": method, "timing": timing._asdict(), "other_cpu_cores": other.cores}


def _skip_reason(provider: str, device: str):
    if provider == "liger_ce_plus_scorer":
        if device != "cuda":
            return "Liger-Kernel's Triton kernels need a CUDA device"
        try:
            import liger_kernel  # noqa: F401
        except ImportError as err:
            return f"liger_kernel is not importable ({err})"
    return None


def run_all(args) -> tuple[list[dict], str]:
    wl = dict(WORKLOADS["quick" if args.quick else args.device])
    if args.ns:
        wl["ns"] = args.ns
    if args.seq_len:
        wl["seq_len"] = args.seq_len
    if args.dtype:
        wl["dtype"] = args.dtype
    env = h.env_info(args.device)
    rows, failures, skipped, methods = [], [], [], set()
    for n in wl["ns"]:
        if n % wl["seq_len"]:
            raise SystemExit(f"--ns: N = {n} is not a multiple of the sequence length "
                             f"{wl['seq_len']}")
        results, floor = {}, None
        for provider in args.providers:
            reason = _skip_reason(provider, args.device)
            if reason:
                skipped.append(f"{provider}: {reason}")
                print(f"  {provider:>22} N={n}: skipped ({reason})", flush=True)
                continue
            spec = {"provider": provider, "n": n, "device": args.device, "warmup": args.warmup,
                    "repeats": args.repeats, "chunk_size": args.chunk_size,
                    **{k: wl[k] for k in ("vocab", "dim", "seq_len", "dtype")}}
            print(f"  {provider:>22} N={n} ...", end="", flush=True)
            # Quick runs stay in this process (seconds, not a process start per row).
            res = (measure(spec) if args.quick
                   else h.run_isolated(Path(__file__), ["--child", json.dumps(spec)]))
            if provider == "matmul_floor":
                floor = res["parts"]
                print(" " + ", ".join(f"{k} {v:.1f} ms" for k, v in floor.items()), flush=True)
                continue
            results[provider] = res
            methods.add(res["memory_method"])
            print(f" {res['timing']['p50']:.1f} ms, +{res['peak_extra_bytes'] / h.MB:.0f} MB",
                  flush=True)
        for provider, res in results.items():
            for base_name, group in GROUP_BASE.items():
                base = results.get(base_name)
                if base is None or provider not in group:
                    continue
                tol = LOSS_RTOL[wl["dtype"]] * max(1.0, abs(base["loss"]))
                if abs(res["loss"] - base["loss"]) > tol:
                    failures.append(f"{provider} N={n}: loss {res['loss']!r} vs {base_name} "
                                    f"{base['loss']!r}")
            t = res["timing"]
            ratio = ""
            if floor is not None:
                need = sum(floor.values()) if provider in ("linear", "eager", "reference",
                                                           "eager_kernels") \
                    else sum(v for k, v in floor.items() if k != "scorer_logits")
                ratio = f"{t['p50'] / need:.2f}"
            speed_base = results.get(SPEED_BASE[_op_of(provider)])
            rows.append({
                "op": _op_of(provider), "provider": provider, "n_tokens": n,
                "vocab": wl["vocab"],
                "dim": wl["dim"], "dtype": wl["dtype"], "ms_p50": f"{t['p50']:.1f}",
                "ms_p20": f"{t['p20']:.1f}", "ms_p80": f"{t['p80']:.1f}",
                "vs_matmul_floor": ratio,
                "speedup_vs_eager": ("" if speed_base is None else
                                     f"{speed_base['timing']['p50'] / t['p50']:.2f}"),
                "peak_extra_MB": f"{res['peak_extra_bytes'] / h.MB:.1f}",
                "grads_MB": f"{res['grads_bytes'] / h.MB:.1f}",
                "over_grads_MB": f"{(res['peak_extra_bytes'] - res['grads_bytes']) / h.MB:.1f}",
                "device": env["device"],
                "cpu_model": f"{env['cpu_model']} ({env['threads']} threads)",
                "torch_version": env["torch_version"], "git_sha": env["git_sha"],
                "date": env["date"], "other_cpu_cores": f"{res['other_cpu_cores']:.2f}",
            })
        # The floor row goes to each ledger that has rows at this N.
        for op in (sorted({_op_of(p) for p in results}) if floor is not None else ()):
            rows.append({
                "op": op, "provider": "matmul_floor", "n_tokens": n, "vocab": wl["vocab"],
                "dim": wl["dim"], "dtype": wl["dtype"],
                "ms_p50": f"{sum(floor.values()):.1f}", "ms_p20": "", "ms_p80": "",
                "vs_matmul_floor": "1.00", "speedup_vs_eager": "", "peak_extra_MB": "",
                "grads_MB": "",
                "over_grads_MB": "", "device": env["device"],
                "cpu_model": f"{env['cpu_model']} ({env['threads']} threads)",
                "torch_version": env["torch_version"], "git_sha": env["git_sha"],
                "date": env["date"], "other_cpu_cores": "",
                "parts": ", ".join(f"{k} {v:.1f}" for k, v in floor.items()),
            })
    if failures:
        raise SystemExit("loss mismatch between providers (nothing written):\n  "
                         + "\n  ".join(failures))
    env["loadavg_1m_end"] = h.env_info(args.device)["loadavg_1m"]
    by_op = {op: [r for r in rows if r["op"] == op] for op in (OP, STATS_OP)}
    return {op: (op_rows, summary_markdown(op, op_rows, env, wl, sorted(methods),
                                           sorted(set(skipped)), args))
            for op, op_rows in by_op.items() if op_rows}


def _flatness(rows, provider):
    mem = [(int(r["n_tokens"]), float(r["over_grads_MB"])) for r in rows
           if r["provider"] == provider]
    if len(mem) < 2:
        return None
    return mem


def summary_markdown(op, rows, env, wl, methods, skipped, args) -> str:
    table_cols = ("provider", "n_tokens", "ms_p50", "ms_p20", "ms_p80", "vs_matmul_floor",
                  "speedup_vs_eager", "peak_extra_MB", "grads_MB", "over_grads_MB",
                  "other_cpu_cores")
    if op == STATS_OP:
        title = "linear_token_stats (log-prob + entropy) forward + backward"
        loss = ("loss -(1/N_valid) sum_t (A_t logprob_t + 0.01 H_t), random per-token A; the "
                "policy only")
    else:
        title = "remit_linear_loss forward + backward"
        loss = "eps = 0.2, reduction mean"
    lines = [
        f"# {title} on {env['device']}",
        "",
        "Generated by `python bench/bench_linear_loss.py` (method in its docstring); rows are "
        "also appended to the `.csv` beside this file.",
        "",
        f"- device: {env['device']}, {env['cpu_model']}, {env['threads']} torch threads; load "
        f"average (1 min) {env['loadavg_1m']} at start, {env['loadavg_1m_end']} at end",
        f"- torch {env['torch_version']}, triton {env['triton_version']}, Python "
        f"{env['python']}; remit_ext build {env['build_info']}",
        f"- git {env['git_sha']}, {env['date']}",
        f"- workload: V = {wl['vocab']}, D = {wl['dim']} (policy and scorer), {wl['dtype']}, "
        f"sequences of {wl['seq_len']} tokens, every 32nd target ignored, {loss}; chunk size "
        f"{args.chunk_size if args.chunk_size else 'automatic (default memory budget)'}",
        f"- time: {args.repeats} timed fwd+bwd after {args.warmup + 1} untimed, each provider "
        f"in a fresh process; vs_matmul_floor = p50 / the sum of the products the step needs "
        f"(4 with the scorer's logits, 3 without), each timed alone",
        f"- memory ({'; '.join(methods)}): peak_extra_MB beyond the inputs; grads_MB = the "
        f"gradients of hidden and W every provider returns; over_grads_MB = the rest",
        "",
        h.markdown_table(rows, table_cols),
        "",
    ]
    floors = [r for r in rows if r["provider"] == "matmul_floor"]
    if floors:
        lines += ["Matmul floor parts (ms p50): "
                  + "; ".join(f"N = {r['n_tokens']}: {r['parts']}" for r in floors), ""]
    for provider in ("linear", "linear_logprobs", "linear_ntp", "eager", "reference",
                     "eager_kernels", "stats_linear", "stats_eager"):
        mem = _flatness(rows, provider)
        if mem:
            lines.append(f"- `{provider}` working memory (over_grads_MB) by N: "
                         + ", ".join(f"{n}: {m:.0f}" for n, m in mem))
    for n in sorted({int(r["n_tokens"]) for r in rows}):
        by = {r["provider"]: float(r["ms_p50"]) for r in rows if int(r["n_tokens"]) == n}
        if "linear_logprobs" in by and "linear_ntp" in by:
            lines.append(f"- N = {n}: ReMiT with precomputed scorer log-probs costs "
                         f"{100 * (by['linear_logprobs'] / by['linear_ntp'] - 1):+.1f}% over "
                         f"plain cross-entropy through the same path (goal <= +5%, on GPU)")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny shapes, 1 repeat, no warm-up, writes nothing")
    p.add_argument("--ns", type=int, nargs="+", help="token counts (default per device)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default per device)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default per device")
    p.add_argument("--chunk-size", type=int, help="default: from the memory budget")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="default 1; quick 0")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--no-write", action="store_true", help="print only, even for a full run")
    p.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    h.resolve_repeats(p, args, full_repeats=5)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    ops = sorted({_op_of(q) for q in args.providers if q != "matmul_floor"})
    print(f"{', '.join(ops)} on {args.device}: providers {args.providers}"
          f"{' (quick)' if args.quick else ''}",
          flush=True)
    ledgers = run_all(args)
    for op, (rows, _) in ledgers.items():
        print(f"\n{op}")
        print(h.text_table(rows, ("provider", "n_tokens", "ms_p50", "vs_matmul_floor",
                                  "speedup_vs_eager",
                                  "peak_extra_MB", "grads_MB", "over_grads_MB",
                                  "other_cpu_cores")))
    if args.quick or args.no_write:
        return 0
    stem = "cpu" if args.device == "cpu" else "gpu"
    for op, (rows, md) in ledgers.items():
        name = f"{stem}_{LEDGER[op]}"
        h.save_results(h.RESULTS / f"{name}.csv", h.RESULTS / f"{name}.md", rows, COLUMNS, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
