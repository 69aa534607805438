"""The CPU studies' helpers: ``remit_ext.bench._harness`` (timing, peak memory, environment,
result files) plus what needs the checkout: its ledger directory and fresh-process runs of a
study script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from remit_ext.bench._harness import (  # noqa: F401  (the studies use them as h.<name>)
    MB,
    OtherCpuLoad,
    env_info,
    markdown_table,
    peak_extra_bytes,
    peak_memory_bytes,
    quantile,
    resolve_repeats,
    save_results,
    text_table,
    time_ms,
)

REPO = Path(__file__).resolve().parent.parent
# Where the studies write their ledgers (REMIT_BENCH_RESULTS moves them, e.g. to measure a
# clean checkout without touching its tracked files).
RESULTS = Path(os.environ.get("REMIT_BENCH_RESULTS") or REPO / "bench" / "results")


def run_isolated(script: Path, args: Sequence[str], timeout: float = 1800) -> dict:
    """Run ``python script *args`` in a fresh process; its last stdout line is a JSON dict."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
