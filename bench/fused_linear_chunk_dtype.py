"""bf16 or fp32 chunk logits in the fused-linear loss (issue 26 item 6): the accuracy, time and
memory of ``remit_linear_loss(..., chunk_dtype=None | torch.float32)`` on bf16 inputs.

Accuracy: loss and gradient errors against the fp64 loss of the same bf16-rounded inputs, at
logit scales (std of the logits) 4 and 16. Time: forward + backward, the two settings
interleaved, median of ``--repeats``. Memory: the peak resident set above the inputs of a fresh
process running one step of each setting (the fp32 setting holds fp32 copies of the head and the hidden states;
the chunk buffers keep the same byte budget). One torch thread.

    python bench/fused_linear_chunk_dtype.py --out bench/results/fused_linear_chunk_dtype.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

import remit_ext
from remit_ext.reference import target_logprob_ref

SETTINGS = {"bf16 chunk logits (default)": None, "fp32 chunk logits": torch.float32}


def inputs(n, d, v, scale, seed=0):
    """bf16 hidden states and head, drawn in bf16 (no wider temporary: the peak-memory reading
    starts from the inputs alone), and targets."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.bfloat16)
    w = torch.randn(v, d, generator=g, dtype=torch.bfloat16).mul_(scale / d ** 0.5)
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def step(h, w, y, chunk_dtype):
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    loss = remit_ext.remit_linear_loss(h, w, y, method="ntp", backend="cpu",
                                       chunk_dtype=chunk_dtype)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def accuracy(n, d, v):
    rows = []
    for scale in (4.0, 16.0):
        h, w, y = inputs(n, d, v, scale)
        h64 = h.double().requires_grad_(True)
        w64 = w.double().requires_grad_(True)
        truth = -target_logprob_ref(h64 @ w64.T, y).mean()
        truth.backward()
        truth = truth.detach()
        for name, cd in SETTINGS.items():
            loss, gh, gw = step(h, w, y, cd)
            rel = lambda g, t: float((g.double() - t).norm() / t.norm())  # noqa: E731
            rows.append({"scale": scale, "setting": name,
                         "loss_rel": abs(float(loss) - float(truth)) / abs(float(truth)),
                         "grad_hidden_rel": rel(gh, h64.grad),
                         "grad_weight_rel": rel(gw, w64.grad)})
    return rows


def timing(n, d, v, repeats):
    h, w, y = inputs(n, d, v, 8.0)
    times = {name: [] for name in SETTINGS}
    for name, cd in SETTINGS.items():  # warm-up
        step(h, w, y, cd)
    for _ in range(repeats):
        for name, cd in SETTINGS.items():  # interleaved
            t0 = time.perf_counter()
            step(h, w, y, cd)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss(n, d, v, setting):
    """Peak resident set (MiB) above the inputs of a fresh process running one step of
    ``setting``: the high-water mark is reset after the inputs exist (``/proc/self/clear_refs``;
    ``ru_maxrss`` would carry the parent's peak across ``exec``)."""
    code = (f"import torch, sys; sys.path.insert(0, 'bench'); torch.set_num_threads(1);"
            f"import fused_linear_chunk_dtype as b; h, w, y = b.inputs({n}, {d}, {v}, 8.0);"
            f"open('/proc/self/clear_refs', 'w').write('5');"
            f"base = b._status_kib('VmRSS');"
            f"b.step(h, w, y, b.SETTINGS[{setting!r}]);"
            f"print(b._status_kib('VmHWM') - base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the markdown table here (+ .json)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    acc = accuracy(256, 256, 8000)
    t = timing(a.n, a.d, a.v, a.repeats)
    mem = {name: peak_rss(a.n, a.d, a.v, name) for name in SETTINGS}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    head = (f"`python bench/fused_linear_chunk_dtype.py` at git "
            f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}"
            f", {cpu}, torch {torch.__version__}, one thread, backend cpu, method ntp.")
    lines = [head, "", "Accuracy against the fp64 loss of the same bf16 inputs (N=256, D=256, "
             "V=8000), relative errors:", "",
             "| logit scale | setting | loss | grad hidden | grad weight |", "|---|---|---|---|---|"]
    for r in acc:
        lines.append(f"| {r['scale']:g} | {r['setting']} | {r['loss_rel']:.1e} | "
                     f"{r['grad_hidden_rel']:.1e} | {r['grad_weight_rel']:.1e} |")
    lines += ["", f"Cost at N={a.n}, D={a.d}, V={a.v} (bf16 inputs; forward + backward, median "
              f"of {a.repeats} interleaved runs; peak RSS above the inputs of a fresh process "
              "running one step):", "", "| setting | time (s) | peak RSS (MiB) |", "|---|---|---|"]
    for name in SETTINGS:
        lines.append(f"| {name} | {t[name]:.3f} | {mem[name]:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        with open(a.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump({"accuracy": acc, "time_s": t, "peak_rss_mib": mem, "header": head}, f,
                      indent=1)


if __name__ == "__main__":
    main()
