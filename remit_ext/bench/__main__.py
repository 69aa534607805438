"""``python -m remit_ext.bench ...``: the same as ``remit-ext bench ...`` (``cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m remit_ext.bench"))
