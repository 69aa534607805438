"""``remit-ext bench ...`` and ``python -m remit_ext.bench ...``: the benchmark suite.

    remit-ext bench [run options]        # measure (runner.py); --help for the options
    remit-ext bench table [...]          # the ledger's latest run as markdown (report.py)
    remit-ext bench plot [...]           # ... as PNG charts

On a machine without a GPU the suite runs the Triton kernels in Triton's interpreter, which
works only if ``TRITON_INTERPRET=1`` was set before triton was first imported; by the time this
module runs, ``import remit_ext`` has imported torch._dynamo, hence triton. So when the
variable is unset here, the suite is started in a fresh interpreter with it set (one process
replaced by another: exit status, signals and output are the suite's own).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

help = "the benchmark suite against eager, torch.compile, Liger-Kernel, CCE, QuACK"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Only for `remit-ext --help`: remit_ext.__main__ hands every argument after `bench` here.
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="the suite's options (see `remit-ext bench --help`)")


def run(args) -> int:
    return main(list(args.args))


def main(argv: Optional[Sequence[str]] = None, prog: str = "remit-ext bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if needs_fresh_interpreter():
        return _exec_with_interpreter(argv, prog)
    if argv and argv[0] in ("table", "plot"):
        from . import report

        return report.main(argv[0], argv[1:], prog=prog)
    if argv and argv[0] == "run":
        argv = argv[1:]
    from . import runner

    return runner.main(argv, prog=prog)


def needs_fresh_interpreter() -> bool:
    """True where Triton's kernels would run in its interpreter (no GPU, triton installed) but
    nothing set TRITON_INTERPRET before triton was imported in this process."""
    if "TRITON_INTERPRET" in os.environ or "triton.language" not in sys.modules:
        return False
    import torch

    return not torch.cuda.is_available()


# The suite's entry point in the fresh interpreter: argv[1] is the program name, the rest its
# options.
_BOOT = ("import sys; from remit_ext.bench.cli import main; "
         "sys.exit(main(sys.argv[2:], prog=sys.argv[1]))")


def _exec_with_interpreter(argv: Sequence[str], prog: str) -> int:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-c", _BOOT, prog, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(sys.executable, cmd, env)  # does not return
    import subprocess

    return subprocess.call(cmd, env=env)
