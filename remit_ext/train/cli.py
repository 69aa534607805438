"""``remit-ext`` training commands: pretrain, rl, score, midtrain, eval, flywheel.

Each is an object with ``add_arguments(parser)`` and ``run(args) -> exit status``, listed in
``remit_ext.__main__.COMMANDS``. A stage whose directory holds ``final.pt`` is done and is
skipped; one holding ``checkpoint.pt`` resumes from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from .presets import PRESETS, get_preset


def _common_args(parser: argparse.ArgumentParser, out_help: str,
                 default_out: Path | None = None) -> None:
    if default_out is None:
        parser.add_argument("--out", type=Path, required=True, help=out_help)
    else:
        parser.add_argument("--out", type=Path, default=default_out,
                            help=f"{out_help} (default: %(default)s)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="model, data and schedule sizes (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help="override one preset field (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="overrides the preset's seed")
    parser.add_argument("--backend", default="auto",
                        help="remit_ext loss backend: auto, cpu, triton, cuda or torch")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete --out first instead of resuming from it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--fused-linear", action="store_true",
                        help="mid-training losses through remit_linear_loss (hidden states and "
                             "LM heads in; no [tokens x vocab] logits held)")
    parser.add_argument("--fsdp", action="store_true",
                        help="midtrain under torchrun: FSDP2 fully_shard of the blocks, the LM "
                             "head and the model over the data-parallel mesh, instead of DDP")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="midtrain under torchrun: the LM head vocab-parallel over N ranks "
                             "(the rest of the model replicated)")
    parser.add_argument("--cp", type=int, default=1, metavar="N",
                        help="midtrain under torchrun: loss-level context parallelism over N "
                             "ranks (each computes the loss on its 1/N of the positions after "
                             "the full forward; not ring attention)")


def _common(args, parallel: bool = False):
    from .stages import Common

    if not parallel and (args.fsdp or args.tp != 1 or args.cp != 1):
        raise SystemExit("--fsdp / --tp / --cp: only `midtrain` takes them (ntp, remit, rho1, "
                         "kd)")

    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    if args.overwrite and args.out.exists():
        shutil.rmtree(args.out) if args.out.is_dir() else args.out.unlink()
    return Common(get_preset(args.preset, overrides), args.out, args.backend, args.device,
                  progress=not args.no_progress, fused_linear=args.fused_linear,
                  fsdp=args.fsdp, tp=args.tp, cp=args.cp)


def _print_eval(stage_dir: Path) -> None:
    from .runtime import get_dist, load

    if get_dist().is_main:
        ev = load(Path(stage_dir) / "final.pt").get("eval")
        print(json.dumps({"out": str(stage_dir), "eval": ev}, indent=1))


class _Command:
    help = ""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text


class Pretrain(_Command):
    def add_arguments(self, parser):
        _common_args(parser, "directory for checkpoints, metrics and final.pt")

    def run(self, args) -> int:
        from .stages import pretrain

        _print_eval(pretrain(_common(args)))
        return 0


class RL(_Command):
    def add_arguments(self, parser):
        _common_args(parser, "directory for checkpoints, metrics and final.pt")
        parser.add_argument("--init", type=Path, required=True,
                            help="the model to start from (a stage directory or its final.pt)")

    def run(self, args) -> int:
        from .stages import rl

        _print_eval(rl(_common(args), args.init))
        return 0


class Score(_Command):
    def add_arguments(self, parser):
        _common_args(parser, "file to write the cached log-probs to")
        parser.add_argument("--scorer", type=Path, required=True, help="the RL model")

    def run(self, args) -> int:
        from .stages import score

        print(f"wrote {score(_common(args), args.scorer)}")
        return 0


class Midtrain(_Command):
    def add_arguments(self, parser):
        from .stages import METHODS

        _common_args(parser, "directory for checkpoints, metrics and final.pt")
        parser.add_argument("--method", required=True, choices=METHODS)
        parser.add_argument("--init", type=Path, required=True, help="the pre-trained model")
        parser.add_argument("--scorer", type=Path, default=None,
                            help="the RL model, run live (remit, rho1, kd; rmt takes none)")
        parser.add_argument("--scorer-cache", type=Path, default=None,
                            help="log-probs from `remit-ext score` (remit, rho1)")

    def run(self, args) -> int:
        from .stages import midtrain

        _print_eval(midtrain(_common(args, parallel=True), args.init, args.method, args.scorer,
                             args.scorer_cache))
        return 0


class Eval(_Command):
    def add_arguments(self, parser):
        parser.add_argument("--ckpt", type=Path, required=True,
                            help="a stage directory or its final.pt")
        parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
        parser.add_argument("--set", dest="overrides", action="append", default=[],
                            metavar="FIELD=VALUE")
        parser.add_argument("--device", default=None)
        parser.add_argument("--backend", default="auto")
        parser.add_argument("--json", type=Path, default=None, help="also write the result here")

    def run(self, args) -> int:
        import torch

        from .runtime import atomic_write_text
        from .stages import evaluate, load_model

        p = get_preset(args.preset, args.overrides)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        result = evaluate(load_model(args.ckpt, device), p, device, args.backend)
        text = json.dumps(result, indent=1)
        print(text)
        if args.json:
            atomic_write_text(text + "\n", args.json)
        return 0


class Flywheel(_Command):
    def add_arguments(self, parser):
        _common_args(parser, "directory for every stage and the results",
                     default_out=Path("runs/flywheel"))
        parser.add_argument("--methods", nargs="+", default=["ntp", "rho1", "remit", "kd", "rmt"],
                            choices=["ntp", "rho1", "remit", "kd", "rmt"])
        parser.add_argument("--post-rl", action=argparse.BooleanOptionalAction, default=True,
                            help="after mid-training, RL-tune each mid-trained model too and "
                                 "report its accuracy (default: on)")
        parser.add_argument("--reference-from", default="midtrain",
                            choices=["midtrain", "pretrain"],
                            help="the RL reference is RL on the NTP mid-trained model (the "
                                 "paper's order, default) or, as an ablation, on the "
                                 "pre-trained base")
        parser.add_argument("--scorer-cache-check", action="store_true",
                            help="run ReMiT a second time with the scorer live at every step "
                                 "and report the cache's speed-up (one more mid-training run)")
        parser.add_argument("--turns", type=int, default=1, choices=[1, 2],
                            help="2: the flywheel's second turn, RL on the ReMiT model as the "
                                 "next reference and ReMiT steered by it (ReMiT²)")
        parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                            help="with remit: the control row, ReMiT steered by the NTP model "
                                 "itself (no RL) (default: on)")
        parser.add_argument("--seeds", type=int, default=None, metavar="K",
                            help="run K seeds (--seed, --seed+1, ...; each in OUT/seed<s>) and "
                                 "write OUT/seeds.json and OUT/seeds.md: per-seed results and "
                                 "paired differences against NTP with 95%% CIs")
        parser.add_argument("--jobs", type=int, default=None, metavar="J",
                            help="with --seeds: seeds run at once, as separate processes "
                                 "(default: min(K, CPU cores))")

    def run(self, args) -> int:
        if args.seeds is not None:
            return self._run_seeds(args)
        from .flywheel import flywheel

        return flywheel(_common(args), args.methods, args.post_rl, args.reference_from,
                        args.scorer_cache_check, args.turns, args.control)

    @staticmethod
    def _run_seeds(args) -> int:
        import os

        from .seeds import run_seeds

        if args.seeds < 1:
            raise SystemExit(f"--seeds: expected a positive count, got {args.seeds}")
        if args.overwrite and args.out.exists():
            shutil.rmtree(args.out) if args.out.is_dir() else args.out.unlink()
        first = args.seed if args.seed is not None else get_preset(args.preset,
                                                                    args.overrides).seed
        seeds = list(range(first, first + args.seeds))
        jobs = args.jobs or min(args.seeds, os.cpu_count() or 1)

        def argv(seed, sdir):
            a = ["--out", str(sdir), "--preset", args.preset, "--seed", str(seed),
                 "--backend", args.backend, "--no-progress", "--methods", *args.methods,
                 "--reference-from", args.reference_from, "--turns", str(args.turns),
                 "--control" if args.control else "--no-control",
                 "--post-rl" if args.post_rl else "--no-post-rl"]
            for o in args.overrides:
                a += ["--set", o]
            if args.device:
                a += ["--device", args.device]
            if args.fused_linear:
                a.append("--fused-linear")
            if args.scorer_cache_check:
                a.append("--scorer-cache-check")
            return a

        return run_seeds(argv, seeds, args.out, jobs)


COMMANDS = {
    c.name: c for c in (
        Pretrain("pretrain", "pre-train the base model on the noisy corpus (next-token loss)"),
        RL("rl", "RL-tune a model (group-relative policy gradient on exact answers)"),
        Score("score", "cache a scorer's per-token log-probs on the mid-training data"),
        Midtrain("midtrain", "mid-train (anneal) a base model with ntp, remit, rho1, kd or rmt"),
        Eval("eval", "answer accuracy and NLL of a model on held-out problems"),
        Flywheel("flywheel", "pretrain -> NTP anneal -> RL reference -> mid-train with "
                             "every method -> RL -> results table (--seeds K: K seeds)"),
    )
}
