"""``remit-ext bench ...``: the benchmark suite of a source checkout (``bench/`` beside
``remit_ext/``), the same as ``python -m bench ...`` run from the checkout's root.

The suite is not part of the installed package (its results ledger and plots live in the
repository), so this command looks for it next to the imported ``remit_ext`` (an editable
install) and then in the current directory.

On a machine without a GPU the suite runs the Triton kernels in Triton's interpreter, which
works only if ``TRITON_INTERPRET=1`` was set before triton was first imported; ``remit-ext``
has imported ``remit_ext`` (hence torch._dynamo, hence triton) before it gets here. So when the
variable is unset there, the suite is started in a fresh interpreter with it set (one process
replaced by another: exit status, signals and output are the suite's own).
"""

from __future__ import annotations

import argparse
import os
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
    if needs_fresh_interpreter():
        return _exec_with_interpreter(root, argv)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.__main__ import main

    return main(argv, prog="remit-ext bench")


# The suite's entry point in a fresh interpreter: argv[1] is the checkout, the rest its options.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.__main__ import main; "
         "sys.exit(main(sys.argv[2:], prog='remit-ext bench'))")


def needs_fresh_interpreter() -> bool:
    """True where Triton's kernels would run in its interpreter (no GPU, triton installed) but
    nothing set TRITON_INTERPRET before triton was imported in this process."""
    if "TRITON_INTERPRET" in os.environ or "triton.language" not in sys.modules:
        return False
    import torch

    return not torch.cuda.is_available()


def _exec_with_interpreter(root: Path, argv: Sequence[str]) -> int:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-c", _BOOT, str(root), *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(sys.executable, cmd, env)  # does not return
    import subprocess

    return subprocess.call(cmd, env=env)
