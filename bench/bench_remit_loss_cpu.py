"""Benchmark: ``remit_loss`` forward + backward on CPU, plain PyTorch vs the C++ kernels.

Workload: N = 4096 positions as 4 sequences of 1024 tokens (logits ``[4, 1024, 32000]``), the
frozen scorer's logits given (same shape and dtype), every 32nd target ignored; fp32 and bf16.
Providers: ``eager`` (plain PyTorch as a user writes it, ``remit_ext/bench/eager.py``:
``F.cross_entropy(reduction="none")`` in the input dtype, the scorer's pass under no_grad,
weights as tensor ops; the baseline of every ratio), ``compile`` (``torch.compile`` of exactly
that), ``cpu`` (``backend="cpu"``, the C++ kernels), ``cpu_inplace`` (the same with
``inplace_backward=True``: the logits gradient is written into the logits buffer) and
``reference`` (``backend="torch"``: ``remit_ext.reference``, the fp32 ground truth every loss is
checked against; timed for the record, never a denominator).

Method. Each (provider, dtype) runs in a fresh Python process, so no allocator or cache state
leaks from one measurement into the next. In that process:

1. the inputs are allocated and written (``torch.randn`` in the target dtype);
2. one untimed fwd+bwd warms up (thread pool, lazy initialisation);
3. peak memory: the process's resident-set high-water mark is reset to the current RSS (Linux
   ``/proc/self/clear_refs``), one fwd+bwd runs, and ``peak_extra_MB`` is how far the mark rose
   above the RSS before it: everything the step allocated beyond its inputs at its peak,
   gradient included (see ``_harness.peak_extra_bytes``; without the reset it falls back to the
   growth of ``getrusage(RUSAGE_SELF).ru_maxrss``, a lower bound);
4. time: ``--repeats`` timed fwd+bwd calls after ``--warmup`` more untimed ones, wall clock
   (``--rounds`` sweeps over the providers, interleaved; a row is the median over rounds);
   outside the timed region the gradient is dropped and, for ``cpu_inplace``, the logits are
   restored from a copy. ms p50/p20/p80 are the median and the 20th/80th percentiles. (The
   compile provider's compilation happens in the untimed warm-up.)

Every provider's loss must match the ``reference`` provider's (same inputs) to 1e-4 relative in
fp32 and 2e-2 in bf16 (plain PyTorch's bf16 log-probs are rounded to bf16), or the script exits 1
and writes nothing. A full run appends rows to ``bench/results/cpu_remit_loss.csv``
and rewrites ``bench/results/cpu_remit_loss.md``; ``--quick`` (tiny shapes, one repeat) only
prints, for CI smoke tests.

    python bench/bench_remit_loss_cpu.py            # full: a few minutes on 2 cores
    python bench/bench_remit_loss_cpu.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

OP = "remit_loss_fwd_bwd"
PROVIDERS = {
    "eager": None,  # remit_ext/bench/eager.py
    "compile": None,  # torch.compile of it
    "cpu": {"backend": "cpu"},
    "cpu_inplace": {"backend": "cpu", "inplace_backward": True},
    "reference": {"backend": "torch"},
}
BASELINE, TRUTH = "eager", "reference"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FULL_SHAPE = (4, 1024, 32000)
QUICK_SHAPE = (2, 64, 512)
CSV_PATH = h.RESULTS / "cpu_remit_loss.csv"
MD_PATH = h.RESULTS / "cpu_remit_loss.md"
COLUMNS = ("op", "provider", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "peak_extra_MB",
           "speedup_vs_eager", "mem_ratio_vs_eager", "device", "cpu_model", "torch_version",
           "git_sha", "date", "other_cpu_cores", "rounds_p50", "thp")
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}
# The goals against plain PyTorch: >= 2x its speed and faster than torch.compile of it; at most
# half its peak memory.
GOAL_SPEEDUP, GOAL_MEM_RATIO = 2.0, 0.5


def measure(provider: str, dtype: str, shape: tuple[int, int, int], warmup: int,
            repeats: int, seed: int = 0) -> dict:
    """One (provider, dtype) measurement; meant to run in a fresh process (``--child``)."""
    import remit_ext

    from remit_ext.bench import eager as E

    kwargs = PROVIDERS[provider] or {}
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, dtype=DTYPES[dtype], generator=g).requires_grad_()
    scorer = torch.randn(shape, dtype=DTYPES[dtype], generator=g)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    targets.view(-1)[::32] = -100
    # inplace_backward overwrites the logits with their gradient: keep a copy to restore.
    original = logits.detach().clone() if kwargs.get("inplace_backward") else None

    if provider in ("eager", "compile"):
        plain = E.remit_loss if provider == "eager" else torch.compile(E.remit_loss,
                                                                       dynamic=False)

        def loss_fn():
            return plain(logits, targets, scorer_logits=scorer)
    else:
        def loss_fn():
            return remit_ext.remit_loss(logits, targets, scorer_logits=scorer, **kwargs)

    def step():
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    def restore():
        logits.grad = None
        if original is not None:
            with torch.no_grad():
                logits.copy_(original)

    loss = step().item()  # warm-up, and the value the providers are checked against
    restore()
    peak, method = h.peak_extra_bytes(step)
    restore()
    with h.OtherCpuLoad() as other:
        timing = h.time_ms(step, warmup=warmup, repeats=repeats, setup=restore)
    return {"loss": loss, "peak_extra_bytes": peak, "memory_method": method,
            "timing": timing._asdict(), "other_cpu_cores": other.cores}


def _shape_str(shape) -> str:
    return "x".join(map(str, shape))


def _combined(results: list) -> dict:
    """One provider's rounds as one result: the median over rounds of each quantile, the mean
    of the other processes' load, every round's median kept."""
    def med(xs):
        xs = sorted(xs)
        return h.quantile(xs, 0.5)

    out = dict(results[0])
    out["timing"] = {k: med([r["timing"][k] for r in results]) for k in ("p50", "p20", "p80")}
    out["peak_extra_bytes"] = med([r["peak_extra_bytes"] for r in results])
    out["other_cpu_cores"] = sum(r["other_cpu_cores"] for r in results) / len(results)
    out["rounds_p50"] = [r["timing"]["p50"] for r in results]
    return out


def run_all(args) -> tuple[list[dict], str]:
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    env = h.env_info("cpu")
    rows, methods, failures = [], set(), []
    for dtype in args.dtypes:
        runs: dict = {p: [] for p in args.providers}
        # Rounds interleave the providers, so a change in what else runs on the machine falls
        # on all of them rather than on whichever was measured then.
        for rnd in range(args.rounds):
            for provider in args.providers:
                spec = json.dumps({"provider": provider, "dtype": dtype, "shape": shape,
                                   "warmup": args.warmup, "repeats": args.repeats})
                print(f"  {provider:>12} {dtype:>9} {_shape_str(shape)} round {rnd + 1} ...",
                      end="", flush=True)
                res = h.run_isolated(Path(__file__), ["--child", spec])
                t = res["timing"]
                methods.add(res["memory_method"])
                print(f" {t['p50']:.1f} ms, +{res['peak_extra_bytes'] / h.MB:.0f} MB; other "
                      f"processes used {res['other_cpu_cores']:.2f} cores meanwhile",
                      flush=True)
                runs[provider].append(res)
        results = {p: _combined(r) for p, r in runs.items()}
        truth, base = results.get(TRUTH), results.get(BASELINE)
        for provider, res in results.items():
            if truth is not None and abs(res["loss"] - truth["loss"]) > (
                    LOSS_RTOL[dtype] * max(1.0, abs(truth["loss"]))):
                failures.append(f"{provider}/{dtype}: loss {res['loss']!r} vs the reference's "
                                f"{truth['loss']!r}")
            t = res["timing"]
            base_mem = max(base["peak_extra_bytes"], 1) if base else 1
            rows.append({
                "op": OP, "provider": provider, "shape": _shape_str(shape), "dtype": dtype,
                "ms_p50": f"{t['p50']:.1f}", "ms_p20": f"{t['p20']:.1f}",
                "ms_p80": f"{t['p80']:.1f}",
                "peak_extra_MB": f"{res['peak_extra_bytes'] / h.MB:.1f}",
                "speedup_vs_eager": ("" if base is None else
                                     f"{base['timing']['p50'] / t['p50']:.2f}"),
                "mem_ratio_vs_eager": ("" if base is None else
                                       f"{res['peak_extra_bytes'] / base_mem:.3f}"),
                "device": env["device"],
                "cpu_model": f"{env['cpu_model']} ({env['threads']} threads)",
                "torch_version": env["torch_version"], "git_sha": env["git_sha"],
                "date": env["date"],
                "other_cpu_cores": f"{res['other_cpu_cores']:.2f}",
                "rounds_p50": "/".join(f"{x:.0f}" for x in res["rounds_p50"]),
                "thp": env["thp"],
            })
    if failures:
        raise SystemExit("loss mismatch between providers (nothing written):\n  "
                         + "\n  ".join(failures))
    env["loadavg_1m_end"] = h.env_info("cpu")["loadavg_1m"]
    return rows, summary_markdown(rows, env, sorted(methods), args)


def summary_markdown(rows: list[dict], env: dict, methods: list[str], args) -> str:
    goal_lines = []
    for r in rows:
        if not r["provider"].startswith("cpu") or r["speedup_vs_eager"] == "":
            continue
        comp = [c for c in rows if c["provider"] == "compile" and c["dtype"] == r["dtype"]]
        speed_ok = float(r["speedup_vs_eager"]) >= GOAL_SPEEDUP
        mem_ok = float(r["mem_ratio_vs_eager"]) <= GOAL_MEM_RATIO
        vs_c = ""
        if comp:
            x = float(comp[0]["ms_p50"]) / float(r["ms_p50"])
            vs_c = (f"; {x:.2f}x torch.compile's speed "
                    f"({'meets' if x > 1 else 'misses'} faster than compile)")
        goal_lines.append(
            f"- `{r['provider']}` {r['dtype']}: {r['speedup_vs_eager']}x plain PyTorch's speed "
            f"({'meets' if speed_ok else 'misses'} >= {GOAL_SPEEDUP:g}x){vs_c}, peak extra "
            f"memory {r['mem_ratio_vs_eager']} of plain PyTorch's "
            f"({'meets' if mem_ok else 'misses'} <= {GOAL_MEM_RATIO:g}).")
    table_cols = ("provider", "dtype", "shape", "ms_p50", "ms_p20", "ms_p80", "rounds_p50",
                  "peak_extra_MB", "speedup_vs_eager", "mem_ratio_vs_eager", "other_cpu_cores")
    return "\n".join([
        "# remit_loss forward + backward on CPU",
        "",
        "Generated by `python bench/bench_remit_loss_cpu.py` (method in its docstring); rows "
        "are also appended to `cpu_remit_loss.csv`.",
        "",
        f"- device: {env['device']}, {env['cpu_model']}, {env['threads']} torch threads; "
        f"load average (1 min) {env['loadavg_1m']} at start, {env['loadavg_1m_end']} at end",
        f"- torch {env['torch_version']}, triton {env['triton_version']}, "
        f"Python {env['python']}; remit_ext build {env['build_info']}",
        f"- git {env['git_sha']}, {env['date']}",
        "- workload: logits and scorer logits `[4, 1024, 32000]` (N = 4096 tokens, one "
        "sequence per row, every 32nd target ignored), eps = 0.2, detached weights, "
        "reduction mean",
        "- providers: `eager` = plain PyTorch (`remit_ext/bench/eager.py`, the baseline of every "
        "ratio), `compile` = torch.compile of it, `cpu`/`cpu_inplace` = the C++ kernels, `reference` = "
        "remit_ext.reference (the losses' ground truth)",
        f"- time: wall clock of the loss + `.backward()`, {args.repeats} timed calls "
        f"after {args.warmup + 1} untimed ones, each provider in a fresh process; "
        f"{args.rounds} rounds interleaving the providers, a row is the median over rounds "
        f"(rounds_p50: each round's median)",
        f"- PyTorch's CPU allocator: THP_MEM_ALLOC_ENABLE="
        f"{os.environ.get('THP_MEM_ALLOC_ENABLE', '0')} (1: transparent huge pages for large "
        f"tensors; 0, the default: 4 KiB pages, so every fresh [N, V] buffer is paid for in "
        f"page faults on first touch)",
        f"- memory ({'; '.join(methods)}): peak bytes one fwd+bwd holds beyond its inputs, "
        f"the logits gradient included",
        "- other_cpu_cores: CPU used by other processes during the timed calls, in cores "
        "(/proc/stat); near 0 means the timings had the machine to themselves",
        "",
        h.markdown_table(rows, table_cols),
        "",
        f"Goals: >= {GOAL_SPEEDUP:g}x plain PyTorch and faster than torch.compile of it; <= "
        f"{GOAL_MEM_RATIO:g}x plain PyTorch's peak memory.",
        "",
        *goal_lines,
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: shape {_shape_str(QUICK_SHAPE)}, 1 repeat, no warm-up, "
                        "writes nothing")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 7; quick 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved sweeps over the providers (default 3; quick 1); a row is "
                        "the median over rounds")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing, after the first (default 1; quick 0)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS),
                   help=f"the ratios are against {BASELINE!r}, the losses checked against "
                        f"{TRUTH!r} (each when measured)")
    p.add_argument("--no-write", action="store_true", help="print only, even for a full run")
    p.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["provider"], spec["dtype"], tuple(spec["shape"]),
                                 spec["warmup"], spec["repeats"])))
        return 0

    h.resolve_repeats(p, args, full_repeats=7)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    print(f"{OP}: providers {args.providers}, dtypes {args.dtypes}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    rows, md = run_all(args)
    print()
    print(h.text_table(rows, ("provider", "dtype", "shape", "ms_p50", "ms_p20", "ms_p80",
                              "peak_extra_MB", "speedup_vs_eager", "mem_ratio_vs_eager",
                              "other_cpu_cores")))
    if args.quick or args.no_write:
        return 0
    h.save_results(CSV_PATH, MD_PATH, rows, COLUMNS, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
