"""remit_ext's benchmark suite: ``python -m bench`` (or ``remit-ext bench``) from a checkout.

- ``runner``: measures cases (an op, a provider, a shape, a dtype) against the hardware floor
  measured in the same run and appends rows to ``bench/results/<device>.csv``;
- one module per op family, each also runnable alone: ``suite_token_stats``, ``suite_weights``,
  ``suite_logits_loss``, ``suite_linear_loss``;
- ``providers``: which implementations run on this machine, and why the others do not;
- ``report``: the ledger's latest run as a markdown table (and the README's copy of it) and as
  PNG charts.

``bench_remit_loss_cpu.py`` and ``bench_linear_loss.py`` are separate CPU studies (time and peak
memory, each measurement in a fresh process); ``_harness`` holds what every script shares.
"""
