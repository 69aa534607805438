"""``python -m bench [run options]``, ``python -m bench table ...``, ``python -m bench plot ...``
(also ``remit-ext bench ...`` from a checkout). ``--help`` after each for its options."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("table", "plot"):
        from bench import report

        return report.main(argv[0], argv[1:], prog=prog)
    if argv and argv[0] == "run":
        argv = argv[1:]
    from bench import runner

    return runner.main(argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
