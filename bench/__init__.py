"""remit_ext's benchmark suite: ``python -m bench`` (or ``remit-ext bench``) from a checkout.

- ``runner``: measures cases (an op, a provider, a shape, a dtype) against the hardware floor
  measured in the same run and appends rows to ``bench/results/<device>.csv``;
- one module per op family, each also runnable alone: ``suite_token_stats``, ``suite_weights``,
  ``suite_logits_loss``, ``suite_linear_loss``;
- ``providers``: which implementations run on this machine, and why the others do not;
  ``eager``: the plain PyTorch every speed-up is measured against; ``targets``: today's best
  published results (the ``vs_best`` column);
- ``report``: the ledger's latest run as a markdown table (and its copy in
  ``docs/benchmarks.md``) and as PNG charts.

``test_suite.py`` runs the same cases under pytest-benchmark (``python -m pytest bench
--benchmark-only``). ``bench_remit_loss_cpu.py``, ``bench_linear_loss.py`` and
``bench_scaling.py`` are separate studies (time and peak memory, each measurement in a fresh
process); ``_harness`` holds what every script shares.
"""

import os

# Triton's interpreter (how its kernels run on CPU tensors) only works if TRITON_INTERPRET=1 is
# set before triton is first imported, and torch imports triton as soon as torch._dynamo loads,
# which `import remit_ext` does. Every entry point of the suite imports this package first
# (python -m bench, pytest bench, the suite_*.py scripts), so this is the earliest place to set
# it; `remit-ext bench`, which has imported remit_ext already, starts a fresh interpreter with
# the variable set instead (remit_ext/bench_cmd.py).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
