"""Shared benchmark helpers: timing quantiles, peak memory, environment, result files.

Used by the suite (``remit-ext bench``: ``runner.py`` and one ``suite_*.py`` per op family) and
by the repository's CPU studies (``bench/bench_remit_loss_cpu.py``, ``bench/bench_linear_loss.py``,
through ``bench/_harness.py``); every result row carries the same environment columns so runs on
different machines can be told apart.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

# Where the suite writes its ledger unless --out-dir says otherwise: bench/results under the
# current directory (the repository's ledger when run from its root), or REMIT_BENCH_RESULTS.
RESULTS = Path(os.environ.get("REMIT_BENCH_RESULTS") or Path("bench") / "results")
MB = 1024 * 1024
# The columns of a suite ledger (<out-dir>/<device>.csv): runner writes its rows, report
# reads them.
COLUMNS = ["op", "provider", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "throughput",
           "unit", "floor_frac", "floor_ms", "floor", "vs_best", "best_ms", "best",
           "peak_mem_MB", "speedup_vs_eager", "device", "torch_version", "triton_version",
           "provider_version", "git_sha", "date", "thp"]


# ------------------------------------------------------------------------------------ timing


class Timing(NamedTuple):
    p50: float
    p20: float
    p80: float
    n: int


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (torch.quantile's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def time_ms(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 10,
            setup: Optional[Callable[[], None]] = None,
            sync: Optional[Callable[[], None]] = None) -> Timing:
    """Wall-clock ms of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    ``setup()`` runs before every call outside the timed region (reset grads, restore inputs a
    call overwrites); ``sync()`` ends each timed region (``torch.cuda.synchronize`` on GPU).
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    samples = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        if i >= warmup:
            samples.append(1e3 * (time.perf_counter() - t0))
    samples.sort()
    return Timing(quantile(samples, 0.5), quantile(samples, 0.2), quantile(samples, 0.8),
                  len(samples))


def cuda_time_ms(fn: Callable[[], object], *, setup: Optional[Callable[[], None]] = None,
                 warmup_ms: float = 25.0, rep_ms: float = 200.0, max_reps: int = 1000,
                 flush_bytes: int = 256 * MB) -> Timing:
    """Per-call ms of ``fn()`` on the current CUDA stream from CUDA events, with the L2 cache
    flushed (a ``flush_bytes`` buffer zeroed) before every call, so each call reads its inputs
    from HBM as a training step would. Calls run for about ``warmup_ms`` untimed, then about
    ``rep_ms`` timed (at least 5 calls). ``setup()`` runs before each call, outside the events.
    """
    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")

    def once(start=None, end=None):
        if setup is not None:
            setup()
        flush.zero_()
        if start is not None:
            start.record()
        fn()
        if end is not None:
            end.record()

    once()
    torch.cuda.synchronize()
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    once(*probe)
    torch.cuda.synchronize()
    est = max(probe[0].elapsed_time(probe[1]), 1e-3)
    for _ in range(max(1, min(max_reps, int(warmup_ms / est)))):
        once()
    reps = max(5, min(max_reps, int(rep_ms / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        once(start, end)
    torch.cuda.synchronize()
    samples = sorted(s.elapsed_time(e) for s, e in events)
    del flush
    return Timing(quantile(samples, 0.5), quantile(samples, 0.2), quantile(samples, 0.8),
                  len(samples))


def peak_memory_bytes(fn: Callable[[], object], device: str) -> tuple[int, str]:
    """Peak bytes one ``fn()`` holds beyond what was allocated before it (its outputs included):
    the CUDA caching allocator's high-water mark on GPU, the resident set's on CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    return peak_extra_bytes(fn)


class OtherCpuLoad:
    """Context manager: how busy *other* processes kept the CPUs while the block ran, in cores
    (CPU seconds of the whole machine, from /proc/stat, minus this process's, per wall second).
    Timings taken while it is well above 0 shared the cores and are not clean."""

    def __enter__(self):
        self._t0, self._busy0, self._own0 = time.perf_counter(), _busy_s(), time.process_time()
        self.cores = float("nan")
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t0
        busy, own = _busy_s(), time.process_time()
        if wall > 0 and busy == busy and self._busy0 == self._busy0:
            self.cores = max((busy - self._busy0) - (own - self._own0), 0.0) / wall
        return False


def _busy_s() -> float:
    """Non-idle CPU seconds of the machine since boot (nan where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- peak memory
#
# CPU tensors come from malloc; tensors this large are mmap'ed and handed back to the kernel on
# free, so the resident set size (RSS) follows the live tensors page by page. Linux keeps the
# process's RSS high-water mark (VmHWM, also what getrusage's ru_maxrss reports), and writing
# "5" to /proc/self/clear_refs resets it to the current RSS. So: allocate and touch the inputs,
# reset the mark, run once, and the mark's growth is the peak of everything the run allocated
# beyond its inputs (outputs and the gradient included). Without clear_refs the mark cannot be
# reset and the growth of ru_maxrss is used as is: then the measured call must be the first big
# one in a fresh process, and the figure is a lower bound if anything earlier peaked higher.


def _rss_hwm_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    """Peak bytes ``fn()`` holds beyond what was resident before it, and the method used."""
    gc.collect()
    if sys.platform.startswith("linux") and _reset_hwm():
        base, _ = _rss_hwm_kib()
        fn()
        _, peak = _rss_hwm_kib()
        return max(peak - base, 0) * 1024, "VmHWM after clear_refs reset"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return max(peak - base, 0) * scale, "ru_maxrss growth (no reset: lower bound)"


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    """Short sha of the checkout the running remit_ext comes from (-dirty when tracked files
    differ from it): the package's own work tree (an editable install), else the current
    directory's when it is a remit_ext checkout (a plain install run from the checkout it was
    installed from), else "unknown"."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if not _is_checkout(root):
            continue
        try:
            return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                                  capture_output=True, text=True, cwd=root,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
    return "unknown"


def _is_checkout(root: Path) -> bool:
    try:
        return 'name = "remit_ext"' in (root / "pyproject.toml").read_text()
    except OSError:
        return False


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def env_info(device: str = "cpu") -> dict:
    """Where and with what a result was measured."""
    import remit_ext

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu"
    return {
        "device": name,
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "build_info": remit_ext.build_info(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        # PyTorch's CPU allocator asks for transparent huge pages only with this set: without,
        # every fresh [N, V] CPU buffer is paid for in 4 KiB page faults on first touch.
        "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ------------------------------------------------------------------------------ results


def device_slug(name: str) -> str:
    """A device name as a file stem: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_") or "device"


def append_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Append rows to a CSV ledger, writing the header when the file is new. An existing
    ledger must have the same columns: appending under another header would misfile values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(columns):
            raise ValueError(f"{path}: its header {header} differs from the columns being "
                             f"written {list(columns)}; move the old ledger aside")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def resolve_repeats(parser, args, full_repeats: int) -> None:
    """Fill --repeats / --warmup defaults (one timed call and no warmup under --quick) and
    reject impossible values through the parser."""
    if args.repeats is None:
        args.repeats = 1 if args.quick else full_repeats
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")


def save_results(csv_path: Path, md_path: Path, rows: Sequence[dict],
                 columns: Sequence[str], md: str) -> None:
    """Append the rows to the CSV ledger, rewrite the markdown summary, say where they went."""
    append_csv(csv_path, rows, columns)
    md_path.write_text(md)
    print(f"\nappended {len(rows)} rows to {csv_path}; wrote {md_path}")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Plain aligned text for the terminal."""
    cells = [list(columns)] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)
