"""Command line: ``remit-ext [COMMAND] [OPTIONS]`` or ``python -m remit_ext ...``.

Each command is an object (a module or an instance) with ``add_arguments(parser)`` and
``run(args) -> exit status``; ``demo`` is the default. The training commands live in
``remit_ext.train.cli``; ``score-hf`` (the Hugging Face scorer cache) in ``remit_ext.hf.cli``;
``bench`` (the benchmark suite) in ``remit_ext.bench.cli``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__, demo
from .bench import cli as bench_cli
from .hf import cli as hf_cli
from .train.cli import COMMANDS as TRAIN_COMMANDS

COMMANDS = {
    "demo": (demo, "ReMiT loss fwd+bwd on every backend, checked against the fp64 reference"),
    "bench": (bench_cli, bench_cli.help),
    **{name: (cmd, cmd.help) for name, cmd in TRAIN_COMMANDS.items()},
    "score-hf": (hf_cli, hf_cli.help),
}
DEFAULT_COMMAND = "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remit-ext",
        description="remit_ext: fused kernels for token-reweighted LLM training "
                    f"(ReMiT, Rho-1, KD). Without a command, runs '{DEFAULT_COMMAND}'.")
    parser.add_argument("--version", action="store_true",
                        help="print the version and build info, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # every option after it belongs to the suite
        return bench_cli.main(argv[1:])
    # Bare options (`remit-ext --dtype bfloat16`) belong to the default command.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, DEFAULT_COMMAND)
    args = build_parser().parse_args(argv)
    if args.version:
        from ._build import build_info

        print(f"remit_ext {__version__}; build: {build_info()}")
        return 0
    module, _ = COMMANDS[args.command]
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
