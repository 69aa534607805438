"""Measure the device's memory bandwidth the way the row kernels use it: one read-only sweep of a
large bf16 tensor (a sum, as token_stats reads the logits) and one read + write sweep (a copy,
as the in-place gradient rewrites them). Timed with CUDA events, median of repeats, after
warm-up. tools/gpu_check.py runs it first in its bench stage; the read number replaces the
assumed bandwidth of the static ledger: ``python tools/gpu_static.py --bandwidth-tbs X``.

    python tools/gpu_bandwidth.py --out bandwidth.json            # on a GPU (4 GiB, bf16)
    python tools/gpu_bandwidth.py --device cpu --gib 0.01         # rehearsal on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(device: str = "cuda", gib: float = 4.0, repeats: int = 10) -> dict:
    dev = torch.device(device)
    n = int(gib * (1 << 30)) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    t_read = _time(lambda: x.sum(dtype=torch.float32), dev, repeats)
    t_copy = _time(lambda: y.copy_(x), dev, repeats)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "device": name, "torch": torch.__version__, "bytes": nbytes,
        "read_tbs": nbytes / t_read / 1e12, "copy_tbs": 2 * nbytes / t_copy / 1e12,
        "read_ms": t_read * 1e3, "copy_ms": t_copy * 1e3, "repeats": repeats,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gib", type=float, default=4.0, help="tensor size (default 4 GiB)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    res = measure(args.device, args.gib, args.repeats)
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"bandwidth on {res['device']}: read {res['read_tbs']:.3f} TB/s, copy (read + write) "
          f"{res['copy_tbs']:.3f} TB/s ({res['bytes'] / 2**30:.2f} GiB bf16, median of "
          f"{res['repeats']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
