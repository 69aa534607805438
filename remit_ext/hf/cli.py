"""``remit-ext score-hf``: run a frozen Hugging Face scorer once over a tokenized dataset and
write its per-token log-probs as a sharded, resumable cache (``remit_ext.hf.cache``).

This module imports nothing from ``transformers`` until the command runs, so ``remit-ext``
itself loads without the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import json

help = ("score a tokenized dataset with a frozen Hugging Face causal LM: per-token log-probs as "
        "a sharded, resumable scorer cache for ReMiT / Rho-1 (needs remit_ext[hf])")

_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorer", required=True, metavar="PATH_OR_NAME",
                        help="the frozen scorer (AutoModelForCausalLM.from_pretrained)")
    parser.add_argument("--data", required=True, metavar="TOKENIZED",
                        help="JSONL of token ids (one {\"input_ids\": [...]} or [...] a line), "
                             "Parquet (needs pyarrow) or a datasets save_to_disk directory "
                             "(needs datasets)")
    parser.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    parser.add_argument("--column", default="input_ids",
                        help="token-id column (default: %(default)s)")
    parser.add_argument("--split", default=None, help="split of a DatasetDict")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences per scorer forward (default: %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="cap on padded tokens per forward (default: none)")
    parser.add_argument("--shard-size", type=int, default=4096,
                        help="sequences per shard file, the unit of resumption "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES,
                        help="scorer weights dtype (default: %(default)s, the checkpoint's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--backend", default="auto", help="remit_ext backend for the fused head")
    parser.add_argument("--memory-budget", type=int, default=None,
                        help="bytes for the fused head's logits chunks")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a cache in --out made with other settings or data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("remit-ext score-hf needs transformers: pip install 'remit_ext[hf]'")
    from .cache import score_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    scorer = AutoModelForCausalLM.from_pretrained(args.scorer, **kw).to(device)
    manifest = score_dataset(
        scorer, args.data, args.out, column=args.column, split=args.split,
        batch_size=args.batch_size, batch_tokens=args.batch_tokens, shard_size=args.shard_size,
        scorer_name=args.scorer, memory_budget=args.memory_budget, backend=args.backend,
        progress=not args.no_progress, overwrite=args.overwrite)
    resumed = sum(s["resumed"] for s in manifest["shards"])
    print(json.dumps({"out": str(args.out), "sequences": manifest["num_sequences"],
                      "tokens": manifest["num_tokens"], "shards": len(manifest["shards"]),
                      "shards_resumed": resumed, "seconds": manifest["seconds"]}))
    return 0
