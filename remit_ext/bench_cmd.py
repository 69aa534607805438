"""``remit-ext bench ...``: the benchmark suite of a source checkout (``bench/`` beside
``remit_ext/``), the same as ``python -m bench ...`` run from the checkout's root.

The suite is not part of the installed package (its results ledger and plots live in the
repository), so this command looks for it next to the imported ``remit_ext`` (an editable
install) and then in the current directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

help = "the benchmark suite against eager, torch.compile, Liger-Kernel, CCE (run from a checkout)"


def locate(candidates: Optional[Sequence[Path]] = None) -> Optional[Path]:
    """The checkout root holding ``bench/runner.py`` (None when there is none)."""
    if candidates is None:
        candidates = (Path(__file__).resolve().parents[1], Path.cwd())
    for root in candidates:
        if (root / "bench" / "runner.py").is_file():
            return root
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Only for `remit-ext --help`: main() hands every argument after `bench` to the suite.
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="options of `python -m bench` (see `remit-ext bench --help`)")


def run(args) -> int:
    return forward(list(args.args))


def forward(argv: Sequence[str]) -> int:
    root = locate()
    if root is None:
        print("remit-ext bench: no benchmark suite here. It lives in the source repository "
              "(bench/ beside remit_ext/): run this from a checkout, or install the checkout "
              "with `pip install --no-build-isolation -e .`.", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.__main__ import main

    return main(argv, prog="remit-ext bench")
