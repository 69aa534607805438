"""``python -m bench ...`` from the repository's root: the old name of ``remit-ext bench ...``
(``remit_ext/bench/cli.py``), kept for existing scripts."""

import sys

import bench  # noqa: F401  (sets TRITON_INTERPRET before remit_ext imports triton)
from remit_ext.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m bench"))
