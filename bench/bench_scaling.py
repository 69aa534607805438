"""Scaling: time and peak memory of ``remit_loss`` and ``remit_linear_loss`` (forward +
backward, ReMiT with the scorer's logits / hidden states) as the token count N doubles and as
the vocabulary V doubles, so a reader sees linear cost and flat working memory at a glance.

- ``N`` sweep: N = 1k, 2k, ..., 32k at a fixed V; ``V`` sweep: V = 32k, 64k, 128k, 262k at a
  fixed N. CPU: V = 32768 / N = 2048, D = 128, fp32; GPU: V = 131072 / N = 8192, D = 4096, bf16.
- ``remit_loss``: logits ``[N, V]`` and scorer logits given (backend ``auto``: the C++ kernels
  on CPU); ``remit_linear_loss``: hidden states ``[N, D]`` and LM heads ``[V, D]`` for the policy
  and the scorer, gradients for hidden and the policy's head (chunked: never ``[N, V]``).
- Memory: ``peak_extra_MB`` beyond the inputs (the method of ``_harness.peak_extra_bytes``; CUDA:
  ``max_memory_allocated``), ``grads_MB`` the gradients the step must return (the logits
  gradient for remit_loss; hidden's and W's for the linear loss), ``over_grads_MB`` the rest: the
  working memory, which is what must stay flat.
- Time: ``--repeats`` timed steps after one untimed (CUDA: synchronised), each point in a fresh
  process; ``ns_per_nv`` = ns per entry of the ``[N, V]`` logits (ms / (N V)): flat when the
  cost is linear in N V.

Points whose inputs and gradient would not fit (over ``--memory-fraction`` of the memory
available when the run starts) are skipped and listed. A full run appends to
``bench/results/<cpu|gpu>_scaling.csv``, rewrites the ``.md`` beside it and draws
``bench/results/plots/<cpu|gpu>_scaling.png``; ``--quick`` (tiny sizes, in process) only prints.

    python bench/bench_scaling.py                   # CPU: ~10 minutes on 2 cores
    python bench/bench_scaling.py --device cuda
    python bench/bench_scaling.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

OPS = ("remit_loss", "remit_linear_loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NS = [1024 * 2 ** i for i in range(6)]  # 1k .. 32k
VS = [32768 * 2 ** i for i in range(4)]  # 32k .. 262k
WORKLOADS = {
    "cpu": {"v_fixed": 32768, "n_fixed": 2048, "dim": 128, "seq_len": 1024, "dtype": "float32",
            "ns": NS, "vs": VS},
    "cuda": {"v_fixed": 131072, "n_fixed": 8192, "dim": 4096, "seq_len": 1024,
             "dtype": "bfloat16", "ns": NS, "vs": VS},
    "quick": {"v_fixed": 512, "n_fixed": 128, "dim": 16, "seq_len": 64, "dtype": "float32",
              "ns": [128, 256], "vs": [512, 1024]},
}
COLUMNS = ("op", "sweep", "n_tokens", "vocab", "dim", "dtype", "ms_p50", "ms_p20", "ms_p80",
           "ns_per_nv", "peak_extra_MB", "grads_MB", "over_grads_MB", "device",
           "cpu_model", "torch_version", "git_sha", "date", "other_cpu_cores", "thp")


def _bytes_needed(op: str, n: int, v: int, d: int, dtype: str) -> int:
    """Inputs plus the gradient of one point (what must fit), in bytes."""
    b = torch.finfo(DTYPES[dtype]).bits // 8
    if op == "remit_loss":
        return 3 * n * v * b  # policy and scorer logits, the logits gradient
    return (4 * n * d + 4 * v * d) * b + v * d * 4  # inputs, grads, the fp32 dW accumulator


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else None


def measure(spec: dict) -> dict:
    """One (op, N, V) point; meant to run in a fresh process (``--child``)."""
    import remit_ext

    device, op, n, v, d = spec["device"], spec["op"], spec["n"], spec["v"], spec["dim"]
    dt = DTYPES[spec["dtype"]]
    g = torch.Generator(device=device).manual_seed(0)
    y = torch.randint(0, v, (n // spec["seq_len"], spec["seq_len"]), generator=g,
                      device=device)
    y.view(-1)[::32] = -100

    def rnd(*shape, scale=1.0):
        return torch.empty(shape, dtype=dt, device=device).normal_(0.0, scale, generator=g)

    if op == "remit_loss":
        z = rnd(*y.shape, v, scale=2.0).requires_grad_()
        s = rnd(*y.shape, v, scale=2.0)
        leaves = (z,)

        def step():
            loss = remit_ext.remit_loss(z, y, scorer_logits=s)
            loss.backward()
            return loss.detach()
    else:
        hid = rnd(*y.shape, d).requires_grad_()
        w = rnd(v, d, scale=3 * d ** -0.5).requires_grad_()
        sh, sw = rnd(*y.shape, d), rnd(v, d, scale=3.5 * d ** -0.5)
        leaves = (hid, w)

        def step():
            loss = remit_ext.remit_linear_loss(hid, w, y, scorer_hidden=sh, scorer_weight=sw)
            loss.backward()
            return loss.detach()

    def restore():
        for t in leaves:
            t.grad = None

    step()
    restore()
    peak, method = h.peak_memory_bytes(step, device)
    restore()
    with h.OtherCpuLoad() as other:
        t = h.time_ms(step, warmup=spec["warmup"], repeats=spec["repeats"], setup=restore,
                      sync=_sync(device))
    grads = sum(x.numel() * x.element_size() for x in leaves)
    return {"peak_extra_bytes": peak, "grads_bytes": grads, "memory_method": method,
            "timing": t._asdict(), "other_cpu_cores": other.cores}


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def points(wl: dict) -> list:
    """(op, sweep, N, V) in run order: every op's N sweep, then its V sweep."""
    out = []
    for op in OPS:
        out += [(op, "N", n, wl["v_fixed"]) for n in wl["ns"]]
        out += [(op, "V", wl["n_fixed"], v) for v in wl["vs"]]
    return out


def run_all(args) -> tuple[list, list, dict]:
    wl = dict(WORKLOADS["quick" if args.quick else args.device])
    env = h.env_info(args.device)
    budget = args.memory_fraction * _available_bytes(args.device)
    rows, skipped = [], []
    for op, sweep, n, v in points(wl):
        need = _bytes_needed(op, n, v, wl["dim"], wl["dtype"])
        where = f"{op} N={n} V={v}"
        if need > budget:
            skipped.append(f"{where}: needs {need / 2 ** 30:.1f} GiB, over {budget / 2 ** 30:.1f} "
                           f"GiB ({args.memory_fraction:g} of what was available)")
            print(f"  {where}: skipped ({skipped[-1].split(': ', 1)[1]})", flush=True)
            continue
        spec = {"device": args.device, "op": op, "n": n, "v": v, "dim": wl["dim"],
                "dtype": wl["dtype"], "seq_len": min(wl["seq_len"], n), "warmup": args.warmup,
                "repeats": args.repeats}
        print(f"  {where} ...", end="", flush=True)
        res = (measure(spec) if args.quick
               else h.run_isolated(Path(__file__), ["--child", json.dumps(spec)]))
        t = res["timing"]
        print(f" {t['p50']:.1f} ms, +{res['peak_extra_bytes'] / h.MB:.0f} MB (grads "
              f"{res['grads_bytes'] / h.MB:.0f} MB)", flush=True)
        rows.append({
            "op": op, "sweep": sweep, "n_tokens": n, "vocab": v, "dim": wl["dim"],
            "dtype": wl["dtype"], "ms_p50": f"{t['p50']:.1f}", "ms_p20": f"{t['p20']:.1f}",
            "ms_p80": f"{t['p80']:.1f}", "ns_per_nv": f"{t['p50'] * 1e6 / (n * v):.3f}",
            "peak_extra_MB": f"{res['peak_extra_bytes'] / h.MB:.1f}",
            "grads_MB": f"{res['grads_bytes'] / h.MB:.1f}",
            "over_grads_MB": f"{(res['peak_extra_bytes'] - res['grads_bytes']) / h.MB:.1f}",
            "device": env["device"], "cpu_model": f"{env['cpu_model']} ({env['threads']} threads)",
            "torch_version": env["torch_version"], "git_sha": env["git_sha"],
            "date": env["date"], "other_cpu_cores": f"{res['other_cpu_cores']:.2f}",
            "thp": env["thp"], "method": res["memory_method"],
        })
    env["loadavg_1m_end"] = h.env_info(args.device)["loadavg_1m"]
    return rows, skipped, {**env, "workload": wl}


def summary_markdown(rows, skipped, env, args) -> str:
    wl = env["workload"]
    cols = ("op", "sweep", "n_tokens", "vocab", "ms_p50", "ms_p20", "ms_p80", "ns_per_nv",
            "peak_extra_MB", "grads_MB", "over_grads_MB", "other_cpu_cores")
    lines = [
        f"# Scaling of remit_loss and remit_linear_loss on {env['device']}",
        "",
        "Generated by `python bench/bench_scaling.py` (method in its docstring); rows are also "
        "appended to the `.csv` beside this file; plot: `plots/"
        f"{_stem(args)}_scaling.png`.",
        "",
        f"- device: {env['device']}, {env['cpu_model']}, {env['threads']} torch threads; load "
        f"average (1 min) {env['loadavg_1m']} at start, {env['loadavg_1m_end']} at end",
        f"- torch {env['torch_version']}, triton {env['triton_version']}, Python "
        f"{env['python']}; remit_ext build {env['build_info']}",
        f"- git {env['git_sha']}, {env['date']}",
        f"- workload: {wl['dtype']}, D = {wl['dim']} (linear), sequences of {wl['seq_len']} "
        f"tokens, every 32nd target ignored, ReMiT with the scorer's logits / hidden states; "
        f"N sweep at V = {wl['v_fixed']}, V sweep at N = {wl['n_fixed']}",
        f"- time: {args.repeats} timed fwd+bwd after {args.warmup + 1} untimed, each point in a "
        f"fresh process; ns_per_nv = ns per [N, V] entry, flat = linear in N V",
        "- memory: peak_extra_MB beyond the inputs; grads_MB = the gradients the step returns "
        "(the [N, V] logits gradient for remit_loss, hidden's and W's for the linear loss); "
        "over_grads_MB = the rest (working memory)",
        "",
        h.markdown_table(rows, cols),
        "",
    ]
    for op in OPS:
        for sweep in ("N", "V"):
            sel = [r for r in rows if r["op"] == op and r["sweep"] == sweep]
            if len(sel) >= 2:
                a, b = sel[0], sel[-1]
                k = "n_tokens" if sweep == "N" else "vocab"
                grow = int(b[k]) / int(a[k])
                lines.append(
                    f"- `{op}`, {sweep} x{grow:g} ({a[k]} -> {b[k]}): time x"
                    f"{float(b['ms_p50']) / float(a['ms_p50']):.1f}, working memory "
                    f"{a['over_grads_MB']} -> {b['over_grads_MB']} MB, gradients "
                    f"{a['grads_MB']} -> {b['grads_MB']} MB")
    if skipped:
        lines += ["", "Skipped (would not fit): " + "; ".join(skipped)]
    return "\n".join(lines + [""])


def _stem(args) -> str:
    return "cpu" if args.device == "cpu" else "gpu"


def plot(rows, path: Path, title: str) -> None:
    """Time and working memory against N and against V (log-log), a line per op, with a
    slope-1 guide through each op's first point: linear cost lies on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for col, (sweep, key, label) in enumerate((("N", "n_tokens", "tokens N"),
                                               ("V", "vocab", "vocabulary V"))):
        for op, marker in zip(OPS, "os"):
            sel = [r for r in rows if r["op"] == op and r["sweep"] == sweep]
            if not sel:
                continue
            xs = [int(r[key]) for r in sel]
            ms = [float(r["ms_p50"]) for r in sel]
            ax = axes[0][col]
            ax.plot(xs, ms, marker=marker, label=op)
            ax.plot(xs, [ms[0] * x / xs[0] for x in xs], ls=":", color="gray", lw=0.8)
            ax = axes[1][col]
            ax.plot(xs, [max(float(r["over_grads_MB"]), 0.1) for r in sel], marker=marker,
                    label=f"{op}: working memory")
            ax.plot(xs, [float(r["grads_MB"]) for r in sel], marker=marker, ls="--",
                    alpha=0.5, label=f"{op}: gradients it returns")
        for row, ylab in ((0, "ms p50, fwd+bwd (dotted: linear)"),
                          (1, "MB beyond the inputs")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylab)
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny sizes, 1 repeat, in process, writes nothing")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="default 1; quick 0")
    p.add_argument("--memory-fraction", type=float, default=0.6,
                   help="skip points needing more than this fraction of the available memory")
    p.add_argument("--no-write", action="store_true", help="print only, even for a full run")
    p.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    h.resolve_repeats(p, args, full_repeats=3)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    rows, skipped, env = run_all(args)
    print()
    print(h.text_table(rows, ("op", "sweep", "n_tokens", "vocab", "ms_p50", "ns_per_nv",
                              "peak_extra_MB", "grads_MB", "over_grads_MB")))
    if args.quick or args.no_write:
        return 0
    stem = _stem(args)
    md = summary_markdown(rows, skipped, env, args)
    h.save_results(h.RESULTS / f"{stem}_scaling.csv", h.RESULTS / f"{stem}_scaling.md", rows,
                   COLUMNS, md)
    png = h.RESULTS / "plots" / f"{stem}_scaling.png"
    plot(rows, png, f"{env['device']} ({env['cpu_model']}), torch {env['torch_version']}, git "
                    f"{env['git_sha']}, {env['date']}")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
