"""The repository's side of remit_ext's benchmark suite (the suite itself is ``remit_ext.bench``:
``remit-ext bench`` or ``python -m remit_ext.bench``, from any directory):

- ``test_suite.py`` + ``conftest.py``: the suite's cases under pytest-benchmark (``python -m
  pytest bench --benchmark-only``);
- ``bench_remit_loss_cpu.py``, ``bench_linear_loss.py``, ``bench_scaling.py``: separate studies
  (time and peak memory, each measurement in a fresh process), through ``_harness.py``;
- ``results/``: the ledgers (``remit-ext bench`` run from the repository's root appends here).
"""

import os

# Triton's interpreter (how its kernels run on CPU tensors) only works if TRITON_INTERPRET=1 is
# set before triton is first imported, and torch imports triton as soon as torch._dynamo loads,
# which `import remit_ext` does. pytest imports this package before bench/conftest.py and
# bench/test_suite.py import remit_ext, so this is the earliest place to set it; `remit-ext
# bench`, which has imported remit_ext already, starts a fresh interpreter with the variable set
# instead (remit_ext/bench/cli.py).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
