"""The huge-page hint on fresh CPU gradient buffers, measured (issue 27 item 3).

``weighted_ce_bwd`` (out of place) returns a fresh ``[N, V]`` buffer; the C++ op asks for
transparent huge pages on it (``madvise(MADV_HUGEPAGE)``, ``csrc/cpu/kernels.h``), which cuts the
first-touch page faults ~500x but, with the kernel's THP ``defrag`` set to ``madvise``, lets a
fault stall in direct memory compaction. This times the backward with the hint on and off
(``REMIT_GRAD_HUGEPAGES=1/0``), under both modes of PyTorch's CPU allocator
(``THP_MEM_ALLOC_ENABLE=0``, the default: 4 KiB pages; ``1``: huge pages for large tensors),
beside the in-place backward (no fresh buffer). Each configuration runs in a fresh process; the
configurations are interleaved over ``--rounds`` sweeps and a row is the median over rounds of
each round's median; minor page faults per call from ``getrusage``.

    python bench/grad_buffer_pages.py --rounds 3 --results bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("1", "0"), ("0", "0"), ("1", "1"), ("0", "1")]  # (hint, THP_MEM_ALLOC_ENABLE)


def child(n: int, v: int, repeats: int) -> dict:
    import resource

    import torch

    import remit_ext  # noqa: F401  (registers the ops)

    ops = torch.ops.remit_ext
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(n, v, generator=g) * 3).to(dtype)
        y = torch.randint(0, v, (n,), generator=g)
        lse, lp = ops.token_stats(z, y, None, -100, 1.0, False, 0, False)[:2]
        coef = torch.full_like(lse, 1.0 / n)
        for mode in ("fresh", "inplace"):
            times, faults = [], []
            for i in range(repeats + 2):
                src = z.clone() if mode == "inplace" else z
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                if mode == "inplace":
                    ops.weighted_ce_bwd_(src, y, lse, lp, coef, -100)
                    grad = src
                else:
                    grad = ops.weighted_ce_bwd(src, y, lse, lp, coef, -100)
                t = time.perf_counter() - t0
                f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                del grad, src
                if i >= 2:
                    times.append(t * 1e3)
                    faults.append(f)
            out[f"{mode}/{str(dtype).removeprefix('torch.')}"] = {
                "ms": statistics.median(times), "minflt": statistics.median(faults)}
    return out


def machine() -> dict:
    import torch

    import remit_ext
    from remit_ext.bench._harness import cpu_model, git_sha
    thp = {}
    for k in ("enabled", "defrag"):
        try:
            thp[k] = Path(f"/sys/kernel/mm/transparent_hugepage/{k}").read_text().strip()
        except OSError:
            thp[k] = "?"
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "build": remit_ext.build_info(), "thp": thp, "git": git_sha(),
            "load_start": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", type=Path, help="write cpu_grad_buffer.{json,md} here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.n, args.v, args.repeats)))
        return 0
    info = machine()
    rounds = {c: [] for c in CONFIGS}
    for _ in range(args.rounds):
        for hint, thp in CONFIGS:
            env = dict(os.environ, REMIT_GRAD_HUGEPAGES=hint, THP_MEM_ALLOC_ENABLE=thp)
            run = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n),
                                  "--v", str(args.v), "--repeats", str(args.repeats)],
                                 env=env, capture_output=True, text=True, check=True)
            rounds[(hint, thp)].append(json.loads(run.stdout.strip().splitlines()[-1]))
    info["load_end"] = os.getloadavg()[0]
    rows = []
    for (hint, thp), runs in rounds.items():
        for key in runs[0]:
            mode, dtype = key.split("/")
            if mode == "inplace" and hint == "0":
                continue  # the hint only touches fresh buffers
            rows.append({"mode": mode, "dtype": dtype, "hint": hint, "thp_alloc": thp,
                         "ms_p50": statistics.median(r[key]["ms"] for r in runs),
                         "ms_rounds": [r[key]["ms"] for r in runs],
                         "minflt": statistics.median(r[key]["minflt"] for r in runs)})
    res = {"machine": info, "n": args.n, "v": args.v, "repeats": args.repeats,
           "rounds": args.rounds, "rows": rows}
    md = [f"# Fresh gradient buffers and the huge-page hint (weighted_ce_bwd, {args.n} x {args.v})",
          "", f"Generated by `python bench/grad_buffer_pages.py` (method in its docstring), git "
          f"{info['git']}; {info['cpu']}, {info['threads']} torch threads, CPU row kernels "
          f"{info['build']['cpu_capability']}, torch {info['torch']}; THP enabled "
          f"`{info['thp']['enabled']}`, defrag `{info['thp']['defrag']}`; load average (1 min) "
          f"{info['load_start']:.2f} at start, {info['load_end']:.2f} at end; {args.rounds} "
          f"rounds of {args.repeats} timed calls.", "",
          "| backward | dtype | hint | THP_MEM_ALLOC_ENABLE | ms p50 | per round | minor faults "
          "per call |", "|---|---|---|---|---:|---|---:|"]
    for r in rows:
        hint = "" if r["mode"] == "inplace" else ("on" if r["hint"] == "1" else "off")
        md.append(f"| {r['mode']} | {r['dtype']} | {hint} | {r['thp_alloc']} | "
                  f"{r['ms_p50']:.1f} | {', '.join(f'{x:.1f}' for x in r['ms_rounds'])} | "
                  f"{r['minflt']:.0f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "cpu_grad_buffer.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.results / "cpu_grad_buffer.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
