"""remit_ext's benchmark suite: ``remit-ext bench`` (or ``python -m remit_ext.bench``); it ships
with the package and runs from any directory.

- ``cli``: the command (``run``, the default; ``table``; ``plot``);
- ``runner``: measures cases (an op, a provider, a shape, a dtype) against the hardware floor
  measured in the same run and appends rows to ``<out-dir>/<device>.csv`` (default
  ``bench/results`` under the current directory: the repository's ledger when run from its
  root); a full GPU run also records the measured backend order that ``backend="auto"`` reads
  (``remit_ext._backends.user_auto_table()``);
- one module per op family: ``suite_token_stats``, ``suite_weights``, ``suite_logits_loss``,
  ``suite_linear_loss``;
- ``providers``: which implementations run on this machine, and why the others do not;
  ``eager``: the plain PyTorch every speed-up is measured against; ``targets``: today's best
  published results (the ``vs_best`` column);
- ``report``: the ledger's latest run as a markdown table (and its copy in the checkout's
  ``docs/benchmarks.md``) and as PNG charts;
- ``_harness``: timing, peak memory, environment columns, result files.

The repository's ``bench/`` keeps what needs a checkout: the pytest-benchmark entry point
(``python -m pytest bench --benchmark-only``), the CPU studies (``bench/bench_*.py``) and the
ledgers (``bench/results/``).
"""
