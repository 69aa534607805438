"""Benchmark: the GPU kernels (Triton and hand-written CUDA) against their memory floor, the
eager reference and ``torch.compile`` of it; writes the table backend="auto" reads.

The logits-level ReMiT step is memory-bound, so each op is measured against the bytes it must
move, timed as a device-to-device copy of the same tensors in the same run:

- ``token_stats`` (policy + scorer rows, one read each): floor = 2 N V b bytes;
- ``ce_bwd``, the gradient pass alone (``weighted_ce_bwd``: read logits, write gradient):
  floor = 2 N V b bytes;
- ``weighted_ce`` forward + backward (read, read, write): floor = 3 N V b bytes;
- ``remit_loss`` forward + backward: read policy, read scorer, read policy, write gradient,
  floor = 4 N V b bytes (three passes with precomputed scorer log-probs: ``remit_loss_lp``).

``floor_frac`` = floor time / measured time, where floor time = floor bytes / copy bandwidth
(bytes read + written by ``dst.copy_(src)`` over its time). Times are
``triton.testing.do_bench`` quantiles (CUDA events, L2 flushed between repeats): ms p50, p20, p80.
Providers: ``triton`` and ``cuda`` (remit_ext with that backend), ``torch`` (the eager
reference, backend="torch") and ``compile`` (``torch.compile`` of the eager reference).

    python bench/bench_triton_gpu.py                 # (N, V) = (16384, 128256), (8192, 50304)
    python bench/bench_triton_gpu.py --quick         # tiny shapes; on CPU via TRITON_INTERPRET=1

A full run on a GPU appends rows to ``<out-dir>/<device>_gpu.csv`` (default ``bench/results``),
rewrites the ``.md`` beside it, and records, per op, the kernel backends fastest first (ms p50
summed over the shapes) under the device's name in ``--auto-table`` (default
``remit_ext/data/auto_table.json``, the table backend="auto" reads); ``--quick`` only prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the --quick smoke run, before triton loads

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import remit_ext  # noqa: E402

SHAPES = [(16384, 128256), (8192, 50304)]
KERNELS = ("cuda", "triton")
# Which backend="auto" decisions each measured op informs (remit_ext/_backends.py op names).
AUTO_OPS = {"token_stats": ("token_stats",), "weighted_ce": ("weighted_cross_entropy", "rho1_loss"),
            "remit_loss": ("remit_loss",)}
QUICK_SHAPES = [(64, 1000)]
COLUMNS = ["op", "provider", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "GB_per_s",
           "floor_frac", "copy_GB_per_s", "speedup_vs_torch", "device", "torch_version",
           "triton_version", "git_sha", "date"]


def _bench(fn, quick: bool) -> tuple[float, float, float]:
    """(p50, p20, p80) ms: do_bench on a GPU, a few wall-clock calls in the CPU smoke mode."""
    if quick and not torch.cuda.is_available():
        t = H.time_ms(fn, warmup=0, repeats=1)
        return t.p50, t.p20, t.p80
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def _inputs(n: int, v: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).mul_(2).to(dtype)
    scorer = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).mul_(2).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    targets[::32] = -100
    return logits, scorer, targets


def run(shapes, dtype, providers, quick: bool) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = H.env_info(device)
    rows = []
    for n, v in shapes:
        logits, scorer, targets = _inputs(n, v, dtype, device)
        nvb = n * v * logits.element_size()
        dst = torch.empty_like(logits)
        copy_ms = _bench(lambda: dst.copy_(logits), quick)[0]
        copy_bw = 2 * nvb / (copy_ms * 1e-3)  # bytes read + written per second
        del dst
        scorer_lp = remit_ext.token_stats(scorer, targets, backend="torch").logprob
        grad_holder = {}

        def step(backend, use_lp, compiled=None):
            def fn():
                z = logits.requires_grad_(True)
                if compiled is not None:
                    loss = compiled(z, targets, scorer)
                elif use_lp:
                    loss = remit_ext.remit_loss(z, targets, scorer_logprobs=scorer_lp,
                                                backend=backend)
                else:
                    loss = remit_ext.remit_loss(z, targets, scorer_logits=scorer, backend=backend)
                grad_holder["g"] = torch.autograd.grad(loss, z)[0]
                logits.requires_grad_(False)
            return fn

        def backend_of(p):
            return "torch" if p in ("torch", "compile") else p

        coef = torch.rand(n, device=device)
        stats = remit_ext.token_stats(logits, targets, backend="torch")
        lse, lp = stats.lse, stats.logprob

        def ce_bwd(p):
            if p == "torch":
                def fn():
                    g = torch.softmax(logits.float(), -1).mul_(coef[:, None])
                    valid = targets != -100
                    idx = torch.where(valid, targets, 0)[:, None]
                    g.scatter_add_(-1, idx, torch.where(valid, -coef, 0)[:, None])
                    grad_holder["g"] = g.mul_(valid[:, None]).to(logits.dtype)
                return fn
            if p == "triton":
                import remit_ext.triton  # noqa: F401  (registers torch.ops.remit_ext_triton)
            ops_ns = torch.ops.remit_ext_triton if p == "triton" else torch.ops.remit_ext
            return lambda: grad_holder.__setitem__(
                "g", ops_ns.weighted_ce_bwd(logits, targets, lse, lp, coef, -100))

        def wce(p):
            def fn():
                z = logits.requires_grad_(True)
                loss = remit_ext.weighted_cross_entropy(z, targets, backend=backend_of(p))
                grad_holder["g"] = torch.autograd.grad(loss, z)[0]
                logits.requires_grad_(False)
            return fn

        plain = [p for p in providers if p != "compile"]
        ops = {
            "token_stats": (2 * nvb, {
                p: (lambda p=p: remit_ext.token_stats(
                    logits, targets, scorer_logits=scorer, backend=backend_of(p)))
                for p in plain}),
            "ce_bwd": (2 * nvb, {p: ce_bwd(p) for p in plain}),
            "weighted_ce": (3 * nvb, {p: wce(p) for p in plain}),
            "remit_loss": (4 * nvb, {}),
            "remit_loss_lp": (3 * nvb, {}),
        }
        compiled_ref = None
        if "compile" in providers:
            def ref_loss(z, y, s):
                return remit_ext.remit_loss(z, y, scorer_logits=s, backend="torch")
            compiled_ref = torch.compile(ref_loss)
        for p in providers:
            ops["remit_loss"][1][p] = step(backend_of(p), False,
                                           compiled_ref if p == "compile" else None)
            if p != "compile":
                ops["remit_loss_lp"][1][p] = step(backend_of(p), True)
        for op, (floor_bytes, fns) in ops.items():
            base = None
            for p, fn in fns.items():
                try:
                    p50, p20, p80 = _bench(fn, quick)
                except torch.OutOfMemoryError:
                    print(f"{op} {p} {n}x{v}: out of memory, skipped", file=sys.stderr)
                    torch.cuda.empty_cache()
                    continue
                base = p50 if p == "torch" else base
                floor_ms = floor_bytes / copy_bw * 1e3
                rows.append({
                    "op": op, "provider": p, "shape": f"{n}x{v}", "dtype": str(dtype)[6:],
                    "ms_p50": round(p50, 4), "ms_p20": round(p20, 4), "ms_p80": round(p80, 4),
                    "GB_per_s": round(floor_bytes / (p50 * 1e-3) / 1e9, 1),
                    "floor_frac": round(floor_ms / p50, 3),
                    "copy_GB_per_s": round(copy_bw / 1e9, 1),
                    "speedup_vs_torch": round(base / p50, 2) if base else "",
                    **{k: env[k] for k in ("device", "torch_version", "triton_version",
                                           "git_sha", "date")},
                })
                print(H.text_table(rows[-1:], COLUMNS[:10]), flush=True)
        del logits, scorer, targets, scorer_lp, grad_holder, lse, lp, stats
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def auto_table_rows(rows: list[dict]) -> dict:
    """{select op: [kernel backends, fastest first]} from the measured rows: ms p50 summed over
    the shapes, only for backends measured on every shape of that op."""
    out = {}
    for op, select_ops in AUTO_OPS.items():
        mine = [r for r in rows if r["op"] == op and r["provider"] in KERNELS]
        shapes = {r["shape"] for r in mine}
        totals = {}
        for p in KERNELS:
            ms = [r["ms_p50"] for r in mine if r["provider"] == p]
            if shapes and len(ms) == len(shapes):
                totals[p] = sum(ms)
        if totals:
            for select_op in select_ops:
                out[select_op] = sorted(totals, key=totals.get)
    return out


def write_auto_table(path: Path, device: str, order: dict, env: dict) -> None:
    data = {"devices": {}}
    if path.exists():
        data = json.loads(path.read_text())
        data.setdefault("devices", {})
    data["note"] = ("Per-device backend order for backend='auto', fastest first, written by "
                    "bench/bench_triton_gpu.py (ms p50 summed over its shapes); devices not "
                    "listed use the default order in remit_ext/_backends.py.")
    data["devices"][device] = order
    data.setdefault("measured", {})[device] = {k: env[k] for k in ("git_sha", "date",
                                                                   "torch_version")}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, prints only")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--providers", nargs="+", default=["torch", "triton", "cuda", "compile"],
                    choices=["torch", "triton", "cuda", "compile"])
    ap.add_argument("--out-dir", type=Path, default=H.RESULTS, help="where the CSV/md go")
    ap.add_argument("--auto-table", default=str(H.REPO / "remit_ext" / "data" / "auto_table.json"),
                    help="the backend='auto' table to update ('' to leave it alone)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        print("bench_triton_gpu: no GPU; only --quick runs on CPU (TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    providers = list(args.providers)
    if not torch.cuda.is_available():
        providers = [p for p in providers if p not in ("compile", "cuda")]
    elif "cuda" in providers and "cuda" not in remit_ext.available_backends():
        print("bench_triton_gpu: remit_ext was built without its CUDA kernels; skipping the "
              "cuda provider", file=sys.stderr)
        providers.remove("cuda")
    rows = run(QUICK_SHAPES if args.quick else SHAPES, getattr(torch, args.dtype), providers,
               args.quick)
    print()
    print(H.text_table(rows, COLUMNS[:11]))
    if not args.quick:
        device = torch.cuda.get_device_name()
        name = device.replace(" ", "_")
        H.append_csv(args.out_dir / f"{name}_gpu.csv", rows, COLUMNS)
        (args.out_dir / f"{name}_gpu.md").write_text(
            f"# GPU kernels on {device}\n\n"
            f"Generated by `python bench/bench_triton_gpu.py` (method in its docstring).\n\n"
            + H.markdown_table(rows, COLUMNS) + "\n")
        order = auto_table_rows(rows)
        if args.auto_table and order:
            write_auto_table(Path(args.auto_table), device, order, H.env_info("cuda"))
            print(f"backend='auto' order for {device}: {order} -> {args.auto_table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
