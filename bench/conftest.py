"""pytest-benchmark for the suite: ``python -m pytest bench --benchmark-only`` runs the cases of
``remit-ext bench`` (the same families, providers, correctness gate, floors and targets; the
shapes the runner picks for the device), one benchmark per (op, provider, shape, dtype), grouped
by (op, shape, dtype) so pytest-benchmark's table compares the providers side by side.

The runner's options, as ``--bench-*``:

    python -m pytest bench --benchmark-only                      # CPU shapes, or a GPU's
    python -m pytest bench --benchmark-only --bench-quick        # tiny shapes (CI)
    python -m pytest bench --benchmark-only --bench-ops remit_loss,linear_loss \\
        --bench-shapes 16384x128256,16384x4096x128256 --bench-dtypes bfloat16 \\
        --benchmark-json out.json                               # then --benchmark-compare

``--bench-ledger DIR`` also appends the rows (the ledger's columns) to ``DIR/<device>.csv``.
The default command (``python -m pytest``) collects ``python_tests`` only (pyproject's
``testpaths``) and never these.
"""

from __future__ import annotations

import argparse

import pytest

import bench  # noqa: F401  (first: sets TRITON_INTERPRET before anything imports triton)

PYTEST_CPU_REPEATS = 3

_OPTIONS = (  # (pytest option, runner option, help)
    ("--bench-ops", "--ops", "comma-separated op families or ops (default: all)"),
    ("--bench-shapes", "--shapes", "comma-separated NxV / NxDxV (default: the runner's for the "
                                   "device: the published set on a GPU, CPU shapes on CPU)"),
    ("--bench-dtypes", "--dtypes", "comma-separated (default: bfloat16,float32)"),
    ("--bench-providers", "--providers", "comma-separated (default: the runner's)"),
    ("--bench-device", "--device", "cuda or cpu (default: cuda when there is one)"),
    ("--bench-seq-len", "--seq-len", "tokens per sequence for ReMiT's centring"),
    ("--bench-repeats", "--repeats", f"timed calls per case on CPU after one untimed (default "
                                     f"{PYTEST_CPU_REPEATS}: the default run stays under 5 "
                                     f"minutes on 2 cores)"),
)


def pytest_addoption(parser):
    group = parser.getgroup("remit_ext bench", "remit_ext benchmark suite (bench/)")
    group.addoption("--bench-quick", action="store_true",
                    help="tiny shapes, one timed call: a smoke test whose timings mean nothing")
    for opt, _, text in _OPTIONS:
        group.addoption(opt, default=None, help=text)
    group.addoption("--bench-ledger", default=None, metavar="DIR",
                    help="also append the rows to DIR/<device>.csv (the suite's ledger)")


class _UsageParser(argparse.ArgumentParser):
    def error(self, message):
        raise pytest.UsageError(f"bench options: {message}")


def suite_args(config):
    """The runner's resolved arguments for this session (from the --bench-* options)."""
    from remit_ext.bench import runner

    argv = ["--quick"] if config.getoption("--bench-quick") else []
    if config.getoption("--bench-repeats") is None:
        argv += ["--repeats", str(PYTEST_CPU_REPEATS)]
    for opt, runner_opt, _ in _OPTIONS:
        value = config.getoption(opt)
        if value is not None:
            items = [x for x in value.replace(",", " ").split() if x]
            argv += [runner_opt, *items]
    ap = _UsageParser(prog="pytest bench")
    runner.add_run_arguments(ap)
    args = ap.parse_args(argv)
    runner.resolve(ap, args, runner.families())
    return args
